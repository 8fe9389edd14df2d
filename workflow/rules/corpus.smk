# Corpus: the bundled PBMC data (`scmm data demo`), h5ad files or a SOMA URI with filters (`scmm data build`).


def corpus_command():
    c = config.get("corpus") or {}
    extra = str(c.get("args") or "")
    if c.get("demo"):
        h5ad = f" --h5ad {shlex.quote(repo_path(c['h5ad']))}" if c.get("h5ad") else ""
        return f"{SCMM} data demo --out {OUT}/corpus{h5ad} --overwrite --quiet {extra}"
    if c.get("soma"):
        where = f" --obs-filter {shlex.quote(c['obs_filter'])}" if c.get("obs_filter") else ""
        return f"{SCMM} data build --soma {shlex.quote(c['soma'])}{where} --out {OUT}/corpus --overwrite {extra}"
    if not c.get("inputs"):
        raise WorkflowError("corpus: set demo: true, inputs: [FILE.h5ad, ...] or soma: URI")
    files = " ".join(shlex.quote(repo_path(p)) for p in c["inputs"])
    return f"{SCMM} data build {files} --out {OUT}/corpus --overwrite {extra}"


def corpus_outputs():
    h5ad = (config.get("corpus") or {}).get("h5ad")
    return [done("corpus")] + ([repo_path(h5ad)] if (config.get("corpus") or {}).get("demo") and h5ad else [])


rule corpus:
    input:
        [repo_path(p) for p in (config.get("corpus") or {}).get("inputs") or []],
    output:
        corpus_outputs(),
    params:
        command=corpus_command(),
    threads: threads_of("corpus")
    resources:
        **resources_of("corpus"),
    shell:
        """
        {params.command}
        {SCMM} data info {OUT}/corpus
        {PROVENANCE} record --stage corpus --inputs {input} --outputs {OUT}/corpus --command {params.command:q} \
            --out {OUT}/provenance/corpus.json
        """
