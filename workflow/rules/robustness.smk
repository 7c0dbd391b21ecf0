# robustness: a cached victim under the test-time distortions of a robustness entry (ACC/ASR/RA per
# level), or on a user folder of images; one job per victim × entry listed by an experiment's
# `robustness:` key. The victim is read, never retrained. A folder entry's images are not tracked:
# after changing the files of a folder, rerun its jobs with `--forcerun robustness`.
rule robustness:
    conda:
        "../envs/poisonflow.yaml"
    input:
        clean=f"{RESULTS}/data/{{dataset}}.zarr",
        poison=f"{RESULTS}/poison/{{dataset}}/{{attack}}/seed{{seed}}.zarr",
        victim=f"{RESULTS}/victims/{{dataset}}/{{attack}}/{{training}}/seed{{seed}}/model.pt",
    output:
        json=f"{RESULTS}/robustness/{{dataset}}/{{attack}}/{{training}}/seed{{seed}}/{{robustness}}.json",
        csv=f"{RESULTS}/robustness/{{dataset}}/{{attack}}/{{training}}/seed{{seed}}/{{robustness}}.csv",
    log:
        PLAN.log("robustness", "{dataset}/{attack}/{training}/seed{seed}/{robustness}"),
    wildcard_constraints:
        robustness=PLAN.robustness_wildcard(),
    params:
        run=POISONFLOW,
        spec=PLAN.robustness_spec,
        attack=PLAN.spec("attack"),
        training=PLAN.spec("training"),
        victim=PLAN.dirname("victim", of="input"),
        code=PLAN.code("robustness"),
    threads: THREADS
    resources:
        gpu=PLAN.gpu("robustness"),
        mem_mb=PLAN.mem_mb("robustness"),
        runtime=PLAN.runtime("robustness"),
    group: PLAN.group("robustness")
    shell:
        "{params.run} robustness --name {wildcards.robustness:q} --spec {params.spec:q}"
        " --attack-spec {params.attack:q} --training {params.training:q} --seed {wildcards.seed:q}"
        " --clean {input.clean:q} --poison {input.poison:q} --victim-dir {params.victim:q}"
        " --threads {threads} --out {output.json:q} > {log:q} 2>&1"
