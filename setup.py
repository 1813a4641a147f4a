"""Installs nulls_dist: the NULL model and trainer (`nulls_dist`), Triton sink kernels (`kernels`),
SLURM launch helpers (`launch`), the torch-free data pipeline (`data_pipeline`) and the Hydra configs (`conf`)."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def _requirements() -> list[str]:
    lines = (HERE / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _conf_files() -> list[str]:
    # conf/ is YAML only; it ships inside the `conf` package so installed console scripts find it.
    return [str(p.relative_to(HERE / "conf")) for p in (HERE / "conf").rglob("*.yaml")]


setup(
    name="nulls_dist",
    version="0.1.0",
    description="Distributed training, unlearning and deployment of Natively Unlearnable LLMs (NULLs)",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["nulls_dist*", "kernels*", "launch*", "data_pipeline*", "conf"]),
    package_data={"conf": _conf_files(), "data_pipeline": ["bundled/**/*", "fixtures/**/*"]},
    include_package_data=True,
    install_requires=_requirements(),
    entry_points={
        "console_scripts": [
            "nulls-sinks=nulls_dist.cli.sinks:main",
            "nulls-smoke=nulls_dist.cli.smoke:main",
            "nulls-data=data_pipeline.cli:main",
            "nulls-train=nulls_dist.train.cli:main",
            "nulls-launch=launch.cli:main",
            "nulls-manifest=nulls_dist.unlearn.manifest_cli:main",
            "nulls-unlearn=nulls_dist.unlearn.unlearn_cli:main",
            "nulls-generate=nulls_dist.unlearn.generate_cli:main",
            "nulls-eval=nulls_dist.unlearn.eval_cli:main",
        ]
    },
)
