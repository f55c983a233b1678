"""Shared fixtures: small real JPEGs made here (no network), and a tiny training config."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.process_tree import ProcessTree, free_port  # noqa: E402, F401 - free_port: for the tests
from config import Config, apply_overrides  # noqa: E402
from pipeline.base import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

torch.set_num_threads(2)


def id_color(i: int) -> tuple[int, int, int]:
    """A colour that encodes instance id i (< 64) with steps of 25 levels: robust to JPEG error."""
    return (40 + (i % 8) * 25, 40 + (i // 8) * 25, 128)


def decode_ids(images: torch.Tensor) -> torch.Tensor:
    """Inverse of id_color for normalised images [B,3,H,W] (uniform colour, so any crop keeps the mean)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    rgb = ((images.float().cpu() * std + mean) * 255).mean((2, 3))
    r = ((rgb[:, 0] - 40) / 25).round().long()
    g = ((rgb[:, 1] - 40) / 25).round().long()
    return g * 8 + r


def write_id_folder(root: Path, n: int = 48, classes: int = 2, size: int = 40) -> Path:
    """root/class_k/img_XXX.jpg, uniform colour id_color(instance id); ids follow sorted paths, which this naming
    makes equal to the file number."""
    for i in range(n):
        d = root / f"class_{i * classes // n}"
        d.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (size + (i % 3) * 4, size), id_color(i)).save(d / f"img_{i:03d}.jpg", quality=95)
    return root


@pytest.fixture(scope="session")
def id_folder(tmp_path_factory) -> Path:
    return write_id_folder(tmp_path_factory.mktemp("ids"))


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    from pipeline.sample_data import make_digits

    return make_digits(tmp_path_factory.mktemp("sample"), size=16)


def no_aug(cfg: Config) -> Config:
    return apply_overrides(cfg, {"aug": {"crop_scale": [1.0, 1.0], "flip_p": 0.0, "jitter_p": 0.0, "gray_p": 0.0,
                                         "blur_p": 0.0}})


def tiny_config(data_path: str, out_dir: str, **sections) -> Config:
    """A config that trains the tiny CNN for a few steps on CPU in seconds."""
    cfg = Config()
    apply_overrides(cfg, {
        "data": {"path": data_path, "backend": "memory", "batch_size": 16, "workers": 0, "image_size": 16,
                 "eval_size": 16},
        "model": {"arch": "tiny", "head_hidden": 32, "dim": 16},
        "optim": {"epochs": 2, "warmup_epochs": 1, "lr": 0.1},
        # the CPU, even where a GPU exists (the GPU machine runs these tests too): bit-identical resume checks
        # assume one device; tests meant for CUDA say so with device="cuda" and a skip when there is none
        # the online monitor off, like the evaluation: tests of the monitor (test_monitor.py) turn it on
        "run": {"out_dir": out_dir, "name": "t", "log_every": 1, "ckpt_every": 1000, "eval": "none",
                "threads": 2, "device": "cpu", "monitor_every": 0},
    })
    for sec, vals in sections.items():
        apply_overrides(cfg, {sec: vals})
    return cfg


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def checkpoint_tensors(ckpt: dict) -> dict[str, torch.Tensor]:
    """A checkpoint's model tensors and its bank's rows (bank.weight, bank.momentum, bank.last; none for an mmap
    bank, which the checkpoint refers to)."""
    rows = ckpt["bank"]["rows"]
    return {**ckpt["model"], **{f"bank.{k}": rows[k] for k in ("weight", "momentum", "last") if k in rows}}
@pytest.fixture
def processes():
    """Every test that starts a process starts it here (popen / run / spawn): however the test ends (a failed
    assert, a timeout), the processes and all their descendants are killed and waited for."""
    with ProcessTree() as tree:
        yield tree


HOOKED_TRAIN = ROOT / "tests" / "hooked_train.py"  # train.py with test hooks (blocking decode, slow steps)


def rank_env(rank: int, world: int, port: int, **extra: str) -> dict[str, str]:
    """The environment torchrun gives rank `rank` of `world` on one node (train.py reads only these)."""
    return {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
            "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
            "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}


def wait_until(condition, what: str, procs=(), timeout: float = 300) -> None:
    """Poll `condition()` until it holds; an error naming `what` when one of `procs` ends first or `timeout` passes
    (a bound for a machine under load, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not condition():
        ended = {p.pid: p.returncode for p in procs if p.poll() is not None}
        if ended and condition():  # it held just before the process ended
            return
        if ended or time.monotonic() > deadline:
            raise AssertionError(f"{what}: not seen ({f'exited: {ended}' if ended else f'{timeout:.0f} s passed'})")
        time.sleep(0.05)
