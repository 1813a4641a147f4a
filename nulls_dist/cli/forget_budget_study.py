"""The forget-budget study (docs/forget_budget.md): how survivors fare as forget requests pile up, for sink
pools of different sizes, on a 1,002-article SynthWiki.

For each study config (`CONFIGS`; a config = Hydra overrides of `experiment=forget_budget`) it drives the
console tools in order, in `<workdir>/<config>/`:

1. `nulls-train` of the original (the data, `data=synthwiki_1k`, is prepared once in `<workdir>/data`);
2. `nulls-manifest`;
3. successive `nulls-unlearn --method mask` requests that grow one cumulative forget set to F = 1, 10, 50, 100
   articles (a seeded draw of trained articles, the same for every config); each certificate records the
   survivors' retained share of their sinks;
4. retrain oracles (`train.exclude_sources` = the forget set) at F = 10 and 100;
5. after each request, in this process: the retained articles' unique-fact accuracy and text loss (a fixed
   seeded sample of articles never forgotten, Sink-Off on their own sinks minus the forgotten ones) against the
   same before any forget, and at F = 10 and 100 the forgotten articles' unique facts in the original, the
   unlearned model and the oracle (both routed by title, as nulls-eval).

Resumable: a training run is handed to `nulls-train` again (it resumes an interrupted run, returns at once from
a finished one); the manifest's index, a certificate and a step's JSON are skipped when they exist, so a stopped
study continues where it stopped. Results: `<workdir>/results.json` and PNGs in `<workdir>/plots/`. The
`large_table` config (2^20 rows per layer) trains its sink rows in TorchRec row-wise sharded tables beside the
DeepSpeed engine (`sink_tables.mode=sharded`, docs/sink_tables.md). `--shared-oracle CONFIG` compares every
config's forgotten facts with one config's retrain oracles (models that never saw the forgotten articles).

    python -m nulls_dist.cli.forget_budget_study --workdir runs/forget_budget [--shared-oracle paper_pool]
    python -m nulls_dist.cli.forget_budget_study --workdir runs/forget_budget --plan-only   # data + plan.json
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from nulls_dist import forget_budget as budget
from nulls_dist.cli.errors import report_errors
from nulls_dist.cli.eval import _manifest_table, dataset_tokenizer
from nulls_dist.deploy.checkpoint_io import build_model, load_checkpoint
from nulls_dist.deploy.forget import apply_forget_set
from nulls_dist.deploy.routing import SourceIndex, make_embedder
from nulls_dist.evaluation import budget_study as study
from nulls_dist.evaluation.evaluate import gold_deployment, routed_deployment
from nulls_dist.evaluation.source_text import read_source_tokens
from nulls_dist.formats import atomic
from nulls_dist.formats.dataset import REGISTRY_NAME, SPLIT_TRAIN
from nulls_dist.formats.documents import read_jsonl

log = logging.getLogger("nulls_dist.forget_budget_study")

STEPS = (1, 10, 50, 100)  # cumulative forget-set sizes, reached by successive requests
ORACLE_STEPS = (10, 100)
GOAL_RETAINED_ACCURACY_RATIO = 0.95  # the goal for the large table at F = 100
LARGE_ROWS = 2**20
SINKS_PER_SOURCE = 40  # ~p_mem * pool of the paper-style pool (0.01 x 3968); the large table keeps it


@dataclass(frozen=True)
class StudyConfig:
    name: str
    description: str
    rows: int  # sink rows per layer
    k: float  # sinks per source (expected, for the analytic curve)
    overrides: tuple[str, ...] = ()  # nulls-train overrides on top of experiment=forget_budget


def _pool_overrides(rows: int, k: int) -> tuple[str, ...]:
    """A uniform assignment of k sinks in a pool of `rows` rows beside the experiment's 128 backbone units."""
    backbone = 128
    return (f"model.overrides.intermediate_size={backbone + rows}",
            f"model.overrides.p_gen={backbone / (backbone + rows)!r}", f"model.overrides.p_mem={k / rows!r}",
            "model.overrides.sink_strategy=uniform", f"model.overrides.sink_k={k}")


