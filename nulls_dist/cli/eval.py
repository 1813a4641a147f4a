"""`nulls-eval`: the unlearning audit of a model + forget set, against a retrain oracle, optionally a
hard-unlearned checkpoint and a separately trained reference model, with post-hoc GA / NPO baselines it runs
itself: probes, losses, extraction, membership inference, worst-case routing, the quantization attack,
relearning, and -- when the forget set holds several requests -- every metric after each request.

    nulls-eval --checkpoint runs/demo --manifest runs/demo/manifest --forget-set forget.json \
        --oracle runs/oracle --data data/synthwiki --probes data_pipeline/bundled/synthwiki/probes.jsonl \
        --out runs/eval [--hard deployed/] [--reference runs/reference] [--stage-oracles ORACLE_1 ORACLE_2] \
        [--compare-before runs/demo --compare-after deployed/] [--no-residue]

Extra report sections (`evaluation/report.ReportSection`): the two-checkpoint comparison (`--compare-before` /
`--compare-after`: what an attacker holding both learns, `evaluation/checkpoint_diff.py`) and the residue
attribution (`--residue`, on by default with an oracle: which tokens carry the membership signal,
`evaluation/residue_audit.py`).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from nulls_dist.cli.errors import keep_stdout_for_output, report_errors
from nulls_dist.deploy.checkpoint_io import build_model, load_checkpoint, training_tag_dir
from nulls_dist.formats import checkpoint as layout
from nulls_dist.evaluation.evaluate import (
    PROBE_GROUPS, EvalConfig, EvalData, MembershipConfig, baseline_deployments, gold_deployment, routed_deployment,
    run_evaluation,
)
from nulls_dist.audit.manifest import check_manifest_belongs, iter_manifest, manifest_digest
from nulls_dist.deploy.forget import apply_forget_set
from nulls_dist.evaluation.posthoc import FinetuneConfig
from nulls_dist.evaluation.relearning import CONDITIONS, RelearnConfig
from nulls_dist.evaluation import checkpoint_diff, residue_audit
from nulls_dist.evaluation.checkpoint_diff import compare_checkpoints
from nulls_dist.evaluation.report import write_report
from nulls_dist.evaluation.residue import CorpusIndex
from nulls_dist.evaluation.successive import stage_summary, stages, survivor_capacity
from nulls_dist.deploy.routing import SourceIndex, make_embedder
from nulls_dist.evaluation.source_text import read_source_tokens
from nulls_dist.formats.dataset import MANIFEST_NAME, read_manifest
from nulls_dist.formats.documents import read_jsonl
from nulls_dist.formats.forget_set import load_forget_set

log = logging.getLogger("nulls_dist.evaluation")


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nulls-eval", description="Audit unlearning (JSON + markdown + PNG)")
    p.add_argument("--checkpoint", required=True, help="the trained (original) checkpoint")
    p.add_argument("--manifest", required=True, help="its manifest directory")
    p.add_argument("--forget-set", required=True, help="the forget set; each request in its history is a stage")
    p.add_argument("--oracle", default=None, help="checkpoint of a run trained with exclude_sources = the forget set")
    p.add_argument("--stage-oracles", nargs="*", default=[], metavar="CKPT",
                   help="oracles of the earlier requests, oldest first (default: --oracle for every stage)")
    p.add_argument("--no-successive", action="store_true", help="audit the final forget set only")
    p.add_argument("--hard", default=None, help="a hard-unlearned deployed checkpoint to evaluate too")
    p.add_argument("--reference", default=None,
                   help="a separately trained reference model (same dataset; saw neither the forgotten nor the "
                        "holdout sources) for reference-calibrated membership inference")
    p.add_argument("--data", required=True, help="dataset directory (manifest.json, shard-*.tar, holdout/)")
    p.add_argument("--probes", default=None, help="SynthWiki probes.jsonl (source ids must match the data)")
    p.add_argument("--tokenizer", default=None, help="sentencepiece .model (default: the data manifest's)")
    p.add_argument("--out", required=True)
    p.add_argument("--embedder", default="auto", choices=["auto", "minilm", "model"])
    p.add_argument("--steps", type=int, default=20, help="GA / NPO fine-tuning steps")
    p.add_argument("--lr", type=float, default=1e-3, help="GA / NPO learning rate")
    p.add_argument("--baselines", default="ga,npo", help="comma list of ga,npo (empty: none)")
    p.add_argument("--relearn-steps", type=int, default=64, help="relearning attack: fine-tuning steps (0: none)")
    p.add_argument("--relearn-lr", type=float, default=1e-3, help="relearning attack: AdamW learning rate")
    p.add_argument("--relearn-sources", type=int, default=8, help="relearning attack: forgotten articles attacked")
    p.add_argument("--relearn-conditions", default=",".join(CONDITIONS))
    p.add_argument("--relearn-deployments", default="unlearned,oracle,ga,npo")
    p.add_argument("--quantize", default="8,4", help="bit widths of the quantization attack (empty: none)")
    p.add_argument("--quant-group-size", type=int, default=32, help="columns per scale group (0: per channel)")
    p.add_argument("--quantize-deployments", default="unlearned,oracle,ga,npo")
    p.add_argument("--worst-case-groups", default="unique_forget",
                   help=f"probe groups of the worst-case routing attack (empty: none), of {PROBE_GROUPS}")
    p.add_argument("--worst-case-deployments", default="unlearned,oracle")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the membership intervals")
    p.add_argument("--max-retained", type=int, default=32)
    p.add_argument("--max-holdout", type=int, default=256)
    p.add_argument("--compare-before", default=None, metavar="CKPT",
                   help="the two-checkpoint comparison (with --compare-after): the checkpoint before unlearning, e.g. "
                        "the original or a training tag before `nulls-unlearn purge`")
    p.add_argument("--compare-after", default=None, metavar="CKPT",
                   help="... and after it, e.g. the hard-unlearned deployment or the purged tag; the report states "
                        "what an attacker holding both learns (this evaluation's manifest, forget set and probes)")
    p.add_argument("--residue", action=argparse.BooleanOptionalAction, default=None,
                   help="the residue attribution: which token classes carry the LOSS / Min-K%% gap between the "
                        "unlearned deployment and the oracle (default: on when --oracle is given)")
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


@dataclass(frozen=True)
class DatasetTokenizer:
    """The sentencepiece model a prepared dataset names, with the ids its manifest records."""

    processor: object  # sentencepiece.SentencePieceProcessor
    bos_id: int | None
    special_ids: tuple[int, ...]  # bos / eos / pad / unk: pieces that are words of their own

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.processor.decode(ids)

    def pieces(self) -> list[str]:
        return [self.processor.id_to_piece(i) for i in range(self.processor.get_piece_size())]


def dataset_tokenizer(data_dir: Path, override: str | None) -> DatasetTokenizer:
    """The tokenizer of `data_dir`'s manifest (or `override`); ValueError naming the file when there is none."""
    import sentencepiece as spm

    doc = read_manifest(data_dir)
    if not override and not isinstance((doc.get("tokenizer") or {}).get("path"), str):
        raise ValueError(f"{data_dir / MANIFEST_NAME}: no `tokenizer.path`; pass --tokenizer")
    path = Path(override or doc["tokenizer"]["path"])
    path = path if path.is_absolute() or override else data_dir / path  # the manifest's path is relative to it
    if not path.is_file():
        raise ValueError(f"tokenizer model not found: {path}")
    sp = spm.SentencePieceProcessor(model_file=str(path))
    recorded = doc.get("special_ids") or {}
    bos = recorded.get("bos", sp.bos_id())
    special = {v for v in recorded.values() if isinstance(v, int) and v >= 0}
    special |= {i for i in (sp.bos_id(), sp.eos_id(), sp.pad_id(), sp.unk_id()) if i >= 0}
    return DatasetTokenizer(sp, int(bos) if bos is not None and bos >= 0 else None, tuple(sorted(special)))


