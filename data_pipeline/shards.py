"""The shard stage: tokenize + pack the ingested corpus into WebDataset `.tar` shards, in parallel worker
processes, each shard written atomically, resumable and idempotent.

Work is split into deterministic tasks. Train task i owns corpus rows [i*A, (i+1)*A) (A = articles per shard,
fixed in the plan) minus the holdout sources and writes exactly one shard, `shard-{i:06d}.tar`; the one holdout
task reads every row, keeps only the holdout sources and writes `holdout/shard-{j:06d}.tar`. A task that
finished leaves a stats file (tokens and shards per source, in corpus order) and a done marker
(`.work/<shard>.done.json`: per shard samples, tokens, bytes, sha256; the stats file's sha256; the plan hash).
A rerun skips a task only when its marker matches the plan and every file it names -- shard tars and stats --
still has the recorded size and sha256 (streamed, in threads: `verify.verify_files`); any other task runs
again, with a warning naming the file, and rewrites its shards atomically: a rerun repairs a damaged or
truncated shard. A changed plan (tokenizer, packing, shard size, holdouts, corpus content) clears the old
shards first. Memory per worker is bounded by one slice of A articles (the holdout task streams in windows of
A), never by the corpus: contexts stream into the tar as they are packed, and the per-source counters of a
task are numpy arrays of its own slice; freed memory is returned to the OS after every task, so a worker's peak
RSS is one task's, whatever the number of tasks.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import shutil
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from nulls_dist.data_pipeline.article_slices import (
    CorpusIndex,
    index_corpus,
    read_rows,
    read_selected_rows,
)
from nulls_dist.data_pipeline.packing import (
    Context,
    ContextBlock,
    PackingConfig,
    pack_blocks,
    shuffled,
)
from nulls_dist.data_pipeline.tokenizer import BOS_ID, EOS_ID, PAD_ID, load_tokenizer
from nulls_dist.data_pipeline.verify import Recorded, verify_files
from nulls_dist.formats import atomic
from nulls_dist.formats import dataset as schema
from nulls_dist.formats.digests import file_sha256
from nulls_dist.formats.shards import import_webdataset

log = logging.getLogger(__name__)

WORK_DIR = ".work"
HOLDOUT_DIR = "holdout"
PLAN_FILE = "plan.json"
HOLDOUT_TASK = "holdout"
# Per-sample tar overhead: three 512-byte headers, three 128-byte .npy headers, block padding (measured with
# context 1024: 10,240 bytes per sample = 7 * 1024 + 3072).
_TAR_BYTES_PER_SAMPLE = 3 * (512 + 128 + 384)
_ESTIMATE_ARTICLES = 64
_TASKS_PER_WORKER = 16


@dataclass
class ShardConfig:
    """Shard size: `target_samples`, else `target_bytes` (converted with the per-sample size). The number of
    articles per train shard is `articles_per_shard`, or estimated from the first articles of the corpus."""

    target_bytes: int = 64 * 1024 * 1024
    target_samples: int | None = None
    articles_per_shard: int | None = None
    num_workers: int = 1
    encode_batch: int = 256

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"shard.num_workers must be >= 1, got {self.num_workers}")
        if self.target_samples is not None and self.target_samples < 1:
            raise ValueError(f"shard.target_samples must be >= 1, got {self.target_samples}")
        if self.articles_per_shard is not None and self.articles_per_shard < 1:
            raise ValueError(f"shard.articles_per_shard must be >= 1, got {self.articles_per_shard}")
        if self.target_bytes < 1:
            raise ValueError(f"shard.target_bytes must be >= 1, got {self.target_bytes}")


def samples_per_shard(cfg: ShardConfig, context_length: int, token_dtype: np.dtype) -> int:
    if cfg.target_samples is not None:
        return cfg.target_samples
    sample_bytes = context_length * (token_dtype.itemsize + 4 + 1) + _TAR_BYTES_PER_SAMPLE
    return max(1, cfg.target_bytes // sample_bytes)


# ---- writing one shard -------------------------------------------------------------------------------------


class _HashingFile:
    """A write-only file that hashes and counts what passes through."""

    def __init__(self, f) -> None:
        self.f, self.sha, self.num_bytes = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.num_bytes += len(data)
        return self.f.write(data)


@functools.lru_cache(maxsize=16)
def _npy_header(dtype: str, length: int) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.zeros(length, dtype=dtype), allow_pickle=False)
    return buf.getvalue()[: -length * np.dtype(dtype).itemsize]


def _npy_rows(rows: np.ndarray) -> np.ndarray:
    """(n, T) array -> (n, H + T * itemsize) uint8: row i is np.save's bytes of rows[i] (the header depends
    only on dtype and length: built once, written into every row with one numpy assignment)."""
    n, length = rows.shape
    header = np.frombuffer(_npy_header(rows.dtype.str, length), dtype=np.uint8)  # (H,)
    out = np.empty((n, len(header) + rows.dtype.itemsize * length), dtype=np.uint8)  # (n, H + T * itemsize)
    out[:, : len(header)] = header
    out[:, len(header) :] = np.ascontiguousarray(rows).view(np.uint8).reshape(n, -1)
    return out


def _run_starts(values: np.ndarray) -> np.ndarray:
    """The first value of every run of equal values (a superset of the unique values, much cheaper)."""
    if len(values) == 0:
        return values
    return values[np.concatenate([[True], values[1:] != values[:-1]])]


def write_shard_blocks(path: Path, shard_index: int, blocks: Iterable[ContextBlock], token_dtype: np.dtype,
                       sources: list[np.ndarray] | None = None) -> dict:
    """Write blocks of contexts as one WebDataset tar at `path` (temp name, then rename), byte-identical on
    rerun (webdataset.TarWriter with a fixed mtime, user/group "nulls", ustar headers). Each block is turned into
    the members' .npy bytes with three numpy assignments; TarWriter gets one row view per member. `sources`, if
    given, receives the source ids of the loss tokens (each at least once)."""
    with atomic.atomic_path(path) as tmp:
        with open(tmp, "wb") as raw:
            out = _HashingFile(raw)
            # A fixed integer mtime: byte-identical reruns and no pax record per member (a float mtime costs
            # 1 KiB each). TarWriter does not forward `format`, so ustar (cheaper headers) is set on its stream.
            writer = import_webdataset().TarWriter(out, encoder=False, mtime=0, user="nulls", group="nulls")
            writer.tarstream.format = tarfile.USTAR_FORMAT
            try:
                num_samples, num_tokens = _write_blocks(writer, shard_index, blocks, token_dtype, sources)
            finally:
                writer.close()  # also on error: the temp file is still open, and is removed below
    return {"samples": num_samples, "tokens": num_tokens, "bytes": out.num_bytes, "sha256": out.sha.hexdigest()}


def _write_blocks(writer, shard_index: int, blocks: Iterable[ContextBlock], token_dtype: np.dtype,
                  sources: list[np.ndarray] | None) -> tuple[int, int]:
    """Each block's members as .npy bytes (three numpy assignments), one TarWriter.write per sample with row
    views. Returns (samples, loss tokens)."""
    num_samples = num_tokens = 0
    for block in blocks:
        members = (_npy_rows(block.tokens.astype(token_dtype, copy=False)),
                   _npy_rows(block.source_ids.astype(schema.SOURCE_ID_DTYPE, copy=False)),
                   _npy_rows(block.loss_mask.astype(schema.LOSS_MASK_DTYPE, copy=False)))
        for tokens, source_ids, loss_mask in zip(*members):
            writer.write({"__key__": schema.sample_key(shard_index, num_samples),
                          schema.TOKENS_KEY: memoryview(tokens), schema.SOURCE_IDS_KEY: memoryview(source_ids),
                          schema.LOSS_MASK_KEY: memoryview(loss_mask)})
            num_samples += 1
        real = block.loss_mask == 1  # (n, T)
        num_tokens += int(np.count_nonzero(real))
        if sources is not None:
            sources.append(_run_starts(block.source_ids[real]))
    return num_samples, num_tokens


def write_shard(path: Path, shard_index: int, contexts: Iterable[Context], token_dtype: np.dtype,
                sources: list[np.ndarray] | None = None) -> dict:
    """`write_shard_blocks` for single contexts (same bytes)."""
    blocks = (ContextBlock(ctx.tokens[None], ctx.source_ids[None], ctx.loss_mask[None]) for ctx in contexts)
    return write_shard_blocks(path, shard_index, blocks, token_dtype, sources)


def _write_json(path: Path, obj: dict) -> None:
    atomic.write_text(path, json.dumps(obj, indent=1, sort_keys=True))


# ---- tasks (run in worker processes) -----------------------------------------------------------------------


def _encode(sp, texts: list[str], batch: int) -> list[np.ndarray]:
    """(L,) int32 token ids per text: one sentencepiece call per `batch` texts, returning numpy buffers (no
    Python int per token)."""
    out: list[np.ndarray] = []
    for i in range(0, len(texts), batch):
        out.extend(sp.encode(texts[i : i + batch], return_type="numpy"))
    return out


def _task_articles(task: dict, sp, window: int, counts: list[np.ndarray]):
    """(source_id, tokens) of the task's articles, read, encoded and shuffled `window` articles at a time (a
    train task is one window; the holdout task streams over the whole corpus in windows, reading text only from
    row groups that hold a holdout source). Appends per window a (2, n) int64 array to `counts`: the source ids
    and token counts (BOS/EOS included) in corpus order."""
    index = CorpusIndex(tuple(task["files"]), tuple(tuple(r) for r in task["file_rows"]))
    packing = PackingConfig(**task["packing"])
    holdout = pa.array(task["holdout_ids"], type=pa.int64())
    ids: list[np.ndarray] = []
    texts: list[str] = []
    num_windows = 0

    def flush():
        nonlocal ids, texts, num_windows
        window_ids = np.concatenate(ids)  # (n,) int64
        tokens = _encode(sp, texts, task["encode_batch"])
        counts.append(np.stack([window_ids, np.fromiter(map(len, tokens), np.int64, len(tokens)) + 2]))
        articles = list(zip(window_ids.tolist(), tokens))
        if packing.shuffle:  # holdout task: index -1
            articles = shuffled(articles, [packing.seed, task["task_index"] + 1, num_windows])
        ids, texts, num_windows = [], [], num_windows + 1
        return articles

    if task["is_holdout"]:
        batches = read_selected_rows(index, holdout, ["source_id", "text"])
    elif len(holdout):
        batches = (b.filter(pc.invert(pc.is_in(b.column("source_id"), value_set=holdout)))
                   for b in read_rows(index, task["start"], task["stop"], ["source_id", "text"]))
    else:
        batches = read_rows(index, task["start"], task["stop"], ["source_id", "text"])
    num_ids = 0
    for batch in batches:
        ids.append(batch.column("source_id").to_numpy())
        texts.extend(batch.column("text").to_pylist())
        num_ids += batch.num_rows
        if num_ids >= window:
            yield from flush()
            num_ids = 0
    if num_ids:
        yield from flush()


@functools.lru_cache(maxsize=1)
def _cached_tokenizer(path: str, mtime_ns: int, size: int):
    return load_tokenizer(path)


def _tokenizer(path: str):
    """One model per worker process, loaded by its first task (reloaded if the file changed)."""
    st = os.stat(path)
    return _cached_tokenizer(path, st.st_mtime_ns, st.st_size)


def _run_task(task: dict) -> dict:
    """Tokenize, pack and write one task's shard(s); then its stats and done marker. Returns the marker."""
    sp = _tokenizer(task["tokenizer_path"])
    packing = PackingConfig(**task["packing"])
    token_dtype = np.dtype(task["token_dtype"])
    out_dir, work = Path(task["out_dir"]), Path(task["out_dir"]) / WORK_DIR
    counts: list[np.ndarray] = []
    articles = _task_articles(task, sp, task["articles_per_shard"], counts)
    blocks = pack_blocks(articles, packing, BOS_ID, EOS_ID, PAD_ID, token_dtype)

    if task["is_holdout"]:
        (out_dir / HOLDOUT_DIR).mkdir(exist_ok=True)
        names = (f"{HOLDOUT_DIR}/{schema.shard_name(j)}" for j in range(1 << 30))
        shards, where = _write_chunks(out_dir, names, blocks, task["samples_per_shard"], token_dtype)
    else:  # a train task writes exactly one shard, named by its task index
        shards, where = _write_chunks(out_dir, iter([schema.shard_name(task["task_index"])]), blocks, None,
                                      token_dtype)
    source_ids, num_tokens = np.concatenate(counts, axis=1) if counts else np.zeros((2, 0), np.int64)
    stats = pa.table({"source_id": pa.array(source_ids, pa.int64()), "tokens": pa.array(num_tokens, pa.int64()),
                      "shards": pa.array([where.get(s, []) for s in source_ids.tolist()], pa.list_(pa.string()))})
    stats_path = work / f"{task['name']}.stats.parquet"
    with atomic.atomic_path(stats_path) as tmp:
        pq.write_table(stats, tmp)
        stats_sha256 = file_sha256(tmp)
    marker = {"task": task["name"], "plan": task["plan_hash"], "shards": shards, "stats_sha256": stats_sha256}
    _write_json(work / f"{task['name']}.done.json", marker)
    _release_memory()
    return marker