def _table_overrides(rows: int, k: int) -> tuple[str, ...]:
    """A uniform assignment of k sinks in a `sink_pool_size` table of `rows` rows (beside the experiment's 128
    backbone units, int(4096 * p_gen)): the pool is decoupled from intermediate_size, as the sharded tables need."""
    return (f"+model.overrides.sink_pool_size={rows}", f"model.overrides.p_mem={k / rows!r}",
            "model.overrides.sink_strategy=uniform", f"model.overrides.sink_k={k}")


CONFIGS = {c.name: c for c in (
    StudyConfig("paper_pool", "the paper's published hash in a 3,968-row pool, ~40 sinks per source "
                "(p_mem 0.01): the regime of the paper's 7,692 rows and ~100 sinks", 3968, 0.01 * 3968),
    StudyConfig("small_k", "the same 3,968-row pool with 4 sinks per source (uniform): the other lever of "
                "exp(-F k / R), bought with 10x less sink capacity per source", 3968, 4, _pool_overrides(3968, 4)),
    StudyConfig("large_table", f"a 2^20-row table with {SINKS_PER_SOURCE} sinks per source (uniform), trained in "
                "TorchRec row-wise sharded sink tables", LARGE_ROWS, SINKS_PER_SOURCE,
                (*_table_overrides(LARGE_ROWS, SINKS_PER_SOURCE), "sink_tables.mode=sharded")),
)}
DEFAULT_CONFIGS = ("paper_pool", "small_k", "large_table")


# --------------------------------------------------------------------------------------------- tools
def _tool(module: str, args: list[str], cwd: Path) -> str:
    cmd = [sys.executable, "-c", f"from {module} import main; main()", *args]
    log.info("+ %s %s", module.split(".")[-1], " ".join(args))
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{module} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def _json_tail(text: str) -> dict:
    """The JSON object a tool printed last (DeepSpeed may log lines to stdout on import)."""
    return json.loads(text[text.index("{\n"):] if "{\n" in text else text[text.index("{"):])


def _train(work: Path, run_dir: Path, overrides: list[str]) -> None:
    # always through nulls-train: it resumes an interrupted run from its latest tag and returns at once from a
    # finished one (a `latest` pointer alone does not say the run reached max_steps)
    _tool("nulls_dist.cli.train", ["experiment=forget_budget", f"data.output_dir={work / 'data'}",
                                   f"train.run_dir={run_dir}", "logging.wandb_mode=disabled", *overrides], work)


# --------------------------------------------------------------------------------------------- the plan
def make_plan(work: Path, seed: int, num_retained: int) -> dict:
    """The forget order (max(STEPS) trained articles) and the retained articles measured at every step, drawn
    once (seeded) from the prepared registry; an existing plan.json must agree."""
    table = pq.read_table(work / "data" / REGISTRY_NAME, columns=["source_id", "split"]).to_pydict()
    trained = np.array(sorted(s for s, split in zip(table["source_id"], table["split"]) if split == SPLIT_TRAIN))
    rng = np.random.default_rng(seed)
    order = rng.permutation(trained)
    forget = [int(s) for s in order[:max(STEPS)]]
    rest = order[max(STEPS):]
    retained = sorted(int(s) for s in rest[:min(num_retained, len(rest))])
    plan = {"seed": seed, "steps": list(STEPS), "oracle_steps": list(ORACLE_STEPS), "forget_order": forget,
            "retained_ids": retained, "num_trained": int(len(trained))}
    path = work / "plan.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != plan:
            raise RuntimeError(f"{path} was made with other settings (seed, --retained-articles or data); use "
                               "another --workdir or the same settings")
    else:
        atomic.write_json(path, plan)
    return plan


