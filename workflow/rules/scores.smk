rule scores:
    conda:
        "../envs/poisonflow.yaml"
    input:
        clean=f"{RESULTS}/data/{{dataset}}.zarr",
        scoring=f"{RESULTS}/surrogates/{{dataset}}/{{surrogate}}/scoring.pt",
        dynamics=f"{RESULTS}/surrogates/{{dataset}}/{{surrogate}}/dynamics.npz",
    output:
        f"{RESULTS}/scores/{{dataset}}/{{surrogate}}.csv",
    log:
        PLAN.log("scores", "{dataset}/{surrogate}"),
    params:
        run=POISONFLOW,
        spec=PLAN.spec("surrogate"),
        surrogate=PLAN.dirname("scoring", of="input"),
        code=PLAN.code("scores"),
    threads: THREADS
    resources:
        gpu=PLAN.gpu("scores"),
        mem_mb=PLAN.mem_mb("scores"),
        runtime=PLAN.runtime("scores"),
    group: PLAN.group("scores")
    shell:
        "{params.run} scores --spec {params.spec:q} --clean {input.clean:q}"
        " --surrogate-dir {params.surrogate:q} --out {output:q} --threads {threads} > {log:q} 2>&1"
