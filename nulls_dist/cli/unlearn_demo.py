"""The end-to-end unlearning demo on the bundled SynthWiki corpus, driving the console tools in order:

1. `nulls-train experiment=unlearn_demo` (the default SynthWiki run on a 4-layer, width-128 debug NULL with
   128 backbone units and a 3968-unit sink pool per layer) and the retrain oracle
   (`train.exclude_sources=<forget>`);
2. `nulls-manifest` of the trained checkpoint;
3. `nulls-unlearn` (mask, then hard into a deployed checkpoint) and `nulls-unlearn verify` of both;
4. `nulls-eval` with the oracle, the hard checkpoint and the GA / NPO baselines;
and prints the headline numbers: Truth Ratio / accuracy on the forgotten articles' unique facts and on their
shared facts, for the original, unlearned and oracle deployments, with the paired difference to the oracle.

    python -m nulls_dist.cli.unlearn_demo --workdir runs/unlearn_demo [--max-steps N] [--train-override KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

# one article from each of the first twelve SynthWiki clusters, cycling through the six entity types (48 unique-fact
# probes: enough for a 95% interval of about +-0.12 on an accuracy difference)
DEFAULT_FORGET = tuple(49152 + 6 * cluster + cluster % 6 for cluster in range(12))
BUNDLED_PROBES = Path(__file__).resolve().parents[2] / "data_pipeline" / "bundled" / "synthwiki" / "probes.jsonl"


def _tool(module: str, args: list[str], cwd: Path) -> str:
    cmd = [sys.executable, "-c", f"from {module} import main; main()", *args]
    print("+", " ".join([module.split(".")[-1], *args]), flush=True)
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{module} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="runs/unlearn_demo")
    p.add_argument("--experiment", default="unlearn_demo", help="conf/experiment/ of both training runs")
    p.add_argument("--max-steps", type=int, default=None,
                   help="training steps of both runs (default: the experiment's)")
    p.add_argument("--forget", default=",".join(map(str, DEFAULT_FORGET)))
    p.add_argument("--train-override", action="append", default=[], metavar="KEY=VALUE",
                   help="a Hydra override for both training runs (repeatable), e.g. model.overrides.p_mem=0.1")
    p.add_argument("--baselines", default="ga,npo", help="post-hoc baselines nulls-eval runs (empty: none)")
    p.add_argument("--eval-steps", type=int, default=20, help="GA / NPO steps")
    p.add_argument("--eval-lr", type=float, default=1e-3, help="GA / NPO learning rate")
    p.add_argument("--relearn-steps", type=int, default=20)
    p.add_argument("--relearn-lr", type=float, default=3e-4, help="relearning attack lr (the runs' final lr)")
    p.add_argument("--embedder", default="auto")
    p.add_argument("--data", default=None,
                   help="the prepared dataset nulls-eval reads (default: <workdir>/data/synthwiki, as training made it)")
    p.add_argument("--probes", default=str(BUNDLED_PROBES), help="probes.jsonl of that dataset's corpus")
    args = p.parse_args(argv)
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    forget = [s.strip() for s in args.forget.split(",") if s.strip()]
    train = "nulls_dist.cli.train"
    common = [f"experiment={args.experiment}", "logging.wandb_mode=disabled"]
    common += [f"train.max_steps={args.max_steps}"] if args.max_steps else []
    common += args.train_override
    for name, extra in (("original", []), ("oracle", [f"train.exclude_sources=[{','.join(forget)}]"])):
        if not (work / "runs" / name / "checkpoints" / "latest").is_file():
            _tool(train, [*common, f"train.run_dir={work / 'runs' / name}", *extra], work)
    original, oracle = work / "runs" / "original", work / "runs" / "oracle"
    _tool("nulls_dist.cli.manifest", [f"checkpoint={original}", f"out={work / 'manifest'}"], work)
    unlearn = "nulls_dist.cli.unlearn"
    base = ["--checkpoint", str(original), "--manifest", str(work / "manifest")]
    for f in ("forget.json", "forget_hard.json"):
        (work / f).unlink(missing_ok=True)
    _tool(unlearn, [*base, "--method", "mask", "--forget-set", str(work / "forget.json"),
                    "--certificate", str(work / "certificate_mask.json"), *forget], work)
    _tool(unlearn, [*base, "--method", "hard", "--forget-set", str(work / "forget_hard.json"),
                    "--certificate", str(work / "certificate_hard.json"), "--output", str(work / "deployed_hard"),
                    *forget], work)
    for cert, ckpt, fs in (("certificate_mask.json", original, "forget.json"),
                           ("certificate_hard.json", work / "deployed_hard", "forget_hard.json")):
        out = _tool(unlearn, ["verify", "--certificate", str(work / cert), "--checkpoint", str(ckpt),
                              "--forget-set", str(work / fs)], work)
        report = json.loads(out[out.index("{\n"):])  # DeepSpeed may log a line to stdout on import
        print(f"verify {cert}: {'ok' if report['ok'] else 'FAILED'}")
    data_dir = Path(args.data).resolve() if args.data else work / "data" / "synthwiki"
    _tool("nulls_dist.cli.eval", [*base, "--forget-set", str(work / "forget.json"), "--oracle", str(oracle),
                                          "--hard", str(work / "deployed_hard"), "--data", str(data_dir),
                                          "--probes", str(Path(args.probes).resolve()), "--out", str(work / "eval"),
                                          "--baselines", args.baselines, "--threads", "1",
                                          "--steps", str(args.eval_steps), "--lr", str(args.eval_lr),
                                          "--relearn-steps", str(args.relearn_steps),
                                          "--relearn-lr", str(args.relearn_lr), "--embedder", args.embedder], work)
    result = json.loads((work / "eval" / "report.json").read_text())
    print(f"report: {work / 'eval' / 'report.md'}")
    print(f"chance accuracy {result['chance_accuracy']:.2f}; Truth Ratio: geometric mean; [95% intervals]")
    for name, r in result["deployments"].items():
        u, s, kept, rel = (r["probes"][k] for k in ("unique_forget", "shared_forget", "shared_forget_via_retained",
                                                     "unique_related"))
        rl = r["relearning"]["loss_rest"]
        vs = r.get("probes_vs_oracle", {}).get("unique_forget")
        versus = "" if vs is None or name == "oracle" else \
            " (vs oracle {:+.2f} [{:+.2f}, {:+.2f}])".format(*vs["accuracy_diff"])
        print(f"{name:10s} unique facts TR {u['truth_ratio_gmean']:.3f} acc {u['accuracy']:.2f}{versus} | "
              f"shared facts TR {s['truth_ratio_gmean']:.3f} acc {s['accuracy']:.2f} (via a retained article: acc "
              f"{kept['accuracy']:.2f}) | related acc {rel['accuracy']:.2f} | forget loss {r['loss']['forget']:.3f} "
              f"| MIA AUC {r['membership']['auc_forget_vs_holdout']:.2f} | relearn {rl[0]:.3f} -> {rl[-1]:.3f}")


if __name__ == "__main__":
    main()
