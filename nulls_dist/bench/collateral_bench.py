"""Benchmark: the exact collateral of an unlearning request over a large manifest (default: 6,407,814 synthetic
sources, debug model, uniform strategy, as in manifest_bench.py). Runs `nulls-unlearn --method mask` for
`--forget` sources end to end (resolution, collateral sidecar, survivors' retained share, certificate) and then
`verify` with the manifest (which recomputes the collateral and the retained share), and prints JSON: seconds
of each, collateral rows, sidecar size, peak RSS, and the retained share's own seconds, as certified (sampled
beyond 2M survivors) and exact over every survivor.

    python nulls_dist/bench/collateral_bench.py --workdir /tmp/collat_bench            # builds it first (~4 min)
    python nulls_dist/bench/collateral_bench.py --workdir /tmp/collat_bench --forget 1  # reuses workdir/manifest
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from nulls_dist.formats.dataset import PAPER_ID_OFFSET
from nulls_dist.bench.manifest_bench import PAPER_NUM_SOURCES, write_synthetic_registry
from nulls_dist.config import NullConfig
from nulls_dist.model import NullTransformer
from nulls_dist.deploy.checkpoint_io import load_checkpoint, save_deployed
from nulls_dist.formats.weights import state_dict_digest
from nulls_dist.audit.collateral import forget_sinks, sidecar_path
from nulls_dist.audit.retained import RetainedShareOptions, survivors_retained_share
from nulls_dist.forget_budget import LOW_KEY
from nulls_dist.audit.manifest import INDEX_NAME, ManifestOptions, build_manifest
from nulls_dist.audit.unlearn import unlearn
from nulls_dist.audit.verify import verify_paths


def build(workdir: Path, num_sources: int, strategy: str) -> float:
    """Registry, a deployed debug checkpoint and its manifest in `workdir`; returns the manifest seconds."""
    torch.manual_seed(0)
    cfg = NullConfig.from_preset("debug", sink_strategy=strategy)
    state = NullTransformer(cfg).state_dict()
    write_synthetic_registry(workdir / "registry.parquet", num_sources, PAPER_ID_OFFSET)
    save_deployed(workdir / "ckpt", state, {"model_config": dataclasses.asdict(cfg)})
    t0 = time.perf_counter()
    build_manifest(workdir / "manifest", state_dict=state, model_cfg=cfg, registry_path=workdir / "registry.parquet",
                   checkpoint_sha256=state_dict_digest(state), opts=ManifestOptions())
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="holds registry.parquet, ckpt/ and manifest/")
    parser.add_argument("--num-sources", type=int, default=PAPER_NUM_SOURCES)
    parser.add_argument("--strategy", default="uniform", choices=["uniform", "code", "reference"])
    parser.add_argument("--forget", type=int, default=1, help="how many sources to forget (evenly spaced ids)")
    parser.add_argument("--skip-verify", action="store_true")
    args = parser.parse_args()

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    manifest_seconds = None
    if not (workdir / "manifest" / INDEX_NAME).is_file():
        manifest_seconds = build(workdir, args.num_sources, args.strategy)
    index = json.loads((workdir / "manifest" / INDEX_NAME).read_text())
    step = index["num_sources"] // (args.forget + 1)
    forget = [str(PAPER_ID_OFFSET + step * (i + 1) - 2) for i in range(args.forget)]  # -2: skip holdouts (i%1000==999)
    out = workdir / f"request-{os.getpid()}"
    out.mkdir()
    ckpt = load_checkpoint(workdir / "ckpt")
    t0 = time.perf_counter()
    cert = unlearn(ckpt, workdir / "manifest", forget, "mask", out / "forget.json", out / "cert.json")
    unlearn_seconds = time.perf_counter() - t0
    rss_unlearn = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tables = forget_sinks(workdir / "manifest", [int(f) for f in forget])
    retained = {}
    for name, opts in (("certified", None), ("exact", RetainedShareOptions(exact_budget=2**62))):
        t1 = time.perf_counter()
        share = survivors_retained_share(workdir / "manifest", tables, opts)
        retained[name] = {"seconds": round(time.perf_counter() - t1, 2), "method": share["method"],
                          **{k: share[k] for k in ("num", "mean", "min", LOW_KEY)}}
    verify_seconds, ok = None, None
    if not args.skip_verify:
        t1 = time.perf_counter()
        ok = verify_paths(out / "cert.json", ckpt, out / "forget.json", workdir / "manifest")["ok"]
        verify_seconds = time.perf_counter() - t1
    print(json.dumps({
        "bench": "collateral", "num_sources": index["num_sources"], "num_trained": index["num_trained"],
        "strategy": index["strategy"]["strategy"], "pool": index["n_sink"], "n_layer": index["n_layer"],
        "sinks_per_source": index["strategy"].get("k"), "forget": [int(f) for f in forget],
        "collateral_sources": cert["collateral"]["num_sources"],
        "sidecar_mb": round(sidecar_path(out / "cert.json").stat().st_size / 2**20, 1),
        "unlearn_seconds": round(unlearn_seconds, 2), "verify_with_manifest_seconds":
            None if verify_seconds is None else round(verify_seconds, 2), "verify_ok": ok,
        "manifest_build_seconds": None if manifest_seconds is None else round(manifest_seconds, 2),
        "peak_rss_mb_unlearn": round(rss_unlearn, 1), "retained_share": retained,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "numpy": np.__version__, "pyarrow": pa.__version__,
    }, indent=2))


if __name__ == "__main__":
    main()
