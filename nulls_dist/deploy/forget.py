"""Putting a forget set in force on a deployed model: the document is checked (its hash and its append-only
history recompute: `formats/forget_set.py`), it must belong to this checkpoint (and, when given, to this
manifest), and the model then refuses to activate any forgotten source's sinks in every mode, for every caller
(`NullTransformer.enforce_forget_set`): generation, evaluation and the lm-eval adapter alike."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from nulls_dist.deploy.checkpoint_io import LoadedCheckpoint
from nulls_dist.formats.checkpoint import PURGE_KEY
from nulls_dist.formats.forget_set import check_belongs_to, load_forget_set
from nulls_dist.formats.weights import state_dict_digest


def base_checkpoint_sha256(ckpt: LoadedCheckpoint) -> str:
    """The trained checkpoint a (possibly hard-unlearned or purged) checkpoint derives from: what forget sets
    and manifests cite (a purge records the digest the weights had before it: `formats.checkpoint.PURGE_KEY`)."""
    return (ckpt.meta.get("unlearning", {}).get("base_checkpoint_sha256")
            or (ckpt.meta.get(PURGE_KEY) or {}).get("original_sha256") or state_dict_digest(ckpt.state_dict))


def apply_forget_set(model, ckpt: LoadedCheckpoint, forget_set_path: str | Path,
                     manifest_sha256: str | None = None) -> dict[str, Any]:
    """Load, check and enforce a forget set on `model` (built from `ckpt`); returns the document."""
    doc = load_forget_set(forget_set_path)
    check_belongs_to(doc, base_checkpoint_sha256(ckpt), manifest_sha256, where=forget_set_path)
    model.enforce_forget_set(doc["source_ids"])
    return doc
