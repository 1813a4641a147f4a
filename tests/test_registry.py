"""Source registry: atomic writer, title<->id lookup in bounded memory, resolve, holdout/exclude selection."""
from nulls_dist.formats.digests import file_sha256
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nulls_dist.data_pipeline import registry as registry_mod
from nulls_dist.data_pipeline.ingest import IngestConfig, run_ingest
from nulls_dist.data_pipeline.registry import REGISTRY_COLUMNS, REGISTRY_SCHEMA, SourceRegistry, write_registry
from nulls_dist.data_pipeline.selection import resolve_exclude_sources, select_holdouts, source_keys


def _batch(ids, titles) -> pa.RecordBatch:
    n = len(ids)
    return pa.record_batch([pa.array(ids, pa.int64()), pa.array(titles), pa.array(range(n), pa.int64()),
                            pa.array([f"u/{t}" for t in titles]), pa.array([10] * n, pa.int64()),
                            pa.array([3] * n, pa.int64()), pa.array(["0"] * n), pa.array(["train"] * n)],
                           schema=REGISTRY_SCHEMA)


def _titles(n):
    return [f"Article {i}" for i in range(n - 1)] + ["1984"]


@pytest.fixture
def reg_path(tmp_path):
    path = tmp_path / "registry.parquet"
    titles = _titles(50)
    ids = list(range(1000, 1050))
    write_registry(path, [_batch(ids[:20], titles[:20]), _batch(ids[20:], titles[20:])], row_group_size=8)
    return path


def test_lookup_both_ways_and_row(reg_path):
    reg = SourceRegistry.open(reg_path)
    assert len(reg) == 50 and list(REGISTRY_COLUMNS) == pq.read_schema(reg_path).names
    for i in (0, 7, 8, 33, 48):
        assert reg.id_for_title(f"Article {i}") == 1000 + i
        assert reg.title_for_id(1000 + i) == f"Article {i}"
    assert reg.row(1005) == {"source_id": 1005, "title": "Article 5", "page_id": 5, "url": "u/Article 5",
                             "chars": 10, "tokens": 3, "shards": "0", "split": "train"}
    with pytest.raises(ValueError, match="'Nope'"):
        reg.id_for_title("Nope")
    with pytest.raises(ValueError, match="999"):
        reg.title_for_id(999)


def test_resolve_ids_titles_files_and_all_unknowns(reg_path, tmp_path):
    reg = SourceRegistry.open(reg_path)
    listing = tmp_path / "forget.txt"
    listing.write_text("# forget set\nArticle 3\n1004\n\ntitle:1984\nid:1005\n")
    assert reg.resolve([1001, "Article 2", "1002", f"@{listing}"]) == [1001, 1002, 1003, 1004, 1049, 1005]
    assert reg.resolve(str(listing)) == [1003, 1004, 1049, 1005]
    bad = tmp_path / "bad.txt"
    bad.write_text("Article 1\nGhost\n77\n")
    with pytest.raises(ValueError) as err:
        reg.resolve([5, "Article 9", "Missing page", f"file:{bad}", "1984"])
    message = str(err.value)
    assert message.startswith("5 unknown source(s)")
    for part in ("id 5", "'Missing page'", "'Ghost'", "id 77", f"{bad}:3", "id 1984"):
        assert part in message, part


def test_memory_is_a_few_arrays_and_titles_stay_on_disk(reg_path):
    reg = SourceRegistry.open(reg_path)
    assert reg.nbytes == 50 * (8 + 8 + 4)  # ids int64, hashes uint64, order uint32
    for i in range(50):
        reg.title_for_id(1000 + i)
    assert len(reg._cache) <= registry_mod._CACHED_GROUPS
    assert reg._hashes.dtype == np.uint64 and reg._order.dtype == np.uint32


def test_hash_collisions_are_resolved_by_the_stored_title(reg_path, monkeypatch):
    # every title hashes alike: lookups must still be exact, by checking the stored titles
    monkeypatch.setattr(registry_mod, "title_hash", lambda t: 7)
    monkeypatch.setattr(registry_mod, "title_hashes",
                        lambda ts, count=-1: np.full(len(list(ts)) if count < 0 else count, 7, np.uint64))
    reg = SourceRegistry.open(reg_path)
    assert reg.id_for_title("Article 41") == 1041
    assert reg.find_ids(["Article 2", "x", "1984"]) == [1002, None, 1049]


