"""Joining and classifying storage locations: one rule for local paths and ``scheme://`` URIs alike,
so run folders, data sets and exports are addressed the same way on a laptop and in object storage."""

from __future__ import annotations

import os


def join_uri(base: str, *parts: str) -> str:
    """``base/part/...`` with exactly one slash between parts (``s3://b/x/`` + ``/y`` -> ``s3://b/x/y``)."""
    return "/".join([base.rstrip("/")] + [p.strip("/") for p in parts])


def is_uri(path: str) -> bool:
    """A ``scheme://`` location (fsspec), as opposed to a local path."""
    return "://" in path


def absolute_local_path(path: str) -> str:
    """A local path made absolute from the current directory (``~`` expanded), because Ray workers and
    jobs run in another working directory; a URI, or a path holding a ``${...}`` reference (resolved
    later, where it is used), is returned as it is."""
    if is_uri(path) or os.path.isabs(path) or "${" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))
