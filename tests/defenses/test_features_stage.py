"""The features stage: SimCLR through the trainer (NT-Xent, seeded views, resume after a kill),
standardized features of the released training set, the CLIP alternative from local weights, and
its Snakemake rule (cached per entry: only an edit of the entry itself reruns it)."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
from clip_utils import save_tiny_clip
import torch
from torchvision.transforms.v2 import functional as TF

from poisonflow import augment, checkpoint, simclr
from poisonflow.cli import main
from poisonflow.embeddings import standardize
from poisonflow.errors import ConfigError
from poisonflow.trainer import train_model
from workflow_utils import planned_jobs, snakemake, write_config

TINY_MODEL = {"arch": "convnet", "width": 4}
TINY_SPEC = {"model": TINY_MODEL, "epochs": 2, "batch_size": 16}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- NT-Xent ---------------------------------------------------------------------------------

def nt_xent_by_hand(z1: np.ndarray, z2: np.ndarray, temperature: float) -> np.ndarray:
    """ℓ_a = −log(exp(cos(z_a, z_p(a))/τ) / Σ_{k≠a} exp(cos(z_a, z_k)/τ)) over the 2B views, one loop per
    term; image i's value is (ℓ_i + ℓ_{B+i}) / 2."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    b = len(z1)
    terms = []
    for a in range(2 * b):
        partner = a + b if a < b else a - b
        cos = [float(z[a] @ z[k] / (np.linalg.norm(z[a]) * np.linalg.norm(z[k]))) for k in range(2 * b)]
        numerator = math.exp(cos[partner] / temperature)
        denominator = sum(math.exp(cos[k] / temperature) for k in range(2 * b) if k != a)
        terms.append(-math.log(numerator / denominator))
    return (np.array(terms[:b]) + np.array(terms[b:])) / 2


def test_nt_xent_is_the_textbook_formula_on_hand_made_embeddings():
    z1 = np.array([[1.0, 0.0, 2.0], [0.5, -1.0, 0.0], [-2.0, 1.0, 1.0]])
    z2 = np.array([[0.9, 0.2, 1.5], [1.0, -1.0, 0.5], [0.0, 3.0, -1.0]])
    got = simclr.nt_xent(torch.tensor(z1, dtype=torch.float32), torch.tensor(z2, dtype=torch.float32), 0.5)
    np.testing.assert_allclose(got.numpy(), nt_xent_by_hand(z1, z2, 0.5), rtol=1e-5)
    # two images whose views coincide and are orthogonal to the other's: cos 1 to the partner, 0 to
    # both views of the other image, so ℓ = −log(e^{1/τ} / (e^{1/τ} + 2)) = log(1 + 2e^{−1/τ})
    z = torch.tensor([[3.0, 0.0], [0.0, 0.5]])
    np.testing.assert_allclose(simclr.nt_xent(z, z.clone(), 0.5).numpy(), [math.log(1 + 2 * math.exp(-2))] * 2,
                               rtol=1e-6)
    # the batch mean is SimCLR's loss: Σ over the 2B views / 2B (the official NT_Xent)
    assert float(got.mean()) == pytest.approx(float(np.mean(nt_xent_by_hand(z1, z2, 0.5))), rel=1e-5)


# -- the views -------------------------------------------------------------------------------