def _release_memory() -> None:
    """Give the memory freed by a finished task back to the OS. A task keeps nothing (tracemalloc: ~1 MB of
    Python objects left after each), but pyarrow's pool (mimalloc) and glibc's arenas keep freed pages, and
    with them a worker's peak RSS crept up with every task it ran: with this, it is one task's peak."""
    pa.default_memory_pool().release_unused()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _take_rows(blocks: Iterator[ContextBlock], pending: list[ContextBlock], num_rows: int | None):
    """Blocks holding the next `num_rows` contexts (None: all), cutting a block where needed; the rest of a cut
    block is left in `pending` for the next call."""
    while num_rows is None or num_rows > 0:
        block = pending.pop() if pending else next(blocks, None)
        if block is None:
            return
        if num_rows is not None and len(block.tokens) > num_rows:
            pending.append(ContextBlock(*(a[num_rows:] for a in block)))
            block = ContextBlock(*(a[:num_rows] for a in block))
        if num_rows is not None:
            num_rows -= len(block.tokens)
        yield block


def _write_chunks(out_dir: Path, names: Iterator[str], blocks: Iterable[ContextBlock], per_shard: int | None,
                  token_dtype: np.dtype) -> tuple[list[dict], dict[int, list[str]]]:
    """Stream context blocks into shards of `per_shard` samples (None: all in one); no shard is written without
    a sample. Returns the shard entries and, per source, the shards holding its tokens."""
    shards: list[dict] = []
    where: dict[int, list[str]] = {}
    blocks, pending = iter(blocks), []
    while pending or (first := next(blocks, None)) is not None:
        if not pending:
            pending.append(first)
        name = next(names)
        index = int(Path(name).stem.removeprefix("shard-"))
        sources: list[np.ndarray] = []
        shards.append({"name": name, **write_shard_blocks(out_dir / name, index, _take_rows(blocks, pending, per_shard),
                                                         token_dtype, sources)})
        for source in np.unique(np.concatenate(sources)).tolist():
            where.setdefault(source, []).append(name)
    return shards, where


