"""`nulls-eval` as a console script: run in a subprocess on a tiny DeepSpeed checkpoint (tests/unlearn_helpers),
a real sentencepiece tokenizer and WebDataset-layout tar shards of that tokenizer's ids, and check the JSON,
markdown and PNG outputs it writes."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from unlearn_helpers import (  # noqa: E402
    ID_OFFSET, NUM_HOLDOUT, NUM_TRAIN, make_checkpoint_with_manifest, make_ds_checkpoint, write_dataset_manifest,
)

from nulls_dist.cli.eval import main as eval_main  # noqa: E402
from nulls_dist.formats.dataset import LOSS_MASK_KEY, SOURCE_IDS_KEY, TOKENS_KEY  # noqa: E402
from nulls_dist.audit.unlearn import unlearn  # noqa: E402
from nulls_dist.evaluation.evaluate import PROBE_GROUPS  # noqa: E402

FORGET = 3  # the forgotten article's index (first request)
FORGET_2 = 5  # the second request


def _text(i: int) -> str:
    return f"Article {i} is a town in the north. Article {i} was founded by Tok{i % 7} near the river Rin{i % 5}."


def _write_shard(path: Path, sp, sources: list[int]) -> None:
    """One tar shard, one sample per source: tokens (BOS ... EOS), source ids, loss mask (data schema keys)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for n, sid in enumerate(sources):
            tokens = np.asarray([2, *sp.encode(_text(sid - ID_OFFSET)), 3], dtype=np.uint16)  # (T,)
            arrays = {TOKENS_KEY: tokens, SOURCE_IDS_KEY: np.full(tokens.shape, sid, dtype=np.uint32),
                      LOSS_MASK_KEY: np.ones(tokens.shape, dtype=np.uint8)}
            for key, arr in arrays.items():
                buf = io.BytesIO()
                np.save(buf, arr)
                info = tarfile.TarInfo(f"{n:06d}.{key}")
                info.size = buf.tell()
                buf.seek(0)
                tar.addfile(info, buf)


def _probes() -> list[dict]:
    ids = lambda *i: [ID_OFFSET + j for j in i]  # noqa: E731
    return [
        {"probe_id": "u0", "kind": "unique", "prompt": f"Article {FORGET} was founded by", "answer": "Tok3",
         "distractors": ["Tok1", "Tok2"], "source_ids": ids(FORGET)},
        {"probe_id": "u1", "kind": "unique", "prompt": "Article 8 was founded by", "answer": "Tok1",
         "distractors": ["Tok4", "Tok2"], "source_ids": ids(8)},
        {"probe_id": "s0", "kind": "shared", "prompt": f"Article {FORGET} is near the river", "answer": "Rin3",
         "distractors": ["Rin1", "Rin2"], "source_ids": ids(FORGET, 8)},
        {"probe_id": "u2", "kind": "unique", "prompt": f"Article {FORGET_2} was founded by", "answer": "Tok5",
         "distractors": ["Tok1", "Tok2"], "source_ids": ids(FORGET_2)},
    ]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("evalcli")
    ckpt = make_checkpoint_with_manifest(root, zero_stage=0, shard_rows=50)
    data = root / "data"
    data.mkdir()
    (root / "corpus.txt").write_text("\n".join(_text(i) for i in range(NUM_TRAIN + NUM_HOLDOUT)))
    spm.SentencePieceTrainer.train(input=str(root / "corpus.txt"), model_prefix=str(data / "sp"), vocab_size=80,
                                   model_type="bpe", bos_id=2, eos_id=3, pad_id=0, unk_id=1)
    sp = spm.SentencePieceProcessor(model_file=str(data / "sp.model"))
    train = list(range(ID_OFFSET, ID_OFFSET + NUM_TRAIN))
    _write_shard(data / "shard-000000.tar", sp, train)
    _write_shard(data / "holdout" / "shard-000000.tar", sp, [ID_OFFSET + NUM_TRAIN + i for i in range(NUM_HOLDOUT)])
    write_dataset_manifest(data, ["shard-000000.tar"], ["holdout/shard-000000.tar"],
                           tokenizer={"path": "sp.model"}, special_ids={"bos": 2})
    (root / "probes.jsonl").write_text("\n".join(json.dumps(p) for p in _probes()) + "\n")
    # two successive requests on one forget set; an oracle trained (separately, another seed) without both
    unlearn(ckpt, root / "manifest", [f"Article {FORGET}"], "mask", root / "forget.json", root / "cert.json")
    unlearn(ckpt, root / "manifest", [f"Article {FORGET_2}"], "mask", root / "forget.json", root / "cert2.json")
    make_ds_checkpoint(root / "oracle", zero_stage=0, seed=1,
                       extra_meta={"exclude_sources": [ID_OFFSET + FORGET, f"Article {FORGET_2}"]})
    # the same forget set once with `hard`: the deployment the two-checkpoint comparison holds against the original
    unlearn(ckpt, root / "manifest", [f"Article {FORGET}", f"Article {FORGET_2}"], "hard", root / "forget_hard.json",
            root / "cert_hard.json", root / "hard")
    return root


