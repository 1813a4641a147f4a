"""The two-checkpoint comparison: given the checkpoint before unlearning and the one after (a purged training tag,
a hard deployment, or for the mask method the same weights), which rows changed, whether the change is exactly the
forgotten sinks, and what an attacker holding both learns -- measured, not argued.

What is measured (`compare_checkpoints`):
- `rows`: per layer, the sink rows whose gate, up or down vector differs (and the rows that are exactly zero in
  `after`); the elements changed outside the sink tables; with the forget set, whether the changed rows are
  exactly the union of its sinks (`exact`), and what lies outside / inside it unchanged;
- `identification`: the attacker ranks every trained source of the manifest by the share of its sinks whose rows
  changed (`diff`), or -- holding only `after` -- whose rows are all zero (`after_only`: zeroing is itself a
  fingerprint). Against the true forget set: AUC (ties count half), precision at |F| (ties broken by a seeded
  permutation), and the "all sinks changed" candidate set (its size, precision and recall);
- `knowledge`: the `before` rows the diff points at are the forgotten knowledge itself. With probes (SynthWiki
  schema) the unique facts of the forgotten sources are asked in Sink-On mode of `before` (the attacker re-enables
  the masks), of `after`, and of `after` with the changed rows grafted back from `before`; collateral sources'
  facts in Sink-On of both show what survivors lose.

`report_section(result)` is its section of the evaluation report (`nulls-eval --compare-before/--compare-after`),
`markdown_section(result)` the markdown with its heading; `write_diff` (`nulls-unlearn diff --out`) writes `diff.json`, `diff.md` and
`diff.png` (the attackers' score histograms, forgotten sources against the others).

Shapes: L layers, P sink-pool rows per layer, S trained sources, K sinks per source.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from nulls_dist.audit.collateral import forget_sinks
from nulls_dist.audit.manifest import iter_manifest, read_index, sinks_array
from nulls_dist.deploy.checkpoint_io import LoadedCheckpoint, build_model, sink_table_keys
from nulls_dist.evaluation import metrics as M
from nulls_dist.evaluation.membership import auc
from nulls_dist.evaluation.report import ReportSection
from nulls_dist.formats import atomic
from nulls_dist.formats.weights import state_dict_digest
from nulls_dist.model import SinkMode

MAX_PROBES = 64  # per group: the forward passes dominate the comparison's time on a CPU
TOP_CANDIDATES = 20
HISTOGRAM_EDGES = np.linspace(0.0, 1.0, 21)  # the attacker's score (a share of sinks) in 20 bins; 1.0 in the last
TITLE = "Two checkpoints: what an attacker holding both learns"
SECTION_KEY = "checkpoint_diff"  # report.json: sections.checkpoint_diff
SECTION_PNG = "checkpoint_diff.png"


# ------------------------------------------------------------------------------------------------ rows
def row_changes(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], n_layer: int) -> dict[str, Any]:
    """changed (L, P) bool (any of the three tables differs), zero_after (L, P) bool (all three are zero in
    `after`), and the elements changed in every tensor that is not a sink table."""
    if sorted(before) != sorted(after):
        raise ValueError(f"the checkpoints hold different tensors: only in before {sorted(set(before) - set(after))[:5]}"
                         f", only in after {sorted(set(after) - set(before))[:5]}")
    changed, zero = [], []
    for layer in range(n_layer):
        keys = sink_table_keys(layer)
        changed.append(np.any([(before[k] != after[k]).any(dim=1).numpy() for k in keys], axis=0))  # (P,)
        zero.append(np.all([(after[k] == 0).all(dim=1).numpy() for k in keys], axis=0))
    sink = {k for layer in range(n_layer) for k in sink_table_keys(layer)}
    other = {k: int((before[k] != after[k]).sum()) for k in sorted(before) if k not in sink}
    return {"changed": np.stack(changed), "zero_after": np.stack(zero),
            "other_elements_changed": {k: v for k, v in other.items() if v}}


def _trained_sinks(manifest_dir: str | Path) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(S,) ids, titles and (S, L', K) sinks (-1 padded) of every trained source of the manifest."""
    ids, titles, sinks = [], [], []
    for batch in iter_manifest(manifest_dir, columns=["source_id", "title", "trained", "sinks"]):
        keep = batch.column("trained").to_numpy(zero_copy_only=False)
        ids.append(batch.column("source_id").to_numpy()[keep])
        titles += [t for t, k in zip(batch.column("title").to_pylist(), keep) if k]
        sinks.append(sinks_array(batch.column("sinks").filter(keep)))
    width = max((s.shape[2] for s in sinks), default=0)
    sinks = [np.pad(s, ((0, 0), (0, 0), (0, width - s.shape[2])), constant_values=-1) for s in sinks]
    return np.concatenate(ids), titles, np.concatenate(sinks)


