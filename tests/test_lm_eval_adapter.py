"""The lm-eval-harness adapter (`NullsLM`) run through the real harness (lm_eval 0.4.13, `simple_evaluate`) on a
local multiple-choice task (a task YAML + JSON data written to tmp_path: five SynthWiki fact probes), on a
debug NULL trained with DeepSpeed. The harness's accuracy must equal the accuracy computed independently
from plain forward passes of the model, in sink_on and sink_off modes; no network (HF offline)."""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from unlearn_helpers import make_ds_checkpoint  # noqa: E402

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.model import LM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from nulls_dist.model import SinkMode  # noqa: E402
from nulls_dist.deploy.checkpoint_io import build_model, load_checkpoint  # noqa: E402
from nulls_dist.deploy.lm_eval_adapter import NullsLM  # noqa: E402

PROBES = Path(__file__).resolve().parents[1] / "data_pipeline" / "bundled" / "synthwiki" / "probes.jsonl"
BOS = 256  # byte tokens are 0..255; the debug vocabulary (4096) has room for a BOS id
TASK_YAML = """task: synthwiki_probes
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode(tokens: list[int]) -> str:
    return bytes(t for t in tokens if t < 256).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    make_ds_checkpoint(root / "run", zero_stage=0, strategy="uniform")
    model = build_model(load_checkpoint(root / "run"))
    docs = []
    for line in PROBES.read_text().splitlines()[:5]:
        probe = json.loads(line)
        choices = [probe["answer"], *probe["distractors"]]
        gold = len(docs) % len(choices)  # the answer at varying positions
        choices[0], choices[gold] = choices[gold], choices[0]
        docs.append({"question": probe["prompt"], "choices": choices, "answer": gold,
                     "source_id": probe["source_ids"][0]})
    data = root / "probes.json"
    data.write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    (root / "tasks").mkdir()
    (root / "tasks" / "synthwiki_probes.yaml").write_text(TASK_YAML.format(data=data))
    return {"model": model, "docs": docs, "tasks": root / "tasks"}


def _mode_for(docs, kind: str):
    """Each probe's prompt -> sink_on its article, or sink_off routed to a neighbour with the article forgotten."""
    by_prompt = {d["question"]: d["source_id"] for d in docs}

    def mode_for(context: str) -> SinkMode:
        sid = by_prompt[context]
        return SinkMode.sink_on(sid) if kind == "sink_on" else SinkMode.sink_off(sid + 1, [sid])
    return mode_for


@torch.no_grad()
def _reference_loglikelihood(model, context: str, continuation: str, mode: SinkMode) -> float:
    """Sum of log p(continuation tokens | prefix) from one plain forward pass (no adapter code)."""
    ctx, cont = [BOS] + encode(context), encode(continuation)
    ids = torch.tensor([ctx + cont])  # (1, T)
    logits = model(ids[:, :-1], None, mode=mode)[0].double()  # (T-1, V)
    logp = torch.log_softmax(logits, dim=-1)
    return float(sum(logp[len(ctx) - 1 + i, tok] for i, tok in enumerate(cont)))


@pytest.mark.parametrize("kind", ["sink_on", "sink_off"])
def test_harness_accuracy_matches_independent_accuracy(setup, kind):
    model, docs = setup["model"], setup["docs"]
    mode_for = _mode_for(docs, kind)
    lm = NullsLM(model, encode, decode, mode_for=mode_for, bos_id=BOS)
    assert isinstance(lm, LM)
    results = simple_evaluate(model=lm, tasks=["synthwiki_probes"], task_manager=TaskManager(
        include_path=str(setup["tasks"]), include_defaults=False), bootstrap_iters=0, log_samples=True,
        random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    harness_acc = results["results"]["synthwiki_probes"]["acc,none"]

    correct, independent = 0, {}
    for doc in docs:
        scores = [_reference_loglikelihood(model, doc["question"], " " + c, mode_for(doc["question"]))
                  for c in doc["choices"]]
        independent[doc["question"]] = scores
        correct += max(range(len(scores)), key=scores.__getitem__) == doc["answer"]
    assert harness_acc == pytest.approx(correct / len(docs), abs=1e-12)
    # the harness saw exactly these log-likelihoods, request by request
    samples = results["samples"]["synthwiki_probes"]
    assert len(samples) == len(docs)
    for sample in samples:
        got = [float(resp[0][0]) for resp in sample["resps"]]
        assert got == pytest.approx(independent[sample["doc"]["question"]], rel=1e-5, abs=1e-4)


def test_modes_change_the_scores_and_rolling_and_generation_work(setup):
    model, docs = setup["model"], setup["docs"]
    doc = docs[0]
    request = Instance("loglikelihood", doc, (doc["question"], " " + doc["choices"][0]), 0)
    on = NullsLM(model, encode, decode, mode_for=_mode_for(docs, "sink_on"), bos_id=BOS).loglikelihood([request])
    off = NullsLM(model, encode, decode, mode_for=_mode_for(docs, "sink_off"), bos_id=BOS).loglikelihood([request])
    assert on[0][0] != off[0][0]  # the per-request mode reaches the model
    lm = NullsLM(model, encode, decode, bos_id=BOS)
    text = " ".join(d["question"] for d in docs) * 3  # longer than the debug block: rolling windows
    assert len(encode(text)) + 1 > model.cfg.block_size
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    with torch.no_grad():  # the same total from disjoint windows, each conditioned on the tokens before it
        ids, block, total = [BOS] + encode(text), model.cfg.block_size, 0.0
        for end in range(1, len(ids), block - 1):
            stop = min(len(ids), end + block - 1)
            window = ids[max(0, stop - block):stop]
            logits = model(torch.tensor([window[:-1]]), None, mode=SinkMode.backbone_only())[0]  # (T-1, V)
            logp = torch.log_softmax(logits.double(), -1)
            n = stop - end
            total += float(logp[-n:].gather(1, torch.tensor(window[-n:])[:, None]).sum())
    assert math.isclose(rolling, total, rel_tol=1e-5)
    (generated,) = lm.generate_until([Instance("generate_until", {}, (doc["question"], {"until": ["\n"],
                                                                                        "max_gen_toks": 8}), 0)])
    assert isinstance(generated, str) and "\n" not in generated
    with pytest.raises(ValueError, match="empty"):
        NullsLM(model, encode, decode).loglikelihood([Instance("loglikelihood", {}, ("", " x"), 0)])
