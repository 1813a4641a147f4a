"""`nulls-unlearn purge` on runs trained with sharded sink tables (`sink_tables.mode=sharded`): whole `nulls-train`
runs (1 and 2 gloo ranks, DeepSpeed ZeRO-1, TorchRec row-wise tables of 2**12 rows, row-wise Adagrad), the real
manifest and mask forget set of two sources the first step trained, then every tag purged.

Checked independently of the code that wrote the files: DCP itself (`dcp.load`) reads each purged `sink_tables/`
back with the forgotten rows AND their Adagrad state zero and every other row and state bit-identical; the whole
`model.safetensors` loaded in the test shows the same rows zero and nothing else changed; DeepSpeed's own
zero_to_fp32 reader sees no sink table in the engine's files, which purge kept byte for byte; purge never loads
the weights whole (its whole-file loader is made to fail for the run). A purged tag resumes only excluding the
purged sources (2 -> 1 -> 2 ranks) and the tags it writes hold the purged rows and their state at zero, rows a
surviving source trained in those steps included. Failures: a crafted `.metadata` naming another global is
refused by name without running it, an unlisted file in `sink_tables/` is a problem, a restored Adagrad state
fails verify.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from purge_helpers import copy_run, deepspeed_consolidated, make_manifest, mask_forget, union_rows  # noqa: E402
from train_helpers import RUN_BASE, nulls_train, prepare_synthwiki, trained_sources  # noqa: E402

from nulls_dist.audit.purge import purge  # noqa: E402
from nulls_dist.audit.purge_verify import verify_purge  # noqa: E402
from nulls_dist.cli.unlearn import main as unlearn_main  # noqa: E402
from nulls_dist.formats import checkpoint as layout  # noqa: E402
from nulls_dist.formats.digests import file_sha256, json_sha256  # noqa: E402
from nulls_dist.formats.forget_set import load_forget_set  # noqa: E402
from nulls_dist.formats.weights import load_weights  # noqa: E402
from nulls_dist.train.checkpoint_rows import DeepSpeedRows  # noqa: E402

pytestmark = pytest.mark.distributed

ROWS, K, DIM, LAYERS = 2**12, 16, 64, 2
BASE = (*RUN_BASE, "deepspeed.micro_batch=2", "checkpoint.every_n_steps=1", "sink_tables.mode=sharded",
        "+model.overrides.sink_strategy=uniform", f"+model.overrides.sink_pool_size={ROWS}",
        f"+model.overrides.sink_k={K}")
TAG = "step_{:08d}".format


def train(data: Path, run: Path, ranks: int, steps: int, *extra: str, check: bool = True):
    return nulls_train(data, run, ranks, f"train.max_steps={steps}", *extra, check=check, base=BASE)


def dcp_tables(directory: Path) -> dict[str, torch.Tensor]:
    """Every table's rows and row-wise Adagrad state, read back by DCP itself (one process)."""
    import torch.distributed.checkpoint as dcp

    state = {}
    for layer in range(LAYERS):
        table = layout.sink_table_name("per_layer", layer)
        state[layout.SINK_TABLES_WEIGHT_KEY.format(table=table)] = torch.empty(ROWS, 3 * DIM)
        state[layout.SINK_TABLES_STATE_PREFIX.format(table=table) + f"{table}.momentum1"] = torch.empty(ROWS)
    dcp.load(state, checkpoint_id=str(directory), no_dist=True)
    return state


def layer_of(key: str) -> int:
    return int(key.split("layer_")[1].split(".")[0]) if "layer_" in key else int(key.split(".")[2])


def files(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): file_sha256(p) for p in sorted(directory.rglob("*")) if p.is_file()}


