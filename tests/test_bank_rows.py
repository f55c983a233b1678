"""The bank's rows behind one interface (model/bank/rows.py), every implementation with and without the ring cache:

* they train bit-identically to the device bank (fp32), and keep the low-precision rows (bf16, fp16) within a stated
  tolerance of the dense fp64 reference of docs/method.md §12 oracle 4 (tests/test_lazy_equivalence.py);
* the interface itself: a write reads back, gather corrects, a checkpoint restores;
* on CUDA (skipped here; the README's GPU command runs them): a few real steps of each storage × cache, with pinned
  staging and events, equal to the CPU bank within a float tolerance.
File specifics (journal, owner, lock, room) are in tests/test_bank_files.py; kills through train.py in
tests/test_bank_resume.py; the 2-process shared bank in tests/test_distributed.py.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_lazy_equivalence import (
    BASE_LR,
    INIT_STD,
    STEPS,
    TAU,
    WARMUP,
    B,
    D,
    K,
    M,
    N,
    features,
    id_stream,
    run_masked_full,
)

from model.bank import BankOptions, InstanceBank, make_bank
from model.bank.correction import correct_rows
from model.bank.options import STORAGES
from model.bank.ring_cache import RingCache
from model.optim import lr_table

WD = 1e-4
LRS = lr_table(BASE_LR, WARMUP, STEPS, 1e-6)
KINDS = [(storage, cache) for storage in STORAGES for cache in (False, True)]  # the registry x the cache layer
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def kind_id(kind) -> str:
    return kind[0] + ("+cache" if kind[1] else "")


@pytest.fixture(scope="module", autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make(storage: str = "device", dtype: str = "fp32", folder: str = "", cache: bool = False, seed: int = 1,
         negatives: str = "recent", device: str = "cpu", placement: str = "auto", k: int = K, batch: int = B,
         correction: str = "exact", table: bool = False, lag: int = 2) -> InstanceBank:
    """The oracle's bank (tests/test_lazy_equivalence.py) in any storage; table: the CUDA form of the correction
    (here on the CPU); lag: the ring cache's write-back lag."""
    options = BankOptions(dim=D, temperature=TAU, init_std=INIT_STD, momentum=M, weight_decay=WD,
                          negatives=negatives, k=k, batch_size=batch, correction=correction, storage=storage,
                          dtype=dtype, folder=folder, cache="on" if cache else "off", placement=placement)
    bank = make_bank(options, N, LRS, device, generator=torch.Generator().manual_seed(seed),
                     correction_form="table" if table else "auto", writeback_lag=lag)
    assert isinstance(bank.rows, RingCache) == cache
    return bank


def folder_for(storage: str, tmp_path, name: str = "bank") -> str:
    return str(tmp_path / name) if storage != "device" else ""


