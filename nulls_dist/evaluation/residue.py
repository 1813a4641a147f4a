"""Where the membership residue lives: token-level attribution of the membership signal that separates a
deployment's forgotten texts from never-trained ones, against a reference that never saw them (the retrain
oracle).

For every predicted token t of a text (log-probs from `metrics.token_logprobs`, T-1 per text) the *gap* is
lp_model(t) - lp_reference(t). A membership attack scores texts; its *signal* against the reference is a
difference in differences over member texts M (the forgotten sources) and non-member texts N (holdout):

    signal = [mean_M s_model - mean_M s_ref] - [mean_N s_model - mean_N s_ref]

It is 0 when the deployment separates M from N exactly as much as the reference does. For the LOSS score (mean
lp) and Min-K% (mean of the lowest k% lp; `metrics.min_k_prob`'s count) the signal is a sum of per-token
contributions, so every token class gets an exact share (the shares of a family add up to 1):
- LOSS: a token contributes (lp_model - lp_ref) / n_i, n_i = the text's predicted tokens;
- Min-K: (lp_model [t in S_model] - lp_ref [t in S_ref]) / k_i, S = the k_i lowest tokens of each model.
Member texts count with weight +1/|M|, non-members with -1/|N|. A class can carry a negative share (its tokens
look *less* member-like in the deployment than in the reference), so shares are not bounded by [0, 1].

A counterfactual complements the shares (Min-K is not linear in the tokens it selects): the AUC of Min-K and of
LOSS after splicing the reference's log-probs into the deployment's on the tokens of one class ("what if this
class carried no residue"), and after splicing them everywhere except that class ("only this class's residue").

Token classes, defined from the corpus (`CorpusIndex`: document frequencies over the reference's training texts,
i.e. the retained sources) and the tokenizer's pieces; each predicted token gets one class per family:
- `token_spread`: how many retained texts contain the target token id: `own` (none: it occurs only in the
  forgotten / never-trained articles), `rare` (1-3), `medium` (4-31), `common` (32 or more; `SPREAD_EDGES`);
- `word_spread`: the same for the whole word the target token belongs to;
- `input_spread`: the same for the *input* token (the one before the target): what the model does right after
  a token only this article uses (residue in the input embedding and the layers reading it);
- `name`: `title` (a word of the article's title), `name` (another capitalised word that does not start a
  sentence: an entity, region or value name) or `content`;
- `mention`: `first` occurrence of the word in the text or a `repeat` (copyable from the context by attention);
- `piece`: `word_start` (the word's first piece) or `continuation` (the spelling of a word already begun);
- `position`: the token's index in the text, bucketed by `POSITION_EDGES`.
Words: a piece starting with "\u2581" (sentencepiece's space) or with a non-alphanumeric character starts a
word; alphanumeric pieces without it continue the previous word. Special pieces (<s>, </s>) are their own word.

Shape legend:  T tokens of a text (T-1 predicted)   V vocabulary
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

from nulls_dist.evaluation import metrics as M

SPACE = "\u2581"  # sentencepiece's word-boundary marker
SPREAD_EDGES = (1, 4, 32)  # retained texts containing it: 0 own | 1-3 rare | 4-31 medium | >= 32 common
SPREAD_CLASSES = ("own", "rare", "medium", "common")
POSITION_EDGES = (16, 64, 128)  # token index buckets: [0,16) [16,64) [64,128) [128, ...)
CONCENTRATED_TOKEN_SHARE = 0.25  # findings: a class under this share of the tokens with over half the signal
FAMILIES = ("token_spread", "word_spread", "input_spread", "name", "mention", "piece", "position")
SENTENCE_END = re.compile(r"[.!?]$")


def position_classes(edges: Sequence[int] = POSITION_EDGES) -> tuple[str, ...]:
    bounds = (0, *edges)
    return tuple(f"{a}-{b - 1}" for a, b in zip(bounds, bounds[1:])) + (f"{bounds[-1]}+",)


def spread_class(df: int, edges: Sequence[int] = SPREAD_EDGES) -> str:
    """The spread class of a document frequency under three ascending `edges` (own | rare | medium | common)."""
    if len(edges) != len(SPREAD_CLASSES) - 1 or list(edges) != sorted(edges):
        raise ValueError(f"spread edges must be {len(SPREAD_CLASSES) - 1} ascending counts, got {tuple(edges)}")
    return SPREAD_CLASSES[int(np.searchsorted(np.asarray(edges), df, side="right"))]


# ------------------------------------------------------------------------------------------------ words
@dataclass(frozen=True)
class Words:
    """The word structure of one token sequence: word index per token and each word's text."""

    word_of: np.ndarray  # (T,) index of the word each token belongs to
    starts: np.ndarray  # (T,) bool: the token is its word's first piece
    texts: list[str]  # one string per word (pieces joined, the space marker removed)


