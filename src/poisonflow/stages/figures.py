"""figures stage: one entry of the config's ``figures:`` section, drawn from stored artifacts →
``results/figures/{kind}/{name}.png`` (and the same figure as ``.pdf`` next to it).

The entry (``--spec``, validated, schema defaults filled) names its ``kind``; each kind is a
:class:`FigureKind`: the inputs it reads, the check of its entry against the rest of the config
(run when the workflow is parsed), and the job that reads the artifacts and draws with
:mod:`poisonflow.figures`:

- ``forgetting`` reads the surrogate's ``dynamics.npz`` (``--dynamics``) and the clean store
  (``--clean``: training labels, class names);
- ``embedding-distances`` reads a features entry's SimCLR backbone (``--backbone``), the poisoned
  store (``--poison``) and the clean store (``--clean``: the clean twin of each poisoned training
  image, for this analysis of the attack, not for any defense);
- ``tsne`` reads one victim ``model.pt`` (``--victims``) and its poisoned store (``--poison``) per
  attack (``--names``), with the victims' resolved trainings entry (``--training``); features on
  the CPU;
- ``gradcam`` reads the same as ``tsne``, and the robustness entries of its ``distortions``
  (``--robustness``); Grad-CAM of a few triggered test images per attack, plain and distorted;
- ``learning-curves`` reads the ``curves.csv`` beside each victim ``model.pt`` (``--victims``,
  ``--names``), written when ``evaluation.curves`` is set;
- ``sample-scores`` reads the ``scores.npz`` beside each of a splitting defense's ``model.pt``
  (``--victims``: the defense's models, one per attack in ``--names``).

The workflow imports this module to check the ``figures:`` entries (:func:`check_figures`), so
torch and the store are imported inside the jobs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import ConfigError
from ..figures import attack_label, forgetting_histogram, tsne_embedding, tsne_panels, unique_labels
from .common import THREADS_HELP, parse_json, set_threads


def add_arguments(parser) -> None:
    parser.add_argument("--spec", required=True, metavar="JSON",
                        help="the figures entry (JSON, defaults filled); its kind "
                             f"({', '.join(KINDS)}) picks the job and its inputs")
    parser.add_argument("--out", required=True, metavar="PNG", help="the PNG to write (a PDF is written next to it)")
    parser.add_argument("--clean", metavar="STORE", help="forgetting: clean store (training labels, class names)")
    parser.add_argument("--dynamics", metavar="NPZ", help="forgetting: the surrogate's dynamics.npz")
    parser.add_argument("--training", metavar="JSON", help="tsne, gradcam: the victims' resolved trainings entry (JSON)")
    parser.add_argument("--names", nargs="+", help="tsne, gradcam: attack names, one per panel")
    parser.add_argument("--poison", nargs="+", metavar="STORE", help="tsne, gradcam: poisoned stores, one per attack")
    parser.add_argument("--victims", nargs="+", metavar="MODEL", help="tsne, gradcam, learning-curves: victim model.pt files, one per attack; "
                             "sample-scores, learning-curves with a defense: the defense's model.pt files")
    parser.add_argument("--backbone", metavar="MODEL",
                        help="embedding-distances: the features entry's SimCLR backbone.pt (trained on the poisoned set)")
    parser.add_argument("--robustness", metavar="JSON",
                        help="gradcam: the robustness entries its distortions name (JSON: name → entry)")
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)


def run(args) -> None:
    entry = parse_json(args.spec, "--spec")
    kind = KINDS.get(entry.get("kind"))
    if kind is None:
        raise ConfigError(f"--spec: unknown figure kind '{entry.get('kind')}' (known: {', '.join(KINDS)})")
    missing = [f"--{name}" for name in kind.inputs if getattr(args, name) is None]
    if missing:
        raise ConfigError(f"--spec: a {entry['kind']} figure needs {', '.join(missing)}")
    print(kind.draw(entry, args))


# --------------------------------------------------------------------------------------------
# Checks of the ``figures:`` entries against the rest of the config (at parse time)
# --------------------------------------------------------------------------------------------

def check_figures(config: dict, describe: Callable[[str], dict]) -> None:
    """Check that every ``figures:`` entry names existing entries; ConfigError naming the key if not.

    ``config`` is the validated config (schema defaults filled, kinds known); ``describe(dataset)``
    gives the dataset's class names and per-class training counts.
    """
    for name, entry in config.get("figures", {}).items():
        KINDS[entry["kind"]].check(config, entry, f"figures.{name}", describe)


def _check_name(config: dict, section: str, name: str, key: str) -> None:
    if name not in config.get(section, {}):
        known = ", ".join(sorted(config.get(section, {}))) or "none"
        raise ConfigError(f"{key}: no {section} entry named '{name}' (known: {known})")


def check_forgetting(config: dict, entry: dict, key: str, describe: Callable[[str], dict]) -> None:
    _check_name(config, "datasets", entry["dataset"], f"{key}.dataset")
    _check_name(config, "surrogates", entry["surrogate"], f"{key}.surrogate")
    classes = len(describe(entry["dataset"])["train_counts"])
    if entry["class"] >= classes:
        raise ConfigError(f"{key}.class: class {entry['class']} is outside dataset '{entry['dataset']}' "
                          f"({classes} classes, 0..{classes - 1})")


def check_tsne(config: dict, entry: dict, key: str, describe: Callable[[str], dict]) -> None:
    _check_name(config, "datasets", entry["dataset"], f"{key}.dataset")
    _check_name(config, "trainings", entry["training"], f"{key}.training")
    for i, attack in enumerate(entry["attacks"]):
        _check_name(config, "attacks", attack, f"{key}.attacks[{i}]")


# --------------------------------------------------------------------------------------------
# forgetting: a surrogate's training dynamics → histogram of one class (hard-sample paper, Fig. 3)
# --------------------------------------------------------------------------------------------

def class_forgetting_events(correct: np.ndarray, labels: np.ndarray, cls: int) -> np.ndarray:
    """Forgetting events of the training samples of class ``cls`` from the (epochs, N) correctness."""
    from ..scores import forgetting_events

    labels = np.asarray(labels)
    if np.asarray(correct).shape[1] != len(labels):
        raise ValueError(f"dynamics cover {np.asarray(correct).shape[1]} samples, the store has {len(labels)}")
    return forgetting_events(correct)[labels == cls]


def draw_forgetting(entry: dict, args) -> Path:
    from ..store import read_store

    clean = read_store(args.clean)
    with np.load(args.dynamics, allow_pickle=False) as stored:  # arrays only: no code from the file
        correct = stored["correct"]
    cls = int(entry["class"])
    events = class_forgetting_events(correct, clean["train/labels"], cls)
    name = list(clean.attrs["classes"])[cls]
    title = f"{entry['dataset']}, class {cls} ({name}): {len(events)} samples, {correct.shape[0]} epochs"
    return forgetting_histogram(events, args.out, title)


# --------------------------------------------------------------------------------------------
# tsne: victims and their poisoned stores → one t-SNE panel per attack (hard-sample paper, Fig. 13)
# --------------------------------------------------------------------------------------------

def panel_sample(poisoned: np.ndarray, samples: int, seed: int) -> np.ndarray:
    """Indices shown in a t-SNE panel: ``samples`` seeded benign samples and every poisoned one.

    The same seed picks the same benign samples in every panel of a figure, so panels compare
    the same points.
    """
    poisoned = np.asarray(poisoned, dtype=bool)
    benign = np.flatnonzero(~poisoned)
    chosen = np.random.default_rng(seed).choice(benign, size=min(samples, len(benign)), replace=False)
    return np.sort(np.concatenate([chosen, np.flatnonzero(poisoned)]))


def victim_features(model, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Penultimate features of uint8 NHWC images, model in eval mode, on the CPU."""
    import torch

    from ..trainer import images_to_tensor, to_float

    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            out.append(model.features(to_float(images_to_tensor(images[start:start + batch_size]))).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def draw_tsne(entry: dict, args) -> Path:
    from ..modelio import load_model, model_spec
    from ..store import read_store

    if not len(args.names) == len(args.poison) == len(args.victims):
        raise ConfigError("--names, --poison and --victims: need one of each per attack")
    set_threads(args.threads)
    training = parse_json(args.training, "--training")
    panels, titles, classes = [], [], None
    for name, store_path, weights in zip(args.names, args.poison, args.victims):
        store = read_store(store_path)
        images, poisoned = store["train/images"], store["train/poisoned"]
        classes = classes or list(store.attrs["classes"])
        model = load_model(weights, "cpu", spec=model_spec(training["model"], len(store.attrs["classes"]), images.shape[1]))
        shown = panel_sample(poisoned, int(entry["samples"]), int(entry["seed"]))
        features = victim_features(model, images[shown])
        embedding = tsne_embedding(features, int(entry["seed"]), float(entry["perplexity"]))
        panels.append((embedding, store["train/true_labels"][shown], poisoned[shown]))
        titles.append(attack_label(name, store.attrs.get("attack")))
    return tsne_panels(dict(zip(unique_labels(list(args.names), titles), panels)), args.out, class_names=classes)


# --------------------------------------------------------------------------------------------
# embedding-distances: how far a trigger moves an image in self-supervised space (GSSD Fig. F.1)
# --------------------------------------------------------------------------------------------

def check_embedding_distances(config: dict, entry: dict, key: str, describe: Callable[[str], dict]) -> None:
    _check_name(config, "datasets", entry["dataset"], f"{key}.dataset")
    _check_name(config, "attacks", entry["attack"], f"{key}.attack")
    _check_name(config, "features", entry["features"], f"{key}.features")
    if config["features"][entry["features"]].get("extractor", "simclr") != "simclr":
        raise ConfigError(f"{key}.features: '{entry['features']}' is not a SimCLR entry (the figure embeds with its backbone)")


def embedding_distances(clean: np.ndarray, poisoned: np.ndarray, labels: np.ndarray, flags: np.ndarray,
                        pairs: int, seed: int) -> dict[str, np.ndarray]:
    """L2 distances between embeddings: each poisoned sample's clean and poisoned version, and
    ``pairs`` random pairs of clean samples of the same and of different true labels."""
    rng = np.random.default_rng([seed, 3])
    twins = np.linalg.norm(clean[flags] - poisoned[flags], axis=1)
    first, second = rng.integers(0, len(labels), (2, pairs * 4))
    keep = first != second
    first, second = first[keep], second[keep]
    same = labels[first] == labels[second]
    distances = np.linalg.norm(clean[first] - clean[second], axis=1)
    return {"clean vs poisoned (same image)": twins, "intra-class": distances[same][:pairs],
            "inter-class": distances[~same][:pairs]}


def draw_embedding_distances(entry: dict, args) -> Path:
    from ..embeddings import embed_images
    from ..figures import distance_histograms
    from ..modelio import load_model
    from ..store import read_store

    set_threads(args.threads)
    clean_store, store = read_store(args.clean), read_store(args.poison[0])
    poisoned_images = store["train/images"]
    clean_images = clean_store["train/images"]
    if len(clean_images) != len(poisoned_images):
        raise ConfigError(f"--clean, --poison: {len(clean_images)} and {len(poisoned_images)} training images "
                          f"(not the same dataset entry?)")
    backbone = load_model(args.backbone, "cpu").eval()
    clean = embed_images(backbone.features, clean_images, "cpu", desc="clean embeddings")
    poisoned = embed_images(backbone.features, poisoned_images, "cpu", desc="poisoned embeddings")
    groups = embedding_distances(clean, poisoned, np.asarray(store["train/true_labels"]),
                                 np.asarray(store["train/poisoned"], dtype=bool), int(entry["pairs"]),
                                 int(entry["seed"]))
    title = f"{entry['attack']} on {entry['dataset']}, seed {entry['seed']}: {entry['features']} embeddings"
    return distance_histograms(groups, args.out, title, int(entry["bins"]))


# --------------------------------------------------------------------------------------------
# gradcam: where each attack's victim looks on triggered test images, plain and distorted (VSSC Fig. 5)
# --------------------------------------------------------------------------------------------

def check_gradcam(config: dict, entry: dict, key: str, describe: Callable[[str], dict]) -> None:
    check_tsne(config, entry, key, describe)
    for name in entry["distortions"]:
        _check_name(config, "robustness", name, f"{key}.distortions.{name}")
        from ..distortions import FAMILIES

        if config["robustness"][name]["kind"] not in FAMILIES:
            raise ConfigError(f"{key}.distortions.{name}: a {config['robustness'][name]['kind']} entry is not an image "
                              f"distortion ({', '.join(FAMILIES)})")


def draw_gradcam(entry: dict, args) -> Path:
    from .. import distortions, gradcam
    from ..modelio import load_model, model_spec
    from ..store import read_store

    if not len(args.names) == len(args.poison) == len(args.victims):
        raise ConfigError("--names, --poison and --victims: need one of each per attack")
    set_threads(args.threads)
    training = parse_json(args.training, "--training")
    robustness = parse_json(args.robustness, "--robustness") if args.robustness else {}
    views = [("plain", None)] + [(f"{name} {level:g}", (name, level)) for name, level in entry["distortions"].items()]
    images, cams, titles = [], [], []
    for name, store_path, weights in zip(args.names, args.poison, args.victims):
        store = read_store(store_path)
        test = np.asarray(store["test/images"])
        if not len(test):
            raise ConfigError(f"figures: attack '{name}' has no triggered test images (an unlearnable-example set?)")
        model = load_model(weights, "cpu", spec=model_spec(training["model"], len(store.attrs["classes"]),
                                                           test.shape[1])).eval()
        shown = np.sort(np.random.default_rng(int(entry["seed"])).choice(len(test), size=min(int(entry["samples"]), len(test)),
                                                                          replace=False))
        label = attack_label(name, store.attrs.get("attack"))
        for view, distortion in views:
            batch = test[shown]
            if distortion is not None:
                spec = robustness[distortion[0]]
                batch = distortions.FAMILIES[spec["kind"]].apply(batch, distortion[1], spec.get("settings", {}),
                                                                 np.random.default_rng(int(entry["seed"])))
            images.append(batch)
            cams.append(gradcam.grad_cam(model, batch, layer=entry["layer"]))
            titles.append(f"{label}, {view}")
    return gradcam.heatmap_figure(images, cams, titles, args.out, groups_per_row=len(views))


# --------------------------------------------------------------------------------------------
# learning-curves: victims' per-epoch accuracy on benign and poisoned samples, plain and iFGSM (A-ABL Fig. 8)
# --------------------------------------------------------------------------------------------

def check_learning_curves(config: dict, entry: dict, key: str, describe: Callable[[str], dict]) -> None:
    check_tsne(config, entry, key, describe)
    if "defense" in entry:  # a defense kind records curves if it hands the stage's observer to its training
        _check_name(config, "defenses", entry["defense"], f"{key}.defense")
    if not config.get("evaluation", {}).get("curves"):
        raise ConfigError(f"{key}: learning curves are recorded only with evaluation.curves set "
                          f"(e.g. evaluation: {{curves: {{eps: 0.00784, steps: 5}}}})")


def draw_learning_curves(entry: dict, args) -> Path:
    from ..curves import read_curves
    from ..figures import learning_curves

    curves, labels = {}, []
    for name, weights in zip(args.names, args.victims):
        path = Path(weights).with_name("curves.csv")
        rows = read_curves(path)
        if not rows:
            raise ConfigError(f"{path}: no learning curves (the model was trained without evaluation.curves; "
                              f"rerun it with --forcerun)")
        curves[name] = rows
        labels.append(attack_label(name))
    title = f"{entry['dataset']}, {entry.get('defense', entry['training'])}, seed {entry['seed']}"
    return learning_curves(dict(zip(unique_labels(list(args.names), labels), curves.values())), args.out, title)


# --------------------------------------------------------------------------------------------
# sample-scores: a splitting defense's per-sample scores, clean vs poisoned, one row per attack
# (A-ABL Figs. 4, 9, 11)
# --------------------------------------------------------------------------------------------

def check_sample_scores(config: dict, entry: dict, key: str, describe: Callable[[str], dict]) -> None:
    check_tsne(config, entry, key, describe)
    _check_name(config, "defenses", entry["defense"], f"{key}.defense")


def read_sample_scores(path: Path, names: list[str] | None, key: str) -> tuple[dict, np.ndarray, dict]:
    """The scores (all, or those ``names``), poison flags and thresholds of one ``scores.npz``."""
    from .defense import THRESHOLD_PREFIX

    if not path.exists():
        raise ConfigError(f"{key}: {path} does not exist (the defense kind stores no per-sample scores)")
    with np.load(path) as stored:
        files = {name: stored[name] for name in stored.files}
    thresholds = {name[len(THRESHOLD_PREFIX):]: float(value) for name, value in files.items()
                  if name.startswith(THRESHOLD_PREFIX)}
    available = [name for name in files if name not in ("kept", "poisoned") and not name.startswith(THRESHOLD_PREFIX)]
    missing = [name for name in names or [] if name not in available]
    if missing:
        raise ConfigError(f"{key}.scores: {path} has no score {', '.join(map(repr, missing))} "
                          f"(it has {', '.join(map(repr, available))})")
    return {name: files[name] for name in names or available}, files["poisoned"], thresholds


def draw_sample_scores(entry: dict, args) -> Path:
    from ..figures import score_grid

    rows = {}
    labels = unique_labels(list(args.names), [attack_label(name) for name in args.names])
    for label, weights in zip(labels, args.victims):
        rows[label] = read_sample_scores(Path(weights).with_name("scores.npz"), entry.get("scores"), "--spec")
    title = f"{entry['dataset']}, {entry['defense']}, seed {entry['seed']}"
    return score_grid(rows, args.out, title)


# --------------------------------------------------------------------------------------------
# The kinds: one per value of the schema's figures.*.kind (its defaults live in the schema only)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FigureKind:
    inputs: tuple[str, ...]  # the arguments (besides --spec and --out) the job reads
    check: Callable[[dict, dict, str, Callable[[str], dict]], None]
    draw: Callable[[dict, object], Path]


KINDS: dict[str, FigureKind] = {
    "forgetting": FigureKind(("clean", "dynamics"), check_forgetting, draw_forgetting),
    "tsne": FigureKind(("training", "names", "poison", "victims"), check_tsne, draw_tsne),
    "embedding-distances": FigureKind(("clean", "poison", "backbone"), check_embedding_distances,
                                      draw_embedding_distances),
    "gradcam": FigureKind(("training", "names", "poison", "victims"), check_gradcam, draw_gradcam),
    "learning-curves": FigureKind(("names", "victims"), check_learning_curves, draw_learning_curves),
    "sample-scores": FigureKind(("names", "victims"), check_sample_scores, draw_sample_scores),
}
