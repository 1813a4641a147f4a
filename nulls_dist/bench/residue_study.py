"""The residue study (docs/residue.md): where the membership signal of forgotten SynthWiki articles lives after
NULL unlearning, how it changes with training length and the backbone's share, and mitigations, each measured
against its own retrain oracle.

Every study point is a pair of `nulls-train experiment=unlearn_demo` runs on SynthWiki with 48 holdout articles:
the original and its retrain oracle (`train.exclude_sources` = the forget set: 24 articles, one from each of the
first 24 clusters). One more run, `reference` (the base config, seed 1, without the forget set), is the
difficulty reference of the calibrated attack. Per pair (`measure_pair`):
- membership of the forgotten articles against the holdout ones for the unlearned deployment (routed Sink-Off
  with the forget set in force) and the oracle (routed over its own sources): LOSS, zlib, Min-K%, Min-K%++ AUCs
  with bootstrap intervals and PrivLeak, the reference-calibrated attacks (`ref_*` = score - the reference's),
  and the oracle-calibrated one (score - the oracle's: the strongest, 0.5 for the oracle by construction);
- unique-fact accuracy of the forgotten articles (paired bootstrap against the oracle), shared facts via a
  retained article, related articles' facts; loss on forgotten, retained and holdout text;
- the residue (`evaluation.residue.attribute`): which token classes carry the LOSS and Min-K signal.
The goal of issue 15, per mitigation: Min-K and calibrated (ref_loss) AUC within 0.1 of the oracle's, unique
facts at the oracle's level (the paired interval of the accuracy difference contains 0) and the unlearned
model's retained loss at most 5% above the unmitigated pair's.

Resumable: a run whose `checkpoints/latest` exists is not trained again (its recorded config must match the
pair's overrides), and a pair's measurements are kept in `<workdir>/runs/<name>/eval.json`. Trainings run one at
a time with one torch thread; run the driver under `nice -n 10` on a shared machine. Output (`--out`):
`results.json` and PNG plots (`residue_plots`), each written atomically; stdout: one JSON summary.

    nice -n 10 python -m nulls_dist.bench.residue_study --workdir runs/residue --out docs/residue [--only NAME ...]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

log = logging.getLogger("nulls_dist.bench.residue_study")

EVAL_VERSION = 1
HOLDOUT_COUNT = 48
NUM_FORGET = 24
ARTICLES_PER_CLUSTER = 6  # SynthWiki: article index = 6 * cluster + entity type
ID_OFFSET = 49152
RETAINED_LOSS_TOLERANCE = 1.05  # the goal: retained loss at most 5% above the unmitigated pair's
AUC_TOLERANCE = 0.1
CALIBRATED_ATTACK = "ref_loss"  # the goal's calibrated attack (offline LiRA's ranking with one OUT reference)
BASE = "s500_pgen32"
SHARED_KINDS = ("embedding", "attention", "backbone", "norm", "lm_head")  # every kind but the sinks


@dataclass(frozen=True)
class Pair:
    """One study point: an (original, oracle) pair of runs with these training overrides."""

    name: str
    group: str  # "length" | "backbone" | "mitigation"
    label: str
    overrides: tuple[str, ...]
    baseline: str = BASE  # the unmitigated pair whose retained loss a mitigation is held to


PAIRS = (
    Pair("s250_pgen32", "length", "250 steps", ("train.max_steps=250",), "s250_pgen32"),
    Pair(BASE, "length", "500 steps, p_gen 1/32 (the demo's)", ("train.max_steps=500",)),
    Pair("s1000_pgen32", "length", "1000 steps", ("train.max_steps=1000",), "s1000_pgen32"),
    Pair("s500_pgen64", "backbone", "p_gen 1/64 (64 backbone units)",
         ("train.max_steps=500", "model.overrides.p_gen=0.015625"), "s500_pgen64"),
    Pair("s500_pgen8", "backbone", "p_gen 1/8 (512 backbone units)",
         ("train.max_steps=500", "model.overrides.p_gen=0.125"), "s500_pgen8"),
    Pair("freeze1", "mitigation", "rare-token rows frozen (tokens of <= 1 source)",
         ("train.max_steps=500", "optim.freeze_rare_tokens=1")),
    Pair("slow_shared", "mitigation", "shared parameters at 0.1x lr (sinks at 1x)",
         ("train.max_steps=500", *(f"optim.lr_scale.{k}=0.1" for k in SHARED_KINDS))),
    Pair("freeze1_slow", "mitigation", "both: frozen rare-token rows and shared parameters at 0.1x lr",
         ("train.max_steps=500", "optim.freeze_rare_tokens=1", *(f"optim.lr_scale.{k}=0.1" for k in SHARED_KINDS))),
)
REFERENCE_OVERRIDES = ("train.max_steps=500", "train.seed=1")


# ------------------------------------------------------------------------------------------------ training
def forget_set(holdout: set[int], num_sources: int) -> list[int]:
    """One article from each of the first NUM_FORGET clusters, cycling through the entity types (as the demo's
    DEFAULT_FORGET) and taking the next type of the cluster when that article is held out."""
    out = []
    for cluster in range(NUM_FORGET):
        for shift in range(ARTICLES_PER_CLUSTER):
            sid = ID_OFFSET + ARTICLES_PER_CLUSTER * cluster + (cluster + shift) % ARTICLES_PER_CLUSTER
            if sid not in holdout and sid < ID_OFFSET + num_sources:
                out.append(sid)
                break
    return out


def _tool(module: str, args: list[str], log_path: Path | None = None) -> None:
    cmd = [sys.executable, "-c", f"from {module} import main; main()", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log_path or os.devnull, "w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed with exit code {proc.returncode}"
                           + (f"; see {log_path}" if log_path else ""))


def _config_value(config: dict, dotted: str) -> Any:
    node: Any = config
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def check_recorded(run_dir: Path, overrides: tuple[str, ...], excluded: list[int]) -> None:
    """A trained run must be the one the study asks for: every override's value and the excluded sources as
    recorded in its newest checkpoint's meta; RuntimeError naming the first difference."""
    from nulls_dist.deploy.checkpoint_io import training_tag_dir
    from nulls_dist.formats.checkpoint import read_meta

    meta = read_meta(training_tag_dir(run_dir))
    for item in overrides:
        key, value = item.split("=", 1)
        recorded = _config_value(meta.get("config", {}), key)
        if recorded != yaml.safe_load(value):
            raise RuntimeError(f"{run_dir}: trained with {key}={recorded!r}, the study asks for {value}; move the run "
                               "away or use another --workdir")
    if sorted(int(s) for s in meta.get("exclude_sources", [])) != sorted(excluded):
        raise RuntimeError(f"{run_dir}: trained without sources {meta.get('exclude_sources')}, the study asks for "
                           f"{sorted(excluded)}")


