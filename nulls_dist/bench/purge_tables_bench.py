"""`nulls-unlearn purge` and its `verify` on a run trained with sharded sink tables: wall time and peak RSS of each
against the sizes of what they rewrite, and the peak RSS of loading the tag's `model.safetensors` whole (what
purge did before it streamed), so the table's share of the memory shows. Two peaks per process: `ru_maxrss`
(which also counts the page-cache pages a memory map touched: a streamed digest touches the whole file) and the
peak anonymous RSS sampled every 20 ms from /proc/self/status (the memory the process allocated).

One `nulls-train` run (1 rank, ZeRO-1, one torch thread, the demo model: D = 64, 2 layers, a `uniform` pool of
`--pool` rows per layer, k = `--k`, `--steps` steps, a tag at the end) on the bundled SynthWiki data; its manifest
and a mask forget set of two sources; then purge, verify and the whole-file load, each in its own process
(`resource.getrusage` peak RSS).

    nice -n 10 python -m nulls_dist.bench.purge_tables_bench --pool 262144      # 2^18 rows
    python -m nulls_dist.bench.purge_tables_bench --pool 4096 --steps 1         # smoke
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nulls_dist.bench.provenance import commit, machine, versions
from nulls_dist.bench.sharded_training_bench import _prepare, _train

FORGET = ("49152", "49160")  # two SynthWiki articles (the bundled data numbers its sources from 49152)

_PEAK_ANON = r"""
import threading, time
def _anon_kb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0
PEAK = [0]
def _sample():
    while True:
        PEAK[0] = max(PEAK[0], _anon_kb())
        time.sleep(0.02)
threading.Thread(target=_sample, daemon=True).start()
"""
_PURGE = _PEAK_ANON + r"""
import json, resource, sys, time
from nulls_dist.audit.purge import purge
from nulls_dist.train.checkpoint_rows import DeepSpeedRows
run, manifest, forget, cert = sys.argv[1:5]
start = time.perf_counter()
out = purge(run, [], manifest, forget, cert, DeepSpeedRows())
print(json.dumps({"wall_s": time.perf_counter() - start, "zeroed": out["artifacts"][0]["zeroed"],
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "peak_anon_rss_gb": max(PEAK[0], _anon_kb()) / 2**20}))
"""
_VERIFY = _PEAK_ANON + r"""
import json, resource, sys, time
from pathlib import Path
from nulls_dist.audit.purge_verify import load_purge_certificate, verify_purge
from nulls_dist.formats.forget_set import load_forget_set
from nulls_dist.train.checkpoint_rows import DeepSpeedRows
cert, forget = sys.argv[1:3]
start = time.perf_counter()
report = verify_purge(load_purge_certificate(cert), load_forget_set(forget), DeepSpeedRows(),
                      certificate_dir=Path(cert).parent)
print(json.dumps({"wall_s": time.perf_counter() - start, "ok": report["ok"],
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "peak_anon_rss_gb": max(PEAK[0], _anon_kb()) / 2**20}))
"""
_LOAD_WHOLE = _PEAK_ANON + r"""
import json, resource, sys
import nulls_dist.audit.purge  # the same imports as the purge process
from nulls_dist.formats.weights import load_weights
state = load_weights(sys.argv[1])
print(json.dumps({"tensors": len(state), "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "peak_anon_rss_gb": max(PEAK[0], _anon_kb()) / 2**20}))
"""


def _python(code: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _gb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return round(sum(p.stat().st_size for p in files) / 1e9, 3)


def main(argv: list[str] | None = None) -> dict:
    from nulls_dist.audit.manifest import build_manifest
    from nulls_dist.audit.unlearn import unlearn
    from nulls_dist.deploy.checkpoint_io import load_checkpoint
    from nulls_dist.formats import checkpoint as layout
    from nulls_dist.formats.weights import state_dict_digest

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pool", type=int, default=2**18)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--data", type=Path, default=None, help="prepared SynthWiki shards (default: prepared in a temp dir)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="purge_tables_bench-") as tmp:
        tmp = Path(tmp)
        data_dir = _prepare(args.data or tmp / "data")
        run = tmp / "run"
        training = _train(data_dir, run, args.pool, "sharded", args)
        ckpt = load_checkpoint(run)
        start = time.perf_counter()
        build_manifest(tmp / "manifest", state_dict=ckpt.state_dict, model_cfg=ckpt.model_config,
                       registry_path=data_dir / "registry.parquet", checkpoint_sha256=state_dict_digest(ckpt.state_dict))
        unlearn(ckpt, tmp / "manifest", list(FORGET), "mask", tmp / "forget.json", tmp / "mask.json")
        setup_s = time.perf_counter() - start
        tag = ckpt.path
        sizes = {"weights_gb": _gb(tag / layout.WEIGHTS_NAME), "sink_tables_gb": _gb(layout.sink_tables_dir(tag)),
                 "tag_gb": _gb(tag)}
        load_whole = _python(_LOAD_WHOLE, str(tag / layout.WEIGHTS_NAME))
        purged = _python(_PURGE, str(run), str(tmp / "manifest"), str(tmp / "forget.json"), str(tmp / "purge.json"))
        verified = _python(_VERIFY, str(tmp / "purge.json"), str(tmp / "forget.json"))
    report = {"machine": machine(), "versions": versions("torch", "torchrec", "deepspeed"), **commit(),
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "training": training, "manifest_and_forget_set_s": round(setup_s, 1), **sizes,
              "purge": purged, "verify": verified, "load_weights_whole": load_whole}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
