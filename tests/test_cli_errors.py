"""Bad user input at every console entry point: one line on stderr, `nulls-<tool>: error: <message naming the
file, field or id>`, exit code 2, no traceback -- also for the Hydra apps, without HYDRA_FULL_ERROR. The installed
console scripts are run in subprocesses; `cli.errors` itself is checked in-process (what it catches, and that a
bug keeps its traceback)."""
from __future__ import annotations

import bz2
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nulls_dist.cli.errors import error_line, report_errors

BIN = Path(sys.executable).parent
FIXTURE = Path(__file__).resolve().parent.parent / "data_pipeline" / "fixtures" / "mini-pages-articles.xml"


def _run(tool: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}  # as a user runs it
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([str(BIN / tool), *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def assert_one_error_line(proc: subprocess.CompletedProcess, tool: str, *names: str) -> str:
    """Exit code 2, exactly one non-empty stderr line `<tool>: error: ...` naming each of `names`, no traceback,
    nothing on stdout."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"{tool}: error: "), lines[0]
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    assert "Traceback" not in proc.stdout + proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr
    assert proc.stdout == ""
    return lines[0]


# ------------------------------------------------------------------------------------------------ nulls-data
def _nulls_data(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return _run("nulls-data", "data.tokenizer.vocab_size=300", "data.tokenizer.num_threads=1", *overrides,
                cwd=tmp_path)


@pytest.mark.parametrize("kind", ["truncated-bz2", "truncated-xml", "malformed-xml"])
def test_nulls_data_names_a_truncated_or_malformed_dump(tmp_path, kind):
    text = FIXTURE.read_bytes()
    if kind == "truncated-bz2":
        dump = tmp_path / "dump.xml.bz2"
        packed = bz2.compress(text)
        dump.write_bytes(packed[: len(packed) // 2])
    elif kind == "truncated-xml":
        dump = tmp_path / "dump.xml"
        dump.write_bytes(text[: len(text) * 3 // 4])
    else:
        dump = tmp_path / "dump.xml"
        dump.write_bytes(text.replace(b"</title>", b"</titel>", 1))
    line = assert_one_error_line(_nulls_data(tmp_path, "data.output_dir=out", f"data.ingest.inputs=[{dump}]"),
                                 "nulls-data", dump)
    assert ("EOFError" if kind == "truncated-bz2" else "ParseError") in line


def test_nulls_data_output_dir_that_is_a_file_or_under_one(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    assert_one_error_line(_nulls_data(tmp_path, f"data.output_dir={a_file}"), "nulls-data", "output_dir", a_file)
    assert_one_error_line(_nulls_data(tmp_path, f"data.output_dir={a_file / 'out'}"), "nulls-data", "output_dir",
                          a_file / "out")


def test_nulls_data_output_dir_that_is_not_writable(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("this user can write to a mode-0500 directory (root): permissions cannot be tested here; "
                        "the output_dir-under-a-file case covers an output_dir that cannot be written")
        assert_one_error_line(_nulls_data(tmp_path, f"data.output_dir={locked / 'out'}"), "nulls-data",
                              locked / "out")
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("override,names", [
    ("data.shard.bogus=1", ["data.shard.bogus"]),              # Hydra: key not in the config
    ("data=no_such_dataset", ["data/no_such_dataset"]),        # Hydra: no such config group option
    ("data.shard.num_workers=many", ["data.shard.num_workers", "many"]),
])
def test_nulls_data_config_errors(tmp_path, override, names):
    assert_one_error_line(_nulls_data(tmp_path, "data.output_dir=out", override), "nulls-data", *names)


# ------------------------------------------------------------------------------------------------ checkpoint tools
def _bad_meta_run(tmp_path: Path) -> tuple[Path, Path]:
    """A training run whose `latest` tag has a nulls_meta.json that is not JSON, and a deployed checkpoint dir
    with the same meta."""
    tag = tmp_path / "run" / "checkpoints" / "step_00000001"
    tag.mkdir(parents=True)
    (tag.parent / "latest").write_text("step_00000001\n")
    (tag / "nulls_meta.json").write_text('{"model": {"n_layer": 2,')
    deployed = tmp_path / "deployed"
    deployed.mkdir()
    (deployed / "model.safetensors").write_bytes(b"\0" * 16)
    (deployed / "nulls_meta.json").write_text('{"model": ')
    return tmp_path / "run", deployed


def test_nulls_manifest_bad_meta_json_and_missing_checkpoint(tmp_path):
    run, deployed = _bad_meta_run(tmp_path)
    meta = run / "checkpoints" / "step_00000001" / "nulls_meta.json"
    out = f"out={tmp_path / 'manifest'}"
    assert_one_error_line(_run("nulls-manifest", f"checkpoint={run}", out), "nulls-manifest", meta, "not valid JSON")
    assert_one_error_line(_run("nulls-manifest", f"checkpoint={deployed}", out), "nulls-manifest",
                          deployed / "nulls_meta.json")
    assert_one_error_line(_run("nulls-manifest", f"checkpoint={tmp_path / 'none'}", out), "nulls-manifest",
                          tmp_path / "none")
    assert_one_error_line(_run("nulls-manifest", out), "nulls-manifest", "checkpoint")  # mandatory, not given
    assert not (tmp_path / "manifest").exists()


def test_nulls_generate_bad_meta_json_and_missing_checkpoint(tmp_path):
    run, deployed = _bad_meta_run(tmp_path)
    assert_one_error_line(_run("nulls-generate", "--checkpoint", str(run), "--prompt", "x"), "nulls-generate",
                          run / "checkpoints" / "step_00000001" / "nulls_meta.json")
    assert_one_error_line(_run("nulls-generate", "--checkpoint", str(deployed), "--prompt", "x"), "nulls-generate",
                          deployed / "nulls_meta.json")
    assert_one_error_line(_run("nulls-generate", "--checkpoint", str(tmp_path / "none"), "--prompt", "x"),
                          "nulls-generate", tmp_path / "none")


def test_nulls_unlearn_bad_forget_set_json_and_missing_checkpoint(tmp_path):
    forget = tmp_path / "forget.json"
    forget.write_text('{"format": "nulls-forget-set", "source_ids": [1, 2')
    common = ["--manifest", str(tmp_path / "manifest"), "--certificate", str(tmp_path / "cert.json"), "4100"]
    # the user's files are read before the checkpoint is loaded: the forget set is named even with no checkpoint
    assert_one_error_line(_run("nulls-unlearn", "--checkpoint", str(tmp_path / "none"), "--forget-set", str(forget),
                               *common), "nulls-unlearn", forget, "not valid JSON")
    assert_one_error_line(_run("nulls-unlearn", "verify", "--certificate", str(forget), "--checkpoint",
                               str(tmp_path / "none"), "--forget-set", str(forget)), "nulls-unlearn", forget)
    assert_one_error_line(_run("nulls-unlearn", "--checkpoint", str(tmp_path / "none"), "--forget-set",
                               str(tmp_path / "new.json"), *common), "nulls-unlearn", tmp_path / "none")
    assert not (tmp_path / "cert.json").exists()


def test_nulls_launch_and_sinks_config_errors(tmp_path):
    assert_one_error_line(_run("nulls-launch", "+launcher.bogus=1", "dry_run=true", f"runs_root={tmp_path}"),
                          "nulls-launch", "launcher.bogus")
    assert_one_error_line(_run("nulls-sinks", "--strategy", "code", "--pool", "0", "--source-id", "5"),
                          "nulls-sinks", "pool")


# ------------------------------------------------------------------------------------------------ the helper
def test_error_line_is_one_line_naming_the_path():
    exc = FileNotFoundError(2, "No such file or directory", "/data/x.json")
    assert error_line("nulls-x", exc) == "nulls-x: error: /data/x.json: No such file or directory"
    assert error_line("nulls-x", ValueError("field a:\n  bad\n\nvalue.\nagain")) == \
        "nulls-x: error: field a: bad; value; again"


def test_report_errors_catches_user_errors_only(capsys):
    @report_errors("nulls-x")
    def bad_input():
        raise ValueError("data.shard.num_workers: expected int, got 'x'")

    with pytest.raises(SystemExit) as exit_info:
        bad_input()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "nulls-x: error: data.shard.num_workers: expected int, got 'x'\n"

    @report_errors("nulls-x")
    def bug():
        return {}["missing"]

    with pytest.raises(KeyError):  # a bug keeps its traceback
        bug()


def test_deliberate_runtime_errors_are_ours_only(capsys):
    from nulls_dist.train.checkpoint import check_compatible

    @report_errors("nulls-train", deliberate=(RuntimeError,))
    def resume_mismatch():
        check_compatible({"model": {"n_layer": 2}}, {"model": {"n_layer": 4}}, Path("/runs/a/step_00000010"))

    with pytest.raises(SystemExit) as exit_info:
        resume_mismatch()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("nulls-train: error: cannot resume from /runs/a/step_00000010")

    @report_errors("nulls-train", deliberate=(RuntimeError,))
    def torch_failure():
        return torch.zeros(2, 3) @ torch.zeros(2, 3)  # torch's RuntimeError: a bug, not the user's

    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        torch_failure()


def test_hydra_mode_restores_hydra_full_error(monkeypatch):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    seen = {}

    @report_errors("nulls-x", hydra=True)
    def app():
        seen["inside"] = os.environ["HYDRA_FULL_ERROR"]

    app()
    assert seen["inside"] == "1" and os.environ["HYDRA_FULL_ERROR"] == "0"
