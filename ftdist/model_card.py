"""A model card (``README.md`` in the Hugging Face format) beside every export.

Why: an export leaves the run folder (a model registry, the Hub, another team) without the run's
summary, and a reader of the folder alone should still learn what the model is, what it was trained
on, how well it did against the baselines, what the run's own diagnoses said, and how to load it.
The card's YAML metadata (``model-index``) is what the Hub and its tools read; its numbers are the
run summary's, never recomputed. Written by the driver once the summary is known (the export itself
is written earlier, by rank 0); a multi-task run writes one card per task export. URIs are shown
redacted, and only what the summary holds is written (no secrets: the summary has none).
"""

from __future__ import annotations

from typing import Any

import yaml

from ftdist import storage
from ftdist.config import StorageSection
from ftdist.redaction import redact_uri
from ftdist.uri import join_uri

CARD = "README.md"
#: ftdist task -> the Hub's pipeline tag
PIPELINE_TAGS = {"sequence-classification": "text-classification", "regression": "text-classification",
                 "causal-lm": "text-generation", "masked-lm": "fill-mask"}
#: metric name -> the Hub's metric type
METRIC_TYPES = {"macro_f1": "f1", "accuracy": "accuracy", "loss": "loss", "perplexity": "perplexity",
                "rmse": "rmse", "mae": "mae", "r2": "r_squared", "pearson": "pearsonr", "spearman": "spearmanr"}


def cards(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(export URI, card text) for each export of a completed run's summary."""
    cfg = summary["config"]
    if summary.get("tasks"):
        specs = {t["name"]: t for t in cfg.get("tasks") or []}
        return [(t["model_uri"], card(summary, name, t.get("test") or {}, t.get("rows") or {}, t.get("baseline") or {},
                                      t.get("test_per_class"), specs.get(name, {}).get("type", "sequence-classification"),
                                      (specs.get(name, {}).get("data") or {}).get("path")))
                for name, t in summary["tasks"].items() if t.get("model_uri")]
    if not summary.get("model_uri"):
        return []
    return [(summary["model_uri"], card(summary, summary["run"], summary.get("test") or {}, summary.get("rows") or {},
                                        summary.get("baseline") or {}, summary.get("test_per_class"),
                                        cfg["model"]["task"], (cfg.get("data") or {}).get("path")))]


def card(summary: dict[str, Any], name: str, test: dict[str, float], rows: dict[str, int], baseline: dict[str, Any],
         per_class: list[dict[str, Any]] | None, task: str, data: str | None) -> str:
    """One export's card: YAML metadata, then the text."""
    cfg = summary["config"]
    base = cfg["model"]["path"]
    tag = PIPELINE_TAGS.get(task, "text-classification")
    meta: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": tag, "tags": ["ftdist", task]}
    if _hub_id(base):
        meta["base_model"] = base
    licence = _package_licence(base)
    if licence:
        meta["license"] = licence
    meta["model-index"] = [{"name": name, "results": [{
        "task": {"type": tag},
        "dataset": {"name": _data_name(data), "type": "custom", "split": "test"},
        "metrics": [{"type": METRIC_TYPES.get(k, k), "name": k, "value": v} for k, v in test.items()],
    }]}]
    train, ds = cfg.get("train") or {}, cfg.get("deepspeed") or {}
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "",
             f"# {name}", "",
             f"A `{task}` model fine-tuned with ftdist from `{redact_uri(base)}` "
             f"(run `{summary['run']}`, {summary.get('world_size', 1)} worker(s), {summary.get('precision', 'fp32')}, "
             f"ZeRO-{ds.get('zero_stage', 0)}).", "",
             "## Training data", "",
             f"`{redact_uri(data) if data else 'not recorded'}`: " + ", ".join(f"{v:,} {k} rows" for k, v in rows.items()) + ".",
             "",
             "## Hyperparameters", "", "| key | value |", "|---|---|"]
    for key in ("epochs", "batch_size", "gradient_accumulation_steps", "learning_rate", "warmup_ratio", "weight_decay",
                "early_stopping_patience"):
        if train.get(key) is not None:
            lines.append(f"| train.{key} | {train[key]} |")
    lines += [f"| epochs run | {len(summary.get('epochs') or [])} (best: {summary.get('best_epoch')}) |",
              f"| optimizer steps | {summary.get('global_step')} |", "",
              "## Evaluation (test split)", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in test.items()]
    for key, what in (("majority_class_accuracy", "majority-class baseline accuracy"),
                      ("mean_predictor_rmse", "mean-predictor baseline rmse")):
        if baseline.get(key) is not None:
            lines.append(f"| {what} | {baseline[key]:.4f} |")
    tfidf = baseline.get("tfidf_logreg") or {}
    for k in ("accuracy", "macro_f1"):
        if isinstance(tfidf.get(k), float):
            lines.append(f"| TF-IDF + logistic regression baseline {k} | {tfidf[k]:.4f} |")
    if per_class:
        lines += ["", "| class | precision | recall | f1 | support |", "|---|---|---|---|---|"]
        lines += [f"| {c['label']} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | {c['support']} |"
                  for c in per_class]
    diagnoses = [d["message"] for d in summary.get("diagnoses") or []]
    lines += ["", "## The run's diagnoses", ""] + ([f"- {m}" for m in diagnoses] or ["None."])
    lines += ["", "## Intended use and limits", "",
              f"Trained and evaluated on the data above only: its test split is the only evidence of quality. "
              f"Texts longer than {(cfg.get('data') or {}).get('max_length', 'the max_length')} tokens were cut in "
              f"training. Check the model on data from where it will be used before relying on it.",
              "", "## How to load", "", "```python",
              _load_snippet(task, ((cfg["model"].get("lora") or {}).get("export") == "adapter")), "```", "",
              "Or with ftdist: `ftdist predict THIS_FOLDER --input DATA --output OUT`, "
              "`ftdist serve THIS_FOLDER`.", ""]
    return "\n".join(lines)