def test_sparse_ids_and_ingest_articles_dir(tmp_path, repo_root):
    path = tmp_path / "r.parquet"
    write_registry(path, [_batch([3, 10, 11, 500], ["a", "b", "c", "d"])])
    reg = SourceRegistry.open(path)
    assert reg.resolve([500, "b"]) == [500, 10]
    with pytest.raises(ValueError, match="id 4"):
        reg.resolve([4])
    out = tmp_path / "ingest"
    run_ingest(IngestConfig(inputs=[str(repo_root / "data_pipeline/bundled/synthwiki")], output_dir=str(out)))
    articles = SourceRegistry.open(out / "articles")
    first = pq.read_table(out / "articles" / "part-00000.parquet", columns=["title"]).column(0)[5].as_py()
    assert articles.id_for_title(first) == 49152 + 5 and len(articles) == 240


def test_write_is_atomic_and_validated(tmp_path, reg_path):
    before = reg_path.read_bytes()
    with pytest.raises(ValueError, match="strictly increasing"):
        write_registry(reg_path, [_batch([1, 2], ["a", "b"]), _batch([2, 3], ["c", "d"])])
    assert reg_path.read_bytes() == before  # the old registry is untouched
    assert [p.name for p in tmp_path.iterdir()] == [reg_path.name]  # no temporary left behind
    with pytest.raises(ValueError, match="tokens"):
        write_registry(tmp_path / "x.parquet", [pa.table({"source_id": [1], "title": ["a"]})])
    info = write_registry(tmp_path / "ok.parquet", [_batch([1], ["a"])])
    assert info["rows"] == 1 and info["sha256"] == file_sha256(tmp_path / "ok.parquet")


def test_holdouts_deterministic_and_stable(reg_path):
    reg = SourceRegistry.open(reg_path)
    a = select_holdouts(reg, fraction=0.3, seed=1)
    assert a == select_holdouts(reg, fraction=0.3, seed=1) and a != select_holdouts(reg, fraction=0.3, seed=2)
    assert 5 <= len(a) <= 25
    keys = source_keys(np.arange(1000, 1050), 1)
    assert a == frozenset(int(i) for i in np.arange(1000, 1050)[keys < 0.3])  # per-source, order-free
    assert source_keys(np.array([1010]), 1)[0] == keys[10]
    counted = select_holdouts(reg, sources=["Article 0", 1049], count=5, seed=0)
    ids = np.arange(1000, 1050)
    lowest = ids[np.argsort(source_keys(ids, 0), kind="stable")[:5]]
    assert counted == {1000, 1049} | {int(i) for i in lowest}
    assert select_holdouts(reg) == frozenset()
    with pytest.raises(ValueError, match="not both"):
        select_holdouts(reg, fraction=0.1, count=2)
    with pytest.raises(ValueError, match="count"):
        select_holdouts(reg, count=51)
    with pytest.raises(ValueError, match="Ghost"):
        select_holdouts(reg, sources=["Ghost"])


def test_resolve_exclude_sources(reg_path, tmp_path):
    reg = SourceRegistry.open(reg_path)
    assert resolve_exclude_sources(None, reg) == frozenset()
    listing = tmp_path / "exclude.txt"
    listing.write_text("Article 4\n1006\n")
    assert resolve_exclude_sources(str(listing), reg) == {1004, 1006}
    assert resolve_exclude_sources([1001, "Article 1"], reg) == {1001}
    with pytest.raises(ValueError, match="'Ghost'.*id 12"):
        resolve_exclude_sources(["Ghost", 12], reg)


def test_index_cache_is_reused_and_refreshed(reg_path, tmp_path):
    cache = tmp_path / "index.npz"
    built = SourceRegistry.open(reg_path, index_cache=cache)
    assert cache.is_file()
    stamp = cache.stat().st_mtime_ns
    cached = SourceRegistry.open(reg_path, index_cache=cache)
    assert cache.stat().st_mtime_ns == stamp
    assert cached.id_for_title("Article 17") == built.id_for_title("Article 17") == 1017
    write_registry(reg_path, [_batch([5, 6], ["New", "Other"])])  # the registry changes: index rebuilt
    fresh = SourceRegistry.open(reg_path, index_cache=cache)
    assert len(fresh) == 2 and fresh.id_for_title("Other") == 6
