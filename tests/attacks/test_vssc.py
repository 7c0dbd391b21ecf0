"""VSSC: the composite insertion backend, the CLIP and none quality checks, the regeneration loop,
the trigger selection and the attack kind's build/poison/apply, on hand-made inputs."""

from __future__ import annotations

import json
from typing import ClassVar

import numpy as np
import pytest
from clip_utils import save_tiny_clip
import torch

from poisonflow.attacks import PoisonContext, vssc
from poisonflow.errors import ConfigError
from poisonflow.kinds import generator_settings
from poisonflow.stages.trigger import TriggerContext
from poisonflow.vssc import composite, quality

KEY = "attacks.v.trigger.insertion.composite"


def scene(size: int = 32, seed: int = 0) -> np.ndarray:
    """A smooth colour gradient with mild noise: the kind of background an object is pasted on."""
    rows, cols = np.mgrid[0:size, 0:size] * (160 / size)
    base = np.stack([40 + cols, 60 + rows, np.full_like(rows, 90)], axis=-1)
    noise = np.random.default_rng(seed).integers(0, 12, base.shape)
    return (base + noise).clip(0, 255).astype(np.uint8)


def changed_box(before: np.ndarray, after: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(np.any(before != after, axis=-1))
    return rows.min(), cols.min(), rows.max() + 1, cols.max() + 1


# -- the composite backend ------------------------------------------------------------------------------

def test_composite_edits_differ_per_image_stay_inside_and_repeat_for_the_same_generator():
    image = scene()
    alpha = composite.build({"harmonize": "alpha"}, 32, "cpu", KEY)
    placements = [alpha.placement(32, 32, "red flower", np.random.default_rng([0, i])) for i in range(6)]
    assert len({(p.top, p.left) for p in placements}) == 6  # a place per edit
    means = [tuple(np.round(p.patch[..., :3].sum((0, 1)) / p.patch[..., 3].sum(), 3)) for p in placements]
    assert len(set(means)) == 6  # and a colour per edit
    for p, (r, g, b) in zip(placements, means):  # 0.3-0.5 of the side, inside the image, still red
        assert round(0.3 * 32) <= max(p.patch.shape[:2]) <= round(0.5 * 32)
        top, left, bottom, right = p.box
        assert 0 <= top and 0 <= left and bottom <= 32 and right <= 32
        assert r > 2 * g and r > 2 * b
    for i in range(6):
        edited = alpha.insert(image, "dog", "red flower", np.random.default_rng([0, i]))
        top, left, bottom, right = placements[i].box
        outside = np.ones((32, 32), bool)
        outside[top:bottom, left:right] = False
        np.testing.assert_array_equal(edited[outside], image[outside])  # far pixels untouched
        r0, c0, r1, c1 = changed_box(image, edited)
        assert top <= r0 and left <= c0 and r1 <= bottom and c1 <= right
        np.testing.assert_array_equal(edited, alpha.insert(image, "dog", "red flower", np.random.default_rng([0, i])))
    poisson = composite.build({}, 32, "cpu", KEY)  # harmonize: poisson
    edited = poisson.insert(image, "dog", "red flower", np.random.default_rng([0, 1]))
    np.testing.assert_array_equal(edited, poisson.insert(image, "dog", "red flower", np.random.default_rng([0, 1])))
    top, left, bottom, right = placements[1].box  # the same draws place the object at the same box
    grow = composite.POISSON_MARGIN + 1
    r0, c0, r1, c1 = changed_box(image, edited)
    assert top - grow <= r0 and left - grow <= c0 and r1 <= bottom + grow and c1 <= right + grow
    assert not np.array_equal(edited, alpha.insert(image, "dog", "red flower", np.random.default_rng([0, 1])))
    for side in (16, 224):  # digits to ImageNet sizes
        p = alpha.placement(side, side, "harness", np.random.default_rng(3))
        assert round(0.3 * side) <= max(p.patch.shape[:2]) <= round(0.5 * side) and p.box[2] <= side >= p.box[3]


def test_composite_shapes_colours_and_user_objects(tmp_path):
    assert [composite.shape_of(t) for t in ("red flower", "Harness", "nuts", "a Strawberry", "sunglasses")] == \
        ["flower", "band", "nut", "strawberry", None]
    assert composite.colour_of("a blue rose") == composite.COLOURS["blue"] and composite.colour_of("nuts") is None
    inserter = composite.build({"harmonize": "alpha", "brightness": 0, "saturation": 0, "hue": 0}, 32, "cpu", KEY)
    blue = inserter.placement(32, 32, "blue flower", np.random.default_rng(0)).patch
    r, g, b = blue[..., :3].sum((0, 1)) / blue[..., 3].sum()
    assert b > r and b > g
    with pytest.raises(ConfigError, match=rf"^{KEY}\.objects: no object for the trigger 'sunglasses'"):
        inserter.insert(scene(), "dog", "sunglasses", np.random.default_rng(0))
    fallback = composite.build({"default_shape": "flower"}, 32, "cpu", KEY)
    assert fallback.insert(scene(), "dog", "sunglasses", np.random.default_rng(0)).shape == (32, 32, 3)
    # a user object: an opaque green square, pasted unrotated and unjittered, stays exactly green
    from PIL import Image

    Image.fromarray(np.full((6, 6, 4), [0, 255, 0, 255], np.uint8)).save(tmp_path / "box.png")
    user = composite.build({"objects": {"Green  Box": str(tmp_path / "box.png")}, "rotation": 0, "harmonize": "alpha",
                            "brightness": 0, "saturation": 0, "hue": 0}, 32, "cpu", KEY)
    image = np.full((32, 32, 3), 128, np.uint8)
    edited = user.insert(image, "dog", "green box", np.random.default_rng(1))
    changed = np.any(edited != image, axis=-1)
    assert 10 * 10 <= changed.sum() <= 16 * 16
    np.testing.assert_allclose(edited[changed], np.tile([0, 255, 0], (changed.sum(), 1)), atol=1)
    with pytest.raises(ConfigError, match=rf"^{KEY}\.objects\.red flower: cannot read the object image"):
        composite.build({"objects": {"red flower": str(tmp_path / "missing.png")}}, 32, "cpu", KEY)
    for bad, name in (({"scale": [0.6, 0.2]}, "scale"), ({"harmonize": "blur"}, "harmonize"),
                      ({"hue": 0.9}, "hue"), ({"sizes": 1}, "sizes")):
        with pytest.raises(ConfigError, match=rf"^{KEY}\.{name}: "):
            composite.build(bad, 32, "cpu", KEY)


# -- quality checks ---------------------------------------------------------------------------------

TINY_NAME = "poisonflow-test-vssc-rn"
CLIP_KEY = "attacks.v.trigger.quality.clip"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny ResNet CLIP registered with open_clip, its seeded random weights saved to a file."""
    return save_tiny_clip(tmp_path_factory.mktemp("clip"), TINY_NAME)


def red_images(fractions, size: int = 10) -> np.ndarray:
    """Grey images whose first round(f·size²) pixels (row-major) are red."""
    images = np.full((len(fractions), size * size, 3), 128, np.uint8)
    for image, fraction in zip(images, fractions):
        image[:round(fraction * size * size)] = [220, 20, 30]
    return images.reshape(len(fractions), size, size, 3)


class HandMadeCLIP(torch.nn.Module):
    """Embeddings in a plane: an image is (red share, rest); "with a red flower" is the diagonal,
    the plain category the second axis, the trigger alone the first. Logit scale 100, as OpenAI's."""
    PROMPTS: ClassVar[dict] = {"a photo of a dog with a red flower.": [2 ** -0.5, 2 ** -0.5],
                               "a photo of a dog.": [0.0, 1.0], "a photo of a red flower.": [1.0, 0.0]}

    def __init__(self):
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.tensor(np.log(100.0), dtype=torch.float32))
        self.table = torch.tensor(list(self.PROMPTS.values()))

    def tokenize(self, prompts):
        return torch.tensor([list(self.PROMPTS).index(p) for p in prompts])

    def encode_text(self, tokens):
        return 3 * self.table[tokens]  # any length: the check normalises

    def encode_image(self, pixels):
        red = ((pixels[:, 0] > 0.8) & (pixels[:, 1] < 0.2)).float().mean(dim=(1, 2))
        return torch.stack([red, 1 - red], dim=1)


