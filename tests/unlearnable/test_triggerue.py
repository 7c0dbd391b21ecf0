"""TriggerUE: budget, class-wise triggers, ablations, the CLIP surrogate, and streaming = batch."""

from __future__ import annotations

import copy
import re
import json
import subprocess
import sys

import numpy as np
import pytest
from clip_utils import TINY_CLIP, save_tiny_clip
import torch
import torch.nn.functional as F

from poisonflow.kinds import defaults_of, settings_for
from poisonflow import clip_surrogate, config, triggers
from poisonflow.attacks import UNLEARNABLE, PoisonContext
from poisonflow.cli import main
from poisonflow.errors import ConfigError
from poisonflow.models import build_model
from poisonflow.stages import poison
from poisonflow.store import read_store, write_store
from poisonflow.trainer import images_to_tensor, save_weights, to_float
from poisonflow.unlearnable import triggerue
from workflow_utils import environment

torch.set_num_threads(1)

SIZE = 16
CLASSES = ["zero", "one", "two"]
MODEL = {"arch": "convnet", "width": 4}
EPS = 8 / 255


def images(n: int, seed: int = 0, size: int = SIZE) -> np.ndarray:
    """Smooth random images (low-frequency blobs) with some saturated pixels, like real photos."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(-40, 300, size=(n, 4, 4, 3))
    upsampled = torch.nn.functional.interpolate(torch.tensor(coarse).permute(0, 3, 1, 2), size=size,
                                                mode="bilinear", align_corners=True)
    return upsampled.permute(0, 2, 3, 1).clamp(0, 255).round().numpy().astype(np.uint8)


def surrogate(num_classes: int = 3, seed: int = 0):
    return build_model(MODEL, num_classes, SIZE, seed=seed).eval()


def fitted_surrogate(x_u8: np.ndarray, labels: np.ndarray, steps: int = 40):
    """A surrogate fitted to these very images (a few Adam steps), so its loss responds to δ."""
    model = surrogate()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = as_float(x_u8), torch.as_tensor(labels)
    for _ in range(steps):
        model.train()
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


def spec(**changes) -> dict:
    entry = {"kind": "triggerue", "rate": 1.0, "surrogate": "s", "batch_size": 4,
             "surrogate_entry": {"training": {"model": dict(MODEL)}}}
    entry.update(changes)
    return entry


def context(model=None, classes=CLASSES) -> PoisonContext:
    empty = np.zeros((0, SIZE, SIZE, 3), np.uint8)
    return PoisonContext(empty, np.zeros(0, np.int64), list(classes), surrogate=model)


def as_float(x_u8: np.ndarray) -> torch.Tensor:
    return to_float(images_to_tensor(x_u8))


def as_u8(x: torch.Tensor) -> np.ndarray:
    return x.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


LABELS = np.array([0, 1, 2, 0, 1, 2, 2, 0, 1, 2])
X = images(len(LABELS))


# --- settings -------------------------------------------------------------------------------


def test_registered_and_defaults_follow_the_paper_and_the_schema():
    assert UNLEARNABLE.get("triggerue") is triggerue
    assert defaults_of(triggerue.__name__)["eps"] == 8 / 255 and defaults_of(triggerue.__name__)["steps"] == 20
    assert defaults_of(triggerue.__name__)["step"] == 0.05  # the paper's α, ≈ 1.6·ε
    assert defaults_of(triggerue.__name__)["trigger"] == {"k": 4, "s": 0.5, "grid_rescale": 1.0}
    assert defaults_of(triggerue.__name__)["clip"] == {"model": "RN50", "pretrained": "openai", "checkpoint": None,
                                          "prompt": "a photo of a {}.", "download": False}
    raw = {"datasets": {"digits": {"source": "digits"}}, "models": {"m": MODEL}, "trainings": {"t": {"model": "m"}},
           "surrogates": {"s": {"training": "t"}}, "attacks": {"u": {"kind": "triggerue", "surrogate": "s"}},
           "defenses": {"n": {"kind": "none"}},
           "experiments": [{"dataset": ["digits"], "attack": ["u"], "training": ["t"], "defense": ["n"], "seed": [0]}]}
    entry = config.load(raw).attack("u")
    assert {k: v for k, v in entry.items() if k not in ("surrogate", "surrogate_entry")} == defaults_of(triggerue.__name__)
    # the trained surrogate is required exactly when features are eliminated on it
    no_surrogate = copy.deepcopy(raw)
    no_surrogate["attacks"]["u"] = {"kind": "triggerue"}
    with pytest.raises(ConfigError, match=r"^attacks\.u: 'surrogate' is a required property"):
        config.load(no_surrogate)
    no_surrogate["attacks"]["u"] = {"kind": "triggerue", "components": ["trigger"]}
    config.load(no_surrogate)
    no_surrogate["attacks"]["u"] = {"kind": "triggerue", "components": []}
    with pytest.raises(ConfigError, match=r"^attacks\.u\.components: \[\] should be non-empty"):
        config.load(no_surrogate)


@pytest.mark.parametrize("change, key", [
    ({"components": ["features", "noise"]}, "triggerue.components[1]"),
    ({"components": []}, "triggerue.components"),
    ({"eps": 0}, "triggerue.eps"),
    ({"steps": 0}, "triggerue.steps"),
    ({"batch_size": 2.5}, "triggerue.batch_size"),
    ({"surrogate_kind": "vit"}, "triggerue.surrogate_kind"),
    ({"trigger": {"k": 1}}, "triggerue.trigger.k"),
    ({"trigger": {"size": 3}}, "triggerue.trigger.size"),
    ({"clip": {"prompt": "no placeholder"}}, "triggerue.clip.prompt"),
    ({"colour": 1}, "triggerue.colour"),
])
def test_bad_settings_name_their_key(change, key):
    with pytest.raises(ConfigError, match="^" + re.escape(key) + ":"):
        settings_for(triggerue.__name__, spec(**change), "triggerue")


def test_missing_surrogate_and_unknown_class_are_config_errors():
    with pytest.raises(ConfigError, match=r"^attacks\.u\.surrogate: surrogate_kind 'trained'"):
        ctx = context(None)
        ctx.extra["key"] = "attacks.u"
        triggerue.protect(spec(), X[:2], LABELS[:2], ctx, seed=0)
    # a class the trained surrogate has no output for: named, with the way out
    with pytest.raises(ConfigError, match=r"class 3 \('new'\) is not among the 3 classes the surrogate predicts"):
        triggerue.protect(spec(), X[:2], np.array([0, 3]), context(surrogate(), CLASSES + ["new"]), seed=0)


# --- feature elimination --------------------------------------------------------------------


def test_perturbation_within_budget_raises_the_loss_and_is_then_warped():
    model = fitted_surrogate(X, LABELS)
    x, y = as_float(X), torch.as_tensor(LABELS)
    adversarial = triggerue.eliminate_features(model, x, y, EPS, 0.05, 20)
    delta = adversarial - x
    assert delta.abs().max() <= EPS + 1e-6
    # ε < α = 0.05 < 2ε: a pixel free to move either way sits at 0, ±(α − ε) (after a sign flip) or ±ε
    free = (x >= EPS) & (x <= 1 - EPS)
    moved = delta[free].abs()
    at_budget = (moved - EPS).abs() < 1e-6
    flipped = (moved - (0.05 - EPS)).abs() < 1e-6
    assert (at_budget | flipped | (moved == 0)).all()
    assert at_budget.float().mean() > 0.5 and flipped.any()
    with torch.no_grad():
        before = F.cross_entropy(model(x), y, reduction="none")
        after = F.cross_entropy(model(adversarial), y, reduction="none")
    assert (after > 2 * before).all()  # the loss on the true class at least doubles

    # the released image is warp(x + δ) by the class grid, rounded to uint8
    out = triggerue.protect(spec(batch_size=len(LABELS)), X, LABELS, context(model), seed=5)
    grids = {c: triggerue.class_grid(c, SIZE, defaults_of(triggerue.__name__)["trigger"], 5) for c in range(3)}
    expected = torch.cat([triggers.warp(adversarial[i:i + 1], grids[int(c)]) for i, c in enumerate(LABELS)])
    assert np.array_equal(out, as_u8(expected))
    assert out.dtype == np.uint8 and out.shape == X.shape


def test_feature_elimination_starts_from_zero_and_is_deterministic():
    model = surrogate()
    x, y = as_float(X[:3]), torch.as_tensor(LABELS[:3])
    one = triggerue.eliminate_features(model, x, y, EPS, 2 / 255, 1)
    # one step of 2/255 from δ = 0: every free pixel moved by exactly 2/255
    delta = (one - x)[(x >= EPS) & (x <= 1 - EPS)].abs()
    assert torch.allclose(delta[delta > 0], torch.full_like(delta[delta > 0], 2 / 255), atol=1e-6)
    assert torch.equal(one, triggerue.eliminate_features(model, x, y, EPS, 2 / 255, 1))


# --- trigger injection ----------------------------------------------------------------------


def test_class_grids_same_within_class_different_across_classes():
    trigger = defaults_of(triggerue.__name__)["trigger"]
    grids = [triggerue.class_grid(c, SIZE, trigger, seed=7) for c in range(4)]
    assert all(torch.equal(g, triggerue.class_grid(c, SIZE, trigger, seed=7)) for c, g in enumerate(grids))
    for a in range(4):
        for b in range(a + 1, 4):
            assert (grids[a] - grids[b]).abs().max() > 1e-3
    assert not torch.equal(grids[0], triggerue.class_grid(0, SIZE, trigger, seed=8))
    # WaNet's field: identity + s·noise/H with noise of mean |value| 1 before upsampling, in [−1, 1]
    _, identity = triggers.wanet_grids(4, SIZE, torch.Generator().manual_seed(0))
    offsets = (grids[0] - identity).abs()
    assert grids[0].abs().max() <= 1 and 0 < offsets.max() < 3 * 0.5 / SIZE

    # trigger only: identical images of one class come out identical; of two classes, different
    same = np.repeat(X[:1], 4, axis=0)
    out = triggerue.protect(spec(components=["trigger"]), same, np.array([1, 1, 2, 2]), context(), seed=7)
    assert np.array_equal(out[0], out[1]) and np.array_equal(out[2], out[3])
    assert not np.array_equal(out[0], out[2])
    assert np.array_equal(out[:1], as_u8(triggers.warp(as_float(same[:1]), grids[1])))


def test_a_class_trigger_does_not_depend_on_the_other_classes_present():
    ctx = context(surrogate())
    everything = triggerue.protect(spec(), X, LABELS, ctx, seed=2)
    twos = LABELS == 2
    alone = triggerue.protect(spec(), X[twos], LABELS[twos], ctx, seed=2)
    assert np.array_equal(alone, everything[twos])
    # a class the dataset has never seen (id 9) gets its own trigger from (seed, 9) alone
    new = triggerue.protect(spec(components=["trigger"]), X[:2], np.array([9, 9]), context(), seed=2)
    grid = triggerue.class_grid(9, SIZE, defaults_of(triggerue.__name__)["trigger"], 2)
    assert np.array_equal(new, as_u8(triggers.warp(as_float(X[:2]), grid)))
    # trigger.seed overrides the experiment seed
    seeded = triggerue.protect(spec(components=["trigger"], trigger={"seed": 2}), X[:2], np.array([9, 9]), context(), 11)
    assert np.array_equal(seeded, new)


def test_ablation_components():
    model = surrogate()
    x, y = as_float(X), torch.as_tensor(LABELS)
    adversarial = triggerue.eliminate_features(model, x, y, EPS, 0.05, 20)
    grids = {c: triggerue.class_grid(c, SIZE, defaults_of(triggerue.__name__)["trigger"], 0) for c in range(3)}
    warp = lambda z: torch.cat([triggers.warp(z[i:i + 1], grids[int(c)]) for i, c in enumerate(LABELS)])

    only_features = triggerue.protect(spec(components=["features"], batch_size=10), X, LABELS, context(model), 0)
    assert np.array_equal(only_features, as_u8(adversarial))
    assert np.abs(only_features.astype(int) - X.astype(int)).max() == 8  # ε = 8/255: 8 grey levels
    only_trigger = triggerue.protect(spec(components=["trigger"]), X, LABELS, context(None), 0)
    assert np.array_equal(only_trigger, as_u8(warp(x)))
    # the paper's order whatever the list order: warp(x + δ)
    both = triggerue.protect(spec(components=["trigger", "features"], batch_size=10), X, LABELS, context(model), 0)
    assert np.array_equal(both, as_u8(warp(adversarial)))


def test_result_does_not_depend_on_chunk_mates_or_position():
    ctx = context(surrogate())
    reference = triggerue.protect(spec(batch_size=4), X, LABELS, ctx, seed=1)
    order = np.array([9, 3, 0, 7, 1, 8, 2, 6, 5, 4])
    shuffled = triggerue.protect(spec(batch_size=4), X[order], LABELS[order], ctx, seed=1)
    assert np.array_equal(shuffled, reference[order])
    single = triggerue.prepare(spec(batch_size=4), ctx, seed=1)
    assert np.array_equal(single.protect_chunk(X[5:6], LABELS[5:6]), reference[5:6])  # padded chunk


# --- the CLIP surrogate ---------------------------------------------------------------------

TINY_NAME = "poisonflow-test-tiny-rn"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny ResNet CLIP registered with open_clip, with seeded random weights saved to a file."""
    return save_tiny_clip(tmp_path_factory.mktemp("clip"), TINY_NAME)


