# split: the split of a splitting defense (a kind whose fragment declares `split:`, e.g. A-ABL's
# stages 1–2) as a job of its own, read by that defense's job and by every `split-train` entry that
# names it. Its params carry only the entry's split keys, so editing the rest (A-ABL's stage3, a
# split-train's training) does not rerun it.
rule split:
    conda:
        "../envs/poisonflow.yaml"
    input:
        clean=f"{RESULTS}/data/{{dataset}}.zarr",
        poison=f"{RESULTS}/poison/{{dataset}}/{{attack}}/seed{{seed}}.zarr",
    output:
        split=f"{RESULTS}/splits/{{dataset}}/{{attack}}/{{training}}/seed{{seed}}/{{defense}}/split.npz",
        metrics=f"{RESULTS}/splits/{{dataset}}/{{attack}}/{{training}}/seed{{seed}}/{{defense}}/split.json",
    log:
        PLAN.log("split", "{dataset}/{attack}/{training}/seed{seed}/{defense}"),
    wildcard_constraints:
        defense=PLAN.split_wildcard(),
    params:
        run=POISONFLOW,
        spec=PLAN.split_spec,
        training=PLAN.spec("training"),
        out=PLAN.dirname("split"),
        code=PLAN.code("split", "defense"),
    threads: THREADS
    resources:
        gpu=PLAN.gpu("split"),
        mem_mb=PLAN.mem_mb("split"),
        runtime=PLAN.runtime("split"),
    group: PLAN.group("split")
    shell:
        "{params.run} split --name {wildcards.defense:q} --spec {params.spec:q} --training {params.training:q}"
        " --seed {wildcards.seed:q} --clean {input.clean:q} --poison {input.poison:q} --out-dir {params.out:q}"
        " --threads {threads} > {log:q} 2>&1"