def _share(sinks: np.ndarray, flags: np.ndarray) -> np.ndarray:
    """(S, L', K) sinks, (L, P) flags -> (S,) share of each source's sink keys flagged (a shared-mask key is
    flagged when its row is flagged in any layer; a layer-specific key in its layer)."""
    keyed = flags.any(axis=0, keepdims=True) if sinks.shape[1] == 1 else flags  # (L', P)
    valid = sinks >= 0
    hit = np.where(valid, keyed[np.arange(sinks.shape[1])[None, :, None], np.where(valid, sinks, 0)], False)
    counts = valid.sum(axis=(1, 2))
    return np.where(counts > 0, hit.sum(axis=(1, 2)) / np.maximum(counts, 1), 0.0)


def _ranking(scores: np.ndarray, ids: np.ndarray, forget: set[int] | None, titles: list[str]) -> dict[str, Any]:
    order = np.lexsort((np.random.default_rng(0).permutation(len(ids)), -scores))  # ties: a seeded shuffle
    candidates = ids[scores >= 1.0]
    member = np.isin(ids, sorted(forget or ()))
    out: dict[str, Any] = {
        "num_sources": int(len(ids)), "num_all_sinks_flagged": int(len(candidates)),
        "top": [{"source_id": int(ids[i]), "title": titles[i], "score": float(scores[i])}
                for i in order[:TOP_CANDIDATES]],
        "histogram": {"edges": HISTOGRAM_EDGES.tolist(),
                      "forgotten": np.histogram(scores[member], HISTOGRAM_EDGES)[0].tolist(),
                      "others": np.histogram(scores[~member], HISTOGRAM_EDGES)[0].tolist()}}
    if forget:
        k = int(member.sum())
        hits = int(np.isin(candidates, sorted(forget)).sum())
        out.update({
            "auc": auc(scores[member], scores[~member]),
            "precision_at_num_forgotten": float(member[order[:k]].mean()) if k else float("nan"),
            "candidates_precision": hits / len(candidates) if len(candidates) else float("nan"),
            "candidates_recall": hits / k if k else float("nan"),
            "survivors_scoring_at_least_min_forgotten": int((scores[~member] >= scores[member].min()).sum())
            if k else 0,
        })
    return out


# ------------------------------------------------------------------------------------------------ knowledge
def _probe_accuracy(model, probes: list[tuple[dict, int]], encode, bos_id) -> dict[str, Any]:
    results = [M.score_probe(model, p, SinkMode.sink_on(sid), encode, bos_id) for p, sid in probes]
    summary = M.summarise_probes(results)
    return {"num": summary["num"], "accuracy": summary["accuracy"], "accuracy_ci95": summary["accuracy_ci95"],
            "truth_ratio_gmean": summary["truth_ratio_gmean"]}