def test_nulls_eval_console_script_writes_report(setup, tmp_path):
    root, out = setup, tmp_path / "eval"
    script = Path(sys.executable).parent / "nulls-eval"
    assert script.is_file(), f"console script not installed: {script}"
    # the oracle stands in for the separately trained reference too: this checks the tool's plumbing
    cmd = [str(script), "--checkpoint", str(root / "run"), "--manifest", str(root / "manifest"),
           "--forget-set", str(root / "forget.json"), "--oracle", str(root / "oracle"), "--reference",
           str(root / "oracle"), "--data", str(root / "data"), "--probes", str(root / "probes.jsonl"), "--out",
           str(out), "--embedder", "model", "--steps", "2", "--relearn-steps", "2", "--max-retained", "4",
           "--bootstrap", "50", "--quantize", "4", "--quantize-deployments", "unlearned,oracle"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout[proc.stdout.index("{\n"):])
    assert printed["embedder"].startswith("model")  # the NULL model's own token embeddings
    doc = json.loads((out / "report.json").read_text())
    assert set(doc["deployments"]) == {"original", "unlearned", "oracle", "ga", "npo"}
    forgotten = [ID_OFFSET + FORGET, ID_OFFSET + FORGET_2]
    assert doc["forget_ids"] == forgotten and doc["related_ids"] == [ID_OFFSET + 8]
    assert {k: v for k, v in doc["num_probes"].items() if v} == {
        "unique_forget": 2, "shared_forget": 1, "shared_forget_via_retained": 1, "unique_related": 1}
    for name, dep in doc["deployments"].items():
        assert set(dep) >= {"loss", "probes", "membership", "verbatim"}, name
        assert set(dep["loss"]) == {"forget", "related", "retained", "holdout"}
        assert np.isfinite(dep["loss"]["forget"]) and np.isfinite(dep["loss"]["holdout"])
        assert set(dep["probes"]) == set(PROBE_GROUPS)  # every group reported, empty ones included
        attacks = dep["membership"]["attacks"]
        assert {"loss", "zlib", "min_k", "min_k_pp", "ref_oracle_loss", "ref_reference_loss"} <= set(attacks)
        assert attacks["min_k"]["num_members"] == 2 and attacks["min_k"]["num_non_members"] == NUM_HOLDOUT
    assert doc["deployments"]["oracle"]["membership"]["attacks"]["min_k"]["priv_leak"] == pytest.approx(0.0)
    assert set(doc["quantization"]["deployments"]) == {"unlearned@int4", "oracle@int4"}
    wc = doc["worst_case"]["deployments"]
    assert set(wc) == {"unlearned", "oracle"} and wc["unlearned"]["num_routes"] == NUM_TRAIN - 2 + 2
    assert set(doc["relearning"]["conditions"]) == {"forget_text", "related_text"}
    stages = doc["successive"]["stages"]
    assert [s["source_ids"] for s in stages] == [forgotten[:1], forgotten] and stages[0]["oracle_checkpoint"] == str(root / "oracle")
    assert stages[0]["detail"]["forget_ids"] == forgotten[:1] and stages[1]["detail"] is None
    assert doc["config"]["relearn"]["steps"] == 2 and doc["config"]["finetune"]["steps"] == 2
    md = (out / "report.md").read_text()
    assert "| unlearned |" in md and "| oracle |" in md and "Truth Ratio" in md
    for section in ("What NULLs do and do not remove", "Membership inference", "Worst-case routing",
                    "Quantization attack", "Relearning", "Successive requests"):
        assert f"## {section}" in md, section
    for png in ("probes.png", "loss.png", "roc.png", "worst_case.png", "quantization.png", "relearning.png",
                "successive.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"({png})" in md


def test_nulls_eval_refuses_an_oracle_that_saw_a_forgotten_source(setup, tmp_path):
    cmd = [str(Path(sys.executable).parent / "nulls-eval"), "--checkpoint", str(setup / "run"), "--manifest",
           str(setup / "manifest"), "--forget-set", str(setup / "forget.json"), "--oracle", str(setup / "run"),
           "--data", str(setup / "data"), "--out", str(tmp_path / "eval"), "--embedder", "model", "--baselines", ""]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = _one_error_line(proc, "--oracle", str(setup / "run"), str(ID_OFFSET + FORGET))
    assert "exclude" in line and not (tmp_path / "eval").exists()


def _nulls_eval(root: Path, out: Path, data: Path, checkpoint: Path) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).parent / "nulls-eval"), "--checkpoint", str(checkpoint), "--manifest",
           str(root / "manifest"), "--forget-set", str(root / "forget.json"), "--data", str(data), "--probes",
           str(root / "probes.jsonl"), "--out", str(out), "--embedder", "model", "--baselines", ""]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _one_error_line(proc: subprocess.CompletedProcess, *names: str) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("nulls-eval: error: ") and all(n in lines[0] for n in names), lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr and proc.stdout == ""
    return lines[0]


