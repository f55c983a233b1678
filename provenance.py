"""Provenance: everything needed to interpret a number later (versions, git sha, host, CPU, memory, GPU, date),
recorded in a run's config.json (train.py; eval.report shows it) and in every benchmark record."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata as _md
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any


def _version(dist: str) -> str | None:
    try:
        return _md.version(dist)
    except _md.PackageNotFoundError:
        return None


def _dali_version() -> str | None:
    """nvidia-dali ships as nvidia-dali-cudaXXX; look at the installed distributions without importing it."""
    for d in _md.distributions():
        name = (d.metadata["Name"] or "").lower()
        if name.startswith("nvidia-dali"):
            return f"{name}=={d.version}"
    return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mem_info_gb() -> dict[str, float]:
    """Host memory (GB = 1e9 bytes): total and available (/proc/meminfo; {} elsewhere)."""
    out = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, val = line.split(":", 1)
            if key in ("MemTotal", "MemAvailable"):
                out[key] = int(val.split()[0]) * 1024 / 1e9
    except (OSError, ValueError):
        pass
    return out


def _gpu_record() -> dict[str, Any] | None:
    import torch

    if not torch.cuda.is_available():
        return None
    i = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(i)
    rec = {"name": props.name, "memory_gb": props.total_memory / 1e9, "capability": f"{props.major}.{props.minor}",
           "count": torch.cuda.device_count(), "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        rec["driver"] = out.stdout.strip().splitlines()[0] if out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        rec["driver"] = None
    return rec


def env_record() -> dict[str, Any]:
    """Everything needed to interpret a number later: versions, git sha, host, CPU, memory, GPU, date (UTC)."""
    import torch

    from model.checkpoint import git_sha

    try:
        import numba

        numba_threads = numba.get_num_threads()  # the active count (set_num_threads), not the pool size
    except ImportError:
        numba_threads = None
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {
        "date_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "git_sha": git_sha(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "numpy": _version("numpy"),
        "numba": _version("numba"),
        "dali": _dali_version(),
        "ffcv": _version("ffcv"),
        "cpu": {"model": cpu_model(), "cores": os.cpu_count(), "affinity": affinity,
                "torch_threads": torch.get_num_threads(), "numba_threads": numba_threads},
        "memory": mem_info_gb(),
        "gpu": _gpu_record(),
    }
