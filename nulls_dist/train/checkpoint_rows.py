"""Where each parameter's rows live inside DeepSpeed's own checkpoint files, and zeroing chosen rows there: the
DeepSpeed half of `nulls-unlearn purge` (`nulls_dist/audit/purge.py` owns the rest and receives a `DeepSpeedRows`
from the entry point, so the audit never imports the trainer).

The trainer writes these files (`Checkpointer.save`), so the knowledge of their layout lives beside it. Every
pickle is read through `weights_only_loads()` (torch's restricted unpickler with DeepSpeed's few classes allowed)
and memory-mapped, and written back with `torch.save`; `torch.load` then builds the same objects as before, only
the chosen rows are zero. A file is parsed completely: every tensor it holds must be a known piece of a known
parameter (module weights, fp32 master weights, Adam's `exp_avg` / `exp_avg_sq`, scalar steps), otherwise the
file is refused (`CheckpointError` naming the file and the tensor's key path) rather than half rewritten.

Layouts (DeepSpeed 0.19, data parallel only: `mp_rank_00`; N ranks `r`; parameter order = the order of the
optimizer's parameter groups, `trainer.param_groups`):

| file | holds | where a parameter's elements are |
| --- | --- | --- |
| `mp_rank_00_model_states.pt` (ZeRO 0-2) | `module`: every weight, fp32 or bf16 | the whole tensor |
| same, ZeRO 0 | `optimizer`: torch AdamW's state (`state[i]`, i = position in the groups), or DeepSpeed's bf16 wrapper (`optimizer_state_dict` + `fp32_groups[g][j]`) | whole tensors |
| `[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt` (ZeRO 1-2, bf16 optimizer) | per group g: the rank's slice of the flat fp32 master (`single_partition_of_fp32_groups[g]`) and of `exp_avg`, `exp_avg_sq` | `param_slice_mappings[g][name]` = (start in the slice, numel); the parameter's fragments follow rank order |
| `zero_pp_rank_<r>_mp_rank_00_model_states.pt` (ZeRO 3) | `module`: empty placeholders; `param_shapes` | nothing |
| `zero_pp_rank_<r>_mp_rank_00_optim_states.pt` (ZeRO 3) | `fp32_flat_groups[g]`, its `exp_avg`, `exp_avg_sq` | per parameter in `param_shapes[g]` order, ceil(numel / N) elements (`zero3_partitioned_param_info`); rank r holds elements [r * that, ...) |
| universal checkpoint `zero/<name>/{fp32,exp_avg,exp_avg_sq}.pt` | `{"param": the full tensor, ...}`; `step.pt` a scalar; `zero/optimizer_state.pt` param groups, no tensor | the whole tensor |

Tensor and pipeline parallel files (`mp_rank_01`, ...) and other optimizers' layouts are refused.
"""
from __future__ import annotations

import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from nulls_dist.formats.checkpoint import CheckpointError
from nulls_dist.train.checkpoint import weights_only_loads

MODEL_STATES_RE = re.compile(r"^(?:(?:bf16_)?zero_pp_rank_(?P<dp>\d+)_)?mp_rank_(?P<mp>\d+)_model_states\.pt$")
OPTIM_STATES_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(?P<dp>\d+)_mp_rank_(?P<mp>\d+)_optim_states\.pt$")
UNIVERSAL_RE = re.compile(r"^zero/(?P<param>[^/]+)/(?P<state>fp32|exp_avg|exp_avg_sq|step)\.pt$")
UNIVERSAL_COMMON = "zero/optimizer_state.pt"  # the optimizer's param groups and loss scaler: no tensors
UNIVERSAL_ROLES = {"fp32": "master", "exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class Fragment:
    """A run of one parameter's flattened elements inside one tensor of a file."""

    path: tuple  # key path of the tensor inside the loaded object
    role: str  # module | master | exp_avg | exp_avg_sq
    param: str
    tensor_start: int  # first element in the (flattened) tensor
    param_start: int  # first element in the (flattened) parameter
    numel: int


@dataclass
class ParamTable:
    """The model's parameters as the trainer hands them to the optimizer."""

    shapes: dict[str, tuple[int, ...]]
    groups: list[list[str]]  # names per optimizer parameter group, in order


def param_table(model_cfg, external_sinks: bool = False) -> ParamTable:
    """Parameter shapes and the trainer's optimizer groups, from a model built on the meta device (no memory).
    `external_sinks`: the engine of a sharded-table run, built as the trainer builds it (sink_storage="external":
    every parameter but the sink tables, which live in the TorchRec tables)."""
    from nulls_dist.model import NullTransformer
    from nulls_dist.train.trainer import param_groups

    with torch.device("meta"):
        model = NullTransformer(model_cfg, sink_storage="external" if external_sinks else "dense")
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [[names[id(p)] for p in g["params"]] for g in param_groups(model, 0.0)]
    return ParamTable({n: tuple(p.shape) for n, p in model.named_parameters()}, groups)


def is_deepspeed_file(rel: str) -> bool:
    """True for the files of a tag (or universal tag) that are DeepSpeed's and that this module parses."""
    return bool(MODEL_STATES_RE.match(rel) or OPTIM_STATES_RE.match(rel) or UNIVERSAL_RE.match(rel)) or \
        rel == UNIVERSAL_COMMON


def _load(path: Path) -> Any:
    try:
        with weights_only_loads():
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: holds an object DeepSpeed's checkpoints never hold; refused without "
                              f"running it ({reason})") from None
    except (RuntimeError, OSError, EOFError) as exc:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({exc})") from None