# --------------------------------------------------------------------------------------------- one config
class ConfigRun:
    """One study config in `<workdir>/<name>/`: original, manifest, requests, oracles, measurements."""

    def __init__(self, work: Path, cfg: StudyConfig, plan: dict, extra: list[str],
                 oracle_cfg: StudyConfig | None = None):
        self.work, self.cfg, self.plan, self.extra = work, cfg, plan, extra
        self.dir = work / cfg.name
        self.eval_dir = self.dir / "eval"
        self.oracle_cfg = oracle_cfg or cfg  # whose retrain oracles this config is compared with
        self.dir.mkdir(parents=True, exist_ok=True)
        self.eval_dir.mkdir(exist_ok=True)

    def train_original(self) -> None:
        _train(self.work, self.dir / "original", [*self.cfg.overrides, *self.extra])

    def build_manifest(self) -> None:
        if not (self.dir / "manifest" / "index.json").is_file():
            _tool("nulls_dist.cli.manifest", [f"checkpoint={self.dir / 'original'}", f"out={self.dir / 'manifest'}"],
                  self.work)

    def request(self, step: int, previous: int) -> dict:
        """The request that grows the forget set from `previous` to `step` sources; its certificate."""
        cert = self.dir / f"certificate_{step:03d}.json"
        if not cert.is_file():
            added = self.dir / f"request_{step:03d}.txt"
            atomic.write_text(added, "".join(f"{s}\n" for s in self.plan["forget_order"][previous:step]))
            _tool("nulls_dist.cli.unlearn", ["--checkpoint", str(self.dir / "original"), "--manifest",
                                             str(self.dir / "manifest"), "--method", "mask", "--forget-set",
                                             str(self.dir / "forget.json"), "--certificate", str(cert), "--file",
                                             str(added)], self.work)
        snapshot = self.dir / f"forget_{step:03d}.json"
        doc = json.loads(cert.read_text())
        if not snapshot.is_file():  # the cumulative forget set as it stood after this request
            state = json.loads((self.dir / "forget.json").read_text())
            if state["sha256"] != doc["forget_set"]["sha256"]:
                raise RuntimeError(f"{self.dir / 'forget.json'} moved past step {step} before its snapshot was "
                                   "taken; remove the config's directory and run it again")
            atomic.write_json(snapshot, state)
        return doc

    def oracle(self, step: int) -> Path:
        """The retrain oracle without the first `step` forgotten articles (trained unless it exists)."""
        run_dir = self.work / self.oracle_cfg.name / f"oracle_{step:03d}"
        ids = ",".join(map(str, self.plan["forget_order"][:step]))
        _train(self.work, run_dir, [*self.oracle_cfg.overrides, *self.extra, f"train.exclude_sources=[{ids}]"])
        return run_dir


class Measurer:
    """The in-process measurements of one config: the original model, tokens, probes and routing, loaded once."""

    def __init__(self, run: ConfigRun, threads: int):
        torch.set_num_threads(threads)
        data_dir = run.work / "data"
        self.run = run
        self.ckpt = load_checkpoint(run.dir / "original")
        self.model = build_model(self.ckpt)
        self.table = _manifest_table(run.dir / "manifest")
        self.trained = sorted(s for s, (_, trained, _) in self.table.items() if trained)
        tokenizer = dataset_tokenizer(data_dir, None)
        encode, bos = tokenizer.encode, tokenizer.bos_id
        probes = read_jsonl(next((data_dir / "generated").glob("synthwiki-*/probes.jsonl")), "probes file")
        wanted = set(run.plan["retained_ids"]) | set(run.plan["forget_order"])
        self.data = study.StudyData(probes, read_source_tokens(data_dir, wanted), encode, bos)
        self.titles = {s: v[0] for s, v in self.table.items()}
        self._routing = None

    def retained(self, step: int) -> dict:
        path = self.run.eval_dir / f"retained_{step:03d}.json"
        if not path.is_file():
            forget = self.run.plan["forget_order"][:step]
            atomic.write_json(path, study.retained_step(self.model, self.data, self.run.plan["retained_ids"], forget))
        return json.loads(path.read_text())

    def forgotten(self, step: int, oracle_dir: Path) -> dict:
        path = self.run.eval_dir / f"forgotten_{step:03d}.json"
        if not path.is_file():
            forget = self.run.plan["forget_order"][:step]
            embedder, index = self._router()
            unlearned = build_model(self.ckpt)
            apply_forget_set(unlearned, self.ckpt, self.run.dir / f"forget_{step:03d}.json")
            oracle_ckpt = load_checkpoint(oracle_dir)
            kept = [s for s in self.trained if s not in set(forget)]
            oracle_index = SourceIndex(np.asarray(kept), index.embeddings[np.isin(index.source_ids, kept)])
            route_all = routed_deployment("routed", self.model, index, embedder, [], self.titles).mode_for
            deployments = [gold_deployment("original", self.model, set(self.trained), route_all),
                           routed_deployment("unlearned", unlearned, index, embedder, forget, self.titles),
                           routed_deployment("oracle", build_model(oracle_ckpt), oracle_index, embedder, [],
                                             self.titles)]
            result = study.forgotten_step(deployments, self.data, forget)
            result.update(embedder=embedder.name, oracle=str(oracle_dir))
            atomic.write_json(path, result)
        return json.loads(path.read_text())

    def dose_response(self) -> list[dict]:
        """The retained facts of every step binned by each article's own retained share of its sinks."""
        cfg, retained = self.model.cfg, self.run.plan["retained_ids"]
        pairs = [(self.retained(step), study.article_shares(self.model.sink_assignment, retained,
                                                             self.run.plan["forget_order"][:step], cfg.n_layer,
                                                             cfg.sink_layer_specific)) for step in STEPS]
        return study.dose_response(pairs, self.retained(0), self.data.probes)

    def _router(self):
        if self._routing is None:
            embedder = make_embedder("auto", self.model.transformer.wte.weight, self.data.encode)
            index = SourceIndex.build(self.trained, [self.titles[s] for s in self.trained], embedder)
            self._routing = (embedder, index)
        return self._routing