def test_clip_zero_shot_logits_from_a_checkpoint(tiny_clip):
    import open_clip

    reference, checkpoint = tiny_clip
    names = ["cat", "dog", "bird", "fish"]
    surrogate_model = clip_surrogate.zero_shot_classifier(
        {"model": TINY_NAME, "pretrained": None, "checkpoint": str(checkpoint)}, names)
    x = as_float(X[:5])
    logits = surrogate_model(x)
    assert logits.shape == (5, 4) and surrogate_model.num_classes == 4
    # by hand: bicubic resize to 32 px, CLIP normalization, scaled cosine of image and prompt embeddings
    pixels = F.interpolate(x, size=(32, 32), mode="bicubic", align_corners=False, antialias=True)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        image = F.normalize(reference.encode_image((pixels - mean) / std), dim=-1)
        tokens = open_clip.get_tokenizer(TINY_NAME)([f"a photo of a {name}." for name in names])
        text = F.normalize(reference.encode_text(tokens), dim=-1)
        expected = reference.logit_scale.exp() * image @ text.T
    assert torch.allclose(logits, expected, atol=1e-5)
    assert reference.logit_scale.exp().item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_clip_feature_elimination_lowers_the_true_class_probability(tiny_clip):
    _, checkpoint = tiny_clip
    names = CLASSES + ["a class added later"]
    ctx = context(None, names)
    clip = {"model": TINY_NAME, "pretrained": None, "checkpoint": str(checkpoint)}
    model = clip_surrogate.zero_shot_classifier(clip, names)
    labels = np.array([0, 1, 2, 3, 3, 0])
    x, y = as_float(X[:6]), torch.as_tensor(labels)
    adversarial = triggerue.eliminate_features(model, x, y, EPS, 0.05, 20)
    with torch.no_grad():
        before = model(x).softmax(1)[torch.arange(6), y]
        after = model(adversarial).softmax(1)[torch.arange(6), y]
    assert (after < before).all()
    # through the kind: the new class (id 3) is protected like the others
    out = triggerue.protect(spec(surrogate_kind="clip", clip=clip, batch_size=6), X[:6], labels, ctx, seed=0)
    grids = {c: triggerue.class_grid(c, SIZE, defaults_of(triggerue.__name__)["trigger"], 0) for c in range(4)}
    expected = torch.cat([triggers.warp(adversarial[i:i + 1], grids[int(c)]) for i, c in enumerate(labels)])
    assert np.array_equal(out, as_u8(expected))


