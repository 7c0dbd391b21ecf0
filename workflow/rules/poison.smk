def poison_inputs(w):
    attack = CFG.attack(w.attack)
    inputs = {"clean": f"{RESULTS}/data/{w.dataset}.zarr"}
    if "surrogate" in attack:
        inputs["surrogate"] = f"{RESULTS}/surrogates/{w.dataset}/{attack['surrogate']}/model.pt"
    if attack.get("selection", "random") != "random":
        inputs["scores"] = f"{RESULTS}/scores/{w.dataset}/{attack['surrogate']}.csv"
    if "generator" in attack:
        inputs["generator"] = f"{RESULTS}/triggers/{w.dataset}/{attack['generator']}/generator.pt"
    return inputs


def poison_options(w, input):
    options = []
    if "scores" in input.keys():
        options.append(f"--scores {input.scores}")
    if "surrogate" in input.keys():
        options.append(f"--surrogate-dir {os.path.dirname(input.surrogate)}")
    if "generator" in input.keys():
        options.append(f"--generator-dir {os.path.dirname(input.generator)}")
    return " ".join(options)


rule poison:
    input:
        unpack(poison_inputs),
    output:
        directory(f"{RESULTS}/poison/{{dataset}}/{{attack}}/seed{{seed}}.zarr"),
    params:
        spec=lambda w: as_json(CFG.attack(w.attack)),
        code=lambda w: code_hash("poisonflow.stages.poison", kind_registry(CFG.attack(w.attack)["kind"]).module_name(CFG.attack(w.attack)["kind"])),
        options=poison_options,
    benchmark:
        f"{RESULTS}/benchmarks/poison/{{dataset}}/{{attack}}/seed{{seed}}.tsv"
    threads: THREADS
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=240,
    shell:
        "poisonflow poison --name {wildcards.attack} --spec {params.spec:q} --seed {wildcards.seed}"
        " --clean {input.clean} {params.options} --out {output} --threads {threads}"
