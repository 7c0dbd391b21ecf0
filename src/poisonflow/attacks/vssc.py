"""VSSC: a visible, semantic, sample-specific and compatible trigger ("Robust Backdoor Attack with
Visible, Semantic, Sample-Specific and Compatible Triggers", sections 4.2 and 5.1).

A text trigger ("red flower") is edited into each poisoned image by an insertion backend; a quality
check decides whether the edited image shows both its category's object and the trigger; an
image that fails is edited again with new random editing arguments. The poisoned samples are then
relabelled by the poison stage (dirty-label by default, target 0 and rates 5 % / 10 % in the paper;
the project's common defaults, target 0 and rate 0.1, apply). At inference the attacker edits the
test images the same way.

The three parts are backends of :mod:`poisonflow.vssc`, chosen by the ``trigger:`` block:

- ``insertion.backend``: ``composite`` (default; :mod:`poisonflow.vssc.composite`, a drawn or user
  object pasted with per-image placement and Poisson blending on the CPU, not the paper's
  editor) or ``diffusion`` (:mod:`poisonflow.vssc.diffusion`, text-guided editing with local
  Stable Diffusion weights, the paper's kind of editor). Each backend's keys go in the block of
  its name (``insertion.composite: {...}``) and are checked by it.
- ``quality.backend``: ``none`` (default: every edit passes), ``clip`` (:mod:`poisonflow.vssc.quality`,
  zero-shot CLIP) or ``owlvit`` (:mod:`poisonflow.vssc.owlvit`, open-vocabulary detection, the
  closest to the paper's dense captioner). ``none`` is the default because the others need
  pretrained weights that are not shipped.
- ``text`` ("red flower", the paper's first ImageNet-Dogs trigger), or the text chosen by a
  ``generators:`` entry of this kind named by ``generator:`` (the selection below).
- ``category`` (null): the general category written into prompts and checks ("dog", "food");
  null uses each image's class name (``context.classes``). :meth:`VSSCTrigger.apply`, which has no
  labels, uses the word "object" when it is null.

Editing (:func:`edit_images`): the edit of attempt a of an image x draws every random argument
from ``numpy.random.default_rng([seed, d(x), a])``, where d(x) is the first 8 bytes of the SHA-256
of x's uint8 pixels: the edit is sample-specific, the same image always gets the same edit, and
it does not depend on the chunk or the order in which images arrive. Attempts run in rounds (all
images once, the check on the whole batch, the failures again …) so that a model-based check
sees batches. The paper regenerates until an edit passes; ``max_tries`` (5) is this project's
bound: an image whose ``max_tries`` edits all fail keeps its last edit and is counted in
``never_passed`` of :meth:`VSSCTrigger.report`.

Poisoning (:meth:`VSSCTrigger.poison`, training samples with their true labels), the labelled ASR
set (:meth:`VSSCTrigger.apply_labelled`) and :meth:`VSSCTrigger.apply` share this editing;
:meth:`VSSCTrigger.report` gives, per use (``poison``, ``test``), the images edited, the share that
passed the check, mean and largest number of tries, and the images that never passed, with the
trigger text and backends. Where the context has a work folder, each group of
:data:`GROUP` edited images is saved there, so a killed generation resumes without editing them again.

Trigger selection (the ``generator:`` part, :func:`train_generator`, run by the trigger stage):
the candidates are the entry's ``candidates`` (default: the four triggers the paper ended with,
"red flower", "harness", "nuts", "strawberry") followed by what a ``proposer`` backend
(:mod:`poisonflow.vssc.proposer`, a language model asked with the paper's selection criteria)
returns for the class names, duplicates removed. Each candidate is edited once into the same
``assessment_images`` (20, a project choice: the paper does not give the size of its assessment
set) training images, taken class by class in turn from a seeded shuffle of each class; the
candidate with the highest quality-check pass rate is chosen (the first one on a tie). The
trigger stage stores ``pass_rates``, ``choice`` and the candidate texts (``candidates_json``, UTF-8
JSON as uint8); :func:`describe_generator` turns them into a readable dict.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import triggers
from ..errors import ConfigError
from ..kinds import settings_for
from ..vssc import CHECKS, INSERTERS, PROPOSERS
from . import PoisonContext

GROUP = 64  # images edited together (one batch per check round) and saved as one piece of work
UNLABELLED_CATEGORY = "object"  # the category of apply(x) when none is configured
EDITS_FOLDER = "vssc-edits"
SELECTION_FILE = "selection.json"


# -- editing ------------------------------------------------------------------------------------------

def image_digest(image: np.ndarray) -> int:
    """The first 8 bytes of the SHA-256 of an image's uint8 pixels, as an integer."""
    return int.from_bytes(hashlib.sha256(np.ascontiguousarray(image).tobytes()).digest()[:8], "little")