# ---- planning and running ----------------------------------------------------------------------------------


def estimate_articles_per_shard(index: CorpusIndex, tokenizer_path: str, packing: PackingConfig,
                                per_shard: int) -> int:
    """Articles that fill about `per_shard` samples, measured by packing the first articles of the corpus."""
    sp = load_tokenizer(tokenizer_path)
    texts: list[str] = []
    for batch in read_rows(index, 0, min(_ESTIMATE_ARTICLES, index.num_rows), ["source_id", "text"]):
        texts.extend(batch.column("text").to_pylist())
    articles = [(0, t) for t in _encode(sp, texts, 256)]
    num_samples = sum(len(b.tokens) for b in pack_blocks(articles, packing, BOS_ID, EOS_ID, PAD_ID, np.int32))
    return max(1, round(per_shard * len(articles) / max(num_samples, 1)))


def _plan(index, tokenizer_path, packing, cfg, holdout_ids, token_dtype) -> dict:
    per_shard = samples_per_shard(cfg, packing.context_length, token_dtype)
    aps = cfg.articles_per_shard or estimate_articles_per_shard(index, tokenizer_path, packing, per_shard)
    plan = {
        "schema_version": schema.SCHEMA_VERSION,
        "corpus": index.fingerprint(),
        "num_articles": index.num_rows,
        "tokenizer_sha256": file_sha256(tokenizer_path),
        "packing": asdict(packing),
        "token_dtype": token_dtype.name,
        "articles_per_shard": aps,
        "samples_per_holdout_shard": per_shard,
        "holdout_ids_sha256": hashlib.sha256(json.dumps(sorted(holdout_ids)).encode()).hexdigest(),
    }
    plan["hash"] = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()
    return plan


