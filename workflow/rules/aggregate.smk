# aggregate: every defense metrics.json (the victim's for a defense of kind `none`), the poison,
# defense and features jobs' benchmark files, the robustness jobs' results and the configured figures → metrics.csv, summary tables, the summary
# figure and the paper-style views of results/report/.


rule aggregate:
    conda:
        "../envs/poisonflow.yaml"
    input:
        metrics=PLAN.defense_metrics(),
        undefended=PLAN.undefended_metrics(),
        benchmarks=PLAN.poison_benchmarks(),
        defense_benchmarks=PLAN.defense_benchmarks(),
        features_benchmarks=PLAN.features_benchmarks(),
        robustness=PLAN.robustness_outputs(),
        # not read: listed so that the default target also draws the configured figures
        figures=PLAN.configured_figures(),
    output:
        metrics=report(f"{RESULTS}/metrics.csv", caption="../report/metrics.rst", category="Summary",
                       labels={"result": "every metric of every job (metrics.csv)"}),
        summary_csv=report(f"{RESULTS}/tables/summary.csv", caption="../report/summary_table.rst",
                           category="Summary", labels={"result": "summary table, mean and std over seeds"}),
        summary_md=f"{RESULTS}/tables/summary.md",
        summary_tex=f"{RESULTS}/tables/summary.tex",
        figure=report(f"{RESULTS}/figures/summary.png", caption="../report/summary_figure.rst",
                      category="Summary", labels={"result": "summary figure, ACC and ASR"}),
        report=report(directory(f"{RESULTS}/report"), patterns=["{name}.png", "{name}.csv"],
                      caption="../report/views.rst", category="Paper views"),
    log:
        PLAN.log("aggregate", "aggregate"),
    params:
        run=POISONFLOW,
        results=PLAN.dirname("metrics"),
        undefended=PLAN.undefended_pairs(),
        experiment=PLAN.experiment_description(),
        code=PLAN.code("aggregate"),
    resources:
        mem_mb=PLAN.mem_mb("aggregate"),
        runtime=PLAN.runtime("aggregate"),
    shell:
        "{params.run} aggregate --results {params.results:q} --metrics {input.metrics:q}"
        " --undefended {params.undefended:q} --benchmarks {input.benchmarks:q}"
        " --defense-benchmarks {input.defense_benchmarks:q} --features-benchmarks {input.features_benchmarks:q}"
        " --robustness {input.robustness:q}"
        " --experiment {params.experiment:q} > {log:q} 2>&1"