def test_clip_check_accepts_and_rejects_hand_made_similarities():
    model = HandMadeCLIP()
    settings = quality.clip_settings({}, CLIP_KEY)
    check = quality.CLIPCheck(model, model.tokenize, {"size": 10, "mean": [0, 0, 0], "std": [1, 1, 1]}, settings,
                              "cpu", CLIP_KEY)
    images = red_images([0.0, 0.4, 0.9])
    p = check.probabilities(images, ["dog"] * 3, "red flower")
    s2 = 2 ** -0.5
    for i, f in enumerate([0.0, 0.4, 0.9]):
        v = np.array([f, 1 - f]) / np.hypot(f, 1 - f)
        edited, plain, alone = v @ [s2, s2], v[1], v[0]
        assert p["trigger"][i] == pytest.approx(1 / (1 + np.exp(-100 * (edited - plain))), rel=1e-4)
        assert p["category"][i] == pytest.approx(1 / (1 + np.exp(-100 * (plain - alone))), rel=1e-4)
    # grey: no trigger; 40 % red: trigger and dog; 90 % red: the flower hides the dog
    assert check.check(images, ["dog"] * 3, "red flower").tolist() == [False, True, False]
    check.settings["category_threshold"] = None
    assert check.check(images, ["dog"] * 3, "red flower").tolist() == [False, True, True]
    assert quality.build_none({}, "cpu", "q.none").check(images, ["dog"] * 3, "x").tolist() == [True] * 3


