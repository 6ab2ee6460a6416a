"""How the user named ``data prepare``'s options: as CLI flags or as config keys.

Why: the same preparation runs from ``ftdist data prepare --text-field ...`` and from a run config's
``data.prepare.text_field`` (prepared on first use), and an error must name what the user wrote: a
user of a config told to "set --text-field" looks for a flag they never used. The caller says which
naming applies (``named_as``); the messages ask ``named(key)``. A context variable rather than a
parameter through every reader and check, because only the messages need it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

#: ``ftdist data prepare``'s flags (the default: the CLI is the lower level)
FLAGS = {"input": "--input", "format": "--format", "encoding": "--encoding", "text_field": "--text-field",
         "label_field": "--label-field", "split": "--split", "label_names": "--label-names", "output": "--output",
         "pack": "--pack", "task": "--task", "raw_text": "--raw-text", "keep_text": "--keep-text", "model": "--model"}
#: a run config's keys for the same options
CONFIG_KEYS = {"input": "data.prepare.input", "format": "data.prepare.format", "encoding": "data.prepare.encoding",
               "text_field": "data.prepare.text_field", "label_field": "data.prepare.label_field",
               "split": "data.prepare.split", "label_names": "model.label_names", "output": "data.path",
               "pack": "data.prepare.pack", "task": "model.task", "raw_text": "data.prepare.tokenize: false",
               "keep_text": "data.prepare.keep_text", "model": "model.tokenizer (or model.path)"}

_names: ContextVar[dict[str, str]] = ContextVar("ftdist_prepare_names", default=FLAGS)


def named(key: str) -> str:
    """The name the user knows option ``key`` by."""
    return _names.get()[key]


@contextlib.contextmanager
def named_as(names: dict[str, str]) -> Iterator[None]:
    """Messages raised inside name options as in ``names`` (FLAGS or CONFIG_KEYS)."""
    token = _names.set(names)
    try:
        yield
    finally:
        _names.reset(token)
