"""ASHA whose rung records survive ``ftdist tune --resume``.

Why: Ray Tune does not checkpoint scheduler state. ``Tuner.restore`` rebuilds the scheduler from the
copy pickled when the sweep started, so every score ASHA had recorded at its rungs is gone; trials
that resume are then compared against nothing (or only each other) and survive rungs they would
have failed. This subclass writes the rungs to ``<sweep>/scheduler/asha_rungs.json`` after every
decision and reads them back the first time a restored sweep adds a trial. Trial ids are stable
across a restore, so each record finds its trial again.

Not in the sweep folder itself: on restore Tune copies every top-level ``.json``/``.pkl`` of the
experiment folder into its staging folder and uploads that folder again at each experiment
checkpoint, which overwrote a top-level rungs file with the copy taken at restore time.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from ray.tune.schedulers import AsyncHyperBandScheduler

from ftdist import storage
from ftdist.config import StorageSection

log = logging.getLogger(__name__)
RUNGS_FILE = "scheduler/asha_rungs.json"


class PersistentASHA(AsyncHyperBandScheduler):
    def __init__(self, state_uri: str, storage_cfg: StorageSection, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._state_uri, self._storage_cfg = state_uri, storage_cfg
        # False in the copy Tune pickles at the start, so a restored scheduler loads the file once.
        self._state_loaded = False

    def _snapshot(self) -> dict[str, Any]:
        return {"brackets": [[{"milestone": m, "recorded": dict(rec)} for m, rec in b._rungs]
                             for b in self._brackets],
                "trial_bracket": {tid: self._brackets.index(b) for tid, b in self._trial_info.items()}}

    def _load_once(self) -> None:
        if self._state_loaded:
            return
        self._state_loaded = True
        if not storage.exists(self._state_uri, self._storage_cfg):
            return
        saved = json.loads(storage.read_text(self._state_uri, self._storage_cfg))
        for bracket, rungs in zip(self._brackets, saved["brackets"]):
            by_milestone = {r["milestone"]: r["recorded"] for r in rungs}
            for milestone, recorded in bracket._rungs:
                recorded.update(by_milestone.get(milestone, {}))
        self._saved_brackets = saved.get("trial_bracket", {})
        n = sum(len(r["recorded"]) for rungs in saved["brackets"] for r in rungs)
        log.info("ASHA: restored %d rung record(s) from %s", n, self._state_uri)

    def _save(self) -> None:
        storage.write_text(self._state_uri, json.dumps(self._snapshot(), indent=1, default=float), self._storage_cfg)

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._load_once()
        super().on_trial_add(tune_controller, trial)
        saved = getattr(self, "_saved_brackets", {}).get(trial.trial_id)
        if saved is not None and saved < len(self._brackets):
            self._trial_info[trial.trial_id] = self._brackets[saved]  # the bracket it was in before

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        self._load_once()
        action = super().on_trial_result(tune_controller, trial, result)
        self._save()
        return action

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self._load_once()
        super().on_trial_complete(tune_controller, trial, result)
        self._save()