def test_nulls_eval_refuses_a_shard_that_does_not_match_the_manifest(setup, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(setup / "data", data)
    shard = data / "holdout" / "shard-000000.tar"
    raw = bytearray(shard.read_bytes())
    raw[600] ^= 0x01
    shard.write_bytes(bytes(raw))
    line = _one_error_line(_nulls_eval(setup, tmp_path / "eval", data, setup / "run"), str(shard))
    assert "sha256" in line and not (tmp_path / "eval").exists()


def test_nulls_eval_names_a_missing_checkpoint(setup, tmp_path):
    _one_error_line(_nulls_eval(setup, tmp_path / "eval", setup / "data", tmp_path / "no-such-run"),
                    str(tmp_path / "no-such-run"))


# ------------------------------------------------------------------------------------------------ report sections
LIGHT = ["--embedder", "model", "--baselines", "", "--relearn-steps", "0", "--quantize", "", "--worst-case-groups", "",
         "--no-successive", "--bootstrap", "50", "--max-retained", "4"]  # the sections only, the rest switched off


def _eval_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--checkpoint", str(root / "run"), "--manifest", str(root / "manifest"), "--forget-set",
            str(root / "forget.json"), "--data", str(root / "data"), "--probes", str(root / "probes.jsonl"), "--out",
            str(out), *LIGHT, *extra]


