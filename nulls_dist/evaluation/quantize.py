"""The quantization attack: a copy of a model whose weights are fake-quantized (quantize -> dequantize) to int8
or int4, to check whether an unlearned model quantized for deployment keeps forgotten facts at the retrain
oracle's level. Zhang et al. 2025 ("Catastrophic Failure of LLM Unlearning via Quantization", ICLR; arXiv
2410.16454, first titled "Does your LLM truly unlearn? An embarrassingly simple approach to recover unlearned
knowledge") find that 4-bit quantization of GA/NPO-unlearned models restores most forgotten knowledge (21% ->
83% retained on average): the unlearning updates are smaller than a quantization step, so the unlearned and the
original weights round to the same grid points.

Scheme (per tensor W of shape (R, C), fp32): symmetric round-to-nearest, one scale per row ("per output
channel") or, with `group_size` g, per row and per run of g consecutive columns (the last run of a row is
shorter when g does not divide C; GPTQ / AWQ use g = 128 for int4):
    qmax = 2**(bits - 1) - 1                     int8: 127, int4: 7 (the code -2**(bits-1) is left unused)
    s    = max|w| over the group / qmax, rounded UP to 17 significant bits; s = 1 for an all-zero group
    q    = clamp(round_half_to_even(w / s), -qmax, qmax)
    w'   = q * s                                  |w' - w| <= s / 2 for every element
Rounding s to 17 bits (at most 2^-16 relative) makes q * s exact in fp32 (|q| needs <= 7 bits), so a second pass
finds max|w'| = qmax * s, the same s and the same codes: quantizing twice equals quantizing once, bit for bit.
With s = max|w| / qmax in fp32, as torchao's `choose_qparams_affine` computes it, fl(fl(127 s) / 127) != s for
about 1% of scales and a second pass moves those rows by an ulp. (torchao 0.18 installs on CPU torch 2.13 and its
`quantize_affine` / `dequantize_affine` give the same values as `fake_quantize` for a given scale; it is not
used because its block sizes must divide the row, which the paper's 500-unit backbone does not for g = 128.)

What is quantized, and why:
- every `nn.Linear` weight (attention qkv / proj, backbone gate / up / down, lm_head): per output channel, i.e.
  per row of the (out, in) weight, groups along the input dimension, as every weight-only scheme does;
- the sink tables `sink_gate`, `sink_up`, `sink_down` (P, D): per ROW, i.e. per sink unit (a row is one unit's
  input weights, or its output vector: `sink_down` is stored transposed, design.md). A per-row scale depends on
  that unit only, so a forgotten source's rows neither set nor share the scale of any survivor's rows, and a
  row zeroed by `hard` unlearning stays exactly zero. (Per output channel of the litgpt `proj`, i.e. per column
  of `sink_down`, every scale would mix all units, forgotten ones included.)
- the token embedding `wte` (V, D), per row (per token), unless `embeddings=False`: a deployer quantizing for
  memory quantizes it too (llama.cpp's Q8_0 / Q4 formats do), while GPTQ / AWQ keep it in 16 bits; post-hoc
  GA / NPO update it like every other weight, so quantizing it gives their updates the most grid to snap to.
- not the RMSNorm weights: vectors of D values, kept in full precision by every scheme.

Masks are not weights. Which sink rows a deployment uses comes from the `SinkMode` and the model's
`SinkAssignment` (host-side index math) at every forward, so quantization can neither re-enable a forgotten
source's sinks under `mask` unlearning nor route anything onto them; the forgotten rows are quantized like
every other row and stay unused. What quantization can change is what every mode shares (backbone, attention,
embeddings, head), and for GA / NPO the fine-tuning updates.
"""
from __future__ import annotations

import copy
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

SCALE_BITS = 17  # significant bits kept in a scale: 24 (fp32) - 7 (|q| <= 127), so q * s is exact in fp32


