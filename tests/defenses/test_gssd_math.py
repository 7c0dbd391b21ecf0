"""GSSD's building blocks: the trainer on feature rows, the per-class normalizing flows (inverse,
change of variables, training), and the detection, scoring and filtering rules on numbers."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from poisonflow import checkpoint, flows, gssd, trainer
from poisonflow.errors import ConfigError

torch.set_num_threads(1)

FEATURE_TRAINING = {"epochs": 2, "batch_size": 16, "optimizer": {"name": "adam", "lr": 1e-3},
                    "schedule": {"name": "constant"}, "augment": []}


def correlated_features(n: int, half: int = 2, seed: int = 0, shift: float = 0.0) -> np.ndarray:
    """Rows (z₁, z₁·B + small noise): the second half is predictable from the first, as on a manifold."""
    rng = np.random.default_rng(seed)
    first = rng.normal(size=(n, half)) + shift
    mixing = np.linalg.qr(np.random.default_rng(99).normal(size=(half, half)))[0]
    return np.concatenate([first, first @ mixing + 0.1 * rng.normal(size=(n, half))], 1).astype(np.float32)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(tensor, b.state_dict()[name]) for name, tensor in a.state_dict().items())


# -- the trainer on feature rows ---------------------------------------------------------------

def test_feature_rows_train_on_the_rows_themselves_in_the_image_order():
    features = correlated_features(40)
    labels = np.zeros(40, dtype=np.int64)
    seen = []

    def record(end: trainer.BatchEnd) -> None:
        seen.append(end.index.clone())
        assert end.batch.images.dtype == torch.float32
        torch.testing.assert_close(end.batch.images, torch.from_numpy(features)[end.index], rtol=0, atol=0)

    trainer.train_model(flows.build_flow(4), features, labels, FEATURE_TRAINING, seed=5,
                        objective=flows.FLOW_NLL, on_batch=record)
    # the same seeded shuffle as an image set of the same size
    images = np.zeros((40, 2, 2, 3), dtype=np.uint8)
    image_order = []
    probe = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    trainer.train_model(probe, images, labels, {**FEATURE_TRAINING, "optimizer": {"name": "sgd", "lr": 0.0}},
                        seed=5, on_batch=lambda end: image_order.append(end.index.clone()))
    assert len(seen) == 2 * 3  # 40 rows in batches of 16, two epochs
    assert all(torch.equal(a, b) for a, b in zip(seen, image_order))


def test_feature_rows_refuse_augmentation_and_channels_last():
    features = correlated_features(8)
    labels = np.zeros(8, dtype=np.int64)
    with pytest.raises(ConfigError, match="augment"):
        trainer.train_model(flows.build_flow(4), features, labels, {**FEATURE_TRAINING, "augment": ["flip"]},
                            seed=0, objective=flows.FLOW_NLL)
    with pytest.raises(ConfigError, match="augment"):  # the trainings default is [crop, flip]
        trainer.train_model(flows.build_flow(4), features, labels, {"epochs": 1}, seed=0, objective=flows.FLOW_NLL)
    with pytest.raises(ConfigError, match="channels_last"):
        trainer.train_model(flows.build_flow(4), features, labels, {**FEATURE_TRAINING, "channels_last": True},
                            seed=0, objective=flows.FLOW_NLL)


def test_feature_subset_trains_like_the_sliced_rows():
    features = correlated_features(48)
    labels = np.arange(48) % 2
    rows = labels == 1
    sliced = trainer.train_model(flows.build_flow(4, seed=1), features[rows], labels[rows], FEATURE_TRAINING,
                                 seed=3, objective=flows.FLOW_NLL)
    subset = trainer.train_model(flows.build_flow(4, seed=1), features, labels, FEATURE_TRAINING, seed=3,
                                 objective=flows.FLOW_NLL, subset=rows)
    assert same_weights(sliced.model, subset.model)
    assert [row["loss"] for row in sliced.history] == [row["loss"] for row in subset.history]


def test_killed_flow_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    features = correlated_features(64)
    labels = np.zeros(64, dtype=np.int64)
    settings = {**FEATURE_TRAINING, "epochs": 3}
    whole = trainer.train_model(flows.build_flow(4), features, labels, settings, seed=2, objective=flows.FLOW_NLL)
    real_save = checkpoint.save

    def save_then_die(path, digest, state):
        real_save(path, digest, state)
        if state["epoch"] == 1:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "save", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            trainer.train_model(flows.build_flow(4), features, labels, settings, seed=2, objective=flows.FLOW_NLL,
                                checkpoint=tmp_path / "flow.pt")
    resumed = trainer.train_model(flows.build_flow(4), features, labels, settings, seed=2, objective=flows.FLOW_NLL,
                                  checkpoint=tmp_path / "flow.pt")
    assert [row["epoch"] for row in resumed.history] == [1, 2, 3]
    assert same_weights(whole.model, resumed.model)  # ActNorm was not initialised a second time


# -- the flow: inverse and change of variables -------------------------------------------------

def randomized(flow: flows.FeatureFlow, seed: int = 0) -> flows.FeatureFlow:
    """Every parameter drawn at random (the couplings' last layers included), ActNorm marked initialised."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in flow.parameters():
            parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))
    for layer in flow.layers:
        if isinstance(layer, flows.ActNorm):
            layer.initialized.fill_(1)
    return flow.eval()