def merged(overrides: tuple[str, ...], extra: list[str]) -> tuple[str, ...]:
    """A pair's overrides with `--train-override`s applied: a key given in both takes the extra value."""
    values = dict(item.split("=", 1) for item in overrides)
    for item in extra:
        if "=" not in item:
            raise SystemExit(f"residue_study: --train-override {item!r} is not KEY=VALUE")
        key, value = item.split("=", 1)
        values[key] = value
    return tuple(f"{k}={v}" for k, v in values.items())


def train_run(work: Path, run_dir: Path, overrides: tuple[str, ...], excluded: list[int]) -> None:
    """Train one run unless its checkpoint exists (then check it is this run)."""
    if (run_dir / "checkpoints" / "latest").is_file():
        check_recorded(run_dir, overrides, excluded)
        return
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    args = ["experiment=unlearn_demo", "logging.wandb_mode=disabled", f"train.run_dir={run_dir}",
            f"data.output_dir={work / 'data' / 'synthwiki_h48'}", f"data.holdout.count={HOLDOUT_COUNT}", *overrides]
    if excluded:
        args.append(f"train.exclude_sources=[{','.join(map(str, excluded))}]")
    log.info("training %s (log: %s.log)", run_dir.relative_to(work), run_dir)
    start = time.perf_counter()
    _tool("nulls_dist.cli.train", args, run_dir.with_suffix(".log"))
    log.info("trained %s in %.0f s", run_dir.relative_to(work), time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------ measuring
def _entry(value: Any) -> Any:
    """JSON-ready values: numpy scalars become Python numbers, tuples lists."""
    if isinstance(value, dict):
        return {str(k): _entry(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_entry(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def fingerprint(work: Path, pair_dir: Path) -> dict[str, str]:
    """sha256 of the newest checkpoint meta of the pair's runs and of the reference: a cached measurement is
    reused only while it describes these checkpoints."""
    from nulls_dist.deploy.checkpoint_io import training_tag_dir
    from nulls_dist.formats.checkpoint import META_NAME
    from nulls_dist.formats.digests import file_sha256

    runs = {"original": pair_dir / "original", "oracle": pair_dir / "oracle",
            "reference": work / "runs" / "reference" / "oracle"}
    return {role: file_sha256(training_tag_dir(run) / META_NAME) for role, run in runs.items()}


def measure_pair(ctx, pair_dir: Path) -> dict:
    """Every measurement of one (original, oracle) pair (module docstring)."""
    import torch

    from nulls_dist.deploy.checkpoint_io import build_model, load_checkpoint
    from nulls_dist.evaluation import membership as MI
    from nulls_dist.evaluation import metrics as M
    from nulls_dist.evaluation import residue as R
    from nulls_dist.evaluation.evaluate import eval_probes, gold_deployment, routed_deployment
    from nulls_dist.model import SinkMode

    torch.set_num_threads(1)
    original_ckpt, oracle_ckpt = load_checkpoint(pair_dir / "original"), load_checkpoint(pair_dir / "oracle")
    original = build_model(original_ckpt)
    unlearned = build_model(original_ckpt)
    unlearned.enforce_forget_set(ctx.forget)  # the mask: no mode can reach a forgotten sink
    deps = {"original": gold_deployment("original", original, set(ctx.trained), ctx.route_oracle),
            "unlearned": routed_deployment("unlearned", unlearned, ctx.index, ctx.embedder, ctx.forget, ctx.titles),
            "oracle": routed_deployment("oracle", build_model(oracle_ckpt), ctx.oracle_index, ctx.embedder, [],
                                        ctx.titles)}
    texts = ctx.forget + ctx.holdout
    stats = {name: {s: MI.token_stats(d.model, ctx.tokens[s], d.mode_for(s)) for s in texts}
             for name, d in deps.items() if name != "original"}
    stats["original"] = {s: MI.token_stats(original, ctx.tokens[s], SinkMode.sink_on(s)) for s in ctx.forget}
    scores = {name: {split: _scores(MI, stats[name], ids, ctx) for split, ids in (("forget", ctx.forget),
                                                                                    ("holdout", ctx.holdout))}
              for name in ("unlearned", "oracle")}
    ref = ctx.reference_scores
    calibrated = {name: {split: MI.reference_calibrated(scores[name][split], ref[split]) for split in ref}
                  for name in scores}
    by_oracle = {split: MI.reference_calibrated(scores["unlearned"][split], scores["oracle"][split])
                 for split in ("forget", "holdout")}
    summary = lambda a, b: MI.membership_summary(a["forget"], a["holdout"], b["forget"], b["holdout"],  # noqa: E731
                                                 num_resamples=1000, roc=False)
    membership = {"plain": summary(scores["unlearned"], scores["oracle"]),
                  "reference_calibrated": summary(calibrated["unlearned"], calibrated["oracle"]),
                  "oracle_calibrated": MI.membership_summary(by_oracle["forget"], by_oracle["holdout"],
                                                             num_resamples=1000, roc=False)}
    probes = {name: eval_probes(d, ctx.probe_groups, ctx.eval_data) for name, d in deps.items()}
    vs_oracle = {name: {g: M.compare_probes(probes[name][g], probes["oracle"][g]) for g in ctx.probe_groups}
                 for name in ("original", "unlearned")}
    loss = {name: {split: float(np.mean([M.text_loss(d.model, ctx.tokens[s], d.mode_for(s)) for s in ids]))
                   for split, ids in (("forget", ctx.forget), ("retained", ctx.retained), ("holdout", ctx.holdout))}
            for name, d in deps.items()}
    lps = {name: {s: st.logprobs for s, st in per.items()} for name, per in stats.items()}
    members = R.text_residues(lps["unlearned"], lps["oracle"], ctx.tokens, ctx.titles, ctx.corpus, ctx.forget,
                              lps["original"])
    non_members = R.text_residues(lps["unlearned"], lps["oracle"], ctx.tokens, ctx.titles, ctx.corpus, ctx.holdout)
    for groups in probes.values():
        for group in groups.values():
            group.pop("per_probe")
    first = members[0]  # one forgotten article, token by token, for the picture
    example = {"source_id": first.source_id, "title": ctx.titles[first.source_id],
               "pieces": [ctx.corpus.pieces[int(t)] for t in ctx.tokens[first.source_id][1:]],
               "gap": np.round(first.lp_model - first.lp_reference, 3).tolist(), "name": first.classes["name"].tolist()}
    meta = oracle_ckpt.meta
    return _entry({"version": EVAL_VERSION, "checkpoints": {"original": str(original_ckpt.path),
                                                            "oracle": str(oracle_ckpt.path),
                                                            "reference": ctx.reference_path},
                   "frozen_token_ids": {"original": len(original_ckpt.meta.get("frozen_token_ids", [])),
                                        "oracle": len(meta.get("frozen_token_ids", []))},
                   "membership": membership, "probes": probes, "probes_vs_oracle": vs_oracle, "loss": loss,
                   "residue": R.attribute(members, non_members), "example": example})


def _scores(MI, stats: dict, ids: list[int], ctx) -> dict[str, np.ndarray]:
    rows = [MI.text_scores(stats[s], ctx.texts[s]) for s in ids]
    return {name: np.array([r[name] for r in rows]) for name in MI.SCORES}


@dataclass
class StudyContext:
    """What every pair's measurement shares: the sources, their tokens and titles, the routing, the probes, the
    corpus index of the residue's token classes and the calibration reference's scores."""

    forget: list[int]
    holdout: list[int]
    trained: list[int]
    retained: list[int]
    titles: dict[int, str]
    tokens: dict[int, np.ndarray]
    texts: dict[int, str]
    corpus: Any  # residue.CorpusIndex over the retained texts
    embedder: Any
    index: Any  # routing.SourceIndex of every trained source
    oracle_index: Any  # ... of the retained ones
    route_oracle: Any  # source id -> SinkMode, routed over every trained source (the original's holdout mode)
    eval_data: Any
    probe_groups: dict
    reference_scores: dict
    reference_path: str


PROBE_GROUPS = ("unique_forget", "shared_forget_via_retained", "unique_related", "unique_holdout")


def build_context(work: Path, forget: list[int]) -> StudyContext:
    import pyarrow.parquet as pq
    import sentencepiece as spm
    import torch

    from nulls_dist.deploy.checkpoint_io import build_model, load_checkpoint
    from nulls_dist.deploy.routing import SourceIndex, make_embedder
    from nulls_dist.evaluation import membership as MI
    from nulls_dist.evaluation import residue as R
    from nulls_dist.evaluation.evaluate import EvalData, routed_deployment, select_probes
    from nulls_dist.evaluation.source_text import read_source_tokens
    from nulls_dist.formats.dataset import read_manifest
    from nulls_dist.formats.documents import read_jsonl

    torch.set_num_threads(1)
    data_dir = work / "data" / "synthwiki_h48"
    manifest = read_manifest(data_dir)
    registry = pq.read_table(data_dir / "registry.parquet", columns=["source_id", "title", "split"]).to_pylist()
    titles = {int(r["source_id"]): r["title"] for r in registry}
    trained = sorted(int(r["source_id"]) for r in registry if r["split"] == "train")
    holdout = sorted(int(s) for s in manifest["holdout"]["source_ids"])
    retained = sorted(set(trained) - set(forget))
    tokens = read_source_tokens(data_dir, set(trained) | set(holdout))
    sp = spm.SentencePieceProcessor(model_file=str(data_dir / manifest["tokenizer"]["path"]))
    special = [int(manifest["special_ids"][k]) for k in ("bos", "eos", "pad") if manifest["special_ids"].get(k) is not None]
    texts = {s: sp.decode([int(t) for t in tokens[s] if int(t) not in special]) for s in tokens}  # for zlib
    corpus = R.CorpusIndex.build([tokens[s] for s in retained], [sp.id_to_piece(i) for i in range(sp.get_piece_size())],
                                 special)
    reference_ckpt = load_checkpoint(work / "runs" / "reference" / "oracle")
    reference = build_model(reference_ckpt)
    embedder = make_embedder("auto", reference.transformer.wte.weight, sp.encode)
    index = SourceIndex.build(trained, [titles[s] for s in trained], embedder)
    oracle_index = SourceIndex(np.asarray(retained), index.embeddings[np.isin(index.source_ids, retained)])
    probes = read_jsonl(Path(__file__).resolve().parents[2] / "data_pipeline" / "bundled" / "synthwiki" / "probes.jsonl",
                        "probes file")
    related = sorted({int(s) for p in probes if p["kind"] == "shared" and set(forget) & set(p["source_ids"])
                      for s in p["source_ids"]} & set(retained))
    bos = manifest.get("special_ids", {}).get("bos")
    eval_data = EvalData(forget, retained, related, holdout, titles, tokens, probes, sp.encode,
                         int(bos) if bos is not None else None)
    groups = select_probes(eval_data)[0]
    ref_dep = routed_deployment("reference", reference, oracle_index, embedder, [], titles)
    ref_stats = {s: MI.token_stats(reference, tokens[s], ref_dep.mode_for(s)) for s in forget + holdout}
    ctx = StudyContext(forget, holdout, trained, retained, titles, tokens, texts, corpus, embedder, index,
                       oracle_index, routed_deployment("routed", None, index, embedder, [], titles).mode_for,
                       eval_data, {g: groups[g] for g in PROBE_GROUPS}, {}, str(reference_ckpt.path))
    ctx.reference_scores = {split: _scores(MI, ref_stats, ids, ctx) for split, ids in (("forget", forget),
                                                                                       ("holdout", holdout))}
    return ctx


# ------------------------------------------------------------------------------------------------ the goal
def goal(ev: dict, baseline: dict) -> dict:
    """Issue 15's goal for one pair against its own oracle; `baseline` is the unmitigated pair's measurement."""
    min_k = ev["membership"]["plain"]["min_k"]
    calibrated = ev["membership"]["reference_calibrated"][CALIBRATED_ATTACK]
    facts = ev["probes_vs_oracle"]["unlearned"]["unique_forget"]["accuracy_diff"]  # [mean, 2.5%, 97.5%]
    retained, allowed = ev["loss"]["unlearned"]["retained"], baseline["loss"]["unlearned"]["retained"]
    values = {"min_k_auc": [min_k["auc"], min_k["auc_retrain"]],
              "calibrated_auc": [calibrated["auc"], calibrated["auc_retrain"]],
              "unique_fact_accuracy_diff": facts,
              "retained_loss": [retained, allowed * RETAINED_LOSS_TOLERANCE]}
    checks = {"min_k_auc_within_0.1": abs(min_k["auc"] - min_k["auc_retrain"]) <= AUC_TOLERANCE,
              "calibrated_auc_within_0.1": abs(calibrated["auc"] - calibrated["auc_retrain"]) <= AUC_TOLERANCE,
              "unique_facts_at_oracle_level": facts[1] <= 0.0 <= facts[2],
              "retained_loss_within_5pct": retained <= allowed * RETAINED_LOSS_TOLERANCE}
    return {"reached": all(checks.values()), "checks": checks, "values": values}


# ------------------------------------------------------------------------------------------------ main
def prepare_data(work: Path) -> Path:
    data_dir = work / "data" / "synthwiki_h48"
    if not (data_dir / "manifest.json").is_file():
        work.mkdir(parents=True, exist_ok=True)
        log.info("preparing SynthWiki with %d holdout articles in %s", HOLDOUT_COUNT, data_dir)
        _tool("nulls_dist.cli.data", ["stage=all", "data=synthwiki", f"data.output_dir={data_dir}",
                                      f"data.holdout.count={HOLDOUT_COUNT}"], work / "nulls_data.log")
    return data_dir


def main(argv: list[str] | None = None) -> dict:
    from nulls_dist.bench import provenance
    from nulls_dist.bench.residue_plots import write_plots
    from nulls_dist.formats import atomic
    from nulls_dist.formats.dataset import read_manifest
    from nulls_dist.formats.documents import read_json_object

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="runs/residue", help="runs, data and per-pair measurements")
    p.add_argument("--out", default="docs/residue", help="results.json and the plots")
    p.add_argument("--only", nargs="*", default=None, metavar="NAME", help=f"pairs to run (default: all of "
                   f"{[q.name for q in PAIRS]}); the plots and results cover every pair measured so far")
    p.add_argument("--no-train", action="store_true", help="measure only the pairs already trained")
    p.add_argument("--train-override", action="append", default=[], metavar="KEY=VALUE",
                   help="a nulls-train override for every run (repeatable; replaces a pair's own value of KEY)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    work, out = Path(args.workdir).resolve(), Path(args.out).resolve()
    unknown = sorted(set(args.only or ()) - {q.name for q in PAIRS})
    if unknown:
        raise SystemExit(f"residue_study: unknown pair(s) {unknown}; known: {[q.name for q in PAIRS]}")
    data_dir = prepare_data(work)
    manifest = read_manifest(data_dir)
    if int(manifest["id_offset"]) != ID_OFFSET:
        raise SystemExit(f"residue_study: {data_dir}/manifest.json has id_offset {manifest['id_offset']}, the "
                         f"bundled SynthWiki probes use {ID_OFFSET}")
    forget = forget_set(set(manifest["holdout"]["source_ids"]), int(manifest["num_articles"]))
    selected = [q for q in PAIRS if args.only is None or q.name in args.only]
    if not args.no_train:
        train_run(work, work / "runs" / "reference" / "oracle", merged(REFERENCE_OVERRIDES, args.train_override),
                  forget)
        for q in selected:
            for role, excluded in (("original", []), ("oracle", forget)):
                train_run(work, work / "runs" / q.name / role, merged(q.overrides, args.train_override), excluded)
    ctx = None
    measured = {}
    for q in PAIRS:
        pair_dir = work / "runs" / q.name
        cache = pair_dir / "eval.json"
        if not all((pair_dir / r / "checkpoints" / "latest").is_file() for r in ("original", "oracle")):
            continue
        prints = fingerprint(work, pair_dir)
        if cache.is_file():
            cached = read_json_object(cache, "pair measurement")
            if cached.get("version") == EVAL_VERSION and cached.get("fingerprint") == prints:
                measured[q.name] = cached
                continue
        if q not in selected:
            continue
        for role, excluded in (("original", []), ("oracle", forget)):
            check_recorded(pair_dir / role, merged(q.overrides, args.train_override), excluded)
        ctx = ctx or build_context(work, forget)
        log.info("measuring %s", q.name)
        measured[q.name] = {**measure_pair(ctx, pair_dir), "fingerprint": prints}
        atomic.write_json(cache, measured[q.name])
    pairs = {}
    for q in PAIRS:
        if q.name not in measured:
            continue
        entry = {"label": q.label, "group": q.group, "overrides": list(q.overrides), "baseline": q.baseline,
                 **measured[q.name]}
        if q.baseline in measured:
            entry["goal"] = goal(measured[q.name], measured[q.baseline])
        pairs[q.name] = entry
    results = {"benchmark": "residue_study", "machine": provenance.machine(),
               "versions": provenance.versions("torch", "deepspeed", "numpy", "sentencepiece"), **provenance.commit(),
               "forget_ids": forget, "holdout_ids": sorted(manifest["holdout"]["source_ids"]),
               "calibrated_attack": CALIBRATED_ATTACK, "reference_overrides": list(REFERENCE_OVERRIDES),
               "train_overrides": args.train_override,
               "pairs": pairs}
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out / "results.json", results)
    results["plots"] = write_plots(results, out)
    summary = {name: {"min_k_auc": r["membership"]["plain"]["min_k"]["auc"],
                      "min_k_auc_oracle": r["membership"]["plain"]["min_k"]["auc_retrain"],
                      "calibrated_auc": r["membership"]["reference_calibrated"][CALIBRATED_ATTACK]["auc"],
                      "calibrated_auc_oracle": r["membership"]["reference_calibrated"][CALIBRATED_ATTACK]["auc_retrain"],
                      "unique_acc": r["probes"]["unlearned"]["unique_forget"]["accuracy"],
                      "unique_acc_oracle": r["probes"]["oracle"]["unique_forget"]["accuracy"],
                      "retained_loss": r["loss"]["unlearned"]["retained"],
                      "goal_reached": r.get("goal", {}).get("reached")} for name, r in pairs.items()}
    print(json.dumps({"results": str(out / "results.json"), "plots": results["plots"], "pairs": summary}, indent=2))
    return results


if __name__ == "__main__":
    main()
