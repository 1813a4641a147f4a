"""`nulls-eval`: the unlearning report for a model + forget set, optionally against a retrain oracle and a
hard-unlearned checkpoint, with post-hoc GA / NPO baselines it runs itself.

    nulls-eval --checkpoint runs/demo --manifest runs/demo/manifest --forget-set forget.json \
        --oracle runs/oracle --data data/synthwiki/shards --probes data_pipeline/bundled/synthwiki/probes.jsonl \
        --out runs/eval
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch

from nulls_dist.cli.errors import keep_stdout_for_output, report_errors
from nulls_dist.deploy.checkpoint_io import build_model, load_checkpoint
from nulls_dist.evaluation.evaluate import (
    EvalConfig, EvalData, baseline_deployments, gold_deployment, routed_deployment, run_evaluation,
)
from nulls_dist.audit.manifest import check_manifest_belongs, iter_manifest, manifest_digest
from nulls_dist.deploy.forget import apply_forget_set
from nulls_dist.evaluation.posthoc import FinetuneConfig
from nulls_dist.evaluation.report import write_report
from nulls_dist.deploy.routing import SourceIndex, make_embedder
from nulls_dist.evaluation.source_text import read_source_tokens
from nulls_dist.formats.dataset import MANIFEST_NAME, read_manifest
from nulls_dist.formats.documents import read_jsonl
from nulls_dist.formats.forget_set import load_forget_set

log = logging.getLogger("nulls_dist.evaluation")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nulls-eval", description="Evaluate unlearning (JSON + markdown + PNG)")
    p.add_argument("--checkpoint", required=True, help="the trained (original) checkpoint")
    p.add_argument("--manifest", required=True, help="its manifest directory")
    p.add_argument("--forget-set", required=True)
    p.add_argument("--oracle", default=None, help="checkpoint of a run trained with exclude_sources = the forget set")
    p.add_argument("--hard", default=None, help="a hard-unlearned deployed checkpoint to evaluate too")
    p.add_argument("--data", required=True, help="dataset directory (manifest.json, shard-*.tar, holdout/)")
    p.add_argument("--probes", default=None, help="SynthWiki probes.jsonl (source ids must match the data)")
    p.add_argument("--tokenizer", default=None, help="sentencepiece .model (default: the data manifest's)")
    p.add_argument("--out", required=True)
    p.add_argument("--embedder", default="auto", choices=["auto", "minilm", "model"])
    p.add_argument("--steps", type=int, default=20, help="GA / NPO fine-tuning steps")
    p.add_argument("--lr", type=float, default=1e-3, help="GA / NPO learning rate")
    p.add_argument("--relearn-steps", type=int, default=20, help="relearning attack: fine-tuning steps")
    p.add_argument("--relearn-lr", type=float, default=3e-4,
                   help="relearning attack: learning rate (default: about the demo run's final lr)")
    p.add_argument("--baselines", default="ga,npo", help="comma list of ga,npo (empty: none)")
    p.add_argument("--max-retained", type=int, default=32)
    p.add_argument("--max-holdout", type=int, default=64)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; 1 avoids OpenMP spin-waits on a busy small machine)")
    return p


def _manifest_table(manifest_dir) -> dict[int, tuple[str, bool, str]]:
    out = {}
    for batch in iter_manifest(manifest_dir, columns=["source_id", "title", "trained", "split"]):
        for sid, title, trained, split in zip(*(batch.column(c).to_pylist() for c in
                                                ("source_id", "title", "trained", "split"))):
            out[sid] = (title, trained, split)
    return out


def _tokenizer(data_dir: Path, override: str | None):
    import sentencepiece as spm

    doc = read_manifest(data_dir)
    if not override and not isinstance((doc.get("tokenizer") or {}).get("path"), str):
        raise ValueError(f"{data_dir / MANIFEST_NAME}: no `tokenizer.path`; pass --tokenizer")
    path = Path(override or doc["tokenizer"]["path"])
    path = path if path.is_absolute() or override else data_dir / path  # the manifest's path is relative to it
    if not path.is_file():
        raise ValueError(f"tokenizer model not found: {path}")
    sp = spm.SentencePieceProcessor(model_file=str(path))
    bos = doc.get("special_ids", {}).get("bos", sp.bos_id())
    return (lambda text: sp.encode(text)), (int(bos) if bos is not None and bos >= 0 else None)


def _related(probes: list[dict], forget: set[int], trained: set[int]) -> list[int]:
    rel = {int(s) for p in probes if p["kind"] == "shared" and forget & set(p["source_ids"])
           for s in p["source_ids"]}
    return sorted((rel - forget) & trained)


def run(args) -> dict:
    data_dir = Path(args.data)
    table = _manifest_table(args.manifest)
    forget = [int(s) for s in load_forget_set(args.forget_set)["source_ids"]]
    trained = {s for s, (_, t, _) in table.items() if t}
    holdout = sorted(s for s, (_, _, split) in table.items() if split == "holdout")[: args.max_holdout]
    probes = read_jsonl(args.probes, "probes file") if args.probes else []
    related = _related(probes, set(forget), trained)
    retained = sorted(trained - set(forget))
    encode, bos = _tokenizer(data_dir, args.tokenizer)
    wanted = set(forget) | set(related) | set(retained[: args.max_retained]) | set(holdout)
    data = EvalData(forget_ids=forget, retained_ids=retained, related_ids=related, holdout_ids=holdout,
                    titles={s: v[0] for s, v in table.items()}, tokens=read_source_tokens(data_dir, wanted),
                    probes=probes, encode=encode, bos_id=bos)
    original_ckpt = load_checkpoint(args.checkpoint)
    check_manifest_belongs(args.manifest, original_ckpt)
    original = build_model(original_ckpt)
    # the unlearned deployment is its own model with the forget set in force (checked against this checkpoint
    # and manifest): no mode can reach a forgotten source's sinks; the original keeps them for comparison
    unlearned = build_model(original_ckpt)
    apply_forget_set(unlearned, original_ckpt, args.forget_set, manifest_digest(args.manifest))
    embedder = make_embedder(args.embedder, original.transformer.wte.weight, encode)
    survivors = sorted(trained)
    index = SourceIndex.build(survivors, [data.titles[s] for s in survivors], embedder)
    route_all = routed_deployment("routed", original, index, embedder, [], data.titles).mode_for
    deployments = [gold_deployment("original", original, trained, route_all),
                   routed_deployment("unlearned", unlearned, index, embedder, forget, data.titles)]
    if args.hard:
        hard_ckpt = load_checkpoint(args.hard)
        hard = build_model(hard_ckpt)
        apply_forget_set(hard, hard_ckpt, args.forget_set, manifest_digest(args.manifest))
        deployments.append(routed_deployment("hard", hard, index, embedder, forget, data.titles))
    if args.oracle:
        oracle_ckpt = load_checkpoint(args.oracle)
        excluded = {str(x) for x in oracle_ckpt.meta.get("exclude_sources", [])}
        oracle_trained = sorted(s for s in trained if str(s) not in excluded and data.titles[s] not in excluded)
        oracle_index = SourceIndex(np.asarray(oracle_trained), index.embeddings[np.isin(index.source_ids, oracle_trained)])
        deployments.append(routed_deployment("oracle", build_model(oracle_ckpt), oracle_index, embedder, [],
                                             data.titles))
    cfg = EvalConfig(finetune=FinetuneConfig(steps=args.steps, lr=args.lr),
                     relearn_finetune=FinetuneConfig(steps=args.relearn_steps, lr=args.relearn_lr),
                     max_retained=args.max_retained,
                     baselines=tuple(b for b in args.baselines.split(",") if b))
    deployments += baseline_deployments(deployments[0], data, cfg)
    result = run_evaluation(deployments, data, cfg)
    result["embedder"] = embedder.name
    result["checkpoint"] = str(original_ckpt.path)
    result["files"] = write_report(result, args.out)
    return result


@report_errors("nulls-eval")
def main(argv: list[str] | None = None) -> None:
    keep_stdout_for_output()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    result = run(args)
    print(json.dumps({"files": result["files"], "embedder": result["embedder"]}, indent=2))


if __name__ == "__main__":
    main()
