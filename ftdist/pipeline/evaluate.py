"""Entries of the forgetting matrix: the model after a stage (or the starting model) on an evaluation
set, scored by the training loop's own evaluation (:func:`ftdist.evaluation.evaluate_batches`).

Which weights score set ``j`` after stage ``i``: the encoder of stage ``i``'s export, with the head of
set ``j``'s task taken from the latest stage at or before ``i`` that trained that head:

- a classification set: the latest classification stage that trained on the same data set as the
  stage that declared the set (so an earlier task stays measurable after a later task replaced the
  head, or after a masked-LM stage); none yet: not measurable (``None``);
- a masked-LM set: the latest masked-LM stage's head, else the starting model's (pre-trained, or
  initialised with a fixed seed when the starting model ships none: the summary says which).

The encoder is every weight under the model's ``base_model_prefix`` (``bert.``...); the pooler belongs
to the head (a masked-LM export has none), so it is kept from the head's stage. Masked-LM sets are
masked as the declaring stage's validation pass masks them (its seed, batch size, key), so ``R[s][s]``
equals that stage's validation perplexity on one worker.

:func:`evaluate_entries` measures several entries at once: each model (a row's encoder under one head) is
loaded once for every set it scores, and the sets are scored in parallel, one per worker thread, with the
machine's cores split between the workers. Why: a single pass over two OpenMP threads slowed 3-7x on a
2-core machine that other processes were also using (the threads wait for each other at every operator),
while one-thread passes side by side do not (bench/RESULTS.md); each entry's value is the same either way.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import threading
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from ftdist.uri import join_uri
from ftdist.data.masking import EVAL_KEYS, Masker
from ftdist.data.reader import ShardReader
from ftdist.evaluation import evaluate_batches
from ftdist.pipeline import layout
from ftdist.pipeline.spec import EvalSet, Pipeline

CLASSIFICATION = "sequence-classification"
MASKED_LM = "masked-lm"
OTHER_SPLIT_KEY = -3  # a masking key for the train split (training keys are epochs >= 0, validation -1, test -2)


def model_uri(p: Pipeline, row: int) -> str:
    """The model of a row: the starting model (row -1) or stage ``row``'s export."""
    return p.start_model if row < 0 else layout.stage_export_uri(p.uri, p.stages[row].name)


def head_row(p: Pipeline, row: int, s: EvalSet) -> int | None:
    """The row whose model supplies set ``s``'s head for the model after ``row`` (-1: the starting
    model), or None when no stage up to ``row`` trained it."""
    if s.task == MASKED_LM:
        return next((k for k in range(row, -1, -1) if p.stages[k].config.model.task == MASKED_LM), -1)
    own = p.stages[s.stage].config.data.path
    return next((k for k in range(row, -1, -1) if p.stages[k].config.model.task == CLASSIFICATION
                 and p.stages[k].config.data.path == own), None)


def entry_key(p: Pipeline, row: int, s: EvalSet, fingerprints: dict[str, str] | None = None) -> str:
    """What an entry's value depends on: the versions of the models it loads (the row's and the head's),
    the set's data and how it is scored. A stored entry is reused only while its key is unchanged, so a
    retrained stage or a set whose data changed under the same name is scored again."""
    cache = {} if fingerprints is None else fingerprints
    head = head_row(p, row, s)
    uris = [model_uri(p, row)] + ([] if head is None or head == row else [model_uri(p, head)])
    for uri in uris + [join_uri(s.data, s.split)]:
        if uri not in cache:
            cache[uri] = content_fingerprint(uri, p.storage)
    parts = [cache[u] for u in uris] + [cache[join_uri(s.data, s.split)], s.task, s.metric, s.max_length,
                                        s.batch_size, s.seed, s.mlm_probability]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def content_fingerprint(uri: str, st: Any) -> str:
    """A digest that changes when the folder's content does: an export's marker (it lists every file's
    SHA-256), a prepared split's manifest, else the listing (names, sizes, modification times / ETags);
    a hub id stands for itself."""
    from ftdist import storage
    from ftdist.data.manifest import MANIFEST
    from ftdist.export_files import EXPORT_MARKER
    from ftdist.modeling import remote_version

    if storage.is_remote(uri):
        return remote_version(uri, st).digest
    local = storage.local_path(uri) if uri.startswith(("pkg://", "file://")) else uri
    if not os.path.isdir(local):
        return uri
    for marker in (EXPORT_MARKER, MANIFEST):
        path = os.path.join(local, marker)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                return hashlib.sha256(f.read()).hexdigest()
    listing = sorted((os.path.relpath(os.path.join(d, n), local), os.stat(os.path.join(d, n)).st_size,
                      os.stat(os.path.join(d, n)).st_mtime_ns) for d, _, names in os.walk(local) for n in names)
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def read_weights(folder: str) -> dict[str, torch.Tensor]:
    """Every tensor of a ``save_pretrained`` folder (safetensors, sharded or not)."""
    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise RuntimeError(f"no .safetensors weights in {folder}")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(f))
    return out


