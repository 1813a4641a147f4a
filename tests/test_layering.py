"""Dependency direction between the packages (docs/design.md, "Layers"), checked two ways:

- statically, by parsing every import statement (including imports inside functions) of every Python file;
- at runtime, by importing modules in fresh interpreters and looking at `sys.modules`, which also sees what a
  static parse cannot (an import inside a function that a validator calls, a dependency's own imports).

Repository folders map to import names as in setup.py (`kernels/` is `nulls_dist.kernels`, ...).
"""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FOLDERS = {"nulls_dist": "nulls_dist", "kernels": "nulls_dist.kernels", "launch": "nulls_dist.launch",
           "data_pipeline": "nulls_dist.data_pipeline", "conf": "nulls_dist.conf"}
MODEL_FILES = ("config", "sink_config", "sinks", "sink_hash", "sink_plan", "sink_store", "attention", "model",
               "litgpt_io", "forget_budget")
STDLIB = set(sys.stdlib_module_names)
# Packages of nulls_dist that are entry points or benchmarks: they may wire whole components together.
ENTRY_PACKAGES = ("nulls_dist.cli", "nulls_dist.bench", "nulls_dist.kernels.bench", "nulls_dist.data_pipeline.bench")


def python_files():
    return sorted(p for folder in FOLDERS for p in (REPO / folder).rglob("*.py"))