def split_words(tokens: Sequence[int], pieces: Sequence[str], special_ids: Iterable[int] = ()) -> Words:
    """Group a token sequence into words by the pieces' spelling (module docstring)."""
    special = set(int(s) for s in special_ids)
    word_of = np.zeros(len(tokens), dtype=np.int64)
    starts = np.zeros(len(tokens), dtype=bool)
    texts: list[str] = []
    for i, tok in enumerate(int(t) for t in tokens):
        piece = pieces[tok]
        body = piece[1:] if piece.startswith(SPACE) else piece
        continues = (texts and i > 0 and tok not in special and int(tokens[i - 1]) not in special
                     and not piece.startswith(SPACE) and body[:1].isalnum() and texts[-1][-1:].isalnum())
        if continues:
            texts[-1] += body
        else:
            texts.append(body if tok not in special else piece)
            starts[i] = True
        word_of[i] = len(texts) - 1
    return Words(word_of, starts, texts)


# ------------------------------------------------------------------------------------------------ the corpus
@dataclass
class CorpusIndex:
    """Document frequencies over the reference's training texts: per token id and per word."""

    token_df: np.ndarray  # (V,) int64: texts containing the token id
    word_df: dict[str, int]
    num_texts: int
    pieces: list[str]
    special_ids: tuple[int, ...] = ()

    @classmethod
    def build(cls, texts: Iterable[np.ndarray], pieces: Sequence[str], special_ids: Iterable[int] = ()) -> "CorpusIndex":
        token_df = np.zeros(len(pieces), dtype=np.int64)
        word_df: dict[str, int] = {}
        num = 0
        special = tuple(sorted(int(s) for s in special_ids))
        for tokens in texts:
            tokens = np.asarray(tokens, dtype=np.int64)
            token_df[np.unique(tokens)] += 1
            for word in set(split_words(tokens, pieces, special).texts):
                word_df[word] = word_df.get(word, 0) + 1
            num += 1
        return cls(token_df, word_df, num, list(pieces), special)


def token_classes(tokens: Sequence[int], title: str, index: CorpusIndex,
                  spread_edges: Sequence[int] = SPREAD_EDGES,
                  position_edges: Sequence[int] = POSITION_EDGES) -> dict[str, np.ndarray]:
    """{family: (T-1,) array of class names} for the T-1 predicted tokens tokens[1:] of one text."""
    tokens = np.asarray(tokens, dtype=np.int64)
    words = split_words(tokens, index.pieces, index.special_ids)
    title_words = set(title.split())
    spread = np.array([spread_class(int(d), spread_edges) for d in index.token_df[tokens]], dtype=object)  # (T,)
    word_spread = np.array([spread_class(index.word_df.get(w, 0), spread_edges) for w in words.texts], dtype=object)
    name_of_word, seen, first_of_word = [], set(), []
    for w, text in enumerate(words.texts):
        previous = words.texts[w - 1] if w > 0 else ""
        sentence_start = w == 0 or bool(SENTENCE_END.search(previous)) or previous in ("<s>",)
        if text in title_words:
            name_of_word.append("title")
        elif text[:1].isupper() and not sentence_start and text not in ("<s>", "</s>"):
            name_of_word.append("name")
        else:
            name_of_word.append("content")
        first_of_word.append(text not in seen)
        seen.add(text)
    name_of_word = np.array(name_of_word, dtype=object)
    first_of_word = np.array(first_of_word, dtype=bool)
    pos_names = position_classes(position_edges)
    positions = np.arange(len(tokens))
    position = np.array([pos_names[int(np.searchsorted(np.asarray(position_edges), p, side="right"))]
                         for p in positions], dtype=object)
    w = words.word_of
    per_token = {  # (T,) each, for the token at every position
        "token_spread": spread,
        "word_spread": word_spread[w],
        "name": name_of_word[w],
        "mention": np.where(first_of_word[w], "first", "repeat").astype(object),
        "piece": np.where(words.starts, "word_start", "continuation").astype(object),
        "position": position,
    }
    # the predicted tokens are tokens[1:]; the input of prediction i is tokens[i]
    predicted = {family: values[1:] for family, values in per_token.items()}
    predicted["input_spread"] = spread[:-1]
    return {f: predicted[f] for f in FAMILIES}