def run_config(run: ConfigRun, threads: int) -> dict:
    """Every stage of one config (each skipped when done); returns its results."""
    run.train_original()
    run.build_manifest()
    measure = Measurer(run, threads)
    before = measure.retained(0)
    steps, previous = [], 0
    for step in STEPS:
        cert = run.request(step, previous)
        previous = step
        retained = measure.retained(step)
        entry = {"forgotten": step, "certificate": cert["survivors_retained_share"],
                 "analytic_retained_share": budget.analytic_retained_share(step, run.cfg.k, run.cfg.rows),
                 "retained_accuracy": retained["probes"]["accuracy"],
                 "retained_accuracy_ci95": retained["probes"]["accuracy_ci95"],
                 "retained_truth_ratio_gmean": retained["probes"]["truth_ratio_gmean"],
                 "retained_loss": retained["loss"], "against_before": study.against_before(retained, before)}
        if step in ORACLE_STEPS:
            forgotten = measure.forgotten(step, run.oracle(step))
            entry["forgotten_unique_facts"] = {
                name: {"accuracy": d["probes"]["accuracy"], "accuracy_ci95": d["probes"]["accuracy_ci95"],
                       "truth_ratio_gmean": d["probes"]["truth_ratio_gmean"],
                       "accuracy_diff_vs_oracle": d.get("probes_vs_oracle", {}).get("accuracy_diff")}
                for name, d in forgotten["deployments"].items()}
            entry["forgotten_num_probes"] = forgotten["num_probes"]
            entry["chance_accuracy"] = forgotten["chance_accuracy"]
        steps.append(entry)
    return {"status": "measured", "config": asdict(run.cfg), "oracle_from": run.oracle_cfg.name,
            "dose_response": measure.dose_response(),
            "before": {"retained_accuracy": before["probes"]["accuracy"], "retained_loss": before["loss"],
                       "num_probes": before["probes"]["num"]}, "steps": steps, "goal": goal(steps)}


def goal(steps: list[dict]) -> dict:
    """The issue's goal at F = 100: retained unique-fact accuracy >= 95% of its pre-forget value, and the
    forgotten facts at the oracle's level (the paired 95% interval of unlearned - oracle contains 0)."""
    last = next((s for s in steps if s["forgotten"] == max(STEPS)), None)
    if last is None or "forgotten_unique_facts" not in last:
        return {"met": None}
    ratio = last["against_before"]["accuracy_ratio"]
    diff = last["forgotten_unique_facts"]["unlearned"]["accuracy_diff_vs_oracle"]
    at_oracle = diff is not None and diff[1] <= 0 <= diff[2]
    return {"retained_accuracy_ratio": ratio, "ratio_goal": GOAL_RETAINED_ACCURACY_RATIO,
            "unlearned_minus_oracle": diff, "forgotten_at_oracle_level": at_oracle,
            "met": bool(ratio >= GOAL_RETAINED_ACCURACY_RATIO and at_oracle)}