def module_name(path: Path) -> str:
    folder, *rest = path.relative_to(REPO).with_suffix("").parts
    parts = FOLDERS[folder].split(".") + rest
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Absolute dotted names imported anywhere in the file (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def reaches(names: set[str], prefix: str) -> list[str]:
    return sorted(n for n in names if n == prefix or n.startswith(prefix + "."))


def ours(names: set[str]) -> set[str]:
    return {n for n in names if n.split(".")[0] == "nulls_dist"}


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def is_entry_point(module: str) -> bool:
    return any(in_package(module, p) for p in ENTRY_PACKAGES) or module.split(".")[-1] == "__main__"


def violations(rule):
    out = []
    for path in python_files():
        module = module_name(path)
        out += [f"{module} imports {bad}" for bad in rule(module, imports_of(path))]
    return out


# ------------------------------------------------------------------------------------------------ static rules
def rule_formats_is_the_bottom(module, names):
    """formats imports no other part of nulls_dist; only formats.weights may touch torch."""
    if not in_package(module, "nulls_dist.formats"):
        return []
    bad = [n for n in ours(names) if not in_package(n, "nulls_dist.formats")]
    if module != "nulls_dist.formats.weights":
        bad += reaches(names, "torch") + reaches(names, "safetensors")
    return sorted(set(bad))


def rule_kernels(module, names):
    """kernels imports only torch, triton, numpy, the standard library and itself."""
    if not in_package(module, "nulls_dist.kernels"):
        return []
    bad = [n for n in names if n.split(".")[0] not in STDLIB | {"torch", "triton", "numpy", "nulls_dist"}]
    bad += [n for n in ours(names) if not in_package(n, "nulls_dist.kernels")]
    return sorted(set(bad))


def rule_model_files(module, names):
    """The single-device model: no DeepSpeed, Hydra, wandb, TorchRec or torch.distributed."""
    if module not in {f"nulls_dist.{m}" for m in MODEL_FILES}:
        return []
    bad = [n for n in names if n.split(".")[0] not in STDLIB | {"torch", "numpy", "yaml", "nulls_dist"}]
    bad += reaches(names, "torch.distributed")
    bad += [n for n in ours(names) if not (in_package(n, "nulls_dist.kernels") or in_package(n, "nulls_dist.formats")
                                           or n == "nulls_dist" or n.split(".")[1] in MODEL_FILES)]
    return sorted(set(bad))


def rule_data_pipeline(module, names):
    """The data pipeline never imports torch, and of nulls_dist only itself and the formats."""
    if not in_package(module, "nulls_dist.data_pipeline"):
        return []
    bad = reaches(names, "torch") + reaches(names, "nulls_dist.formats.weights")
    bad += [n for n in ours(names) if not (in_package(n, "nulls_dist.data_pipeline")
                                           or in_package(n, "nulls_dist.formats") or n == "nulls_dist")]
    return sorted(set(bad))


def rule_data_pipeline_only_at_entry_points(module, names):
    """Other packages read the data pipeline's outputs through nulls_dist.formats, never its code."""
    if in_package(module, "nulls_dist.data_pipeline") or is_entry_point(module):
        return []
    return reaches(names, "nulls_dist.data_pipeline")


def rule_torch_distributed_only_in_train(module, names):
    if in_package(module, "nulls_dist.train") or is_entry_point(module):
        return []
    return reaches(names, "torch.distributed")


def rule_deepspeed_only_in_train(module, names):
    if in_package(module, "nulls_dist.train") or is_entry_point(module):
        return []
    return reaches(names, "deepspeed")


def rule_wandb_and_torchrec_only_in_train(module, names):
    if in_package(module, "nulls_dist.train") or is_entry_point(module):
        return []
    return reaches(names, "wandb") + reaches(names, "torchrec") + reaches(names, "fbgemm_gpu")


def rule_hydra_only_at_entry_points(module, names):
    if is_entry_point(module):
        return []
    # the typed-config modules convert the entry point's OmegaConf object into dataclasses (and nothing else)
    omegaconf = [] if module.split(".")[-1] == "config" else reaches(names, "omegaconf")
    return reaches(names, "hydra") + omegaconf


def rule_tools_not_on_trainer(module, names):
    """Deployment, the audit and the evaluation depend on the model, never on the trainer."""
    if not any(in_package(module, p) for p in ("nulls_dist.audit", "nulls_dist.deploy", "nulls_dist.evaluation")):
        return []
    return reaches(names, "nulls_dist.train")


def rule_deploy_below_audit_below_evaluation(module, names):
    """deploy <- audit <- evaluation: deployment never imports the audit or the evaluation; the audit never
    imports the evaluation."""
    if in_package(module, "nulls_dist.deploy"):
        return reaches(names, "nulls_dist.audit") + reaches(names, "nulls_dist.evaluation")
    if in_package(module, "nulls_dist.audit"):
        return reaches(names, "nulls_dist.evaluation")
    return []


def rule_library_code_not_on_entry_points(module, names):
    """Only entry points import entry points."""
    if is_entry_point(module):
        return []
    return reaches(names, "nulls_dist.cli") + reaches(names, "nulls_dist.bench")


def rule_launch_sets_nothing_deep(module, names):
    if not in_package(module, "nulls_dist.launch"):
        return []
    return reaches(names, "torch") + reaches(names, "deepspeed") + reaches(names, "nulls_dist.model")


RULES = [
    rule_formats_is_the_bottom,
    rule_kernels,
    rule_model_files,
    rule_data_pipeline,
    rule_data_pipeline_only_at_entry_points,
    rule_torch_distributed_only_in_train,
    rule_deepspeed_only_in_train,
    rule_wandb_and_torchrec_only_in_train,
    rule_hydra_only_at_entry_points,
    rule_tools_not_on_trainer,
    rule_deploy_below_audit_below_evaluation,
    rule_library_code_not_on_entry_points,
    rule_launch_sets_nothing_deep,
]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.__name__)
def test_layering(rule):
    assert violations(rule) == []


def test_conf_is_yaml_only():
    extra = [p for p in (REPO / "conf").rglob("*") if p.is_file() and p.suffix not in (".yaml", ".yml")
             and p.name != "__init__.py" and "__pycache__" not in p.parts]
    assert extra == []


