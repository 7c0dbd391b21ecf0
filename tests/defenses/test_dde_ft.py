"""DDE (pre-activation entropy / KL pruning of BatchNorm neurons) and FT (fine-tuning on clean data)."""

from __future__ import annotations

import copy
import csv
import math

import pytest
import torch
from torch import nn

from poisonflow.defenses import DEFENSES, DefenseContext, dde, ft
from poisonflow.errors import ConfigError
from poisonflow.kinds import defaults_of, settings_for
from poisonflow.trainer import images_to_tensor, to_float, train_model
from defense_utils import TINY_TRAINING, tiny_context

torch.set_num_threads(1)


def trained_victim(ctx: DefenseContext) -> nn.Module:
    torch.manual_seed(0)
    return train_model(ctx.build_model(), ctx.train_images, ctx.train_labels, TINY_TRAINING, seed=0).model


# --- the per-neuron statistics --------------------------------------------------------------------


def test_histogram_entropy_on_hand_made_rows():
    rows = torch.tensor([[0.0, 0.1, 0.6, 0.7],  # bins of width 0.5 from 0: two and two → p = ½, ½
                         [0.0, 0.1, 0.2, 1.6],  # three in bin 0, one in bin 3 → p = ¾, ¼
                         [-5.0, math.nan, 0.0, 0.0]])  # a NaN row: no score, and its −5 does not move the grid
    got = dde.histogram_entropy(rows, bin_width=0.5)
    assert got[0].item() == pytest.approx(math.log(2) + math.log(0.5), abs=1e-12)  # = 0
    assert got[1].item() == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) + math.log(0.5), abs=1e-12)
    assert math.isnan(got[2].item())
    # a finer grid separates every value of the first row: p = ¼ each
    assert dde.histogram_entropy(rows[:1], 0.05)[0].item() == pytest.approx(math.log(4) + math.log(0.05), abs=1e-12)


def test_entropy_statistic_of_a_hand_made_batchnorm():
    # 4 images, 3 neurons, 2×2 positions; each image's largest value per neuron is set by hand
    maxima = torch.tensor([[-3.0, -1.0, 1.0, 3.0], [0.0, 0.0, 0.0, 4.0], [2.0, 2.0, 2.0, 2.0]])  # (C, N)
    offsets = torch.tensor([0.0, -5.0, -1.0, -2.0]).view(1, 1, 2, 2)
    x = maxima.T.reshape(4, 3, 1, 1) + offsets
    norm = nn.BatchNorm2d(3)
    model = nn.Sequential(norm).train()
    records = dde.collect_pre_activations(model, [x[:3], x[3:]])
    torch.testing.assert_close(records["0"].spatial_maxima(), maxima.double())
    scores = dde.entropy_scores(norm, records["0"], {"bin_width": 1.0})
    # neuron 0: mean 0, std √(20/3), z = ±1.162, ±0.387; grid from −1.162 → bins 0, 0, 1, 2: p = ½, ¼, ¼
    assert scores[0].item() == pytest.approx(1.5 * math.log(2), abs=1e-12)
    # neuron 1: mean 1, std 2, z = −½ ×3 and 1½ → bins 0, 0, 0, 2 on the layer's grid: p = ¾, ¼
    assert scores[1].item() == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)), abs=1e-12)
    assert math.isnan(scores[2].item())  # constant: no score
    # measured in eval mode without touching the running statistics; the mode is restored
    assert model.training and torch.equal(norm.running_mean, torch.zeros(3)) and int(norm.num_batches_tracked) == 0


def test_kl_statistic_of_a_hand_made_batchnorm():
    norm = nn.BatchNorm2d(2).eval()
    norm.running_mean.copy_(torch.tensor([0.0, 1.0]))
    norm.running_var.copy_(torch.tensor([4.0, 1.0]))
    x = torch.tensor([0.0, 2.0]).view(1, 1, 1, 2).repeat(2, 2, 1, 1)  # each neuron: 0, 2, 0, 2 → μ 1, σ² 4/3
    records = dde.collect_pre_activations(nn.Sequential(norm), [x[:1], x[1:]])
    assert records["0"].mean().tolist() == [1.0, 1.0]
    torch.testing.assert_close(records["0"].variance(), torch.full((2,), 4 / 3, dtype=torch.float64))
    scores = dde.kl_scores(norm, records["0"], {})
    # log(σ₂/σ₁) + (σ₁² + (μ₁ − μ₂)²)/(2σ₂²) − ½
    assert scores[0].item() == pytest.approx(0.5 * math.log(3) + (4 / 3 + 1) / 8 - 0.5, abs=1e-12)  # ≈ 0.3410
    assert scores[1].item() == pytest.approx(0.5 * math.log(3 / 4) + (4 / 3) / 2 - 0.5, abs=1e-12)  # ≈ 0.0229
    # a clean variance of zero gives no score
    assert math.isnan(dde.gaussian_kl(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([0.0]),
                                      torch.tensor([1.0]))[0].item())


