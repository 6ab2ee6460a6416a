"""The file list an export's marker carries, so a reader loads one complete version of an export.

Why: object stores have no folder rename. A re-export to ``s3://.../model`` overwrites the files one
by one while the previous marker is still there, so a reader that trusted "the marker exists" could
load a mix of old and new weights. The marker (uploaded last, one atomic PUT) therefore names every
file of its version with size and SHA-256; a reader downloads exactly those files and checks them,
and a mismatch means "a new version is being published": it waits and reads the new marker.
The marker's text is also the version: the model cache is keyed by it, so changed weights are never
served from a stale copy.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

EXPORT_MARKER = "ftdist_export.json"  # written last; its presence marks a complete export
FILES_KEY = "files"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_list(folder: str, marker: str) -> dict[str, dict[str, Any]]:
    """``{relative path: {size, sha256}}`` of every file in ``folder`` except the marker itself."""
    root = Path(folder)
    return {str(p.relative_to(root)): {"size": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != marker}


def write_marker(folder: str, marker: str, info: dict[str, Any]) -> None:
    """Write ``info`` as the marker of ``folder``, sealed with the list of the folder's files.

    Call it when every other file of the export is in place: the list is what readers verify."""
    sealed = {**info, FILES_KEY: file_list(folder, marker)}
    with open(os.path.join(folder, marker), "w") as f:
        json.dump(sealed, f, indent=1)


def listed_files(marker_text: str) -> dict[str, dict[str, Any]] | None:
    """The file list of a marker, or None for a marker without one (older exports, other tools)."""
    try:
        record = json.loads(marker_text)
    except json.JSONDecodeError:
        return None
    files = record.get(FILES_KEY) if isinstance(record, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
        return None
    return files


def mismatches(folder: str, files: dict[str, dict[str, Any]]) -> list[str]:
    """The listed files that are missing from ``folder`` or differ in size or content."""
    bad = []
    for rel, want in files.items():
        p = Path(folder) / rel
        if not p.is_file() or p.stat().st_size != want.get("size") or _sha256(p) != want.get("sha256"):
            bad.append(rel)
    return bad
