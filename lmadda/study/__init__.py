"""The study: a grid of adaptations run in this process, tracked in MLflow, turned into a document.

One module per job, read top to bottom in this order:

- `config`: the study config (pydantic), validated before any work starts;
- `grid`: one source model's grid (targets x methods x layers x seeds) and its result rows;
- `runner`: one experiment end to end: data, source model, grid, tracking, sample panels;
- `tracking`: the study's MLflow runs (one per model), written and read back;
- `failures`: targets that failed, recorded so a rerun retries only them;
- `results`: the runs grouped as the analysis needs them, with the learning-rate rule;
- `analysis`: findings as structured verdicts (the bars, what held up), no prose, no plots;
- `tables` and `figures`: markdown tables and matplotlib figures;
- `document`: the markdown document, assembled from the above.
"""