def edit_rng(seed: int, digest: int, attempt: int) -> np.random.Generator:
    return np.random.default_rng([seed, digest, attempt])


def edit_images(images: np.ndarray, categories: list[str], trigger: str, inserter, check, seed: int,
                max_tries: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Insert ``trigger`` into each uint8 (N, H, W, 3) image, regenerating the ones the check
    rejects, at most ``max_tries`` edits each. Returns (edited images, tries per image, passed)."""
    edited = np.array(images, dtype=np.uint8, copy=True)
    tries = np.zeros(len(images), dtype=np.int64)
    passed = np.zeros(len(images), dtype=bool)
    digests = [image_digest(image) for image in images]
    pending = np.arange(len(images))
    for attempt in range(max_tries):
        if not len(pending):
            break
        for i in pending:
            out = np.asarray(inserter.insert(images[i], categories[i], trigger, edit_rng(seed, digests[i], attempt)))
            if out.shape != images[i].shape or out.dtype != np.uint8:
                raise ValueError(f"vssc: the insertion backend returned {out.shape} {out.dtype}, "
                                 f"expected {images[i].shape} uint8")
            edited[i] = out
        tries[pending] += 1
        ok = np.asarray(check.check(edited[pending], [categories[i] for i in pending], trigger), dtype=bool)
        if ok.shape != pending.shape:
            raise ValueError(f"vssc: the quality check returned {ok.shape} answers for {len(pending)} images")
        passed[pending[ok]] = True
        pending = pending[~ok]
    return edited, tries, passed


@dataclass
class EditStats:
    """Counts of one use of the trigger (training poisons or test images)."""
    images: int = 0
    passed: int = 0
    tries: int = 0
    most_tries: int = 0

    def add(self, tries: np.ndarray, passed: np.ndarray) -> None:
        self.images += len(tries)
        self.passed += int(passed.sum())
        self.tries += int(tries.sum())
        self.most_tries = max(self.most_tries, int(tries.max(initial=0)))

    def summary(self) -> dict:
        return {"images": self.images, "acceptance_rate": self.passed / self.images if self.images else None,
                "mean_tries": self.tries / self.images if self.images else None, "max_tries": self.most_tries,
                "never_passed": self.images - self.passed}


def as_uint8(x: torch.Tensor) -> np.ndarray:
    return x.detach().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def load_piece(path: Path, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """A saved group of edits, or None when there is none (or it does not read back whole)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            piece = data["images"], data["tries"], data["passed"]
    except (OSError, ValueError, KeyError):
        return None
    return piece if len(piece[0]) == count else None


def save_piece(path: Path, edited: np.ndarray, tries: np.ndarray, passed: np.ndarray) -> None:
    from ..checkpoint import atomic_write

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, images=edited, tries=tries, passed=passed)
    atomic_write(path, write)


