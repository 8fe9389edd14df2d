# Annotate (and describe) the user's query files with the packaged model: annotate.queries maps a name to an h5ad
# file; each gives <out>/<name>.h5ad (and <out>/<name>_umap.png when annotate.umap_color names obs columns).


def query_file(wildcards):
    return repo_path(queries()[wildcards.name])


def umap_command(wildcards, output):
    color = (config.get("annotate") or {}).get("umap_color")
    if not color:
        return "true"
    return f"{SCMM} plot umap {output.h5ad} --color {color} --out {OUT}/{wildcards.name}_umap.png"


rule annotate:
    input:
        h5ad=query_file,
        package=done("package"),
    output:
        h5ad=f"{OUT}/{{name}}.h5ad",
    wildcard_constraints:
        name="|".join(queries()) or "$^",
    params:
        describe=bool((config.get("annotate") or {}).get("describe", True)),
        umap=umap_command,
    threads: threads_of("annotate")
    resources:
        **resources_of("annotate"),
    shell:
        """
        tmp={OUT}/.{wildcards.name}.annotating.h5ad
        rm -f $tmp
        if [ {params.describe} = True ]; then
            {SCMM} annotate {input.h5ad} --model {OUT}/model --out $tmp --quiet
            {SCMM} describe $tmp --model {OUT}/model --out {output.h5ad} --quiet
            rm -f $tmp
        else
            {SCMM} annotate {input.h5ad} --model {OUT}/model --out {output.h5ad} --quiet
        fi
        {params.umap}
        {PROVENANCE} record --stage annotate_{wildcards.name} --inputs {input.h5ad} {OUT}/model \
            --outputs {output.h5ad} --out {OUT}/provenance/annotate_{wildcards.name}.json
        """
