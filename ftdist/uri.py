"""Joining and classifying storage locations: one rule for local paths and ``scheme://`` URIs alike,
so run folders, data sets and exports are addressed the same way on a laptop and in object storage."""

from __future__ import annotations


def join_uri(base: str, *parts: str) -> str:
    """``base/part/...`` with exactly one slash between parts (``s3://b/x/`` + ``/y`` -> ``s3://b/x/y``)."""
    return "/".join([base.rstrip("/")] + [p.strip("/") for p in parts])


def is_uri(path: str) -> bool:
    """A ``scheme://`` location (fsspec), as opposed to a local path."""
    return "://" in path