def _knowledge(before: LoadedCheckpoint, after: LoadedCheckpoint, changed: np.ndarray, forget: set[int],
               collateral: set[int], probes: list[dict], encode: Callable[[str], list[int]],
               bos_id: int | None) -> dict[str, Any]:
    """Sink-On accuracy on the forgotten sources' unique facts (before / after / after + the diff grafted back)
    and on collateral sources' unique facts (before / after)."""
    groups: dict[str, list[tuple[dict, int]]] = {"unique_forget": [], "unique_collateral": []}
    for p in probes:
        ids = [int(s) for s in p["source_ids"]]
        if p["kind"] == "unique" and ids and ids[0] in forget:
            groups["unique_forget"].append((p, ids[0]))
        elif p["kind"] == "unique" and ids and ids[0] in collateral:
            groups["unique_collateral"].append((p, ids[0]))
    groups = {k: v[:MAX_PROBES] for k, v in groups.items()}
    grafted = dict(after.state_dict)
    for layer in range(changed.shape[0]):
        rows = torch.from_numpy(np.nonzero(changed[layer])[0])
        for key in sink_table_keys(layer):
            table = grafted[key].clone()
            table[rows] = before.state_dict[key][rows]
            grafted[key] = table
    models = {"before": build_model(before), "after": build_model(after),
              "after_with_diff_grafted": build_model(LoadedCheckpoint(grafted, after.meta, after.path, after.kind))}
    with torch.no_grad():
        out = {"sink_on_unique_forget": {name: _probe_accuracy(m, groups["unique_forget"], encode, bos_id)
                                         for name, m in models.items()},
               "sink_on_unique_collateral": {name: _probe_accuracy(models[name], groups["unique_collateral"], encode,
                                                                   bos_id) for name in ("before", "after")}}
    out["grafted_equals_before"] = all(torch.equal(grafted[k], before.state_dict[k]) for k in grafted
                                       if ".sink_" in k)
    return out


# ------------------------------------------------------------------------------------------------ compare
def compare_checkpoints(before: LoadedCheckpoint, after: LoadedCheckpoint, manifest_dir: str | Path,
                        forget_ids: list[int] | None = None, probes: list[dict] | None = None,
                        encode: Callable[[str], list[int]] | None = None, bos_id: int | None = None) -> dict[str, Any]:
    """The comparison of the module docstring, JSON-ready. `forget_ids` (the truth) scores the attacker;
    `probes` + `encode` measure the knowledge the diff exposes."""
    cfg, index = before.model_config, read_index(manifest_dir)
    if (cfg.n_layer, cfg.n_sink) != (index["n_layer"], index["n_sink"]) or \
            (after.model_config.n_layer, after.model_config.n_sink) != (cfg.n_layer, cfg.n_sink):
        raise ValueError(f"the checkpoints and the manifest {manifest_dir} describe different models "
                         f"(layers x sink rows: before {cfg.n_layer}x{cfg.n_sink}, after {after.model_config.n_layer}"
                         f"x{after.model_config.n_sink}, manifest {index['n_layer']}x{index['n_sink']})")
    diff = row_changes(before.state_dict, after.state_dict, cfg.n_layer)
    changed, zero = diff["changed"], diff["zero_after"]
    result: dict[str, Any] = {
        "before": {"path": str(before.path), "sha256": state_dict_digest(before.state_dict)},
        "after": {"path": str(after.path), "sha256": state_dict_digest(after.state_dict)},
        "rows": {"layers": cfg.n_layer, "rows_per_layer": cfg.n_sink,
                 "changed_per_layer": changed.sum(axis=1).tolist(), "changed_total": int(changed.sum()),
                 "zero_after_total": int(zero.sum()), "other_elements_changed": diff["other_elements_changed"]},
    }
    forget = set(int(s) for s in forget_ids) if forget_ids else None
    if forget:
        union = forget_sinks(manifest_dir, sorted(forget)).union  # (L, P)
        result["rows"].update({
            "forgotten_total": int(union.sum()), "changed_outside_forgotten": int((changed & ~union).sum()),
            "forgotten_unchanged": int((union & ~changed).sum()),
            "exact": bool(np.array_equal(changed, union)) and not diff["other_elements_changed"]})
    ids, titles, sinks = _trained_sinks(manifest_dir)
    result["identification"] = {"diff": _ranking(_share(sinks, changed), ids, forget, titles),
                                "after_only": _ranking(_share(sinks, zero), ids, forget, titles)}
    if probes is not None and encode is not None and forget:
        collateral = {int(s) for s, score in zip(ids, _share(sinks, forget_sinks(manifest_dir, sorted(forget)).union))
                      if score > 0 and int(s) not in forget}
        result["knowledge"] = _knowledge(before, after, changed, forget, collateral, probes, encode, bos_id)
    result["headline"] = _headline(result)
    return result


