"""`nulls-unlearn`: forget sources (mask or hard) and write the certificate; `nulls-unlearn verify` checks a
deployed checkpoint and forget set against a certificate. Exit codes: 0 ok, 1 verification failed, 2 bad input
(nothing written). A request after which the survivors keep on average less than `--warn-retained-share` of
their sinks (the certificate's `survivors_retained_share`) logs one warning line; it is written all the same.

    nulls-unlearn --checkpoint runs/demo --manifest runs/demo/manifest --method mask \
        --forget-set forget.json --certificate cert-1.json 49160 "Zukquy" --file more.txt
    nulls-unlearn --method hard --output deployed/ ...
    nulls-unlearn verify --certificate cert-1.json --checkpoint runs/demo --forget-set forget.json
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from nulls_dist.audit.collateral import sidecar_path
from nulls_dist.forget_budget import LOW_KEY
from nulls_dist.audit.unlearn import METHODS, parse_requests, read_signing_key, unlearn
from nulls_dist.formats.forget_set import load_forget_set
from nulls_dist.audit.verify import load_certificate, verify
from nulls_dist.cli.errors import keep_stdout_for_output, report_errors
from nulls_dist.deploy.checkpoint_io import load_checkpoint

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
    p.add_argument("--checkpoint", required=True, help="the deployed checkpoint (hard: the certified output)")
    p.add_argument("--tag", default=None)
    p.add_argument("--forget-set", required=True)
    p.add_argument("--manifest", default=None,
                   help="also recompute titles, tokens, sink digests and the collateral from the manifest")
    p.add_argument("--signing-key", default=None, help="the key file the certificate was signed with")
    return p


@report_errors("nulls-unlearn")
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    keep_stdout_for_output()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # the user's small files are read first: a bad one is reported before a checkpoint is loaded
    if argv and argv[0] == "verify":
        args = _verify_parser().parse_args(argv[1:])
        certificate, forget_set = load_certificate(args.certificate), load_forget_set(args.forget_set)
        key = read_signing_key(args.signing_key) if args.signing_key else None
        report = verify(certificate, load_checkpoint(args.checkpoint, args.tag), forget_set, args.manifest,
                        Path(args.certificate).parent, signing_key=key)
        print(json.dumps(report, indent=2))
        sys.exit(0 if report["ok"] else 1)
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
