"""`nulls-generate`: decode from a trained or deployed NULL checkpoint in a deployment mode.

    nulls-generate --checkpoint runs/demo --prompt "Zukquy was founded by" --mode sink_on --source Zukquy
    nulls-generate --checkpoint runs/demo --manifest runs/demo/manifest --forget-set forget.json \
        --mode sink_off --prompt "Zukquy was founded by"          # routed to the nearest surviving source
    nulls-generate ... --mode backbone_only | expected  [--temperature 0.8 --top-p 0.9 --seed 1]
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from nulls_dist.cli.errors import keep_stdout_for_output, report_errors
from nulls_dist.formats.dataset import read_manifest
from nulls_dist.model import SinkMode
from nulls_dist.deploy.checkpoint_io import build_model, load_checkpoint
from nulls_dist.deploy.generate import SamplingConfig, generate
from nulls_dist.audit.manifest import iter_manifest
from nulls_dist.deploy.routing import Router, SourceIndex, make_embedder
from nulls_dist.audit.manifest import check_manifest_belongs, manifest_digest
from nulls_dist.audit.unlearn import resolve_sources
from nulls_dist.deploy.forget import apply_forget_set

MODES = ("sink_on", "sink_off", "backbone_only", "expected")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nulls-generate", description="KV-cache decoding in a deployment mode")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--mode", choices=MODES, default="sink_off")
    p.add_argument("--source", help="sink_on: the source id or title (needs --manifest for titles)")
    p.add_argument("--manifest", help="the checkpoint's manifest (titles, trained sources)")
    p.add_argument("--forget-set", help="sink_off: the forget set (default: empty)")
    p.add_argument("--route-query", help="sink_off: text to route by (default: the prompt)")
    p.add_argument("--embedder", default="auto", choices=["auto", "minilm", "model"])
    p.add_argument("--tokenizer", help="sentencepiece .model (default: the data manifest's tokenizer)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="recompute the prefix every step (reference path)")
    return p


def load_tokenizer(meta: dict, override: str | None):
    """sentencepiece processor and BOS id, from --tokenizer or the data manifest named in the checkpoint meta."""
    import sentencepiece as spm

    bos = None
    if override:
        path = Path(override)
    else:
        manifest = meta.get("data_manifest_path")
        if not manifest or not Path(manifest).is_file():
            raise ValueError("tokenizer: pass --tokenizer (the checkpoint meta names no readable data manifest)")
        doc = read_manifest(manifest)
        if not isinstance((doc.get("tokenizer") or {}).get("path"), str):
            raise ValueError(f"{manifest}: no `tokenizer.path`; pass --tokenizer")
        path = Path(doc["tokenizer"]["path"])
        path = path if path.is_absolute() else Path(manifest).parent / path
        bos = doc.get("special_ids", {}).get("bos")
    if not path.is_file():
        raise ValueError(f"tokenizer model not found: {path}")
    sp = spm.SentencePieceProcessor(model_file=str(path))
    return sp, (bos if bos is not None else (sp.bos_id() if sp.bos_id() >= 0 else None))


def _mode(args, model, sp) -> tuple[SinkMode, dict]:
    info: dict = {}
    if args.mode == "backbone_only":
        return SinkMode.backbone_only(), info
    if args.mode == "expected":
        return SinkMode.expected(), info
    if not args.manifest:
        raise ValueError(f"--manifest is required for mode {args.mode}")
    if args.mode == "sink_on":
        if not args.source:
            raise ValueError("--source is required for mode sink_on")
        (record,) = resolve_sources(args.manifest, [args.source])
        info["source"] = {"source_id": record.source_id, "title": record.title}
        return SinkMode.sink_on(record.source_id), info
    forget = list(model.forgotten)  # the forget set in force (main() applied and checked it)
    ids, titles = [], []
    for batch in iter_manifest(args.manifest, columns=["source_id", "title", "trained"]):
        for sid, title, trained in zip(*(batch.column(c).to_pylist() for c in ("source_id", "title", "trained"))):
            if trained:
                ids.append(sid)
                titles.append(title)
    embedder = make_embedder(args.embedder, model.transformer.wte.weight, lambda t: sp.encode(t))
    router = Router(SourceIndex.build(ids, titles, embedder), embedder, forget)
    mode, routed, sim = router.route(args.route_query or args.prompt)
    info.update(routed_source=routed, similarity=sim, embedder=embedder.name, num_forgotten=len(forget))
    return mode, info


@report_errors("nulls-generate")
def main(argv: list[str] | None = None) -> None:
    keep_stdout_for_output()
    logging.basicConfig(level=logging.WARNING)
    args = _parser().parse_args(argv)
    ckpt = load_checkpoint(args.checkpoint)
    model = build_model(ckpt)
    if args.manifest:
        check_manifest_belongs(args.manifest, ckpt)
    if args.forget_set:  # in force for every mode: a forgotten source's sinks are refused, not just not routed to
        apply_forget_set(model, ckpt, args.forget_set, manifest_digest(args.manifest) if args.manifest else None)
    sp, bos = load_tokenizer(ckpt.meta, args.tokenizer)
    mode, info = _mode(args, model, sp)
    prompt = ([bos] if bos is not None else []) + sp.encode(args.prompt)
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                         seed=args.seed)
    out = generate(model, torch.tensor(prompt), mode, cfg, use_cache=not args.no_cache)
    new = out.tokens[0, len(prompt):].tolist()
    text = sp.decode([t for t in new if t < sp.get_piece_size()])  # padded-vocabulary ids have no piece
    print(json.dumps({"mode": mode.kind, "mode_source": mode.source_id, **info, "prompt": args.prompt,
                      "completion": text, "tokens": new}, indent=2))


if __name__ == "__main__":
    main()