def _headline(result: dict[str, Any]) -> dict[str, Any]:
    rows, ident = result["rows"], result["identification"]["diff"]
    out = {"changed_rows": rows["changed_total"], "exact": rows.get("exact"), "auc": ident.get("auc"),
           "precision_at_num_forgotten": ident.get("precision_at_num_forgotten"),
           "after_only_auc": result["identification"]["after_only"].get("auc")}
    if "knowledge" in result:
        forget = result["knowledge"]["sink_on_unique_forget"]
        out.update({f"forgotten_facts_{k}": v["accuracy"] for k, v in forget.items()})
    return out


# ------------------------------------------------------------------------------------------------ report
def _f(x: Any) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def markdown_section(result: dict[str, Any]) -> str:
    """The comparison as a markdown section with its heading (`diff.md`)."""
    return f"## {TITLE}\n\n" + markdown_body(result)


def markdown_body(result: dict[str, Any]) -> str:
    """The comparison's markdown under its heading (the evaluation report's section, `diff.md`)."""
    rows = result["rows"]
    total = rows["layers"] * rows["rows_per_layer"]
    other = sum(rows["other_elements_changed"].values())
    lines = ["**What an attacker holding both learns:** " + _meaning(result), "",
             f"Before `{result['before']['path']}` (sha256 {result['before']['sha256'][:16]}...), after "
             f"`{result['after']['path']}` ({result['after']['sha256'][:16]}...)"
             + (f"; compared in {result['seconds']:.1f} s" if "seconds" in result else "") + ".", "",
             f"- Changed: {rows['changed_total']} of {total} sink rows ({rows['layers']} layers x "
             f"{rows['rows_per_layer']}), {other} elements outside the sink tables; {rows['zero_after_total']} sink "
             "rows are exactly zero after."]
    if "exact" in rows:
        lines.append(f"- The change is exactly the forgotten sinks (the union of the forget set's, "
                     f"{rows['forgotten_total']} rows): **{'yes' if rows['exact'] else 'no'}** "
                     f"({rows['changed_outside_forgotten']} changed rows outside it, {rows['forgotten_unchanged']} of "
                     "its rows unchanged).")
    lines += ["", "| attacker holds | sources flagged (all sinks) | AUC | precision at F | candidates precision / "
              "recall |", "| --- | --- | --- | --- | --- |"]
    for name, label in (("diff", "before and after"), ("after_only", "after only (zero rows)")):
        r = result["identification"][name]
        lines.append(f"| {label} | {r['num_all_sinks_flagged']} of {r['num_sources']} | {_f(r.get('auc'))} | "
                     f"{_f(r.get('precision_at_num_forgotten'))} | {_f(r.get('candidates_precision'))} / "
                     f"{_f(r.get('candidates_recall'))} |")
    if "knowledge" in result:
        k = result["knowledge"]
        lines += ["", "Sink-On accuracy on unique facts (the attacker re-enables the masks):", "",
                  "| model | forgotten sources | collateral sources |", "| --- | --- | --- |"]
        for name in ("before", "after", "after_with_diff_grafted"):
            f = k["sink_on_unique_forget"][name]
            c = k["sink_on_unique_collateral"].get(name)
            collateral = f"{_f(c['accuracy'])} (n={c['num']})" if c else "-"
            lines.append(f"| {name} | {_f(f['accuracy'])} (n={f['num']}) | {collateral} |")
    return "\n".join(lines + [""])


