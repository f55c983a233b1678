"""train.train() with the sliding-window scheduler and recent negatives: the loader visits exactly the schedule's
ids, and a run resumed mid-window reproduces the uninterrupted one (docs/method.md §12, oracle 7)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import checkpoint_tensors, tiny_config

import train
from model.checkpoint import load
from pipeline.schedule import SlidingWindow

N, W, S, B, K = 96, 48, 16, 16, 32
STEPS_PER_WINDOW = W // B  # 3
WINDOWS = 2 * N // W  # epochs=2 -> ceil(E·N/W) = 4 windows, 12 steps


def window_kw(**extra) -> dict:
    return dict(data={"subset": N, "scheduler": "window", "window": W, "stride": S, "batch_size": B},
                pic={"negatives": "recent", "k": K}, **extra)


class RecordingLoader:
    """A loader that appends what the training loop receives to `seen`: every batch's ids, and with `pixels` also
    every sample's pixel sum (float64; one number a sample, enough to tell augmentations apart)."""

    def __init__(self, inner, seen: list, pixels: bool = False):
        self.inner, self.seen, self.pixels = inner, seen, pixels

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __len__(self):
        return len(self.inner)

    def iter_epoch(self, epoch, start_batch=0):
        for batch in self.inner.iter_epoch(epoch, start_batch):
            ids = batch.ids.tolist()
            self.seen.append((ids, batch.images.double().sum((1, 2, 3)).tolist()) if self.pixels else ids)
            yield batch


def record_batches(seen: list, pixels: bool = False) -> None:
    """train.make_loader wrapped in RecordingLoader (in this process; a test's monkeypatch undoes it)."""
    make = train.make_loader
    train.make_loader = lambda *a, **k: RecordingLoader(make(*a, **k), seen, pixels)


@pytest.fixture
def recorded_ids(monkeypatch) -> list[list[int]]:
    """Every batch's ids as the training loop receives them (train.make_loader wrapped)."""
    seen: list[list[int]] = []
    monkeypatch.setattr(train, "make_loader", train.make_loader)  # restored after the test
    record_batches(seen)
    return seen


def log_records(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if "event" not in r]


def test_window_run_follows_the_schedule_and_resumes_exactly(digits_root, tmp_path, recorded_ids):
    data = str(digits_root / "train")
    out = train.train(tiny_config(data, str(tmp_path / "a"), **window_kw()))
    assert out["steps"] == WINDOWS * STEPS_PER_WINDOW == 12
    full_ids = list(recorded_ids)

    # ids: window k = W ids of the seeded permutation starting at k·S, shuffled; batches are consecutive slices.
    sw = SlidingWindow(N, W, S, seed=0)
    expected = [sw.window_ids(s // STEPS_PER_WINDOW)[(s % STEPS_PER_WINDOW) * B:][:B].tolist() for s in range(12)]
    assert full_ids == expected
    windows = [set(sum(full_ids[k * STEPS_PER_WINDOW:(k + 1) * STEPS_PER_WINDOW], [])) for k in range(WINDOWS)]
    assert all(len(w) == W for w in windows)
    # consecutive windows overlap by W − S
    assert all(len(a & b) == W - S for a, b in zip(windows, windows[1:], strict=False))
    assert windows[1] == set(sw.perm_ids(np.arange(S, S + W)).tolist())  # perm[S:S+W]

    # Interrupt mid-window (step 5 = window 1, batch 2), then resume.
    recorded_ids.clear()
    part = train.train(tiny_config(data, str(tmp_path / "b"), run={"max_steps": 5}, **window_kw()))
    assert part["step"] == 5
    ckpt = load(tmp_path / "b" / "t" / "last.pt")
    assert ckpt["progress"] == {"step": 5, "unit": 1, "batch": 2, "nonfinite": 0}
    assert torch.equal(ckpt["bank"]["negatives"]["recent"], torch.tensor(sum(full_ids[3:5], [])))  # K/B = 2 batches
    train.train(tiny_config(data, str(tmp_path / "b"), run={"resume": "auto"}, **window_kw()))
    assert recorded_ids == full_ids  # 5 + 7 batches: the same id stream

    a, b = log_records(tmp_path / "a" / "t"), log_records(tmp_path / "b" / "t")
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and len(a) == 12  # bit-identical on CPU
    assert [r["lr"] for r in a] == [r["lr"] for r in b]
    wa, wb = load(tmp_path / "a" / "t" / "last.pt"), load(tmp_path / "b" / "t" / "last.pt")
    ta, tb = checkpoint_tensors(wa), checkpoint_tensors(wb)
    assert ta.keys() == tb.keys() and "bank.weight" in ta
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert torch.equal(wa["bank"]["negatives"]["recent"], wb["bank"]["negatives"]["recent"])
    # The bank really was sampled and lazily updated: at the stop after 5 steps, rows outside the last batches are
    # stale (a run stopped by max_steps saves its rows as they are) ...
    last = checkpoint_tensors(ckpt)["bank.last"]
    assert last.max() == 4 and (last < 4).any()
    assert np.isin(np.asarray(full_ids[4]), np.flatnonzero(last.numpy() == 4)).all()
    # ... and the complete run's last.pt holds every row brought up to date (the end-of-run correction, saved)
    assert (ta["bank.last"] == 11).all()
