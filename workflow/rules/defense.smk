# A defenses entry of kind `none` runs no job: the aggregate reads the victim's own metrics for it
# (results/defenses/.../<none entry>/ is not written). An entry with a `features` key (GSSD) also
# reads that features entry's features.npz of the same poisoned store.
rule defense:
    conda:
        "../envs/poisonflow.yaml"
    input:
        unpack(PLAN.defense_inputs),
    output:
        model=f"{RESULTS}/defenses/{{dataset}}/{{attack}}/{{training}}/seed{{seed}}/{{defense}}/model.pt",
        metrics=f"{RESULTS}/defenses/{{dataset}}/{{attack}}/{{training}}/seed{{seed}}/{{defense}}/metrics.json",
    log:
        PLAN.log("defense", "{dataset}/{attack}/{training}/seed{seed}/{defense}"),
    wildcard_constraints:
        defense=PLAN.defense_wildcard(),
    params:
        run=POISONFLOW,
        spec=PLAN.spec("defense"),
        training=PLAN.spec("training"),
        evaluation=PLAN.evaluation(),
        victim=PLAN.dirname("victim", of="input"),
        out=PLAN.dirname("model"),
        code=PLAN.code("defense", "defense"),
        options=PLAN.defense_options,
    benchmark:
        f"{RESULTS}/benchmarks/defense/{{dataset}}/{{attack}}/{{training}}/seed{{seed}}/{{defense}}.tsv"
    threads: THREADS
    resources:
        gpu=PLAN.gpu("defense"),
        mem_mb=PLAN.mem_mb("defense"),
        runtime=PLAN.runtime("defense"),
    group: PLAN.group("defense")
    shell:
        "{params.run} defense --name {wildcards.defense:q} --spec {params.spec:q} --training {params.training:q}"
        " --evaluation {params.evaluation:q} --seed {wildcards.seed:q} --clean {input.clean:q}"
        " --poison {input.poison:q} --victim-dir {params.victim:q} {params.options:q} --out-dir {params.out:q}"
        " --threads {threads}"
        " > {log:q} 2>&1"
