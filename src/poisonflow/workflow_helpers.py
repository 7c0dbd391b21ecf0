"""What the Snakemake rules (``workflow/rules/*.smk``) ask of the config, per job.

The Snakefile builds one :class:`Plan` from Snakemake's ``config`` and ``workflow`` objects; the
rules take their inputs, params, resources, logs and groups from it. It is imported when the
workflow is parsed (every Snakemake call, dry runs included), so it imports no torch; and what a
rule asks per job (a resolved entry as JSON, a code hash, a path) is computed once per name and
cached: a 10,000-job workflow asks the same few hundred questions.

Also here: :func:`limit_gpus` (Snakemake's ``gpu`` resource set to the GPUs this machine has)
and the per-rule resource estimates (:data:`MEMORY`).
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import sys
from functools import lru_cache
from pathlib import Path
from typing import Callable

from . import kinds
from .codehash import code_hash
from .config import Config, ConfigError, read_yaml
from .devices import gpu_count

RESULTS = "results"


def describe_cache() -> Path:
    """Where the descriptions of file-less datasets (digits, synthetic) are kept between runs:
    ``$XDG_CACHE_HOME/poisonflow/describe.json`` (default ``~/.cache``)."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "poisonflow" / "describe.json"


# The rules, and the stage each runs. The training stages declare gpu=1.
RULE_STAGES = {"data": "data", "surrogate": "surrogate", "scores": "scores", "trigger": "trigger",
               "poison": "poison", "features": "features", "features_clip": "features", "victim": "victim",
               "split": "split", "robustness": "robustness",
               "defense": "defense", "aggregate": "aggregate", "figure_forgetting": "figures",
               "figure_tsne": "figures", "figure_embedding": "figures", "figure_gradcam": "figures",
               "figure_curves": "figures", "figure_scores": "figures"}
GPU_RULES = ("surrogate", "scores", "trigger", "poison", "features", "features_clip", "victim", "split", "defense",
             "robustness", "figure_tsne", "figure_embedding", "figure_gradcam")

# Peak resident memory of a job, MiB: BASE plus FACTOR × the dataset's uint8 images (train,
# reserve and test) in MiB, rounded up to 256 MiB and raised by half on each retry. Measured with
# /usr/bin/time on the default digits config (32 px; 1,797 images = 5 MiB): data 1,065 MiB,
# poison 1,143-1,228, surrogate 1,199, scores 1,302, victim 1,228-1,402, defense 1,234-1,367,
# aggregate 119. Nearly all of it is torch and its libraries (importing torch and torchvision
# alone takes 0.9 GiB), so BASE is that plus a margin; FACTOR covers the copies a stage holds of
# the images (the store's arrays, the poisoned copy, float batches), an estimate: no dataset
# larger than digits was measured. `workflow: {resources: {<rule>: {mem_mb: N}}}` overrides it.
# features and features_clip (not measured) are taken as a surrogate, plus CLIP's weights.
MEMORY = {  # rule: (BASE, FACTOR)
    "data": (1280, 4), "surrogate": (1536, 4), "scores": (1536, 4), "trigger": (1536, 4),
    "poison": (1536, 4), "features": (1536, 4), "features_clip": (2560, 4), "victim": (1536, 4),
    "split": (1536, 6), "defense": (1536, 6), "robustness": (1536, 4), "aggregate": (512, 0),
    "figure_forgetting": (768, 1), "figure_tsne": (1536, 4), "figure_embedding": (1536, 4),
    "figure_gradcam": (1536, 4), "figure_curves": (768, 0), "figure_scores": (768, 0),
}
GPU_HOST_MEMORY = 1024  # not measured here (no GPU on the machine); a retry asks 1.5× more
# Declared run times (minutes; a cluster's time limit), unchanged from the paper-scale presets.
RUNTIME = {"data": 240, "surrogate": 720, "scores": 240, "trigger": 720, "poison": 240, "features": 1440, "split": 1440,
           "features_clip": 240, "victim": 1440, "defense": 2880, "aggregate": 60, "figure_forgetting": 60,
           "figure_tsne": 240, "figure_embedding": 240, "robustness": 240, "figure_gradcam": 60,
           "figure_curves": 60, "figure_scores": 60}
