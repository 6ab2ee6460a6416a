"""The sweep folder's layout: every name inside ``<storage_path>/<sweep name>/`` in one place.

Why one module: the sweep driver writes these files and the report reads them back; when each
module typed its own names, the report had to import the driver (an import cycle) just for a file
name. Each trial's Train runs live under ``trials/`` and use the run-folder layout
(``ftdist.run_folder``).
"""

from __future__ import annotations

import json
import re
from typing import Any

from ftdist import storage
from ftdist.uri import join_uri

SWEEP_MARKER = "ftdist_sweep.json"  # fingerprint: resume vs "another spec"
SPEC = "sweep.yaml"  # the resolved spec and base config (secrets redacted)
SUMMARY = "sweep_summary.json"
TRIALS_CSV = "trials.csv"
CURVES_PNG = "learning_curves.png"
PARAMS_PNG = "hyperparameters.png"
BEST_MODEL = "best_model"  # the best completed trial's export
TRIALS = "trials"  # one Train run folder per trial (and per PBT segment)
POINTER = "ftdist_pointer.json"  # the content of every Tune checkpoint
SEGMENT_MARKER = "pbt_restore.json"  # in a PBT segment's run folder: what it was started from
INIT_CHECKPOINT = "pbt_init"  # the copied checkpoint a PBT segment starts from
MLFLOW_PARENT = "mlflow_parent.json"  # the sweep's MLflow parent run (trials are its children)
SEGMENT = re.compile(r"^(?P<trial>.+)-pbt(?P<n>\d+)$")  # a PBT segment's run name


def trial_name(trial: Any) -> str:
    """Trial and run folder name (module level: Tune pickles it into its experiment state)."""
    return f"trial_{trial.trial_id}"


def existing_segments(trials_uri: str, storage_cfg: Any, trial: str) -> dict[str, str | None]:
    """A trial's run folders under ``trials/``: its own (source None) and each PBT segment with the
    checkpoint it started from (None if its marker is missing)."""
    out: dict[str, str | None] = {}
    for name in storage.listdir(trials_uri, storage_cfg):
        m = SEGMENT.match(name)
        if name == trial:
            out[name] = None
        elif m and m["trial"] == trial:
            marker = join_uri(trials_uri, name, SEGMENT_MARKER)
            out[name] = (json.loads(storage.read_text(marker, storage_cfg))["source"]
                         if storage.exists(marker, storage_cfg) else None)
    return out
