"""The contract every registered kind keeps, run over the registries (no hand-kept list of kinds).

For each kind: its fragment is a valid JSON Schema and its defaults satisfy it; it runs on a tiny
input (with the overrides of the fragment's ``tiny:``); the same seed gives the same output; and
the bounds it declares hold (``checks.linf``: ‖δ‖∞ ≤ ε; ``checks.changed_pixels``; clean-label
poisoning keeps every label, dirty-label relabels exactly the poisoned samples to the target).
"""

from __future__ import annotations

import copy

import jsonschema
import numpy as np
import pytest
import torch

from poisonflow import kinds
from poisonflow.attacks import PoisonContext
from poisonflow.config import lookup
from poisonflow.defenses import DefenseContext
from poisonflow.errors import PoisonflowError
from poisonflow.models import build_model
from poisonflow.stages.poison import poison, protect

SIZE, CLASSES, N = 16, 4, 40
TINY_MODEL = {"arch": "convnet", "width": 4}
TINY_TRAINING = {"model": TINY_MODEL, "epochs": 1, "batch_size": 16, "augment": ["flip"],
                 "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}, "schedule": {"name": "constant"}}


def by_role(*roles: str) -> list:
    return [pytest.param(f, id=f"{f.role.name}-{f.kind}") for f in kinds.fragments() if f.role.name in roles]


def merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def tiny_entry(fragment: kinds.Fragment, **extra) -> dict:
    return merge({fragment.role.discriminator: fragment.kind, **extra}, fragment.tiny)


def tiny_images(n: int = N, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class-dependent colour blocks with noise: learnable, and no pixel at 0 or 255."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % CLASSES
    base = np.array([[60, 60, 180], [180, 60, 60], [60, 180, 60], [150, 150, 60]])[labels]
    images = base[:, None, None, :] + rng.integers(-40, 40, (n, SIZE, SIZE, 3))
    return images.clip(10, 245).astype(np.uint8), labels.astype(np.int64)


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(TINY_MODEL, CLASSES, SIZE).eval()


@pytest.mark.parametrize("fragment", by_role("backdoor", "unlearnable", "defense", "source"))
def test_fragment_is_a_valid_schema_whose_defaults_satisfy_it(fragment):
    schema = kinds.kind_schema(fragment.module)
    jsonschema.Draft202012Validator.check_schema(schema)
    defaults = kinds.defaults_of(fragment.module)
    errors = [e for e in jsonschema.Draft202012Validator(schema).iter_errors(defaults) if e.validator != "required"]
    assert not errors, errors[0].message
    assert kinds.settings_for(fragment.module, fragment.tiny)  # the tiny overrides are valid settings too
    assert fragment.summary and fragment.module.rsplit(".", 1)[-1] == fragment.path.stem


def trained_generator(fragment, tmp_path) -> dict | None:
    """The kind's generator trained on the tiny set with its fragment's ``generator.tiny`` settings."""
    if not fragment.generator:
        return None
    from poisonflow.stages.trigger import TriggerContext

    images, labels = tiny_images()
    spec = kinds.generator_settings(fragment.kind, merge({"kind": fragment.kind}, fragment.generator.get("tiny", {})))
    context = TriggerContext(images, labels, [f"c{i}" for i in range(CLASSES)], tiny_model(), "cpu",
                             int(spec["seed"]), tmp_path / "work", f"generators.{fragment.kind}")
    return kinds.ATTACKS.get(fragment.kind).train_generator(spec, context)


def backdoor_arrays(fragment, label_mode: str, seed: int, generator=None):
    images, labels = tiny_images()
    test_images, test_labels = tiny_images(12, seed=5)
    entry = kinds.settings_for(fragment.module, tiny_entry(fragment, label_mode=label_mode, target=1, rate=0.5))
    context = PoisonContext(images, labels, [f"c{i}" for i in range(CLASSES)], surrogate=tiny_model(),
                            generator=generator)
    return entry, poison(entry, seed, images, labels, test_images, test_labels, CLASSES, context=context)


@pytest.mark.parametrize("fragment", by_role("backdoor"))
@pytest.mark.parametrize("label_mode", ["clean", "dirty"])
def test_backdoor_runs_is_deterministic_and_keeps_its_bounds(fragment, label_mode, tmp_path):
    generator = trained_generator(fragment, tmp_path / "a")
    if generator is not None:  # a learned trigger: training it twice gives the same tensors
        again_generator = trained_generator(fragment, tmp_path / "b")
        assert generator.keys() == again_generator.keys()
        for name in generator:
            torch.testing.assert_close(generator[name], again_generator[name], msg=name)
    entry, arrays = backdoor_arrays(fragment, label_mode, seed=3, generator=generator)
    _, again = backdoor_arrays(fragment, label_mode, seed=3, generator=generator)
    for name, array in arrays.items():
        np.testing.assert_array_equal(array, again[name], err_msg=name)
    images, labels = tiny_images()
    poisoned = arrays["train/poisoned"]
    assert poisoned.sum() >= 1 and np.array_equal(arrays["train/true_labels"], labels)
    changed = np.any(arrays["train/images"] != images, axis=(1, 2, 3))
    cover, noise = arrays["train/cover"], arrays["train/noise_mode"]
    assert changed[poisoned].all() and not changed[~poisoned & ~noise & ~cover].any()
    assert not (poisoned & cover).any() and not (cover & noise).any()
    if "cover" in fragment.capabilities:  # cover samples: the training trigger, their own labels
        assert cover.sum() == round(entry["cover_rate"] * len(labels)) and changed[cover].all()
        np.testing.assert_array_equal(arrays["train/labels"][cover], labels[cover])
    if label_mode == "clean":
        assert np.array_equal(arrays["train/labels"], labels) and (labels[poisoned] == 1).all()
    else:
        assert (arrays["train/labels"][poisoned] == 1).all() and (labels[poisoned] != 1).all()
        assert np.array_equal(arrays["train/labels"][~poisoned], labels[~poisoned])
    test_images, test_labels = tiny_images(12, seed=5)
    assert (arrays["test/labels"] == 1).all() and (arrays["test/true_labels"] != 1).all()
    triggered = arrays["test/images"].astype(int) - test_images[test_labels != 1].astype(int)
    assert np.abs(triggered).max() > 0
    if "linf" in fragment.checks:  # the trigger is a perturbation of bounded size
        assert np.abs(triggered).max() <= lookup(entry, fragment.checks["linf"]) * 255 + 0.5


def protected_arrays(fragment, seed: int):
    images, labels = tiny_images()
    entry = kinds.settings_for(fragment.module, tiny_entry(fragment))
    context = PoisonContext(images, labels, [f"c{i}" for i in range(CLASSES)], surrogate=tiny_model())
    return entry, protect(entry, seed, images, labels, context)


@pytest.mark.parametrize("fragment", by_role("unlearnable"))
def test_unlearnable_kind_runs_is_deterministic_and_keeps_its_bounds(fragment):
    entry, arrays = protected_arrays(fragment, seed=3)
    _, again = protected_arrays(fragment, seed=3)
    np.testing.assert_array_equal(arrays["train/images"], again["train/images"])
    images, labels = tiny_images()
    assert np.array_equal(arrays["train/labels"], labels)  # unlearnable examples keep their labels
    delta = arrays["train/images"].astype(int) - images.astype(int)
    if fragment.kind != "none":
        assert np.abs(delta).max() > 0
    if "linf" in fragment.checks:
        assert np.abs(delta).max() <= lookup(entry, fragment.checks["linf"]) * 255 + 0.5
    if "changed_pixels" in fragment.checks:
        changed = np.any(delta != 0, axis=3).reshape(len(images), -1).sum(axis=1)
        assert changed.max() <= lookup(entry, fragment.checks["changed_pixels"])


def defense_result(fragment, tmp_path, seed: int):
    images, labels = tiny_images()
    reserve_images, reserve_labels = tiny_images(16, seed=7)
    screen, _ = tiny_images(12, seed=9)

    def fresh():
        return build_model(TINY_MODEL, CLASSES, SIZE, seed=seed)

    context = DefenseContext(
        train_images=images, train_labels=labels, reserve_images=reserve_images, reserve_labels=reserve_labels,
        training=TINY_TRAINING, build_model=fresh, victim=tiny_model(), seed=seed, device=torch.device("cpu"),
        workdir=tmp_path / f"work{seed}", num_classes=CLASSES, screen_images=screen)
    spec = tiny_entry(fragment)
    if "features" in fragment.properties:  # what the features job hands it: features and a SimCLR backbone
        from poisonflow.modelio import model_spec, save_model

        context.features = np.random.default_rng(seed).normal(size=(len(labels), 8)).astype(np.float32)
        context.features_dir = tmp_path / f"features{seed}"
        context.features_dir.mkdir(parents=True, exist_ok=True)
        save_model(build_model(TINY_MODEL, CLASSES, SIZE, seed=seed), context.features_dir / "backbone.pt",
                   model_spec(TINY_MODEL, CLASSES, SIZE))
        spec = {**spec, "features": "f"}
    if "splitter" in fragment.properties:  # what the split job of its splitter hands it
        from poisonflow.defenses import SplitResult

        context.split = SplitResult(kept=np.arange(len(labels)) % 4 != 0)
        spec = {**spec, "splitter": "s"}
    return kinds.DEFENSES.get(fragment.kind).run(spec, context), images


@pytest.mark.parametrize("fragment", by_role("defense"))
def test_defense_runs_and_is_deterministic(fragment, tmp_path):
    result, images = defense_result(fragment, tmp_path / "a", seed=2)
    again, _ = defense_result(fragment, tmp_path / "b", seed=2)
    x = torch.from_numpy(images[:8]).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        logits, repeat = result.model.eval()(x), again.model.eval()(x)
    assert logits.shape == (8, CLASSES)
    torch.testing.assert_close(logits, repeat)
    for name in ("kept", "input_scores", "input_flags"):
        first, second = getattr(result, name), getattr(again, name)
        assert (first is None) == (second is None), name
        if first is not None:
            np.testing.assert_array_equal(first, second, err_msg=name)


@pytest.mark.parametrize("fragment", by_role("source"))
def test_source_loads_a_tiny_set_or_names_its_missing_root(fragment, tmp_path):
    module = kinds.SOURCES.get(fragment.kind)
    if not fragment.tiny:  # sources read from files: without them, one line naming the root
        spec = kinds.settings_for(fragment.module, {"root": str(tmp_path / "missing")})
        with pytest.raises(PoisonflowError, match=r"root") as error:
            module.load(spec, key=f"datasets.{fragment.kind}")
        assert "\n" not in str(error.value)
        return
    spec = kinds.settings_for(fragment.module, fragment.tiny)
    first, second = module.load(spec), module.load(spec)
    side = spec["image_size"]
    assert first.train_images.shape[1:] == (side, side, 3) and first.train_images.dtype == np.uint8
    assert len(first.train_labels) == spec["train_size"] and len(first.test_labels) == spec["test_size"]
    np.testing.assert_array_equal(first.train_images, second.train_images)
    described = module.describe(spec)
    assert described["train_counts"] == np.bincount(first.train_labels, minlength=len(first.classes)).tolist()


def test_generated_kind_docs_are_up_to_date():
    from pathlib import Path

    from poisonflow import kinddocs

    assert kinddocs.main(["--check", "--root", str(Path(__file__).resolve().parents[2])]) == 0, \
        "docs/kinds.md or README.md's kinds table is stale: run python -m poisonflow.kinddocs"


NEW_KIND_MODULE = '''
import torch
from ..kinds import settings_for


class Shift:
    def __init__(self, amount):
        self.amount = amount

    def apply(self, x):
        return (x + self.amount).clamp(0, 1)


def build(spec, image_size, seed, context=None):
    return Shift(settings_for(__name__, spec)["trigger"]["amount"])
'''
NEW_KIND_FRAGMENT = '''
kind: shift
role: backdoor
summary: every pixel raised by a constant
properties:
  trigger:
    type: object
    additionalProperties: false
    default: {}
    properties:
      amount: {type: number, exclusiveMinimum: 0, maximum: 1, default: 0.25}
'''
NEW_KIND_SCRIPT = '''
import torch
from poisonflow import config
from poisonflow.attacks import ATTACKS
raw = {"datasets": {"d": {"source": "digits"}}, "models": {"m": {"arch": "convnet"}},
       "trainings": {"t": {"model": "m"}}, "attacks": {"a": {"kind": "shift"}}, "defenses": {"n": {"kind": "none"}},
       "experiments": [{"dataset": ["d"], "attack": ["a"], "training": ["t"], "defense": ["n"], "seed": [0]}]}
entry = config.load(raw).attack("a")
print(entry["trigger"]["amount"], float(ATTACKS.get("shift").build(entry, 4, 0).apply(torch.zeros(1, 3, 4, 4)).max()))
try:
    config.load({**raw, "attacks": {"a": {"kind": "shift", "trigger": {"amount": 2}}}})
except Exception as error:
    print(error)
'''


def test_a_new_kind_is_two_files(tmp_path):
    """A copy of the package plus a module and its fragment: the kind is registered, validated with
    its defaults and built, with no other file touched."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    package = Path(kinds.__file__).resolve().parent
    shutil.copytree(package, tmp_path / "poisonflow", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "poisonflow" / "attacks" / "shift.py").write_text(NEW_KIND_MODULE)
    (tmp_path / "poisonflow" / "attacks" / "shift.yaml").write_text(NEW_KIND_FRAGMENT)
    result = subprocess.run([sys.executable, "-c", NEW_KIND_SCRIPT], capture_output=True, text=True, cwd=tmp_path,
                            env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["0.25 0.25", "attacks.a.trigger.amount: 2 is greater than the maximum of 1"]
