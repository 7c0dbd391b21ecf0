rule data:
    conda:
        "../envs/poisonflow.yaml"
    output:
        directory(f"{RESULTS}/data/{{dataset}}.zarr"),
    log:
        PLAN.log("data", "{dataset}"),
    params:
        run=POISONFLOW,
        spec=PLAN.spec("dataset"),
        code=PLAN.code("data", "dataset"),
    resources:
        mem_mb=PLAN.mem_mb("data"),
        runtime=PLAN.runtime("data"),
    group: PLAN.group("data")
    shell:
        "{params.run} data --name {wildcards.dataset:q} --spec {params.spec:q} --out {output:q} > {log:q} 2>&1"