def test_threshold_flags_exactly_the_scores_beyond_u_std():
    scores = torch.tensor([1.0] * 9 + [10.0, math.nan])  # finite ones: mean 1.9, unbiased std √8.1 ≈ 2.846
    flagged = dde.beyond_threshold(scores, u=2.0, side=1.0)  # threshold 7.59
    assert flagged.nonzero().flatten().tolist() == [9]
    assert not dde.beyond_threshold(scores, u=3.0, side=1.0).any()  # threshold 10.44 > 10
    assert dde.beyond_threshold(-scores, u=2.0, side=-1.0).nonzero().flatten().tolist() == [9]  # below mean − u·std
    above_mean = dde.beyond_threshold(torch.tensor([1.0, 2.0, 3.0, 4.0]), u=0.0, side=1.0)
    assert above_mean.tolist() == [False, False, True, True]
    assert not dde.beyond_threshold(torch.tensor([5.0, math.nan]), u=0.0, side=1.0).any()  # one finite score: none


@pytest.mark.parametrize("zero_bias", [False, True])
def test_pruned_neurons_output_exactly_their_bias_or_zero(zero_bias):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)).eval()
    norm = model[1]
    with torch.no_grad():
        for tensor in (norm.weight, norm.bias, norm.running_mean):
            tensor.normal_()
        norm.running_var.uniform_(0.5, 2.0)
    x = torch.randn(5, 3, 6, 6)
    with torch.no_grad():
        before = model(x)
    bias = norm.bias.detach().clone()
    dde.prune_neurons(norm, torch.tensor([False, True, False, True]), zero_bias)
    with torch.no_grad():
        after = model(x)
    for neuron in (1, 3):
        constant = 0.0 if zero_bias else bias[neuron].item()
        assert torch.equal(after[:, neuron], torch.full_like(after[:, neuron], constant))
    assert torch.equal(after[:, [0, 2]], before[:, [0, 2]])


# --- a planted backdoor neuron ----------------------------------------------------------------------


def planted_model(rate: float, seed: int = 0, n: int = 200, neurons: int = 16):
    """A conv + BatchNorm layer whose neuron 0 is a positive 3×3 filter on the red channel, which only
    the trigger (+5 on a red 3×3 patch) drives; the other neurons ignore red. The running statistics
    are those of the training mixture (a ``rate`` share triggered); returns it and clean images."""
    generator = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(3, neurons, 3, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(neurons, 3, 3, 3, generator=generator))
        conv.weight[:, 0] = 0.0
        conv.weight[0] = 0.0
        conv.weight[0, 0] = torch.randn(3, 3, generator=generator).abs()
    model = nn.Sequential(conv, nn.BatchNorm2d(neurons, momentum=None))  # running stats: the mixture's

    def images(count: int, triggered: int) -> torch.Tensor:
        x = torch.randn(count, 3, 8, 8, generator=generator)
        x[:triggered, 0, 2:5, 2:5] += 5.0
        return x

    mixed, clean = images(n, int(rate * n)), images(n, 0)
    with torch.no_grad():
        model.train()(mixed)
    return model.eval(), mixed, clean


@pytest.mark.parametrize("criterion", ["entropy", "kl"])
def test_the_default_threshold_flags_a_planted_backdoor_neuron_and_only_it(criterion):
    settings = {**defaults_of(dde.__name__), "criterion": criterion}
    model, mixed, clean = planted_model(rate=0.1)
    data = mixed if criterion == "entropy" else clean  # entropy: the released mixture; kl: clean data
    assert dde.flag_neurons(model, [data], settings)["1"].nonzero().flatten().tolist() == [0]
    # without poisoned samples in the mixture, neuron 0 is as benign as the others: nothing flagged
    model, mixed, clean = planted_model(rate=0.0)
    data = mixed if criterion == "entropy" else clean
    assert not dde.flag_neurons(model, [data], settings)["1"].any()


# --- DDE end to end -------------------------------------------------------------------------------------


def test_dde_prunes_the_flagged_neurons_of_a_copy_of_the_victim(tmp_path):
    ctx = tiny_context(tmp_path)
    ctx.victim = trained_victim(ctx)
    victim_state = copy.deepcopy(ctx.victim.state_dict())
    spec = {"kind": "dde", "u": 1.0}

    result = DEFENSES.get("dde").run(spec, ctx)

    for name, tensor in ctx.victim.state_dict().items():  # the victim is untouched
        assert torch.equal(tensor, victim_state[name]), name
    # the same statistics on all 120 released images (fewer than 500), measured on the victim
    expected = dde.flag_neurons(ctx.victim, [to_float(images_to_tensor(ctx.train_images))],
                                settings_for(dde.__name__, spec))
    norms = dde.batch_norms(result.model)
    assert list(norms) == list(expected) == ["body.1", "body.4", "body.8", "body.11", "body.15", "body.18"]
    for name, neurons in expected.items():
        assert torch.equal(norms[name].weight == 0, neurons), name
        assert torch.equal(norms[name].bias, victim_state[f"{name}.bias"]), name  # official: only γ is zeroed
    total = sum(int(neurons.sum()) for neurons in expected.values())
    assert total > 0
    assert result.metrics["pruned_neurons"] == total and result.metrics["samples"] == 120
    assert result.metrics["pruned_per_layer"] == {name: int(neurons.sum()) for name, neurons in expected.items()}
    assert result.metrics["pruned_share"] == pytest.approx(total / (4 + 4 + 8 + 8 + 16 + 16))
    assert result.model(to_float(images_to_tensor(ctx.train_images[:4]))).shape == (4, 3)

    # zero_bias zeroes β too; fewer samples are a seeded draw; kl measures on the clean split
    zeroed = dde.run({**spec, "zero_bias": True, "samples": 50}, ctx)
    assert zeroed.metrics["samples"] == 50
    assert all(torch.equal(n.weight == 0, n.bias == 0) for n in dde.batch_norms(zeroed.model).values())
    assert dde.run({**spec, "criterion": "kl", "clean_fraction": 0.5}, ctx).metrics["samples"] == 60


