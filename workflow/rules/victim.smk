rule victim:
    conda:
        "../envs/poisonflow.yaml"
    input:
        clean=f"{RESULTS}/data/{{dataset}}.zarr",
        poison=f"{RESULTS}/poison/{{dataset}}/{{attack}}/seed{{seed}}.zarr",
    output:
        model=f"{RESULTS}/victims/{{dataset}}/{{attack}}/{{training}}/seed{{seed}}/model.pt",
        metrics=f"{RESULTS}/victims/{{dataset}}/{{attack}}/{{training}}/seed{{seed}}/metrics.json",
    log:
        PLAN.log("victim", "{dataset}/{attack}/{training}/seed{seed}"),
    params:
        run=POISONFLOW,
        spec=PLAN.spec("training"),
        evaluation=PLAN.evaluation(),
        out=PLAN.dirname("model"),
        code=PLAN.code("victim"),
    threads: THREADS
    resources:
        gpu=PLAN.gpu("victim"),
        mem_mb=PLAN.mem_mb("victim"),
        runtime=PLAN.runtime("victim"),
    group: PLAN.group("victim")
    shell:
        "{params.run} victim --spec {params.spec:q} --evaluation {params.evaluation:q} --seed {wildcards.seed:q}"
        " --clean {input.clean:q} --poison {input.poison:q} --out-dir {params.out:q} --threads {threads}"
        " > {log:q} 2>&1"