# --------------------------------------------------------------------------------------------- plots
def write_plots(results: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = {n: r for n, r in results["configs"].items() if r["status"] == "measured"}
    if not measured:
        return []
    files = []
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (name, r) in enumerate(measured.items()):
        color = f"C{i}"
        xs = [0] + [s["forgotten"] for s in r["steps"]]
        left.plot(xs, [1.0] + [s["against_before"]["accuracy_ratio"] for s in r["steps"]], "o-", color=color,
                  label=f"{name}: unique-fact accuracy / before")
        left.plot(xs, [1.0] + [s["certificate"]["mean"] for s in r["steps"]], "s--", color=color, alpha=0.6,
                  label=f"{name}: survivors' retained sink share")
        right.plot(xs, [r["before"]["retained_loss"]] + [s["retained_loss"] for s in r["steps"]], "o-", color=color,
                   label=name)
    left.axhline(GOAL_RETAINED_ACCURACY_RATIO, color="k", linestyle=":", label="goal 0.95 (large table)")
    ticks = [0, *STEPS]
    for ax, ylabel in ((left, "retained articles, relative to before any forget"),
                       (right, "retained articles' loss (nats/token)")):
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlim(-0.1, max(STEPS) * 1.2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_xlabel("articles forgotten (cumulative, successive requests)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Forget budget on SynthWiki-1k: what survivors keep")
    fig.tight_layout()
    files.append(_save(fig, out_dir / "retained.png"))
    plt.close(fig)

    fig, axes = plt.subplots(1, len(ORACLE_STEPS), figsize=(6 * len(ORACLE_STEPS), 4), squeeze=False)
    for ax, step in zip(axes[0], ORACLE_STEPS):
        width = 0.8 / max(1, len(measured))
        for i, (name, r) in enumerate(measured.items()):
            entry = next(s for s in r["steps"] if s["forgotten"] == step)
            facts = entry["forgotten_unique_facts"]
            names = list(facts)
            acc = [facts[n]["accuracy"] for n in names]
            err = np.array([[a - facts[n]["accuracy_ci95"][0], facts[n]["accuracy_ci95"][1] - a]
                            for a, n in zip(acc, names)]).T
            ax.bar(np.arange(len(names)) + i * width, acc, width, yerr=err, color=f"C{i}", label=name, capsize=3)
            ax.axhline(entry["chance_accuracy"], color="k", linestyle=":", linewidth=1)
        ax.set_xticks(np.arange(3) + width * (len(measured) - 1) / 2, ["original", "unlearned", "oracle"])
        ax.set_ylabel("forgotten articles' unique-fact accuracy")
        ax.set_title(f"F = {step} (dotted: chance)")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=7)
    fig.tight_layout()
    files.append(_save(fig, out_dir / "forgotten_vs_oracle.png"))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, r) in enumerate(measured.items()):
        bins = r.get("dose_response") or []
        ax.plot(range(len(bins)), [b["ratio"] for b in bins], "o-", color=f"C{i}", label=name)
        for x, b in enumerate(bins):
            ax.annotate(str(b["num_probes"]), (x, b["ratio"]), fontsize=6, xytext=(2, 3), textcoords="offset points")
    labels = [b["share"] for b in next(iter(measured.values())).get("dose_response") or []]
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.axhline(GOAL_RETAINED_ACCURACY_RATIO, color="k", linestyle=":", linewidth=1)
    ax.set_xlabel("an article's own retained share of its sinks (bins, pooled over F = 1..100)")
    ax.set_ylabel("unique-fact accuracy / before (same probes)")
    ax.set_title("What a retained share costs (numbers: probes per bin)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    files.append(_save(fig, out_dir / "dose_response.png"))
    plt.close(fig)
    return files


def _save(fig, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    return str(path)


# --------------------------------------------------------------------------------------------- main
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="runs/forget_budget")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help=f"comma list of {sorted(CONFIGS)}")
    p.add_argument("--plan-only", action="store_true", help="prepare the data and write plan.json, train nothing")
    p.add_argument("--train-override", action="append", default=[], metavar="KEY=VALUE",
                   help="a nulls-train override for every run of the study (repeatable), e.g. train.max_steps=200")
    p.add_argument("--shared-oracle", default=None, metavar="CONFIG",
                   help="use this config's oracles for every config (saves two trainings per config)")
    p.add_argument("--retained-articles", type=int, default=300, help="retained articles measured at every step")
    p.add_argument("--seed", type=int, default=0, help="the forget order and the retained sample")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the measurements")
    return p