def _meaning(result: dict[str, Any]) -> str:
    rows, diff = result["rows"], result["identification"]["diff"]
    if rows["changed_total"] == 0 and not rows["other_elements_changed"]:
        return ("the weights did not change (the mask method): the pair tells nothing the after checkpoint does not, "
                "and the forgotten rows are still in both -- anyone holding them can re-enable the masks.")
    if rows.get("exact"):
        where = f"the diff is exactly the forget set's {rows['forgotten_total']} sink rows"
    elif "exact" in rows:
        where = (f"the diff is not exactly the forget set's sink rows ({rows['changed_outside_forgotten']} changed "
                 f"rows outside them, {rows['forgotten_unchanged']} of them unchanged)")
    else:
        where = f"the diff names {rows['changed_total']} changed sink rows"
    text = (f"{where}; ranking sources by the share of their sinks that changed "
            f"identifies the forget set with AUC {_f(diff.get('auc'))}, and the after checkpoint alone (its zero rows) "
            f"with AUC {_f(result['identification']['after_only'].get('auc'))}. ")
    if "knowledge" in result:
        k = result["knowledge"]["sink_on_unique_forget"]
        text += (f"The before checkpoint's rows are the forgotten facts themselves: re-enabling the masks there "
                 f"answers {_f(k['before']['accuracy'])} of them, the after checkpoint {_f(k['after']['accuracy'])}, "
                 f"and the after checkpoint with the diff grafted back {_f(k['after_with_diff_grafted']['accuracy'])}.")
    else:
        text += "The before checkpoint's changed rows are the forgotten knowledge itself (pass probes to measure it)."
    return text + " Whoever keeps the before checkpoint keeps what was forgotten: purge every copy."


def plot_scores(result: dict[str, Any], path: str | Path) -> Path:
    """`diff.png`: the attacker's scores of forgotten sources against all others, for both attackers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), sharey=True)
    for ax, (name, label) in zip(axes, (("diff", "holding before and after: rows changed"),
                                        ("after_only", "holding after only: rows exactly zero"))):
        hist = result["identification"][name]["histogram"]
        edges = np.asarray(hist["edges"])
        width = np.diff(edges)
        ax.bar(edges[:-1], hist["others"], width=width, align="edge", color="tab:blue", alpha=0.6,
               label="other trained sources")
        ax.bar(edges[:-1], hist["forgotten"], width=width, align="edge", color="tab:red", alpha=0.8,
               label="forgotten sources")
        ax.set_yscale("symlog")
        ax.set_xlabel("share of the source's sinks flagged")
        ax.set_title(label, fontsize=10)
    axes[0].set_ylabel("sources")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return Path(path)


def report_section(result: dict[str, Any]) -> ReportSection:
    """The comparison as a section of the evaluation report: `sections.checkpoint_diff` in report.json, the
    markdown body, and `checkpoint_diff.png` (the attackers' scores) in the report directory."""
    return ReportSection(SECTION_KEY, TITLE, markdown_body(result) + f"\n![the attacker's scores]({SECTION_PNG})",
                         result, lambda out_dir: [plot_scores(result, Path(out_dir) / SECTION_PNG).name])


def write_diff(result: dict[str, Any], out_dir: str | Path) -> dict[str, str]:
    """`diff.json`, `diff.md` and `diff.png` in `out_dir`, each written atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out_dir / "diff.json", json.dumps(result, indent=2, sort_keys=True) + "\n")
    atomic.write_text(out_dir / "diff.md", markdown_section(result) + "\n![the attacker's scores](diff.png)\n")
    plot_scores(result, out_dir / "diff.png")
    return {"json": str(out_dir / "diff.json"), "markdown": str(out_dir / "diff.md"), "png": str(out_dir / "diff.png")}
