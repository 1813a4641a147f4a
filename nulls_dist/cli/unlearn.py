"""`nulls-unlearn`: forget sources (mask or hard) and write the certificate; `nulls-unlearn purge` rewrites every
artifact of a run that holds the forgotten rows (training checkpoints with their optimizer state, deployed
checkpoints, exports) and certifies it; `nulls-unlearn verify` checks a deployment (or, for a purge certificate,
every artifact) against a certificate; `nulls-unlearn diff` compares two checkpoints and measures what an
attacker holding both learns. Exit codes: 0 ok, 1 verification failed, 2 bad input (nothing written). A request
after which the survivors keep on average less than `--warn-retained-share` of their sinks (the certificate's
`survivors_retained_share`) logs one warning line; it is written all the same.

    nulls-unlearn --checkpoint runs/demo --manifest runs/demo/manifest --method mask \
        --forget-set forget.json --certificate cert-1.json 49160 "Zukquy" --file more.txt
    nulls-unlearn --method hard --output deployed/ ...
    nulls-unlearn verify --certificate cert-1.json --checkpoint runs/demo --forget-set forget.json
    nulls-unlearn purge --run runs/demo --manifest runs/demo/manifest --forget-set forget.json \
        --certificate purge-1.json [deployed/ export.safetensors ...] [--remove] [--remove-unrewritable]
    nulls-unlearn verify --certificate purge-1.json --forget-set forget.json [--manifest runs/demo/manifest]
    nulls-unlearn diff --before before_tag/ --after after_tag/ --manifest runs/demo/manifest \
        [--forget-set forget.json] [--probes probes.jsonl --data data/synthwiki] [--out diff/]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from nulls_dist.audit.collateral import sidecar_path
from nulls_dist.forget_budget import LOW_KEY
from nulls_dist.audit.purge import PURGE_CERTIFICATE_FORMAT, purge
from nulls_dist.audit.purge_verify import load_purge_certificate, verify_purge
from nulls_dist.audit.unlearn import METHODS, parse_requests, read_signing_key, unlearn
from nulls_dist.formats.forget_set import load_forget_set
from nulls_dist.audit.verify import load_certificate, verify
from nulls_dist.cli.errors import keep_stdout_for_output, report_errors
from nulls_dist.deploy.checkpoint_io import load_checkpoint
from nulls_dist.formats.documents import read_json_object

log = logging.getLogger("nulls_dist.unlearn")
# Survivors keeping less than this share of their sinks on average trigger the warning: 0.9 is ~F k / R = 0.1,
# reached after ~8 forgets in the paper's pool (k ~100 of 7,692 rows) and ~1,100 at 2^20 rows.
DEFAULT_WARN_RETAINED_SHARE = 0.9


def _forget_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nulls-unlearn", description="Unlearn sources; write forget set + certificate")
    p.add_argument("sources", nargs="*", help="source ids or titles (id:N / title:T force the kind)")
    p.add_argument("--file", help="a file of source ids or titles, one per line")
    p.add_argument("--checkpoint", required=True, help="training run/checkpoint dir or deployed dir")
    p.add_argument("--tag", default=None)
    p.add_argument("--manifest", required=True, help="the checkpoint's manifest directory (nulls-manifest)")
    p.add_argument("--method", choices=METHODS, default="mask")
    p.add_argument("--forget-set", required=True, help="forget-set JSON (created, or extended when it exists)")
    p.add_argument("--certificate", required=True, help="where the certificate JSON goes")
    p.add_argument("--output", default=None, help="hard: directory of the new deployed checkpoint")
    p.add_argument("--signing-key", default=None,
                   help="a key file: sign the certificate (HMAC-SHA256); verify with the same key")
    p.add_argument("--warn-retained-share", type=float, default=DEFAULT_WARN_RETAINED_SHARE,
                   help="warn when the survivors keep on average less than this share of their sinks "
                        f"(default {DEFAULT_WARN_RETAINED_SHARE}; 0 never warns)")
    return p


def warn_retained_share(cert: dict, threshold: float) -> str | None:
    """The one warning line when the survivors' mean retained share is below `threshold` (None otherwise)."""
    kept = cert["survivors_retained_share"]
    if kept["mean"] is None or kept["mean"] >= threshold:
        return None
    how = "all" if kept["method"] == "exact" else f"a sample of {kept['sample_size']}"
    return (f"forget budget: after {kept['num_forgotten']} forgotten sources the {kept['num_survivors']} survivors "
            f"keep on average {kept['mean']:.3f} of their sinks (worst {kept['min']:.3f}, source "
            f"{kept['min_source_id']}; {how} counted), below --warn-retained-share {threshold:g}: every further "
            "forget costs them more (docs/forget_budget.md)")