def _get(obj: Any, path: tuple) -> Any:
    for key in path:
        obj = obj[key]
    return obj


def _walk(obj: Any, path: tuple = ()) -> Iterator[tuple[tuple, torch.Tensor]]:
    """Every tensor in a loaded object, with its key path."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _walk(value, path + (key,))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _walk(value, path + (i,))


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _need(cond: bool, where: Path, what: str) -> None:
    if not cond:
        raise CheckpointError(f"{where}: {what}")


# ------------------------------------------------------------------------------------------------ parsing
def _whole(path: tuple, role: str, name: str, tensor: torch.Tensor, table: ParamTable, where: Path) -> Fragment:
    shape = table.shapes.get(name)
    _need(shape is not None, where, f"`{_dotted(path)}` names {name!r}, which is not a parameter of the model")
    _need(tuple(tensor.shape) == shape, where, f"`{_dotted(path)}` has shape {tuple(tensor.shape)}, the model's "
          f"{name} is {shape}")
    return Fragment(path, role, name, 0, 0, tensor.numel())


def _adam_state(state: dict, base: tuple, index: Any, name: str, table: ParamTable, where: Path,
                whole: bool) -> list[Fragment]:
    entry = state.get(index)
    _need(isinstance(entry, dict) and all(k in entry for k in ADAM_MOMENTS), where,
          f"`{_dotted(base + (index,))}` is not an Adam state (exp_avg, exp_avg_sq)")
    out = []
    for moment in ADAM_MOMENTS:
        path = base + (index, moment)
        out.append(_whole(path, moment, name, entry[moment], table, where) if whole else
                   Fragment(path, moment, name, 0, 0, 0))
    return out


def _torch_optimizer(opt: dict, base: tuple, table: ParamTable, where: Path) -> list[Fragment]:
    """torch AdamW's state dict (ZeRO 0): state[i] for the i-th parameter of the groups, in order."""
    groups = opt.get("param_groups")
    _need(isinstance(groups, list) and len(groups) == len(table.groups), where,
          f"`{_dotted(base)}` has {len(groups or [])} parameter groups, the trainer makes {len(table.groups)}")
    out = []
    for g, (saved, names) in enumerate(zip(groups, table.groups)):
        indices = saved.get("params", [])
        _need(len(indices) == len(names), where, f"`{_dotted(base)}.param_groups.{g}` lists {len(indices)} "
              f"parameters, the trainer's group {g} has {len(names)}")
        for index, name in zip(indices, names):
            if index in opt["state"]:  # a parameter never stepped has no state
                out += _adam_state(opt["state"], base + ("state",), index, name, table, where, whole=True)
    return out


def _model_states(obj: Any, where: Path, table: ParamTable) -> list[Fragment]:
    _need(isinstance(obj, dict) and isinstance(obj.get("module"), dict), where, "no `module` state dict")
    out = []
    for name, tensor in obj["module"].items():
        if tensor.numel() == 0:  # ZeRO 3 placeholder: the elements live in the optimizer files
            _need(name in table.shapes, where, f"`module.{name}` is not a parameter of the model")
            continue
        out.append(_whole(("module", name), "module", name, tensor, table, where))
    opt = obj.get("optimizer")
    if opt is None:
        return out
    _need(isinstance(opt, dict), where, "`optimizer` is not a state dict")
    if "state" in opt and "param_groups" in opt:
        return out + _torch_optimizer(opt, ("optimizer",), table, where)
    if "optimizer_state_dict" in opt and "fp32_groups" in opt:  # DeepSpeed's bf16 / fp16 unfused wrapper
        out += _torch_optimizer(opt["optimizer_state_dict"], ("optimizer", "optimizer_state_dict"), table, where)
        for g, (tensors, names) in enumerate(zip(opt["fp32_groups"], table.groups)):
            _need(len(tensors) == len(names), where, f"`optimizer.fp32_groups.{g}` holds {len(tensors)} tensors, "
                  f"the trainer's group {g} has {len(names)}")
            out += [_whole(("optimizer", "fp32_groups", g, j), "master", n, t, table, where)
                    for j, (t, n) in enumerate(zip(tensors, names))]
        return out
    raise CheckpointError(f"{where}: `optimizer` has an unknown layout (keys {sorted(opt)[:8]})")


