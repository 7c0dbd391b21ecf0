# figures: one job per entry of the config's `figures:` section, drawn from stored artifacts
# (a surrogate's training dynamics, victim models and their poisoned stores) by
# `poisonflow figures` (the entry's kind picks the job); written to results/figures/{kind}/{name}.png.
# The entries are checked against the rest of the config here, before any job.

import re

from poisonflow.stages.figures import check_figures

try:
    check_figures(CFG.data, CFG.describe)
except PoisonflowError as error:
    raise WorkflowError(f"config: {error}") from None

FIGURES = CFG.data["figures"]


def figure_names(kind):
    """A wildcard pattern matching exactly the names of the figures of this kind."""
    names = [re.escape(name) for name, entry in FIGURES.items() if entry["kind"] == kind]
    return "|".join(names) if names else "(?!)"


def configured_figures():
    return [f"{RESULTS}/figures/{entry['kind']}/{name}.png" for name, entry in FIGURES.items()]


def tsne_inputs(w):
    entry = FIGURES[w.figure]
    return {
        "poison": [f"{RESULTS}/poison/{entry['dataset']}/{a}/seed{entry['seed']}.zarr" for a in entry["attacks"]],
        "victims": [f"{RESULTS}/victims/{entry['dataset']}/{a}/{entry['training']}/seed{entry['seed']}/model.pt"
                    for a in entry["attacks"]],
    }


rule figure_forgetting:
    input:
        clean=lambda w: f"{RESULTS}/data/{FIGURES[w.figure]['dataset']}.zarr",
        dynamics=lambda w: f"{RESULTS}/surrogates/{FIGURES[w.figure]['dataset']}/{FIGURES[w.figure]['surrogate']}/dynamics.npz",
    output:
        f"{RESULTS}/figures/forgetting/{{figure}}.png",
    wildcard_constraints:
        figure=figure_names("forgetting"),
    params:
        spec=lambda w: as_json(FIGURES[w.figure]),
        code=code_hash("poisonflow.stages.figures"),
    shell:
        "poisonflow figures --spec {params.spec:q} --clean {input.clean:q} --dynamics {input.dynamics:q}"
        " --out {output:q}"


rule figure_tsne:
    input:
        unpack(tsne_inputs),
    output:
        f"{RESULTS}/figures/tsne/{{figure}}.png",
    wildcard_constraints:
        figure=figure_names("tsne"),
    params:
        spec=lambda w: as_json(FIGURES[w.figure]),
        training=lambda w: as_json(CFG.training(FIGURES[w.figure]["training"])),
        names=lambda w: FIGURES[w.figure]["attacks"],
        code=code_hash("poisonflow.stages.figures"),
    threads: THREADS
    shell:
        "poisonflow figures --spec {params.spec:q} --training {params.training:q} --names {params.names:q}"
        " --poison {input.poison:q} --victims {input.victims:q} --threads {threads} --out {output:q}"
