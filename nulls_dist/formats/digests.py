"""Digests every format cites: a file's sha256 (streamed), the check of a file against its recorded size and
sha256 (`mismatch`, `file_mismatch`), and the canonical sha256 of a JSON document (sorted keys, compact
separators), so that the same content always gives the same digest whatever wrote it."""
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


def mismatch(path: str | os.PathLike, num_bytes: int, digest: str, expected_sha256: str,
             expected_bytes: int | None = None, record: str = "the record") -> str | None:
    """What differs between a file's size and sha256 and the recorded ones, naming the file and `record` (where
    they were recorded); None when nothing does."""
    if expected_bytes is not None and num_bytes != expected_bytes:
        return f"{path}: {num_bytes} bytes, {record} records {expected_bytes}"
    if digest != expected_sha256:
        return f"{path}: sha256 {digest} does not match {record}'s {expected_sha256}"
    return None


def file_mismatch(path: str | os.PathLike, expected_sha256: str, expected_bytes: int | None = None,
                  record: str = "the record") -> str | None:
    """`mismatch` for a file on disk, its sha256 streamed (memory stays at one chunk); a missing or unreadable
    file is a mismatch too. The size is compared first, so a truncated file is not read at all."""
    try:
        num_bytes = os.stat(path).st_size
        if expected_bytes is not None and num_bytes != expected_bytes:
            return mismatch(path, num_bytes, "", expected_sha256, expected_bytes, record)
        return mismatch(path, num_bytes, file_sha256(path), expected_sha256, expected_bytes, record)
    except FileNotFoundError:
        return f"{path} is missing ({record} lists it)"
    except OSError as exc:
        return f"{path} is unreadable ({exc.strerror or exc})"


def bytes_sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(payload: Any) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


def json_sha256(payload: Any) -> str:
    """sha256 of the canonical JSON encoding of `payload`."""
    return hashlib.sha256(canonical_json(payload)).hexdigest()
