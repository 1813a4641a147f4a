"""The two-checkpoint comparison (`evaluation/checkpoint_diff.py`, `nulls-unlearn diff`) on a real run: a
`nulls-train` checkpoint before and after `nulls-unlearn purge` (and the mask method, which changes nothing).
The attacker's scores are checked against a brute-force recomputation from the sink assignment, and the
knowledge claim against the model itself: grafting the diff back restores the before checkpoint's answers."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from purge_helpers import FORGET, copy_run, make_manifest, mask_forget, train_run, union_rows  # noqa: E402
from train_helpers import prepare_synthwiki  # noqa: E402

from nulls_dist.audit.manifest import iter_manifest  # noqa: E402
from nulls_dist.audit.purge import purge  # noqa: E402
from nulls_dist.cli.unlearn import main as unlearn_main  # noqa: E402
from nulls_dist.deploy.checkpoint_io import load_checkpoint  # noqa: E402
from nulls_dist.evaluation.checkpoint_diff import compare_checkpoints, markdown_section  # noqa: E402
from nulls_dist.formats.documents import read_jsonl  # noqa: E402
from nulls_dist.sinks import SinkAssignment  # noqa: E402
from nulls_dist.train.checkpoint_rows import DeepSpeedRows  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PROBES = REPO / "data_pipeline" / "bundled" / "synthwiki" / "probes.jsonl"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("diff")
    data = prepare_synthwiki(root / "data")
    run = train_run(data, root / "run", stage=1, steps=2, ranks=1)
    manifest = make_manifest(run, data / "registry.parquet", root / "manifest")
    forget = mask_forget(run, manifest, root)
    before = copy_run(run, root / "before")
    purge(run, [], manifest, forget, root / "purge.json", DeepSpeedRows())
    return {"root": root, "data": data, "manifest": manifest, "forget": forget, "union": union_rows(run),
            "before": load_checkpoint(before), "after": load_checkpoint(run)}


def _tokenizer(data: Path):
    from nulls_dist.cli.eval import dataset_tokenizer

    tokenizer = dataset_tokenizer(data, None)
    return tokenizer.encode, tokenizer.bos_id


def _brute_force(pair) -> tuple[float, int]:
    """Share of each trained source's sinks in the forgotten rows: the AUC of forgotten vs the rest, and how many
    sources have all their sinks there."""
    cfg = pair["before"].model_config
    assignment = SinkAssignment(cfg.sink_assignment_config())
    scores, labels = [], []
    for batch in iter_manifest(pair["manifest"], columns=["source_id", "trained"]):
        for sid, trained in zip(batch.column("source_id").to_pylist(), batch.column("trained").to_pylist()):
            if trained:
                rows = assignment.rows(torch.tensor([sid]), 0)[0]
                rows = rows[rows >= 0].numpy()
                scores.append(pair["union"][0][rows].mean())
                labels.append(sid in FORGET)
    pos = [s for s, f in zip(scores, labels) if f]
    neg = [s for s, f in zip(scores, labels) if not f]
    auc = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg) / (len(pos) * len(neg))
    return auc, sum(s == 1.0 for s in scores)


def test_a_purge_diff_is_exactly_the_forgotten_rows_and_names_the_forget_set(pair):
    encode, bos = _tokenizer(pair["data"])
    result = compare_checkpoints(pair["before"], pair["after"], pair["manifest"], forget_ids=list(FORGET),
                                 probes=read_jsonl(PROBES), encode=encode, bos_id=bos)
    rows = result["rows"]
    assert rows["exact"] and rows["changed_total"] == int(pair["union"].sum()) == rows["forgotten_total"]
    assert rows["other_elements_changed"] == {} and rows["changed_outside_forgotten"] == 0
    diff, alone = result["identification"]["diff"], result["identification"]["after_only"]
    auc, num_full = _brute_force(pair)
    assert diff["auc"] == pytest.approx(auc, abs=1e-12) and diff["num_all_sinks_flagged"] == num_full
    assert diff["auc"] > 0.99 and diff["candidates_recall"] == 1.0  # every forgotten source has all sinks changed
    assert set(FORGET) <= {t["source_id"] for t in diff["top"] if t["score"] == 1.0}
    assert alone["auc"] == diff["auc"]  # a purge's zero rows are a fingerprint by themselves
    assert diff["histogram"]["forgotten"][-1] == len(FORGET) and sum(diff["histogram"]["others"]) == \
        diff["num_sources"] - len(FORGET)
    knowledge = result["knowledge"]
    assert knowledge["grafted_equals_before"]
    forget = knowledge["sink_on_unique_forget"]
    assert forget["before"]["num"] > 0
    assert forget["after_with_diff_grafted"] == forget["before"]  # the diff carries the before rows' answers
    assert result["headline"]["exact"] is True
    text = markdown_section(result)
    assert text.startswith("## Two checkpoints") and "**yes**" in text and "AUC" in text


def test_the_mask_method_changes_no_weight_and_the_pair_tells_nothing_more(pair):
    result = compare_checkpoints(pair["before"], pair["before"], pair["manifest"], forget_ids=list(FORGET))
    assert result["rows"]["changed_total"] == 0 and not result["rows"]["exact"]  # the forgotten rows are all there
    assert result["rows"]["forgotten_unchanged"] == int(pair["union"].sum())
    assert result["identification"]["diff"]["auc"] == 0.5 and result["identification"]["diff"]["num_all_sinks_flagged"] == 0
    assert "did not change" in markdown_section(result)


def test_nulls_unlearn_diff_writes_json_and_markdown(pair, tmp_path, capsys):
    out = tmp_path / "out"
    unlearn_main(["diff", "--before", str(pair["before"].path), "--after", str(pair["after"].path), "--manifest",
                  str(pair["manifest"]), "--forget-set", str(pair["forget"]), "--out", str(out)])
    printed = json.loads(capsys.readouterr().out)
    assert printed["headline"]["exact"] is True and printed["headline"]["auc"] > 0.99
    assert json.loads((out / "diff.json").read_text())["rows"]["exact"] is True
    assert (out / "diff.md").read_text().startswith("## Two checkpoints")
    assert sorted(p.name for p in out.iterdir()) == ["diff.json", "diff.md", "diff.png"]  # no temporaries left
    assert (out / "diff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit) as exc:
        unlearn_main(["diff", "--before", str(pair["before"].path), "--after", str(pair["after"].path),
                      "--manifest", str(pair["manifest"]), "--probes", str(PROBES)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1 and "--probes needs --data" in err


def test_checkpoints_of_another_model_are_refused(pair, tmp_path):
    from nulls_dist.deploy.checkpoint_io import LoadedCheckpoint

    other = dict(pair["after"].state_dict)
    other.pop("lm_head.weight")
    with pytest.raises(ValueError, match="different tensors"):
        compare_checkpoints(pair["before"], LoadedCheckpoint(other, pair["after"].meta, tmp_path, "deployed"),
                            pair["manifest"])
