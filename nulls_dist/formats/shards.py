"""The shard codec: WebDataset tar shards of .npy members (sample keys and dtypes: `formats.dataset`), read back
verified. The pipeline writes shards with webdataset's `TarWriter`; every reader -- the training loader, the
evaluation's source texts -- goes through `read_shard`, which checks the file's sha256 against the dataset manifest
before it parses a byte, and parses with webdataset's own tar iterators. (`nulls-data`'s rerun only needs the
digest, not the samples: it streams each shard through `digests.file_mismatch`, the same comparison.)
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import io
import os
import sys
import tarfile
from pathlib import Path

import numpy as np

from nulls_dist.formats import dataset as schema
from nulls_dist.formats.digests import mismatch


class ShardError(ValueError):
    """A shard is missing, does not match the manifest, or is not a well-formed sample tar (names the file)."""


@functools.cache
def import_webdataset():
    """The webdataset module, imported without torch unless this process already loaded torch.

    webdataset imports torch at import time when it is installed, only for its DataLoader-facing classes, and
    ships stand-ins for them when torch is missing; the shard writer (TarWriter, encoder off) needs none of it.
    Hiding torch for that one import keeps the data pipeline's processes torch-free, as `data_pipeline` is
    meant to be: about 250 MB of RSS and 2 s of imports less per shard worker. In a process that has torch
    loaded (a trainer, the test suite) webdataset is imported as usual."""
    if "torch" in sys.modules or "webdataset" in sys.modules:
        return importlib.import_module("webdataset")
    sys.modules["torch"] = None  # `import torch` now raises ModuleNotFoundError, which webdataset handles
    try:
        return importlib.import_module("webdataset")
    finally:
        del sys.modules["torch"]


def verify_shard(path: str | os.PathLike, expected_sha256: str, expected_bytes: int | None = None) -> bytes:
    """The shard's bytes, after checking its size and sha256 against the manifest's."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ShardError(f"shard {path} is missing") from None
    except OSError as exc:
        raise ShardError(f"shard {path} is unreadable: {exc}") from None
    problem = mismatch(path, len(data), hashlib.sha256(data).hexdigest(), expected_sha256, expected_bytes,
                       "the manifest")
    if problem is not None:
        raise ShardError(f"shard {problem}")
    return data


def decode_samples(data: bytes, where: str | os.PathLike) -> list[dict[str, np.ndarray]]:
    """A shard's samples in key order, each {sample key: array} (.npy members, pickles refused)."""
    wds = import_webdataset()
    samples = []
    try:
        for raw in wds.tariterators.tarfile_samples([{"url": str(where), "stream": io.BytesIO(data)}]):
            fields = {k: v for k, v in raw.items() if not k.startswith("__")}
            if set(fields) != set(schema.SAMPLE_KEYS):
                raise ShardError(f"shard {where}: sample {raw.get('__key__')} has members {sorted(fields)}, "
                                 f"expected {list(schema.SAMPLE_KEYS)}")
            samples.append((raw["__key__"], {k: np.load(io.BytesIO(v), allow_pickle=False)
                                             for k, v in fields.items()}))
    except (tarfile.TarError, ValueError, OSError) as exc:
        if isinstance(exc, ShardError):
            raise
        raise ShardError(f"shard {where}: not a well-formed sample tar ({exc})") from None
    samples.sort(key=lambda item: item[0])
    return [fields for _, fields in samples]


def read_shard(path: str | os.PathLike, expected_sha256: str, num_samples: int | None = None,
               expected_bytes: int | None = None) -> list[dict[str, np.ndarray]]:
    """Verify (sha256, size) then decode one shard; the sample count must match the manifest's when given."""
    samples = decode_samples(verify_shard(path, expected_sha256, expected_bytes), path)
    if num_samples is not None and len(samples) != num_samples:
        raise ShardError(f"shard {path}: {len(samples)} samples, the manifest says {num_samples}")
    return samples
