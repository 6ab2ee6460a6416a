"""The inference core that ``ftdist predict`` (Ray Data) and ``ftdist serve`` (Ray Serve) share.

Why one module: the served model, the batch predictions and the test predictions training wrote
must agree row for row (same label, scores within 1e-4). That holds only if all three tokenize the
same way (the training tokenizer, special tokens added, truncated to the ``max_length`` recorded
in the export) and compute scores the same way (softmax of fp32 logits), so both consumers call
this code and nothing else.

What a row's prediction is:

- sequence classification: ``label`` (the class name), ``label_id`` and ``scores`` (per-class
  probabilities, in the order of the export's ``label_names``);
- causal LM: ``loss`` (mean next-token negative log-likelihood of the text, in nats), ``perplexity``
  (``exp(loss)``) and ``tokens`` (tokens predicted: length - 1); a text of 0 or 1 tokens has nothing
  to predict: ``tokens`` 0, ``loss`` and ``perplexity`` None. A causal LM has no labels to
  choose from; scoring the text is what a batch job over a data set can do without a prompt format
  (ranking candidate continuations is this, once per candidate).

A folder is accepted only with ``ftdist_export.json`` in it (written last by the exporter): an
incomplete copy, or a plain hub folder whose tokenization ftdist cannot vouch for, is refused in
one line before anything is loaded.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, replace
from typing import Any

from ftdist import run_folder as layout
from ftdist import storage
from ftdist.config import StorageSection
from ftdist.uri import join_uri
from ftdist.errors import UserError
from ftdist.export_files import EXPORT_MARKER
from ftdist.redaction import redact_uri
from ftdist.sweep.layout import BEST_MODEL

CLASSIFICATION = "sequence-classification"
CAUSAL_LM = "causal-lm"
DEFAULT_MAX_LENGTH = 512  # an export written before max_length was recorded, with an unbounded tokenizer


@dataclass(frozen=True)
class ExportInfo:
    """What ``ftdist_export.json`` says about an exported model, plus where it was found."""

    uri: str  # the folder holding the marker (MODEL may have been a run or sweep folder)
    task: str
    label_names: list[str] | None
    max_length: int | None  # tokens per text in training; None: an older export (see effective_max_length)
    version: str  # run name + a hash of the marker: changes with every export
    record: dict[str, Any]  # the marker's content

    def metadata(self) -> dict[str, Any]:
        """What the service's /metadata route and the predict output's record show."""
        return {"model": redact_uri(self.uri), "task": self.task, "label_names": self.label_names,
                "max_length": self.max_length, "version": self.version, "run": self.record.get("run"),
                "base_model": self.record.get("base_model"), "best_epoch": self.record.get("best_epoch"),
                "test": self.record.get("test")}


def locate_export(uri: str, cfg: StorageSection | None = None) -> ExportInfo:
    """The export behind ``uri``: an export folder, a run folder (``<run>/model``) or a sweep folder
    (``<sweep>/best_model``); local, ``s3://`` or ``pkg://``. A UserError naming the URI otherwise."""
    cfg = cfg or StorageSection()
    base = uri.rstrip("/")
    for candidate in (base, join_uri(base, layout.MODEL), join_uri(base, BEST_MODEL)):
        marker = join_uri(candidate, EXPORT_MARKER)
        if storage.exists(marker, cfg):
            text = storage.read_text(marker, cfg)
            return _parse_marker(candidate, marker, text)
    where = redact_uri(uri)
    if not storage.exists(base, cfg):
        raise UserError(f"model '{where}' does not exist; give an ftdist export folder, a run folder or a sweep "
                        f"folder (local, s3:// or pkg://)")
    raise UserError(f"model '{where}' is not a complete ftdist export (no {EXPORT_MARKER} in it, nor in its "
                    f"{layout.MODEL}/ or {BEST_MODEL}/); point at <run folder>/{layout.MODEL} of a finished run")


def _parse_marker(folder: str, marker: str, text: str) -> ExportInfo:
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        record = None
    task = record.get("task") if isinstance(record, dict) else None
    if task == "masked-lm":
        raise UserError(f"'{redact_uri(marker)}' is a masked-LM export (domain-adaptive pre-training): it has no "
                        f"predictions to serve; fine-tune a task from it (model.path: its folder) and deploy that")
    if isinstance(record, dict) and record.get("format") == "lora-adapter":
        # peft adapters load only onto their base model, which the export names but does not hold (and
        # may have been a local path on the training machine): refused here rather than crashing in a replica
        raise UserError(f"'{redact_uri(marker)}' is a LoRA adapter export (model.lora.export: adapter), which "
                        f"predict and serve cannot load; export it merged (model.lora.export: merged) and deploy that")
    if task not in (CLASSIFICATION, CAUSAL_LM):
        raise UserError(f"'{redact_uri(marker)}' is not a valid ftdist export record (task {task!r}); "
                        f"re-export the model with `ftdist train`")
    assert isinstance(record, dict)
    names = record.get("label_names")
    max_length = record.get("max_length")
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return ExportInfo(folder, task, list(names) if names else None,
                      int(max_length) if isinstance(max_length, int) and max_length > 0 else None,
                      f"{record.get('run') or 'model'}-{digest}", record)