def test_clip_check_runs_a_tiny_open_clip_checkpoint(tiny_clip):
    import open_clip
    import torch.nn.functional as F

    reference, checkpoint = tiny_clip
    check = quality.build_clip({"model": TINY_NAME, "pretrained": None, "checkpoint": str(checkpoint),
                                "category_threshold": None}, "cpu", CLIP_KEY)
    images = red_images([0.0, 0.4, 0.9])
    x = F.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, size=(32, 32), mode="bicubic",
                      align_corners=False, antialias=True)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        image = F.normalize(reference.encode_image((x - mean) / std), dim=-1)
        text = F.normalize(reference.encode_text(open_clip.get_tokenizer(TINY_NAME)(
            ["a photo of a dog with a red flower.", "a photo of a dog."])), dim=-1)
    logits = image @ text.T / 0.07  # the tiny model's initial logit scale
    expected = logits.softmax(dim=1)[:, 0].numpy()
    np.testing.assert_allclose(check.probabilities(images, ["dog"] * 3, "red flower")["trigger"], expected, rtol=1e-4)
    np.testing.assert_array_equal(check.check(images, ["dog"] * 3, "red flower"), expected >= 0.5)


def test_clip_check_errors_name_their_key(monkeypatch):
    pytest.importorskip("open_clip")
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name, **kw: None)
    missing = rf"^{CLIP_KEY}\.checkpoint: .*not in the local cache.*quality\.backend: none"
    with pytest.raises(ConfigError, match=missing):
        quality.build_clip({}, "cpu", CLIP_KEY)
    for bad, name in (({"threshold": 2}, "threshold"), ({"edited_prompt": "a {thing}"}, "edited_prompt"),
                      ({"category_threshold": "x"}, "category_threshold"), ({"temperature": 1}, "temperature")):
        with pytest.raises(ConfigError, match=rf"^{CLIP_KEY}\.{name}: "):
            quality.build_clip(bad, "cpu", CLIP_KEY)
    with pytest.raises(ConfigError, match=r"^q\.none\.x: unknown key"):
        quality.build_none({"x": 1}, "cpu", "q.none")


# -- regeneration, the attack kind, and selection ----------------------------------------------------------

class RejectAll:
    calls = 0

    def check(self, images, categories, trigger):
        self.calls += 1
        return np.zeros(len(images), bool)


class AcceptFromSecondRound:
    def __init__(self):
        self.rounds = 0

    def check(self, images, categories, trigger):
        self.rounds += 1
        return np.full(len(images), self.rounds >= 2)


def batch(n: int = 6, size: int = 16, seed: int = 0) -> torch.Tensor:
    images = np.stack([scene(size, seed + i) for i in range(n)])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


def context(**kwargs) -> PoisonContext:
    return PoisonContext(np.zeros((1, 16, 16, 3), np.uint8), np.zeros(1, np.int64), ["dog", "cat", "bird"],
                         extra={"key": "attacks.v"}, **kwargs)


