"""GSSD as a defense kind: features in, a retrained and fine-tuned model out; what it reads and
what the stage scores; the features stage shared through the workflow."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from poisonflow import gssd as decisions
from poisonflow.defenses import DEFENSES, DefenseContext, gssd
from poisonflow.errors import ConfigError
from poisonflow.kinds import defaults_of
from poisonflow.models import build_model
from poisonflow.stages.defense import detection_of_targets, relabel_metrics
import defense_utils
from test_gssd_math import synthetic_features
from workflow_utils import planned_jobs, write_config

torch.set_num_threads(1)

TINY = {"kind": "gssd", "features": "f", "flows": {"epochs": 8, "batch_size": 16},
        "retrain": {"epochs": 1}, "finetune": {"epochs": 1}}


def planted_context(tmp_path, seed: int = 0, per_class: int = 100, planted_count: int = 50):
    """Four classes of synthetic images and features (test_gssd_math's: two pairs of overlapping
    Gaussians); ``planted_count`` samples of classes 1–3 are relabelled 0 with their images and
    features unchanged: a non-disruptive attack on class 0 as the features see it."""
    rng = np.random.default_rng(seed)
    features, true_labels = synthetic_features(rng, per_class)
    images, _ = defense_utils.synthetic_images(len(true_labels), classes=4, seed=seed)
    images = images[np.argsort(np.arange(len(true_labels)) % 4, kind="stable")]  # image i of class labels[i]
    planted = rng.choice(np.flatnonzero(true_labels != 0), planted_count, replace=False)
    labels = true_labels.copy()
    labels[planted] = 0
    training = defense_utils.TINY_TRAINING
    ctx = DefenseContext(
        train_images=images, train_labels=labels, reserve_images=images[:0], reserve_labels=labels[:0],
        training=training, build_model=lambda: build_model(training["model"], num_classes=4, image_size=8),
        victim=None, seed=seed, device=torch.device("cpu"), workdir=tmp_path / "work", num_classes=4,
        features=features)
    return ctx, true_labels, planted


def test_defaults_are_the_appendix_and_official_ones():
    d = defaults_of(gssd.__name__)
    assert d["flows"] == {"steps": 2, "hidden_ratio": 1.0, "epochs": 50, "batch_size": 16, "lr": 1e-3}
    assert {key: d[key] for key in decisions.DEFAULTS} == decisions.DEFAULTS
    assert d["finetune"] == {"epochs": 2, "optimizer": {"lr": 1e-4}, "schedule": {"name": "constant"}}
    assert d["retrain"] == {}  # the victim's recipe
    assert gssd.flow_settings(d)["optimizer"] == {"name": "adam", "lr": 1e-3, "betas": [0.9, 0.99]}
    assert "gssd" in DEFENSES.entries()


def test_planted_class_is_detected_filtered_and_relabeled(tmp_path):
    ctx, true_labels, planted = planted_context(tmp_path)
    result = DEFENSES.get("gssd").run(TINY, ctx)
    assert result.metrics["detected_classes"] == [0]
    assert result.metrics["attack_types"] == [decisions.NON_DISRUPTIVE]
    members = np.flatnonzero(ctx.train_labels == 0)  # 100 own + 50 planted
    assert len(members) == 150
    # top 30 % kept (150 − int(0.7·150) = 45), bottom int(0.15·150) = 22 relabeled, the rest dropped
    assert result.kept[members].sum() == 45 and len(result.relabeled) == 22 == result.metrics["relabeled"]
    assert result.kept[ctx.train_labels != 0].all()
    assert not np.isin(result.relabeled, np.flatnonzero(result.kept)).any()
    poisoned = np.zeros(len(true_labels), dtype=bool)
    poisoned[planted] = True
    assert poisoned[result.kept & (ctx.train_labels == 0)].mean() < 0.15
    # the bottom scores: mostly planted (18 of 22 here); the rest are class 0's own samples nearest
    # its overlapping partner, class 1
    assert poisoned[result.relabeled].mean() > 0.7
    # sent back to their source's pair (partners overlap: within it, the likelier class)
    sources = true_labels[result.relabeled]
    assert (result.new_labels // 2 == sources // 2).mean() > 0.9
    assert not result.model.training
    # the whole verdict came from features and released labels: the same call on a context whose
    # images were replaced by noise decides the same way
    ctx2, _, _ = planted_context(tmp_path / "again")
    ctx2.train_images = np.random.default_rng(5).integers(0, 256, ctx2.train_images.shape, dtype=np.uint8)
    again = DEFENSES.get("gssd").run(TINY, ctx2)
    assert (again.kept == result.kept).all() and (again.relabeled == result.relabeled).all()
    assert again.metrics["flow_nll"] == result.metrics["flow_nll"]


def test_clean_features_flag_nothing_and_keep_everything(tmp_path):
    ctx, true_labels, _ = planted_context(tmp_path)
    ctx.train_labels = true_labels
    result = DEFENSES.get("gssd").run(TINY, ctx)
    assert result.metrics["detected_classes"] == [] and result.kept.all() and len(result.relabeled) == 0


def test_the_verdict_is_stored_and_a_rerun_reads_it(tmp_path, monkeypatch):
    ctx, _, _ = planted_context(tmp_path)
    first = DEFENSES.get("gssd").run(TINY, ctx)
    assert (ctx.workdir / "densities.pt").exists()
    monkeypatch.setattr(gssd, "class_densities", lambda *a: pytest.fail("the flows were fitted again"))
    second = DEFENSES.get("gssd").run(TINY, ctx)
    assert (second.kept == first.kept).all()
    edited = {**TINY, "flows": {**TINY["flows"], "epochs": 9}}  # another fit: the stored densities do not apply
    with pytest.raises(pytest.fail.Exception, match="fitted again"):
        DEFENSES.get("gssd").run(edited, ctx)


def test_missing_or_mismatched_features_are_refused_in_one_line(tmp_path):
    ctx, _, _ = planted_context(tmp_path)
    ctx.features = None
    with pytest.raises(ConfigError, match=r"^gssd\.features: the defense was given no features"):
        DEFENSES.get("gssd").run(TINY, ctx)
    ctx.features = np.zeros((7, 4), dtype=np.float32)
    with pytest.raises(ConfigError, match=r"^gssd\.features: 7 feature rows for 400 training samples"):
        DEFENSES.get("gssd").run(TINY, ctx)


def test_relabel_and_detection_scores_use_ground_truth_after_the_fact():
    class Result:
        relabeled = np.array([0, 1, 2, 5])
        new_labels = np.array([1, 1, 0, 2])

    poisoned = {"train/true_labels": np.array([1, 2, 0, 0, 0, 2]), "train/poisoned": np.array([1, 1, 0, 0, 0, 0], bool),
                "train/labels": np.array([0, 0, 0, 0, 1, 2])}
    assert relabel_metrics(Result(), poisoned) == {"relabel_accuracy": 0.75, "relabel_accuracy_poisoned": 0.5}
    assert detection_of_targets([0], poisoned) == {"false_detections": 0.0, "targets_detected": 1.0}
    assert detection_of_targets([1, 2], poisoned) == {"false_detections": 2.0, "targets_detected": 0.0}
    assert detection_of_targets(None, poisoned) == {}


# -- the workflow ------------------------------------------------------------------------------

WORKFLOW = {
    "datasets": {"digits": {"source": "digits", "image_size": 8, "train_size": 60, "test_size": 20}},
    "models": {"tiny": {"arch": "convnet", "width": 4}},
    "trainings": {"fast": {"model": "tiny", "epochs": 1, "batch_size": 32}},
    "features": {"simclr-tiny": {"model": "tiny", "epochs": 1, "batch_size": 32}},
    "attacks": {"badnets": {"kind": "badnets", "target": 0, "rate": 0.1}},
    "defenses": {"gssd": {"kind": "gssd", "features": "simclr-tiny"},
                 "gssd-strict": {"kind": "gssd", "features": "simclr-tiny", "alpha_c": 0.2}},
    "evaluation": {"pgd": None},
    "experiments": [{"dataset": ["digits"], "attack": ["badnets"], "training": ["fast"],
                     "defense": ["gssd", "gssd-strict"], "seed": [0, 1]}],
}


def test_gssd_variants_share_one_features_job_per_store(tmp_path):
    write_config(tmp_path, WORKFLOW)
    jobs = planned_jobs(tmp_path)
    features = sorted(job for job in jobs if job[0] == "features")
    assert features == [("features", "attack=badnets", "dataset=digits", "features=simclr-tiny", f"seed={s}")
                        for s in (0, 1)]
    assert sum(job[0] == "defense" for job in jobs) == 4


def test_defense_inputs_name_the_features_of_the_same_store():
    from poisonflow.config import Config
    from poisonflow.workflow_helpers import Plan

    plan = Plan(Config(copy.deepcopy(WORKFLOW)))
    wildcards = type("W", (), {"dataset": "digits", "attack": "badnets", "training": "fast", "seed": "1",
                               "defense": "gssd"})
    inputs = plan.defense_inputs(wildcards)
    assert inputs["features"] == "results/features/digits/badnets/simclr-tiny/seed1/features.npz"
    assert inputs["poison"] == "results/poison/digits/badnets/seed1.zarr"
    assert json.loads(plan.spec("defense")(wildcards))["flows"]["epochs"] == 50


def test_a_features_name_that_is_not_an_entry_is_refused(tiny_config, load_config):
    tiny_config["defenses"]["g"] = {"kind": "gssd", "features": "missing"}
    with pytest.raises(ConfigError, match=r"^defenses\.g\.features: no features entry named 'missing'"):
        load_config(tiny_config)


def test_discriminative_classifier_filters_the_given_target(tmp_path):
    """Appendix J: an MLP's log-softmax in place of the flows, told the target class."""
    ctx, true_labels, planted = planted_context(tmp_path)
    spec = {**TINY, "classifier": "discriminative", "targets": [0], "discriminative": {"epochs": 5}}
    result = DEFENSES.get("gssd").run(spec, ctx)
    assert result.metrics["given_classes"] == [0] and "detected_classes" not in result.metrics
    members = np.flatnonzero(ctx.train_labels == 0)
    assert result.kept[members].sum() == 45 and len(result.relabeled) == 22
    assert result.kept[ctx.train_labels != 0].all()
    poisoned = np.isin(np.arange(len(true_labels)), planted)
    assert poisoned[result.relabeled].mean() > 0.5  # the MLP ranks planted samples low too
    with pytest.raises(ConfigError, match=r"^gssd\.targets: classifier discriminative cannot detect"):
        DEFENSES.get("gssd").run({**spec, "targets": []}, planted_context(tmp_path / "b")[0])