def test_dde_rejects_bad_settings_and_needs_clean_data_for_kl(tmp_path):
    with pytest.raises(ConfigError, match="dde.criterion"):
        settings_for(dde.__name__, {"criterion": "variance"})
    with pytest.raises(ConfigError, match="dde.u"):
        settings_for(dde.__name__, {"u": -1})
    with pytest.raises(ConfigError, match="dde.bin_width"):
        settings_for(dde.__name__, {"bin_width": 0})
    ctx = tiny_context(tmp_path, n=12)
    with pytest.raises(ValueError, match="victim"):
        dde.run({"kind": "dde"}, ctx)
    torch.manual_seed(0)
    ctx.victim = ctx.build_model().eval()
    ctx.reserve_images, ctx.reserve_labels = ctx.reserve_images[:0], ctx.reserve_labels[:0]
    with pytest.raises(ConfigError, match="dde.criterion"):
        dde.run({"criterion": "kl"}, ctx)
    assert dde.run({"criterion": "entropy"}, ctx).metrics["samples"] == 12  # the entropy needs no reserve


def test_dde_defaults_are_the_official_codes():
    defaults = defaults_of(dde.__name__)
    assert (defaults["criterion"], defaults["u"], defaults["samples"]) == ("entropy", 3.0, 500)
    assert (defaults["bin_width"], defaults["zero_bias"]) == (0.01, False)


# --- FT ---------------------------------------------------------------------------------------------------


def reserve_loss(model: nn.Module, ctx: DefenseContext) -> float:
    model.eval()
    with torch.no_grad():
        logits = model(to_float(images_to_tensor(ctx.reserve_images)))
    return nn.functional.cross_entropy(logits, torch.as_tensor(ctx.reserve_labels)).item()


def test_ft_defaults_are_backdoorbenchs():
    finetune = defaults_of(ft.__name__)["finetune"]
    assert (finetune["epochs"], finetune["batch_size"]) == (100, 256)
    assert finetune["optimizer"] == {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4}
    assert finetune["schedule"] == {"name": "cosine"} and finetune["adversarial"] is None
    assert defaults_of(ft.__name__)["clean_fraction"] == 1.0
    with pytest.raises(ConfigError, match="ft.finetune.lr"):
        settings_for(ft.__name__, {"finetune": {"lr": 0.1}})


def test_ft_fine_tunes_a_copy_on_the_clean_split_and_lowers_its_loss(tmp_path, monkeypatch):
    ctx = tiny_context(tmp_path)
    ctx.victim = trained_victim(ctx)
    victim_state = copy.deepcopy(ctx.victim.state_dict())
    seen = {}
    original = ft.train_model

    def spy(model, images, labels, training, **kwargs):
        seen.update(training=training, n=len(labels))
        return original(model, images, labels, training, **kwargs)

    monkeypatch.setattr(ft, "train_model", spy)
    spec = {"kind": "ft", "finetune": {"epochs": 3, "batch_size": 16}}
    result = DEFENSES.get("ft").run(spec, ctx)

    before, after = reserve_loss(ctx.victim, ctx), reserve_loss(result.model, ctx)
    assert after < before - 0.05
    for name, tensor in ctx.victim.state_dict().items():
        assert torch.equal(tensor, victim_state[name]), name
    # the recipe: BackdoorBench's optimizer and schedule over the victim's training, the override on top
    assert seen["n"] == 120 and seen["training"]["augment"] == TINY_TRAINING["augment"]
    assert seen["training"]["optimizer"] == {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4}
    assert seen["training"]["schedule"] == {"name": "cosine"} and seen["training"]["batch_size"] == 16
    assert result.metrics["clean_samples"] == 120 and result.metrics["finetune_epochs"] == 3
    with open(ctx.workdir / "history-finetune.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["epoch"]) for row in rows] == [1, 2, 3]
    assert result.metrics["final_train_loss"] == pytest.approx(float(rows[-1]["loss"]))
    # a rerun resumes from the finished checkpoint instead of training again
    again = ft.run(spec, ctx)
    for name, tensor in result.model.state_dict().items():
        assert torch.equal(tensor, again.model.state_dict()[name]), name
    assert ft.run({**spec, "clean_fraction": 0.25}, ctx).metrics["clean_samples"] == 30
