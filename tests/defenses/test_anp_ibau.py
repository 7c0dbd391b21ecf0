"""ANP (BatchNorm neuron masks under adversarial neuron perturbation, then pruning) and I-BAU (minimax
unlearning with the implicit hypergradient): their formulas on hand-made inputs and a tiny run each."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from defense_utils import TINY_TRAINING, synthetic_images, tiny_context
from torch import nn

from poisonflow.defenses import anp, ibau
from poisonflow.errors import ConfigError
from poisonflow.kinds import fragment_of, settings_for
from poisonflow.models import build_model
from poisonflow.trainer import train_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def victim():
    """A width-4 convnet trained two epochs on the synthetic 3-class set (eval mode)."""
    images, labels = synthetic_images(120, seed=0)
    model = build_model(TINY_TRAINING["model"], num_classes=3, image_size=8)
    return train_model(model, images, labels, {**TINY_TRAINING, "epochs": 2}, seed=0).model.eval()


def tiny_settings(module, **overrides) -> dict:
    """The kind's settings with its fragment's tiny overrides, as a test or preset would give them."""
    return settings_for(module.__name__, {**fragment_of(module.__name__).tiny, **overrides})


def same_state(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# --- ANP ------------------------------------------------------------------------------------------


def hand_made_bn() -> nn.Sequential:
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, -2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.25, 1.0, -0.75]))
        bn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3]))
        bn.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
    return nn.Sequential(bn)


def test_neuron_parameters_scale_batchnorm_as_the_formula_says():
    model = hand_made_bn().eval()
    layers = anp.neuron_layers(model)
    assert [name for name, _ in layers] == ["0"]
    x = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    mask, delta, xi = torch.tensor([1.0, 0.5, 0.0]), torch.tensor([0.4, -0.4, 0.2]), torch.tensor([-0.3, 0.1, 0.4])
    mean, var = torch.tensor([0.1, -0.2, 0.3]), torch.tensor([4.0, 0.25, 1.0])
    x_hat = (x - mean.view(1, 3, 1, 1)) / torch.sqrt(var.view(1, 3, 1, 1) + 1e-5)
    gamma, beta = torch.tensor([1.5, -2.0, 0.5]).view(1, 3, 1, 1), torch.tensor([0.25, 1.0, -0.75]).view(1, 3, 1, 1)
    with torch.no_grad():
        clean = anp.neuron_forward(model, layers, x, [mask])
        perturbed = anp.neuron_forward(model, layers, x, [mask], [delta], [xi])
    torch.testing.assert_close(clean, x_hat * gamma * mask.view(1, 3, 1, 1) + beta)
    torch.testing.assert_close(perturbed, x_hat * gamma * (mask + delta).view(1, 3, 1, 1)
                               + beta * (1 + xi).view(1, 3, 1, 1))
    # channel 2: mask 0 leaves the bias alone; the perturbation gives it γ·δ back
    torch.testing.assert_close(clean[:, 2], torch.full_like(clean[:, 2], -0.75))
    # the module's own parameters are untouched, and its plain forward is the unmasked BN
    assert torch.equal(model[0].weight, torch.tensor([1.5, -2.0, 0.5]))
    torch.testing.assert_close(model(x), x_hat * gamma + beta)


def test_one_ascent_step_is_the_uniform_start_plus_eps_times_the_gradient_sign(victim):
    model = copy.deepcopy(victim).train()
    for p in model.parameters():
        p.requires_grad_(False)
    layers = anp.neuron_layers(model)
    images, labels = synthetic_images(16, seed=3)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(labels)
    masks = [torch.full((layer.num_features,), 0.75) for _, layer in layers]
    eps = 0.4
    weight_noise, bias_noise = anp.perturb_neurons(model, layers, x, y, masks, eps, 1, torch.Generator().manual_seed(5))

    generator = torch.Generator().manual_seed(5)  # the same draws: weight starts, then bias starts
    start_w = [torch.rand(m.shape, generator=generator) * 2 * eps - eps for m in masks]
    start_b = [torch.rand(m.shape, generator=generator) * 2 * eps - eps for m in masks]
    start = [t.requires_grad_(True) for t in start_w + start_b]
    loss = F.cross_entropy(anp.neuron_forward(model, layers, x, masks, start_w, start_b), y)
    grads = torch.autograd.grad(loss, start)
    for got, s, g in zip(weight_noise + bias_noise, start, grads):
        torch.testing.assert_close(got, s.detach() + eps * g.sign())
    assert max(float(t.abs().max()) for t in weight_noise) > eps  # no projection back onto [−ε, ε]
    perturbed = F.cross_entropy(anp.neuron_forward(model, layers, x, masks, weight_noise, bias_noise), y)
    assert float(perturbed.detach()) > float(loss.detach())  # the step raised the loss


def test_pruning_rules_and_pruning_on_hand_made_masks():
    masks = [torch.tensor([0.1, 0.5, 0.2, 0.9]), torch.tensor([0.05, 0.2000001, 1.0])]
    by_threshold = anp.pruned_neurons(masks, "threshold", 0.2)
    assert [s.tolist() for s in by_threshold] == [[True, False, True, False], [True, False, False]]
    by_number = anp.pruned_neurons(masks, "number", 2)
    assert [s.tolist() for s in by_number] == [[True, False, False, False], [True, False, False]]
    ties = anp.pruned_neurons([torch.tensor([0.3, 0.3]), torch.tensor([0.3])], "number", 2)
    assert [s.tolist() for s in ties] == [[True, True], [False]]  # ties: layer order

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 1), nn.BatchNorm2d(3))
    before = copy.deepcopy(model)
    anp.prune(anp.neuron_layers(model), by_threshold)
    assert model[1].weight.tolist() == [0.0, 1.0, 0.0, 1.0]
    assert model[4].weight.tolist() == [0.0, 1.0, 1.0]
    for name in ("1.bias", "4.bias", "0.weight", "3.weight", "1.running_var"):
        assert torch.equal(model.state_dict()[name], before.state_dict()[name]), name


def test_mask_optimisation_keeps_masks_in_the_unit_interval_and_the_weights_frozen(victim):
    model = copy.deepcopy(victim)
    images, labels = synthetic_images(32, seed=4)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    settings = tiny_settings(anp, lr=50.0, iterations=3)  # a huge step: most masks hit a bound
    masks, losses = anp.optimize_masks(model, x, torch.from_numpy(labels), settings, seed=0)
    flat = torch.cat(masks)
    assert flat.numel() == 4 + 4 + 8 + 8 + 16 + 16 == sum(l.num_features for _, l in anp.neuron_layers(victim))
    assert float(flat.min()) >= 0.0 and float(flat.max()) <= 1.0
    assert int((flat == 0).sum()) > 0 and int((flat < 1).sum()) > 0
    assert losses["final_perturbed_loss"] > 0 and losses["final_natural_loss"] > 0
    for (name, p), (_, q) in zip(model.named_parameters(), victim.named_parameters()):
        assert torch.equal(p, q), name


def test_anp_prunes_a_copy_of_the_victim(victim, tmp_path):
    ctx = tiny_context(tmp_path, victim=victim)
    kept = copy.deepcopy(victim)
    result = anp.run({**fragment_of(anp.__name__).tiny, "pruning_by": "number", "number": 5}, ctx)
    assert same_state(victim, kept)
    assert result.metrics["pruned_neurons"] == 5 and result.metrics["neurons"] == 56
    zeroed = sum(int(((l.weight == 0) & (v.weight != 0)).sum())
                 for (_, l), (_, v) in zip(anp.neuron_layers(result.model), anp.neuron_layers(victim)))
    assert zeroed == 5
    changed = [k for k, v in result.model.state_dict().items() if not torch.equal(v, victim.state_dict()[k])]
    assert changed and all(k.endswith(".weight") and k.startswith("body.") for k in changed)
    x = torch.from_numpy(ctx.reserve_images[:8]).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        logits = result.model(x)
    assert logits.shape == (8, 3) and bool(torch.isfinite(logits).all())


def test_anp_bad_settings_are_one_line_config_errors(victim, tmp_path):
    ctx = tiny_context(tmp_path, victim=victim)
    with pytest.raises(ConfigError, match=r"^anp\.number: needed when pruning_by is number"):
        anp.run({"pruning_by": "number"}, ctx)
    with pytest.raises(ConfigError, match=r"^anp\.eps"):
        anp.run({"eps": -0.1}, ctx)
    with pytest.raises(ConfigError, match=r"^anp\.pruning_by"):
        anp.run({"pruning_by": "ratio"}, ctx)


# --- I-BAU ----------------------------------------------------------------------------------------


def test_hypergradient_equals_the_analytic_one_on_a_quadratic_problem():
    """Inner: Φ(δ) = δ − η(Aδ − Bθ), fixed point δ* = A⁻¹Bθ. Outer: ½‖δ − c‖² + d·θ.
    Exact: d + BᵀA⁻¹(δ* − c). After K iterations: d + ηBᵀ Σ_{k<K} (I − ηA)ᵏ (δ* − c)."""
    dt = torch.float64
    A = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=dt)
    B = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.7, -1.0]], dtype=dt)
    c, d = torch.tensor([0.4, -1.2], dtype=dt), torch.tensor([0.2, -0.1, 0.3], dtype=dt)
    eta = 0.1
    theta = [torch.tensor([0.5, -1.0], dtype=dt, requires_grad=True), torch.tensor([2.0], dtype=dt, requires_grad=True)]
    unused = torch.tensor([7.0], dtype=dt, requires_grad=True)

    def fixed_point_map(delta):
        return delta - eta * (A @ delta - B @ torch.cat(theta))

    def outer_loss(delta):
        return 0.5 * (delta - c).pow(2).sum() + d @ torch.cat(theta)

    star = torch.linalg.solve(A, B @ torch.cat(theta).detach())
    exact = d + B.T @ torch.linalg.solve(A, star - c)
    grads, loss = ibau.fixed_point_hypergradient(star, [*theta, unused], fixed_point_map, outer_loss, 2000)
    torch.testing.assert_close(torch.cat(grads[:2]), exact, rtol=1e-9, atol=1e-9)
    assert torch.equal(grads[2], torch.zeros(1, dtype=dt))
    assert float(loss) == pytest.approx(float(outer_loss(star).detach()), rel=1e-12)

    J = torch.eye(2, dtype=dt) - eta * A
    v = sum(torch.linalg.matrix_power(J, k) @ (star - c) for k in range(3))
    grads3, _ = ibau.fixed_point_hypergradient(star, theta, fixed_point_map, outer_loss, 3)
    torch.testing.assert_close(torch.cat(grads3), d + eta * B.T @ v, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(torch.cat(grads3), exact, rtol=1e-3)  # three terms are not yet the limit


def test_universal_perturbation_stays_within_its_bound(victim):
    model = copy.deepcopy(victim).eval()
    images, labels = synthetic_images(48, seed=6)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    batches = [(x[i:i + 16], torch.from_numpy(labels[i:i + 16])) for i in range(0, 48, 16)]
    free, free_ce = ibau.universal_perturbation(model, batches, lr=10.0, penalty=0.001, bound=None)
    bounded, _ = ibau.universal_perturbation(model, batches, lr=10.0, penalty=0.001, bound=0.5)
    assert free.shape == (1, 3, 8, 8) and float(free.norm()) > 0.5
    assert float(bounded.norm()) == pytest.approx(0.5, rel=1e-5)
    torch.testing.assert_close(bounded, free * (0.5 / free.norm()))  # projection keeps the direction
    assert torch.equal(ibau.project_l2(free, 1e6), free)
    with torch.no_grad():  # the perturbation raises the loss against the model's own predictions
        xf = x.float() / 255
        own = model(xf).argmax(1)
        assert float(F.cross_entropy(model(xf + free), own)) > float(F.cross_entropy(model(xf), own))
    assert free_ce > 0


def test_ibau_updates_a_copy_and_keeps_batchnorm_statistics(victim, tmp_path):
    ctx = tiny_context(tmp_path, victim=victim)
    kept = copy.deepcopy(victim)
    result = ibau.run({**fragment_of(ibau.__name__).tiny, "perturbed_fraction": 0.25}, ctx)
    assert same_state(victim, kept)
    assert result.metrics["rounds"] == 1 and result.metrics["clean_samples"] == 120
    assert result.metrics["perturbation_norm"] <= 10.0 + 1e-5
    state, original = result.model.state_dict(), victim.state_dict()
    assert not torch.equal(state["fc.weight"], original["fc.weight"])  # the outer steps moved the parameters
    for key in (k for k in state if "running_" in k):  # eval mode: BatchNorm statistics unchanged
        assert torch.equal(state[key], original[key]), key
    x = torch.from_numpy(ctx.reserve_images[:8]).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        logits = result.model(x)
    assert logits.shape == (8, 3) and bool(torch.isfinite(logits).all())
    assert all(p.grad is None for p in result.model.parameters())
