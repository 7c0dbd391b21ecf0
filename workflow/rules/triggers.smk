# A learned trigger, trained once per dataset and generators entry; its params carry only the
# generators entry, so an attack's rate or target never retrains it.
rule trigger:
    conda:
        "../envs/poisonflow.yaml"
    input:
        unpack(PLAN.trigger_inputs),
    output:
        generator=f"{RESULTS}/triggers/{{dataset}}/{{generator}}/generator.pt",
        info=f"{RESULTS}/triggers/{{dataset}}/{{generator}}/info.json",
    log:
        PLAN.log("trigger", "{dataset}/{generator}"),
    params:
        run=POISONFLOW,
        spec=PLAN.spec("generator"),
        code=PLAN.code("trigger", "generator"),
        options=PLAN.trigger_options,
        out=PLAN.dirname("generator"),
    threads: THREADS
    resources:
        gpu=PLAN.gpu("trigger"),
        mem_mb=PLAN.mem_mb("trigger"),
        runtime=PLAN.runtime("trigger"),
    group: PLAN.group("trigger")
    shell:
        "{params.run} trigger --name {wildcards.generator:q} --spec {params.spec:q} --clean {input.clean:q}"
        " {params.options:q} --out-dir {params.out:q} --threads {threads} > {log:q} 2>&1"