def _related(probes: list[dict], forget: set[int], trained: set[int]) -> list[int]:
    rel = {int(s) for p in probes if p["kind"] == "shared" and forget & set(p["source_ids"])
           for s in p["source_ids"]}
    return sorted((rel - forget) & trained)


def _meta(path: str) -> dict:
    """A checkpoint's nulls_meta.json, read before any weights are loaded (bad input is reported first)."""
    p = Path(path)
    return layout.read_meta(p if layout.is_deployed(p) else training_tag_dir(p))


def _trained_without(meta: dict, path: str, flag: str, table, trained: set[int], forget: list[int],
                     data_sha: str | None) -> list[int]:
    """The trained sources of an oracle / reference run from its meta; ValueError naming it when it saw a
    forgotten source or was trained on another dataset."""
    if data_sha is not None and meta.get("data_manifest_sha256") not in (None, data_sha):
        raise ValueError(f"{flag} {path} was trained on another dataset (data_manifest_sha256 "
                         f"{str(meta.get('data_manifest_sha256'))[:16]}...), not this checkpoint's")
    items = {str(x) for x in meta.get("exclude_sources", [])}  # ids or titles, as train.exclude_sources takes them
    excluded = {s for s, (title, _, _) in table.items() if str(s) in items or title in items}
    missing = sorted(set(forget) - excluded)
    if missing:
        raise ValueError(f"{flag} {path} trained on forgotten source(s) {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}: it must exclude the whole forget set "
                         "(train.exclude_sources)")
    return sorted(trained - excluded)


