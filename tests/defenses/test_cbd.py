"""CBD: the re-weighting, the MI penalty, the critic's constraint, and the kind end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from poisonflow import trainer
from poisonflow.defenses import DEFENSES, cbd, merge
from poisonflow.kinds import defaults_of, settings_for
from poisonflow.models import build_model
import defense_utils
from defense_utils import TINY_TRAINING

torch.set_num_threads(1)

TINY_SPEC = {"kind": "cbd", "backdoor": {"epochs": 1}, "clean": {"epochs": 2}}


def tiny_context(tmp_path, victim=None, n: int = 96, seed: int = 0):
    return defense_utils.tiny_context(tmp_path, victim, n, seed)


# --- defaults --------------------------------------------------------------------------------------


def test_defaults_are_the_official_ones():
    """zaixizhang/CBD: train.py (5 backdoor epochs, SGD lr 0.1 Nesterov, lr 0.1/0.01/0.001 at 20/70,
    DisenEstimator dropout 0.2), config.py (100 tuning epochs, momentum 0.9, weight decay 1e-4),
    utils/util.py (estimator output × 0.01, 5 power iterations)."""
    d = defaults_of(cbd.__name__)
    assert d["backdoor"]["epochs"] == 5
    assert d["backdoor"]["optimizer"] == {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4,
                                          "nesterov": True}
    assert d["backdoor"]["schedule"] == {"name": "constant"}
    assert d["clean"]["epochs"] == 100
    assert d["clean"]["optimizer"] == d["backdoor"]["optimizer"]
    assert d["clean"]["schedule"] == {"name": "multistep", "milestones": [20, 70], "gamma": 0.1}
    assert d["mi_weight"] == 0.01
    assert d["critic"] == {"loss_weight": 1.0, "dropout": 0.2}
    assert cbd.WEIGHT_EPSILON == 1e-8 and cbd.POWER_ITERATIONS == 5
    assert "cbd" in DEFENSES.entries()


def test_clean_schedule_gives_the_official_learning_rates():
    """Official learning_rate(): 0.1 for epochs < 20, 0.01 for < 70, 0.001 after."""
    d = defaults_of(cbd.__name__)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = trainer.make_optimizer([param], d["clean"]["optimizer"])
    schedule = trainer.make_schedule(optimizer, d["clean"]["schedule"], epochs=100, steps_per_epoch=1)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[:20] == pytest.approx([0.1] * 20)
    assert lrs[20:70] == pytest.approx([0.01] * 50)
    assert lrs[70:] == pytest.approx([0.001] * 30)


# --- the re-weighting ------------------------------------------------------------------------------


def test_sample_weights_match_direct_computation():
    loss_b = torch.tensor([0.01, 2.0, 1.0, 0.5])
    loss_c = torch.tensor([3.0, 0.5, 1.0, 0.0])
    raw = np.array([0.01 / (3.01 + 1e-8), 2.0 / (2.5 + 1e-8), 1.0 / (2.0 + 1e-8), 0.5 / (0.5 + 1e-8)])
    expected = raw * 4 / raw.sum()
    got = cbd.sample_weights(loss_b, loss_c)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)
    assert got.mean().item() == pytest.approx(1.0)
    # a sample the backdoored model fits at once (a likely poison) weighs least
    assert got.argmin().item() == 0


def test_sample_weights_are_constants():
    loss_b = torch.tensor([0.3, 1.2], requires_grad=True)
    loss_c = torch.tensor([0.7, 0.1], requires_grad=True)
    assert not cbd.sample_weights(loss_b, loss_c).requires_grad


# --- the MI penalty --------------------------------------------------------------------------------


def test_marginal_pairs_pair_each_sample_with_the_next():
    z = torch.arange(8.0).view(4, 2)
    np.testing.assert_array_equal(cbd.marginal_pairs(z).numpy(), z.numpy()[[1, 2, 3, 0]])


def test_dependence_matches_direct_computation():
    torch.manual_seed(0)
    critic = cbd.Critic(3, 2, dropout=0.0).eval()
    r, z = torch.randn(5, 3), torch.randn(5, 2)
    w1, b1 = critic.hidden.weight.detach().numpy(), critic.hidden.bias.detach().numpy()
    w2, b2 = critic.out.weight.detach().numpy(), critic.out.bias.detach().numpy()

    def t(rr, zz):
        h = np.concatenate([rr, zz], axis=1) @ w1.T + b1
        h = np.where(h > 0, h, 0.01 * h)  # leaky ReLU, slope 0.01
        return (h @ w2.T + b2)[:, 0]

    rn, zn = r.numpy(), z.numpy()
    expected = t(rn, zn) - t(rn, np.roll(zn, -1, axis=0))
    np.testing.assert_allclose(cbd.dependence(critic, r, z).detach().numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cbd.frozen_dependence(critic, r, z).detach().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_frozen_dependence_sends_gradient_to_features_only():
    torch.manual_seed(0)
    critic = cbd.Critic(3, 2, dropout=0.0)
    r, z = torch.randn(4, 3), torch.randn(4, 2, requires_grad=True)
    cbd.frozen_dependence(critic, r, z).mean().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert all(p.grad is None for p in critic.parameters())


def test_official_spectral_scale_is_sqrt_of_power_iteration_estimate():
    w = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    # the power iteration from ones converges to the top singular value 3; the official helper takes its root
    assert cbd.official_spectral_scale(w).item() == pytest.approx(3.0 ** 0.5, rel=1e-3)
    bias = torch.tensor([3.0, 4.0])
    assert cbd.official_spectral_scale(bias).item() == pytest.approx(5.0 ** 0.5, rel=1e-5)


def test_clean_objective_on_hand_made_batch():
    """The per-sample objective is w·ℓ_C + λ·d − c·d in value (d from the same critic), and its gradient
    reaches the critic through its own term −c·d only."""
    from poisonflow import augment
    torch.manual_seed(0)
    make = lambda: build_model(TINY_TRAINING["model"], num_classes=3, image_size=8)
    backdoored, classifier = make().eval(), make()
    critic = cbd.Critic(16, 16, dropout=0.0)
    module = cbd.CBDModule(classifier, critic)
    images = torch.rand(6, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    settings = trainer.with_defaults(TINY_TRAINING)
    runtime = trainer.RuntimeSettings(amp=False, channels_last=False, compile=False, data_on_device=True)
    ctx = trainer.StepContext(settings, runtime, torch.Generator(), torch.device("cpu"))
    objective = cbd.clean_objective(backdoored, 0.5, 2.0)
    module.eval()  # BatchNorm in eval: the forward is reproducible below
    out = objective.loss(module, augment.MixedBatch(images, labels), ctx)
    with torch.no_grad():
        z, r = classifier.features(images), backdoored.features(images)
        ce_c = torch.nn.functional.cross_entropy(classifier.fc(z), labels, reduction="none")
        ce_b = torch.nn.functional.cross_entropy(backdoored.fc(r), labels, reduction="none")
        w = ce_b / (ce_b + ce_c + 1e-8)
        w = w * 6 / w.sum()
        d_value = cbd.dependence(critic, r, z)
    expected = w * ce_c + (0.5 - 2.0) * d_value
    np.testing.assert_allclose(out.loss.detach().numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    out.loss.mean().backward()
    d = cbd.dependence(critic, r, z)
    critic_grads = [p.grad.clone() for p in critic.parameters()]
    critic.zero_grad()
    (-2.0 * cbd.dependence(critic, r, z.detach()).mean()).backward()
    for got, want in zip(critic_grads, [p.grad for p in critic.parameters()]):
        torch.testing.assert_close(got, want)
    assert d.shape == (6,)


def test_mi_weight_zero_has_no_critic(tmp_path):
    module = cbd.clean_module(tiny_context(tmp_path), settings_for(cbd.__name__, {"mi_weight": 0}))
    assert module.critic is None
    module.constrain_critic()  # nothing to constrain
    assert all(p is not None for p in module.parameters())


# --- the kind end to end ---------------------------------------------------------------------------


def weights_of(model: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_runs_end_to_end_deterministically_and_resumes(tmp_path, monkeypatch):
    ctx = tiny_context(tmp_path / "a")
    result = DEFENSES.get("cbd").run(TINY_SPEC, ctx)
    assert isinstance(result.model, torch.nn.Module) and not isinstance(result.model, cbd.CBDModule)
    x = trainer.to_float(trainer.images_to_tensor(ctx.train_images[:4]))
    assert result.model(x).shape == (4, 3)
    assert result.metrics == {"mi_weight": 0.01, "backdoor_epochs": 1}
    for name in ("backdoor.pt", "clean.pt", "history-backdoor.csv", "history-clean.csv"):
        assert (ctx.workdir / name).exists()
    first = weights_of(result.model)

    again = DEFENSES.get("cbd").run(TINY_SPEC, tiny_context(tmp_path / "b"))
    for key, value in weights_of(again.model).items():
        torch.testing.assert_close(value, first[key])

    def no_training(*args, **kwargs):
        raise AssertionError("a finished stage was trained again")

    monkeypatch.setattr(trainer, "train_step", no_training)
    resumed = DEFENSES.get("cbd").run(TINY_SPEC, tiny_context(tmp_path / "a"))
    for key, value in weights_of(resumed.model).items():
        torch.testing.assert_close(value, first[key])


def test_critic_is_trained_by_the_trainers_optimizer_and_checkpointed(tmp_path):
    ctx = tiny_context(tmp_path)
    resolved = settings_for(cbd.__name__, TINY_SPEC)
    backdoored = cbd.backdoored_training(ctx, resolved)
    before = cbd.clean_module(ctx, resolved)
    initial = weights_of(before.critic)
    cbd.clean_training(ctx, backdoored, resolved)
    state = torch.load(ctx.workdir / "clean.pt", weights_only=False)
    model_state = state["model"] if "model" in state else state
    critic_keys = [k for k in model_state if k.startswith("critic.")]
    assert critic_keys
    assert any(not torch.equal(model_state[k], initial[k[len("critic."):]]) for k in critic_keys)
    # the trainer's one optimizer holds the critic's parameters too (classifier + 4 critic tensors)
    n_classifier = len(list(before.classifier.parameters()))
    assert len(state["optimizer"]["param_groups"][0]["params"]) == n_classifier + 4


def test_re_weighting_only_when_mi_weight_is_zero(tmp_path):
    spec = merge(TINY_SPEC, {"mi_weight": 0, "clean": {"epochs": 1}})
    result = DEFENSES.get("cbd").run(spec, tiny_context(tmp_path))
    assert result.metrics["mi_weight"] == 0.0
