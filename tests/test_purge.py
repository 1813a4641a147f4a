"""`nulls-unlearn purge` on real runs: `nulls-train` on 2 gloo ranks at ZeRO-1 and ZeRO-3, the real manifest and
mask forget set, then every artifact of the run rewritten so the forgotten rows are zero.

Checked independently of the code that wrote the files: DeepSpeed's own zero_to_fp32 consolidation (fp32
masters) and ds_to_universal conversion (masters and both Adam moments, per parameter) of each purged tag show
the forgotten rows zero and every other element unchanged; a purged checkpoint resumes (2 ranks) only when the
run excludes the purged sources, and the checkpoints it then writes still hold the rows as zeros in every file;
survivors sharing forgotten rows keep their Sink-Off outputs bit for bit (the mask semantics). Failure paths: what
purge cannot rewrite is refused by name (nothing written) and removed only on request; a crafted pickle is refused
without running it; verify catches a restored row; an interrupted swap is finished by the next purge.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from purge_helpers import (FORGET, copy_run, deepspeed_consolidated, deepspeed_universal,  # noqa: E402
                           make_manifest, mask_forget, sink_keys, train_run, union_rows)
from train_helpers import nulls_train, prepare_synthwiki  # noqa: E402

from nulls_dist.audit.purge import purge  # noqa: E402
from nulls_dist.audit.purge_verify import verify_purge  # noqa: E402
from nulls_dist.cli.unlearn import main as unlearn_main  # noqa: E402
from nulls_dist.deploy.checkpoint_io import load_checkpoint  # noqa: E402
from nulls_dist.formats.digests import file_sha256, json_sha256  # noqa: E402
from nulls_dist.formats.forget_set import load_forget_set  # noqa: E402
from nulls_dist.formats.weights import load_weights, save_weights  # noqa: E402
from nulls_dist.train.checkpoint import weights_only_loads  # noqa: E402
from nulls_dist.train.checkpoint_rows import DeepSpeedRows  # noqa: E402

TAG = "step_{:08d}".format


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("purge")
    data = prepare_synthwiki(root / "data")
    out = {"root": root, "data": data}
    for stage, steps in ((1, 3), (3, 2)):
        run = train_run(data, root / f"zero{stage}", stage, steps)
        manifest = make_manifest(run, data / "registry.parquet", root / f"manifest{stage}")
        out[stage] = {"run": run, "manifest": manifest, "forget": mask_forget(run, manifest, root, name=f"f{stage}"),
                      "steps": steps}
    out["union"] = union_rows(out[1]["run"])
    return out


def _purge(run: Path, info: dict, cert: Path, *paths, **kwargs) -> dict:
    return purge(run, list(paths), info["manifest"], info["forget"], cert, DeepSpeedRows(), **kwargs)


def _assert_rows(tensor: torch.Tensor, union: np.ndarray, layer: int, zero: bool) -> None:
    rows = torch.from_numpy(np.nonzero(union[layer])[0])
    picked = tensor.reshape(tensor.shape[0], -1)[rows]
    assert bool((picked == 0).all()) == zero, (layer, int(torch.count_nonzero(picked)))


def _state(path: Path):
    with weights_only_loads():
        return torch.load(path, map_location="cpu", weights_only=True)


def _files(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): file_sha256(p) for p in sorted(directory.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------ ZeRO-1
@pytest.fixture(scope="module")
def purged1(runs):
    """Run ZeRO-1 with every kind of artifact beside it, purged once (tests below read it, never change it)."""
    from nulls_dist.audit.unlearn import unlearn
    from nulls_dist.litgpt_io import save_litgpt_checkpoint
    from nulls_dist.deploy.checkpoint_io import build_model
    from nulls_dist.train.checkpoint import convert_to_universal

    root, info = runs["root"] / "p1", runs[1]
    run = copy_run(info["run"], root / "run")
    pristine = copy_run(info["run"], root / "pristine")
    last = run / "checkpoints" / TAG(info["steps"])
    convert_to_universal(last, run / "checkpoints" / ".universal" / last.name)  # as a crashed resume leaves it
    ckpt = load_checkpoint(run)
    unlearn(ckpt, info["manifest"], [str(i) for i in FORGET], "hard", root / "hard-forget.json",
            root / "hard-cert.json", output_checkpoint=root / "deployed")
    save_litgpt_checkpoint(build_model(ckpt), root / "export_lit")
    save_weights(run / "sink_tables.safetensors", {k: ckpt.state_dict[k] for _, k in sink_keys(2)})
    cert = _purge(run, info, root / "purge-cert.json", root / "deployed", root / "export_lit")
    return {"root": root, "run": run, "pristine": pristine, "cert": cert, "last": last, "ckpt": ckpt}


def test_purge_certifies_every_artifact_of_the_run(runs, purged1):
    cert, run, root = purged1["cert"], purged1["run"], purged1["root"]
    by_path = {a["path"]: a for a in cert["artifacts"]}
    tags = [str((run / "checkpoints" / TAG(s)).resolve()) for s in (1, 2, 3)]
    assert {by_path[t]["kind"] for t in tags} == {"training_tag"}
    assert by_path[str((run / "checkpoints" / ".universal" / TAG(3)).resolve())]["kind"] == "universal_tag"
    assert by_path[str((root / "deployed").resolve())]["action"] == "unchanged"  # hard zeroed the rows already
    exports = {Path(p).name for p, a in by_path.items() if a["kind"] == "export"}
    assert exports == {"sink_tables.safetensors", "lit_model.pth"}
    for tag in tags:
        entry = by_path[tag]
        files = {f["file"]: f for f in entry["files"]}
        # every DeepSpeed file and our weights were rewritten, the JSON states kept byte for byte
        for name in ("model.safetensors", "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                     "zero_pp_rank_1_mp_rank_00_optim_states.pt"):
            assert files[name]["action"] == "rewritten" and files[name]["old_sha256"] != files[name]["new_sha256"]
        assert files["loader_state.json"]["action"] == "kept"
        assert set(entry["zeroed"]) == {"module", "master", "exp_avg", "exp_avg_sq"}
        on_disk = _files(Path(tag))
        assert on_disk == {f: e["new_sha256"] for f, e in files.items()}
    meta = json.loads((run / "checkpoints" / TAG(3) / "nulls_meta.json").read_text())
    assert meta["purge"]["source_ids"] == sorted(FORGET)
    report = verify_purge(cert, load_forget_set(runs[1]["forget"]), DeepSpeedRows(), runs[1]["manifest"],
                          root)
    assert report["ok"], [c for c in report["checks"] if not c["ok"]]
    # the purged checkpoint is still the one its forget set and manifest were made for
    from nulls_dist.deploy.forget import base_checkpoint_sha256

    assert base_checkpoint_sha256(load_checkpoint(run)) == load_forget_set(runs[1]["forget"])["checkpoint_sha256"]


def test_deepspeeds_own_readers_see_the_rows_zero_and_nothing_else_changed(runs, purged1):
    union, run, pristine = runs["union"], purged1["run"], purged1["pristine"]
    for step in (1, 3):
        before = deepspeed_consolidated(pristine / "checkpoints" / TAG(step))
        after = deepspeed_consolidated(run / "checkpoints" / TAG(step))
        ours = load_weights(run / "checkpoints" / TAG(step) / "model.safetensors")
        module = _state(run / "checkpoints" / TAG(step) / "mp_rank_00_model_states.pt")["module"]
        for key in before:
            if ".sink_" not in key:
                assert torch.equal(before[key], after[key]), key
        for layer, key in sink_keys(2):
            keep = torch.from_numpy(~union[layer])
            assert torch.equal(after[key][keep], before[key][keep])
            _assert_rows(before[key], union, layer, zero=False)
            for tensor in (after[key], ours[key], module[key]):
                _assert_rows(tensor, union, layer, zero=True)
    # masters AND Adam moments, per parameter, as DeepSpeed's universal conversion reassembles them
    tmp = purged1["root"] / "universal_check"
    before = deepspeed_universal(pristine / "checkpoints" / TAG(3), tmp / "before")
    after = deepspeed_universal(run / "checkpoints" / TAG(3), tmp / "after")
    for (param, state), value in before.items():
        if ".sink_" not in param:
            assert torch.equal(value, after[(param, state)]), (param, state)
            continue
        layer = int(param.split(".")[2])
        keep = torch.from_numpy(~union[layer])
        assert torch.equal(after[(param, state)][keep], value[keep]), (param, state)
        _assert_rows(after[(param, state)], union, layer, zero=True)
    assert any(bool((before[(f"transformer.h.0.mlp.sink_{p}", "exp_avg")][torch.from_numpy(union[0])] != 0).any())
               for p in ("gate", "up", "down"))  # the moments were really there before
    # the universal checkpoint a crash left, and the exports: rows zero too
    leftover = run / "checkpoints" / ".universal" / TAG(3) / "zero"
    lit = torch.load(purged1["root"] / "export_lit" / "lit_model.pth", weights_only=True)
    nb = purged1["ckpt"].model_config.n_backbone
    for layer, key in sink_keys(2):
        for state in ("fp32", "exp_avg", "exp_avg_sq"):
            _assert_rows(_state(leftover / key / f"{state}.pt")["param"].detach(), union, layer, zero=True)
        units = torch.from_numpy(nb + np.nonzero(union[layer])[0])
        for part in ("fc_1", "fc_2"):
            assert (lit[f"transformer.h.{layer}.mlp.{part}.weight"][units] == 0).all()
        assert (lit[f"transformer.h.{layer}.mlp.proj.weight"][:, units] == 0).all()
        assert (lit[f"transformer.h.{layer}.mlp.fc_1.weight"][:nb] != 0).any()  # the backbone is untouched
        _assert_rows(load_weights(run / "sink_tables.safetensors")[key], union, layer, zero=True)


def test_survivors_sharing_forgotten_rows_keep_their_sink_off_outputs(runs, purged1):
    """Purge zeroes the union, shared rows included: exactly the rows Sink-Off never activates for a survivor."""
    from nulls_dist.deploy.checkpoint_io import build_model
    from nulls_dist.model import SinkMode
    from nulls_dist.sinks import SinkAssignment

    before, after = build_model(purged1["ckpt"]), build_model(load_checkpoint(purged1["run"]))
    cfg = purged1["ckpt"].model_config
    assignment = SinkAssignment(cfg.sink_assignment_config())
    union = runs["union"]
    survivors = [s for s in range(49153, 49240) if s not in FORGET]
    rows = {s: assignment.rows(torch.tensor([s]), 0)[0] for s in survivors}  # the same mask in every layer
    shares = {s: int(union[0][r[r >= 0].numpy()].sum()) for s, r in rows.items()}
    collateral = [s for s, n in shares.items() if n > 0][:3]
    apart = [s for s, n in shares.items() if n == 0][:1]
    assert collateral, "the forget set shares no sink with any survivor: pick other sources"
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for s in collateral:
            off = SinkMode.sink_off(s, list(FORGET))
            assert torch.equal(before(tokens, None, mode=off), after(tokens, None, mode=off)), s
            assert not torch.equal(before(tokens, None, mode=SinkMode.sink_on(s)),
                                   after(tokens, None, mode=SinkMode.sink_on(s))), s  # the collateral
        for s in apart:
            assert torch.equal(before(tokens, None, mode=SinkMode.sink_on(s)),
                               after(tokens, None, mode=SinkMode.sink_on(s)))
    assert purged1["cert"]["collateral"]["num_sources"] >= len(collateral)


# ------------------------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("stage", [1, 3])
def test_a_purged_checkpoint_resumes_only_without_its_sources(runs, tmp_path, stage):
    info, union = runs[stage], runs["union"]
    run = copy_run(info["run"], tmp_path / "run")
    pristine = info["run"] / "checkpoints" / TAG(info["steps"])
    cert = _purge(run, info, tmp_path / "purge.json")
    last = run / "checkpoints" / TAG(info["steps"])
    if stage == 3:  # ZeRO-3 partitions every parameter over the ranks: DeepSpeed's own reader agrees
        before, after = deepspeed_consolidated(pristine), deepspeed_consolidated(last)
        for layer, key in sink_keys(2):
            _assert_rows(after[key], union, layer, zero=True)
            keep = torch.from_numpy(~union[layer])
            assert torch.equal(after[key][keep], before[key][keep])
    steps = info["steps"] + 2
    common = (f"deepspeed.zero_stage={stage}", f"train.max_steps={steps}", "checkpoint.every_n_steps=1",
              "deepspeed.micro_batch=2")
    if stage == 1:  # one process: its own exit code (test_the_resume_guard_names_what_to_exclude: the rule)
        refused = nulls_train(runs["data"], run, 1, *common, check=False)
        assert refused.returncode == 2 and "exclude_sources" in refused.stderr and "purged of sources" in refused.stderr
        assert (run / "checkpoints" / "latest").read_text().strip() == last.name  # nothing was written
    nulls_train(runs["data"], run, 2, *common, f"train.exclude_sources=[{FORGET[0]},{FORGET[1]}]")
    losses = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in losses][-2:] == [steps - 1, steps] and all(np.isfinite(m["train/loss"]) for m in losses)
    new = run / "checkpoints" / TAG(steps)
    cfg = load_checkpoint(new).model_config
    files = sorted(p.name for p in new.iterdir() if DeepSpeedRows().owns(p.name))
    rows = {key: np.nonzero(union[layer])[0] for layer, key in sink_keys(2)}
    # a zeroed row is a fixed point of training (all three factors zero: zero gradient, zero moments)
    assert DeepSpeedRows().nonzero(new, files, rows, cfg) == {}
    ours = load_weights(new / "model.safetensors")
    consolidated = deepspeed_consolidated(new)
    for layer, key in sink_keys(2):
        for tensor in (ours[key], consolidated[key]):
            _assert_rows(tensor, union, layer, zero=True)
    report = verify_purge(cert, load_forget_set(info["forget"]), DeepSpeedRows(), certificate_dir=tmp_path)
    assert report["ok"], [c for c in report["checks"] if not c["ok"]]
    assert "written since the purge" in next(c["detail"] for c in report["checks"]
                                             if c["check"] == "uncertified_artifacts_rows_zero")


def test_the_resume_guard_names_what_to_exclude():
    from nulls_dist.train.checkpoint import check_compatible

    saved = {"exclude_sources": [7], "purge": {"source_ids": [3, 5]}}
    check_compatible(saved, {"exclude_sources": [3, 5, 7]}, Path("tag"))
    for wrong in ([7], [3, 5], [3, 5, 7, 9]):
        with pytest.raises(RuntimeError, match=r"train.exclude_sources=\[3, 5, 7\]"):
            check_compatible(saved, {"exclude_sources": wrong}, Path("tag"))
    check_compatible({"exclude_sources": [7]}, {"exclude_sources": [7]}, Path("tag"))  # unpurged: as before


# ------------------------------------------------------------------------------------------------ failures
def _cli(capsys, *argv) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        unlearn_main(list(argv))
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def _purge_argv(run: Path, info: dict, cert: Path, *extra) -> list[str]:
    return ["purge", "--run", str(run), "--manifest", str(info["manifest"]), "--forget-set", str(info["forget"]),
            "--certificate", str(cert), *extra]


def test_what_purge_cannot_rewrite_is_refused_by_name_then_removed_on_request(runs, tmp_path, capsys):
    info = runs[1]
    run = copy_run(info["run"], tmp_path / "run")
    (run / "checkpoints" / TAG(1) / "notes.pt").write_bytes(b"anything")
    tables = run / "checkpoints" / TAG(1) / "sink_tables"  # TorchRec tables in a tag of a dense run
    tables.mkdir()
    (tables / "__0_0.distcp").write_bytes(b"rows")
    (run / "checkpoints" / TAG(3) / "model.safetensors").unlink()  # a tag purge cannot rewrite at all
    (run / "checkpoints" / "stray.bin").write_bytes(b"weights?")
    before = _files(run)
    code, out, err = _cli(capsys, *_purge_argv(run, info, tmp_path / "c1.json"))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    for name in ("notes.pt", "sink_tables/__0_0.distcp", "records no sharded sink tables", "no model.safetensors",
                 "stray.bin", "--remove-unrewritable"):
        assert name in err, (name, err)
    assert _files(run) == before and not (tmp_path / "c1.json").exists()  # nothing was written

    unlearn_main(_purge_argv(run, info, tmp_path / "c2.json", "--remove-unrewritable"))
    assert json.loads(capsys.readouterr().out)["certificate"] == str(tmp_path / "c2.json")
    cert = json.loads((tmp_path / "c2.json").read_text())
    entries = {Path(a["path"]).name: a for a in cert["artifacts"]}
    assert entries[TAG(3)]["action"] == "removed" and "model.safetensors" in entries[TAG(3)]["reason"]
    assert not (run / "checkpoints" / TAG(3)).exists() and not (run / "checkpoints" / TAG(1) / "notes.pt").exists()
    assert not tables.exists() and entries[TAG(1)]["action"] == "rewritten"
    removed = {f["file"] for f in entries[TAG(1)]["files"] if f["action"] == "removed"}
    assert removed == {"notes.pt", "sink_tables/__0_0.distcp"}
    assert [r["path"] for r in cert["removed_strays"]] == [str((run / "checkpoints" / "stray.bin").resolve())]
    assert (run / "checkpoints" / "latest").read_text().strip() == TAG(2)  # repointed past the removed tag
    assert cert["latest"][0]["before"] == TAG(3) and cert["latest"][0]["after"] == TAG(2)
    code, out, _ = _cli(capsys, "verify", "--certificate", str(tmp_path / "c2.json"), "--forget-set", str(info["forget"]))
    assert code == 0 and json.loads(out)["ok"]


def test_bad_inputs_are_one_line_errors_naming_the_file(runs, tmp_path, capsys):
    info = runs[1]
    run = copy_run(info["run"], tmp_path / "run")
    # a forget set of the other run's checkpoint
    argv = _purge_argv(run, {**info, "forget": runs[3]["forget"]}, tmp_path / "c.json")
    code, _, err = _cli(capsys, *argv)
    assert code == 2 and str(runs[3]["forget"]) in err and "belongs to checkpoint" in err
    # an existing certificate is never overwritten
    (tmp_path / "taken.json").write_text("{}")
    code, _, err = _cli(capsys, *_purge_argv(run, info, tmp_path / "taken.json"))
    assert code == 2 and "taken.json exists" in err
    # a crafted pickle named like a DeepSpeed file: refused without running it, nothing written
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    victim = run / "checkpoints" / TAG(2) / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": Payload()}, victim)
    before = _files(run)
    code, _, err = _cli(capsys, *_purge_argv(run, info, tmp_path / "c3.json"))
    assert code == 2 and str(victim) in err and "refused without running it" in err and not marker.exists()
    assert _files(run) == before
    # verify needs --checkpoint for an unlearning certificate, refuses it for a purge certificate
    code, _, err = _cli(capsys, "verify", "--certificate", str(runs["root"] / "f1-mask-cert.json"),
                        "--forget-set", str(info["forget"]))
    assert code == 2 and "--checkpoint is required" in err


def test_verify_catches_a_restored_row(runs, tmp_path, capsys):
    info, union = runs[1], runs["union"]
    run = copy_run(info["run"], tmp_path / "run")
    _purge(run, info, tmp_path / "purge.json")
    victim = run / "checkpoints" / TAG(2) / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    state = _state(victim)
    flat = state["optimizer_state_dict"]["base_optimizer_state"]["state"][1]["exp_avg"]
    row = int(np.nonzero(union[0])[0][0])
    # the first sink table of group 1 starts after norm_1 and norm_2 (2 x 64 elements) on rank 0
    flat[128 + row * 64: 128 + (row + 1) * 64] = 1.0
    torch.save(state, victim)
    code, out, _ = _cli(capsys, "verify", "--certificate", str(tmp_path / "purge.json"), "--forget-set",
                        str(info["forget"]))
    failed = {c["check"]: c["detail"] for c in json.loads(out)["checks"] if not c["ok"]}
    tag = str((run / "checkpoints" / TAG(2)).resolve())
    assert code == 1 and set(failed) == {f"artifact {tag}: sha256", f"artifact {tag}: forgotten rows zero"}
    assert victim.name in failed[f"artifact {tag}: sha256"]
    assert "exp_avg/transformer.h.0.mlp.sink_gate" in failed[f"artifact {tag}: forgotten rows zero"]


def test_remove_mode_deletes_every_artifact(runs, tmp_path):
    info = runs[1]
    run = copy_run(info["run"], tmp_path / "run")
    key = b"a signing key of 32 random bytes"
    cert = _purge(run, info, tmp_path / "purge.json", remove=True, signing_key=key)
    assert {a["action"] for a in cert["artifacts"]} == {"removed"} and len(cert["artifacts"]) == 3
    assert not any((run / "checkpoints").glob("step_*")) and not (run / "checkpoints" / "latest").exists()
    assert all(f["old_sha256"] and f["new_sha256"] is None for a in cert["artifacts"] for f in a["files"])
    forget = load_forget_set(info["forget"])
    report = verify_purge(cert, forget, DeepSpeedRows(), certificate_dir=tmp_path, signing_key=key)
    assert report["ok"] and "checked with the key" in report["assurance"]
    forged = {**cert, "mode": "rewrite"}
    forged["certificate_sha256"] = json_sha256({k: v for k, v in forged.items()
                                                if k not in ("certificate_sha256", "signature")})
    failed = {c["check"] for c in verify_purge(forged, forget, DeepSpeedRows(), certificate_dir=tmp_path,
                                                 signing_key=key)["checks"] if not c["ok"]}
    assert failed == {"signature"}  # resealed by a forger: only the key tells


def test_an_interrupted_swap_is_finished_by_the_next_purge(runs, tmp_path):
    """The state a crash between purge's two renames leaves: the tag missing, its purged copy marked ready."""
    from nulls_dist.formats import atomic

    info = runs[1]
    run = copy_run(info["run"], tmp_path / "run")
    tag = run / "checkpoints" / TAG(2)
    ready = tag.with_name(f".{tag.name}.ready-1-0123abcd")
    shutil.copytree(tag, ready)
    (ready / "marker").write_text("the staged copy")  # tells the two apart
    os.rename(tag, tag.with_name(f".{tag.name}.replaced-1-4567cdef"))
    done = atomic.recover_directory(tag)
    assert (tag / "marker").exists() and len(done) == 2 and not list(tag.parent.glob(".step_*"))
    (tag / "marker").unlink()
    # and through purge itself: a replaced copy left behind beside a complete tag is removed first
    shutil.copytree(tag, tag.with_name(f".{tag.name}.replaced-1-89abcdef"))
    cert = _purge(run, info, tmp_path / "purge.json")
    assert cert["recovered"] and not list(tag.parent.glob(".step_*"))


