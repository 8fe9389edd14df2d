# The packaged final model folder (stage 1 + stage 2 + the corpus's reference + the evaluation's figures).


rule package:
    input:
        corpus=done("corpus"),
        stage1=done("stage1"),
        stage2=done("stage2"),
        eval=done("eval"),
    output:
        done("package"),
    threads: threads_of("package")
    resources:
        **resources_of("package"),
    shell:
        """
        {SCMM} package --stage1 {OUT}/stage1/model --stage2 {OUT}/stage2/model --corpus {OUT}/corpus \
            --metrics {OUT}/eval/metrics.json --out {OUT}/model
        {PROVENANCE} record --stage package --inputs {OUT}/stage1/model {OUT}/stage2/model {OUT}/corpus \
            {OUT}/eval/metrics.json --outputs {OUT}/model --out {output}
        """