def _flat(obj: Any, where: Path, param_starts: dict[tuple[int, str], int]) -> list[Fragment]:
    """ZeRO 1-2 (and DeepSpeed's bf16 optimizer): the rank's slices of each group's flat vectors."""
    osd = obj["optimizer_state_dict"]
    masters, maps = osd["single_partition_of_fp32_groups"], osd["param_slice_mappings"]
    state = osd["base_optimizer_state"]["state"]
    base = ("optimizer_state_dict",)
    out = []
    for g, master in enumerate(masters):
        moments = state.get(g, {})
        for moment in ADAM_MOMENTS:
            _need(moment in moments and moments[moment].numel() == master.numel(), where,
                  f"`base_optimizer_state.state.{g}.{moment}` does not match the fp32 slice of group {g}")
        for name, frag in maps[g].items():
            start, numel = int(frag.start), int(frag.numel)
            _need(0 <= start and start + numel <= master.numel(), where,
                  f"`param_slice_mappings.{g}.{name}` = ({start}, {numel}) lies outside the group's slice")
            param_start = param_starts.get((g, name), 0)
            param_starts[(g, name)] = param_start + numel
            out.append(Fragment(base + ("single_partition_of_fp32_groups", g), "master", name, start, param_start,
                                numel))
            out += [Fragment(base + ("base_optimizer_state", "state", g, m), m, name, start, param_start, numel)
                    for m in ADAM_MOMENTS]
    return out


def _zero3(obj: Any, where: Path, rank: int, param_shapes: list[dict]) -> list[Fragment]:
    from deepspeed.utils.zero_to_fp32 import zero3_partitioned_param_info

    osd = obj["optimizer_state_dict"]
    flats, state, world = osd["fp32_flat_groups"], osd["optimizer_state_dict"]["state"], int(osd["partition_count"])
    _need(len(flats) == len(param_shapes), where, f"{len(flats)} flat groups but {len(param_shapes)} groups of "
          "parameter shapes in the model-states file")
    base = ("optimizer_state_dict",)
    out = []
    for g, (flat, shapes) in enumerate(zip(flats, param_shapes)):
        offset = 0
        for name, shape in shapes.items():
            numel = math.prod(shape)
            part, _ = zero3_partitioned_param_info(numel, world)
            held = max(0, min(part, numel - rank * part))
            out.append(Fragment(base + ("fp32_flat_groups", g), "master", name, offset, rank * part, held))
            out += [Fragment(base + ("optimizer_state_dict", "state", g, m), m, name, offset, rank * part, held)
                    for m in ADAM_MOMENTS]
            offset += part
        _need(offset == flat.numel(), where, f"group {g}: the parameters take {offset} elements, the flat group "
              f"holds {flat.numel()}")
        for moment in ADAM_MOMENTS:
            _need(state.get(g, {}).get(moment) is not None and state[g][moment].numel() == flat.numel(), where,
                  f"`optimizer_state_dict.state.{g}.{moment}` does not match flat group {g}")
    return out


@dataclass
class ParsedFile:
    rel: str
    obj: Any
    fragments: list[Fragment]