def _check(bits: int, group_size: int | None) -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in [2, 8], got {bits!r}")
    if group_size is not None and (not isinstance(group_size, int) or group_size <= 0):
        raise ValueError(f"group_size must be a positive integer or None, got {group_size!r}")


def _groups(weight: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """(R, C) -> (R, G, g) fp32, zero-padded on the right when g does not divide C (zeros change no max)."""
    rows, cols = weight.shape
    g = cols if group_size is None else min(group_size, cols)
    return F.pad(weight.detach().float(), (0, (-cols) % g)).view(rows, -1, g)


def group_scales(weight: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """The scales s of `fake_quantize`: (R, G) fp32, G = ceil(C / group_size) (1 per row without groups)."""
    _check(bits, group_size)
    qmax = 2 ** (bits - 1) - 1
    amax = _groups(weight, group_size).abs().amax(dim=-1)  # (R, G)
    mantissa, exponent = torch.frexp(amax / qmax)  # mantissa in [0.5, 1)
    scale = torch.ldexp(torch.ceil(torch.ldexp(mantissa, torch.tensor(SCALE_BITS))), exponent - SCALE_BITS)
    return torch.where(amax > 0, scale, torch.ones_like(scale))


def fake_quantize(weight: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """(R, C) -> (R, C), same dtype: w' = clamp(round(w / s), -qmax, qmax) * s with `group_scales` s."""
    if weight.dim() != 2:
        raise ValueError(f"fake_quantize takes a 2-D weight, got shape {tuple(weight.shape)}")
    qmax = 2 ** (bits - 1) - 1
    scale = group_scales(weight, bits, group_size)[..., None]  # (R, G, 1)
    q = torch.clamp(torch.round(_groups(weight, group_size) / scale), -qmax, qmax)  # (R, G, g)
    rows, cols = weight.shape
    return (q * scale).view(rows, -1)[:, :cols].to(weight.dtype)


def quantized_parameters(model: nn.Module, embeddings: bool = True) -> list[str]:
    """Names (as in `model.named_parameters()`) of the weights `quantize_model` quantizes, in model order."""
    chosen: list[str] = []
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        names = []
        if isinstance(module, nn.Linear) or (embeddings and isinstance(module, nn.Embedding)):
            names = ["weight"]
        elif all(hasattr(module, t) for t in ("sink_gate", "sink_up", "sink_down")):  # NullMLP's row tables
            names = ["sink_gate", "sink_up", "sink_down"]
        for name in names:
            param = getattr(module, name)
            if param is not None and param.dim() == 2 and param.numel() and id(param) not in seen:
                seen.add(id(param))  # a tied weight once
                chosen.append(f"{prefix}.{name}" if prefix else name)
    return chosen


@torch.no_grad()
def quantize_model(model: nn.Module, bits: int, group_size: int | None = None, embeddings: bool = True) -> nn.Module:
    """A deep copy of `model` (a NullTransformer) with every weight of `quantized_parameters` fake-quantized
    in place (module docstring); the norms and the original model are left as they are. Deployment modes,
    routing and forget sets apply to the copy unchanged."""
    _check(bits, group_size)
    store = getattr(model, "sink_store", None)
    if getattr(model, "external_sinks", False) and store is None:
        raise ValueError("quantize_model: this external-storage model has no sink row store attached "
                         "(attach_sink_store): its sink rows come from the caller and cannot be quantized here")
    # an external-storage model's sink rows are a cache of a file (nulls_dist/sink_store.py), filled as plans ask:
    # the copy shares the file reader and quantizes every row, resident or read later, per row as below
    out = copy.deepcopy(model, {id(store.reader): store.reader} if store is not None else None)
    params = dict(out.named_parameters())
    for name in quantized_parameters(out, embeddings):
        params[name].copy_(fake_quantize(params[name], bits, group_size))
    if out.sink_store is not None:
        out.sink_store.transform_rows(functools.partial(fake_quantize, bits=bits, group_size=group_size))
    return out