def test_flow_is_invertible():
    for dim, steps in [(4, 2), (8, 3)]:
        flow = randomized(flows.FeatureFlow(dim, steps))
        z = torch.randn(50, dim, generator=torch.Generator().manual_seed(1)) * 2
        u, _ = flow.transform(z)
        assert not torch.allclose(u, z)
        torch.testing.assert_close(flow.inverse(u), z, rtol=0, atol=1e-5)


def test_log_density_of_a_hand_set_one_step_flow():
    """D = 2, one step: ActNorm shift (1, −1), log-scale (ln 2, 0); coupling MLP 1 → 1 → 2 set so that
    the raw log-scale is 0.5·relu(u₁) and the shift 0.25·relu(u₁)."""
    flow = flows.FeatureFlow(2, steps=1).eval()
    actnorm, coupling = flow.layers
    with torch.no_grad():
        actnorm.shift.copy_(torch.tensor([1.0, -1.0]))
        actnorm.log_scale.copy_(torch.tensor([math.log(2.0), 0.0]))
        actnorm.initialized.fill_(1)
        coupling.net[0].weight.fill_(1.0)
        coupling.net[0].bias.zero_()
        coupling.net[2].weight.copy_(torch.tensor([[0.5], [0.25]]))
        coupling.net[2].bias.zero_()
    z = torch.tensor([[3.0, 0.5]])
    # by hand: u₁ = (3 − 1)/2 = 1, v₂ = 0.5 + 1 = 1.5, s = tanh(0.5), t = 0.25, u₂ = 1.5·e^s + t
    s = math.tanh(0.5)
    u2 = 1.5 * math.exp(s) + 0.25
    expected = -0.5 * (1.0 + u2 ** 2) - math.log(2 * math.pi) - math.log(2.0) + s
    with torch.no_grad():
        u, _ = flow.transform(z)
        torch.testing.assert_close(u, torch.tensor([[1.0, u2]]))
        assert float(flow.log_prob(z)) == pytest.approx(expected, abs=1e-6)
        assert float(flow(z)) == pytest.approx(expected / 2, abs=1e-6)  # per dimension


def test_log_density_equals_the_jacobian_change_of_variables():
    flow = randomized(flows.FeatureFlow(4, steps=2), seed=3)
    z = torch.randn(5, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float32)
    ours = flow.log_prob(z).detach()
    for row in range(len(z)):
        point = z[row:row + 1]
        jacobian = torch.autograd.functional.jacobian(lambda x: flow.transform(x)[0][0], point)[:, 0, :]
        u = flow.transform(point)[0][0].detach()
        by_hand = (-0.5 * (u ** 2).sum() - 2 * math.log(2 * math.pi)) + torch.linalg.slogdet(jacobian.double())[1]
        assert float(ours[row]) == pytest.approx(float(by_hand), abs=1e-4)
    torch.testing.assert_close(flow(z), ours / 4)


