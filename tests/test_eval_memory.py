"""The end-of-run evaluation's peak memory holds no N x 128 bank (the random-init baseline used to build one of
~1 KB per instance) and no N-row gallery (retrieval's gallery is capped).

Measured on the process itself: the kernel's peak resident size (VmHWM) is reset after the trained model (and its
bank) exist, then the evaluation runs in this process (DataLoader workers = 0). N = 20,000 hard links to one tiny
JPEG (real files, no data blocks of their own), unlabelled (no kNN); the gallery is capped at 128 for the test.
A single N x 128 fp32 table is 10.2 MB (the old baseline's bank, ~1 KB a row: 20.6 MB); the evaluation's own
growth is a few MB (a tiny CNN on 8-px images), the same at any N.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from PIL import Image

N = 20_000


def _status(key: str) -> int:
    """/proc/self/status field in bytes."""
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
def test_end_of_run_evaluation_holds_no_n_row_bank(tmp_path, monkeypatch):
    import eval.retrieval
    from eval.final import evaluate_run
    from model.bank import BankOptions, make_bank
    from model.pic import build_pic
    from pipeline.dataset import load_index

    root = tmp_path / "many"
    root.mkdir()
    Image.new("RGB", (8, 8), (200, 40, 90)).save(tmp_path / "one.jpg", quality=90)
    for i in range(N):
        os.link(tmp_path / "one.jpg", root / f"{i:06d}.jpg")
    index = load_index(root)
    monkeypatch.setattr(eval.retrieval, "GALLERY", 128, raising=False)
    cfg = tiny_config(str(root), str(tmp_path), data={"image_size": 8, "eval_size": 8}, run={"eval": "auto"})
    model = build_pic("tiny", make_bank(BankOptions(), N), head_hidden=32, dim=128)  # a trained model has its bank
    evaluate_run(cfg, model, index.subset(300), torch.device("cpu"))  # warm up: imports, thread pools
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status("VmRSS")
    results = evaluate_run(cfg, model, index, torch.device("cpu"))
    grew = _status("VmHWM") - before
    assert grew < N * 128 * 4, f"the evaluation's peak grew by {grew / 2**20:.1f} MiB"
    assert results["retrieval_gallery"] == 128
