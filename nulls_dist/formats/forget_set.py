"""The forget-set document: which sources a deployment must never activate, written by `nulls-unlearn` and read
by every deployment path (generation, evaluation, the lm-eval adapter) and by `verify`. Standard library only.

    {"format": "nulls-forget-set", "version": 1,
     "checkpoint_sha256": <content digest of the trained checkpoint it belongs to>,
     "manifest_sha256": <sha256 of that checkpoint's manifest index.json>,
     "source_ids": [ascending ids], "sources": {"<id>": "<title>", ...},
     "sha256": forget_set_hash(source_ids, checkpoint_sha256, manifest_sha256),
     "history": [{"time_utc", "method", "added": [ids], "sha256": <hash after this request>}, ...]}

The history is append-only and self-checking: replaying its `added` lists from the empty set must give each
entry's hash and end at the document's own; `load_forget_set` refuses a document where anything does not
recompute (a hand edit, a truncated history, an id added twice), naming the file and the first difference.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

from nulls_dist.formats.digests import json_sha256
from nulls_dist.formats.documents import read_json_object

FORGET_SET_FORMAT = "nulls-forget-set"
FORGET_SET_VERSION = 1


def forget_set_hash(source_ids: Iterable[int], checkpoint_sha256: str, manifest_sha256: str) -> str:
    return json_sha256({"source_ids": sorted(int(s) for s in source_ids), "checkpoint_sha256": checkpoint_sha256,
                        "manifest_sha256": manifest_sha256})


def check_forget_set(doc: dict[str, Any], where: str | os.PathLike = "forget set") -> dict[str, Any]:
    """ValueError naming `where` and what does not recompute; returns the document."""
    if doc.get("format") != FORGET_SET_FORMAT:
        raise ValueError(f"{where}: not a forget set (format {doc.get('format')!r})")
    for field in ("checkpoint_sha256", "manifest_sha256", "source_ids", "sources", "sha256", "history"):
        if field not in doc:
            raise ValueError(f"{where}: forget set lacks `{field}`")
    ids = doc["source_ids"]
    if not all(isinstance(s, int) for s in ids) or ids != sorted(set(ids)):
        raise ValueError(f"{where}: `source_ids` must be distinct ascending integers")
    if sorted(int(k) for k in doc["sources"]) != ids:
        raise ValueError(f"{where}: `sources` and `source_ids` name different sources")
    ckpt, manifest = doc["checkpoint_sha256"], doc["manifest_sha256"]
    if forget_set_hash(ids, ckpt, manifest) != doc["sha256"]:
        raise ValueError(f"{where}: `sha256` does not recompute from its sources, checkpoint and manifest digests")
    replay: set[int] = set()
    for i, entry in enumerate(doc["history"]):
        added = [int(s) for s in entry.get("added", [])]
        if replay & set(added):
            raise ValueError(f"{where}: history[{i}] adds source(s) {sorted(replay & set(added))} already forgotten")
        replay |= set(added)
        if forget_set_hash(replay, ckpt, manifest) != entry.get("sha256"):
            raise ValueError(f"{where}: history[{i}] does not recompute (edited or truncated history)")
    if sorted(replay) != ids:
        raise ValueError(f"{where}: the history adds {sorted(replay)}, the forget set holds {ids}")
    return doc


def load_forget_set(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a forget set (see the module docstring)."""
    return check_forget_set(read_json_object(Path(path), "a forget set"), path)


def check_belongs_to(doc: dict[str, Any], checkpoint_sha256: str, manifest_sha256: str | None = None,
                     where: str | os.PathLike = "forget set") -> None:
    """ValueError when the forget set was made for another checkpoint (or manifest)."""
    if doc["checkpoint_sha256"] != checkpoint_sha256:
        raise ValueError(f"{where} belongs to checkpoint {doc['checkpoint_sha256'][:16]}..., not to this one "
                         f"({checkpoint_sha256[:16]}...)")
    if manifest_sha256 is not None and doc["manifest_sha256"] != manifest_sha256:
        raise ValueError(f"{where} was made with manifest {doc['manifest_sha256'][:16]}..., not with this one "
                         f"({manifest_sha256[:16]}...)")