def test_actnorm_initialises_on_the_first_training_batch_only():
    flow = flows.FeatureFlow(4)
    batch = torch.from_numpy(correlated_features(16)) * 3 + 1
    flow.eval()
    flow(batch)
    assert not flow.layers[0].is_initialized()  # evaluation does not initialise
    flow.train()
    flow(batch)
    actnorm = flow.layers[0]
    torch.testing.assert_close(actnorm.shift.detach(), batch.mean(0))
    torch.testing.assert_close(actnorm.log_scale.detach(), torch.log(batch.std(0) + 1e-6))
    u, _ = actnorm(batch)
    torch.testing.assert_close(u.mean(0), torch.zeros(4), rtol=0, atol=1e-5)
    flow(batch * 5)  # a later batch changes nothing
    torch.testing.assert_close(actnorm.shift.detach(), batch.mean(0))
    assert int(actnorm.initialized) == 1 and "layers.0.initialized" in flow.state_dict()


def test_new_flow_is_actnorm_then_identity_couplings_with_official_widths():
    flow = flows.build_flow(8)
    assert [type(layer).__name__ for layer in flow.layers] == ["ActNorm", "AffineCoupling", "SwapHalves",
                                                              "ActNorm", "AffineCoupling"]
    coupling = flow.layers[1]
    assert (coupling.net[0].in_features, coupling.net[0].out_features, coupling.net[2].out_features) == (4, 4, 8)
    assert flows.build_flow(8, {"hidden_ratio": 2}).layers[1].net[0].out_features == 8
    z = torch.randn(3, 8)
    torch.testing.assert_close(flow.eval().transform(z)[0], torch.cat([z[:, 4:], z[:, :4]], 1))  # one swap
    with pytest.raises(ValueError, match="even"):
        flows.FeatureFlow(5)


# -- training one flow per class ---------------------------------------------------------------

def test_class_flows_learn_and_are_deterministic_for_a_seed(tmp_path):
    features = np.concatenate([correlated_features(96, seed=0), correlated_features(96, seed=1, shift=3.0)])
    labels = np.repeat([0, 1], 96)
    settings = {"epochs": 6, "batch_size": 16, "optimizer": {"name": "adam", "lr": 3e-2}}  # few steps: a larger lr
    first = flows.train_class_flows(features, labels, 2, settings, seed=7, checkpoint_dir=tmp_path)
    again = flows.train_class_flows(features, labels, 2, settings, seed=7)
    other = flows.train_class_flows(features, labels, 2, settings, seed=8)
    assert all(same_weights(a, b) for a, b in zip(first, again))
    assert not same_weights(first[0], other[0])
    for label in (0, 1):
        history = (tmp_path / f"history-flow-class{label}.csv").read_text().splitlines()[1:]
        losses = [float(line.split(",")[1]) for line in history]
        assert len(losses) == 6 and all(b < a for a, b in itertools.pairwise(losses)), losses
        assert (tmp_path / f"flow-class{label}.pt").exists()
    log_probs = flows.class_log_probs(first, features)
    assert log_probs.shape == (192, 2) and log_probs.dtype == np.float64
    # the couplings learned the dependence: better than the diagonal Gaussian of each class
    for label in (0, 1):
        rows = features[labels == label]
        diagonal = -0.5 * np.log(2 * np.pi * np.e * rows.var(0, ddof=1)).sum() / 4
        assert log_probs[labels == label, label].mean() > diagonal + 0.3
    assert (log_probs.argmax(1) == labels).mean() > 0.95
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(log_probs[:, 1]), first[1](torch.from_numpy(features)).double())


# -- detection, scores and the plan on hand-made densities -------------------------------------

