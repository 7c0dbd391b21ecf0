"""Load, validate and resolve a workflow config.

Validation fills the schema's defaults and rejects unknown keys and out-of-range values; the
semantic checks below (entry names, names that must exist, target classes, sample counts,
patches, image sizes against the models, dataset roots) run before any job, each failing with
one line that names the key. A config file with a key given twice is refused (:func:`read_yaml`).
``Config.attack(name)`` etc. return the fully resolved entry a job depends on: it goes into the
rule's ``params`` so Snakemake reruns exactly the jobs whose inputs changed. Entries are resolved
once per name and cached (``spec_json`` gives the JSON the rules pass to the jobs).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml

from . import kinds
from .errors import ConfigError
from .geometry import patch_position
from .targets import ALL_TO_ALL, poison_budget  # noqa: F401  (poison_budget: re-exported)


# Entry names become folders of the results (results/poison/{dataset}/{attack}/...) and arguments
# of the job commands, so they are kept to a safe alphabet.
NAME_SECTIONS = ("datasets", "models", "trainings", "surrogates", "generators", "features", "attacks", "defenses",
                 "figures", "robustness")
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
NAME_RULE = ("letters, digits, '-', '_' and '.', starting with a letter, digit or '_', without '..' "
             "(a name becomes a results folder and a job argument)")

# Settings of the workflow itself (not of an experiment): how jobs are grouped and what they
# reserve. Checked here; the rules read them (see poisonflow.workflow_helpers).
WORKFLOW_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "group_small_jobs": {
            "description": "run the jobs of a stage through one warm process that has imported torch once "
                           "(locally), and submit them in groups of this many (true: 20) on a cluster",
            "type": ["boolean", "integer"], "minimum": 1, "default": False},
        "resources": {
            "description": "per-rule overrides of the declared resources, e.g. {victim: {mem_mb: 3000}}",
            "type": "object", "default": {},
            "additionalProperties": {
                "type": "object", "additionalProperties": False,
                "properties": {"mem_mb": {"type": "integer", "minimum": 1},
                               "runtime": {"type": "integer", "minimum": 1},
                               "gpu": {"type": "integer", "minimum": 0}}}},
    },
}


def check_entry_names(raw: dict) -> None:
    """Every entry name is in :data:`NAME_PATTERN`, without '..'."""
    for section in NAME_SECTIONS:
        entries = raw.get(section)
        if not isinstance(entries, dict):
            continue
        for name in entries:
            if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
                raise ConfigError(f"{section}: entry name {str(name)!r} is not allowed: use {NAME_RULE}")


def validate(config: dict) -> dict:
    """Return a copy of ``config`` with defaults filled, or raise ConfigError naming the key."""
    config = dict(config)
    check_entry_names(config)
    workflow = config.pop("workflow", None)
    data = kinds.fill_and_check(config, kinds.config_schema())
    data["workflow"] = kinds.fill_and_check({} if workflow is None else workflow, WORKFLOW_SCHEMA, "workflow")
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses a mapping with the same key twice (the plain loader keeps the
    later value silently). Keys brought in by a merge (``<<: *anchor``) may be overridden."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the base loader reports it
                    continue
                if first is not None:
                    raise ConfigError(f"{self.name}:{line}: duplicate key '{key}' (first on line {first}; "
                                      f"YAML would silently keep only the later value)")
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> Any:
    """A YAML (or JSON) config file, refusing duplicate keys with one line naming the key and lines."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text()
    loader = _UniqueKeyLoader(text)
    loader.name = str(path)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML ({problem})") from None
    finally:
        loader.dispose()


@dataclass(frozen=True)
class Job:
    dataset: str
    attack: str
    training: str
    defense: str
    seed: int


@dataclass(frozen=True)
class RobustnessJob:
    dataset: str
    attack: str
    training: str
    seed: int
    robustness: str


