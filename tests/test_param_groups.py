"""The training mitigations of docs/residue.md (nulls_dist/train/param_groups.py):

- every parameter of a NULL has a kind; without `optim.lr_scale` the optimizer sees the two groups it always
  had (decayed matrices, the rest); with scales each (decay, scale) is a group at lr x scale;
- bad `optim.lr_scale` / `optim.freeze_rare_tokens` values are refused naming the field;
- `loader.token_source_counts` equals the document frequencies computed from each source's own tokens
  (`evaluation.source_text`), with and without excluded sources;
- a real `nulls-train` run (DeepSpeed ZeRO-1, SynthWiki) with the backbone at lr scale 0 and the rare-token rows
  frozen: the backbone never moves, the frozen rows only shrink by AdamW's decoupled weight decay (the factor the
  schedule predicts), every other row trains, the meta records the frozen ids, and a run stopped and resumed
  halfway ends bit-identical to the uninterrupted one (the resume re-applies the groups' scales).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nulls_dist.config import PARAMETER_KINDS, NullConfig
from nulls_dist.model import NullTransformer, parameter_kind
from nulls_dist.train.config import train_config_from_dict
from nulls_dist.train.param_groups import param_groups, rare_token_ids
from train_helpers import prepare_synthwiki

REPO = Path(__file__).resolve().parent.parent


def test_every_parameter_has_a_kind():
    cfg = NullConfig.from_preset("debug")
    kinds = [parameter_kind(name) for name, _ in NullTransformer(cfg).named_parameters()]
    counts = {k: kinds.count(k) for k in PARAMETER_KINDS}
    L = cfg.n_layer
    assert counts == {"embedding": 1, "attention": 2 * L, "backbone": 3 * L, "sink": 3 * L, "norm": 2 * L + 1,
                      "lm_head": 1}
    with pytest.raises(ValueError, match="belongs to none"):
        parameter_kind("transformer.h.0.mlp.extra")


def test_param_groups_with_and_without_scales():
    model = NullTransformer(NullConfig.from_preset("debug"))
    named = dict(model.named_parameters())
    plain = param_groups(model, 0.1)
    assert [(g["weight_decay"], g["lr_scale"], "lr" in g) for g in plain] == [(0.1, 1.0, False), (0.0, 1.0, False)]
    assert sum(len(g["params"]) for g in plain) == len(named)
    groups = param_groups(model, 0.1, lr=2e-3, lr_scale={"backbone": 0.1, "sink": 2.0, "norm": 1.0})
    assert [(g["weight_decay"], g["lr_scale"]) for g in groups[:2]] == [(0.1, 1.0), (0.0, 1.0)]
    scaled = {(g["decay"], g["lr_scale"]): g for g in groups[2:]}
    assert set(scaled) == {(True, 0.1), (False, 2.0)}
    assert scaled[True, 0.1]["lr"] == pytest.approx(2e-4) and scaled[False, 2.0]["lr"] == pytest.approx(4e-3)
    ids = lambda kind: {id(p) for n, p in named.items() if parameter_kind(n) == kind}  # noqa: E731
    assert {id(p) for p in scaled[True, 0.1]["params"]} == ids("backbone")
    assert {id(p) for p in scaled[False, 2.0]["params"]} == ids("sink")
    assert ids("norm") <= {id(p) for p in groups[1]["params"]}
    with pytest.raises(ValueError, match="base lr"):
        param_groups(model, 0.1, lr_scale={"backbone": 0.5})


@pytest.mark.parametrize("optim, field", [
    ({"lr_scale": {"mlp": 0.1}}, "optim.lr_scale"),
    ({"lr_scale": {"backbone": -0.1}}, "optim.lr_scale.backbone"),
    ({"lr_scale": {"attention": float("inf")}}, "optim.lr_scale.attention"),
    ({"lr_scale": [0.1]}, "optim.lr_scale"),
    ({"freeze_rare_tokens": -1}, "optim.freeze_rare_tokens"),
    ({"freeze_rare_tokens": True}, "optim.freeze_rare_tokens"),
])
def test_bad_mitigation_config_names_the_field(optim, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        train_config_from_dict({"train": {"max_steps": 4}, "data": {"name": "x"}, "optim": optim})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return prepare_synthwiki(tmp_path_factory.mktemp("synthwiki"))


def test_token_source_counts_are_document_frequencies(data_dir):
    import pyarrow.parquet as pq

    from nulls_dist.data.loader import token_source_counts
    from nulls_dist.evaluation.source_text import read_source_tokens

    registry = pq.read_table(data_dir / "registry.parquet", columns=["source_id", "split"]).to_pylist()
    trained = [int(r["source_id"]) for r in registry if r["split"] == "train"]
    tokens = read_source_tokens(data_dir, trained)
    for exclude in ([], trained[::3]):
        want = np.zeros(2048, dtype=np.int64)
        for sid in set(trained) - set(exclude):
            want[np.unique(tokens[sid])] += 1
        got = token_source_counts(data_dir, exclude, 2048)
        assert np.array_equal(got, want)
    assert got.max() < len(trained) and (got == 1).sum() > 0
    assert rare_token_ids(got, 1).tolist() == np.flatnonzero(got <= 1).tolist()


BASE = ["experiment=demo", "logging.wandb_mode=disabled", "logging.log_every=1", "eval.num_batches=0",
        "optim.warmup_steps=1", "train.cpu_threads=1", "data_loader.prepare_if_missing=false",
        "deepspeed.zero_stage=1", "train.max_steps=6", "checkpoint.every_n_steps=3",
        "optim.lr_scale.backbone=0.0", "optim.lr_scale.attention=0.5", "optim.freeze_rare_tokens=1"]


def _train(data_dir: Path, run_dir: Path, *extra: str) -> None:
    cmd = [sys.executable, "-m", "nulls_dist.cli.train", *BASE, f"data.output_dir={data_dir}",
           f"train.run_dir={run_dir}", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def test_scaled_and_frozen_training_resumes_exactly(data_dir, tmp_path):
    from nulls_dist.data.loader import token_source_counts
    from nulls_dist.formats.weights import load_weights
    from nulls_dist.train.ds_config import WarmupCosine

    whole, halves = tmp_path / "whole", tmp_path / "halves"
    _train(data_dir, whole)
    _train(data_dir, halves, "train.stop_at_step=3")
    _train(data_dir, halves)
    tag = lambda run, step: run / "checkpoints" / f"step_{step:08d}"  # noqa: E731
    a, b = (load_weights(tag(whole, s) / "model.safetensors") for s in (3, 6))
    resumed = load_weights(tag(halves, 6) / "model.safetensors")
    assert all(torch.equal(b[k], resumed[k]) for k in b), "the resumed run differs from the uninterrupted one"
    assert all(torch.equal(a[k], b[k]) for k in a if parameter_kind(k) == "backbone")
    assert any(not torch.equal(a[k], b[k]) for k in a if parameter_kind(k) == "attention")
    meta = json.loads((tag(whole, 6) / "nulls_meta.json").read_text())
    frozen = np.asarray(meta["frozen_token_ids"])
    assert frozen.tolist() == rare_token_ids(token_source_counts(data_dir, [], 2048), 1).tolist()
    schedule, lr, decay = WarmupCosine(1, 6, 0.1), 3e-3, 0.1  # experiment=demo: lr 3e-3 -> 3e-4
    factor = float(np.prod([1 - lr * schedule(s) * decay for s in (3, 4, 5)]))  # optimizer steps 4, 5, 6
    trained = np.setdiff1d(np.arange(2048), frozen)
    for key in ("transformer.wte.weight", "lm_head.weight"):
        assert torch.allclose(b[key][frozen], a[key][frozen] * factor, rtol=1e-6, atol=0)
        moved = (b[key][trained] - a[key][trained] * factor).abs().amax(dim=1)  # (trained rows,)
        assert (moved > 1e-5).float().mean() > 0.1  # the tokens the steps saw moved
