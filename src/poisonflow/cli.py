"""``poisonflow <stage>``: one subcommand per workflow stage; Snakemake rules call these.

GPU stages claim a free device slot before torch is imported (see :mod:`poisonflow.devices`);
``--help`` claims nothing and imports no torch (stage modules import it inside their functions).
User-facing errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .errors import PoisonflowError

# name: (module, can use a GPU, one-line help)
STAGES = {
    "data": ("poisonflow.stages.data", False, "build the clean dataset store"),
    "surrogate": ("poisonflow.stages.surrogate", True, "train a surrogate on clean data, recording training dynamics"),
    "scores": ("poisonflow.stages.scores", True, "per-sample loss, gradient norm and forgetting events"),
    "trigger": ("poisonflow.stages.trigger", True, "train a generators entry (a learned trigger) on the clean store"),
    "poison": ("poisonflow.stages.poison", True, "build a poisoned store (backdoor or unlearnable examples)"),
    "protect": ("poisonflow.stages.protect", True, "protect new images (a folder or a store) sample by sample, as the poison stage would"),
    "features": ("poisonflow.stages.features", True,
                 "self-supervised (SimCLR) or CLIP features of a poisoned store's released training set"),
    "victim": ("poisonflow.stages.victim", True, "train a model on a poisoned store and evaluate it"),
    "split": ("poisonflow.stages.split", True,
              "a splitting defense's split of a poisoned store's released training set (cached; trainings read it)"),
    "defense": ("poisonflow.stages.defense", True, "run a defense and evaluate the defended model"),
    "robustness": ("poisonflow.stages.robustness", True,
                   "a victim under test-time distortions (blur, JPEG, noise, recapture) or on a folder of images"),
    "figures": ("poisonflow.stages.figures", False, "draw one entry of the figures: section from stored artifacts"),
    "aggregate": ("poisonflow.stages.aggregate", False, "collect metrics into tables and figures"),
    "info": ("poisonflow.stages.info", False, "print how an artifact was made (store, model or metrics.json)"),
    "verify": ("poisonflow.stages.verify", False, "check every store, model and metrics file; remove damaged ones"),
}

DESCRIPTION = (
    "poisonflow: the stages of a cached data-poisoning workflow, one subcommand each. The Snakemake "
    "workflow (snakemake --cores all) runs them for every job of the config; each can also be run by hand. "
    "'poisonflow STAGE --help' lists a stage's arguments."
)
EPILOG = "Errors about the config, paths or damaged results print one line and exit with status 2."

# arguments that carry JSON: a malformed value is a one-line error before the stage runs
JSON_ARGUMENTS = ("spec", "training", "evaluation", "experiment", "attack_spec")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per stage (the stages' own arguments not yet added)."""
    parser = argparse.ArgumentParser(prog="poisonflow", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"poisonflow {__version__}")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, (module_name, uses_gpu, help_text) in STAGES.items():
        stage_parser = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        stage_parser.set_defaults(module=module_name, uses_gpu=uses_gpu)
        if uses_gpu:
            stage_parser.add_argument(
                "--gpu-locks", metavar="DIR",
                help="directory of the GPU slot lock files (default: $POISONFLOW_GPU_LOCKS, else "
                     "~/.cache/poisonflow/gpu-locks); the job takes a free GPU before torch starts")
    parser.stage_parsers = sub.choices  # name → the stage's parser
    return parser


def _json_problem(args) -> str | None:
    from .stages.common import parse_json

    for name in JSON_ARGUMENTS:
        value = getattr(args, name, None)
        if isinstance(value, str):
            try:
                parse_json(value, "--" + name.replace("_", "-"), kind=None)
            except PoisonflowError as error:
                return str(error)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not any(arg in STAGES for arg in argv):
        parser.parse_args(argv)  # top-level help, --version or the usage error
    # First pass without -h, to find the stage: only its module is imported, after its arguments
    # are added the second pass prints its help. Help claims no GPU.
    wants_help = any(arg in ("-h", "--help") for arg in argv)
    known, _ = parser.parse_known_args([arg for arg in argv if arg not in ("-h", "--help")])
    if known.uses_gpu and not wants_help:  # pin the device before the stage imports torch
        from .devices import claim_gpu

        claim_gpu(known.gpu_locks)
    module = importlib.import_module(known.module)
    module.add_arguments(parser.stage_parsers[known.stage])
    args = parser.parse_args(argv)
    problem = _json_problem(args)
    if problem:
        print(f"poisonflow {args.stage}: error: {problem}", file=sys.stderr)
        return 2
    try:
        status = module.run(args)  # None, or an exit status (verify: 1 when it found damage)
    except PoisonflowError as error:
        print(f"poisonflow {args.stage}: error: {error}", file=sys.stderr)
        return 2
    return status if isinstance(status, int) and not isinstance(status, bool) else 0


if __name__ == "__main__":
    sys.exit(main())