class Config:
    """A validated config with its semantic checks done.

    ``describe_cache``: a JSON file keeping the descriptions of datasets whose source reads no
    files (digits, synthetic) between runs, keyed by the entry and the source's code; the workflow
    passes one (under ``~/.cache/poisonflow/``) so a Snakemake call does not import scikit-learn
    to count the digits classes again.
    """

    def __init__(self, raw: dict, describe_cache: str | Path | None = None):
        from .sweeps import expand

        raw, self.sweeps = expand(raw)  # swept keys → one entry per value (poisonflow.sweeps)
        self.data = validate(raw)
        self._described: dict[str, dict] = {}
        self._resolved: dict[tuple[str, str], dict] = {}
        self._json: dict[tuple[str, str], str] = {}
        self._describe_cache = Path(describe_cache) if describe_cache else None
        self._check()

    # -- resolution -------------------------------------------------------------------------
    # Each resolved entry is built once and cached; the public methods hand out copies.
    def _resolve(self, section: str, name: str) -> dict:
        key = (section, name)
        if key not in self._resolved:
            self._resolved[key] = getattr(self, f"_build_{section}")(name)
        return self._resolved[key]

    def spec_json(self, section: str, name: str = "") -> str:
        """The resolved entry as the compact, key-sorted JSON the rules pass to the jobs (cached).
        ``section``: dataset, training, surrogate, generator, features, attack, defense or evaluation."""
        key = (section, name)
        if key not in self._json:
            value = self._evaluation_spec() if section == "evaluation" else self._resolve(section, name)
            self._json[key] = json.dumps(value, sort_keys=True, separators=(",", ":"))
        return self._json[key]

    def _evaluation_spec(self) -> dict:
        """The evaluation section as the jobs get it: keys added later with a null default that a
        config leaves null are left out, so that adding them does not rerun every victim."""
        return {key: value for key, value in self.data["evaluation"].items() if not (key == "curves" and value is None)}

    def _build_dataset(self, name: str) -> dict:
        return copy.deepcopy(self.data["datasets"][name])

    def _build_training(self, name: str) -> dict:
        entry = copy.deepcopy(self.data["trainings"][name])
        entry["model"] = copy.deepcopy(self.data["models"][entry["model"]])
        return entry

    def _build_surrogate(self, name: str) -> dict:
        entry = copy.deepcopy(self.data["surrogates"][name])
        entry["training"] = self.training(entry["training"])
        return entry

    def _build_generator(self, name: str) -> dict:
        entry = copy.deepcopy(self.data["generators"][name])
        if "surrogate" in entry:
            entry["surrogate_entry"] = self.surrogate(entry["surrogate"])
        return entry

    def _build_features(self, name: str) -> dict:
        entry = copy.deepcopy(self.data["features"][name])
        if entry["extractor"] == "simclr" and isinstance(entry["model"], str):  # a models entry by name: inline it
            entry["model"] = copy.deepcopy(self.data["models"][entry["model"]])
        return entry

    def _build_attack(self, name: str) -> dict:
        entry = copy.deepcopy(self.data["attacks"][name])
        if "generator" in entry:
            entry["generator_entry"] = self.generator(entry["generator"])
        if "surrogate" in entry:
            entry["surrogate_entry"] = self.surrogate(entry["surrogate"])
        return entry

    def _build_defense(self, name: str) -> dict:
        return copy.deepcopy(self.data["defenses"][name])

    def dataset(self, name: str) -> dict:
        return copy.deepcopy(self._resolve("dataset", name))

    def training(self, name: str) -> dict:
        """A trainings entry with its ``model`` entry resolved inline."""
        return copy.deepcopy(self._resolve("training", name))

    def surrogate(self, name: str) -> dict:
        return copy.deepcopy(self._resolve("surrogate", name))

    def generator(self, name: str) -> dict:
        """A generators entry with its ``surrogate`` entry resolved inline (if it names one)."""
        return copy.deepcopy(self._resolve("generator", name))

    def features(self, name: str) -> dict:
        """A features entry; a SimCLR entry's ``model`` named by its models entry is resolved inline."""
        return copy.deepcopy(self._resolve("features", name))

    def attack(self, name: str) -> dict:
        return copy.deepcopy(self._resolve("attack", name))

    def defense(self, name: str) -> dict:
        return copy.deepcopy(self._resolve("defense", name))

    def evaluation(self) -> dict:
        return copy.deepcopy(self.data["evaluation"])

    def jobs(self) -> Iterator[Job]:
        seen = set()
        for experiment in self.data["experiments"]:
            for combo in itertools.product(experiment["dataset"], experiment["attack"], experiment["training"],
                                           experiment["defense"], experiment["seed"]):
                job = Job(*combo)
                if job not in seen:
                    seen.add(job)
                    yield job

    def robustness_jobs(self) -> list[RobustnessJob]:
        """One test-time evaluation per victim (dataset, attack, training, seed) and robustness entry
        its experiments list, in config order, without repeats."""
        jobs: dict[RobustnessJob, None] = {}
        for experiment in self.data["experiments"]:
            for combo in itertools.product(experiment["dataset"], experiment["attack"], experiment["training"],
                                           experiment["seed"], experiment["robustness"]):
                jobs[RobustnessJob(*combo)] = None
        return list(jobs)

    def describe(self, dataset: str) -> dict:
        """Class names, per-class counts of the released training set and of the reserve, and the
        image side of a dataset entry (cheap, cached; no image is read)."""
        if dataset not in self._described:
            spec = self.data["datasets"][dataset]
            key = f"datasets.{dataset}"

            def describe():  # imports the source module (scikit-learn, for digits)
                source = kinds.SOURCES.get(spec["source"], key=f"{key}.source")
                return {**source.describe(spec, key=key), "native_size": getattr(source, "NATIVE_SIZE", None)}

            described = self._cached_description(spec, key, describe)
            counts = [int(c) for c in described["train_counts"]]
            reserve = reserve_counts(counts, float(spec["reserve"]))
            self._described[dataset] = {
                "classes": list(described["classes"]),
                "train_counts": [c - r for c, r in zip(counts, reserve)],
                "reserve_counts": reserve,
                "image_size": int(spec.get("image_size") or described["native_size"]),
            }
        return self._described[dataset]

    def _cached_description(self, spec: dict, key: str, describe) -> dict:
        """``describe()``, kept in the describe cache for sources that read no files (the source's
        fragment includes no download keys and has no root): their description depends only on the
        entry and the code."""
        fragment = kinds.SOURCES.fragment(spec["source"], key=f"{key}.source")
        if self._describe_cache is None or fragment.include or "root" in fragment.properties:
            return describe()
        from .codehash import code_hash

        digest = hashlib.sha256(json.dumps([spec, code_hash(fragment.module, "poisonflow.data.base")],
                                           sort_keys=True).encode()).hexdigest()
        try:
            cache = json.loads(self._describe_cache.read_text())
        except (OSError, ValueError):
            cache = {}
        if not isinstance(cache, dict) or not isinstance(cache.get(digest), dict) or "native_size" not in cache[digest]:
            cache = cache if isinstance(cache, dict) else {}
            cache[digest] = {k: v for k, v in describe().items() if k in ("classes", "train_counts", "native_size")}
            try:
                self._describe_cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = self._describe_cache.with_name(f".{self._describe_cache.name}.{digest[:8]}.tmp")
                tmp.write_text(json.dumps(cache))
                tmp.replace(self._describe_cache)
            except OSError:
                pass  # a read-only directory: describe again next time
        return cache[digest]

    # -- checks -----------------------------------------------------------------------------
    def _check_names(self, section: str, names: list[str], key: str) -> None:
        for name in names:
            if name not in self.data[section]:
                raise ConfigError(f"{key}: no {section} entry named '{name}' (known: {', '.join(sorted(self.data[section])) or 'none'})")

    def _check(self) -> None:
        from .architectures import ARCHITECTURES

        for name, entry in self.data["datasets"].items():
            kinds.SOURCES.target(entry["source"], key=f"datasets.{name}.source")
        for name, entry in self.data["models"].items():
            ARCHITECTURES.target(entry["arch"], key=f"models.{name}.arch")
        for name, entry in self.data["trainings"].items():
            self._check_names("models", [entry["model"]], f"trainings.{name}.model")
        for name, entry in self.data["surrogates"].items():
            self._check_names("trainings", [entry["training"]], f"surrogates.{name}.training")
        for name, entry in self.data["features"].items():
            check_features(entry, f"features.{name}")
            if entry["extractor"] != "simclr":
                continue  # clip: `model` is an open_clip architecture
            if isinstance(entry["model"], str):
                self._check_names("models", [entry["model"]], f"features.{name}.model")
            else:
                ARCHITECTURES.target(entry["model"]["arch"], key=f"features.{name}.model.arch")
        for name, entry in self.data["attacks"].items():
            kinds.ATTACK_KINDS.target(entry["kind"], key=f"attacks.{name}.kind")
        for name, entry in self.data["defenses"].items():
            kinds.DEFENSES.target(entry["kind"], key=f"defenses.{name}.kind")
            if "features" in entry:
                self._check_names("features", [entry["features"]], f"defenses.{name}.features")
            if "splitter" in entry:
                self._check_names("defenses", [entry["splitter"]], f"defenses.{name}.splitter")
                splitter = self.data["defenses"][entry["splitter"]]
                if not kinds.DEFENSES.fragment(splitter["kind"]).split:
                    splitting = sorted(f.kind for f in kinds.fragments() if f.split)
                    raise ConfigError(f"defenses.{name}.splitter: '{entry['splitter']}' is of kind '{splitter['kind']}', "
                                      f"which does not split (kinds that do: {', '.join(splitting)})")
        for name, entry in self.data["generators"].items():
            fragment = kinds.ATTACKS.fragment(entry["kind"], key=f"generators.{name}.kind")
            if not fragment.generator:
                raise ConfigError(f"generators.{name}.kind: attack kind '{entry['kind']}' trains no generator "
                                  f"(kinds that do: {', '.join(sorted(f.kind for f in kinds.fragments() if f.generator))})")
            if "surrogate" in entry:
                self._check_names("surrogates", [entry["surrogate"]], f"generators.{name}.surrogate")
        for name, entry in self.data["attacks"].items():
            if "generator" in entry:
                self._check_names("generators", [entry["generator"]], f"attacks.{name}.generator")
                if self.data["generators"][entry["generator"]]["kind"] != entry["kind"]:
                    raise ConfigError(f"attacks.{name}.generator: generators entry '{entry['generator']}' is of kind "
                                      f"'{self.data['generators'][entry['generator']]['kind']}', not '{entry['kind']}'")
            if "surrogate" in entry:
                self._check_names("surrogates", [entry["surrogate"]], f"attacks.{name}.surrogate")
            if entry.get("selection", "random") != "random" and "surrogate" not in entry:
                raise ConfigError(f"attacks.{name}.surrogate: selection '{entry['selection']}' needs a surrogate")
        for i, experiment in enumerate(self.data["experiments"]):
            for field, section in (("dataset", "datasets"), ("attack", "attacks"), ("training", "trainings"),
                                   ("defense", "defenses")):
                self._check_names(section, experiment[field], f"experiments[{i}].{field}")
            self._check_names("robustness", experiment["robustness"], f"experiments[{i}].robustness")
        jobs = list(self.jobs())
        for dataset, attack in sorted({(j.dataset, j.attack) for j in jobs}):
            entry, described = self.data["attacks"][attack], self.describe(dataset)
            fragment = kinds.ATTACK_KINDS.fragment(entry["kind"])
            for check in ATTACK_CHECKS:
                check(entry, fragment, described, f"attacks.{attack}", dataset)
        for dataset, defense in sorted({(j.dataset, j.defense) for j in jobs}):
            entry = self.data["defenses"][defense]
            fragment = kinds.DEFENSES.fragment(entry["kind"])
            check_reserve(entry, fragment, self.describe(dataset), f"defenses.{defense}", dataset)
        for dataset, training in sorted(self._trained_on()):
            model = self.data["trainings"][training]["model"]
            check_image_size(self.data["models"][model], model, f"trainings.{training}", self.describe(dataset),
                             dataset)

    def _trained_on(self) -> set[tuple[str, str]]:
        """(dataset, trainings entry) of every model the jobs train: victims and the surrogates
        their attacks (and generators) use."""
        pairs = set()
        for job in self.jobs():
            pairs.add((job.dataset, job.training))
            attack = self.data["attacks"][job.attack]
            surrogates = [attack.get("surrogate")]
            if "generator" in attack:
                surrogates.append(self.data["generators"][attack["generator"]].get("surrogate"))
            pairs.update((job.dataset, self.data["surrogates"][s]["training"]) for s in surrogates if s)
        return pairs