def _routed_over(name, model, index: SourceIndex, own: list[int], embedder, titles, forget=()):
    sub = SourceIndex(np.asarray(own), index.embeddings[np.isin(index.source_ids, own)])
    return routed_deployment(name, model, sub, embedder, forget, titles)


def _config(args) -> EvalConfig:
    relearn = None
    if args.relearn_steps > 0:
        relearn = RelearnConfig(steps=args.relearn_steps, lr=args.relearn_lr, num_sources=args.relearn_sources,
                                conditions=_csv(args.relearn_conditions),
                                eval_at=tuple(s for s in RelearnConfig().eval_at if s <= args.relearn_steps))
    groups = _csv(args.worst_case_groups)
    bad = [g for g in groups if g not in PROBE_GROUPS]
    if bad:
        raise ValueError(f"--worst-case-groups: unknown group(s) {bad}; choose from {PROBE_GROUPS}")
    bits = tuple(int(b) for b in _csv(args.quantize))
    return EvalConfig(finetune=FinetuneConfig(steps=args.steps, lr=args.lr), max_retained=args.max_retained,
                      baselines=_csv(args.baselines), membership=MembershipConfig(num_resamples=args.bootstrap),
                      worst_case_groups=groups, worst_case_deployments=_csv(args.worst_case_deployments),
                      quantize_bits=bits, quantize_group_size=args.quant_group_size or None,
                      quantize_deployments=_csv(args.quantize_deployments), relearn=relearn,
                      relearn_deployments=_csv(args.relearn_deployments))


