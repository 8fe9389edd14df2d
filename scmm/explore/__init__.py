"""``scmm explore``: a local web page over an h5ad and a model (map, colour-by, free-text search, cells, questions).

:mod:`scmm.explore.session` does the work through :mod:`scmm.api` and the model; :mod:`scmm.explore.server` only
routes HTTP requests to it; ``static/`` holds the page (no CDN: everything ships in the package).
"""
