def trigger_inputs(w):
    entry = CFG.generator(w.generator)
    inputs = {"clean": f"{RESULTS}/data/{w.dataset}.zarr"}
    if "surrogate" in entry:
        inputs["surrogate"] = f"{RESULTS}/surrogates/{w.dataset}/{entry['surrogate']}/model.pt"
    return inputs


def trigger_options(w, input):
    return f"--surrogate-dir {os.path.dirname(input.surrogate)}" if "surrogate" in input.keys() else ""


# A learned trigger, trained once per dataset and generators entry; its params carry only the
# generators entry, so an attack's rate or target never retrains it.
rule trigger:
    input:
        unpack(trigger_inputs),
    output:
        generator=f"{RESULTS}/triggers/{{dataset}}/{{generator}}/generator.pt",
        info=f"{RESULTS}/triggers/{{dataset}}/{{generator}}/info.json",
    params:
        spec=lambda w: as_json(CFG.generator(w.generator)),
        code=lambda w: code_hash("poisonflow.stages.trigger", kind_registry(CFG.generator(w.generator)["kind"]).module_name(CFG.generator(w.generator)["kind"])),
        options=trigger_options,
        out=lambda w, output: os.path.dirname(output.generator),
    threads: THREADS
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=720,
    shell:
        "poisonflow trigger --name {wildcards.generator:q} --spec {params.spec:q} --clean {input.clean:q}"
        " {params.options} --out-dir {params.out:q} --threads {threads}"
