"""Learned triggers are artifacts of their own stage: trained once per dataset and generators
entry, reused by every attack that names them, retrained only when their own settings change."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from poisonflow.attacks import trojannn
from workflow_utils import planned_jobs, snakemake, write_config

CONFIG = {
    "datasets": {"digits": {"source": "digits", "image_size": 16}},
    "models": {"tiny": {"arch": "convnet", "width": 8}},
    "trainings": {"fast": {"model": "tiny", "epochs": 6, "batch_size": 64, "augment": ["flip"]},
                  "surr": {"model": "tiny", "epochs": 2, "batch_size": 64, "augment": []}},
    "surrogates": {"clean": {"training": "surr", "score_epoch": 1}},
    "generators": {"trojan": {"kind": "trojannn", "surrogate": "clean", "steps": 20, "mask": {"size": 4, "margin": 1}}},
    "attacks": {"trojan-10": {"kind": "trojannn", "generator": "trojan", "rate": 0.1},
                "trojan-20": {"kind": "trojannn", "generator": "trojan", "rate": 0.2}},
    "defenses": {"none": {"kind": "none"}},
    "evaluation": {"pgd": None},
    "experiments": [{"dataset": ["digits"], "attack": ["trojan-10", "trojan-20"], "training": ["fast"],
                     "defense": ["none"], "seed": [0]}],
    "workflow": {"group_small_jobs": True},  # jobs in the warm process: no torch import each
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("generators")
    write_config(path, CONFIG)
    snakemake(path)
    return path


def rules_of(jobs) -> list[str]:
    return sorted(job[0] for job in jobs)


def test_one_trigger_job_serves_both_attacks_and_implants_a_backdoor(workdir):
    folder = workdir / "results/triggers/digits/trojan"
    info = json.loads((folder / "info.json").read_text())
    assert info["generator"]["steps"] == 20 and info["seconds"] > 0
    generator = torch.load(folder / "generator.pt", weights_only=True)
    assert generator["mask"].sum() == 16 and (generator["pattern"][:, generator["mask"] == 0] == 0).all()
    for attack in ("trojan-10", "trojan-20"):
        metrics = json.loads((workdir / f"results/victims/digits/{attack}/fast/seed0/metrics.json").read_text())
        assert metrics["asr"] > 0.8 and metrics["acc"] > 0.8, (attack, metrics)


def test_attack_edits_do_not_retrain_the_trigger_and_generator_edits_do(workdir):
    original = (workdir / "config.yaml").read_text()
    assert planned_jobs(workdir) == set()  # the finished run is complete
    try:
        config = copy.deepcopy(CONFIG)
        config["attacks"]["trojan-10"]["rate"] = 0.15
        config["attacks"]["trojan-20"]["target"] = 3
        write_config(workdir, config)
        assert "trigger" not in rules_of(planned_jobs(workdir))
        config = copy.deepcopy(CONFIG)
        config["generators"]["trojan"]["steps"] = 30
        write_config(workdir, config)
        jobs = rules_of(planned_jobs(workdir))
        assert jobs.count("trigger") == 1 and jobs.count("poison") == 2
    finally:
        (workdir / "config.yaml").write_text(original)


def test_strongest_neurons_and_the_optimised_trigger_follow_the_objective():
    torch.manual_seed(0)
    from poisonflow.models import build_model

    model = build_model({"arch": "convnet", "width": 4}, 3, 8).eval()
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.weight[:, 5] = torch.tensor([1.0, -2.0, 0.5])  # Σ|W| = 3.5
        model.fc.weight[0, 1] = -3.0  # Σ|W| = 3
    assert trojannn.strongest_neurons(model, 2).tolist() == [5, 1]
    mask = trojannn.square_mask(3, "bottom-right", 0, 8)
    neurons = torch.tensor([0, 2])
    settings = {"eps": 0.3, "step": 0.1, "steps": 10, "target_value": 100}
    pattern = trojannn.optimise_trigger(model, mask, neurons, settings)
    assert (pattern[:, mask == 0] == 0).all() and (pattern[:, mask == 1] >= 0.7 - 1e-6).all()
    @torch.no_grad()
    def cost(image):
        return float(((model.features((image * mask)[None])[:, neurons] - 100) ** 2).sum())
    assert cost(pattern) < cost(torch.ones(3, 8, 8))