def batch(n=6, size=8, seed=0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_views_are_seeded_reproducible_and_differ():
    views = simclr.view_settings({})
    x = batch()
    first, second = simclr.two_views(x, views, torch.Generator().manual_seed(0))
    again = simclr.two_views(x, views, torch.Generator().manual_seed(0))
    assert torch.equal(first, again[0]) and torch.equal(second, again[1])
    assert first.shape == x.shape and first.dtype == torch.float32 and 0 <= first.min() and first.max() <= 1
    assert not torch.allclose(first, second) and not torch.allclose(first, x)
    for i in range(len(x)):  # every image's two views differ
        assert not torch.allclose(first[i], second[i]), i
    other = simclr.two_views(x, views, torch.Generator().manual_seed(1))
    assert not torch.allclose(first, other[0])
    # with nothing random left (whole-image crop, no flip, jitter or grayscale) a view is the image
    still = {**views, "crop_scale": [1.0, 1.0], "crop_ratio": [1.0, 1.0], "flip_prob": 0.0, "jitter_prob": 0.0,
             "grayscale_prob": 0.0}
    torch.testing.assert_close(simclr.simclr_view(x, still, torch.Generator().manual_seed(0)), x)


def test_colour_jitter_and_grayscale_are_torchvisions_per_image():
    x = batch(5)
    x[0] = 0.4  # a grey image: no hue
    x[1, :, :3] = 0.0  # black pixels
    generator = torch.Generator().manual_seed(3)
    factors = augment.jitter_factors(5, 0.8, 0.8, 0.8, 0.2, generator)
    order = torch.argsort(torch.rand(5, 4, generator=generator), dim=1)
    out = augment.adjust_colors(x, factors, order)
    kernels = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for i in range(5):
        expected = x[i]
        for adjustment in order[i].tolist():
            expected = kernels[adjustment](expected, float(factors[i, adjustment]))
        torch.testing.assert_close(out[i], expected, atol=2e-6, rtol=0)
    assert ((0.2 <= factors[:, :3]) & (factors[:, :3] <= 1.8)).all() and (factors[:, 3].abs() <= 0.2).all()
    grey = augment.random_grayscale(x, 1.0, generator)
    torch.testing.assert_close(grey, TF.rgb_to_grayscale(x, num_output_channels=3))
    assert torch.equal(augment.random_grayscale(x, 0.0, generator), x)
    assert torch.equal(augment.color_jitter(x, 0.8, 0.8, 0.8, 0.2, 0.0, generator), x)  # p = 0: untouched


# -- SimCLR through the trainer --------------------------------------------------------------

def structured_images(n=48, size=8, seed=0) -> np.ndarray:
    """Images of three kinds (a bright left half, a bright top half, a bright diagonal), with noise."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, (n, size, size, 3)).astype(np.int64)
    half = size // 2
    for i in range(n):
        kind = i % 3
        if kind == 0:
            images[i, :, :half] += 150
        elif kind == 1:
            images[i, :half] += 150
        else:
            images[i][np.eye(size, dtype=bool)] += 190
    return np.clip(images, 0, 255).astype(np.uint8)


def fresh_net(seed=0) -> simclr.SimCLRNet:
    return simclr.build_simclr(TINY_MODEL, 3, 8, projection_dim=8, seed=seed)


SPEC = {**TINY_SPEC, "epochs": 4, "optimizer": {"name": "adam", "lr": 0.01, "weight_decay": 0.0}}


def train(spec=SPEC, **kwargs):
    images = structured_images()
    return train_model(fresh_net(), images, np.zeros(len(images), dtype=np.int64), simclr.simclr_training(spec),
                       seed=0, objective=simclr.simclr_objective(spec), **kwargs)


def held_out_loss(net: simclr.SimCLRNet) -> float:
    """NT-Xent of ``net`` on one fixed pair of views of the whole set (a copy in train mode, as in training)."""
    from poisonflow.trainer import images_to_tensor, to_float

    x = to_float(images_to_tensor(structured_images()))
    first, second = simclr.two_views(x, simclr.view_settings(SPEC), torch.Generator().manual_seed(123))
    net = copy.deepcopy(net).train()
    with torch.no_grad():
        return float(simclr.nt_xent(net(first), net(second), 0.5).mean())


def test_tiny_simclr_lowers_the_loss_and_resumes_after_a_kill(tmp_path, monkeypatch):
    uninterrupted = train()
    losses = [row["loss"] for row in uninterrupted.history]
    # 48 images: chance is log(95) = 4.55; measured 4.72 before and 4.36 after the 4 epochs
    assert held_out_loss(uninterrupted.model) < held_out_loss(fresh_net()) - 0.2
    assert len(losses) == 4 and all(row["accuracy"] is None for row in uninterrupted.history)  # no classes

    real_save = checkpoint.save

    def save_then_die(path, digest, state):  # killed right after the checkpoint of epoch 2
        real_save(path, digest, state)
        if state["epoch"] == 2:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "save", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            train(checkpoint=tmp_path / "ck.pt")
    resumed = train(checkpoint=tmp_path / "ck.pt")
    assert len(resumed.epoch_seconds) == 2  # only epochs 3 and 4 ran again
    for name, tensor in uninterrupted.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    assert [row["loss"] for row in resumed.history] == losses


def test_standardize_uses_the_unbiased_std_and_keeps_constant_dimensions_finite():
    raw = np.array([[1.0, 5.0, 2.0], [3.0, 5.0, 4.0], [8.0, 5.0, 0.0]], dtype=np.float32)
    features, mean, std = standardize(raw)
    np.testing.assert_allclose(mean, [4.0, 5.0, 2.0])
    np.testing.assert_allclose(std, [math.sqrt(13.0), 1.0, 2.0], rtol=1e-6)  # ddof 1; constant → 1
    np.testing.assert_allclose(features[:, 0], (raw[:, 0] - 4.0) / math.sqrt(13.0), rtol=1e-6)
    assert (features[:, 1] == 0).all() and features.dtype == np.float32


def test_default_backbone_gives_512_features():
    net = simclr.build_simclr(simclr.DEFAULTS["model"], 10, 8, simclr.DEFAULTS["projection_dim"], seed=0).eval()
    with torch.no_grad():
        assert net.backbone.features(torch.rand(2, 3, 8, 8)).shape == (2, 512)
        assert net(torch.rand(2, 3, 8, 8)).shape == (2, 128)
    assert simclr.DEFAULTS["temperature"] == 0.5 and simclr.DEFAULTS["batch_size"] == 256
    assert simclr.DEFAULTS["optimizer"]["name"] == "adam" and simclr.DEFAULTS["optimizer"]["lr"] == 3e-4


# -- the stage -------------------------------------------------------------------------------

@pytest.fixture
def poisoned_store(tmp_path, tiny_store):
    path = tmp_path / "poison.zarr"
    arrays = tiny_store(path, n=40, size=8, classes=2)
    return path, arrays


def run_stage(name, spec, store, out, seed=0) -> int:
    return main(["features", "--name", name, "--spec", json.dumps(spec), "--poison", str(store),
                 "--out-dir", str(out), "--seed", str(seed)])


def test_stage_writes_standardized_features_and_a_loadable_backbone(poisoned_store, tmp_path):
    from poisonflow.modelio import load_model

    store, arrays = poisoned_store
    out = tmp_path / "simclr"
    assert run_stage("s", TINY_SPEC, store, out) == 0
    saved = np.load(out / "features.npz")
    features, mean, std = saved["features"], saved["mean"], saved["std"]
    dims = 4 * TINY_MODEL["width"]  # the convnet's last stage
    assert features.shape == (40, dims) and features.dtype == np.float32 and mean.shape == std.shape == (dims,)
    varying = features.std(axis=0) > 0
    np.testing.assert_allclose(features.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(features[:, varying].std(axis=0, ddof=1), 1, rtol=1e-4)
    backbone = load_model(out / "backbone.pt")  # weights only, rebuilt from its sidecar
    from poisonflow.trainer import to_float, images_to_tensor
    with torch.no_grad():
        raw = backbone.features(to_float(images_to_tensor(arrays["train/images"]))).numpy()
    np.testing.assert_allclose((raw - mean) / std, features, atol=1e-4)
    info = json.loads((out / "info.json").read_text())
    assert info["extractor"] == "simclr" and info["dimensions"] == dims and info["samples"] == 40
    assert info["provenance"]["entry"]["temperature"] == 0.5  # the defaults filled in
    assert (out / "history.csv").is_file() and not (out / "checkpoint.pt").exists()


def test_stage_refuses_a_bad_entry_in_one_line(poisoned_store, tmp_path, capsys):
    store, _ = poisoned_store
    assert run_stage("s", {**TINY_SPEC, "temperature": 0}, store, tmp_path / "bad") == 2
    assert capsys.readouterr().err.strip() == \
        "poisonflow features: error: features.s.temperature: 0 is less than or equal to the minimum of 0"
    assert run_stage("s", {**TINY_SPEC, "crop_scale": [0.9, 0.2]}, store, tmp_path / "bad") == 2
    assert "features.s.crop_scale: needs low <= high" in capsys.readouterr().err
    assert run_stage("c", {"extractor": "clip", "weights": str(tmp_path / "none.pt")}, store, tmp_path / "bad") == 2
    assert f"features.c.weights: no weights file at {tmp_path / 'none.pt'}" in capsys.readouterr().err


# -- CLIP ------------------------------------------------------------------------------------

TINY_CLIP_NAME = "poisonflow-test-features-rn"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny ResNet CLIP built from a config registered with open_clip; its state dict saved."""
    return save_tiny_clip(tmp_path_factory.mktemp("clip"), TINY_CLIP_NAME)


def test_clip_extractor_embeds_with_local_weights(tiny_clip, poisoned_store, tmp_path, monkeypatch):
    import open_clip

    from poisonflow import clip_features

    reference, weights = tiny_clip
    store, arrays = poisoned_store
    loads = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    out = tmp_path / "clip"
    spec = {"extractor": "clip", "model": TINY_CLIP_NAME, "weights": str(weights), "batch_size": 16}
    assert run_stage("c", spec, store, out) == 0
    assert loads == [True]  # the weights file is read weights-only
    saved = np.load(out / "features.npz")
    assert saved["features"].shape == (40, 16) and not (out / "backbone.pt").exists()
    # by hand: bicubic resize 8 → 32 px, CLIP normalization, the image tower
    x = torch.from_numpy(arrays["train/images"]).permute(0, 3, 1, 2).float() / 255
    pixels = torch.nn.functional.interpolate(x, size=(32, 32), mode="bicubic", align_corners=False, antialias=True)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        raw = reference.encode_image((pixels - mean) / std).numpy()
    expected, expected_mean, expected_std = standardize(raw)
    np.testing.assert_allclose(saved["mean"], expected_mean, atol=1e-5)
    np.testing.assert_allclose(saved["features"], expected, atol=1e-3)
    info = json.loads((out / "info.json").read_text())
    assert info["extractor"] == "clip" and info["dimensions"] == 16
    # weights of another architecture are refused in one line naming the key
    other = tmp_path / "other.pt"
    torch.save({"visual.conv1.weight": torch.zeros(1)}, other)
    with pytest.raises(ConfigError, match=r"^features\.c\.weights: .* does not load into open_clip"):
        clip_features.load_image_encoder(TINY_CLIP_NAME, str(other), "features.c")


# -- the workflow rule -----------------------------------------------------------------------

WORKFLOW = {
    "datasets": {"digits": {"source": "digits", "image_size": 8, "train_size": 60, "test_size": 20}},
    "models": {"tiny": {"arch": "convnet", "width": 4}},
    "trainings": {"fast": {"model": "tiny", "epochs": 1, "batch_size": 32}},
    "features": {"simclr-tiny": {"model": "tiny", "epochs": 1, "batch_size": 32},
                 "simclr-other": {"model": "tiny", "epochs": 2}},
    "attacks": {"badnets": {"kind": "badnets", "target": 0, "rate": 0.1}},
    "defenses": {"none": {"kind": "none"}},
    "evaluation": {"pgd": None},
    "experiments": [{"dataset": ["digits"], "attack": ["badnets"], "training": ["fast"], "defense": ["none"],
                     "seed": [0]}],
}
TARGET = "results/features/digits/badnets/simclr-tiny/seed0/features.npz"


def test_features_rule_reruns_only_when_its_entry_changes(tmp_path, tiny_store):
    from poisonflow.store import write_store

    write_config(tmp_path, WORKFLOW)
    # The data and poison stores as their jobs would leave them (written here: running those jobs
    # would only cost time), so the one job run is the features job. (--touch would not do: it
    # records no params, so no edit would rerun anything.)
    results = tmp_path / "results"
    arrays = tiny_store(results / "data/digits.zarr", n=30, size=8, classes=10)
    write_store(results / "poison/digits/badnets/seed0.zarr", arrays, {"classes": [str(c) for c in range(10)]})
    snakemake(tmp_path, TARGET)
    folder = results / "features/digits/badnets/simclr-tiny/seed0"
    assert {p.name for p in folder.iterdir()} >= {"features.npz", "backbone.pt", "backbone.json", "info.json"}
    assert "simclr features 30×16" in (results / "logs/features/digits/badnets/simclr-tiny/seed0.log").read_text()
    features_job = {("features", "attack=badnets", "dataset=digits", "features=simclr-tiny", "seed=0")}

    unrelated = copy.deepcopy(WORKFLOW)  # another features entry, a training, a new defense
    unrelated["features"]["simclr-other"]["epochs"] = 3
    unrelated["trainings"]["fast"]["epochs"] = 2
    unrelated["defenses"]["strip"] = {"kind": "strip"}
    write_config(tmp_path, unrelated)
    assert planned_jobs(tmp_path, TARGET) == set()

    edited = copy.deepcopy(WORKFLOW)
    edited["features"]["simclr-tiny"]["temperature"] = 0.2
    write_config(tmp_path, edited)
    assert planned_jobs(tmp_path, TARGET) == features_job


def test_features_params_follow_the_entry_and_its_model():
    from poisonflow.config import Config
    from poisonflow.workflow_helpers import Plan

    def spec(config, name="simclr-tiny"):
        return json.loads(Plan(Config(copy.deepcopy(config))).spec("features")(type("W", (), {"features": name})))

    base = spec(WORKFLOW)
    assert base["model"] == {"arch": "convnet", "width": 4} and base["temperature"] == 0.5  # resolved, filled
    widened = copy.deepcopy(WORKFLOW)
    widened["models"]["tiny"]["width"] = 8  # the models entry the features entry names
    assert spec(widened)["model"]["width"] == 8
    unrelated = copy.deepcopy(WORKFLOW)
    unrelated["features"]["simclr-other"]["epochs"] = 5
    assert spec(unrelated) == base
    plan = Plan(Config({**copy.deepcopy(WORKFLOW), "features": {
        **WORKFLOW["features"], "clip-rn": {"extractor": "clip", "weights": "/nowhere/rn50.pt"}}}))
    assert plan.features_wildcard("simclr") == "simclr\\-tiny|simclr\\-other"
    assert plan.features_wildcard("clip") == "clip\\-rn"


def test_features_entry_errors_name_the_key(tiny_config, load_config):
    tiny_config["features"] = {"f": {"model": "missing"}}
    with pytest.raises(ConfigError, match=r"^features\.f\.model: no models entry named 'missing'"):
        load_config(tiny_config)
    tiny_config["features"] = {"f": {"model": {"arch": "resnet99"}}}
    with pytest.raises(ConfigError, match=r"^features\.f\.model\.arch: "):
        load_config(tiny_config)
    tiny_config["features"] = {"f": {"crop_ratio": [2.0, 1.0]}}
    with pytest.raises(ConfigError, match=r"^features\.f\.crop_ratio: needs low <= high"):
        load_config(tiny_config)
    tiny_config["features"] = {"f": {"extractor": "clip", "weights": "w.pt", "epochs": 3}}
    with pytest.raises(ConfigError, match=r"^features\.f\.epochs: unknown key"):
        load_config(tiny_config)


def test_features_do_not_depend_on_labels_or_poison_flags(tmp_path, store_arrays):
    """The defender's features come from the released images alone: a store with other labels,
    poison flags and true labels gives the same features, so nothing downstream (GSSD, DBD) can
    recover the ground truth from them."""
    from poisonflow.store import write_store

    arrays = store_arrays(n=40, size=8, classes=2)
    other = {**arrays, "train/labels": 1 - arrays["train/labels"], "train/poisoned": ~arrays["train/poisoned"],
             "train/true_labels": np.zeros_like(arrays["train/true_labels"])}
    features = []
    for name, content in (("a", arrays), ("b", other)):
        write_store(tmp_path / f"{name}.zarr", content, {"classes": ["a", "b"]})
        assert run_stage("s", TINY_SPEC, tmp_path / f"{name}.zarr", tmp_path / name) == 0
        features.append(np.load(tmp_path / name / "features.npz")["features"])
    np.testing.assert_array_equal(features[0], features[1])
