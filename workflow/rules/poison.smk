rule poison:
    conda:
        "../envs/poisonflow.yaml"
    input:
        unpack(PLAN.poison_inputs),
    output:
        directory(f"{RESULTS}/poison/{{dataset}}/{{attack}}/seed{{seed}}.zarr"),
    log:
        PLAN.log("poison", "{dataset}/{attack}/seed{seed}"),
    params:
        run=POISONFLOW,
        spec=PLAN.spec("attack"),
        code=PLAN.code("poison", "attack"),
        options=PLAN.poison_options,
    benchmark:
        f"{RESULTS}/benchmarks/poison/{{dataset}}/{{attack}}/seed{{seed}}.tsv"
    threads: THREADS
    resources:
        gpu=PLAN.gpu("poison"),
        mem_mb=PLAN.mem_mb("poison"),
        runtime=PLAN.runtime("poison"),
    group: PLAN.group("poison")
    shell:
        "{params.run} poison --name {wildcards.attack:q} --spec {params.spec:q} --seed {wildcards.seed:q}"
        " --clean {input.clean:q} {params.options:q} --out {output:q} --threads {threads} > {log:q} 2>&1"