def test_the_comparison_and_the_residue_land_in_the_report(setup, tmp_path, capsys):
    root, out = setup, tmp_path / "eval"
    eval_main(_eval_args(root, out, "--oracle", str(root / "oracle"), "--compare-before", str(root / "run"),
                         "--compare-after", str(root / "hard")))
    printed = json.loads(capsys.readouterr().out)
    doc = json.loads((out / "report.json").read_text())
    assert set(doc["sections"]) == {"checkpoint_diff", "residue"}
    forgotten = [ID_OFFSET + FORGET, ID_OFFSET + FORGET_2]
    # the comparison: the hard deployment differs from the original in exactly the forgotten sinks
    diff = doc["sections"]["checkpoint_diff"]
    assert diff["before"]["path"].startswith(str(root / "run")) and diff["after"]["path"] == str(root / "hard")
    assert diff["rows"]["exact"] is True and diff["rows"]["changed_total"] == diff["rows"]["forgotten_total"] > 0
    assert diff["identification"]["diff"]["candidates_recall"] == 1.0
    assert {t["source_id"] for t in diff["identification"]["diff"]["top"] if t["score"] == 1.0} >= set(forgotten)
    knowledge = diff["knowledge"]
    assert knowledge["grafted_equals_before"] and knowledge["sink_on_unique_forget"]["before"]["num"] == 2
    assert knowledge["sink_on_unique_forget"]["after_with_diff_grafted"] == knowledge["sink_on_unique_forget"]["before"]
    # the residue: the forgotten vs holdout texts of the audit, the same Min-K% AUCs as its membership table
    res = doc["sections"]["residue"]
    assert res["num_members"] == 2 and res["num_non_members"] == NUM_HOLDOUT and res["deployment"] == "unlearned"
    attacks = {n: doc["deployments"][n]["membership"]["attacks"] for n in ("unlearned", "oracle")}
    assert res["auc"]["model"]["min_k"] == pytest.approx(attacks["unlearned"]["min_k"]["auc"])
    assert res["auc"]["reference"]["min_k"] == pytest.approx(attacks["oracle"]["min_k"]["auc"])
    assert res["auc"]["model"]["loss"] == pytest.approx(attacks["unlearned"]["loss"]["auc"])
    for family, rows in res["families"].items():
        assert sum(r["num_tokens_members"] for r in rows.values()) == res["num_member_tokens"], family
        for score in ("loss", "min_k"):
            assert sum(r["share"][score] for r in rows.values()) == pytest.approx(1.0), (family, score)
    assert res["num_corpus_texts"] == NUM_TRAIN - 2  # the oracle's training texts: every retained one
    assert res["example"]["source_id"] == forgotten[0] and len(res["example"]["gap"]) == len(res["example"]["pieces"])
    md = (out / "report.md").read_text()
    findings = md[md.index("## What NULLs do and do not remove"):md.index("## Fact probes")]
    assert "**two checkpoints (before and after): names the forget set and restores the forgotten rows.**" in findings
    assert f"{diff['identification']['diff']['auc']:.3f}" in findings
    assert "**where the membership residue lives:" in findings
    assert "## Two checkpoints: what an attacker holding both learns" in md
    assert "## Where the membership residue lives" in md and "| name | title |" in md
    for png in ("checkpoint_diff.png", "residue_classes.png", "residue_token_gaps.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"({png})" in md and png in printed["files"]["plots"]
    assert not [p.name for p in out.iterdir() if p.suffix not in (".json", ".md", ".png")]  # no temporaries left


def test_the_residue_is_on_with_an_oracle_and_off_on_request(setup, tmp_path):
    eval_main(_eval_args(setup, tmp_path / "off", "--oracle", str(setup / "oracle"), "--no-residue"))
    doc = json.loads((tmp_path / "off" / "report.json").read_text())
    assert "sections" not in doc and not (tmp_path / "off" / "residue_classes.png").exists()
    assert "## Where the membership residue lives" not in (tmp_path / "off" / "report.md").read_text()


@pytest.mark.parametrize("extra, names", [
    (["--oracle", "ORACLE", "--compare-before", "MISSING", "--compare-after", "RUN"], ["--compare-before", "MISSING"]),
    (["--oracle", "ORACLE", "--compare-before", "RUN"], ["--compare-after", "missing"]),
    (["--residue"], ["--residue needs --oracle"]),
])
def test_bad_section_arguments_give_one_line(setup, tmp_path, capsys, extra, names):
    paths = {"ORACLE": str(setup / "oracle"), "RUN": str(setup / "run"), "MISSING": str(tmp_path / "no-such-ckpt")}
    names = [paths.get(n, n) for n in names]
    with pytest.raises(SystemExit) as exc:
        eval_main(_eval_args(setup, tmp_path / "eval", *[paths.get(a, a) for a in extra]))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exc.value.code == 2 and len(lines) == 1 and lines[0].startswith("nulls-eval: error: ")
    assert all(n in lines[0] for n in names), lines[0]
    assert not (tmp_path / "eval").exists()


def test_stage_oracles_are_used_per_request_and_counted(setup, tmp_path):
    """`--stage-oracles` (what `unlearn_demo --full` passes): request i's metrics use oracle i; a wrong count is
    one line naming the flag and writes nothing."""
    root = setup
    base = [sys.executable, "-m", "nulls_dist.cli.eval", "--checkpoint", str(root / "run"), "--manifest",
            str(root / "manifest"), "--forget-set", str(root / "forget.json"), "--oracle", str(root / "oracle"),
            "--data", str(root / "data"), "--probes", str(root / "probes.jsonl"), "--embedder", "model",
            "--baselines", "", "--relearn-steps", "1", "--max-retained", "4", "--bootstrap", "20", "--quantize", "",
            "--worst-case-groups", "", "--no-residue"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    wrong = subprocess.run([*base, "--out", str(tmp_path / "bad"), "--stage-oracles", str(root / "oracle"),
                            str(root / "oracle")], capture_output=True, text=True, timeout=300, env=env)
    assert wrong.returncode == 2 and "--stage-oracles: give 1 checkpoint(s)" in wrong.stderr
    assert "Traceback" not in wrong.stderr and not (tmp_path / "bad").exists()
    out = tmp_path / "eval"
    proc = subprocess.run([*base, "--out", str(out), "--stage-oracles", str(root / "oracle")], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    successive = json.loads((out / "report.json").read_text())["successive"]
    assert successive["oracle_per_stage"] is True
    assert [s["oracle_checkpoint"] for s in successive["stages"]] == [str(root / "oracle")] * 2