def write_cards(summary: dict[str, Any], cfg: StorageSection) -> list[str]:
    """Write each export's card; returns the URIs written."""
    written = []
    for uri, text in cards(summary):
        target = join_uri(uri, CARD)
        storage.write_text(target, text, cfg)
        written.append(target)
    return written


def _load_snippet(task: str, adapter: bool) -> str:
    """Python that loads the export: a plain model, or (``lora.export: adapter``) peft's adapter on its base."""
    auto = {"causal-lm": "AutoModelForCausalLM", "masked-lm": "AutoModelForMaskedLM"}.get(
        task, "AutoModelForSequenceClassification")
    if adapter:
        return (f"from peft import PeftModel\nfrom transformers import AutoTokenizer, {auto}\n\n"
                f"tokenizer = AutoTokenizer.from_pretrained(\"THIS_FOLDER\")\n"
                f"base = {auto}.from_pretrained(\"BASE_MODEL\")  # the model the adapter was trained on (above)\n"
                f"model = PeftModel.from_pretrained(base, \"THIS_FOLDER\")")
    return (f"from transformers import AutoTokenizer, {auto}\n\n"
            f"tokenizer = AutoTokenizer.from_pretrained(\"THIS_FOLDER\")\n"
            f"model = {auto}.from_pretrained(\"THIS_FOLDER\")")


def _hub_id(path: str) -> bool:
    """A Hub model id ("org/name" or "name"), not a local path or a URI."""
    return "://" not in path and not path.startswith((".", "/", "~")) and path.count("/") <= 1


def _data_name(path: str | None) -> str:
    return redact_uri(path).rstrip("/").rsplit("/", 1)[-1] if path else "unknown"


def _package_licence(path: str) -> str | None:
    """The licence a ``pkg://`` model's Python package declares (its metadata), if any."""
    if not path.startswith("pkg://"):
        return None
    from importlib import metadata

    module = path.removeprefix("pkg://").split("/", 1)[0]
    for dist in metadata.packages_distributions().get(module, []):
        meta = metadata.metadata(dist)
        for licence in (meta.get_all("License-Expression") or []) + (meta.get_all("License") or []):
            if licence and len(licence) < 60:  # a name, not a licence's whole text
                return str(licence).strip().lower()
    return None
