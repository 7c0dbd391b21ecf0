"""split stage: one splitting defense's split of a poisoned store's released training set →
``results/splits/{dataset}/{attack}/{training}/seed{seed}/{defense}/``.

A defense kind that splits (its fragment's ``split:`` lists the entry keys the split depends on;
A-ABL's ``stage1`` and ``split``) implements ``split(spec, ctx) -> SplitResult``. This stage runs it
with what a defender has (the defense stage's :func:`~poisonflow.stages.defense.defender_context`,
no victim) and writes ``split.npz`` (:meth:`SplitResult.save`), then, scored against ground truth
after the split returned, ``split.json`` (the split's own metrics with ``gamma``, ``rho_vul``,
``poison_removed``, ``clean_lost``) and ``scores.png`` (each score, clean vs poisoned, with the
thresholds). The defense job of the same entry and every ``split-train`` entry naming it read
``split.npz``; the rule passes only the split keys, so editing the rest of the entry (A-ABL's
``stage3``) does not rerun this job.
"""

from __future__ import annotations

from pathlib import Path

from .common import SEED_HELP, THREADS_HELP, parse_json, set_threads, write_json


def add_arguments(parser) -> None:
    parser.add_argument("--name", required=True, help="the defenses entry name (for messages)")
    parser.add_argument("--spec", required=True, metavar="JSON", help="the entry's kind and split keys (JSON)")
    parser.add_argument("--training", required=True, metavar="JSON", help="the victim's resolved trainings entry")
    parser.add_argument("--seed", type=int, required=True, help=SEED_HELP)
    parser.add_argument("--clean", required=True, metavar="STORE", help="clean store (its reserve)")
    parser.add_argument("--poison", required=True, metavar="STORE", help="poisoned store: the released training set")
    parser.add_argument("--out-dir", required=True, metavar="DIR", help="output folder: split.npz, split.json, scores.png")
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)


def run(args) -> None:
    import numpy as np

    from ..defenses import DEFENSES
    from ..devices import torch_device
    from ..kinds import DEFENSES as KINDS
    from ..provenance import record
    from ..store import read_store
    from .defense import defender_context, finish_workdir, model_builder, split_metrics, write_sample_scores

    set_threads(args.threads)
    spec = parse_json(args.spec, "--spec")
    training = parse_json(args.training, "--training")
    key = f"defenses.{args.name}"
    if not KINDS.fragment(spec["kind"], key=f"{key}.kind").split:
        from ..errors import ConfigError

        raise ConfigError(f"{key}.kind: '{spec['kind']}' does not split the training set")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean, poisoned = read_store(args.clean), read_store(args.poison)
    device = torch_device()
    context = defender_context(clean, poisoned, training=training,
                               build_model=model_builder(training, clean, args.seed, device), victim=None,
                               seed=args.seed, device=device, workdir=out / "work")
    result = DEFENSES.get(spec["kind"]).split(spec, context)
    result.save(out / "split.npz")
    truth = np.asarray(poisoned["train/poisoned"], dtype=bool)  # scoring, after the split returned
    metrics = {**result.metrics, **split_metrics(result.kept, truth)}
    provenance = record("split", entry=spec, name=args.name, seed=args.seed, device=device,
                        inputs=[args.clean, args.poison], code=["poisonflow.stages.split", DEFENSES.module_name(spec["kind"])],
                        extra={"training": training})
    write_json(metrics, out / "split.json", provenance=provenance)
    if result.sample_scores:
        write_sample_scores(out, result, truth, f"{args.name}, seed {args.seed}")
    finish_workdir(out)
    print(f"{out}: kept {int(result.kept.sum())} of {len(result.kept)}")
