"""Data pipelines: one `Batch` contract, several backends, one scheduler.

`make_loader(cfg, index, schedule, device, batch_size)` builds the backend named by `cfg.data.backend`. Backends
that need optional packages (DALI, FFCV) are imported only when asked for, so `import pipeline` works anywhere.
"""

from __future__ import annotations

import importlib

# name -> "module:Class"; each class takes (cfg, index, schedule, device, batch_size)
BACKENDS: dict[str, str] = {
    "torch": "pipeline.torch_backend:TorchLoader",
    "memory": "pipeline.memory_backend:MemoryLoader",
    "torch-gpu": "pipeline.torch_gpu_backend:TorchGPULoader",
    "ffcv": "pipeline.ffcv_backend:FFCVLoader",
    "dali": "pipeline.dali_backend:DALILoader",
}


class BackendUnavailable(RuntimeError):
    pass


def backend_class(name: str):
    if name not in BACKENDS:
        raise ValueError(f"unknown data backend {name!r}; available: {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as e:
        raise BackendUnavailable(f"data backend {name!r} needs a package that is not installed: {e}") from e


def backend_unavailable(name: str) -> str:
    """"" when backend `name` can run here, else why not (a missing optional package). Callers that try several
    backends (the benchmarks) ask this first, before any work for that backend (a FFCV conversion) starts."""
    try:
        backend_class(name)
    except BackendUnavailable as e:
        return str(e)
    return ""


def make_loader(cfg, index, schedule, device, batch_size: int, **options):
    """options: backend-specific keyword arguments (e.g. DALI's `cpu_resize`), for benchmarks and experiments."""
    return backend_class(cfg.data.backend)(cfg, index, schedule, device, batch_size, **options)


def __getattr__(name: str):
    """`pipeline.Batch` / `pipeline.Loader` (the contract, pipeline.base) on first use: importing the package loads
    no torch, so the FFCV converter (which needs none) starts in a fraction of the time."""
    if name in ("Batch", "Loader"):
        from pipeline import base

        return getattr(base, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


__all__ = ["BACKENDS", "Batch", "BackendUnavailable", "Loader", "backend_class", "backend_unavailable", "make_loader"]
