"""Run the workflow on a config in a temporary directory and read dry-run job lists."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def environment() -> dict:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("POISONFLOW_GPU_LOCKS", str(Path(env.get("TMPDIR", "/tmp")) / "poisonflow-test-gpu-locks"))
    return env


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
               "--cores", "2", *args]
    result = subprocess.run(command, capture_output=True, text=True, env=environment())
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def write_config(workdir: Path, config: dict) -> None:
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def planned_jobs(workdir: Path, *targets: str) -> set[tuple]:
    """(rule, wildcards...) of every job a dry run (of ``targets``, default the default target)
    would execute, ``all`` excluded."""
    result = snakemake(workdir, "--dry-run", *targets)
    text = result.stdout + result.stderr
    jobs = set()  # a grouped run (workflow.group_small_jobs) prints its jobs indented
    for block in re.split(r"\n(?=[ \t]*(?:local)?rule \S+:)", text):
        match = re.match(r"(?:local)?rule (\S+):", block.strip())
        if not match or match.group(1) == "all":
            continue
        wildcards = re.search(r"^\s*wildcards: (.*)$", block, re.MULTILINE)
        items = tuple(sorted(wildcards.group(1).split(", "))) if wildcards else ()
        jobs.add((match.group(1), *items))
    return jobs