def parse_directory(directory: Path, rel_files: list[str], table: ParamTable) -> list[ParsedFile]:
    """Parse every DeepSpeed file of a tag or universal tag (`rel_files`, relative paths) into fragments.
    CheckpointError naming the file for anything that is not a layout above."""
    model_files = sorted(r for r in rel_files if MODEL_STATES_RE.match(r))
    optim_files = sorted((r for r in rel_files if OPTIM_STATES_RE.match(r)),
                         key=lambda r: int(OPTIM_STATES_RE.match(r).group("dp")))
    universal = sorted(r for r in rel_files if UNIVERSAL_RE.match(r))
    if UNIVERSAL_COMMON in rel_files:  # parsed for the check below that it holds no tensor
        parsed_common = [ParsedFile(UNIVERSAL_COMMON, _load(directory / UNIVERSAL_COMMON), [])]
    else:
        parsed_common = []
    for rel in model_files + optim_files:
        match = MODEL_STATES_RE.match(rel) or OPTIM_STATES_RE.match(rel)
        if int(match.group("mp")) != 0:
            raise CheckpointError(f"{directory / rel}: a tensor- or pipeline-parallel file; purge handles data "
                                  "parallel checkpoints only")
    parsed: list[ParsedFile] = []
    param_shapes = None
    for rel in model_files:
        obj = _load(directory / rel)
        parsed.append(ParsedFile(rel, obj, _model_states(obj, directory / rel, table)))
        if param_shapes is None and isinstance(obj.get("param_shapes"), list):
            param_shapes = [{k: tuple(v) for k, v in g.items()} for g in obj["param_shapes"]]
    param_starts: dict[tuple[int, str], int] = {}
    for rel in optim_files:
        where, obj = directory / rel, _load(directory / rel)
        rank = int(OPTIM_STATES_RE.match(rel).group("dp"))
        osd = obj.get("optimizer_state_dict") if isinstance(obj, dict) else None
        if isinstance(osd, dict) and "single_partition_of_fp32_groups" in osd:
            fragments = _flat(obj, where, param_starts)
        elif isinstance(osd, dict) and "fp32_flat_groups" in osd:
            _need(param_shapes is not None, where, "a ZeRO 3 optimizer file without a model-states file holding "
                  "`param_shapes` beside it")
            fragments = _zero3(obj, where, rank, param_shapes)
        else:
            raise CheckpointError(f"{where}: not a ZeRO optimizer file this version knows (keys "
                                  f"{sorted(osd)[:8] if isinstance(osd, dict) else type(obj).__name__})")
        parsed.append(ParsedFile(rel, obj, fragments))
    for name, covered in param_starts.items():  # ZeRO 1-2: the ranks' fragments must make up each parameter
        full = math.prod(table.shapes.get(name[1], (-1,)))
        if covered != full:
            raise CheckpointError(f"{directory}: the optimizer files hold {covered} elements of {name[1]}, the "
                                  f"model's parameter has {full} (a rank's file is missing?)")
    for rel in universal:
        where, obj = directory / rel, _load(directory / rel)
        match = UNIVERSAL_RE.match(rel)
        if match.group("state") == "step":
            _need(isinstance(obj, (int, float)) or (isinstance(obj, torch.Tensor) and obj.numel() <= 1), where,
                  "a step file that is not a scalar")
            parsed.append(ParsedFile(rel, obj, []))
            continue
        _need(isinstance(obj, dict) and isinstance(obj.get("param"), torch.Tensor), where, "no `param` tensor")
        role = UNIVERSAL_ROLES[match.group("state")]
        parsed.append(ParsedFile(rel, obj, [_whole(("param",), role, match.group("param"), obj["param"], table,
                                                   where)]))
    parsed += parsed_common
    for item in parsed:
        _check_accounted(item, directory)
        for fragment in item.fragments:  # ZeRO 1-3 name parameters in the file itself
            _need(fragment.param in table.shapes, directory / item.rel, f"holds elements of {fragment.param!r}, "
                  "which is not a parameter of the engine the trainer builds for this model")
    return parsed


def _check_accounted(item: ParsedFile, directory: Path) -> None:
    """Every tensor of the file is one the layout explains (or a scalar such as Adam's step)."""
    known = {f.path for f in item.fragments}
    for path, tensor in _walk(item.obj):
        if tensor.numel() > 1 and path not in known and not (path[:1] == ("module",) and tensor.numel() == 0):
            raise CheckpointError(f"{directory / item.rel}: tensor `{_dotted(path)}` ({tuple(tensor.shape)}) is not "
                                  "part of any layout purge knows; refusing to leave it unchecked")


# ------------------------------------------------------------------------------------------------ rows
def _ranges(fragment: Fragment, rows: np.ndarray, width: int) -> Iterator[tuple[int, int]]:
    """Tensor element ranges [a, b) of `fragment` that fall in the given parameter rows (each `width` wide)."""
    lo_param, hi_param = fragment.param_start, fragment.param_start + fragment.numel
    first, last = lo_param // width, (hi_param - 1) // width
    for row in rows[(rows >= first) & (rows <= last)]:
        lo, hi = max(int(row) * width, lo_param), min((int(row) + 1) * width, hi_param)
        if lo < hi:
            yield fragment.tensor_start + lo - lo_param, fragment.tensor_start + hi - lo_param


