"""The end-to-end unlearning audit on the bundled SynthWiki corpus, driving the console tools in order:

1. `nulls-train experiment=unlearn_demo` (a 4-layer, width-128 debug NULL with 128 backbone units and a
   3968-unit sink pool per layer; 48 of the 240 articles held out) and the retrain oracle without the forget set
   (`train.exclude_sources`); with `--full` also one oracle per earlier request and a separately trained
   reference model (another seed, without the forget set and every other retained article);
2. `nulls-manifest` of the trained checkpoint;
3. successive `nulls-unlearn` requests (1, then 5, then 20 more articles by default) on one mask forget set, the
   whole forget set once with `hard`, and `nulls-unlearn verify` of the first and last mask certificates (an
   older certificate verifies against the later forget set) and of the hard one;
4. `nulls-eval`: the full audit (probes, losses, extraction, membership inference, worst-case routing, the
   quantization attack, relearning, every metric after each request) against the oracle, with two extra report
   sections: the two-checkpoint comparison of the original against its hard-unlearned deployment (what an
   attacker holding both learns) and the residue attribution (which tokens carry the membership signal);
and prints the report's "What NULLs do and do not remove" lines and a headline table.

The forget set is chosen after the data is prepared, so that it avoids the holdout: the k-th forgotten article is
one from SynthWiki cluster k, cycling through the six entity types, skipping held-out articles.

    python -m nulls_dist.cli.unlearn_demo --workdir runs/unlearn_demo [--full] [--requests 1,5,20]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ID_OFFSET = 49152  # SynthWiki's source ids (conf/data/synthwiki.yaml)
ARTICLES_PER_CLUSTER = 6
BUNDLED_PROBES = Path(__file__).resolve().parents[2] / "data_pipeline" / "bundled" / "synthwiki" / "probes.jsonl"


def _tool(module: str, args: list[str], cwd: Path) -> str:
    cmd = [sys.executable, "-c", f"from {module} import main; main()", *args]
    print("+", " ".join([module.split(".")[-1], *args]), flush=True)
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{module} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def choose_forget(holdout: set[int], num: int) -> list[int]:
    """One article per cluster (cluster k -> entity type k mod 6, or the next type not held out)."""
    out = []
    for cluster in range(num):
        for shift in range(ARTICLES_PER_CLUSTER):
            sid = ID_OFFSET + ARTICLES_PER_CLUSTER * cluster + (cluster + shift) % ARTICLES_PER_CLUSTER
            if sid not in holdout:
                out.append(sid)
                break
    return out


def _train(work: Path, name: str, common: list[str], extra: list[str]) -> Path:
    """Train (or resume: nulls-train continues an interrupted run and returns at once from a finished one)."""
    run = work / "runs" / name
    _tool("nulls_dist.cli.train", [*common, f"train.run_dir={run}", *extra], work)
    return run


def _trained_ids(data_dir: Path) -> list[int]:
    """The training split's source ids of a prepared dataset (its registry)."""
    import pyarrow.parquet as pq

    from nulls_dist.formats.dataset import REGISTRY_NAME, SPLIT_TRAIN

    table = pq.read_table(data_dir / REGISTRY_NAME, columns=["source_id", "split"])
    return sorted(int(s) for s, split in zip(table.column("source_id").to_pylist(), table.column("split").to_pylist())
                  if split == SPLIT_TRAIN)


def _request_sizes(text: str | None, num_forget: int | None) -> list[int]:
    """`--requests`, else 1, 5 and the rest of `--forget` (1, 5, 20 without it)."""
    if text:
        return [int(s) for s in text.split(",") if s.strip()]
    if num_forget is None:
        return [1, 5, 20]
    return [1, 5, num_forget - 6] if num_forget > 6 else [num_forget]


def _ids(ids) -> str:
    return "[" + ",".join(map(str, ids)) + "]"


