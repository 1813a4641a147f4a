"""The real-text unlearning case end to end on a tiny slice (`nulls_dist.cli.unlearn_factbook`): the Factbook's
first 10 entries converted (600 characters an article), `nulls-data`, a one-layer NULL trained a few steps by `nulls-train` (DeepSpeed over
gloo, one process) as the original and as the retrain oracle, `nulls-manifest`, `nulls-unlearn` mask and hard,
both verified, and `nulls-eval` with the corpus's own probes. Checks that the stages agree with each other: the
forget set avoids the holdout and is what the oracle excluded and the report evaluated; the probe groups are the
probes of those articles; mask and hard give the same numbers; the forget set changes what the model answers."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pyarrow.parquet as pq

from nulls_dist.data_pipeline.synthwiki import load_probes
from nulls_dist.deploy.checkpoint_io import load_checkpoint

TINY_MODEL = {"n_layer": 1, "n_embd": 64, "n_head": 2, "n_query_groups": 1, "head_size": 32,
              "intermediate_size": 512, "p_gen": 0.125, "p_mem": 0.05}


def test_factbook_chain_end_to_end(tmp_path):
    work = tmp_path / "work"
    cmd = [sys.executable, "-m", "nulls_dist.cli.unlearn_factbook", "--workdir", str(work),
           "--max-countries", "10", "--max-chars", "600", "--num-forget", "3", "--min-unique", "2",
           "--data-override", "holdout.count=6", "--data-override", "tokenizer.vocab_size=512",
           "--max-steps", "6", "--train-override=optim.warmup_steps=2",
           *[f"--train-override=model.overrides.{k}={v}" for k, v in TINY_MODEL.items()],
           "--baselines", "", "--relearn-steps", "1", "--embedder", "model"]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "verify certificate_mask_1.json: ok" in proc.stdout and "verify certificate_hard.json: ok" in proc.stdout
    forget = [int(s) for s in re.search(r"forget set \(3 articles\): ([0-9,]+)", proc.stdout).group(1).split(",")]

    data = work / "data" / "factbook_unlearn"
    registry = pq.read_table(data / "registry.parquet", columns=["source_id", "split"]).to_pydict()
    split = dict(zip(registry["source_id"], registry["split"]))
    holdout = sorted(s for s, v in split.items() if v == "holdout")
    assert len(holdout) == 6 and all(split[s] == "train" for s in forget)
    assert [int(s) for s in load_checkpoint(work / "runs" / "oracle").meta["exclude_sources"]] == forget
    assert not load_checkpoint(work / "runs" / "original").meta.get("exclude_sources")

    report = json.loads((work / "eval" / "report.json").read_text())
    probes = load_probes(data / "raw" / "probes.jsonl")
    unique_of = lambda ids: sum(p["kind"] == "unique" and p["source_ids"][0] in ids for p in probes)  # noqa: E731
    assert report["forget_ids"] == forget and report["num_holdout"] == 6
    assert report["num_probes"]["unique_forget"] == unique_of(set(forget)) >= 2 * len(forget)
    assert report["num_probes"]["unique_holdout"] == unique_of(set(holdout)) > 0
    deployments = report["deployments"]
    assert set(deployments) == {"original", "unlearned", "hard", "hard_sinks_on", "oracle"}
    for group in ("unique_forget", "unique_holdout", "unique_retained"):  # hard (zeroed rows) = mask, exactly
        assert deployments["hard"]["probes"][group]["per_probe"] == deployments["unlearned"]["probes"][group]["per_probe"]
    assert deployments["hard"]["loss"] == deployments["unlearned"]["loss"]
    # the forget set is in force: the unlearned model scores the forgotten articles' facts differently
    original, unlearned = (deployments[d]["probes"]["unique_forget"]["per_probe"]["log_truth_ratio"]
                           for d in ("original", "unlearned"))
    assert original != unlearned
    assert (work / "eval" / "report.md").is_file() and (work / "eval" / "probes.png").is_file()