# -- checks of an entry against the dataset it runs on, one concern each ------------------------
# Each takes (entry, its kind's fragment, the dataset's description, the entry's key, dataset name).

def check_target(entry: dict, fragment: kinds.Fragment, described: dict, key: str, dataset: str) -> None:
    """A backdoor's target class exists in the dataset."""
    classes = len(described["train_counts"])
    if fragment.role.name != "backdoor":
        return
    if entry["target"] == ALL_TO_ALL:
        if entry["label_mode"] != "dirty":
            raise ConfigError(f"{key}.target: all-to-all relabels every class, so it needs label_mode dirty")
        return
    if entry["target"] >= classes:
        raise ConfigError(f"{key}.target: class {entry['target']} is outside dataset '{dataset}' "
                          f"({classes} classes, 0..{classes - 1})")


def check_rate(entry: dict, fragment: kinds.Fragment, described: dict, key: str, dataset: str) -> None:
    """The rate selects at least one sample, and no more than are eligible."""
    counts = described["train_counts"]
    if fragment.role.name == "unlearnable":
        available, requested = sum(counts), int(round(float(entry.get("rate", 1.0)) * sum(counts)))
        verb = "protects"
    else:
        available, requested = poison_budget(entry, counts)
        verb = "poisons"
    if requested < 1:
        raise ConfigError(f"{key}.rate: {entry.get('rate')} {verb} no sample of dataset '{dataset}'")
    if requested > available:
        raise ConfigError(f"{key}.rate: {entry['rate']} asks for {requested} samples but dataset "
                          f"'{dataset}' has only {available} eligible ({entry['label_mode']}-label)")