def _row_fragments(item: ParsedFile, rows: dict[str, np.ndarray], table: ParamTable):
    for fragment in item.fragments:
        chosen = rows.get(fragment.param)
        if chosen is None or not len(chosen) or fragment.numel == 0:
            continue
        flat = _get(item.obj, fragment.path).view(-1)
        width = math.prod(table.shapes[fragment.param][1:])
        yield fragment, flat, _ranges(fragment, chosen, width)


def nonzero_rows(item: ParsedFile, rows: dict[str, np.ndarray], table: ParamTable) -> dict[str, int]:
    """`role/param` -> elements in the chosen rows that are not exactly zero (NaN counts as non-zero)."""
    out: dict[str, int] = {}
    for fragment, flat, ranges in _row_fragments(item, rows, table):
        count = sum(int(torch.count_nonzero(flat[a:b])) for a, b in ranges)
        if count:
            key = f"{fragment.role}/{fragment.param}"
            out[key] = out.get(key, 0) + count
    return out


@torch.no_grad()  # universal checkpoints hold nn.Parameters
def zero_rows(item: ParsedFile, rows: dict[str, np.ndarray], table: ParamTable) -> dict[str, int]:
    """Zero the chosen rows in the loaded object (copy-on-write pages of the map); returns elements zeroed per
    role (module / master / exp_avg / exp_avg_sq), counting those that were non-zero."""
    out: dict[str, int] = {}
    for fragment, flat, ranges in _row_fragments(item, rows, table):
        for a, b in ranges:
            count = int(torch.count_nonzero(flat[a:b]))
            if count:
                flat[a:b] = 0
                out[fragment.role] = out.get(fragment.role, 0) + count
    return out


def roles_covered(parsed: list[ParsedFile], rows: dict[str, np.ndarray]) -> dict[str, list[str]]:
    """role -> files holding a fragment of a chosen parameter in that role (what the certificate reports)."""
    out: dict[str, set[str]] = {}
    for item in parsed:
        for fragment in item.fragments:
            if fragment.param in rows and fragment.numel:
                out.setdefault(fragment.role, set()).add(item.rel)
    return {role: sorted(files) for role, files in sorted(out.items())}


class DeepSpeedRows:
    """What `nulls_dist.audit.purge` calls for DeepSpeed's files (it is handed an instance by the CLI)."""

    def owns(self, rel: str) -> bool:
        return is_deepspeed_file(rel)

    def check(self, directory: Path, rel_files: list[str], model_cfg, external_sinks: bool = False) -> None:
        """Parse without writing (CheckpointError naming the file for anything unknown); `external_sinks`: the
        engine of a sharded-table run (`param_table`)."""
        parse_directory(directory, rel_files, param_table(model_cfg, external_sinks))

    def params(self, directory: Path, rel_files: list[str], model_cfg, external_sinks: bool = False) -> list[str]:
        """The parameters whose elements (module weights, masters, moments) the files hold, parsed completely."""
        parsed = parse_directory(directory, rel_files, param_table(model_cfg, external_sinks))
        return sorted({f.param for item in parsed for f in item.fragments if f.numel})

    def nonzero(self, directory: Path, rel_files: list[str], rows: dict[str, np.ndarray],
                model_cfg, external_sinks: bool = False) -> dict[str, dict[str, int]]:
        """file -> {`role/param`: non-zero elements in the chosen rows}, for files where any are."""
        table = param_table(model_cfg, external_sinks)
        out = {}
        for item in parse_directory(directory, rel_files, table):
            found = nonzero_rows(item, rows, table)
            if found:
                out[item.rel] = found
        return out

    def rewrite(self, directory: Path, rel_files: list[str], rows: dict[str, np.ndarray], model_cfg,
                out_dir: Path) -> dict[str, dict[str, Any]]:
        """Write every file of `rel_files` whose chosen rows are not all zero into `out_dir` (same relative
        path) with those rows zero; returns file -> {"zeroed": {role: elements}} for the rewritten files and
        {"zeroed": {}} for the others (which the caller keeps as they are), plus `roles` per file."""
        table = param_table(model_cfg)
        out: dict[str, dict[str, Any]] = {}
        for item in parse_directory(directory, rel_files, table):
            zeroed = zero_rows(item, rows, table)
            roles = sorted({f.role for f in item.fragments if f.param in rows and f.numel})
            if zeroed:
                target = out_dir / item.rel
                target.parent.mkdir(parents=True, exist_ok=True)
                torch.save(item.obj, target)
            out[item.rel] = {"zeroed": zeroed, "roles": roles}
            del item.obj
        return out
