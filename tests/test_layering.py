"""Dependency direction between the packages (design.md, "Layout and dependency direction"), checked by
parsing every import statement (including imports inside functions) of every Python file in the repo."""
import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("nulls_dist", "kernels", "launch", "data_pipeline", "conf")
MODEL_FILES = ("config", "sinks", "sink_hash", "segments", "model", "litgpt_io")
STDLIB = set(sys.stdlib_module_names)


def python_files():
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py") if (REPO / pkg).exists())


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
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


def violations(rule):
    out = []
    for path in python_files():
        module = module_name(path)
        names = imports_of(path)
        out += [f"{module} imports {bad}" for bad in rule(module, names)]
    return out


def rule_kernels(module, names):
    if not module.startswith("kernels"):
        return []
    return sorted(n for n in names if n.split(".")[0] not in STDLIB | {"torch", "triton", "kernels"})


def rule_model_files(module, names):
    if module not in {f"nulls_dist.{m}" for m in MODEL_FILES}:
        return []
    bad = [n for n in names if n.split(".")[0] not in STDLIB | {"torch", "numpy", "kernels", "nulls_dist", "yaml"}]
    bad += reaches(names, "torch.distributed")
    bad += [n for n in names if n.startswith("nulls_dist.") and n.split(".")[1] not in MODEL_FILES]
    return sorted(set(bad))


def rule_data_pipeline(module, names):
    if not module.startswith("data_pipeline"):
        return []
    return reaches(names, "torch") + reaches(names, "nulls_dist") + reaches(names, "kernels")


def is_entry_point(module: str) -> bool:
    """Console-script modules and benchmark scripts: the only places that wire whole components together."""
    leaf = module.split(".")[-1]
    return leaf == "cli" or leaf.endswith("_cli") or leaf == "__main__" or ".bench." in f".{module}."


def rule_schema_is_the_only_data_pipeline_import(module, names):
    if module.startswith("data_pipeline") or is_entry_point(module):
        return []
    return [n for n in reaches(names, "data_pipeline") if not n.startswith("data_pipeline.schema")
            and n != "data_pipeline"]


def rule_torch_distributed_only_in_train(module, names):
    if module.startswith("nulls_dist.train"):
        return []
    return reaches(names, "torch.distributed")


def rule_deepspeed_only_in_train_and_unlearn(module, names):
    if module.startswith(("nulls_dist.train", "nulls_dist.unlearn")) or is_entry_point(module):
        return []
    return reaches(names, "deepspeed")


def rule_wandb_only_in_train(module, names):
    if module.startswith("nulls_dist.train"):
        return []
    return reaches(names, "wandb")


def rule_hydra_only_at_entry_points(module, names):
    if is_entry_point(module):
        return []
    # the typed-config modules convert the entry point's OmegaConf object into dataclasses (and nothing else)
    omegaconf = [] if module.split(".")[-1] == "config" else reaches(names, "omegaconf")
    return reaches(names, "hydra") + omegaconf


def rule_unlearn_not_on_trainer(module, names):
    if not module.startswith("nulls_dist.unlearn"):
        return []
    return reaches(names, "nulls_dist.train")


def rule_launch_sets_nothing_deep(module, names):
    if not module.startswith("launch"):
        return []
    return reaches(names, "torch") + reaches(names, "deepspeed") + reaches(names, "nulls_dist.model")


RULES = [
    rule_kernels,
    rule_model_files,
    rule_data_pipeline,
    rule_schema_is_the_only_data_pipeline_import,
    rule_torch_distributed_only_in_train,
    rule_deepspeed_only_in_train_and_unlearn,
    rule_wandb_only_in_train,
    rule_hydra_only_at_entry_points,
    rule_unlearn_not_on_trainer,
    rule_launch_sets_nothing_deep,
]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.__name__)
def test_layering(rule):
    assert violations(rule) == []


def test_conf_is_yaml_only():
    extra = [p for p in (REPO / "conf").rglob("*") if p.is_file() and p.suffix not in (".yaml", ".yml")
             and p.name != "__init__.py" and "__pycache__" not in p.parts]
    assert extra == []


def test_the_checker_sees_imports(tmp_path):
    """The parser resolves relative and in-function imports (so the rules above cannot pass vacuously)."""
    assert len(python_files()) > 10
    names = imports_of(REPO / "nulls_dist" / "model.py")
    assert {"torch", "kernels.sink_mlp", "nulls_dist.sinks"} <= names
    assert "nulls_dist.sinks.SinkAssignmentConfig" in imports_of(REPO / "nulls_dist" / "config.py")
    assert rule_kernels("kernels.x", {"nulls_dist.model"}) == ["nulls_dist.model"]
    assert rule_model_files("nulls_dist.model", {"deepspeed", "torch.distributed.fsdp"}) == [
        "deepspeed", "torch.distributed.fsdp"]
    assert rule_data_pipeline("data_pipeline.packing", {"torch.nn"}) == ["torch.nn"]
