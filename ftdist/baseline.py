"""A classical baseline for classification: TF-IDF + logistic regression on the run's own splits.

Why: a fine-tuned transformer that does not beat a bag-of-words model (it happens on some real
topic data, and always when fine-tuning collapses) is not worth its cost, and users rarely check.
The baseline is fitted on the same train split and scored on the same test split as the run, on
the driver, in seconds; the summary keeps its figures and the report says plainly when
fine-tuning does not beat it.

Features: the raw text when the data set stores it (``keep_text`` or raw-text data sets), else
the token ids the model sees (word pieces as words; unigrams and bigrams either way). At most
``tracking.baseline_max_rows`` training rows are used: the first rows in shard order, which
``data prepare`` already shuffled, so a bounded sample of a huge data set is a random one.
"""

from __future__ import annotations

import io
import time
from typing import Any

from ftdist import storage
from ftdist.config import RunConfig
from ftdist.uri import join_uri
from ftdist.data.manifest import Manifest, load_manifest
from ftdist.metrics import classification_metrics, per_class_metrics

#: fine-tuning "beats" the baseline only by more than this much test macro-F1 (noise on small test sets)
MARGIN = 0.0


def read_split(cfg: RunConfig, split: str, max_rows: int | None) -> tuple[list[str], list[int], str]:
    """Documents (text, or token ids as space-separated words), labels, and which of the two it is."""
    import pyarrow.parquet as pq

    uri = join_uri(cfg.data.path, split)
    m: Manifest = load_manifest(uri, cfg.storage)
    feature = "text" if "text" in m.columns else "input_ids"
    docs: list[str] = []
    labels: list[int] = []
    for shard in m.shards:
        if max_rows is not None and len(docs) >= max_rows:
            break
        table = pq.read_table(io.BytesIO(storage.read_bytes(join_uri(uri, shard.file), cfg.storage)),
                              columns=[feature, "label"])
        col = table.column(feature).to_pylist()
        docs += col if feature == "text" else [" ".join(map(str, ids)) for ids in col]
        labels += table.column("label").to_pylist()
    if max_rows is not None:
        docs, labels = docs[:max_rows], labels[:max_rows]
    return docs, labels, feature


def tfidf_baseline(cfg: RunConfig, num_labels: int, label_names: list[str] | None) -> dict[str, Any] | None:
    """Fit on train, score on test: accuracy, macro-F1, per class; None for other tasks or when off."""
    if cfg.model.task != "sequence-classification" or not cfg.tracking.baseline or num_labels < 2:
        return None
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    import torch
    from sklearn.metrics import confusion_matrix

    t0 = time.perf_counter()
    limit = cfg.tracking.baseline_max_rows
    train_docs, train_y, feature = read_split(cfg, "train", limit)
    test_docs, test_y, _ = read_split(cfg, "test", None)
    if len(set(train_y)) < 2:
        return None  # one class in train: logistic regression has nothing to separate
    # one-character tokens count too: token ids such as "7" and short words would be dropped by the default
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True, token_pattern=r"(?u)\b\w+\b")
    x_train = vec.fit_transform(train_docs)
    clf = LogisticRegression(max_iter=1000, C=10.0)
    clf.fit(x_train, train_y)
    pred = clf.predict(vec.transform(test_docs))
    conf = confusion_matrix(test_y, pred, labels=list(range(num_labels))).tolist()
    scores = classification_metrics(0.0, torch.tensor(conf))  # the same macro-F1 definition as the run's
    return {"model": "tfidf+logistic_regression", "features": feature, "train_rows": len(train_docs),
            "sampled": limit is not None and len(train_docs) >= limit,
            "test": {"accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"]},
            "test_per_class": per_class_metrics(conf, label_names), "fit_time_s": time.perf_counter() - t0}