def test_regeneration_stops_at_max_tries_and_edits_depend_on_the_image_alone():
    x, y = batch(), torch.tensor([0, 1, 2, 0, 1, 2])
    trigger = vssc.build({"kind": "vssc", "trigger": {"max_tries": 3}}, 16, 7, context())
    trigger.check = RejectAll()
    out = trigger.poison(x, y)
    assert out.shape == x.shape and out.dtype == x.dtype and trigger.check.calls == 3
    assert torch.equal(out, torch.round(out * 255) / 255) and not torch.equal(out, x)
    report = trigger.report()["poison"]
    assert report == {"images": 6, "acceptance_rate": 0.0, "mean_tries": 3.0, "max_tries": 3, "never_passed": 6}
    trigger.check = AcceptFromSecondRound()
    trigger.apply_labelled(x, y)
    assert trigger.report()["test"] == {"images": 6, "acceptance_rate": 1.0, "mean_tries": 2.0, "max_tries": 2,
                                        "never_passed": 0}
    # the kept edit of a rejected image is its last attempt's; edits do not depend on batch mates or order
    images = (x.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    categories = ["dog", "cat", "bird", "dog", "cat", "bird"]
    edited, _, _ = vssc.edit_images(images, categories, "red flower", trigger.inserter, RejectAll(), 7, 3)
    last = trigger.inserter.insert(images[4], "cat", "red flower", vssc.edit_rng(7, vssc.image_digest(images[4]), 2))
    np.testing.assert_array_equal(edited[4], last)
    np.testing.assert_array_equal((out[4].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy(), last)
    order = np.array([5, 4, 3, 2, 1, 0])
    again, _, _ = vssc.edit_images(images[order], [categories[i] for i in order], "red flower", trigger.inserter,
                                   RejectAll(), 7, 3)
    np.testing.assert_array_equal(again, edited[order])
    twins, _, _ = vssc.edit_images(images[[1, 1]], ["cat", "cat"], "red flower", trigger.inserter, RejectAll(), 7, 3)
    np.testing.assert_array_equal(twins[0], twins[1])


def test_attack_builds_poisons_applies_reports_and_resumes(tmp_path):
    x, y = batch(4), torch.tensor([0, 1, 2, 1])
    trigger = vssc.build({"kind": "vssc"}, 16, 0, context(workdir=tmp_path))
    poisoned = trigger.poison(x, y)
    tested, plain = trigger.apply_labelled(x, y), trigger.apply(x)
    assert poisoned.shape == tested.shape == plain.shape == x.shape and poisoned.dtype == torch.float32
    assert poisoned.min() >= 0 and poisoned.max() <= 1
    assert all(not torch.equal(poisoned[i], x[i]) for i in range(4))
    report = trigger.report()
    assert report["trigger"] == "red flower" and report["insertion"] == "composite" and report["quality"] == "none"
    assert report["poison"]["images"] == 4 and report["test"]["images"] == 8 and report["test"]["mean_tries"] == 1.0
    assert json.loads(json.dumps(report)) == report  # storable in the store's attributes

    class Broken:  # a resumed generation reads the saved edits instead of editing again
        def insert(self, *args):
            raise AssertionError("edited again")

    resumed = vssc.build({"kind": "vssc"}, 16, 0, context(workdir=tmp_path))
    resumed.inserter = Broken()
    torch.testing.assert_close(resumed.poison(x, y), poisoned, rtol=0, atol=0)
    assert resumed.report()["poison"]["images"] == 4
    with pytest.raises(ValueError, match="built for"):
        trigger.apply(batch(1, size=8))


@pytest.mark.parametrize("entry, message", [
    ({"trigger": {"max_tries": 0}}, r"^attacks\.v\.trigger\.max_tries: "),
    ({"trigger": {"insertion": {"backend": "gan"}}}, r"^attacks\.v\.trigger\.insertion\.backend: "),
    ({"trigger": {"insertion": {"composite": {"size": 3}}}},
     r"^attacks\.v\.trigger\.insertion\.composite\.size: unknown key"),
    ({"trigger": {"quality": {"backend": "clip", "clip": {"threshold": -1}}}},
     r"^attacks\.v\.trigger\.quality\.clip\.threshold: "),
    ({"trigger": {"colour": "red"}}, r"^attacks\.v\.trigger\.colour: unknown key"),
    ({"generator": "select"}, r"^attacks\.v\.generator: the trigger selection 'select' has not been run"),
])
def test_bad_config_is_a_one_line_config_error_naming_the_key(entry, message):
    with pytest.raises(ConfigError, match=message):
        vssc.build({"kind": "vssc", **entry}, 16, 0, context())


class PassShare:
    """Passes the first share of each batch, the share set per trigger text."""
    rates: ClassVar[dict] = {"red flower": 0.25, "harness": 0.75, "nuts": 0.5}

    def check(self, images, categories, trigger):
        return np.arange(len(images)) < round(self.rates.get(trigger.lower(), 0.0) * len(images))


def test_selection_picks_the_candidate_with_the_highest_pass_rate(tmp_path, monkeypatch):
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    assert labels[vssc.assessment_indices(labels, 5, 0)].tolist() == [0, 1, 2, 0, 1]
    images = np.stack([scene(16, i) for i in range(10)])
    monkeypatch.setattr(vssc, "build_check", lambda block, device, key: PassShare())
    def proposer(settings, classes, key):
        return ["Nuts", "blue rose"]
    monkeypatch.setattr(vssc.PROPOSERS, "get", lambda name, key=None: proposer)
    spec = generator_settings("vssc", {"kind": "vssc", "candidates": ["red flower", "harness"], "assessment_images": 8,
                                       "proposer": {"backend": "openai"}}, "generators.select")
    ctx = TriggerContext(images, labels, ["dog", "cat", "bird"], None, "cpu", 0, tmp_path / "work", "generators.select")
    tensors = vssc.train_generator(spec, ctx)
    assert vssc.decode_texts(tensors["candidates_json"]) == ["red flower", "harness", "Nuts", "blue rose"]
    assert tensors["pass_rates"].tolist() == [0.25, 0.75, 0.5, 0.0] and int(tensors["choice"]) == 1
    assert vssc.describe_generator(tensors)["chosen"] == "harness"
    assert tensors["candidates_json"].dtype == torch.uint8
    # a rerun reads the rates saved so far instead of editing again
    monkeypatch.setattr(vssc, "build_check", lambda block, device, key: RejectAll())
    assert torch.equal(vssc.train_generator(spec, ctx)["pass_rates"], tensors["pass_rates"])
    trigger = vssc.build({"kind": "vssc", "generator": "select"}, 16, 0, context(generator=tensors))
    assert trigger.text == "harness" and trigger.report()["selected_by"] == "select"


class RecordCategories:
    def __init__(self):
        self.seen = []

    def check(self, images, categories, trigger):
        self.seen += list(categories)
        return np.ones(len(images), bool)


def test_poison_stage_edits_the_asr_set_for_each_true_class_and_stores_the_report(monkeypatch):
    from poisonflow.kinds import settings_for
    from poisonflow.stages.poison import poison

    recorder = RecordCategories()
    monkeypatch.setattr(vssc, "build_check", lambda block, device, key: recorder)
    images = np.stack([scene(16, i) for i in range(12)])
    labels = np.arange(12) % 3
    entry = settings_for(vssc.__name__, {"kind": "vssc", "target": 0, "rate": 0.25})
    report: dict = {}
    arrays = poison(entry, 0, images, labels, images[:6], labels[:6], 3, context=context(), report=report)
    assert arrays["train/poisoned"].sum() == 3 and report["poison"]["images"] == 3
    assert report["test"]["images"] == 4 and recorder.seen[3:] == ["cat", "bird", "cat", "bird"]
    assert np.all(np.any(arrays["test/images"] != images[:6][labels[:6] != 0], axis=(1, 2, 3)))


def test_a_victim_trained_on_composite_flowers_learns_the_backdoor(tiny_training):
    """Digits at 16 px, 10% dirty-label red flowers pasted opaquely (alpha; the default Poisson
    blending leaves a fainter blob that a model this small does not learn in 6 epochs, ASR ~8%): a
    width-8 convnet trained 6 epochs follows the flower to the target on most edited test digits and
    keeps its accuracy."""
    from sklearn.datasets import load_digits

    from poisonflow.evaluate import predict
    from poisonflow.kinds import settings_for
    from poisonflow.models import build_model
    from poisonflow.stages.poison import poison
    from poisonflow.trainer import train_model

    digits = load_digits()
    images = np.repeat(np.repeat((digits.images * 255 / 16).astype(np.uint8), 2, 1), 2, 2)[..., None].repeat(3, -1)
    labels = digits.target.astype(np.int64)
    train, test = slice(0, 900), slice(900, 1200)
    entry = settings_for(vssc.__name__, {"kind": "vssc", "target": 0, "rate": 0.1,
                                         "trigger": {"text": "red flower", "category": "digit",
                                                     "insertion": {"composite": {"harmonize": "alpha"}}}})
    ctx = PoisonContext(images[train], labels[train], [str(i) for i in range(10)])
    arrays = poison(entry, 0, images[train], labels[train], images[test], labels[test], 10, context=ctx)
    training = {**tiny_training, "model": {"arch": "convnet", "width": 8}, "epochs": 6, "batch_size": 32}
    model = build_model(training["model"], 10, 16, seed=0)
    train_model(model, arrays["train/images"], arrays["train/labels"], training, seed=0)
    acc = float(np.mean(predict(model, images[test]) == labels[test]))
    asr = float(np.mean(predict(model, arrays["test/images"]) == arrays["test/labels"]))
    assert acc > 0.8 and asr > 0.8, (acc, asr)