@dataclass
class VSSCTrigger:
    inserter: object  # poisonflow.vssc.Inserter
    check: object  # poisonflow.vssc.QualityCheck
    text: str
    category: str | None
    classes: list[str]
    max_tries: int
    seed: int
    image_size: int
    backends: dict  # {"insertion": name, "quality": name}
    key: str
    fingerprint: str  # digest of everything an edit depends on besides the image (names saved work)
    workdir: Path | None = None
    selected_by: str | None = None
    stats: dict = field(default_factory=lambda: {"poison": EditStats(), "test": EditStats()})

    def categories(self, y: torch.Tensor) -> list[str]:
        if self.category is not None:
            return [self.category] * len(y)
        labels = [int(label) for label in y]
        if any(not 0 <= label < len(self.classes) for label in labels):
            raise ConfigError(f"{self.key}.trigger.category: the class names of labels {sorted(set(labels))} are "
                              f"unknown here ({len(self.classes)} given); set a category")
        return [str(self.classes[label]) for label in labels]

    def edit(self, x: torch.Tensor, categories: list[str], use: str) -> torch.Tensor:
        triggers.check_image_size(x, self.image_size, "vssc")
        images = as_uint8(x)
        out = np.empty_like(images)
        for start in range(0, len(images), GROUP):
            part = slice(start, start + GROUP)
            edited, tries, passed = self.edit_group(images[part], categories[part])
            out[part] = edited
            self.stats[use].add(tries, passed)
        return torch.from_numpy(out).permute(0, 3, 1, 2).to(x.device, x.dtype) / 255

    def edit_group(self, images: np.ndarray, categories: list[str]):
        path = None
        if self.workdir is not None:
            digest = hashlib.sha256(self.fingerprint.encode())
            digest.update(json.dumps(categories).encode())
            digest.update(np.ascontiguousarray(images).tobytes())
            path = Path(self.workdir) / EDITS_FOLDER / f"{digest.hexdigest()[:32]}.npz"
            saved = load_piece(path, len(images))
            if saved is not None:
                return saved
        piece = edit_images(images, categories, self.text, self.inserter, self.check, self.seed, self.max_tries)
        if path is not None:
            save_piece(path, *piece)
        return piece

    def poison(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The poisoned training images: each edited with its own class (or ``category``)."""
        return self.edit(x, self.categories(y), "poison")

    def apply_labelled(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Test images edited at inference time, their true labels naming the category."""
        return self.edit(x, self.categories(y), "test")

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Images edited without labels: ``category``, or the word "object" when it is null."""
        return self.edit(x, [self.category or UNLABELLED_CATEGORY] * len(x), "test")

    def report(self) -> dict:
        return {"trigger": self.text, "selected_by": self.selected_by, "category": self.category,
                "insertion": self.backends["insertion"], "quality": self.backends["quality"],
                "max_tries": self.max_tries, **{use: stats.summary() for use, stats in self.stats.items()}}


# -- building the backends ------------------------------------------------------------------------------

def build_inserter(block: dict, image_size: int, device, key: str):
    name = block["backend"]
    return INSERTERS.get(name, key=f"{key}.backend")(block.get(name) or {}, image_size, device, f"{key}.{name}")


def build_check(block: dict, device, key: str):
    name = block["backend"]
    return CHECKS.get(name, key=f"{key}.backend")(block.get(name) or {}, device, f"{key}.{name}")


def decode_texts(tensor: torch.Tensor) -> list[str]:
    return json.loads(bytes(tensor.to(torch.uint8).tolist()).decode("utf-8"))


def encode_texts(texts: list[str]) -> torch.Tensor:
    return torch.tensor(list(json.dumps(texts).encode("utf-8")), dtype=torch.uint8)


def chosen_text(generator: dict) -> str:
    return decode_texts(generator["candidates_json"])[int(generator["choice"])]


def attack_key(context) -> str:
    return context.extra.get("key", "attack") if context is not None else "attack"


def build(spec: dict, image_size: int, seed: int, context: PoisonContext | None = None) -> VSSCTrigger:
    key = attack_key(context)
    settings = settings_for(__name__, spec, key)
    trigger = settings["trigger"]
    generator = getattr(context, "generator", None)
    if generator:
        text, selected_by = chosen_text(generator), spec.get("generator", "generator")
    elif spec.get("generator"):
        raise ConfigError(f"{key}.generator: the trigger selection '{spec['generator']}' has not been run (the "
                          "trigger stage makes it); name it in a workflow run, or drop generator: to use trigger.text")
    else:
        text, selected_by = trigger["text"], None
    device = getattr(context, "device", "cpu") or "cpu"
    inserter = build_inserter(trigger["insertion"], image_size, device, f"{key}.trigger.insertion")
    check = build_check(trigger["quality"], device, f"{key}.trigger.quality")
    fingerprint = json.dumps({"text": text, "seed": seed, "max_tries": trigger["max_tries"],
                              "insertion": trigger["insertion"], "quality": trigger["quality"]}, sort_keys=True,
                             default=str)
    return VSSCTrigger(
        inserter=inserter, check=check, text=text, category=trigger["category"],
        classes=list(getattr(context, "classes", None) or []), max_tries=int(trigger["max_tries"]), seed=int(seed),
        image_size=image_size, key=key, fingerprint=fingerprint, workdir=getattr(context, "workdir", None),
        selected_by=selected_by,
        backends={"insertion": trigger["insertion"]["backend"], "quality": trigger["quality"]["backend"]})


# -- trigger selection (the trigger stage) ------------------------------------------------------------

def candidate_texts(spec: dict, classes: list[str], key: str) -> list[str]:
    """The configured candidates, then the proposer's, without repeats (compared lower-cased)."""
    texts = list(spec["candidates"])
    proposer = dict(spec.get("proposer") or {})
    if proposer.get("backend"):
        propose = PROPOSERS.get(proposer["backend"], key=f"{key}.proposer.backend")
        proposed = propose(proposer, classes, f"{key}.proposer")
        texts += [str(text) for text in proposed]
    unique: dict[str, str] = {}
    for text in texts:
        unique.setdefault(" ".join(text.lower().split()), " ".join(text.split()))
    if not unique:
        raise ConfigError(f"{key}.candidates: no candidate trigger (give candidates, or a proposer with a backend)")
    return list(unique.values())


def assessment_indices(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` training indices taken class by class in turn, each class in a seeded random order
    (all of them when there are fewer)."""
    rng = np.random.default_rng([seed, 0x5C])
    queues = [list(rng.permutation(np.flatnonzero(labels == c))) for c in np.unique(labels)]
    chosen: list[int] = []
    while len(chosen) < count and any(queues):
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(int(queue.pop(0)))
    return np.asarray(chosen, dtype=np.int64)


def train_generator(spec: dict, context) -> dict[str, torch.Tensor]:
    """Choose the trigger text of a ``generators:`` entry of this kind (see the module's docstring).
    Each candidate's pass rate is saved in ``context.workdir`` as soon as it is known, so a killed
    selection resumes with the next candidate."""
    key = getattr(context, "key", "generators.vssc")
    classes = [str(name) for name in context.classes]
    images, labels = np.asarray(context.train_images), np.asarray(context.train_labels)
    seed = int(spec["seed"])
    candidates = candidate_texts(spec, classes, key)
    chosen = assessment_indices(labels, int(spec["assessment_images"]), seed)
    categories = [spec["category"] or classes[int(labels[i])] for i in chosen]
    inserter = build_inserter(spec["insertion"], int(images.shape[1]), context.device, f"{key}.insertion")
    check = build_check(spec["quality"], context.device, f"{key}.quality")

    fingerprint = json.dumps({"seed": seed, "indices": chosen.tolist(), "category": spec["category"],
                              "insertion": spec["insertion"], "quality": spec["quality"]}, sort_keys=True, default=str)
    progress_path = Path(context.workdir) / SELECTION_FILE
    done = read_progress(progress_path, fingerprint)
    for text in candidates:
        if text not in done:
            _, _, passed = edit_images(images[chosen], categories, text, inserter, check, seed, max_tries=1)
            done[text] = float(passed.mean()) if len(passed) else 0.0
            write_progress(progress_path, fingerprint, done)
    rates = [done[text] for text in candidates]
    choice = int(np.argmax(rates))
    for text, rate in zip(candidates, rates):
        print(f"{key}: {text!r} passes the {spec['quality']['backend']} check on {rate:.0%} of "
              f"{len(chosen)} assessment images{'  <- chosen' if text == candidates[choice] else ''}")
    return {"pass_rates": torch.tensor(rates, dtype=torch.float32), "choice": torch.tensor(choice, dtype=torch.int64),
            "candidates_json": encode_texts(candidates)}


def read_progress(path: Path, fingerprint: str) -> dict[str, float]:
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return dict(saved.get("rates", {})) if saved.get("fingerprint") == fingerprint else {}


def write_progress(path: Path, fingerprint: str, rates: dict[str, float]) -> None:
    from ..checkpoint import atomic_write

    atomic_write(path, lambda tmp: tmp.write_text(json.dumps({"fingerprint": fingerprint, "rates": rates})))


def describe_generator(tensors: dict) -> dict:
    """The selection in words: each candidate's pass rate and the chosen text (for info.json)."""
    candidates = decode_texts(tensors["candidates_json"])
    rates = [float(rate) for rate in tensors["pass_rates"]]
    return {"candidates": candidates, "pass_rates": dict(zip(candidates, rates)),
            "chosen": candidates[int(tensors["choice"])]}
