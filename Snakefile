# poisonflow: data → surrogate → scores → poison → victim → defense → aggregate.
# Every rule shells out to `poisonflow <stage>`; its params carry the resolved config entry it
# depends on and a hash of the source it runs, so an edit reruns exactly what it invalidates.

from pathlib import Path

from snakemake.exceptions import WorkflowError

from poisonflow.config import Config
from poisonflow.errors import PoisonflowError


configfile: "config.yaml"


try:
    CFG = Config(config)
except PoisonflowError as error:
    raise WorkflowError(f"config: {error}") from None


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/surrogate.smk"
include: "workflow/rules/scores.smk"
include: "workflow/rules/triggers.smk"
include: "workflow/rules/poison.smk"
include: "workflow/rules/victim.smk"
include: "workflow/rules/defense.smk"
include: "workflow/rules/aggregate.smk"


rule all:
    default_target: True
    input:
        rules.aggregate.output,