def run(args) -> dict:
    data_dir = Path(args.data)
    table = _manifest_table(args.manifest)
    doc = load_forget_set(args.forget_set)
    requests = stages(doc)
    forget = [int(s) for s in doc["source_ids"]]
    if len(args.stage_oracles) not in (0, len(requests) - 1):
        raise ValueError(f"--stage-oracles: give {len(requests) - 1} checkpoint(s), one per request before the last "
                         f"({args.forget_set} holds {len(requests)} requests), or none")
    trained = {s for s, (_, t, _) in table.items() if t}
    compare = _comparison_paths(args)
    residue = args.oracle is not None if args.residue is None else args.residue
    if residue and not args.oracle:
        raise ValueError("--residue needs --oracle: the residue is the unlearned deployment's gap to the oracle")
    # every oracle / reference must have left the forget set out: checked from the metas before loading weights
    data_sha = _meta(args.checkpoint).get("data_manifest_sha256")
    own = {}
    for flag, path, ids in ([("--oracle", args.oracle, forget)] if args.oracle else []) \
            + ([("--reference", args.reference, forget)] if args.reference else []) \
            + [("--stage-oracles", p, st["source_ids"]) for p, st in zip(args.stage_oracles, requests)]:
        own[path, tuple(ids)] = _trained_without(_meta(path), path, flag, table, trained, ids, data_sha)
    holdout = sorted(s for s, (_, _, split) in table.items() if split == "holdout")[: args.max_holdout]
    probes = read_jsonl(args.probes, "probes file") if args.probes else []
    retained = sorted(trained - set(forget))  # retained at every request: what every stage's oracle trained on
    tokenizer = dataset_tokenizer(data_dir, args.tokenizer)
    encode, decode, bos = tokenizer.encode, tokenizer.decode, tokenizer.bos_id
    successive = [] if args.no_successive else requests[:-1]
    related_all = set(_related(probes, set(forget), trained))
    for st in successive:
        related_all |= set(_related(probes, set(st["source_ids"]), trained))
    # the residue's token classes count the retained texts (the oracle's training set): all of them are read
    wanted_retained = retained if residue else retained[: args.max_retained]
    tokens = read_source_tokens(data_dir, set(forget) | related_all | set(wanted_retained) | set(holdout))
    titles = {s: v[0] for s, v in table.items()}

    def data_for(ids: list[int]) -> EvalData:
        return EvalData(forget_ids=ids, retained_ids=retained, related_ids=_related(probes, set(ids), trained),
                        holdout_ids=holdout, titles=titles, tokens=tokens, probes=probes, encode=encode,
                        bos_id=bos, decode=decode)

    original_ckpt = load_checkpoint(args.checkpoint)
    check_manifest_belongs(args.manifest, original_ckpt)
    original = build_model(original_ckpt)
    # the unlearned deployment is its own model with the forget set in force (checked against this checkpoint
    # and manifest): no mode can reach a forgotten source's sinks; the original keeps them for comparison
    unlearned = build_model(original_ckpt)
    apply_forget_set(unlearned, original_ckpt, args.forget_set, manifest_digest(args.manifest))
    embedder = make_embedder(args.embedder, original.transformer.wte.weight, encode)
    survivors = sorted(trained)
    index = SourceIndex.build(survivors, [titles[s] for s in survivors], embedder)
    route_all = routed_deployment("routed", original, index, embedder, [], titles).mode_for
    orig_dep = gold_deployment("original", original, trained, route_all)
    deployments = [orig_dep, routed_deployment("unlearned", unlearned, index, embedder, forget, titles)]
    if args.hard:
        hard_ckpt = load_checkpoint(args.hard)
        hard = build_model(hard_ckpt)
        apply_forget_set(hard, hard_ckpt, args.forget_set, manifest_digest(args.manifest))
        deployments.append(routed_deployment("hard", hard, index, embedder, forget, titles))
        # what the stored hard weights give someone who re-enables the forgotten sinks (no forget set in force)
        reenabled = gold_deployment("hard_sinks_on", build_model(hard_ckpt), trained, route_all)
        reenabled.parts = ("loss", "probes")
        deployments.append(reenabled)
    oracle_model = None
    if args.oracle:
        oracle_model = build_model(load_checkpoint(args.oracle))
        deployments.append(_routed_over("oracle", oracle_model, index, own[args.oracle, tuple(forget)], embedder,
                                        titles))
    reference = None
    if args.reference:
        reference = _routed_over("reference", build_model(load_checkpoint(args.reference)), index,
                                 own[args.reference, tuple(forget)], embedder, titles)
    cfg = _config(args)
    data = data_for(forget)
    deployments += baseline_deployments(deployments[0], data, cfg)
    cache: dict = {}
    result = run_evaluation(deployments, data, cfg, reference, worst_case_cache=cache)
    stage_cfg = replace(cfg, baselines=(), quantize_bits=(), relearn_deployments=("unlearned", "oracle"))
    stage_results = []
    for i, st in enumerate(successive):
        log.info("request %d of %d: %d forgotten sources", st["request"], len(requests), len(st["source_ids"]))
        model = build_model(original_ckpt)
        model.enforce_forget_set(st["source_ids"])  # a state the forget set's (checked) history went through
        deps = [orig_dep, routed_deployment("unlearned", model, index, embedder, st["source_ids"], titles)]
        if args.stage_oracles:
            path = args.stage_oracles[i]
            deps.append(_routed_over("oracle", build_model(load_checkpoint(path)), index,
                                     own[path, tuple(st["source_ids"])], embedder, titles))
        elif oracle_model is not None:
            deps.append(next(d for d in deployments if d.name == "oracle"))
        res = run_evaluation(deps, data_for(st["source_ids"]), stage_cfg, reference, worst_case_cache=cache)
        stage_results.append((st, res, args.stage_oracles[i] if args.stage_oracles else args.oracle, model))
    stage_results.append((requests[-1], result, args.oracle, unlearned))
    result["successive"] = {
        "oracle_per_stage": bool(args.stage_oracles),
        "stages": [{"request": st["request"], "added": st["added"], "source_ids": st["source_ids"],
                    "forget_set_sha256": st["sha256"], "oracle_checkpoint": oracle,
                    "survivor_capacity": survivor_capacity(model, retained, st["source_ids"]),
                    **stage_summary(res), "detail": None if res is result else _stage_detail(res)}
                   for st, res, oracle, model in stage_results]} if successive else None
    sections = []
    if residue:
        started = time.perf_counter()
        oracle_dep = next(d for d in deployments if d.name == "oracle")
        corpus = CorpusIndex.build([tokens[s] for s in own[args.oracle, tuple(forget)] if s in tokens],
                                   tokenizer.pieces(), tokenizer.special_ids)
        corpus_seconds = time.perf_counter() - started
        res = residue_audit.measure_residue(deployments[1], oracle_dep, orig_dep, data, corpus, cfg.min_k)
        res["seconds_corpus_index"] = corpus_seconds
        sections.append(residue_audit.report_section(res))
    if compare:
        started = time.perf_counter()
        log.info("comparing %s with %s", *compare)
        diff = compare_checkpoints(load_checkpoint(compare[0]), load_checkpoint(compare[1]), args.manifest,
                                   forget_ids=forget, probes=probes or None, encode=encode, bos_id=bos)
        diff["seconds"] = time.perf_counter() - started
        sections.append(checkpoint_diff.report_section(diff))
    result["embedder"] = embedder.name
    result["checkpoint"] = str(original_ckpt.path)
    result["oracle"] = args.oracle
    result["files"] = write_report(result, args.out, sections)
    return result


