# Evaluation of the stage-2 model on the corpus's test split; its tables and plots go into `snakemake --report`.


rule eval:
    input:
        corpus=done("corpus"),
        stage2=done("stage2"),
    output:
        done=done("eval"),
        tables=report(f"{OUT}/report/tables.html", category="Evaluation", caption="../report/tables.rst"),
        plots=report(directory(f"{OUT}/report/plots"), patterns=["{name}.png"], category="Evaluation",
                     caption="../report/plots.rst"),
    params:
        tasks=str((config.get("eval") or {}).get("tasks", "annotate,retrieve,describe,generate")),
    threads: threads_of("eval")
    resources:
        **resources_of("eval"),
    shell:
        """
        rm -rf {OUT}/eval
        {SCMM} eval --model {OUT}/stage2/model --corpus {OUT}/corpus --out {OUT}/eval --tasks {params.tasks} --quiet
        {PY} {REPO}/workflow/scripts/report_assets.py {OUT}/eval {output.tables} {output.plots}
        {PROVENANCE} record --stage eval --inputs {OUT}/stage2/model {OUT}/corpus --outputs {OUT}/eval \
            --command "scmm eval --tasks {params.tasks}" --out {output.done}
        """