def effective_max_length(info: ExportInfo, tokenizer: Any, model_config: Any) -> int:
    """Tokens per text: training's when recorded; else the smaller of the tokenizer's and the
    model's position limits (a model cannot read further anyway)."""
    if info.max_length:
        return info.max_length
    limits = [n for n in (getattr(tokenizer, "model_max_length", None),
                          getattr(model_config, "max_position_embeddings", None)) if isinstance(n, int) and 0 < n < 10**6]
    return min(limits) if limits else DEFAULT_MAX_LENGTH


class Predictor:
    """A loaded export: text (or token ids) in, one prediction dict per row out. No Ray in here."""

    def __init__(self, uri: str, cfg: StorageSection | None = None, device: str | None = None,
                 chunk_size: int = 16) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        from ftdist.modeling import load_tokenizer, resolve_model_path

        self.info = locate_export(uri, cfg)
        local = resolve_model_path(self.info.uri, cfg)  # s3:// is fetched once into the node's cache
        self.tokenizer = load_tokenizer(local)
        from transformers.utils import logging as hf_logging

        cls = AutoModelForSequenceClassification if self.info.task == CLASSIFICATION else AutoModelForCausalLM
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        hf_logging.disable_progress_bar()  # a "Loading weights" bar per actor/replica says nothing useful
        model: Any = cls.from_pretrained(local, dtype=torch.float32)  # the stubs type .to() on the class
        self.model = model.to(self.device).eval()
        self.max_length = effective_max_length(self.info, self.tokenizer, self.model.config)
        # Rows per forward: a GPU wants whole batches; on a CPU smaller length-sorted chunks pad less.
        self.chunk_size = chunk_size if self.device.type == "cpu" else 1 << 30
        if self.info.task == CLASSIFICATION and not self.info.label_names:
            n = int(self.model.config.num_labels)
            self.info = replace(self.info, label_names=[str(i) for i in range(n)])

    @property
    def label_names(self) -> list[str] | None:
        return self.info.label_names

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids exactly as ``ftdist data prepare`` made them for training."""
        from ftdist.data.prepare import tokenize

        return tokenize(self.tokenizer, texts, self.max_length)

    def predict_texts(self, texts: list[str]) -> list[dict[str, Any]]:
        return self.predict_ids(self.tokenize(texts)) if texts else []

    def predict_ids(self, ids: list[Any]) -> list[dict[str, Any]]:
        """Forwards over length-sorted chunks of the batch, each padded to its own longest row.

        Why sorted chunks: on a CPU the cost is the padded token count, and short texts padded to
        the batch's longest one cost as much as long ones (tweets of 10-64 tokens: ~2x the work).
        Padding is masked, so a row's scores do not depend on its neighbours (to ~1e-6)."""
        if not len(ids):
            return []
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out: list[dict[str, Any]] = [{}] * len(ids)
        for start in range(0, len(order), self.chunk_size):
            part = order[start:start + self.chunk_size]
            for i, row in zip(part, self._forward([ids[i] for i in part])):
                out[i] = row
        return out

    def _forward(self, ids: list[Any]) -> list[dict[str, Any]]:
        """One forward over ``ids``, padded to the longest row (as training's evaluation did)."""
        import numpy as np
        import torch

        longest = max(1, max(len(r) for r in ids))
        pad = self.tokenizer.pad_token_id
        input_ids = np.full((len(ids), longest), pad, dtype=np.int64)
        mask = np.zeros((len(ids), longest), dtype=np.int64)
        for i, r in enumerate(ids):
            input_ids[i, :len(r)] = r
            mask[i, :len(r)] = 1
        batch = {"input_ids": torch.from_numpy(input_ids).to(self.device),
                 "attention_mask": torch.from_numpy(mask).to(self.device)}
        with torch.inference_mode():
            logits = self.model(**batch).logits.float()
        if self.info.task == CLASSIFICATION:
            return self._classes(logits)
        return _lm_scores(logits, batch["input_ids"], batch["attention_mask"])

    def _classes(self, logits: Any) -> list[dict[str, Any]]:
        probs = logits.softmax(-1).cpu()
        names = self.label_names or []
        out = []
        for row in probs.tolist():
            k = max(range(len(row)), key=row.__getitem__)
            out.append({"label": names[k] if k < len(names) else str(k), "label_id": k, "scores": row})
        return out


def class_scores(logits: Any) -> list[list[float]]:
    """Per-class probabilities from logits, computed as the Predictor does (fp32 softmax): what
    training writes next to its test predictions, so that the two can be compared to 1e-4."""
    return logits.float().softmax(-1).cpu().tolist()


def _lm_scores(logits: Any, input_ids: Any, mask: Any) -> list[dict[str, Any]]:
    import torch

    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none")
    m = mask[:, 1:].float()
    sums, counts = (nll * m).sum(1).tolist(), m.sum(1).tolist()
    out: list[dict[str, Any]] = []
    for s, n in zip(sums, counts):
        # A text of 0-1 tokens has no next token to predict: its loss is undefined. None (JSON null,
        # a Parquet null) says so; NaN was not JSON, so the service answered 500.
        loss = s / n if n else None
        out.append({"loss": loss, "perplexity": math.exp(loss) if loss is not None else None, "tokens": int(n)})
    return out
