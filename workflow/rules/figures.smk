# figures: one job per entry of the config's `figures:` section, drawn from stored artifacts
# (a surrogate's training dynamics, victim models and their poisoned stores) by
# `poisonflow figures` (the entry's kind picks the job); written to results/figures/{kind}/{name}.png.
# The entries are checked against the rest of the config when the Snakefile builds PLAN.


rule figure_forgetting:
    conda:
        "../envs/poisonflow.yaml"
    input:
        unpack(PLAN.forgetting_inputs),
    output:
        report(f"{RESULTS}/figures/forgetting/{{figure}}.png", caption="../report/forgetting.rst",
               category="Figures", subcategory="forgetting events", labels={"figure": "{figure}"}),
    log:
        PLAN.log("figure_forgetting", "{figure}"),
    wildcard_constraints:
        figure=PLAN.figure_wildcard("forgetting"),
    params:
        run=POISONFLOW,
        spec=PLAN.figure_spec,
        code=PLAN.code("figures"),
    resources:
        mem_mb=PLAN.mem_mb("figure_forgetting"),
        runtime=PLAN.runtime("figure_forgetting"),
    shell:
        "{params.run} figures --spec {params.spec:q} --clean {input.clean:q} --dynamics {input.dynamics:q}"
        " --out {output:q} > {log:q} 2>&1"


rule figure_tsne:
    conda:
        "../envs/poisonflow.yaml"
    input:
        unpack(PLAN.tsne_inputs),
    output:
        report(f"{RESULTS}/figures/tsne/{{figure}}.png", caption="../report/tsne.rst",
               category="Figures", subcategory="t-SNE", labels={"figure": "{figure}"}),
    log:
        PLAN.log("figure_tsne", "{figure}"),
    wildcard_constraints:
        figure=PLAN.figure_wildcard("tsne"),
    params:
        run=POISONFLOW,
        spec=PLAN.figure_spec,
        training=PLAN.figure_training,
        names=PLAN.figure_attacks,
        code=PLAN.code("figures"),
    threads: THREADS
    resources:
        gpu=PLAN.gpu("figure_tsne"),
        mem_mb=PLAN.mem_mb("figure_tsne"),
        runtime=PLAN.runtime("figure_tsne"),
    shell:
        "{params.run} figures --spec {params.spec:q} --training {params.training:q} --names {params.names:q}"
        " --poison {input.poison:q} --victims {input.victims:q} --threads {threads} --out {output:q}"
        " > {log:q} 2>&1"


rule figure_embedding:
    conda:
        "../envs/poisonflow.yaml"
    input:
        unpack(PLAN.embedding_inputs),
    output:
        report(f"{RESULTS}/figures/embedding-distances/{{figure}}.png", caption="../report/embedding.rst",
               category="Figures", subcategory="embedding distances", labels={"figure": "{figure}"}),
    log:
        PLAN.log("figure_embedding", "{figure}"),
    wildcard_constraints:
        figure=PLAN.figure_wildcard("embedding-distances"),
    params:
        run=POISONFLOW,
        spec=PLAN.figure_spec,
        code=PLAN.code("figures"),
    threads: THREADS
    resources:
        gpu=PLAN.gpu("figure_embedding"),
        mem_mb=PLAN.mem_mb("figure_embedding"),
        runtime=PLAN.runtime("figure_embedding"),
    shell:
        "{params.run} figures --spec {params.spec:q} --clean {input.clean:q} --poison {input.poison:q}"
        " --backbone {input.backbone:q} --threads {threads} --out {output:q} > {log:q} 2>&1"


rule figure_gradcam:
    conda:
        "../envs/poisonflow.yaml"
    input:
        unpack(PLAN.tsne_inputs),
    output:
        report(f"{RESULTS}/figures/gradcam/{{figure}}.png", caption="../report/gradcam.rst",
               category="Figures", subcategory="Grad-CAM", labels={"figure": "{figure}"}),
    log:
        PLAN.log("figure_gradcam", "{figure}"),
    wildcard_constraints:
        figure=PLAN.figure_wildcard("gradcam"),
    params:
        run=POISONFLOW,
        spec=PLAN.figure_spec,
        training=PLAN.figure_training,
        names=PLAN.figure_attacks,
        robustness=PLAN.figure_robustness,
        code=PLAN.code("figures"),
    threads: THREADS
    resources:
        gpu=PLAN.gpu("figure_gradcam"),
        mem_mb=PLAN.mem_mb("figure_gradcam"),
        runtime=PLAN.runtime("figure_gradcam"),
    shell:
        "{params.run} figures --spec {params.spec:q} --training {params.training:q} --names {params.names:q}"
        " --poison {input.poison:q} --victims {input.victims:q} --robustness {params.robustness:q}"
        " --threads {threads} --out {output:q} > {log:q} 2>&1"


rule figure_curves:
    conda:
        "../envs/poisonflow.yaml"
    input:
        unpack(PLAN.figure_models),
    output:
        report(f"{RESULTS}/figures/learning-curves/{{figure}}.png", caption="../report/curves.rst",
               category="Figures", subcategory="learning curves", labels={"figure": "{figure}"}),
    log:
        PLAN.log("figure_curves", "{figure}"),
    wildcard_constraints:
        figure=PLAN.figure_wildcard("learning-curves"),
    params:
        run=POISONFLOW,
        spec=PLAN.figure_spec,
        names=PLAN.figure_attacks,
        code=PLAN.code("figures"),
    resources:
        mem_mb=PLAN.mem_mb("figure_curves"),
        runtime=PLAN.runtime("figure_curves"),
    shell:
        "{params.run} figures --spec {params.spec:q} --names {params.names:q} --victims {input.victims:q}"
        " --out {output:q} > {log:q} 2>&1"


rule figure_scores:
    conda:
        "../envs/poisonflow.yaml"
    input:
        unpack(PLAN.figure_models),
    output:
        report(f"{RESULTS}/figures/sample-scores/{{figure}}.png", caption="../report/scores.rst",
               category="Figures", subcategory="per-sample scores", labels={"figure": "{figure}"}),
    log:
        PLAN.log("figure_scores", "{figure}"),
    wildcard_constraints:
        figure=PLAN.figure_wildcard("sample-scores"),
    params:
        run=POISONFLOW,
        spec=PLAN.figure_spec,
        names=PLAN.figure_attacks,
        code=PLAN.code("figures"),
    resources:
        mem_mb=PLAN.mem_mb("figure_scores"),
        runtime=PLAN.runtime("figure_scores"),
    shell:
        "{params.run} figures --spec {params.spec:q} --names {params.names:q} --victims {input.victims:q}"
        " --out {output:q} > {log:q} 2>&1"
