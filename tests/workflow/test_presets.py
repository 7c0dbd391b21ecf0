"""Every preset under workflow/presets/ dry-runs, plans exactly the jobs of its paper table, and
merges cleanly over the default config (as `--configfile` does)."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import yaml

from workflow_utils import REPO, snakemake

PRESETS = REPO / "workflow" / "presets"
SECTIONS = ["datasets", "models", "trainings", "surrogates", "attacks", "defenses", "figures"]
SEEDS = 5  # the hard-sample paper's tables: mean ± std over 5 runs
SELECTIONS = 4  # random ("Vanilla"), loss value, gradient norm, forgetting events
UE_METHODS = 8  # TAP, EM, REM, EntF, LSP, OPS, AR, TriggerUE

# What each preset must plan: victims (= poisoned sets × trainings × seeds) and defense jobs,
# written as the table's size. A defense of kind `none` runs no job (the aggregate reads the
# victim's metrics), so presets compared against no defense plan no defense job.
EXPECTED = {
    "hard-sample-table1.yaml": {"victim": 4 * SELECTIONS * SEEDS, "poison": 4 * SELECTIONS * SEEDS,
                                "surrogate": 2, "scores": 2, "figure_forgetting": 1, "figure_tsne": 1},
    "hard-sample-table2.yaml": {"victim": 4 * SELECTIONS * SEEDS, "poison": 4 * SELECTIONS * SEEDS,
                                "surrogate": 2, "scores": 2},
    "hard-sample-table3.yaml": {"victim": 3 * SELECTIONS * SEEDS, "poison": 3 * SELECTIONS * SEEDS,
                                "surrogate": 1, "scores": 1},
    "hard-sample-table4.yaml": {"victim": 4 * SELECTIONS * SEEDS, "poison": 4 * SELECTIONS * SEEDS,
                                "surrogate": 1, "scores": 1},
    "hard-sample-table5.yaml": {"victim": 2 * SELECTIONS * SEEDS, "poison": 2 * SELECTIONS * SEEDS,
                                "surrogate": 1, "scores": 1},
    # 5 CIFAR-10 rates and 4 ImageNet-50 rates
    "hard-sample-rate.yaml": {"victim": (5 + 4) * SELECTIONS * SEEDS, "poison": (5 + 4) * SELECTIONS * SEEDS,
                              "surrogate": 2, "scores": 2},
    # (1 random + 3 metrics × 4 surrogates) × 4 victims
    "hard-sample-transfer.yaml": {"victim": (1 + 3 * 4) * 4 * SEEDS, "poison": (1 + 3 * 4) * SEEDS,
                                  "surrogate": 4, "scores": 4},
    # fine-pruning 10/20/30%, NAD, Auto-Encoder, ShrinkPad, STRIP, SentiNet (and none: no job)
    "hard-sample-defenses.yaml": {"victim": SELECTIONS * SEEDS, "defense": SELECTIONS * SEEDS * 8,
                                  "poison": SELECTIONS * SEEDS, "surrogate": 1, "scores": 1},
    # one run per cell, as the paper reports; TAP's clean and EntF's robust surrogate per dataset
    # + 1: the Clean reference row (kind: none)
    "triggerue-table1.yaml": {"victim": 4 * (UE_METHODS + 1), "poison": 4 * (UE_METHODS + 1), "surrogate": 4 * 2},
    "triggerue-table2.yaml": {"victim": 5, "poison": 5, "surrogate": 2},
    "triggerue-table3.yaml": {"victim": 3 + 1, "poison": 3 + 1},
    # standard, +Cutout, +CutMix, +Mixup, +adversarial training
    "triggerue-table4.yaml": {"victim": (UE_METHODS + 1) * 5, "poison": UE_METHODS + 1, "surrogate": 2},
    # EM, TriggerUE × NAD, ABL
    "triggerue-table5.yaml": {"victim": 2, "defense": 2 * 2, "poison": 2},
    # 12 attacks (the clean reference, 11 backdoors) × 3 seeds; the `clean` and `robust` surrogates,
    # one learned trigger (TrojanNN's)
    "trigger-zoo-digits.yaml": {"victim": 14 * 3, "poison": 14 * 3, "surrogate": 2, "trigger": 3},
    # the default's three experiments at 32 px: (2 + 4 + 4) attacks × 3 seeds, a poison job and a
    # victim each; A-ABL and fine-pruning against badnets and blended
    # GSSD on CIFAR-10: 7 attacks + BadNets at 0.1% (H.1); a SimCLR features job per poisoned set;
    # 7 × (NAD β × 5 + ABL γ × 3 + GSSD) + H.1 (ABL × 3, GSSD) + J.1 (3 discriminative)
    # (GSSD's and DBD's SIMCLR: two each) 7 × (NAD β × 5 + ABL γ × 3 + DBD + ASD + GSSD) + H.1 (ABL × 3,
    # DBD, ASD, GSSD) + J.1 (3 discriminative)
    # + appendix I: the adaptive attack (its generator, a victim, GSSD)
    "gssd-cifar10.yaml": {"victim": 8 + 1, "poison": 8 + 1, "features": 2 * 8 + 1, "surrogate": 1, "trigger": 1 + 1,
                          "defense": 7 * (5 + 3 + 3) + (3 + 3) + 3 + 1, "figure_embedding": 1},
    # appendix K: K.1 4 attacks × 6 (α_C, α_P); K.2/K.4 2 LC rates × (4 β_D + 4 λ); K.6 4 rates × 5 β_ND;
    # K.3/K.5 3 ImageNet-30 rates × 8; K.7 2 rates × 4 β_ND; one victim and features job per poisoned set
    "gssd-hparams.yaml": {"victim": 9 + 5, "poison": 9 + 5, "features": 9 + 5, "surrogate": 1,
                          "defense": 4 * 6 + 2 * 8 + 4 * 5 + 3 * 8 + 2 * 4},
    # the same comparison without H.1 and J.1 on ImageNet-30 and VGGFace2-30
    "gssd-imagenet30.yaml": {"victim": 7, "poison": 7, "features": 2 * 7, "surrogate": 1, "trigger": 1,
                             "defense": 7 * (5 + 3 + 3)},
    # VSSC: 10 attacks at 5% on ResNet-18 (7 defenses, 4 robustness entries each) and VGG19-BN, 10 at
    # 10% on ResNet-18, and the selection's attack; generators: TrojanNN, Input-Aware, SSBA, the selection
    "vssc-imagenet-dogs.yaml": {"victim": 10 + 10 + 10 + 1, "poison": 10 + 10 + 1, "defense": 10 * 7,
                                "robustness": 10 * 4, "trigger": 4, "surrogate": 1, "figure_gradcam": 1},
    "vssc-food11.yaml": {"victim": 10 + 10 + 10 + 1, "poison": 10 + 10 + 1, "defense": 10 * 7,
                         "robustness": 10 * 4, "trigger": 4, "surrogate": 1, "figure_gradcam": 1},
    # VSSC on digits: 4 attacks × 3 seeds × 7 defenses and 4 robustness entries (the victims are config.yaml's)
    "vssc-digits.yaml": {"victim": 12, "poison": 12, "defense": 12 * 7, "robustness": 12 * 4, "figure_gradcam": 1},
    "gssd-vggface2.yaml": {"victim": 7, "poison": 7, "features": 2 * 7, "surrogate": 1, "trigger": 1,
                           "defense": 7 * (5 + 3 + 3)},
    # (A-ABL's split a job of its own: one per A-ABL job)
    # A-ABL on CIFAR-10: 8 attacks (No-Attack included) + 18 rate variants; victims: 8 ResNet-18, 8 × 3
    # other architectures, 18; defenses: 8 × 7 (Tables 1-3) + 7 × 3 (Tables 4, 5) + 24 (Table 6) + 18;
    # splits: A-ABL 8 + 24 + 18, D-ST 8 (shared by D-ST-AT), Table 5's two A-ABL variants 7 each
    # + Figure 7 (Adv-Train on the 18 rate sets), Figure 6 (7 attacks × 4 ε)
    "aabl-cifar10.yaml": {"victim": 8 + 24 + 18, "poison": 8 + 18, "defense": 8 * 7 + 7 * 3 + 24 + 18 + 18 + 7 * 4,
                          "split": 8 + 24 + 18 + 8 + 2 * 7, "features": 8, "surrogate": 2, "trigger": 3,
                          "robustness": 8 * 2, "figure_curves": 2,  # Figures 3, 5 (naive victims), 8, 10
                          "figure_scores": 2},  # Figures 4 (and 9), 11
    # Tables 1-3 on GTSRB and Tiny-ImageNet: 8 attacks × 7 defense jobs each; splits of A-ABL and D-ST;
    # LC's surrogate and Trojan's per dataset; the three generators per dataset
    "aabl-gtsrb-tinyimagenet.yaml": {"victim": 2 * 8, "poison": 2 * 8, "defense": 2 * 8 * 7, "split": 2 * 8 * 2,
                                     "features": 2 * 8, "surrogate": 2 * 2, "trigger": 2 * 3},
    # the default's former third and fourth experiments: 4 selections + 4 unlearnable/clean sets, 3 seeds
    # A-ABL's baselines on digits: 3 attacks × 3 seeds × 6 defenses (the victims and the features
    # of blended and badnets are config.yaml's, planned here too); splits of A-ABL and D-ST
    "aabl-digits.yaml": {"victim": 9, "poison": 9, "defense": 9 * 6, "split": 9 * 2, "features": 9,
                         "figure_scores": 2},
    "digits-hard-sample.yaml": {"victim": 24, "poison": 24, "surrogate": 1, "scores": 1},
    "digits-32px.yaml": {"victim": 30, "poison": 30, "defense": 12, "split": 6, "surrogate": 1, "scores": 1},
}


def placeholder_root(workdir: Path, spec: dict) -> None:
    """Create what a source's config check looks for under ``root`` without any real data: the
    archive names the sources accept (their checksums are verified when the data job reads them,
    not in a dry run), or the image folder's train/ (class counts come from the config)."""
    root = workdir / spec["root"]
    files = {"cifar10": ["cifar-10-python.tar.gz"], "cifar100": ["cifar-100-python.tar.gz"],
             "svhn": ["train_32x32.mat", "test_32x32.mat"], "tiny-imagenet": ["tiny-imagenet-200.zip"],
             "gtsrb": ["GTSRB-Training_fixed.zip", "GTSRB_Final_Test_Images.zip", "GTSRB_Final_Test_GT.zip"]}
    if spec["source"] == "imagefolder":
        (root / spec.get("train_dir", "train")).mkdir(parents=True, exist_ok=True)
        if "train_per_class" not in spec:  # the classes are counted from their folders: 40 empty files each
            for split in (spec.get("train_dir", "train"), spec.get("test_dir", "val")):
                for name in spec.get("classes", []):
                    (root / split / name).mkdir(parents=True, exist_ok=True)
                    for i in range(40):
                        (root / split / name / f"{i}.jpg").touch()
        return
    root.mkdir(parents=True, exist_ok=True)
    for name in files[spec["source"]]:
        (root / name).touch()


