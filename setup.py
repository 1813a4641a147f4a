"""Installs nulls_dist as ONE top-level import package, `nulls_dist`, whatever the repository's folders are
called: the model, trainer and tools (`nulls_dist/`), and, mapped under it, the Triton sink kernels
(`kernels/` -> `nulls_dist.kernels`), SLURM launch helpers (`launch/` -> `nulls_dist.launch`), the torch-free data
pipeline (`data_pipeline/` -> `nulls_dist.data_pipeline`) and the Hydra configs (`conf/` -> `nulls_dist.conf`).
Generic top-level names such as `kernels` (also Hugging Face's package) are never installed, so nothing else on
the index can shadow ours or be shadowed by it (tests/test_packaging.py)."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
# import name -> repository folder (the folders are fixed by the design; the import names are ours alone)
PACKAGE_FOLDERS = {
    "nulls_dist": "nulls_dist",
    "nulls_dist.kernels": "kernels",
    "nulls_dist.launch": "launch",
    "nulls_dist.data_pipeline": "data_pipeline",
    "nulls_dist.conf": "conf",
}


def _requirements() -> list[str]:
    lines = (HERE / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _packages() -> list[str]:
    out = []
    for name, folder in PACKAGE_FOLDERS.items():
        out.append(name)
        out += [f"{name}.{sub}" for sub in find_packages(str(HERE / folder))]
    return sorted(set(out))


def _conf_files() -> list[str]:
    # conf/ is YAML only; it ships inside `nulls_dist.conf` so installed console scripts find it (pkg://).
    return [str(p.relative_to(HERE / "conf")) for p in (HERE / "conf").rglob("*.yaml")]


setup(
    name="nulls_dist",
    version="0.1.0",
    description="Distributed training, unlearning and deployment of Natively Unlearnable LLMs (NULLs)",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=_packages(),
    package_dir=PACKAGE_FOLDERS,
    package_data={"nulls_dist.conf": _conf_files(), "nulls_dist.data_pipeline": ["bundled/**/*", "fixtures/**/*"]},
    include_package_data=True,
    install_requires=_requirements(),
    entry_points={
        "console_scripts": [
            "nulls-sinks=nulls_dist.cli.sinks:main",
            "nulls-smoke=nulls_dist.cli.smoke:main",
            "nulls-data=nulls_dist.cli.data:main",
            "nulls-train=nulls_dist.cli.train:main",
            "nulls-launch=nulls_dist.cli.launch:main",
            "nulls-manifest=nulls_dist.cli.manifest:main",
            "nulls-unlearn=nulls_dist.cli.unlearn:main",
            "nulls-generate=nulls_dist.cli.generate:main",
            "nulls-eval=nulls_dist.cli.eval:main",
        ]
    },
)
