"""Digests every format cites: a file's sha256 (streamed), and the canonical sha256 of a JSON document (sorted
keys, compact separators), so that the same content always gives the same digest whatever wrote it."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

CHUNK_BYTES = 1 << 22  # 4 MiB reads: hashing runs at memory speed, few system calls


def file_sha256(path: str | os.PathLike, chunk_bytes: int = CHUNK_BYTES) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_bytes), b""):
            digest.update(block)
    return digest.hexdigest()


def bytes_sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(payload: Any) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


def json_sha256(payload: Any) -> str:
    """sha256 of the canonical JSON encoding of `payload`."""
    return hashlib.sha256(canonical_json(payload)).hexdigest()