def job_counts(workdir: Path, preset_path: Path) -> dict[str, int]:
    """Jobs per rule of a dry run with ``--configfile``, from Snakemake's job-stats table (``all`` left out)."""
    result = snakemake(workdir, "--dry-run", "--configfile", str(preset_path))
    lines = (result.stdout + result.stderr).splitlines()
    start = lines.index("Job stats:") + 3  # title, header, rule of dashes
    counts = {}
    for line in lines[start:]:
        rule, count = line.split()
        if rule == "total":
            return counts
        if rule != "all":
            counts[rule] = int(count)
    raise AssertionError("no job-stats total in the dry run's output")


def preset(name: str) -> dict:
    return yaml.safe_load((PRESETS / name).read_text())


def merged_over_default(config: dict) -> dict:
    """The config Snakemake builds from the default config.yaml and ``--configfile`` (a recursive
    update: mappings merge, everything else is replaced)."""
    from snakemake.utils import update_config

    merged = yaml.safe_load((REPO / "config.yaml").read_text())
    update_config(merged, copy.deepcopy(config))
    return merged


def test_every_preset_has_an_expectation():
    assert sorted(p.name for p in PRESETS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_dry_run_plans_the_table(name, tmp_path):
    config = preset(name)
    shutil.copy(REPO / "config.yaml", tmp_path / "config.yaml")  # the user's checkout has it too
    for spec in config.get("datasets", {}).values():  # a preset may use config.yaml's datasets
        if "root" in spec:
            placeholder_root(tmp_path, spec)
    counts = job_counts(tmp_path, PRESETS / name)
    expected = {"data": len({j for e in config["experiments"] for j in e["dataset"]}), "aggregate": 1,
                **EXPECTED[name]}
    assert dict(counts) == expected


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_entries_survive_the_merge_with_the_default_config(name):
    config = preset(name)
    merged = merged_over_default(config)
    for section in SECTIONS:
        for entry, value in config.get(section, {}).items():
            assert merged[section][entry] == value, f"{name}: {section}.{entry} is changed by config.yaml"
    assert merged["experiments"] == config["experiments"]


def test_entries_shared_between_presets_are_identical():
    """Presets share results by name (results/poison/{dataset}/{attack}/...): an entry name must
    mean the same thing in every preset, or running one preset would invalidate another's jobs."""
    seen: dict[tuple[str, str], tuple[str, object]] = {}
    for name in sorted(EXPECTED):
        config = preset(name)
        for section in SECTIONS:
            for entry, value in config.get(section, {}).items():
                first = seen.setdefault((section, entry), (name, value))
                assert first[1] == value, f"{section}.{entry} differs between {first[0]} and {name}"
