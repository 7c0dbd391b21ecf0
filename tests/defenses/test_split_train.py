"""A splitting defense's split as its own cached job: one split feeds A-ABL's own stage 3 and a
`split-train` entry, and editing a training never recomputes it."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from poisonflow.defenses import DEFENSES, SplitResult
from poisonflow.errors import ConfigError
import defense_utils
from workflow_utils import planned_jobs, snakemake, write_config

torch.set_num_threads(1)


def test_split_round_trips_through_its_file(tmp_path):
    split = SplitResult(kept=np.array([True, False, True]), sample_scores={"SCE after iFGSM": np.array([1.0, 0.2, 3.0])},
                        thresholds={"SCE after iFGSM": 0.5}, metrics={"gamma": 2 / 3})
    split.save(tmp_path / "split.npz")
    again = SplitResult.load(tmp_path / "split.npz")
    assert again.kept.tolist() == [True, False, True] and again.thresholds == {"SCE after iFGSM": 0.5}
    np.testing.assert_array_equal(again.sample_scores["SCE after iFGSM"], [1.0, 0.2, 3.0])
    assert again.metrics == {"gamma": 2 / 3}


def test_split_train_trains_on_the_kept_samples_only(tmp_path, monkeypatch):
    ctx = defense_utils.tiny_context(tmp_path, n=30)
    kept = np.arange(30) % 3 != 0
    ctx.split = SplitResult(kept=kept)
    seen = set()
    from poisonflow import trainer

    original = trainer.train_model

    def spy(*args, **kwargs):
        seen.update(np.flatnonzero(kwargs["subset"]).tolist())
        return original(*args, **kwargs)

    import poisonflow.defenses.split_train as split_train

    monkeypatch.setattr(split_train, "train_model", spy)
    result = DEFENSES.get("split-train").run({"kind": "split-train", "splitter": "a", "training": {"epochs": 1}}, ctx)
    assert seen == set(np.flatnonzero(kept).tolist()) and result.kept is kept
    assert result.metrics["gamma"] == pytest.approx(20 / 30)
    ctx.split = None
    with pytest.raises(ConfigError, match=r"^split-train\.splitter: the defense was given no split"):
        DEFENSES.get("split-train").run({"kind": "split-train", "splitter": "a"}, ctx)


def test_aabl_uses_a_given_split_instead_of_splitting(tmp_path, monkeypatch):
    from poisonflow.defenses import aabl

    ctx = defense_utils.tiny_context(tmp_path, n=30)
    ctx.split = SplitResult(kept=np.arange(30) < 20, metrics={"gamma": 2 / 3, "threshold": 1.0})
    monkeypatch.setattr(aabl, "naive_training", lambda *a: pytest.fail("stage 1 ran again"))
    spec = {"kind": "aabl", "stage3": {"epochs": 1, "adversarial": {"eps": 0.03, "step": 0.01, "steps": 1}}}
    result = aabl.run(spec, ctx)
    assert result.kept.sum() == 20 and result.metrics["gamma"] == pytest.approx(2 / 3)


WORKFLOW = {
    "datasets": {"digits": {"source": "digits", "image_size": 8, "train_size": 60, "test_size": 20}},
    "models": {"tiny": {"arch": "convnet", "width": 4}},
    "trainings": {"fast": {"model": "tiny", "epochs": 1, "batch_size": 32}},
    "attacks": {"badnets": {"kind": "badnets", "target": 0, "rate": 0.1}},
    "defenses": {
        "aabl": {"kind": "aabl", "stage1": {"epochs": 1}, "split": {"steps": 1},
                 "stage3": {"epochs": 1, "adversarial": {"eps": 0.03, "step": 0.01, "steps": 1}}},
        "aabl-naive": {"kind": "split-train", "splitter": "aabl"}},
    "evaluation": {"pgd": None},
    "experiments": [{"dataset": ["digits"], "attack": ["badnets"], "training": ["fast"],
                     "defense": ["aabl", "aabl-naive"], "seed": [0]}],
}
SPLIT = "results/splits/digits/badnets/fast/seed0/aabl/split.npz"


def test_one_split_job_feeds_both_trainings_and_a_stage3_edit_does_not_rerun_it(tmp_path, store_arrays):
    from poisonflow.store import write_store

    write_config(tmp_path, WORKFLOW)
    jobs = planned_jobs(tmp_path)
    assert sorted(j for j in jobs if j[0] == "split") == [
        ("split", "attack=badnets", "dataset=digits", "defense=aabl", "seed=0", "training=fast")]
    assert {j[3] for j in jobs if j[0] == "defense"} == {"defense=aabl", "defense=aabl-naive"}

    # the stores as the data and poison jobs would leave them, then the split job for real
    results = tmp_path / "results"
    arrays = store_arrays(n=40, size=8, classes=10)
    reserve = store_arrays(n=20, size=8, classes=10, seed=1)
    classes = [str(c) for c in range(10)]
    write_store(results / "data/digits.zarr", {**arrays, "reserve/images": reserve["train/images"],
                                                "reserve/labels": reserve["train/labels"]}, {"classes": classes})
    write_store(results / "poison/digits/badnets/seed0.zarr", arrays, {"classes": classes})
    snakemake(tmp_path, SPLIT)
    folder = results / "splits/digits/badnets/fast/seed0/aabl"
    assert {"split.npz", "split.json", "scores.png"} <= {p.name for p in folder.iterdir()}
    split = SplitResult.load(folder / "split.npz")
    assert len(split.kept) == 40 and "SCE after iFGSM" in split.sample_scores

    edited = copy.deepcopy(WORKFLOW)
    edited["defenses"]["aabl"]["stage3"]["epochs"] = 2  # stage 3 only
    edited["defenses"]["aabl-naive"]["training"] = {"epochs": 3}
    write_config(tmp_path, edited)
    assert planned_jobs(tmp_path, SPLIT) == set()
    edited["defenses"]["aabl"]["stage1"]["epochs"] = 2  # the split's own keys
    write_config(tmp_path, edited)
    assert planned_jobs(tmp_path, SPLIT) == {
        ("split", "attack=badnets", "dataset=digits", "defense=aabl", "seed=0", "training=fast")}


def test_a_splitter_that_does_not_split_is_refused(tiny_config, load_config):
    tiny_config["defenses"]["n"] = {"kind": "nad"}
    tiny_config["defenses"]["t"] = {"kind": "split-train", "splitter": "n"}
    with pytest.raises(ConfigError, match=r"^defenses\.t\.splitter: 'n' is of kind 'nad', which does not split"):
        load_config(tiny_config)
    tiny_config["defenses"]["t"] = {"kind": "split-train", "splitter": "missing"}
    with pytest.raises(ConfigError, match=r"^defenses\.t\.splitter: no defenses entry named 'missing'"):
        load_config(tiny_config)


def test_dst_splits_in_three_groups_and_trains_on_a_given_split(tmp_path, monkeypatch):
    from poisonflow.defenses import dst

    ctx = defense_utils.tiny_context(tmp_path, n=40)
    spec = {"kind": "d-st", "sd_training": {"epochs": 1}, "sd_finetune": {"epochs": 1},
            "extractor": {"epochs": 1, "batch_size": 16}, "classifier": {"epochs": 1, "batch_size": 16}}
    found = dst.split(spec, ctx)
    assert set(np.unique(found.groups)) <= {dst.CLEAN, dst.UNCERTAIN, dst.POISONED}
    assert (found.kept == (found.groups == dst.CLEAN)).all() and found.metrics["clean"] == found.kept.sum()
    found.save(tmp_path / "split.npz")
    ctx.split = SplitResult.load(tmp_path / "split.npz")
    monkeypatch.setattr(dst, "sd_model", lambda *a: pytest.fail("the split was computed again"))
    result = dst.run(spec, ctx)
    assert (result.kept == found.kept).all()


@pytest.mark.parametrize("perturbation", ["randaugment", "autoaugment"])
def test_aabl_can_split_under_a_strong_augmentation_instead_of_ifgsm(perturbation):
    """A-ABL's Table 5: the SCE after RandAugment / AutoAugment in place of iFGSM, seeded."""
    from poisonflow.defenses import aabl
    from poisonflow.kinds import settings_for
    from poisonflow.models import build_model

    images, labels = defense_utils.synthetic_images(24, size=8)
    torch.manual_seed(0)
    model = build_model(defense_utils.TINY_TRAINING["model"], 3, 8)
    split = settings_for(aabl.__name__, {"kind": "aabl", "split": {"perturbation": perturbation}})["split"]
    before, after = aabl.adversarial_sce(model, images, labels, split, "cpu", defense_utils.TINY_TRAINING)
    again_before, again = aabl.adversarial_sce(model, images, labels, split, "cpu", defense_utils.TINY_TRAINING)
    np.testing.assert_array_equal(after, again)
    assert not np.allclose(before, after)
