rule surrogate:
    conda:
        "../envs/poisonflow.yaml"
    input:
        clean=f"{RESULTS}/data/{{dataset}}.zarr",
    output:
        model=f"{RESULTS}/surrogates/{{dataset}}/{{surrogate}}/model.pt",
        scoring=f"{RESULTS}/surrogates/{{dataset}}/{{surrogate}}/scoring.pt",
        dynamics=f"{RESULTS}/surrogates/{{dataset}}/{{surrogate}}/dynamics.npz",
        info=f"{RESULTS}/surrogates/{{dataset}}/{{surrogate}}/info.json",
    log:
        PLAN.log("surrogate", "{dataset}/{surrogate}"),
    params:
        run=POISONFLOW,
        spec=PLAN.spec("surrogate"),
        seed=PLAN.surrogate_seed,
        out=PLAN.dirname("model"),
        code=PLAN.code("surrogate"),
    threads: THREADS
    resources:
        gpu=PLAN.gpu("surrogate"),
        mem_mb=PLAN.mem_mb("surrogate"),
        runtime=PLAN.runtime("surrogate"),
    group: PLAN.group("surrogate")
    shell:
        "{params.run} surrogate --spec {params.spec:q} --seed {params.seed:q} --clean {input.clean:q}"
        " --out-dir {params.out:q} --threads {threads} > {log:q} 2>&1"