def family_classes(family: str, spread_edges: Sequence[int] = SPREAD_EDGES,
                   position_edges: Sequence[int] = POSITION_EDGES) -> tuple[str, ...]:
    """The class names of a family, in report order."""
    if family in ("token_spread", "word_spread", "input_spread"):
        return SPREAD_CLASSES
    return {"name": ("title", "name", "content"), "mention": ("first", "repeat"),
            "piece": ("word_start", "continuation"), "position": position_classes(position_edges)}[family]


# ------------------------------------------------------------------------------------------------ attribution
@dataclass
class TextResidue:
    """One text's per-token log-probs in the deployment and the reference, and its token classes."""

    source_id: int
    lp_model: np.ndarray  # (T-1,)
    lp_reference: np.ndarray  # (T-1,)
    classes: dict[str, np.ndarray] = field(default_factory=dict)  # family -> (T-1,) class names
    lp_original: np.ndarray | None = None  # (T-1,) optional: the model before unlearning (Sink-On)

    def __post_init__(self) -> None:
        n = len(self.lp_model)
        if len(self.lp_reference) != n or any(len(c) != n for c in self.classes.values()):
            raise ValueError(f"source {self.source_id}: log-probs and classes must cover the same {n} tokens")
        if self.lp_original is not None and len(self.lp_original) != n:
            raise ValueError(f"source {self.source_id}: lp_original has {len(self.lp_original)} tokens, not {n}")


def _lowest(lp: np.ndarray, k: float) -> np.ndarray:
    """Bool (n,) marking the tokens Min-K% averages (`metrics.min_k_prob`'s count; stable on ties)."""
    n = max(1, int(np.ceil(k * len(lp))))
    mask = np.zeros(len(lp), dtype=bool)
    mask[np.argsort(lp, kind="stable")[:n]] = True
    return mask


def token_contributions(text: TextResidue, k: float) -> dict[str, np.ndarray]:
    """Per-token contributions (T-1,) of one text to its LOSS and Min-K score differences (model - reference);
    each sums exactly to that text's score difference."""
    n = len(text.lp_model)
    low_m, low_r = _lowest(text.lp_model, k), _lowest(text.lp_reference, k)
    kept = low_m.sum()
    return {"loss": (text.lp_model - text.lp_reference) / n,
            "min_k": (np.where(low_m, text.lp_model, 0.0) - np.where(low_r, text.lp_reference, 0.0)) / kept}


def _scores(lps: list[np.ndarray], k: float) -> dict[str, np.ndarray]:
    return {"loss": np.array([lp.mean() for lp in lps]), "min_k": np.array([M.min_k_prob(lp, k) for lp in lps])}


def _aucs(members: list[np.ndarray], non_members: list[np.ndarray], k: float) -> dict[str, float]:
    sm, sn = _scores(members, k), _scores(non_members, k)
    return {s: M.rank_auc(sm[s].tolist(), sn[s].tolist()) for s in sm}


def _splice(text: TextResidue, where: np.ndarray) -> np.ndarray:
    return np.where(where, text.lp_reference, text.lp_model)


