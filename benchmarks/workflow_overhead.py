"""The workflow's own overhead: Snakemake dry runs, no-op reruns and scheduling, on one or more
source trees side by side (e.g. the committed HEAD and the working tree).

    git worktree add /tmp/before HEAD
    python benchmarks/workflow_overhead.py --tree before=/tmp/before --tree after=. --cores 0

Each tree is measured with ``PYTHONPATH=<tree>/src`` and ``-s <tree>/Snakefile`` in fresh
temporary directories, pinned to the CPUs of ``--cores`` (``taskset``), one tree after the other
for each measurement so both see the same machine load. Reported per measurement: wall seconds
and CPU seconds (user + sys of Snakemake and its children), the best of ``--repeat`` runs.

- ``dry-big``: dry run of a generated config of ``--seeds`` × ``--attacks`` on digits against
  four defenses (none, fine-pruning, A-ABL, STRIP): 20 × 100 gives 10,002 jobs once the
  `none` defense runs no job (12,002 before);
- ``dry-default``: dry run of config.yaml from an empty results directory;
- ``noop-default``: a real run of config.yaml after a finished one (nothing to do). The finished
  state is made by running the workflow once with a stand-in ``poisonflow`` on PATH that only
  creates each job's output files (so Snakemake records the same metadata as after real jobs);
- ``schedule-<scheduler>``: a real run of a generated config of ``--schedule-jobs`` jobs with the
  stand-in, ``--cores 4``: what Snakemake's scheduler adds per job (``ilp`` vs ``greedy``).

``--json PATH`` also writes every measurement as one JSON line. ``--profile DIR`` writes a
cProfile of each dry run of the big config, per tree.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import yaml

STAND_IN = textwrap.dedent('''\
    #!{python}
    """Stand-in for `poisonflow <stage>`: creates the job's outputs, runs nothing."""
    import os, sys
    args = sys.argv[1:]
    if args and args[0] == "-m":  # the warm runner's command line: python -m poisonflow.warm STAGE ...
        args = args[2:]
    stage, rest = args[0], args[1:]
    def value(name):
        return rest[rest.index(name) + 1] if name in rest else None
    FILES = {{"surrogate": ["model.pt", "scoring.pt", "dynamics.npz", "info.json"],
             "victim": ["model.pt", "metrics.json"], "defense": ["model.pt", "metrics.json"],
             "trigger": ["generator.pt", "info.json"]}}
    def touch(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        open(path, "a").close()
    if stage in FILES:
        for name in FILES[stage]:
            touch(os.path.join(value("--out-dir"), name))
    elif stage in ("data", "poison"):
        os.makedirs(value("--out"), exist_ok=True)
    elif stage in ("scores", "figures"):
        touch(value("--out"))
    elif stage == "aggregate":
        root = value("--results")
        for name in ("metrics.csv", "tables/summary.csv", "tables/summary.md", "tables/summary.tex",
                     "figures/summary.png"):
            touch(os.path.join(root, name))
        os.makedirs(os.path.join(root, "report"), exist_ok=True)
''')


def big_config(seeds: int, attacks: int) -> dict:
    """digits × ``attacks`` BadNets/Blended variants × ``seeds`` against none, fine-pruning,
    A-ABL and STRIP."""
    return {
        "datasets": {"digits": {"source": "digits", "image_size": 16}},
        "models": {"tiny": {"arch": "convnet", "width": 4}},
        "trainings": {"fast": {"model": "tiny", "epochs": 1, "batch_size": 64, "augment": []}},
        "attacks": {f"a{i}": {"kind": "badnets" if i % 2 == 0 else "blended", "target": i % 10,
                              "rate": round(0.05 + 0.005 * (i % 10), 3)} for i in range(attacks)},
        "defenses": {"none": {"kind": "none"}, "fp": {"kind": "fine-pruning", "finetune": {"epochs": 1}},
                     "aabl": {"kind": "aabl", "stage1": {"epochs": 1}, "stage3": {"epochs": 1}},
                     "strip": {"kind": "strip"}},
        "experiments": [{"dataset": ["digits"], "attack": [f"a{i}" for i in range(attacks)], "training": ["fast"],
                         "defense": ["none", "fp", "aabl", "strip"], "seed": list(range(seeds))}],
    }


class Tree:
    def __init__(self, label: str, path: Path, cores: str | None, stand_in_dir: Path):
        self.label, self.path, self.cores, self.stand_in_dir = label, path.resolve(), cores, stand_in_dir

    def env(self, stand_in: bool) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(self.path / "src") + os.pathsep + env.get("PYTHONPATH", "")
        path = [str(Path(sys.executable).parent)]
        if stand_in:
            path.insert(0, str(self.stand_in_dir))
        env["PATH"] = os.pathsep.join(path + [env.get("PATH", "")])
        env.setdefault("POISONFLOW_GPU_LOCKS", str(Path(tempfile.gettempdir()) / "poisonflow-bench-locks"))
        return env

    def snakemake(self, workdir: Path, *args: str, stand_in: bool = False, profile: Path | None = None,
                  check: bool = True) -> tuple[float, float, str]:
        """(wall s, CPU s of the process tree, output) of one Snakemake call."""
        command = [sys.executable]
        if profile is not None:
            command += ["-m", "cProfile", "-o", str(profile)]
        command += ["-m", "snakemake", "-s", str(self.path / "Snakefile"), "-d", str(workdir), *args]
        if self.cores is not None and shutil.which("taskset"):
            command = ["taskset", "-c", self.cores, *command]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, env=self.env(stand_in))
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        output = result.stdout + result.stderr
        if check and result.returncode != 0:
            raise RuntimeError(f"{self.label}: snakemake {' '.join(args)} failed:\n{output[-3000:]}")
        return wall, cpu, output


def job_count(output: str) -> int | None:
    for line in output.splitlines():
        if line.startswith("total"):
            return int(line.split()[1])
    return None


def measure(name: str, trees: list[Tree], prepare, run, repeat: int, results: list) -> None:
    """Best of ``repeat`` (by CPU) per tree; the trees alternate within each repetition."""
    best: dict[str, dict] = {}
    for _ in range(repeat):
        for tree in trees:
            workdir = Path(tempfile.mkdtemp(prefix=f"overhead-{name}-{tree.label}-"))
            try:
                prepare(tree, workdir)
                wall, cpu, output = run(tree, workdir)
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
            row = {"measurement": name, "tree": tree.label, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                   "jobs": job_count(output)}
            if tree.label not in best or row["cpu_s"] < best[tree.label]["cpu_s"]:
                best[tree.label] = row
    for tree in trees:
        results.append(best[tree.label])
        row = best[tree.label]
        print(f"{name:>18} {tree.label:>8}: {row['wall_s']:7.2f} s wall {row['cpu_s']:7.2f} s CPU"
              + (f"  ({row['jobs']} jobs)" if row["jobs"] else ""), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", required=True, metavar="LABEL=PATH",
                        help="a source tree to measure (repeatable)")
    parser.add_argument("--cores", default="0", help="CPUs to pin Snakemake to (taskset list; '' = no pinning)")
    parser.add_argument("--seeds", type=int, default=100)
    parser.add_argument("--attacks", type=int, default=20)
    parser.add_argument("--schedule-jobs", type=int, default=0,
                        help="jobs of the scheduler measurement (0: skip it); about 5 per seed")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--only", nargs="*", default=None,
                        help="measurements to run (dry-big, dry-default, noop-default, schedule)")
    parser.add_argument("--json", help="append the measurements as JSON lines to this file")
    parser.add_argument("--profile", help="folder for cProfile files of the big dry run")
    args = parser.parse_args(argv)

    stand_in_dir = Path(tempfile.mkdtemp(prefix="overhead-bin-"))
    script = stand_in_dir / "poisonflow"
    script.write_text(STAND_IN.format(python=sys.executable))
    script.chmod(0o755)
    trees = []
    for item in args.tree:
        label, _, path = item.partition("=")
        trees.append(Tree(label, Path(path), args.cores or None, stand_in_dir))
    wanted = set(args.only or ["dry-big", "dry-default", "noop-default", "schedule"])
    results: list[dict] = []

    def default_config(tree, workdir):
        shutil.copy(tree.path / "config.yaml", workdir / "config.yaml")

    def big(tree, workdir):
        (workdir / "config.yaml").write_text(yaml.safe_dump(big_config(args.seeds, args.attacks), sort_keys=False))

    def dry(tree, workdir):
        return tree.snakemake(workdir, "--dry-run", "--cores", "1")

    def dry_profiled(tree, workdir):
        profile = None
        if args.profile:
            Path(args.profile).mkdir(parents=True, exist_ok=True)
            profile = Path(args.profile).resolve() / f"dry-big-{tree.label}.prof"
        return tree.snakemake(workdir, "--dry-run", "--cores", "1", profile=profile)

    def finished_default(tree, workdir):
        default_config(tree, workdir)
        tree.snakemake(workdir, "--cores", "2", stand_in=True)

    def noop(tree, workdir):
        wall, cpu, output = tree.snakemake(workdir, "--cores", "2", stand_in=True)
        if "Nothing to be done" not in output:
            raise RuntimeError(f"{tree.label}: the no-op rerun ran jobs:\n{output[-3000:]}")
        return wall, cpu, output

    if "dry-big" in wanted:
        measure("dry-big", trees, big, dry_profiled, args.repeat, results)
    if "dry-default" in wanted:
        measure("dry-default", trees, default_config, dry, args.repeat, results)
    if "noop-default" in wanted:
        measure("noop-default", trees, finished_default, noop, args.repeat, results)
    if "schedule" in wanted and args.schedule_jobs:
        seeds = max(1, args.schedule_jobs // (args.attacks * 5))

        def schedule_config(tree, workdir):
            (workdir / "config.yaml").write_text(yaml.safe_dump(big_config(seeds, args.attacks), sort_keys=False))

        for scheduler in ("greedy", "ilp"):
            def run(tree, workdir, scheduler=scheduler):
                return tree.snakemake(workdir, "--cores", "4", "--scheduler", scheduler, "--quiet", "all",
                                      stand_in=True)

            measure(f"schedule-{scheduler}", trees[-1:], schedule_config, run, args.repeat, results)
    if args.json:
        with open(args.json, "a") as handle:
            for row in results:
                handle.write(json.dumps(row) + "\n")
    shutil.rmtree(stand_in_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
