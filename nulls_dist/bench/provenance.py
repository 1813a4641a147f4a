"""Where a benchmark's numbers came from: the machine (CPU model, cores, memory), package versions and the git
commit of the checkout, for the JSON a benchmark prints."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def commit() -> dict:
    """{commit, dirty} of the checkout (None when it is not a git work tree)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def machine() -> dict:
    """{cpu, cores, memory_gb, load_average} (the load at the time of the call: the machine may be shared)."""
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = psutil.virtual_memory()
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(memory.total / 2**30, 1),
            "available_gb_at_start": round(memory.available / 2**30, 1),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def versions(*packages: str) -> dict:
    """{python, <package>: version} for the installed distributions named."""
    from importlib.metadata import version

    return {"python": platform.python_version(), **{name: version(name) for name in packages}}
