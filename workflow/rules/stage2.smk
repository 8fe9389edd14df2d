# Stage 2: the LLM bridge (LoRA) on the stage-1 model and the LLM. Retried like stage 1; every attempt --resume.


rule stage2_config:
    output:
        f"{OUT}/configs/stage2.yaml",
    params:
        text=yaml.safe_dump(
            stage_config("stage2", {"corpus": f"{OUT}/corpus", "stage1": f"{OUT}/stage1/model", "lm": f"{OUT}/lm",
                                    "out": f"{OUT}/stage2"}),
            sort_keys=True,
        ),
    localrule: True
    run:
        Path(output[0]).write_text(params.text)


rule stage2:
    input:
        cfg=f"{OUT}/configs/stage2.yaml",
        corpus=done("corpus"),
        stage1=done("stage1"),
        lm=done("lm"),
    output:
        done("stage2"),
    threads: threads_of("stage2")
    resources:
        **resources_of("stage2"),
    retries: int(config.get("retries", 3))
    shell:
        training_shell("stage2", "scmm.finetune.train", f"{OUT}/configs/stage2.yaml",
                       [done("corpus"), done("stage1"), done("lm")])
        + stage_provenance("stage2", "{input.cfg}", ["{input.stage1}", "{input.lm}", f"{OUT}/stage1/model",
                                                      f"{OUT}/lm"], [f"{OUT}/stage2/model"])