def check_patch(entry: dict, fragment: kinds.Fragment, described: dict, key: str, dataset: str) -> None:
    """A patch trigger (declared in the fragment's ``checks.patch``) fits the dataset's images."""
    declared = fragment.checks.get("patch")
    if not declared:
        return
    values = {name: lookup(entry, path) for name, path in declared.items()}
    side = described["image_size"]
    try:
        patch_position(values.get("position", "bottom-right"), int(values["size"]), side, side,
                       int(values.get("margin", 0)))
    except ConfigError as error:
        raise ConfigError(f"{key}.{error} (dataset '{dataset}')") from None


ATTACK_CHECKS = (check_target, check_rate, check_patch)


# Image sides a model body is meant for (see poisonflow.models; kept here because the config
# layer does not import torch). The body downsamples by a fixed factor (convnet: two 2×2
# poolings; VGG: five) or by its stem's (the CIFAR stem: 8 in all; the ImageNet stem: 32).
# The rule: an image is at least SMALLEST_IMAGE px and at least the downsampling (the last
# feature map keeps at least 1×1); a body whose first convolutions run at full resolution and
# that is built for 32 px images (convnet, and any explicit `stem: cifar`) takes at most
# LARGEST_FULL_RESOLUTION_IMAGE px: larger images belong to an ImageNet-stem architecture.
FIXED_DOWNSAMPLING = {"convnet": 4, "vgg16": 32, "vgg19": 32}
STEM_DOWNSAMPLING = {"cifar": 8, "imagenet": 32}
LARGEST_AUTO_CIFAR_STEM_IMAGE = 64  # models.LARGEST_CIFAR_STEM_IMAGE: the stem chosen when none is set
SMALLEST_IMAGE = 8
LARGEST_FULL_RESOLUTION_IMAGE = 128


