# poisonflow: data → surrogate → scores → trigger → poison → features → victim → split → defense
# (and robustness, from the victims) → aggregate.
# Every rule shells out to `poisonflow <stage>`; its params carry the resolved config entry it
# depends on and a hash of the source it runs, so an edit reruns exactly what it invalidates.
# What the rules ask of the config (paths, specs, code hashes, resources) comes from
# poisonflow.workflow_helpers.Plan, computed once per name.
#
# Every rule names workflow/envs/poisonflow.yaml as its conda environment (so `snakemake --lint` is
# clean); without `--sdm conda` it is not used and rules run the `poisonflow` of the environment
# Snakemake runs in. Building it with `--sdm conda` is untested: it installs this checkout by a
# relative path. There is no published container image yet.

import os
import sys

from poisonflow.errors import PoisonflowError
from poisonflow.workflow_helpers import Plan, limit_gpus


configfile: "config.yaml"


try:
    PLAN = Plan.from_snakemake(config, workflow)
except PoisonflowError as error:
    sys.exit(f"config: {error}")  # one line, before any job (a bad entry name, key, value or file)

# At most as many GPU jobs at once as there are GPUs, whatever --resources says (see README).
limit_gpus(workflow)
# Progress bars in job logs: one line per update, at most every 30 s (poisonflow.progress does
# this itself; this also slows the bars that still call tqdm directly).
os.environ.setdefault("TQDM_MININTERVAL", "30")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/surrogate.smk"
include: "workflow/rules/scores.smk"
include: "workflow/rules/triggers.smk"
include: "workflow/rules/poison.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/victim.smk"
include: "workflow/rules/split.smk"
include: "workflow/rules/defense.smk"
include: "workflow/rules/robustness.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/aggregate.smk"


onsuccess:
    PLAN.finish()


onerror:
    PLAN.finish()


rule all:
    default_target: True
    input:
        rules.aggregate.output,