def _tasks(index, plan, out_dir, tokenizer_path, cfg, holdout_ids) -> list[dict]:
    common = {"files": list(index.files), "file_rows": [list(r) for r in index.file_rows],
              "tokenizer_path": str(tokenizer_path), "packing": plan["packing"], "token_dtype": plan["token_dtype"],
              "holdout_ids": sorted(holdout_ids), "out_dir": str(out_dir), "plan_hash": plan["hash"],
              "encode_batch": cfg.encode_batch, "samples_per_shard": plan["samples_per_holdout_shard"],
              "articles_per_shard": plan["articles_per_shard"]}
    aps, n = plan["articles_per_shard"], index.num_rows
    tasks = [{**common, "name": schema.shard_name(i).removesuffix(".tar"), "task_index": i, "is_holdout": False,
              "start": i * aps, "stop": min((i + 1) * aps, n)} for i in range((n + aps - 1) // aps)]
    if holdout_ids:
        tasks.append({**common, "name": HOLDOUT_TASK, "task_index": -1, "is_holdout": True, "start": 0, "stop": n})
    return tasks


def _read_marker(out_dir: Path, task: dict) -> dict | None:
    """The task's done marker when it is one of this plan's (None: the task runs)."""
    path = out_dir / WORK_DIR / f"{task['name']}.done.json"
    if not path.exists():
        return None
    try:
        marker = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.warning("shard task %s: done marker %s is not valid JSON (%s); running the task again",
                    task["name"], path, exc)
        return None
    if not isinstance(marker, dict) or marker.get("plan") != task["plan_hash"]:
        return None
    shards = marker.get("shards")
    if not isinstance(shards, list) or not all(isinstance(e, dict) and {"name", "sha256", "bytes"} <= set(e)
                                               for e in shards):
        log.warning("shard task %s: done marker %s lists no well-formed shards; running the task again",
                    task["name"], path)
        return None
    if "stats_sha256" not in marker:
        log.warning("shard task %s: done marker %s records no stats sha256 (an older version); running the task "
                    "again", task["name"], path)
        return None
    return marker


def _marker_files(out_dir: Path, task: dict, marker: dict) -> list[Recorded]:
    record = str(out_dir / WORK_DIR / f"{task['name']}.done.json")
    stats = out_dir / WORK_DIR / f"{task['name']}.stats.parquet"
    return [*(Recorded(task["name"], out_dir / s["name"], s["sha256"], s["bytes"], record) for s in marker["shards"]),
            Recorded(task["name"], stats, marker["stats_sha256"], None, record)]


def _done_markers(out_dir: Path, tasks: list[dict], num_threads: int = 1) -> tuple[dict[str, dict | None], list[str]]:
    """{task name: its done marker, or None when the task has to run}, and the warnings about tasks whose
    files no longer match their marker (those run again). Every file a marker names is checked against its
    recorded size and sha256 before the task is skipped."""
    markers = {t["name"]: _read_marker(out_dir, t) for t in tasks}
    files = [f for t in tasks if markers[t["name"]] is not None for f in _marker_files(out_dir, t, markers[t["name"]])]
    problems = verify_files(files, num_threads, desc="verify shards")
    repairs = []
    for name, problem in problems.items():
        repairs.append(f"shard task {name}: {problem}; writing its shards again")
        log.warning("%s", repairs[-1])
        markers[name] = None
    return markers, repairs


def _reset_outputs(out_dir: Path) -> None:
    """A different plan: the old shards, markers and stats describe other data."""
    log.warning("shard plan changed in %s: removing the previous shards", out_dir)
    for path in out_dir.glob("shard-*.tar"):
        path.unlink()
    shutil.rmtree(out_dir / HOLDOUT_DIR, ignore_errors=True)
    shutil.rmtree(out_dir / WORK_DIR, ignore_errors=True)


def _remove_temp_files(out_dir: Path) -> None:
    """What a killed run left half written (atomic writes' temporaries): nothing else writes here meanwhile."""
    for directory in (out_dir, out_dir / HOLDOUT_DIR, out_dir / WORK_DIR):
        for path in directory.glob(atomic.temp_glob()):
            path.unlink()


def _plan_changed(plan_path: Path, plan: dict) -> bool:
    if not plan_path.exists():
        return False
    try:
        return json.loads(plan_path.read_text()).get("hash") != plan["hash"]
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        log.warning("%s is not a shard plan; treating the previous shards as another plan's", plan_path)
        return True


def write_shards(ingest_dir: str | Path, out_dir: str | Path, tokenizer_path: str | Path, packing: PackingConfig,
                 cfg: ShardConfig, holdout_ids: Iterable[int], vocab_size: int) -> tuple[dict, list[dict], list[str]]:
    """Run (or resume) every shard task. Returns the plan, the done markers in task order, and what was repaired
    (one line per task rerun because a file no longer matched its marker)."""
    out_dir = Path(out_dir)
    (out_dir / WORK_DIR).mkdir(parents=True, exist_ok=True)
    holdout_ids = sorted({int(i) for i in holdout_ids})
    index = index_corpus(ingest_dir)
    plan = _plan(index, str(tokenizer_path), packing, cfg, holdout_ids, schema.token_dtype(vocab_size))
    plan_path = out_dir / WORK_DIR / PLAN_FILE
    if _plan_changed(plan_path, plan):
        _reset_outputs(out_dir)
        (out_dir / WORK_DIR).mkdir(parents=True)
    _remove_temp_files(out_dir)
    _write_json(plan_path, plan)

    tasks = _tasks(index, plan, out_dir, tokenizer_path, cfg, holdout_ids)
    markers, repairs = _done_markers(out_dir, tasks, cfg.num_workers)
    pending = [t for t in tasks if markers[t["name"]] is None]
    log.info("%d shard tasks, %d already done, %d to run on %d workers",
             len(tasks), len(tasks) - len(pending), len(pending), cfg.num_workers)
    progress = tqdm(total=len(pending), desc="shards", unit="task", disable=not pending)
    if cfg.num_workers == 1:
        for task in pending:
            markers[task["name"]] = _run_task(task)
            progress.update()
    else:
        # spawn, not fork: the parent holds pyarrow's thread pools, which fork can leave locked.
        # A worker is replaced after _TASKS_PER_WORKER tasks: whatever the allocators still hold (~2 MB per task
        # measured after malloc_trim) cannot add up over a long run.
        with mp.get_context("spawn").Pool(cfg.num_workers, maxtasksperchild=_TASKS_PER_WORKER) as pool:
            for marker in pool.imap_unordered(_run_task, pending):
                markers[marker["task"]] = marker
                progress.update()
    progress.close()
    return plan, [markers[t["name"]] for t in tasks], repairs