def check_image_size(model: dict, model_name: str, user: str, described: dict, dataset: str) -> None:
    """The dataset's image side suits the model trained on it (see the rule above)."""
    side, arch = described["image_size"], model["arch"]
    stem = model.get("stem")
    if arch in FIXED_DOWNSAMPLING:
        factor, what = FIXED_DOWNSAMPLING[arch], arch
        full_resolution = arch == "convnet"
    else:
        chosen = stem or ("cifar" if side <= LARGEST_AUTO_CIFAR_STEM_IMAGE else "imagenet")
        factor, what = STEM_DOWNSAMPLING[chosen], f"{arch}, {chosen} stem"
        full_resolution = stem == "cifar"
    smallest = max(SMALLEST_IMAGE, factor)
    key = f"datasets.{dataset}.image_size"
    if side < smallest:
        raise ConfigError(f"{key}: {side} px is too small for model '{model_name}' ({what}, used by {user}): it "
                          f"needs at least {smallest} px (it downsamples {factor}×; no model trains on less than "
                          f"{SMALLEST_IMAGE} px)")
    if full_resolution and side > LARGEST_FULL_RESOLUTION_IMAGE:
        fix = "leave stem unset or set stem: imagenet" if stem == "cifar" else "use e.g. resnet18, whose ImageNet stem downsamples first"
        raise ConfigError(f"{key}: {side} px is too large for model '{model_name}' ({what}, used by {user}): its "
                          f"first convolutions run at full resolution, meant for images up to "
                          f"{LARGEST_FULL_RESOLUTION_IMAGE} px ({fix})")