def _verify_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nulls-unlearn verify", description="Verify a deployment against a certificate")
    p.add_argument("--certificate", required=True)
    p.add_argument("--checkpoint", default=None,
                   help="the deployed checkpoint (hard: the certified output); not for purge certificates")
    p.add_argument("--tag", default=None)
    p.add_argument("--forget-set", required=True)
    p.add_argument("--manifest", default=None,
                   help="also recompute titles, tokens, sink digests and the collateral from the manifest")
    p.add_argument("--signing-key", default=None, help="the key file the certificate was signed with")
    return p


def _purge_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nulls-unlearn purge",
                                description="Rewrite every artifact of a run holding the forgotten sink rows")
    p.add_argument("artifacts", nargs="*", help="more artifacts: deployed checkpoints, exported weights files or "
                                                "directories of them, checkpoint tags")
    p.add_argument("--run", default=None, help="the training run directory (all its checkpoints directories)")
    p.add_argument("--manifest", required=True, help="the manifest the forget set was made with")
    p.add_argument("--forget-set", required=True, help="the (cumulative) forget set: every source of it is purged")
    p.add_argument("--certificate", required=True, help="where the purge certificate JSON goes (must not exist)")
    p.add_argument("--remove", action="store_true", help="remove every artifact instead of rewriting it")
    p.add_argument("--remove-unrewritable", action="store_true",
                   help="remove what purge cannot rewrite (unknown files, TorchRec sink-table tags, artifacts of "
                        "another dataset) instead of refusing")
    p.add_argument("--signing-key", default=None, help="a key file: sign the certificate (HMAC-SHA256)")
    return p


def _diff_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nulls-unlearn diff",
                                description="Compare two checkpoints: what an attacker holding both learns")
    p.add_argument("--before", required=True, help="checkpoint before unlearning (training run/tag or deployed)")
    p.add_argument("--after", required=True, help="checkpoint after (purged tag, hard deployment, ...)")
    p.add_argument("--manifest", required=True, help="the manifest of the before checkpoint")
    p.add_argument("--forget-set", default=None, help="the forget set: score the attacker against the truth")
    p.add_argument("--probes", default=None, help="SynthWiki-style probes.jsonl: measure restored facts")
    p.add_argument("--data", default=None, help="dataset directory whose manifest names the tokenizer (with --probes)")
    p.add_argument("--tokenizer", default=None, help="sentencepiece model (default: the data manifest's)")
    p.add_argument("--out", default=None, help="directory for diff.json + diff.md (default: JSON on stdout)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads for the probe forward passes")
    return p


def _verify(argv: list[str]) -> None:
    args = _verify_parser().parse_args(argv)
    doc = read_json_object(Path(args.certificate), "a certificate")
    forget_set = load_forget_set(args.forget_set)
    key = read_signing_key(args.signing_key) if args.signing_key else None
    if doc.get("format") == PURGE_CERTIFICATE_FORMAT:
        from nulls_dist.train.checkpoint_rows import DeepSpeedRows

        if args.checkpoint is not None:
            raise ValueError("--checkpoint: a purge certificate lists its artifacts itself; drop --checkpoint")
        report = verify_purge(load_purge_certificate(args.certificate), forget_set, DeepSpeedRows(), args.manifest,
                              Path(args.certificate).parent, signing_key=key)
    else:
        certificate = load_certificate(args.certificate)
        if args.checkpoint is None:
            raise ValueError("--checkpoint is required to verify an unlearning certificate")
        report = verify(certificate, load_checkpoint(args.checkpoint, args.tag), forget_set, args.manifest,
                        Path(args.certificate).parent, signing_key=key)
    print(json.dumps(report, indent=2))
    sys.exit(0 if report["ok"] else 1)