# Jobs per group when the config asks for grouping with `workflow: {group_small_jobs: true}`.
DEFAULT_GROUP_SIZE = 20


def as_json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


class Plan:
    """The config as the rules see it: entries, code hashes and paths per wildcard value."""

    def __init__(self, cfg: Config, results: str = RESULTS, cluster: bool = False):
        self.cfg = cfg
        self.cluster = cluster  # jobs go to a cluster scheduler (--jobs with an executor)
        self.results = results
        self.data = cfg.data
        self.figures = cfg.data["figures"]
        self.feature_entries = cfg.data["features"]
        self.options = cfg.data["workflow"]
        self.threads = cfg.data["threads"]
        self.jobs = list(cfg.jobs())
        # defenses entries of kind `none` run no job: the aggregate reads the victim's metrics
        self.undefended = {name for name, entry in cfg.data["defenses"].items() if entry["kind"] == "none"}
        self._gpus = None

    @classmethod
    def from_snakemake(cls, config: dict, workflow) -> "Plan":
        """The plan of a Snakemake run: the config files Snakemake read are read again refusing
        duplicate keys (Snakemake's loader keeps the later value), then checked as a whole."""
        for path in dict.fromkeys(str(p) for p in workflow.configfiles):
            if Path(path).exists():
                read_yaml(path)
        cfg = Config(config, describe_cache=describe_cache())
        from .stages.figures import check_figures  # no torch at import; its checks need the described datasets
        from .stages.robustness import check_entries as check_robustness

        check_figures(cfg.data, cfg.describe)
        check_robustness(cfg.data)
        unknown = sorted(set(cfg.data["workflow"]["resources"]) - set(RULE_STAGES))
        if unknown:
            raise ConfigError(f"workflow.resources.{unknown[0]}: no rule of that name "
                              f"(rules: {', '.join(RULE_STAGES)})")
        return cls(cfg, cluster=workflow.global_resources.get("_nodes").value is not None)

    # -- params: resolved entries and code hashes ------------------------------------------------
    def spec(self, section: str, wildcard: str | None = None) -> Callable:
        """Params function: the resolved ``section`` entry named by the wildcard, as JSON."""
        field, cfg = wildcard or section, self.cfg

        def spec(wildcards):
            return cfg.spec_json(section, getattr(wildcards, field))

        return spec

    def evaluation(self) -> str:
        return self.cfg.spec_json("evaluation")

    def code(self, stage: str, section: str | None = None, wildcard: str | None = None):
        """Code hash of a stage (a string), or a params function adding the one kind module a job
        runs (its ``section`` entry named by the wildcard: dataset source, attack or defense kind)."""
        module = f"poisonflow.stages.{stage}"
        if section is None:
            return code_hash(module)
        field = wildcard or section

        def code(wildcards):
            return self._kind_code(module, section, getattr(wildcards, field))

        return code

    @lru_cache(maxsize=None)
    def _kind_code(self, module: str, section: str, name: str) -> str:
        return code_hash(module, self.kind_module(section, name))

    def kind_module(self, section: str, name: str) -> str:
        if section == "dataset":
            return kinds.SOURCES.fragment(self.data["datasets"][name]["source"]).module
        if section in ("attack", "generator"):
            return kinds.ATTACK_KINDS.fragment(self.data[f"{section}s"][name]["kind"]).module
        if section == "defense":
            return kinds.DEFENSES.fragment(self.data["defenses"][name]["kind"]).module
        raise ValueError(f"no kind for section {section}")

    # -- inputs and options ----------------------------------------------------------------------
    def poison_inputs(self, wildcards) -> dict:
        attack = self.data["attacks"][wildcards.attack]
        root = f"{self.results}/{{}}/{wildcards.dataset}"
        inputs = {"clean": f"{self.results}/data/{wildcards.dataset}.zarr"}
        if "surrogate" in attack:
            inputs["surrogate"] = root.format("surrogates") + f"/{attack['surrogate']}/model.pt"
        if attack.get("selection", "random") != "random":
            inputs["scores"] = root.format("scores") + f"/{attack['surrogate']}.csv"
        if "generator" in attack:
            inputs["generator"] = root.format("triggers") + f"/{attack['generator']}/generator.pt"
        return inputs

    @staticmethod
    def poison_options(wildcards, input) -> list[str]:
        """Optional arguments of ``poisonflow poison``, one list item per shell word (quoted by ``:q``)."""
        options = []
        if "scores" in input.keys():
            options += ["--scores", input.scores]
        if "surrogate" in input.keys():
            options += ["--surrogate-dir", os.path.dirname(input.surrogate)]
        if "generator" in input.keys():
            options += ["--generator-dir", os.path.dirname(input.generator)]
        return options

    def trigger_inputs(self, wildcards) -> dict:
        """Inputs of the trigger rule (a learned trigger: the clean store, and its surrogate if any)."""
        entry = self.data["generators"][wildcards.generator]
        inputs = {"clean": f"{self.results}/data/{wildcards.dataset}.zarr"}
        if "surrogate" in entry:
            inputs["surrogate"] = f"{self.results}/surrogates/{wildcards.dataset}/{entry['surrogate']}/model.pt"
        return inputs

    @staticmethod
    def trigger_options(wildcards, input) -> list[str]:
        return ["--surrogate-dir", os.path.dirname(input.surrogate)] if "surrogate" in input.keys() else []

    @staticmethod
    def dirname(name: str, of: str = "output") -> Callable:
        """Params function: the folder of the job's ``of`` (input or output) file ``name``."""
        if of == "input":
            return lambda wildcards, input: os.path.dirname(input[name])
        return lambda wildcards, output: os.path.dirname(output[name])

    def surrogate_seed(self, wildcards) -> int:
        return self.data["surrogates"][wildcards.surrogate]["seed"]

    # -- the aggregate ---------------------------------------------------------------------------
    def defense_metrics(self) -> list[str]:
        """metrics.json of every defense job (kind `none` excepted: see :meth:`undefended_metrics`)."""
        return list(dict.fromkeys(
            f"{self.results}/defenses/{j.dataset}/{j.attack}/{j.training}/seed{j.seed}/{j.defense}/metrics.json"
            for j in self.jobs if j.defense not in self.undefended))

    def _victim_metrics(self, job) -> str:
        return f"{self.results}/victims/{job.dataset}/{job.attack}/{job.training}/seed{job.seed}/metrics.json"

    def undefended_metrics(self) -> list[str]:
        """The victims' metrics.json that stand for the jobs of a `kind: none` defense."""
        return list(dict.fromkeys(self._victim_metrics(j) for j in self.jobs if j.defense in self.undefended))

    def robustness_outputs(self) -> list[str]:
        """The JSON of every robustness job (victim × robustness entry of the experiments)."""
        return [f"{self.results}/robustness/{j.dataset}/{j.attack}/{j.training}/seed{j.seed}/{j.robustness}.json"
                for j in self.cfg.robustness_jobs()]

    def robustness_spec(self, wildcards) -> str:
        return as_json(self.data["robustness"][wildcards.robustness])

    def robustness_wildcard(self) -> str:
        return names_pattern(self.data["robustness"])

    def undefended_pairs(self) -> list[str]:
        """``DEFENSE=VICTIM_METRICS`` for ``poisonflow aggregate --undefended``."""
        return list(dict.fromkeys(f"{j.defense}={self._victim_metrics(j)}" for j in self.jobs
                                  if j.defense in self.undefended))

    def defense_inputs(self, wildcards) -> dict:
        """Inputs of the defense rule: the stores and the victim, and for an entry that names a
        features entry, that entry's features of the same poisoned store (shared by every defense
        naming it)."""
        root = f"{self.results}/{{}}/{wildcards.dataset}/{wildcards.attack}"
        victim = root.format("victims") + f"/{wildcards.training}/seed{wildcards.seed}"
        inputs = {"clean": f"{self.results}/data/{wildcards.dataset}.zarr",
                  "poison": root.format("poison") + f"/seed{wildcards.seed}.zarr",
                  "victim": f"{victim}/model.pt", "victim_metrics": f"{victim}/metrics.json"}
        entry = self.data["defenses"][wildcards.defense]
        features = entry.get("features")
        if features is not None:
            inputs["features"] = root.format("features") + f"/{features}/seed{wildcards.seed}/features.npz"
        splitter = entry.get("splitter") or (wildcards.defense if self.splits(wildcards.defense) else None)
        if splitter is not None:
            inputs["split"] = self.split_path(wildcards, splitter)
        return inputs

    def split_path(self, wildcards, defense: str) -> str:
        return (f"{self.results}/splits/{wildcards.dataset}/{wildcards.attack}/{wildcards.training}"
                f"/seed{wildcards.seed}/{defense}/split.npz")

    @staticmethod
    def defense_options(wildcards, input) -> list[str]:
        """Optional arguments of ``poisonflow defense``, one list item per shell word."""
        options = []
        for name in ("features", "split"):
            if name in input.keys():
                options += [f"--{name}", input[name]]
        return options

    # -- splits: a splitting defense's split as its own job ---------------------------------------
    def splits(self, defense: str) -> tuple:
        """The entry keys the split of defenses entry ``defense`` depends on (empty: it does not split)."""
        return kinds.DEFENSES.fragment(self.data["defenses"][defense]["kind"]).split

    def split_wildcard(self) -> str:
        """A wildcard pattern matching the defenses entries whose kind splits."""
        return names_pattern(name for name in self.data["defenses"] if self.splits(name))

    def split_spec(self, wildcards) -> str:
        """The entry restricted to its kind and its split keys (resolved): editing any other key
        leaves the split job's params, and so the split, as they are."""
        entry = self.cfg.defense(wildcards.defense)
        keys = ("kind", *self.splits(wildcards.defense))
        return as_json({key: entry[key] for key in keys if key in entry})

    def defense_wildcard(self) -> str:
        """A wildcard pattern matching the defenses entries that run a job (not kind `none`)."""
        return names_pattern(name for name in self.data["defenses"] if name not in self.undefended)

    def poison_benchmarks(self) -> list[str]:
        """The poison rule's benchmark file of every poisoned set the jobs use (generation time)."""
        return list(dict.fromkeys(f"{self.results}/benchmarks/poison/{j.dataset}/{j.attack}/seed{j.seed}.tsv"
                                  for j in self.jobs))

    def defense_benchmarks(self) -> list[str]:
        """The defense rule's benchmark file of every defense job (its wall clock, for the runtime view)."""
        return list(dict.fromkeys(
            f"{self.results}/benchmarks/defense/{j.dataset}/{j.attack}/{j.training}/seed{j.seed}/{j.defense}.tsv"
            for j in self.jobs if j.defense not in self.undefended))

    def features_benchmarks(self) -> list[str]:
        """The features rules' benchmark file of every features job a defense job reads."""
        out = []
        for j in self.jobs:
            features = self.data["defenses"][j.defense].get("features")
            if features is not None and j.defense not in self.undefended:
                out.append(f"{self.results}/benchmarks/features/{j.dataset}/{j.attack}/{features}/seed{j.seed}.tsv")
        return list(dict.fromkeys(out))

    def names(self, field: str) -> list[str]:
        """Names of ``field`` (dataset, attack, training, defense) used by the jobs, in config order."""
        return list(dict.fromkeys(getattr(job, field) for job in self.jobs))

    def experiment_description(self) -> str:
        """The resolved entries the report views read their parameters from (rate, target, pattern,
        selection, surrogate and victim architectures), and the config order of the names (JSON)."""
        return as_json({
            "order": {field: self.names(field) for field in ("dataset", "attack", "training", "defense")},
            "attacks": {name: self.cfg.attack(name) for name in self.names("attack")},
            "trainings": {name: self.cfg.training(name) for name in self.names("training")},
            "defenses": {name: self.cfg.defense(name) for name in self.names("defense")},
            "sweeps": self.cfg.sweeps,
        })

    # -- features of a poisoned store -------------------------------------------------------------
    def features_wildcard(self, extractor: str) -> str:
        """A wildcard pattern matching exactly the names of the features entries of this extractor
        (each extractor has its own rule: only SimCLR writes a backbone)."""
        return names_pattern(name for name, entry in self.feature_entries.items() if entry["extractor"] == extractor)

    # -- figures from stored artifacts -----------------------------------------------------------
    def configured_figures(self) -> list[str]:
        return [f"{self.results}/figures/{entry['kind']}/{name}.png" for name, entry in self.figures.items()]

    def figure_wildcard(self, kind: str) -> str:
        """A wildcard pattern matching exactly the names of the figures of this kind."""
        return names_pattern(name for name, entry in self.figures.items() if entry["kind"] == kind)

    def forgetting_inputs(self, wildcards) -> dict:
        entry = self.figures[wildcards.figure]
        return {"clean": f"{self.results}/data/{entry['dataset']}.zarr",
                "dynamics": f"{self.results}/surrogates/{entry['dataset']}/{entry['surrogate']}/dynamics.npz"}

    def figure_models(self, wildcards) -> dict:
        """The models a learning-curves or sample-scores figure reads beside (curves.csv, scores.npz):
        the victims', or its ``defense``'s, one per attack."""
        entry = self.figures[wildcards.figure]
        if "defense" not in entry:
            return {"victims": self.tsne_inputs(wildcards)["victims"]}
        return {"victims": [f"{self.results}/defenses/{entry['dataset']}/{a}/{entry['training']}/seed{entry['seed']}"
                            f"/{entry['defense']}/model.pt" for a in entry["attacks"]]}

    def figure_robustness(self, wildcards) -> str:
        """The robustness entries a figure's ``distortions`` name (JSON), for ``--robustness``."""
        names = self.figures[wildcards.figure].get("distortions", {})
        return as_json({name: self.data["robustness"][name] for name in names})

    def tsne_inputs(self, wildcards) -> dict:
        entry = self.figures[wildcards.figure]
        root = f"{self.results}/{{}}/{entry['dataset']}"
        return {
            "poison": [root.format("poison") + f"/{a}/seed{entry['seed']}.zarr" for a in entry["attacks"]],
            "victims": [root.format("victims") + f"/{a}/{entry['training']}/seed{entry['seed']}/model.pt"
                        for a in entry["attacks"]],
        }

    def embedding_inputs(self, wildcards) -> dict:
        entry = self.figures[wildcards.figure]
        dataset, attack, seed = entry["dataset"], entry["attack"], entry["seed"]
        return {"clean": f"{self.results}/data/{dataset}.zarr",
                "poison": f"{self.results}/poison/{dataset}/{attack}/seed{seed}.zarr",
                "backbone": f"{self.results}/features/{dataset}/{attack}/{entry['features']}/seed{seed}/backbone.pt"}

    def figure_spec(self, wildcards) -> str:
        return as_json(self.figures[wildcards.figure])

    def figure_training(self, wildcards) -> str:
        return self.cfg.spec_json("training", self.figures[wildcards.figure]["training"])

    def figure_attacks(self, wildcards) -> list[str]:
        return list(self.figures[wildcards.figure]["attacks"])

    # -- logs, resources, groups, the command ----------------------------------------------------
    def log(self, rule: str, pattern: str) -> str:
        """The job's log file: ``results/logs/<rule>/<pattern>.log`` (pattern: its wildcards)."""
        return f"{self.results}/logs/{rule}/{pattern}.log"

    def mem_mb(self, rule: str) -> Callable:
        """Resource function: the job's memory in MiB (``workflow.resources.<rule>.mem_mb`` of the
        config wins; else :data:`MEMORY` scaled by the dataset's size, half again per retry)."""
        fixed = self.options["resources"].get(rule, {}).get("mem_mb")
        base, factor = MEMORY[rule]

        def mem_mb(wildcards, attempt):
            if fixed is not None:
                return fixed
            dataset = getattr(wildcards, "dataset", None)
            images = self.image_mib(dataset) if dataset else 0.0
            extra = GPU_HOST_MEMORY if rule in GPU_RULES and (self.cluster or self.gpus() > 0) else 0
            estimate = (base + factor * images + extra) * 1.5 ** (max(attempt, 1) - 1)
            return int(256 * math.ceil(estimate / 256))

        return mem_mb

    def runtime(self, rule: str) -> int:
        return self.options["resources"].get(rule, {}).get("runtime", RUNTIME[rule])

    def gpu(self, rule: str) -> int:
        return self.options["resources"].get(rule, {}).get("gpu", 1 if rule in GPU_RULES else 0)

    def gpus(self) -> int:
        if self._gpus is None:
            self._gpus = gpu_count()
        return self._gpus

    @lru_cache(maxsize=None)
    def image_mib(self, dataset: str) -> float:
        """MiB of the dataset's uint8 images (training set and reserve, and a test set taken as a
        quarter of them when the source does not say)."""
        described = self.cfg.describe(dataset)
        count = sum(described["train_counts"]) + sum(described["reserve_counts"])
        return 1.25 * count * described["image_size"] ** 2 * 3 / 2**20

    def group(self, rule: str) -> str | None:
        """The rule's group when the config asks for grouped jobs (a cluster then submits
        ``group_size`` jobs of a stage as one; set ``--group-components <rule>=N``)."""
        return f"{rule}-jobs" if self.options["group_small_jobs"] else None

    @property
    def group_size(self) -> int:
        value = self.options["group_small_jobs"]
        return DEFAULT_GROUP_SIZE if value is True else int(value or 1)

    def finish(self) -> None:
        """At the end of a run: let the warm server (``group_small_jobs``) leave now rather than idle."""
        if self.options["group_small_jobs"] and not self.cluster:
            from .warm import stop

            stop()

    @property
    def command(self) -> str:
        """How a job runs ``poisonflow``: the command itself, or, with ``group_small_jobs``, through
        the warm process of :mod:`poisonflow.warm` (torch imported once; same command line)."""
        if self.options["group_small_jobs"]:
            return f"{shlex.quote(sys.executable)} -m poisonflow.warm"
        return "poisonflow"


def names_pattern(names) -> str:
    """A regular expression matching exactly ``names`` (none: a pattern matching nothing)."""
    escaped = [re.escape(name) for name in names]
    return "|".join(escaped) if escaped else "(?!)"


def limit_gpus(workflow) -> int | None:
    """Run at most as many GPU jobs at once as this machine has GPUs: Snakemake's ``gpu`` resource
    is set to :func:`poisonflow.devices.gpu_count` (``--resources gpu=N`` may lower it, never raise
    it). Without a GPU nothing is limited (the jobs run on the CPU); on a cluster (``--jobs`` with
    an executor) the scheduler hands out GPUs and nothing is changed. Returns the limit set."""
    resources = workflow.global_resources
    nodes = resources.get("_nodes").value
    if nodes is not None or getattr(workflow, "remote_exec", False):
        return None
    count = gpu_count()
    if count == 0:
        return None
    given = resources.get("gpu").value
    limit = count if given is None else min(int(given), count)
    workflow.global_resources["gpu"] = limit
    return limit
