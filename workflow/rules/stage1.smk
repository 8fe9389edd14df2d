# Stage 1: cell-text alignment pretraining. Retried on a stop (exit 3: SIGUSR1/SIGTERM, train.max_wall_time) or a
# failure; every attempt runs with --resume.


rule stage1_config:
    output:
        f"{OUT}/configs/stage1.yaml",
    params:
        text=yaml.safe_dump(stage_config("stage1", {"corpus": f"{OUT}/corpus", "out": f"{OUT}/stage1"}),
                            sort_keys=True),
    localrule: True
    run:
        Path(output[0]).write_text(params.text)


rule stage1:
    input:
        cfg=f"{OUT}/configs/stage1.yaml",
        corpus=done("corpus"),
    output:
        done("stage1"),
    threads: threads_of("stage1")
    resources:
        **resources_of("stage1"),
    retries: int(config.get("retries", 3))
    shell:
        training_shell("stage1", "scmm.pretrain.train", f"{OUT}/configs/stage1.yaml", [done("corpus")])
        + stage_provenance("stage1", "{input.cfg}", ["{input.corpus}", f"{OUT}/corpus"], [f"{OUT}/stage1/model"])
