# Names shared by the rule files. The helpers themselves live in poisonflow.workflow_helpers
# (importable and tested without Snakemake); PLAN is built by the Snakefile.

from poisonflow.attacks import kind_registry  # noqa: F401  (used by triggers.smk)
from poisonflow.codehash import code_hash  # noqa: F401  (used by triggers.smk)
from poisonflow.workflow_helpers import as_json  # noqa: F401  (used by triggers.smk)

CFG = PLAN.cfg
RESULTS = PLAN.results
THREADS = PLAN.threads
# The command every rule runs: `poisonflow`, or the warm runner with `group_small_jobs`.
POISONFLOW = PLAN.command


wildcard_constraints:
    dataset=r"[A-Za-z0-9_][A-Za-z0-9._-]*",
    attack=r"[A-Za-z0-9_][A-Za-z0-9._-]*",
    training=r"[A-Za-z0-9_][A-Za-z0-9._-]*",
    defense=r"[A-Za-z0-9_][A-Za-z0-9._-]*",
    surrogate=r"[A-Za-z0-9_][A-Za-z0-9._-]*",
    generator=r"[A-Za-z0-9_][A-Za-z0-9._-]*",
    figure=r"[A-Za-z0-9_][A-Za-z0-9._-]*",
    features=r"[A-Za-z0-9_][A-Za-z0-9._-]*",
    robustness=r"[A-Za-z0-9_][A-Za-z0-9._-]*",
    seed=r"[0-9]+",