def moved(cert: dict, old: Path, new: Path) -> dict:
    """The certificate of run `old` as if it had been made for its copy `new` (resealed: only the paths differ)."""
    text = json.dumps({k: v for k, v in cert.items() if k not in ("certificate_sha256", "signature")})
    body = json.loads(text.replace(json.dumps(str(old.resolve()))[1:-1], json.dumps(str(new.resolve()))[1:-1]))
    return {**body, "certificate_sha256": json_sha256(body)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-rank run of 2 steps (a tag each), its manifest and a mask forget set of two sources step 1 trained."""
    root = tmp_path_factory.mktemp("purge_tables")
    data = prepare_synthwiki(root / "data")
    run = root / "run2"
    train(data, run, 2, 2)
    manifest = make_manifest(run, data / "registry.parquet", root / "manifest")
    ids = tuple(trained_sources(data, 1)[:2])
    forget = mask_forget(run, manifest, root, ids=ids)
    return {"root": root, "data": data, "run": run, "manifest": manifest, "forget": forget, "ids": ids,
            "union": union_rows(run, ids)}


@pytest.fixture(scope="module")
def purged(runs):
    """The 2-rank run with a hard-deployed copy beside it, purged once (the tests read it, never change it); the
    whole-file weights loader fails for the whole purge, so the weights can only have been streamed."""
    import nulls_dist.audit.purge as purge_module
    from nulls_dist.audit.unlearn import unlearn
    from nulls_dist.deploy.checkpoint_io import load_checkpoint

    root = runs["root"] / "p"
    run, pristine = copy_run(runs["run"], root / "run"), copy_run(runs["run"], root / "pristine")
    unlearn(load_checkpoint(run), runs["manifest"], [str(i) for i in runs["ids"]], "hard", root / "hard.json",
            root / "hard-cert.json", output_checkpoint=run / "deployed")  # with its own sink_tables/ (audit/hard.py)

    def refuse(path):
        raise AssertionError(f"purge loaded {path} whole")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(purge_module, "load_weights", refuse)
        cert = purge(run, [], runs["manifest"], runs["forget"], root / "purge.json", DeepSpeedRows())
    return {"root": root, "run": run, "pristine": pristine, "cert": cert}


# ------------------------------------------------------------------------------------------------ rewrite
def test_every_file_of_the_tables_is_certified_and_the_deepspeed_files_kept(runs, purged):
    run, pristine, cert = purged["run"], purged["pristine"], purged["cert"]
    by_path = {Path(a["path"]).name: a for a in cert["artifacts"]}
    assert set(by_path) == {TAG(1), TAG(2), "deployed"}
    assert by_path["deployed"]["action"] == "unchanged"  # hard zeroed its rows and their state already
    assert all(f["action"] == "kept" for f in by_path["deployed"]["files"] if f["file"].startswith("sink_tables/"))
    for step in (1, 2):
        entry, tag = by_path[TAG(step)], run / "checkpoints" / TAG(step)
        certified = {f["file"]: f for f in entry["files"]}
        assert files(tag) == {rel: f["new_sha256"] for rel, f in certified.items()}  # every file, the dot-file too
        tables = {rel: f for rel, f in certified.items() if rel.startswith("sink_tables/")}
        assert set(tables) == {"sink_tables/.metadata", "sink_tables/__0_0.distcp", "sink_tables/__1_0.distcp",
                               "sink_tables/sink_tables.json"}
        for name in ("__0_0.distcp", "__1_0.distcp"):  # both ranks' rows hold forgotten rows (uniform over 2**12)
            f = tables[f"sink_tables/{name}"]
            assert f["action"] == "rewritten" and f["old_sha256"] != f["new_sha256"] and f["zeroed"]["table_rows"] > 0
            assert all(k.startswith(("tables.embeddings.", "optimizer.state.embeddings.")) for k in f["tensors"])
        zeroed = entry["zeroed"]
        assert zeroed["table_rows"] == zeroed["module"] == int(runs["union"].sum()) * 3 * DIM  # every row non-zero
        assert zeroed["table_state"] > 0  # step 1 trained these sources: their rows had Adagrad state
        assert tables["sink_tables/.metadata"]["action"] == "kept"  # the index is valid as it was
        for rel, f in certified.items():
            if DeepSpeedRows().owns(rel):
                assert f["action"] == "kept" and f["new_sha256"] == file_sha256(pristine / "checkpoints" / TAG(step) / rel)
                assert "holds no sink rows" in f["reason"]
        assert certified["model.safetensors"]["action"] == "rewritten"
        assert layout.incomplete_reason(tag) is None  # sizes in both metas still right: it loads and resumes
    report = verify_purge(cert, load_forget_set(runs["forget"]), DeepSpeedRows(), runs["manifest"], purged["root"])
    assert report["ok"], [c for c in report["checks"] if not c["ok"]]


def test_the_rows_and_their_state_are_zero_and_nothing_else_changed(runs, purged):
    union = runs["union"]
    for step in (1, 2):
        tag, old_tag = purged["run"] / "checkpoints" / TAG(step), purged["pristine"] / "checkpoints" / TAG(step)
        old, new = dcp_tables(layout.sink_tables_dir(old_tag)), dcp_tables(layout.sink_tables_dir(tag))
        for key in old:
            forgotten = torch.from_numpy(union[layer_of(key)])
            assert torch.all(new[key][forgotten] == 0) and torch.equal(new[key][~forgotten], old[key][~forgotten]), key
            assert bool((old[key][forgotten] != 0).any()), key  # there was something to erase, state included
        before, after = load_weights(old_tag / layout.WEIGHTS_NAME), load_weights(tag / layout.WEIGHTS_NAME)
        for key in before:
            if ".sink_" in key:
                forgotten = torch.from_numpy(union[layer_of(key)])
                assert torch.all(after[key][forgotten] == 0) and torch.equal(after[key][~forgotten],
                                                                             before[key][~forgotten]), key
            else:
                assert torch.equal(after[key], before[key]), key
        # DeepSpeed's own reader of the kept engine files: every weight but the sink tables, as before the purge
        engine = deepspeed_consolidated(tag)
        assert engine and not [k for k in engine if ".sink_" in k]
        assert all(torch.equal(engine[k], before[k]) for k in engine if k in before)


# ------------------------------------------------------------------------------------------------ resume
def test_a_purged_sharded_tag_resumes_only_without_its_sources_and_the_rows_stay_zero(runs, purged, tmp_path):
    data, union, ids = runs["data"], runs["union"], runs["ids"]
    run = copy_run(purged["run"], tmp_path / "run")
    shutil.rmtree(run / "deployed")
    refused = train(data, run, 1, 3, check=False)
    assert refused.returncode == 2 and "purged of sources" in refused.stderr and "Traceback" not in refused.stderr
    exclude = f"train.exclude_sources=[{ids[0]},{ids[1]}]"
    train(data, run, 1, 3, exclude)  # 2 -> 1 ranks: the tables reshard
    train(data, run, 2, 4, exclude)  # 1 -> 2
    survivors = sorted(set(trained_sources(data, 4, first=2)) - set(ids))
    shared = union & union_rows(run, survivors)  # purged rows the resumed steps' survivors use
    assert shared.any(), "no survivor of steps 3-4 shares a purged row: pick a larger k"
    for step in (3, 4):
        tag = run / "checkpoints" / TAG(step)
        assert layout.read_meta(tag)["exclude_sources"] == sorted(ids)  # a later resume must exclude them too
        tables = dcp_tables(layout.sink_tables_dir(tag))
        weights = load_weights(tag / layout.WEIGHTS_NAME)
        for key, value in {**tables, **{k: v for k, v in weights.items() if ".sink_" in k}}.items():
            forgotten = torch.from_numpy(union[layer_of(key)])
            assert torch.all(value[forgotten] == 0), (step, key)
    kept = torch.from_numpy(~union[0])  # the other rows: the resumed steps trained some of them
    weight = layout.SINK_TABLES_WEIGHT_KEY.format(table="layer_0")
    before = dcp_tables(layout.sink_tables_dir(run / "checkpoints" / TAG(2)))[weight][kept]
    assert not torch.equal(tables[weight][kept], before)
    cert = moved(purged["cert"], purged["run"], run)
    cert["artifacts"] = [a for a in cert["artifacts"] if Path(a["path"]).name != "deployed"]
    report = verify_purge(cert, load_forget_set(runs["forget"]), DeepSpeedRows(), certificate_dir=purged["root"])
    rescan = next(c for c in report["checks"] if c["check"] == "uncertified_artifacts_rows_zero")
    assert rescan["ok"] and "written since the purge" in rescan["detail"], rescan


# ------------------------------------------------------------------------------------------------ one rank, CLI
@pytest.fixture(scope="module")
def one_rank(runs):
    root = runs["root"] / "one"
    run = root / "run"
    train(runs["data"], run, 1, 1)
    manifest = make_manifest(run, runs["data"] / "registry.parquet", root / "manifest")
    return {"root": root, "run": run, "manifest": manifest, "forget": mask_forget(run, manifest, root, ids=runs["ids"])}


def _cli(capsys, *argv) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        unlearn_main(list(argv))
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def _argv(info: dict, run: Path, cert: Path, *extra: str) -> list[str]:
    return ["purge", "--run", str(run), "--manifest", str(info["manifest"]), "--forget-set", str(info["forget"]),
            "--certificate", str(cert), *extra]


def test_a_one_rank_run_is_purged_and_verified_through_the_cli(one_rank, tmp_path, capsys):
    run = copy_run(one_rank["run"], tmp_path / "run")
    unlearn_main(_argv(one_rank, run, tmp_path / "purge.json"))
    capsys.readouterr()
    cert = json.loads((tmp_path / "purge.json").read_text())
    tables = {f["file"]: f for f in cert["artifacts"][0]["files"] if f["file"].startswith("sink_tables/")}
    assert set(tables) == {"sink_tables/.metadata", "sink_tables/__0_0.distcp", "sink_tables/sink_tables.json"}
    assert set(tables["sink_tables/__0_0.distcp"]["zeroed"]) == {"table_rows", "table_state"}
    code, out, _ = _cli(capsys, "verify", "--certificate", str(tmp_path / "purge.json"), "--forget-set",
                        str(one_rank["forget"]))
    assert code == 0 and json.loads(out)["ok"]


def test_a_crafted_dcp_index_is_refused_by_name_without_running_it(one_rank, tmp_path, capsys):
    run = copy_run(one_rank["run"], tmp_path / "run")
    tables = layout.sink_tables_dir(run / "checkpoints" / TAG(1))
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    (tables / ".metadata").write_bytes(pickle.dumps({"storage_data": Payload()}))
    meta = layout.read_json(tables / layout.SINK_TABLES_META_NAME)
    layout.write_sink_tables_meta(tables, {k: v for k, v in meta.items() if k not in ("format", "files")})
    before = files(run)
    code, out, err = _cli(capsys, *_argv(one_rank, run, tmp_path / "c.json"))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert str((tables / ".metadata").resolve()) in err and "never holds" in err, err
    assert not marker.exists() and files(run) == before and not (tmp_path / "c.json").exists()


def test_an_unlisted_file_in_the_tables_is_a_problem_removed_only_on_request(one_rank, tmp_path, capsys):
    run = copy_run(one_rank["run"], tmp_path / "run")
    stray = layout.sink_tables_dir(run / "checkpoints" / TAG(1)) / "__7_0.distcp"
    stray.write_bytes(b"rows of a rank nobody listed")
    code, _, err = _cli(capsys, *_argv(one_rank, run, tmp_path / "c1.json"))
    assert code == 2 and "__7_0.distcp" in err and "does not list" in err
    unlearn_main(_argv(one_rank, run, tmp_path / "c2.json", "--remove-unrewritable"))
    capsys.readouterr()
    entry = json.loads((tmp_path / "c2.json").read_text())["artifacts"][0]
    assert entry["action"] == "rewritten" and not stray.exists()
    assert any(f["file"] == "sink_tables/__7_0.distcp" and f["action"] == "removed" for f in entry["files"])


def test_verify_catches_a_restored_table_state(runs, purged, tmp_path, capsys):
    from nulls_dist.deploy.sink_tables_dcp import read_dcp_metadata

    run = copy_run(purged["run"], tmp_path / "run")
    cert = moved(purged["cert"], purged["run"], run)

    tables = layout.sink_tables_dir(run / "checkpoints" / TAG(2))
    row = int(np.nonzero(runs["union"][0])[0][0])
    chunk = next(c for c in read_dcp_metadata(tables) if c.key.endswith("layer_0.momentum1") and
                 c.first_row <= row < c.first_row + ROWS // 2)
    with open(tables / chunk.file, "r+b") as f:  # the state of one forgotten row put back, in place
        f.seek(chunk.offset)
        state = torch.load(io.BytesIO(f.read(chunk.length)), weights_only=True)
        state[row - chunk.first_row] = 0.5
        buffer = io.BytesIO()
        torch.save(state, buffer)
        assert buffer.tell() == chunk.length
        f.seek(chunk.offset)
        f.write(buffer.getvalue())
    report = verify_purge(cert, load_forget_set(runs["forget"]), DeepSpeedRows(), certificate_dir=purged["root"])
    failed = {c["check"]: c["detail"] for c in report["checks"] if not c["ok"]}
    name = f"artifact {(run / 'checkpoints' / TAG(2)).resolve()}"
    assert set(failed) == {f"{name}: sha256", f"{name}: forgotten rows zero"}, failed
    assert chunk.file in failed[f"{name}: sha256"] and "layer_0.momentum1" in failed[f"{name}: forgotten rows zero"]