def attribute(members: Sequence[TextResidue], non_members: Sequence[TextResidue], k: float = 0.2,
              families: Sequence[str] = FAMILIES, spread_edges: Sequence[int] = SPREAD_EDGES,
              position_edges: Sequence[int] = POSITION_EDGES) -> dict:
    """The residue report (JSON-ready) of members (forgotten texts) vs non-members (holdout texts):

        {k, num_members, num_non_members,
         auc: {model: {loss, min_k}, reference: {...}},
         signal: {loss, min_k}                      # the difference in differences (module docstring)
         families: {family: {class: {num_tokens_members, num_tokens_non_members, mean_gap_members,
                                     mean_gap_non_members, [mean_gap_original_members, sink_share_members,]
                                     signal: {loss, min_k}, share: {loss, min_k},
                                     auc_without: {loss, min_k}, auc_only: {loss, min_k}}}}}

    `mean_gap_*` is the mean of lp_model - lp_reference over the class's tokens; `sink_share_members` (when
    every member has `lp_original`) = 1 - gap / (lp_original - lp_reference) summed over the class: the part of
    the original model's advantage over the reference that unlearning removed (what the sinks held)."""
    if not members or not non_members:
        raise ValueError(f"attribute needs member and non-member texts, got {len(members)} and {len(non_members)}")
    contrib_m = [token_contributions(t, k) for t in members]
    contrib_n = [token_contributions(t, k) for t in non_members]
    wm, wn = 1.0 / len(members), 1.0 / len(non_members)
    signal = {s: wm * sum(c[s].sum() for c in contrib_m) - wn * sum(c[s].sum() for c in contrib_n)
              for s in ("loss", "min_k")}
    with_original = all(t.lp_original is not None for t in members)
    out = {"k": k, "num_members": len(members), "num_non_members": len(non_members),
           "auc": {"model": _aucs([t.lp_model for t in members], [t.lp_model for t in non_members], k),
                   "reference": _aucs([t.lp_reference for t in members], [t.lp_reference for t in non_members], k)},
           "signal": {s: float(v) for s, v in signal.items()}, "families": {}}
    for family in families:
        rows = {}
        for cls in family_classes(family, spread_edges, position_edges):
            in_m = [t.classes[family] == cls for t in members]
            in_n = [t.classes[family] == cls for t in non_members]
            gaps_m = np.concatenate([(t.lp_model - t.lp_reference)[w] for t, w in zip(members, in_m)])
            gaps_n = np.concatenate([(t.lp_model - t.lp_reference)[w] for t, w in zip(non_members, in_n)])
            part = {s: wm * sum(c[s][w].sum() for c, w in zip(contrib_m, in_m))
                    - wn * sum(c[s][w].sum() for c, w in zip(contrib_n, in_n)) for s in ("loss", "min_k")}
            row = {"num_tokens_members": int(gaps_m.size), "num_tokens_non_members": int(gaps_n.size),
                   "mean_gap_members": float(gaps_m.mean()) if gaps_m.size else float("nan"),
                   "mean_gap_non_members": float(gaps_n.mean()) if gaps_n.size else float("nan"),
                   "signal": {s: float(v) for s, v in part.items()},
                   "share": {s: float(part[s] / signal[s]) if signal[s] != 0 else float("nan") for s in part},
                   "auc_without": _aucs([_splice(t, w) for t, w in zip(members, in_m)],
                                        [_splice(t, w) for t, w in zip(non_members, in_n)], k),
                   "auc_only": _aucs([_splice(t, ~w) for t, w in zip(members, in_m)],
                                     [_splice(t, ~w) for t, w in zip(non_members, in_n)], k)}
            if with_original:
                orig = np.concatenate([(t.lp_original - t.lp_reference)[w] for t, w in zip(members, in_m)])
                row["mean_gap_original_members"] = float(orig.mean()) if orig.size else float("nan")
                row["sink_share_members"] = float(1.0 - gaps_m.sum() / orig.sum()) if orig.size and orig.sum() else \
                    float("nan")
            rows[cls] = row
        out["families"][family] = rows
    return out


# ------------------------------------------------------------------------------------------------ reading it
def token_fraction(res: dict, family: str, cls: str) -> float:
    """The share of the member texts' predicted tokens in a class of an `attribute` result."""
    rows = res["families"][family]
    return rows[cls]["num_tokens_members"] / max(1, sum(r["num_tokens_members"] for r in rows.values()))


def strongest(res: dict, family: str, score: str = "min_k") -> tuple[str, dict] | None:
    """The class of `family` (in an `attribute` result) carrying the largest share of `score`'s signal (None when the shares are NaN)."""
    rows = [(c, r) for c, r in res["families"][family].items() if not math.isnan(r["share"][score])]
    return max(rows, key=lambda cr: cr[1]["share"][score]) if rows else None


def text_residues(model_lps: Mapping[int, np.ndarray], reference_lps: Mapping[int, np.ndarray],
                  tokens: Mapping[int, np.ndarray], titles: Mapping[int, str], index: CorpusIndex,
                  source_ids: Sequence[int], original_lps: Mapping[int, np.ndarray] | None = None) -> list[TextResidue]:
    """`TextResidue`s of `source_ids` from per-source log-probs ((T-1,) each, e.g. `metrics.token_logprobs` in
    each model's deployment mode) and the sources' tokens and titles."""
    return [TextResidue(int(s), np.asarray(model_lps[s], np.float64), np.asarray(reference_lps[s], np.float64),
                        token_classes(tokens[s], titles[s], index),
                        None if original_lps is None else np.asarray(original_lps[s], np.float64))
            for s in source_ids]