def _headline(result: dict) -> None:
    print(f"chance accuracy {result['chance_accuracy']:.2f}; TR = geometric-mean Truth Ratio; [95% intervals]")
    for name, r in result["deployments"].items():
        u = r["probes"]["unique_forget"]
        kept = r["probes"]["shared_forget_via_retained"]
        mk = r.get("membership", {}).get("attacks", {}).get("min_k", {})
        ref = r.get("membership", {}).get("attacks", {}).get("ref_oracle_loss", {})
        vs = r.get("probes_vs_oracle", {}).get("unique_forget")
        versus = "" if vs is None or name == "oracle" else " (vs oracle {:+.2f} [{:+.2f}, {:+.2f}])".format(
            *vs["accuracy_diff"])
        print(f"{name:14s} unique acc {u['accuracy']:.2f} TR {u['truth_ratio_gmean']:.3f}{versus} | shared via "
              f"retained acc {kept['accuracy']:.2f} | retained loss {r['loss']['retained']:.3f} | Min-K AUC "
              f"{mk.get('auc', float('nan')):.2f} | ref_oracle_loss AUC {ref.get('auc', float('nan')):.2f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="runs/unlearn_demo")
    p.add_argument("--experiment", default="unlearn_demo", help="conf/experiment/ of every training run")
    p.add_argument("--max-steps", type=int, default=None, help="training steps of every run (default: the experiment's)")
    p.add_argument("--requests", default=None,
                   help="sizes of the successive forget requests (default 1,5,20; with --forget: 1, 5 and the rest)")
    p.add_argument("--forget", default=None, help="comma list of source ids (default: chosen after data prep)")
    p.add_argument("--full", action="store_true",
                   help="the heavy audit: an oracle per request, a separately trained reference, worst-case "
                        "routing on shared facts too, and the hard checkpoint in every attack")
    p.add_argument("--train-override", action="append", default=[], metavar="KEY=VALUE",
                   help="a Hydra override for every training run (repeatable), e.g. model.overrides.p_mem=0.1")
    p.add_argument("--baselines", default="ga,npo", help="post-hoc baselines nulls-eval runs (empty: none)")
    p.add_argument("--eval-steps", type=int, default=20, help="GA / NPO steps")
    p.add_argument("--eval-lr", type=float, default=1e-3, help="GA / NPO learning rate")
    p.add_argument("--relearn-steps", type=int, default=64)
    p.add_argument("--relearn-lr", type=float, default=1e-3)
    p.add_argument("--embedder", default="auto")
    p.add_argument("--redo-unlearning", action="store_true",
                   help="remove <workdir>/unlearn (forget sets, certificates, hard checkpoint) of a previous run")
    p.add_argument("--data", default=None,
                   help="the prepared dataset nulls-eval reads (default: <workdir>/data/synthwiki, as training made it)")
    p.add_argument("--probes", default=str(BUNDLED_PROBES), help="probes.jsonl of that dataset's corpus")
    args = p.parse_args(argv)
    started = time.perf_counter()
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    given = [int(s) for s in args.forget.split(",") if s.strip()] if args.forget else None
    sizes = _request_sizes(args.requests, None if given is None else len(given))
    common = [f"experiment={args.experiment}", "logging.wandb_mode=disabled"]
    common += [f"train.max_steps={args.max_steps}"] if args.max_steps else []
    common += args.train_override
    original = _train(work, "original", common, [])  # prepares the data (holdout chosen by its seeded key)
    data_dir = Path(args.data).resolve() if args.data else work / "data" / "synthwiki"
    holdout = set(json.loads((data_dir / "manifest.json").read_text())["holdout"]["source_ids"])
    forget = given if given is not None else choose_forget(holdout, sum(sizes))
    if set(forget) & holdout or len(forget) != sum(sizes):
        raise ValueError(f"--forget: {len(forget)} ids for requests {sizes}, held out: {sorted(set(forget) & holdout)}")
    bounds = [sum(sizes[:i + 1]) for i in range(len(sizes))]
    oracle = _train(work, "oracle", common, [f"train.exclude_sources={_ids(forget)}"])
    stage_oracles, reference = [], None
    if args.full:
        stage_oracles = [_train(work, f"oracle_request{i + 1}", common, [f"train.exclude_sources={_ids(forget[:b])}"])
                         for i, b in enumerate(bounds[:-1])]
        trained = sorted(set(_trained_ids(data_dir)) - set(forget))
        reference = _train(work, "reference", common, ["train.seed=1",
                                                       f"train.exclude_sources={_ids(forget + trained[1::2])}"])
    manifest = work / "manifest"
    _tool("nulls_dist.cli.manifest", [f"checkpoint={original}", f"out={manifest}"], work)
    unlearn = "nulls_dist.cli.unlearn"
    base = ["--checkpoint", str(original), "--manifest", str(manifest)]
    out = work / "unlearn"  # forget sets, certificates, the hard checkpoint: never overwritten
    if out.exists():
        if not args.redo_unlearning:
            raise ValueError(f"{out} exists (a previous demo's forget sets and certificates); pass "
                             "--redo-unlearning to remove it, or choose another --workdir")
        shutil.rmtree(out)
    out.mkdir()
    begin = 0
    for i, end in enumerate(bounds):
        _tool(unlearn, [*base, "--method", "mask", "--forget-set", str(out / "forget.json"),
                        "--certificate", str(out / f"certificate_mask_{i + 1}.json"),
                        *map(str, forget[begin:end])], work)
        begin = end
    hard_dir = out / "deployed_hard"
    _tool(unlearn, [*base, "--method", "hard", "--forget-set", str(out / "forget_hard.json"),
                    "--certificate", str(out / "certificate_hard.json"), "--output", str(hard_dir),
                    *map(str, forget)], work)
    for cert, ckpt, fs in (("certificate_mask_1.json", original, "forget.json"),
                           (f"certificate_mask_{len(bounds)}.json", original, "forget.json"),
                           ("certificate_hard.json", hard_dir, "forget_hard.json")):
        report = _tool(unlearn, ["verify", "--certificate", str(out / cert), "--checkpoint", str(ckpt),
                                 "--forget-set", str(out / fs)], work)
        report = json.loads(report[report.index("{\n"):])  # DeepSpeed may log a line to stdout on import
        print(f"verify {cert}: {'ok' if report['ok'] else 'FAILED'}")
    eval_args = [*base, "--forget-set", str(out / "forget.json"), "--oracle", str(oracle), "--hard", str(hard_dir),
                 "--data", str(data_dir), "--probes", str(Path(args.probes).resolve()), "--out", str(work / "eval"),
                 "--baselines", args.baselines, "--threads", "1", "--steps", str(args.eval_steps),
                 "--lr", str(args.eval_lr), "--relearn-steps", str(args.relearn_steps),
                 "--relearn-lr", str(args.relearn_lr), "--embedder", args.embedder,
                 "--compare-before", str(original), "--compare-after", str(hard_dir), "--residue"]
    if args.full:
        eval_args += ["--stage-oracles", *map(str, stage_oracles), "--reference", str(reference),
                      "--worst-case-groups", "unique_forget,shared_forget",
                      "--worst-case-deployments", "unlearned,hard,oracle",
                      "--quantize-deployments", "unlearned,hard,oracle,ga,npo",
                      "--relearn-deployments", "unlearned,hard,oracle,ga,npo", "--bootstrap", "2000"]
    _tool("nulls_dist.cli.eval", eval_args, work)
    result = json.loads((work / "eval" / "report.json").read_text())
    print(f"report: {work / 'eval' / 'report.md'}")
    md = (work / "eval" / "report.md").read_text()
    start = md.index("## What NULLs do and do not remove")
    print(md[start:md.index("\n## ", start + 5)].strip())
    _headline(result)
    print(f"demo wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
