# features: the features entries of the config on one poisoned store, from its released training
# set alone (`poisonflow features`), into results/features/{dataset}/{attack}/{features}/seed{seed}/.
# One job per (dataset, attack, seed, entry), shared by every defense that names the entry, so GSSD
# variants and DBD reuse it without retraining; the defense rule asks for it when an entry names it. A SimCLR entry
# trains a backbone (written too); a CLIP entry only embeds. Each extractor's rule matches only the
# names of its entries.


rule features:
    conda:
        "../envs/poisonflow.yaml"
    input:
        poison=f"{RESULTS}/poison/{{dataset}}/{{attack}}/seed{{seed}}.zarr",
    output:
        backbone=f"{RESULTS}/features/{{dataset}}/{{attack}}/{{features}}/seed{{seed}}/backbone.pt",
        features=f"{RESULTS}/features/{{dataset}}/{{attack}}/{{features}}/seed{{seed}}/features.npz",
        info=f"{RESULTS}/features/{{dataset}}/{{attack}}/{{features}}/seed{{seed}}/info.json",
    log:
        PLAN.log("features", "{dataset}/{attack}/{features}/seed{seed}"),
    wildcard_constraints:
        features=PLAN.features_wildcard("simclr"),
    params:
        run=POISONFLOW,
        spec=PLAN.spec("features"),
        out=PLAN.dirname("info"),
        code=PLAN.code("features"),
    benchmark:
        f"{RESULTS}/benchmarks/features/{{dataset}}/{{attack}}/{{features}}/seed{{seed}}.tsv"
    threads: THREADS
    resources:
        gpu=PLAN.gpu("features"),
        mem_mb=PLAN.mem_mb("features"),
        runtime=PLAN.runtime("features"),
    group: PLAN.group("features")
    shell:
        "{params.run} features --name {wildcards.features:q} --spec {params.spec:q} --seed {wildcards.seed:q}"
        " --poison {input.poison:q} --out-dir {params.out:q} --threads {threads} > {log:q} 2>&1"


rule features_clip:
    conda:
        "../envs/poisonflow.yaml"
    input:
        poison=f"{RESULTS}/poison/{{dataset}}/{{attack}}/seed{{seed}}.zarr",
    output:
        features=f"{RESULTS}/features/{{dataset}}/{{attack}}/{{features}}/seed{{seed}}/features.npz",
        info=f"{RESULTS}/features/{{dataset}}/{{attack}}/{{features}}/seed{{seed}}/info.json",
    log:
        PLAN.log("features_clip", "{dataset}/{attack}/{features}/seed{seed}"),
    wildcard_constraints:
        features=PLAN.features_wildcard("clip"),
    params:
        run=POISONFLOW,
        spec=PLAN.spec("features"),
        out=PLAN.dirname("info"),
        code=PLAN.code("features"),
    benchmark:
        f"{RESULTS}/benchmarks/features/{{dataset}}/{{attack}}/{{features}}/seed{{seed}}.tsv"
    threads: THREADS
    resources:
        gpu=PLAN.gpu("features_clip"),
        mem_mb=PLAN.mem_mb("features_clip"),
        runtime=PLAN.runtime("features_clip"),
    group: PLAN.group("features_clip")
    shell:
        "{params.run} features --name {wildcards.features:q} --spec {params.spec:q} --seed {wildcards.seed:q}"
        " --poison {input.poison:q} --out-dir {params.out:q} --threads {threads} > {log:q} 2>&1"
