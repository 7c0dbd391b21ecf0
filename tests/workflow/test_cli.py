import argparse
import json
import subprocess
import sys
import time

import pytest

from poisonflow import __version__
from poisonflow.cli import STAGES, build_parser, main


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_each_stage_help_lists_its_arguments(stage, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([stage, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: poisonflow {stage}" in out
    assert "--spec" in out or "--metrics" in out or "PATH" in out or "RESULTS_DIR" in out


def stage_parsers() -> dict[str, argparse.ArgumentParser]:
    import importlib

    parser = build_parser()
    for name, (module, _, _) in STAGES.items():
        importlib.import_module(module).add_arguments(parser.stage_parsers[name])
    return parser.stage_parsers


def test_every_argument_has_help_text():
    missing = [f"{name} {action.option_strings or action.dest}"
               for name, parser in stage_parsers().items() for action in parser._actions
               if not isinstance(action, argparse._HelpAction) and not (action.help or "").strip()]
    assert missing == []


def test_gpu_locks_only_where_a_stage_can_use_a_gpu():
    for name, parser in stage_parsers().items():
        options = {option for action in parser._actions for option in action.option_strings}
        assert ("--gpu-locks" in options) == STAGES[name][1], name
    assert not STAGES["aggregate"][1] and not STAGES["info"][1] and STAGES["victim"][1]


def test_version_and_plain_top_level_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"poisonflow {__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "usage: poisonflow" in out and "verify" in out and "info" in out
    assert "``" not in out and ":mod:" not in out and ":func:" not in out  # no raw Sphinx markup


@pytest.mark.parametrize("argv, option", [
    (["victim", "--spec", "{not json", "--evaluation", "{}", "--seed", "0", "--clean", "c", "--poison", "p",
      "--out-dir", "o"], "--spec"),
    (["victim", "--spec", "{}", "--evaluation", "[1,", "--seed", "0", "--clean", "c", "--poison", "p",
      "--out-dir", "o"], "--evaluation"),
    (["data", "--name", "d", "--spec", "", "--out", "o"], "--spec"),
])
def test_malformed_json_argument_is_one_line(argv, option, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"poisonflow {argv[0]}: error: {option}: not valid JSON (")


HELP_PROBE = """
import json, os, sys, time
start = time.perf_counter()
from poisonflow.cli import main
try:
    main([sys.argv[1], "--help"])
except SystemExit as exit:
    code = exit.code
print(json.dumps({"code": code, "torch": "torch" in sys.modules, "seconds": time.perf_counter() - start,
                  "locks": sorted(os.listdir(os.environ["POISONFLOW_GPU_LOCKS"]))
                  if os.path.isdir(os.environ["POISONFLOW_GPU_LOCKS"]) else []}))
"""


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_help_is_instant_takes_no_gpu_and_imports_no_torch(stage, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "POISONFLOW_GPU_LOCKS": str(tmp_path / "locks"), "CUDA_VISIBLE_DEVICES": "0",
           "HOME": str(tmp_path)}  # one (pretend) GPU: a claim would leave a lock file
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", HELP_PROBE, stage], capture_output=True, text=True, env=env,
                            timeout=30)
    wall = time.perf_counter() - started
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    assert probe["code"] == 0 and not probe["torch"], (stage, probe)
    assert probe["locks"] == [], "--help took a GPU slot"
    assert wall < 2.0, f"poisonflow {stage} --help took {wall:.2f} s"


def test_user_error_is_one_line_with_exit_status_2(tmp_path, capsys):
    code = main(["poison", "--name", "a", "--spec", '{"kind": "badnets"}', "--seed", "0",
                 "--clean", str(tmp_path / "missing.zarr"), "--out", str(tmp_path / "p.zarr")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"poisonflow poison: error: {tmp_path / 'missing.zarr'}: store does not exist"]