def run(args: argparse.Namespace) -> dict:
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown or not names:
        raise ValueError(f"--configs: unknown config(s) {unknown}; known: {sorted(CONFIGS)}")
    if args.shared_oracle is not None and args.shared_oracle not in CONFIGS:
        raise ValueError(f"--shared-oracle: unknown config {args.shared_oracle!r}; known: {sorted(CONFIGS)}")
    if args.retained_articles < 1 or args.threads < 1:
        raise ValueError("--retained-articles and --threads must be positive")
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "data" / "manifest.json").is_file():
        _tool("nulls_dist.cli.data", ["data=synthwiki_1k", f"data.output_dir={work / 'data'}"], work)
    plan = make_plan(work, args.seed, args.retained_articles)
    if args.plan_only:
        return {"plan": plan}
    results_path = work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"configs": {}}
    results.update(plan={k: plan[k] for k in ("seed", "steps", "oracle_steps", "num_trained")},
                   num_retained_articles=len(plan["retained_ids"]))
    for name in names:
        cfg = CONFIGS[name]
        extra = list(args.train_override)
        oracle_cfg = CONFIGS[args.shared_oracle] if args.shared_oracle else cfg
        if oracle_cfg is not cfg:
            log.info("%s: forgotten facts compared with %s's retrain oracles (models that never saw them)",
                     name, oracle_cfg.name)
        results["configs"][name] = run_config(ConfigRun(work, cfg, plan, extra, oracle_cfg), args.threads)
        atomic.write_json(results_path, results)
    results["plots"] = write_plots(results, work / "plots")
    atomic.write_json(results_path, results)
    return results


def _print_summary(results: dict) -> None:
    if "configs" not in results:
        plan = results["plan"]
        print(json.dumps({k: plan[k] for k in ("seed", "steps", "oracle_steps", "num_trained")}
                         | {"forget_order": len(plan["forget_order"]), "retained": len(plan["retained_ids"])}))
        return
    for name, r in results["configs"].items():
        if r["status"] != "measured":
            print(f"{name}: {r['status']}\n    {r['command']}")
            continue
        print(f"{name}: before any forget retained unique-fact accuracy {r['before']['retained_accuracy']:.3f}, "
              f"loss {r['before']['retained_loss']:.3f}")
        for s in r["steps"]:
            line = (f"  F={s['forgotten']:>3}: survivors keep {s['certificate']['mean']:.3f} of their sinks "
                    f"(analytic {s['analytic_retained_share']:.3f}); retained accuracy {s['retained_accuracy']:.3f} "
                    f"({s['against_before']['accuracy_ratio']:.3f} of before), loss {s['retained_loss']:.3f}")
            if "forgotten_unique_facts" in s:
                f = s["forgotten_unique_facts"]
                diff = f["unlearned"]["accuracy_diff_vs_oracle"]
                line += (f"; forgotten facts: original {f['original']['accuracy']:.3f}, unlearned "
                         f"{f['unlearned']['accuracy']:.3f}, oracle {f['oracle']['accuracy']:.3f} "
                         f"(unlearned - oracle {diff[0]:+.3f} [{diff[1]:+.3f}, {diff[2]:+.3f}])")
            print(line)
        print(f"  goal at F=100: {r['goal']}")


@report_errors("nulls-forget-budget-study")
def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    results = run(_parser().parse_args(argv))
    _print_summary(results)


if __name__ == "__main__":
    main()