def _purge(argv: list[str]) -> None:
    from nulls_dist.train.checkpoint_rows import DeepSpeedRows

    args = _purge_parser().parse_args(argv)
    load_forget_set(args.forget_set)
    key = read_signing_key(args.signing_key) if args.signing_key else None
    cert = purge(args.run, args.artifacts, args.manifest, args.forget_set, args.certificate, DeepSpeedRows(),
                 remove=args.remove, remove_unrewritable=args.remove_unrewritable, signing_key=key)
    print(json.dumps({"certificate": args.certificate, "mode": cert["mode"],
                      "forget_set_size": len(cert["forget_set"]["source_ids"]),
                      "artifacts": [{"path": a["path"], "kind": a["kind"], "action": a["action"],
                                     "zeroed": a["zeroed"]} for a in cert["artifacts"]],
                      "removed_strays": [r["path"] for r in cert["removed_strays"]],
                      "collateral_sources": cert["collateral"]["num_sources"]}, indent=2))


def _diff(argv: list[str]) -> None:
    import torch

    from nulls_dist.cli.eval import dataset_tokenizer
    from nulls_dist.evaluation.checkpoint_diff import compare_checkpoints, write_diff
    from nulls_dist.formats.documents import read_jsonl

    args = _diff_parser().parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    forget = load_forget_set(args.forget_set) if args.forget_set else None
    probes = encode = bos = None
    if args.probes:
        if not args.data:
            raise ValueError("--probes needs --data (the dataset directory: its manifest names the tokenizer and "
                             "the bos id)")
        probes = read_jsonl(args.probes, "probes file")
        tokenizer = dataset_tokenizer(Path(args.data), args.tokenizer)
        encode, bos = tokenizer.encode, tokenizer.bos_id
    result = compare_checkpoints(load_checkpoint(args.before), load_checkpoint(args.after), args.manifest,
                                 forget_ids=forget["source_ids"] if forget else None, probes=probes, encode=encode,
                                 bos_id=bos)
    if args.out:
        paths = write_diff(result, args.out)
        print(json.dumps({"out": paths, "headline": result["headline"]}, indent=2))
    else:
        print(json.dumps(result, indent=2))


@report_errors("nulls-unlearn")
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    keep_stdout_for_output()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # the user's small files are read first: a bad one is reported before a checkpoint is loaded
    commands = {"verify": _verify, "purge": _purge, "diff": _diff}
    if argv and argv[0] in commands:
        commands[argv[0]](argv[1:])
        return
    args = _forget_parser().parse_args(argv)
    if not 0.0 <= args.warn_retained_share <= 1.0:
        raise ValueError(f"--warn-retained-share must lie in [0, 1], got {args.warn_retained_share}")
    requests = parse_requests(args.sources, args.file)
    if Path(args.forget_set).exists():
        load_forget_set(args.forget_set)
    key = read_signing_key(args.signing_key) if args.signing_key else None
    cert = unlearn(load_checkpoint(args.checkpoint, args.tag), args.manifest, requests, args.method,
                   args.forget_set, args.certificate, args.output, signing_key=key)
    print(json.dumps({"method": cert["method"], "certificate": args.certificate,
                      "sources": [s["source_id"] for s in cert["sources"]],
                      "forget_set_size": len(cert["forget_set"]["source_ids"]),
                      "collateral_sources": cert["collateral"]["num_sources"],
                      "collateral_file": str(sidecar_path(args.certificate)),
                      "output_checkpoint": cert.get("output_checkpoint"),
                      "survivors_retained_share": {k: cert["survivors_retained_share"][k]
                                                   for k in ("method", "num_survivors", "mean", "min", LOW_KEY)}},
                     indent=2))
    warning = warn_retained_share(cert, args.warn_retained_share)
    if warning:
        log.warning(warning)


if __name__ == "__main__":
    main()