def test_clip_from_a_local_folder(tiny_clip, tmp_path):
    reference, _ = tiny_clip
    (tmp_path / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": TINY_CLIP, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}))
    torch.save(reference.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    model = clip_surrogate.zero_shot_classifier({"model": f"local-dir:{tmp_path}"}, ["a", "b"])
    assert model(as_float(X[:2])).shape == (2, 2)
    assert model.mean.flatten().tolist() == [0.5, 0.5, 0.5] and model.size == (32, 32)


def test_missing_clip_weights_are_one_line_config_errors(monkeypatch, tmp_path):
    open_clip = pytest.importorskip("open_clip")
    import huggingface_hub

    asked = []
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                        lambda repo, name, **kw: asked.append((repo, name)) or None)
    with pytest.raises(ConfigError) as error:
        clip_surrogate.zero_shot_classifier({}, CLASSES, key="attacks.u.clip")
    message = str(error.value)
    assert message.startswith("attacks.u.clip.checkpoint: open_clip RN50 'openai' weights are not in the local cache")
    assert "surrogate_kind: trained" in message and "\n" not in message
    assert asked == [("timm/resnet50_clip.openai", "open_clip_model.safetensors"),
                     ("timm/resnet50_clip.openai", "open_clip_pytorch_model.bin")]
    # a cached file is found without the network
    weights = tmp_path / "open_clip_pytorch_model.bin"
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                        lambda repo, name, **kw: str(weights) if name == weights.name else None)
    assert clip_surrogate.cached_weights(open_clip, "RN50", "openai") == str(weights)
    with pytest.raises(ConfigError, match=r"^clip\.checkpoint: no weights file at .*missing\.pt$"):
        clip_surrogate.zero_shot_classifier({"checkpoint": str(tmp_path / "missing.pt")}, CLASSES)