def densities_of_class_zero(best_other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log_probs (N, 2) for N samples labelled 0 whose best other-class density is ``best_other``."""
    with np.errstate(divide="ignore"):  # a density of 0 is a log density of −inf
        log_probs = np.stack([np.zeros(len(best_other)), np.log(best_other)], 1)
    return log_probs, np.zeros(len(best_other), dtype=np.int64)


def bin_centres(counts: list[int], width: float = 0.02) -> np.ndarray:
    """Values that fall ``counts[k]`` times into bin k of a histogram over [0, width·len(counts)]:
    the two ends are pinned by one value each at 0 and at the top edge (counted in bins 0 and last)."""
    values = [np.full(count, (k + 0.5) * width) for k, count in enumerate(counts)]
    return np.concatenate(values + [[0.0, width * len(counts)]])


def test_valley_rule_counts_the_mass_before_the_first_least_populated_bin():
    bins = [0] * 30
    bins[0], bins[1] = 9, 3  # a low-density mode: 10 and 3 samples (the pinned 0 joins bin 0)
    for k in range(5, 29):
        bins[k] = 4  # the clean bulk
    values = bin_centres(bins)  # 30 bins of width 0.02 from 0 to 0.6 < λ
    counts = np.histogram(values, 30)[0]
    assert counts[:3].tolist() == [10, 3, 0] and int(np.argmin(counts)) == 2 and len(values) == 110
    # valley = bin 2 (first empty bin), N = 13 > 0.05·110 = 5.5 and 13 ≥ 2·0
    assert gssd.disruptive_classes(*densities_of_class_zero(values)) == [0]
    assert gssd.disruptive_classes(*densities_of_class_zero(values), {"beta_d": 13 / 110}) == []  # N must exceed
    assert gssd.disruptive_classes(*densities_of_class_zero(values), {"beta_d": 12.5 / 110}) == [0]
    # λ below every edge but the first: the class is not examined
    assert gssd.disruptive_classes(*densities_of_class_zero(values), {"lambda": 0.01}) == []


def test_valley_rule_needs_twice_the_valley_count_and_a_valley_after_the_first_bin():
    bins = [4, 1, 3] + [5] * 26 + [4]  # bin 1 (1 there, 5 before) is the least populated below λ
    values = bin_centres(bins)
    counts = np.histogram(values, 30)[0]
    assert counts[:3].tolist() == [5, 1, 3] and int(np.argmin(counts[:29])) == 1
    n = len(values)
    assert gssd.disruptive_classes(*densities_of_class_zero(values), {"beta_d": 4.9 / n}) == [0]  # 5 ≥ 2·1
    bins[1] = 3  # now N = 5 < 2·3
    values = bin_centres(bins)
    assert gssd.disruptive_classes(*densities_of_class_zero(values), {"beta_d": 0.001}) == []
    # the least populated bin is the first one: never flagged
    rising = bin_centres([0] + list(range(2, 31)))
    assert gssd.disruptive_classes(*densities_of_class_zero(rising), {"beta_d": 0.0}) == []


def test_valley_rule_reads_only_bins_below_lambda():
    # bins of width 0.04 over [0, 1.2]: a bulk, a sparse tail and empty bins from 0.96 on, above λ = 0.75
    values = bin_centres([0] + [10] * 17 + [2] * 6 + [0, 1, 0, 0, 0, 0], width=0.04)
    counts, edges = np.histogram(values, 30)
    assert counts[:18].tolist() == [1] + [10] * 17 and edges[18] < 0.75 < edges[19]
    assert counts[24] == 0  # the first empty bin lies above λ
    assert gssd.disruptive_classes(*densities_of_class_zero(values)) == []
    assert gssd.disruptive_classes(*densities_of_class_zero(values), {"lambda": 1.3}) == [0]  # they count now


def test_non_disruptive_rule_is_the_other_classes_mean_nll_per_dimension():
    labels = np.array([0, 0, 1, 1, 2, 2])
    log_probs = np.array([[1.0, -3.0, -3.0],
                          [1.0, -3.0, -3.0],
                          [-0.5, 1.0, -2.0],
                          [-0.7, 1.0, -2.0],
                          [-0.6, -1.0, 1.0],
                          [-0.6, -1.0, 1.0]])
    # class 0 under its flow: the other samples' log p/D are −0.5, −0.7, −0.6, −0.6 → NLL 0.6
    np.testing.assert_allclose(gssd.other_classes_nll(log_probs, labels), [0.6, 2.0, 2.5])
    assert gssd.non_disruptive_classes(log_probs, labels) == []  # strictly below β_ND = 0.6
    assert gssd.non_disruptive_classes(log_probs, labels, {"beta_nd": 0.61}) == [0]
    assert gssd.non_disruptive_classes(log_probs, labels, {"beta_nd": 2.1}) == [0, 1]
    assert gssd.non_disruptive_classes(log_probs, labels, {"beta_nd": 2.1}, exclude=[0]) == [1]


def test_score_is_the_own_log_density_minus_the_best_other():
    log_probs = np.array([[0.5, 0.2, -1.0], [-2.0, 0.3, 0.1], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(gssd.target_scores(log_probs, 0), [0.3, -2.3, 0.0])
    np.testing.assert_allclose(gssd.target_scores(log_probs, 2), [-1.5, -0.2, 0.0])


def flagged_class_densities(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n samples labelled 0 with distinct scores, and 10 samples of each of classes 1 and 2."""
    rng = np.random.default_rng(seed)
    own = rng.permutation(np.linspace(-2.0, 2.0, n))
    best = rng.integers(1, 3, n)  # the best other class of each sample
    log_probs = np.full((n, 3), -5.0)
    log_probs[:, 0] = own
    log_probs[np.arange(n), best] = 0.0  # score = own − 0
    others = np.full((20, 3), -5.0)
    others[:10, 1] = others[10:, 2] = 1.0
    return (np.concatenate([log_probs, others]), np.concatenate([np.zeros(n, int), np.repeat([1, 2], 10)]),
            np.concatenate([best, [1] * 10 + [2] * 10]))


def test_non_disruptive_plan_keeps_the_top_30_and_relabels_the_bottom_15_percent():
    log_probs, labels, best = flagged_class_densities(100)
    part = gssd.class_plan(log_probs, labels, 0, gssd.NON_DISRUPTIVE)
    score = log_probs[:100, 0]
    ranked = np.argsort(score)
    assert len(part.kept) == 30 and set(part.kept) == set(ranked[70:])
    assert len(part.relabeled) == 15 and set(part.relabeled) == set(ranked[:15])
    np.testing.assert_array_equal(part.new_labels, best[part.relabeled])
    # the official rounding: keep n − int((1 − α_C)·n), relabel int(α_P·n)
    part = gssd.class_plan(*flagged_class_densities(37)[:2], 0, gssd.NON_DISRUPTIVE)
    assert (len(part.kept), len(part.relabeled)) == (37 - 25, 5)


def test_disruptive_plan_keeps_the_bottom_share_and_relabels_nothing():
    log_probs, labels, _ = flagged_class_densities(100)
    ranked = np.argsort(log_probs[:100, 0])
    part = gssd.class_plan(log_probs, labels, 0, gssd.DISRUPTIVE)
    assert set(part.kept) == set(ranked[:15]) and len(part.relabeled) == 0 == len(part.new_labels)
    part = gssd.class_plan(log_probs, labels, 0, gssd.DISRUPTIVE, {"alpha_c_disruptive": 0.3})
    assert set(part.kept) == set(ranked[:30])


def test_plan_of_a_flagged_class_keeps_30_relabels_15_drops_55_and_keeps_unflagged_classes():
    log_probs, labels, best = flagged_class_densities(100)
    log_probs[100:, 0] = 0.0  # the other classes' samples fit class 0's flow: NLL 0 < β_ND
    result = gssd.plan(log_probs, labels)
    assert result.flagged == {0: gssd.NON_DISRUPTIVE}
    assert result.kept[100:].all() and result.kept[:100].sum() == 30
    assert len(result.relabeled) == 15 and result.dropped.sum() == 55
    assert not result.kept[result.relabeled].any()
    np.testing.assert_array_equal(result.new_labels, best[result.relabeled])


def test_settings_are_checked_and_defaults_are_the_papers():
    assert gssd.DEFAULTS == {"beta_d": 0.05, "lambda": 0.75, "bins": 30, "beta_nd": 0.6, "alpha_c": 0.3,
                             "alpha_p": 0.15, "alpha_c_disruptive": 0.15}
    with pytest.raises(ConfigError, match="alpha"):
        gssd.plan(np.zeros((2, 2)), np.array([0, 1]), {"alpha_c": 0.9, "alpha_p": 0.2})
    with pytest.raises(ConfigError, match="betad"):
        gssd.plan(np.zeros((2, 2)), np.array([0, 1]), {"betad": 0.1})
    with pytest.raises(ValueError, match="attack"):
        gssd.class_plan(np.zeros((2, 2)), np.array([0, 1]), 0, "backdoor")


# -- detection on synthetic features -------------------------------------------------------------

SYNTHETIC_MEANS = np.array([[4.0, 0.75], [4.0, -0.75], [-4.0, 0.75], [-4.0, -0.75]])


def synthetic_features(rng, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Four Gaussian classes in 8 dimensions, in two pairs: unit variance in the two class dimensions
    (pair partners 1.5 apart, pairs 8 apart), and σ = 0.05 in six dimensions no class varies in,
    which puts the per-dimension densities in the range GSSD's thresholds are set for."""
    labels = np.repeat(np.arange(4), n)
    features = np.concatenate([SYNTHETIC_MEANS[labels] + rng.normal(size=(len(labels), 2)),
                               0.05 * rng.normal(size=(len(labels), 6))], 1)
    return features.astype(np.float32), labels


def fitted_flows(features: np.ndarray, labels: np.ndarray, num_classes: int = 4) -> list[flows.FeatureFlow]:
    """Each class's flow after its data-dependent initialisation on all of the class's rows (couplings
    still the identity): exactly the class's diagonal Gaussian fit, a generative classifier whose
    densities are known."""
    fitted = []
    for label in range(num_classes):
        flow = flows.build_flow(features.shape[1], seed=label).train()
        with torch.no_grad():
            flow(torch.from_numpy(features[labels == label]))
        fitted.append(flow.eval())
    return fitted


def test_fitted_flow_is_the_diagonal_gaussian_of_its_class():
    features, labels = synthetic_features(np.random.default_rng(0), 200)
    flow = fitted_flows(features, labels, 1)[0]
    rows = features[labels == 0].astype(np.float64)
    mean, std = rows.mean(0), rows.std(0, ddof=1) + 1e-6
    gaussian = (-0.5 * ((rows - mean) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi)).sum(1) / 8
    np.testing.assert_allclose(flows.class_log_probs([flow], rows)[:, 0], gaussian, rtol=0, atol=2e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clean_synthetic_features_flag_no_class(seed):
    features, labels = synthetic_features(np.random.default_rng(seed), 1000)
    log_probs = flows.class_log_probs(fitted_flows(features, labels), features)
    result = gssd.plan(log_probs, labels)
    assert result.flagged == {} and result.kept.all() and len(result.relabeled) == 0
    assert (gssd.other_classes_nll(log_probs, labels) > 1.5).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_samples_of_other_classes_flag_the_target_as_non_disruptive(seed):
    rng = np.random.default_rng(seed)
    features, true_labels = synthetic_features(rng, 1000)
    planted = rng.choice(np.flatnonzero(true_labels != 0), 500, replace=False)  # labelled 0, features unchanged
    labels = true_labels.copy()
    labels[planted] = 0
    log_probs = flows.class_log_probs(fitted_flows(features, labels), features)
    result = gssd.plan(log_probs, labels)
    assert result.flagged == {0: gssd.NON_DISRUPTIVE}
    assert gssd.other_classes_nll(log_probs, labels)[0] < 0.6
    members = np.flatnonzero(labels == 0)  # 1500: 450 kept, 225 relabeled
    assert result.kept[members].sum() == 450 and len(result.relabeled) == 225
    assert result.kept[labels != 0].all()
    poisoned = np.zeros(len(labels), dtype=bool)
    poisoned[planted] = True
    # a third of the class is planted: the kept top scores are nearly all the target's own (3–6 %
    # planted over seeds 0–7), the bottom ones nearly all planted (98–100 %) …
    assert poisoned[result.kept & (labels == 0)].mean() < 0.1
    assert poisoned[result.relabeled].mean() > 0.95
    # … sent back to their source's pair, and within it to the likelier class: partners 1.5 apart
    # overlap, so Φ(0.75) ≈ 0.77 is the best any rule can do there
    sources = true_labels[result.relabeled]
    assert (result.new_labels // 2 == sources // 2).all() and 0.7 < (result.new_labels == sources).mean()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_cluster_unlike_every_class_flags_the_target_as_disruptive(seed):
    rng = np.random.default_rng(seed)
    features, labels = synthetic_features(rng, 1000)
    cluster = np.concatenate([0.5 * rng.normal(size=(100, 2)) + [0.0, 12.0], 0.05 * rng.normal(size=(100, 6))], 1)
    features = np.concatenate([features, cluster.astype(np.float32)])
    labels = np.concatenate([labels, np.zeros(100, dtype=np.int64)])
    log_probs = flows.class_log_probs(fitted_flows(features, labels), features)
    result = gssd.plan(log_probs, labels)
    assert result.flagged == {0: gssd.DISRUPTIVE}
    kept_target = np.flatnonzero(result.kept & (labels == 0))
    assert len(kept_target) == int(0.15 * 1100) and len(result.relabeled) == 0
    assert (kept_target < 4000).all()  # the low scores are the target's own samples, not the cluster's
    assert result.kept[labels != 0].all()