def _comparison_paths(args) -> tuple[str, str] | None:
    """(before, after) of the two-checkpoint comparison, both given or neither; their metas are read now, so a bad
    path is reported before any weights are loaded."""
    given = {"--compare-before": args.compare_before, "--compare-after": args.compare_after}
    if not any(given.values()):
        return None
    missing = [flag for flag, path in given.items() if not path]
    if missing:
        raise ValueError(f"{missing[0]} is missing: the two-checkpoint comparison needs --compare-before and "
                         "--compare-after")
    for flag, path in given.items():
        if not Path(path).exists():
            raise ValueError(f"{flag} {path}: no such checkpoint")
        _meta(path)
    return args.compare_before, args.compare_after


def _stage_detail(res: dict) -> dict:
    """What a stage's audit keeps in report.json besides its summary (every metric, without per-fact lists)."""
    out = {k: res[k] for k in ("forget_ids", "related_ids", "num_probes", "deployments", "relearning", "seconds")}
    wc = res.get("worst_case")
    if wc:
        out["worst_case"] = {"groups": wc["groups"], "deployments": {
            n: {"groups": {g: {"summary": v["summary"]} for g, v in d["groups"].items()},
                "num_routes": d["num_routes"], "seconds": d["seconds"], **({"vs_oracle": d["vs_oracle"]}
                                                                           if "vs_oracle" in d else {})}
            for n, d in wc["deployments"].items()}}
    return out


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
