"""``poisonflow <stage>``: one subcommand per workflow stage; Snakemake rules call these.

GPU stages claim a free device slot before torch is imported (see :mod:`poisonflow.devices`).
User-facing errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import PoisonflowError

STAGES = {
    "data": ("poisonflow.stages.data", False, "build the clean dataset store"),
    "surrogate": ("poisonflow.stages.surrogate", True, "train a surrogate on clean data, recording training dynamics"),
    "scores": ("poisonflow.stages.scores", True, "per-sample loss, gradient norm and forgetting events"),
    "trigger": ("poisonflow.stages.trigger", True, "train a generators entry (a learned trigger) on the clean store"),
    "poison": ("poisonflow.stages.poison", True, "build a poisoned store (backdoor or unlearnable examples)"),
    "protect": ("poisonflow.stages.protect", True, "protect new images (a folder or a store) sample by sample, as the poison stage would"),
    "victim": ("poisonflow.stages.victim", True, "train a model on a poisoned store and evaluate it"),
    "defense": ("poisonflow.stages.defense", True, "run a defense and evaluate the defended model"),
    "figures": ("poisonflow.stages.figures", False, "draw one entry of the figures: section from stored artifacts"),
    "aggregate": ("poisonflow.stages.aggregate", False, "collect metrics into tables and figures"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="poisonflow", description=__doc__)
    sub = parser.add_subparsers(dest="stage", required=True)
    for name, (module_name, uses_gpu, help_text) in STAGES.items():
        stage_parser = sub.add_parser(name, help=help_text)
        stage_parser.set_defaults(module=module_name, uses_gpu=uses_gpu)
        stage_parser.add_argument("--gpu-locks", help="directory of the GPU slot lock files")
    # Parse the stage name first so only that stage's module (and torch) is imported.
    argv = sys.argv[1:] if argv is None else argv
    if not any(arg in STAGES for arg in argv):
        parser.parse_args(argv)  # top-level help or the usage error
    # first pass without -h, so a stage's --help comes after its arguments are added
    known, _ = parser.parse_known_args([arg for arg in argv if arg not in ("-h", "--help")])
    if known.uses_gpu:  # pin the device before torch is imported by the stage module
        from .devices import claim_gpu

        claim_gpu(known.gpu_locks)
    module = importlib.import_module(known.module)
    module.add_arguments(sub.choices[known.stage])
    args = parser.parse_args(argv)
    try:
        module.run(args)
    except PoisonflowError as error:
        print(f"poisonflow {args.stage}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