def test_the_checker_sees_imports():
    """The parser resolves relative and in-function imports (so the rules above cannot pass vacuously)."""
    assert len(python_files()) > 10
    assert module_name(REPO / "kernels" / "sink_mlp.py") == "nulls_dist.kernels.sink_mlp"
    names = imports_of(REPO / "nulls_dist" / "model.py")
    assert {"torch", "nulls_dist.kernels.sink_mlp", "nulls_dist.sinks"} <= names
    assert "nulls_dist.sink_config.SinkAssignmentConfig" in imports_of(REPO / "nulls_dist" / "config.py")
    assert rule_kernels("nulls_dist.kernels.x", {"nulls_dist.model"}) == ["nulls_dist.model"]
    assert rule_model_files("nulls_dist.model", {"deepspeed", "torch.distributed.fsdp"}) == [
        "deepspeed", "torch.distributed.fsdp"]
    assert rule_data_pipeline("nulls_dist.data_pipeline.packing", {"torch.nn"}) == ["torch.nn"]
    assert rule_deploy_below_audit_below_evaluation("nulls_dist.deploy.x", {"nulls_dist.audit.y"}) == [
        "nulls_dist.audit.y"]


# ------------------------------------------------------------------------------------------------ runtime rules
_PROBE = r"""
import importlib, json, sys
modules, banned = json.loads(sys.argv[1]), json.loads(sys.argv[2])
report = {}
for name in modules:
    importlib.import_module(name)
    loaded = sorted(b for b in banned if any(m == b or m.startswith(b + ".") for m in sys.modules))
    if loaded:
        report[name] = loaded  # the first module after which a banned package is in the process
        break
print(json.dumps(report))
"""


def _first_offender(modules: list[str], banned: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(modules), json.dumps(banned)], cwd=REPO.parent,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _modules(package: str) -> list[str]:
    return [module_name(p) for p in python_files() if in_package(module_name(p), package)]


def test_runtime_torch_free_layers():
    """Importing the data pipeline, the formats (but weights), the launcher, the model config and the `nulls-data`
    and `nulls-launch` entry points loads no torch, even through code run at import or validation time."""
    modules = (_modules("nulls_dist.data_pipeline") + _modules("nulls_dist.launch")
               + [m for m in _modules("nulls_dist.formats") if m != "nulls_dist.formats.weights"]
               + ["nulls_dist.config", "nulls_dist.sink_config", "nulls_dist.forget_budget", "nulls_dist.cli.data",
                  "nulls_dist.cli.launch"])
    modules = [m for m in modules if ".bench" not in m]
    assert len(modules) > 15
    assert _first_offender(modules, ["torch"]) == {}


def test_runtime_validation_stays_torch_free():
    """The static check cannot see imports inside functions a validator calls: build configs for real."""
    probe = ("import sys\nfrom nulls_dist.config import NullConfig\nfrom nulls_dist.launch import capacity_plan\n"
             "NullConfig.from_preset('paper_wiki_1b', sink_strategy='code', num_sources=6407814, "
             "min_source_id=49152)\nNullConfig.from_preset('debug', sink_strategy='uniform', sink_k=7)\n"
             "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO.parent, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "False"


def test_runtime_kernels_and_model_stay_in_their_lane():
    """The kernels load nothing else of nulls_dist; the model loads no DeepSpeed, Hydra, wandb or TorchRec."""
    kernels = [m for m in _modules("nulls_dist.kernels") if ".bench" not in m]
    probe = ("import importlib, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in kernels)
             + "print(sorted(m for m in sys.modules if m.startswith('nulls_dist.') and "
               "not m.startswith('nulls_dist.kernels')))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO.parent, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]"
    model = [f"nulls_dist.{m}" for m in MODEL_FILES if (REPO / "nulls_dist" / f"{m}.py").exists()]
    assert _first_offender(model, ["deepspeed", "hydra", "omegaconf", "wandb", "torchrec", "fbgemm_gpu"]) == {}