def train(bank: InstanceBank, start: int, stop: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> None:
    for t, (ids, z) in enumerate(zip(id_stream(), features(), strict=True)):
        if start <= t < stop:
            logits, targets, update = bank(z.to(device, dtype), ids.to(device), t)
            F.cross_entropy(logits, targets).backward()
            bank.update(update, float(LRS[t]), t)


def state(bank: InstanceBank) -> tuple[torch.Tensor, ...]:
    """Every row's newest value (the ring cache's rows written back first)."""
    bank.rows.flush()
    return tuple(x.clone() for x in bank.rows.table())


def assert_equal_state(a, b):
    for x, y, name in zip(a, b, ("weight", "momentum", "last"), strict=True):
        assert torch.equal(x, y), name


def rel_err(w: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest per-row relative error ‖w_j − ref_j‖ / ‖ref_j‖."""
    return ((w.double() - ref).norm(dim=1) / ref.norm(dim=1)).max().item()


@pytest.mark.parametrize("kind", KINDS, ids=kind_id)
def test_every_kind_of_rows_trains_bit_identically_to_the_device_bank(kind, tmp_path):
    storage, cache = kind
    ref = make()
    train(ref, 0, STEPS)
    bank = make(storage, folder=folder_for(storage, tmp_path), cache=cache)
    assert bank.rows.table()[0].data_ptr() != ref.rows.table()[0].data_ptr()
    train(bank, 0, STEPS)
    assert (state(bank)[0] - make().rows.table()[0]).abs().max() > 0.1  # it trained
    assert_equal_state(state(bank), state(ref))
    ref.bring_up_to_date(STEPS)
    bank.bring_up_to_date(STEPS)
    assert_equal_state(state(bank), state(ref))
    if storage != "device":  # the file holds the rows: a second mapping sees them
        w = np.memmap(tmp_path / "bank" / "weight.bin", dtype=np.float32, mode="r", shape=(N, D))
        assert torch.equal(torch.from_numpy(np.array(w)), state(ref)[0])


@pytest.mark.parametrize("kind", KINDS, ids=kind_id)
def test_the_rows_interface(kind, tmp_path):
    """Whatever the rows: a write reads back (rounded to the storage), gather brings a stale row up to date as the
    correction kernel does, and restore returns to a checkpoint's rows."""
    storage, cache = kind
    bank = make(storage, "bf16", folder_for(storage, tmp_path), cache)
    rows = bank.rows
    train(bank, 0, 30)  # (the ring holds rows now)
    before = copy.deepcopy(rows.checkpoint(30))
    snapshot = rows.read(None)
    snapshot = tuple(x.clone() for x in snapshot)
    ids = torch.tensor([5, 7, int(bank.negatives.ring()[0])])  # the last one is in the ring
    w = torch.randn(3, D, generator=torch.Generator().manual_seed(0))
    rows.write(ids, w, 2 * w, torch.tensor([10, 11, 29]))
    got_w, got_u, got_last = rows.read(ids)
    assert got_w.dtype == torch.float32 and torch.equal(got_w, w.bfloat16().float())
    assert torch.equal(got_u, (2 * w).bfloat16().float()) and got_last.tolist() == [10, 11, 29]
    gw, gu = rows.gather(ids, 30)  # rows 5 and 7 sat out of steps 11..29 / 12..29: corrected; the third is current
    ew, eu = correct_rows(got_w.clone(), got_u.clone(), got_last, 30, LRS, M, WD)
    assert torch.equal(gw, ew) and torch.equal(gu, eu) and torch.equal(gw[2], got_w[2])
    rows.restore(before)
    for x, y in zip(rows.read(None), snapshot, strict=True):
        assert torch.equal(x, y)
    bank.close()


@pytest.mark.parametrize("kind", KINDS, ids=kind_id)
def test_a_checkpoint_resumes_exactly_in_a_new_bank(kind, tmp_path):
    """Checkpoint at 60, train on (the run that is then killed), and a new bank restored from the checkpoint ends
    as the uninterrupted run (an mmap bank: rolled back by its undo journal; the others: the saved tensors)."""
    storage, cache = kind
    ref = make(storage, folder=folder_for(storage, tmp_path, "ref"), cache=cache)
    train(ref, 0, STEPS)
    bank = make(storage, folder=folder_for(storage, tmp_path), cache=cache)
    train(bank, 0, 60)
    saved = copy.deepcopy(bank.checkpoint(60))
    train(bank, 60, 100)
    bank.rows.flush()
    again = make(storage, folder=folder_for(storage, tmp_path), cache=cache)  # a new process maps the same file
    again.restore(saved)
    train(again, 60, STEPS)
    assert_equal_state(state(again), state(ref))


# The per-row relative error of w against the dense fp64 SGD (200 steps, lr 0.5, 64 rows of which ≤ 16 per step;
# every row corrected at the end; the figures are in docs/bank.md). The bf16 and fp16 tolerances are about twice the
# measured errors: they are the storage's rounding (2^-9, 2^-12 a write), whose size a CPU's float32 summation order
# does not change. fp32's error is that order's rounding itself (2^-24 an operation, a few hundred operations deep,
# accumulating as a random walk: ~1e-7 to 1e-6), so its bound is not a measurement: 1e-5 holds for any order, and a
# wrong correction or update is off by 1e-3 or more.
BF16_TOL, FP16_TOL, FP32_TOL = 0.06, 0.006, 1e-5


@pytest.mark.parametrize("kind", KINDS, ids=kind_id)
@pytest.mark.parametrize("dtype,tol", [("fp32", FP32_TOL), ("bf16", BF16_TOL), ("fp16", FP16_TOL)])
def test_low_precision_rows_stay_close_to_the_dense_fp64_reference(kind, dtype, tol, tmp_path):
    """fp16 / bf16 rows in every storage: within the tolerance of the fp64 oracle, clearly worse than fp32 (the
    rounding is really there), and bit for bit the device bank's of the same dtype and cache."""
    storage, cache = kind
    bank = make(storage, dtype, folder_for(storage, tmp_path), cache)
    assert bank.rows.table()[0].dtype == {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    w0 = bank.rows.table()[0].double().clone()
    train(bank, 0, STEPS)
    bank.bring_up_to_date(STEPS)
    w_ref, _ = run_masked_full(w0, WD)  # fp64 dense SGD from the same (rounded) start
    assert (w_ref - w0).abs().max() > 0.1
    err = rel_err(state(bank)[0], w_ref)
    assert err < tol, err
    if dtype != "fp32":
        assert err > 10 * FP32_TOL, err
    assert torch.isfinite(state(bank)[1].float()).all()
    if storage != "device":
        same = make("device", dtype, cache=cache)
        train(same, 0, STEPS)
        same.bring_up_to_date(STEPS)
        assert_equal_state(state(bank), state(same))


def test_the_full_softmax_over_file_rows_goes_through_their_write(tmp_path):
    """pic.negatives=full (and recent with K >= N): every row is updated every step. On an mmap bank those writes
    are journaled like any other, so a kill after a checkpoint rolls back exactly."""
    ref = make(negatives="full")
    train(ref, 0, 40)
    bank = make("mmap", folder=str(tmp_path / "bank"), negatives="full")
    train(bank, 0, 20)
    saved = copy.deepcopy(bank.checkpoint(20))
    at_20 = state(bank)
    train(bank, 20, 31)  # then killed
    again = make("mmap", folder=str(tmp_path / "bank"), negatives="full")
    again.restore(saved)
    assert_equal_state(state(again), at_20)
    train(again, 20, 40)
    assert_equal_state(state(again), state(ref))


# ---------------------------------------------------------------------------------------------------------------
# CUDA (the GPU machine): each storage x cache for a few real steps, against the same bank on the CPU
# ---------------------------------------------------------------------------------------------------------------


@CUDA
@pytest.mark.parametrize("placement", ["auto", "cpu"])
@pytest.mark.parametrize("kind", KINDS, ids=kind_id)
def test_cuda_bank_equals_the_cpu_bank(kind, placement, tmp_path):
    """Rows on the GPU (device), in host memory (pic.bank_device=cpu, host, mmap: the ring cache's write-back goes
    through pinned memory and CUDA events), the correction table on the GPU. fp64 rows: the GPU and the CPU differ
    only in the order of their float64 reductions (≲ 1e-15 relative per step), so 40 steps stay far below 1e-9;
    fp32 rows: the same at float32's 1e-7 per step, below 1e-4."""
    storage, cache = kind
    if placement == "cpu" and storage != "device":
        pytest.skip("pic.bank_device only places a device bank")
    for dtype, tol in (("fp64", 1e-9), ("fp32", 1e-4)):
        work = torch.float64 if dtype == "fp64" else torch.float32
        cpu = make(storage, dtype, folder_for(storage, tmp_path, "cpu"), cache)
        train(cpu, 0, 40, work)
        gpu = make(storage, dtype, folder_for(storage, tmp_path, "gpu"), cache, device="cuda", placement=placement)
        events = []
        for t in range(40):
            train(gpu, t, t + 1, work, "cuda")
            if cache:
                events += [ev.event is not None for ev in gpu.rows.queue._queue]
        if cache and (storage != "device" or placement == "cpu"):
            assert events and all(events)  # rows leave the GPU through pinned memory and an event
        torch.cuda.synchronize()
        for x, y in zip(state(gpu), state(cpu), strict=True):
            assert x.device.type == ("cuda" if storage == "device" and placement == "auto" else "cpu")
            assert (x.cpu().double() - y.double()).abs().max().item() <= tol
        cpu.close()
        gpu.close()
