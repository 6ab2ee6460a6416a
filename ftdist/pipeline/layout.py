"""The pipeline folder's layout: every name inside ``<storage.path>/<pipeline name>/`` in one place.

Each stage's run folder is ``stages/<stage>/`` and uses the run-folder layout (``ftdist.run_folder``),
so a stage's export is ``stages/<stage>/model``: the path a ``${stage:NAME}`` reference becomes.
"""

from __future__ import annotations

from ftdist import run_folder
from ftdist.uri import join_uri

SPEC = "pipeline.yaml"  # the resolved pipeline: every stage's config (secrets redacted)
SUMMARY = "pipeline_summary.json"  # written after every stage: stages, the matrix, the summaries
MATRIX_PNG = "forgetting_matrix.png"  # the heatmap of R[after stage i][on set j]
STAGES = "stages"  # one run folder per stage
EVALUATIONS = "evaluations"  # <row>.json per evaluated model (a rerun reuses them)
START_EVALUATION = "_start.json"  # the starting model (before stage 1): the b_j of forward transfer


def stages_uri(pipeline_uri: str) -> str:
    return join_uri(pipeline_uri, STAGES)


def stage_run_uri(pipeline_uri: str, stage: str) -> str:
    return join_uri(pipeline_uri, STAGES, stage)


def stage_export_uri(pipeline_uri: str, stage: str) -> str:
    """What ``${stage:NAME}`` means: the stage's exported model."""
    return join_uri(pipeline_uri, STAGES, stage, run_folder.MODEL)


def evaluation_uri(pipeline_uri: str, stage: str | None) -> str:
    """Where the evaluation of ``stage``'s export is kept (``None``: the starting model's; stage names
    start with a letter or digit, so they never collide with it)."""
    return join_uri(pipeline_uri, EVALUATIONS, START_EVALUATION if stage is None else f"{stage}.json")
