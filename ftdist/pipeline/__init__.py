"""Pipelines (``ftdist pipeline FILE``): an ordered list of stages, each a run config, the later ones
starting from an earlier stage's export, with forgetting measured after every stage.

``spec`` (the pipeline file's schema and ``${stage:NAME}`` references, pure), ``layout`` (the pipeline
folder's names), ``forgetting`` (the matrix's summaries and heatmap, pure), ``evaluate`` (a stage's
model on every evaluation set so far), ``runner`` (the stages in order; only the CLI imports it).
"""
