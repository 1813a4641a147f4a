"""What a rerun reuses is checked first: `verify_files` compares files (ingest parts, shards, shard stats) with the
size and sha256 recorded when they were written, in threads, with a progress bar in bytes. A stage reuses a file
only when it matches; anything else is named in a warning and written again.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Hashable, Iterable

from tqdm import tqdm

from nulls_dist.formats.digests import file_mismatch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recorded:
    """A file as its record describes it. `owner` groups files (e.g. a shard task's shards and stats)."""

    owner: Hashable
    path: Path
    sha256: str
    num_bytes: int | None
    record: str  # where the digest was recorded (named in the warning)


def verify_files(files: Iterable[Recorded], num_threads: int = 1, desc: str = "verify") -> dict[Hashable, str]:
    """{owner: the first problem found among its files} for every owner with a file that is missing or differs
    from its record. hashlib and file reads release the GIL, so `num_threads` threads hash that many files at
    once (a rerun over a large dataset reads every byte once)."""
    files = list(files)
    problems: dict[Hashable, str] = {}
    total = sum(f.num_bytes or 0 for f in files)
    if files:
        log.info("%s: checking %d files (%.2f GB) against their recorded sha256", desc, len(files), total / 1e9)
    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=None if files else True) as bar, \
            ThreadPoolExecutor(max(1, num_threads)) as pool:
        checks = pool.map(lambda f: file_mismatch(f.path, f.sha256, f.num_bytes, f.record), files)
        for f, problem in zip(files, checks):
            bar.update(f.num_bytes or 0)
            if problem is not None:
                problems.setdefault(f.owner, problem)
    return problems