# ------------------------------------------------------------------------------------------------ bf16 layouts
def test_bf16_checkpoints_are_purged_as_deepspeed_loads_them(tmp_path):
    """bf16 files (what GPU runs write) made on the CPU by a real bf16 engine at ZeRO 0 and 1, purged, then
    loaded back into fresh engines: the engine's own module weights, fp32 masters and Adam moments of the sink
    tables are zero in the forgotten rows, and stay so after a step."""
    import subprocess

    from nulls_dist.train.distributed import free_port
    from unlearn_helpers import make_registry

    worker = Path(__file__).parent / "bf16_ckpt_worker.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(*args):
        proc = subprocess.run([sys.executable, str(worker), *args, str(free_port())], capture_output=True, text=True,
                              timeout=600, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return json.loads(proc.stdout.split("RESULT ", 1)[1])

    files = run("save", str(tmp_path / "runs"))
    assert "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt" in files["1"]
    registry = make_registry(tmp_path / "registry.parquet")
    ids = (4096, 4100)  # sources the worker trained
    rows = {}
    for stage in (0, 1):
        run_dir = tmp_path / "runs" / f"zero{stage}"
        manifest = make_manifest(run_dir, registry, tmp_path / f"manifest{stage}")
        forget = mask_forget(run_dir, manifest, tmp_path, ids=ids, name=f"bf{stage}")
        cert = purge(run_dir, [], manifest, forget, tmp_path / f"purge{stage}.json", DeepSpeedRows())
        assert set(cert["artifacts"][0]["zeroed"]) == {"module", "master", "exp_avg", "exp_avg_sq"}
        union = union_rows(run_dir, ids)
        rows = {key: np.nonzero(union[layer])[0].tolist() for layer, key in sink_keys(2)}
    found = run("load", str(tmp_path / "runs"), json.dumps(rows))
    for stage in ("0", "1"):
        assert found[stage].pop("after_a_step") == 0
        assert found[stage] and all(v == 0 for v in found[stage].values()), found[stage]