def swap_encoder(model: Any, encoder_folder: str) -> None:
    """Replace ``model``'s encoder (its ``base_model``) by the one saved in ``encoder_folder``."""
    prefix = model.base_model_prefix + "."
    state = read_weights(encoder_folder)
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    result = model.base_model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("pooler.")]
    unexpected = [k for k in result.unexpected_keys if not k.startswith("pooler.")]
    if missing or unexpected:
        raise RuntimeError(f"the encoder of {encoder_folder} does not fit the head's model: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")


def load_for_set(p: Pipeline, row: int, s: EvalSet) -> tuple[Any, bool] | None:
    """The model scoring ``s`` after ``row`` and whether its head was trained (False: initialised, the
    starting model shipped none); None when no stage up to ``row`` trained the set's head."""
    from transformers.utils import logging as hf_logging

    from ftdist.modeling import resolve_model_path
    from ftdist.tasks import auto_model_class

    head = head_row(p, row, s)
    if head is None:
        return None
    hf_logging.disable_progress_bar()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report lists the head/pooler swaps this module makes on purpose
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # a head the starting model lacks is initialised the same way every time
            model, info = auto_model_class(s.task).from_pretrained(
                resolve_model_path(model_uri(p, head), p.storage), dtype=torch.float32, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    prefix = model.base_model_prefix + "."
    trained = not any(not k.startswith(prefix) and not k.startswith("pooler.") for k in info["missing_keys"])
    if head != row:
        swap_encoder(model, resolve_model_path(model_uri(p, row), p.storage))
    return model.eval(), trained


class _Out:
    def __init__(self, loss: torch.Tensor, logits: torch.Tensor | None = None) -> None:
        self.loss, self.logits = loss, logits


def compact_forward(model: Any, task: str, chunk: int = 16) -> Any:
    """A forward over a collated (and already masked) batch that wastes less compute on padding: rows
    sorted by length in chunks of ``chunk``, each cut to its own longest row, and, for a masked LM,
    the head applied only to the masked positions (~15% of tokens; its vocabulary projection costs as
    much as a small encoder). Same loss (mean cross-entropy over the batch's masked tokens or rows) and
    logits (batch order) as ``model(**batch)``, to float rounding: padding is masked out of attention.

    Why: the batches (and so the masks) must be those of the stage's own validation pass, and on tweets
    of 10-64 tokens a batch padded to its longest row is about half padding."""
    import torch.nn.functional as F

    base = model.base_model
    heads = [m for m in model.children() if m is not base and any(True for _ in m.parameters())]
    mlm_head = heads[0] if task == MASKED_LM and len(heads) == 1 else None

    def forward(batch: dict[str, torch.Tensor]) -> _Out:
        lengths = batch["attention_mask"].sum(1)
        order = torch.argsort(lengths, stable=True)
        labels = batch["labels"]
        loss_sum = torch.zeros((), dtype=torch.float64)
        logits: list[tuple[torch.Tensor, torch.Tensor]] = []
        for part in order.split(chunk):
            n = int(lengths[part].max())
            sub = {k: v[part][:, :n] if v.dim() == 2 else v[part] for k, v in batch.items()}
            if task == MASKED_LM:
                picked = sub["labels"] != -100
                if mlm_head is not None:
                    hidden = base(**{k: v for k, v in sub.items() if k != "labels"})[0]
                    out = mlm_head(hidden[picked]).float()
                else:
                    out = model(**{k: v for k, v in sub.items() if k != "labels"}).logits.float()[picked]
                loss_sum += F.cross_entropy(out, sub["labels"][picked], reduction="sum").double()
            else:
                out = model(**{k: v for k, v in sub.items() if k != "labels"}).logits.float()
                loss_sum += F.cross_entropy(out, sub["labels"], reduction="sum").double()
                logits.append((part, out))
        if task == MASKED_LM:
            return _Out((loss_sum / max(int((labels != -100).sum()), 1)).float())
        full = torch.empty(len(order), logits[0][1].shape[-1])
        for part, out in logits:
            full[part] = out
        return _Out((loss_sum / len(order)).float(), full)

    return forward


def score(model: Any, tokenizer: Any, s: EvalSet, storage_cfg: Any) -> float:
    """Set ``s``'s metric for ``model``: the loop's evaluation over the split, one process."""
    device = next(model.parameters()).device
    reader = ShardReader(join_uri(s.data, s.split), storage_cfg, 0, 1, s.batch_size, s.seed, shuffle=False,
                         tokenizer=tokenizer, max_length=s.max_length)
    masker = Masker(tokenizer, s.mlm_probability, s.seed, s.data) if s.task == MASKED_LM else None
    forward = compact_forward(model, s.task)
    metrics, _, _ = evaluate_batches(forward, reader.batches(0), tokenizer.pad_token_id, s.task,
                                     model.config.num_labels if s.task == CLASSIFICATION else None, device,
                                     masker=masker, mask_key=(EVAL_KEYS.get(s.split, OTHER_SPLIT_KEY), 0))
    return float(metrics[s.metric])


def evaluate_entry(p: Pipeline, row: int, s: EvalSet) -> dict[str, Any]:
    """``{"value": R[row][s] or None, "head_trained": bool, "key": entry_key}`` for the model after ``row``
    (-1: start)."""
    return evaluate_entries(p, [(row, s)])[(row, s.name)]


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class _Models:
    """The models of a batch of entries, each loaded once (one load at a time: loading seeds torch's
    global RNG and sets transformers' log level) and dropped after the last set it scores."""

    def __init__(self, p: Pipeline, uses: Counter[tuple[int, int, str]]) -> None:
        self.p, self.uses = p, uses
        self.lock = threading.Lock()
        self.models: dict[tuple[int, int, str], tuple[Any, bool]] = {}
        self.loads = 0

    def get(self, key: tuple[int, int, str], s: EvalSet) -> tuple[Any, bool, Any]:
        """The model for ``key`` with whether its head was trained, and a tokenizer of the row's own."""
        from ftdist.modeling import load_tokenizer

        with self.lock:
            if key not in self.models:
                loaded = load_for_set(self.p, key[0], s)
                assert loaded is not None  # keys with no head never get here
                self.loads += 1
                self.models[key] = loaded
            model, trained = self.models[key]
            tok = load_tokenizer(model_uri(self.p, key[0]), cfg=self.p.storage)  # not shared between threads
        return model, trained, tok

    def release(self, key: tuple[int, int, str]) -> None:
        with self.lock:
            self.uses[key] -= 1
            if not self.uses[key]:
                del self.models[key]


def evaluate_entries(p: Pipeline, wanted: Sequence[tuple[int, EvalSet]], cpus: int | None = None,
                     ) -> dict[tuple[int, str], dict[str, Any]]:
    """The entries ``(row, set)`` of ``wanted``, keyed by ``(row, set name)`` (see the module docstring)."""
    out: dict[tuple[int, str], dict[str, Any]] = {}
    todo: list[tuple[tuple[int, int, str], int, EvalSet]] = []
    fingerprints: dict[str, str] = {}
    keys = {(row, s.name): entry_key(p, row, s, fingerprints) for row, s in wanted}
    for row, s in wanted:
        head = head_row(p, row, s)
        if head is None:
            out[(row, s.name)] = {"value": None, "head_trained": False, "key": keys[(row, s.name)]}
        else:
            todo.append(((row, head, s.task), row, s))
    if not todo:
        return out
    order = list(dict.fromkeys(k for k, _, _ in todo))  # a model's sets one after another: few models alive
    todo.sort(key=lambda e: order.index(e[0]))
    cpus = cpus or usable_cpus()
    workers = min(len(todo), cpus)
    threads = max(1, cpus // workers)
    models = _Models(p, Counter(k for k, _, _ in todo))

    def one(entry: tuple[tuple[int, int, str], int, EvalSet]) -> dict[str, Any]:
        key, row, s = entry
        torch.set_num_threads(threads)  # this thread's own (OpenMP's count is per thread)
        try:
            model, trained, tok = models.get(key, s)
            return {"value": score(model, tok, s, p.storage), "head_trained": trained}
        finally:
            models.release(key)

    with ThreadPoolExecutor(workers, thread_name_prefix="ftdist-eval") as pool:
        for (_, row, s), result in zip(todo, pool.map(one, todo)):
            out[(row, s.name)] = {**result, "key": keys[(row, s.name)]}
    return out
