"""What the lent GPU machine would hit first, checked here: the GPU suite's benchmarks at its settings, optional
backends absent (no DALI, no FFCV there), the compiled encoder, the torch-gpu batch hand-over, and no host sync on
the device-side augmentation path. The CUDA-only cases at the end run where a GPU exists.
"""

from __future__ import annotations

import functools
import json
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, no_aug, tiny_config
from torch.utils._python_dispatch import TorchDispatchMode

import train
from model.optim import lr_table
from pipeline import make_loader
from pipeline.augment import BatchColorAugment, DeviceViews, batch_random_resized_crop
from pipeline.dataset import scan_folder
from pipeline.schedule import make_schedule

BLOCK = [sys.executable, str(ROOT / "tests" / "block_imports.py"), "ffcv,nvidia.dali"]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# ---------------------------------------------------------------------------------------------------------------
# benchmarks at the suite's settings, on a machine without DALI and FFCV
# ---------------------------------------------------------------------------------------------------------------


def test_bench_step_lr_table_covers_every_step_it_runs(tmp_path):
    from benchmarks import bench_step

    # (warmup + 1 + repeats) x iters = 25 steps; the table used to hold warmup + repeats*iters + 10 = 18
    out = tmp_path / "step.json"
    assert bench_step.main(["--archs", "tiny", "--sizes", "16", "--batches", "4", "--num-instances", "64",
                            "--k", "16", "--warmup", "3", "--repeats", "1", "--iters", "5",
                            "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["pic_img_s"] > 0 and row["supervised_img_s"] > 0


def test_bench_loader_reports_missing_backends_as_skipped_and_keeps_the_others(processes, id_folder, tmp_path):
    out = tmp_path / "loader.json"
    r = processes.run([*BLOCK, "-m", "benchmarks.bench_loader", "--data", str(id_folder),
                       "--backends", "torch,ffcv,dali", "--modes", "crop", "--size", "16", "--batch", "8",
                       "--workers", "0", "--batches", "2", "--settle", "0", "--repeats", "1", "--idle-wait", "0",
                       "--json", str(out)],
                      capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = {row["backend"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["torch"]["images_per_second"] > 0 and rows["torchvision"]["images_per_second"] > 0
    assert rows["torch"]["vs_plain"] == rows["torch"]["vs_torchvision"] > 0  # torchvision is torch's plain pipeline
    for name in ("ffcv", "ffcv-plain"):
        assert "ffcv" in rows[name]["skipped"]
    for name in ("dali", "dali-plain"):
        assert "dali" in rows[name]["skipped"].lower()


def test_bench_e2e_keeps_its_rows_when_the_step_only_run_fails(monkeypatch, tmp_path, id_folder):
    from benchmarks import bench_e2e

    def fake(argv, one):
        if one == "__step__":
            return {"backend": one, "skipped": "failed (exit 1): ['CUDA error']"}
        return {"backend": one, "e2e_img_s": 10.0, "data_wait_pct": 1.0, "steps": 10, "wall_seconds": 1.0}

    monkeypatch.setattr(bench_e2e, "_subprocess", fake)
    out = tmp_path / "e2e.json"
    assert bench_e2e.main(["--data", str(id_folder), "--backends", "torch,memory", "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert [r["e2e_img_s"] for r in rec["rows"]] == [10.0, 10.0]
    assert "CUDA error" in rec["step_only_error"]


def test_dali_and_ffcv_test_files_skip_cleanly_without_the_packages(processes):
    # pytest exits 5 when a file is skipped as a whole ("no tests ran"): the GPU machine's check would read red
    r = processes.run([*BLOCK, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_dali.py",
                       "tests/test_ffcv.py"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "SKIPPED" in r.stdout and "passed" not in r.stdout and "error" not in r.stdout.lower()


# ---------------------------------------------------------------------------------------------------------------
# the compiled encoder
# ---------------------------------------------------------------------------------------------------------------


def test_compiled_encoder_trains_like_the_eager_one(id_folder, tmp_path, monkeypatch):
    """--model.compile=true used to be ignored on a CPU, and on torch >= 2.9 crashed at the first compiled step
    (`encoder or self.encoder` asks a compiled module for len()). Dynamo's wrapper and graph capture are what is
    tested; the aot_eager backend skips inductor's C++ code generation (no compiler needed, seconds not minutes)."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    eager = train.train(no_aug(tiny_config(str(id_folder), str(tmp_path / "e"), run={"max_steps": 2})))
    compiled = train.train(no_aug(tiny_config(str(id_folder), str(tmp_path / "c"), model={"compile": True},
                                              run={"max_steps": 2})))
    # float32, 2 steps: aot_eager runs decomposed ops (BN as mean/var, ...) where eager runs fused kernels, so the
    # losses differ by summation order only, ~1e-6 relative and not amplified over 2 steps: 1e-4 holds on any CPU
    np.testing.assert_allclose(compiled["losses"], eager["losses"], rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# torch-gpu: one shared-memory block per batch
# ---------------------------------------------------------------------------------------------------------------


def test_torch_gpu_workers_hand_over_one_tensor_per_batch(id_folder, tmp_path):
    from pipeline.torch_gpu_backend import RawBytes, collate_bytes

    index = scan_folder(id_folder)
    packed = collate_bytes([RawBytes(index)[(0, j, i)] for j, i in enumerate((5, 0, 17))])
    # every tensor a worker returns is one shared-memory file descriptor in the parent
    assert sum(isinstance(x, torch.Tensor) for x in packed) == 1
    for j, i in enumerate((5, 0, 17)):
        with open(index.abspath(i), "rb") as f:
            assert packed.file(j).numpy().tobytes() == f.read()
    assert packed.ids.tolist() == [5, 0, 17]
    cfg = no_aug(tiny_config(str(id_folder), str(tmp_path), data={"backend": "torch-gpu", "workers": 2}))
    loader = make_loader(cfg, index, make_schedule("epoch", len(index), None, None, 0), torch.device("cpu"), 16)
    assert sum(len(b.ids) for b in loader.iter_epoch(0)) == 48


# ---------------------------------------------------------------------------------------------------------------
# no host sync on the device-side augmentation path ("meta" stands in for CUDA)
# ---------------------------------------------------------------------------------------------------------------


class SyncDetector(TorchDispatchMode):
    """Records the ops that make the host wait for a device: reading a value back (item, tolist, bool),
    data-dependent shapes (nonzero, unique, masked_select), blocking host->device copies, linalg with info checks.
    With the device played by "meta", a host tensor is one on the CPU."""

    READS = {"_local_scalar_dense", "nonzero", "unique", "_unique", "_unique2", "unique_dim", "masked_select",
             "linalg_inv_ex", "linalg_solve_ex", "equal", "is_nonzero"}

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        on_device = any(isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in args)
        if name in self.READS and on_device:
            self.syncs.append(name)
        if name == "_to_copy" and args[0].device.type == "cpu" and kwargs.get("device") not in (None, "cpu") \
                and torch.device(kwargs["device"]).type != "cpu" and not kwargs.get("non_blocking", False):
            self.syncs.append("blocking host->device copy")
        if name == "copy_" and args[1].device.type == "cpu" and args[0].device.type != "cpu" \
                and not (args[2] if len(args) > 2 else kwargs.get("non_blocking", False)):
            self.syncs.append("blocking host->device copy_")
        return func(*args, **kwargs)


def test_device_augmentation_makes_no_host_sync():
    from config import AugConfig
    from pipeline.torch_gpu_backend import crop_resize_flip

    aug = AugConfig(small_crops=2, small_size=8)
    x = torch.empty(6, 3, 24, 24, device="meta")
    with SyncDetector() as det:
        g = torch.Generator().manual_seed(0)
        y = BatchColorAugment(aug, 24)(batch_random_resized_crop(x, 16, (0.2, 1), (0.75, 1.33), 0.5, g), g)
        views = DeviceViews(aug, 16, seed=0)(lambda *a: batch_random_resized_crop(x, *a), 3, 7)
        images = [torch.empty(3, 20 + i, 30, dtype=torch.uint8, device="meta") for i in range(4)]
        views += DeviceViews(aug, 16, seed=0)(lambda *a: crop_resize_flip(images, *a), 3, 7)
    assert y.shape == (6, 3, 16, 16) and [v.shape[-1] for v in views] == [16, 8, 8] * 2
    assert det.syncs == []


def test_memory_loader_makes_no_host_sync_per_batch(id_folder, tmp_path):
    cfg = tiny_config(str(id_folder), str(tmp_path), aug={"blur_p": 0.5})
    index = scan_folder(id_folder)
    loader = make_loader(cfg, index, make_schedule("epoch", len(index), None, None, 0), torch.device("meta"), 16)
    with SyncDetector() as det:
        batches = list(loader.iter_epoch(1))
    assert len(batches) == 3 and det.syncs == []


def test_the_ring_cache_bank_step_makes_no_host_sync():
    """The sync-free step of a bank that keeps the ring's rows on the device (pic.bank_cache): candidate slots,
    cache reads, the batch's rows, the correction table, the update, the roll of the ring, the queued write-back."""
    import torch.nn.functional as F

    from model.bank import BankOptions, make_bank

    n, k, b, steps = 64, 12, 4, 12
    lrs = lr_table(0.1, 2, steps + 1, 1e-6)
    options = BankOptions(dim=8, negatives="recent", k=k, batch_size=b, cache="on")
    bank = make_bank(options, n, lrs, "meta", correction_form="table")  # the CUDA branch of the correction
    ids = [torch.randperm(n, generator=torch.Generator().manual_seed(t))[:b].to("meta") for t in range(steps)]

    def step(t):
        z = torch.empty(b, 8, device="meta", requires_grad=True)
        logits, targets, update = bank(z, ids[t], t)
        F.cross_entropy(logits, targets).backward()
        bank.update(update, float(lrs[t]), t, finite=torch.ones((), dtype=torch.bool, device="meta"))

    for t in range(k // b + 2):  # warm-up: the ring fills, the table is built
        step(t)
    with SyncDetector() as det:
        for t in range(k // b + 2, steps):
            step(t)
    assert det.syncs == [] and len(bank.rows.queue) == 2  # rows leave the ring, written 2 steps later


def test_the_detector_sees_what_it_looks_for():
    with SyncDetector() as det:
        x = torch.ones(3).to("meta")
        torch.tensor([1.0, 2.0], device="meta")
    assert det.syncs and all("blocking" in s for s in det.syncs)
    del x


# ---------------------------------------------------------------------------------------------------------------
# CUDA only (the GPU machine)
# ---------------------------------------------------------------------------------------------------------------


@CUDA
@pytest.mark.parametrize("backend", ["memory", "torch-gpu"])
def test_cuda_training_loop_makes_no_host_sync_between_log_steps(id_folder, tmp_path, backend, monkeypatch):
    from config import apply_overrides
    from model.trainer import build_trainer
    from pipeline.torch_gpu_backend import JPEGDecoder

    decode = JPEGDecoder.__call__

    def decode_allowed_to_wait(self, *args):  # torchvision's nvJPEG call waits for its own stream on the host
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(0)
        try:
            return decode(self, *args)
        finally:
            torch.cuda.set_sync_debug_mode(mode)

    monkeypatch.setattr(JPEGDecoder, "__call__", decode_allowed_to_wait)
    dev = torch.device("cuda")
    cfg = tiny_config(str(id_folder), str(tmp_path), aug={"blur_p": 0.5, "small_crops": 1, "small_size": 8},
                      data={"backend": backend, "workers": 0})
    index = scan_folder(id_folder)
    loader = make_loader(cfg, index, make_schedule("epoch", len(index), None, None, 0), dev, 16)
    lrs = lr_table(0.1, 2, 30, 1e-6)
    apply_overrides(cfg, {"pic": {"negatives": "recent", "k": 16}, "model": {"amp": "bf16"}})
    step_fn = build_trainer(cfg, len(index), dev, lrs=lrs).train_step
    assert step_fn.sync_free
    step = 0
    for b in loader.iter_epoch(0):  # warm-up: cuDNN autotuning, the correction table's first seek
        step_fn(b.images, b.ids, b.crops, step, float(lrs[step]))
        step += 1
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for epoch in (1, 2):
            for b in loader.iter_epoch(epoch):
                loss = step_fn(b.images, b.ids, b.crops, step, float(lrs[step]))
                step += 1
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()


@CUDA
def test_cuda_decode_does_not_overwrite_memory_the_step_still_reads(tmp_path):
    """pytorch/vision PR 9606's failure: tensors freed while reductions of them are still queued; a decode on the
    same stream may get their blocks and overwrite them before the reductions run."""
    import io

    from PIL import Image

    from pipeline.torch_gpu_backend import JPEGDecoder, collate_bytes

    h, w = 96, 128
    files = []
    for i in range(8):
        buf = io.BytesIO()
        Image.fromarray(np.full((h, w, 3), 30 * i, np.uint8)).save(buf, "JPEG", quality=95)
        files.append((i, buf.getvalue()))
    packed = collate_bytes(files)

    class Index:
        def abspath(self, i):
            return f"mem:{i}"

    decoder = JPEGDecoder(torch.device("cuda"))
    wrong = 0
    for _ in range(50):
        held = [torch.full((3, h, w), 7, dtype=torch.uint8, device="cuda") for _ in range(8)]
        torch.cuda._sleep(20_000_000)  # ~10 ms of queued work before the reductions
        sums = [t.sum(dtype=torch.int64) for t in held]
        del held  # freed on the host while the sums are still queued
        decoder(packed, Index())
        wrong += sum(int(s.item() != 7 * 3 * h * w) for s in sums)
    assert wrong == 0