# --- streaming: poisonflow protect ----------------------------------------------------------


def cli_process(*args: str) -> subprocess.CompletedProcess:
    """``poisonflow protect`` in its own process, as a user or a rule runs it."""
    return subprocess.run([sys.executable, "-m", "poisonflow.cli", "protect", *args],
                          capture_output=True, text=True, env=environment())


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """``poisonflow protect`` through the same entry point, in this process (saves a torch import)."""
    status = main(["protect", *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_streaming_protect_is_byte_equal_to_the_batch_stage(tmp_path, capsys):
    from PIL import Image

    labels = np.array([0, 1, 2, 0, 1, 2, 2, 0, 1, 2, 1])
    train = images(len(labels), seed=3)
    clean = tmp_path / "clean.zarr"
    write_store(clean, {"train/images": train, "train/labels": labels}, {"classes": CLASSES})
    surrogate_dir = tmp_path / "surrogate"
    save_weights(surrogate(seed=4), surrogate_dir / "model.pt")
    entry = spec(steps=3)

    # the batch stage: the poison stage's protect() with the surrogate it loads
    model = poison.load_surrogate(entry, str(surrogate_dir), len(CLASSES), SIZE, "cpu")
    batch = poison.protect(entry, 3, train, labels, context(model), key="attacks.u")

    # streaming a store: same arrays, in the protected store's layout
    result = cli_process("--input", str(clean), "--out", str(tmp_path / "out.zarr"), "--spec", json.dumps(entry),
                         "--seed", "3", "--surrogate-dir", str(surrogate_dir), "--name", "u")
    assert result.returncode == 0, result.stderr
    out = read_store(tmp_path / "out.zarr")
    for key in ("train/images", "train/labels", "train/poisoned", "train/true_labels"):
        assert np.array_equal(out[key], batch[key]), key
    assert out.attrs["classes"] == CLASSES and out.attrs["seed"] == 3

    # streaming a folder of new images: only some classes, other chunk mates, PNG in and out
    chosen = [9, 2, 6, 4]  # classes 2, 2, 2, 1
    for index in chosen:
        folder = tmp_path / "new" / CLASSES[labels[index]]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(train[index]).save(folder / f"img{index}.png")
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    status, out, err = cli(capsys, "--input", str(tmp_path / "new"), "--out", str(tmp_path / "released"),
                           "--spec", json.dumps(entry), "--seed", "3", "--surrogate-dir", str(surrogate_dir),
                           "--classes", str(tmp_path / "classes.txt"))
    assert status == 0, err
    assert "protected 4 images of 2 classes" in out
    for index in chosen:
        path = tmp_path / "released" / CLASSES[labels[index]] / f"img{index}.png"
        assert np.array_equal(np.asarray(Image.open(path)), batch["train/images"][index]), path


def test_streaming_protect_refuses_unknown_folders_and_whole_dataset_kinds(tmp_path, capsys):
    from PIL import Image

    (tmp_path / "new" / "seven").mkdir(parents=True)
    Image.fromarray(X[0]).save(tmp_path / "new" / "seven" / "a.png")
    (tmp_path / "classes.txt").write_text("zero\none\n")
    args = ["--input", str(tmp_path / "new"), "--out", str(tmp_path / "out"), "--seed", "0",
            "--classes", str(tmp_path / "classes.txt")]
    status, _, err = cli(capsys, *args, "--spec", json.dumps(spec(components=["trigger"])))
    assert status == 2
    assert "--classes: class folder 'seven'" in err and "append it" in err and err.count("\n") == 1
    # appending the new class name gives it an id: its trigger is class 2's
    (tmp_path / "classes.txt").write_text("zero\none\nseven\n")
    status, _, err = cli(capsys, *args, "--spec", json.dumps(spec(components=["trigger"])))
    assert status == 0, err
    grid = triggerue.class_grid(2, SIZE, defaults_of(triggerue.__name__)["trigger"], 0)
    released = np.asarray(Image.open(tmp_path / "out" / "seven" / "a.png"))
    assert np.array_equal(released[None], as_u8(triggers.warp(as_float(X[:1]), grid)))
    # the entry from a config file gives the same bytes as the resolved spec
    raw = {"datasets": {"digits": {"source": "digits"}}, "models": {"m": MODEL}, "trainings": {"t": {"model": "m"}},
           "attacks": {"u": {"kind": "triggerue", "components": ["trigger"]}}, "defenses": {"n": {"kind": "none"}},
           "experiments": [{"dataset": ["digits"], "attack": ["u"], "training": ["t"], "defense": ["n"], "seed": [0]}]}
    (tmp_path / "config.yaml").write_text(json.dumps(raw))
    from_config = [a if a != str(tmp_path / "out") else str(tmp_path / "out2") for a in args]
    status, _, err = cli(capsys, *from_config, "--config", str(tmp_path / "config.yaml"), "--attack", "u")
    assert status == 0, err
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out2" / "seven" / "a.png")), released)
    status, _, err = cli(capsys, *from_config, "--config", str(tmp_path / "config.yaml"), "--attack", "v")
    assert status == 2 and "--attack: no attacks entry named 'v'" in err
    status, _, err = cli(capsys, *args, "--spec", json.dumps({"kind": "badnets"}))
    assert status == 2 and "is not an unlearnable-example kind" in err
    status, _, err = cli(capsys, *args)
    assert status == 2 and "--spec: give either --spec JSON or --config FILE" in err
