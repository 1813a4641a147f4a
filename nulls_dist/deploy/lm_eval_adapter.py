"""An lm-evaluation-harness model adapter for a deployed NULL, so downstream tasks (ARC-E, Winogrande, PIQA,
SciQ, ...) run where their data is available.

Implements lm-eval 0.4's `lm_eval.api.model.LM` interface: `loglikelihood`, `loglikelihood_rolling` and
`generate_until`, each taking a list of `Instance`s whose `.args` are `(context, continuation)`, `(text,)` and
`(context, gen_kwargs)`. Tested against the real harness (lm_eval==0.4.13, a test-only dependency:
tests/test_lm_eval_adapter.py runs `simple_evaluate` on a local task). lm-eval stays optional at runtime: when
it is importable the adapter subclasses its `LM` and registers as `nulls`; pass an instance (the registered
name cannot build one from a model-args string, the adapter needs the model and tokenizer objects):

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    lm = NullsLM(model, encode, decode, mode_for=router, bos_id=tokenizer.bos_id())
    simple_evaluate(model=lm, tasks=["arc_easy"])                       # data from the HF hub, or:
    simple_evaluate(model=lm, tasks=["my_task"], task_manager=TaskManager(include_path="my_tasks/"))

The deployment mode per request comes from `mode_for(context)` (e.g. a Sink-Off router; backbone-only by
default). Contexts are prefixed with `bos_id` when given; an empty context needs it (ValueError otherwise).
"""
from __future__ import annotations

from typing import Callable

import torch

from nulls_dist.model import SinkMode
from nulls_dist.deploy.generate import SamplingConfig, generate

try:  # optional: subclass and register with the harness when it is installed
    from lm_eval.api.model import LM as _LMBase
    from lm_eval.api.registry import register_model as _register
except ImportError:
    _LMBase = object

    def _register(*_names):
        return lambda cls: cls


@_register("nulls")
class NullsLM(_LMBase):
    def __init__(self, model, encode: Callable[[str], list[int]], decode: Callable[[list[int]], str],
                 mode_for: Callable[[str], SinkMode] | None = None, bos_id: int | None = None,
                 max_gen_toks: int = 64) -> None:
        if _LMBase is not object:
            super().__init__()
        self.model = model.eval()
        self.encode, self.decode = encode, decode
        self.mode_for = mode_for or (lambda _context: SinkMode.backbone_only())
        self.bos = [bos_id] if bos_id is not None else []
        self.max_gen_toks = max_gen_toks

    def _window(self, ids: list[int]) -> list[int]:
        return ids[-self.model.cfg.block_size:]

    @torch.no_grad()
    def _score(self, context: list[int], continuation: list[int], mode: SinkMode) -> tuple[float, bool]:
        if not context:  # the first continuation token needs something to be predicted from
            raise ValueError("empty context and no bos_id: pass bos_id to score continuations of empty contexts")
        ids = self._window(context + continuation)
        n = len(continuation)
        logits = self.model(torch.tensor([ids[:-1]]), None, mode=mode)[0, -n:]  # (n, V)
        logp = torch.log_softmax(logits.float(), dim=-1)
        target = torch.tensor(ids[-n:])
        total = float(logp.gather(1, target[:, None]).sum())
        return total, bool((logp.argmax(dim=-1) == target).all())

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        out = []
        for req in requests:
            context, continuation = req.args
            cont = self.encode(continuation)
            if not cont:
                raise ValueError(f"empty continuation for context {context[:40]!r}")
            out.append(self._score(self.bos + self.encode(context), cont, self.mode_for(context)))
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        for req in requests:
            (text,) = req.args
            ids, mode, total = self.encode(text), self.mode_for(text), 0.0
            block = self.model.cfg.block_size
            context = list(self.bos) if self.bos else ids[:1]
            rest = ids if self.bos else ids[1:]
            for start in range(0, len(rest), block - 1):
                piece = rest[start:start + block - 1]
                total += self._score(context[-(block - len(piece)):], piece, mode)[0]
                context = context + piece
            out.append(total)
        return out

    def generate_until(self, requests) -> list[str]:
        out = []
        for req in requests:
            context, kwargs = req.args
            until = kwargs.get("until") or []
            cfg = SamplingConfig(max_new_tokens=int(kwargs.get("max_gen_toks", self.max_gen_toks)),
                                 temperature=float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0)
            prompt = self._window(self.bos + self.encode(context))[-(self.model.cfg.block_size - cfg.max_new_tokens):]
            tokens = generate(self.model, torch.tensor(prompt), self.mode_for(context), cfg).tokens[0, len(prompt):]
            text = self.decode(tokens.tolist())
            cut = min([text.find(u) for u in until if u and u in text], default=len(text))
            out.append(text[:cut])
        return out