def check_features(entry: dict, key: str) -> None:
    """What the schema cannot say about a features entry: its ranges are ordered (low ≤ high)."""
    for name in ("crop_scale", "crop_ratio"):
        if name in entry and not entry[name][0] <= entry[name][1]:
            raise ConfigError(f"{key}.{name}: needs low <= high, got {list(entry[name])}")


def check_reserve(entry: dict, fragment: kinds.Fragment, described: dict, key: str, dataset: str) -> None:
    """A defense that uses clean data (``checks.reserve`` in its fragment) gets a non-empty reserve."""
    if fragment.checks.get("reserve") and sum(described["reserve_counts"]) < 1:
        raise ConfigError(f"datasets.{dataset}.reserve: defense '{key.split('.', 1)[1]}' needs clean data, but "
                          f"the reserve of dataset '{dataset}' is empty (set a reserve fraction above 0)")


def lookup(entry: dict, path: str):
    """``entry``'s value at a dotted path (``trigger.size``)."""
    value = entry
    for part in path.split("."):
        value = value[part]
    return value


def reserve_counts(counts: list[int], fraction: float) -> list[int]:
    """Per-class sizes of the reserve: ``fraction`` of each class, rounded half up."""
    return [int(math.floor(fraction * count + 0.5)) for count in counts]


def load(path_or_dict: str | Path | dict) -> Config:
    if isinstance(path_or_dict, (str, Path)):
        raw: Any = read_yaml(path_or_dict)
    else:
        raw = path_or_dict
    if not isinstance(raw, dict):
        raise ConfigError("config: must be a mapping")
    return Config(raw)
