"""The recent-negative ring's rows kept on the compute device (model/bank/ring_cache.py), a layer over any rows.

* the cached bank computes the same logits, targets and rows as the uncached one, bit for bit (fp64 and fp32 rows,
  write-back lag 0 and 2, the incremental correction table, a batch larger than K, a ring size B does not divide);
* a step reads at most B rows of the bank and writes at most B (after the ring fills), not K + B;
* a checkpoint (flush + the saved cache) resumes exactly, also with bf16 rows and an mmap file; without the saved
  cache the ring's rows are read back from the bank;
* bf16 rows: rounding once per visit instead of once per step keeps the bank closer to the fp64 reference;
* a skipped (non-finite) step applies the zero-gradient update the lazy correction would apply later.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import checkpoint_tensors
from test_bank_rows import (
    LRS,
    WD,
    _threads,  # noqa: F401 - the module's autouse fixture
    rel_err,
)
from test_bank_rows import make as make_rows
from test_lazy_equivalence import STEPS, B, D, K, id_stream, run_masked_full

from model.bank import InstanceBank
from model.bank.ring_cache import EvictionQueue


def make(cache: bool, lag: int = 2, dtype: str = "fp32", storage: str = "device", folder: str = "", k: int = K,
         batch: int = B, double: bool = False, correction: str = "exact", table: bool = False) -> InstanceBank:
    return make_rows(storage, "fp64" if double else dtype, folder, cache, k=k, batch=batch, correction=correction,
                     table=table, lag=lag)


def saved(bank: InstanceBank, step: int) -> dict:
    """A checkpoint of the bank, copied (a device bank's state is its own tensors)."""
    return copy.deepcopy(bank.checkpoint(step))


def batches(batch: int = B) -> list[torch.Tensor]:
    flat = torch.cat(id_stream())
    return [flat[i:i + batch] for i in range(0, len(flat) - batch + 1, batch)]


def run(bank: InstanceBank, start: int, stop: int, batch: int = B, log: list | None = None,
        sync_free: bool = False, before_step=None) -> None:
    """sync_free: the CUDA loop's form of the update (finite=True as a tensor, decided on the device);
    before_step(bank): called before every step."""
    dtype = torch.float64 if bank.rows.dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(7)
    for t, ids in enumerate(batches(batch)[:stop]):
        z = torch.randn(len(ids), D, generator=g, dtype=torch.float64).to(dtype)
        if t < start:
            continue
        if before_step is not None:
            before_step(bank)
        logits, targets, update = bank(z, ids, t)
        if log is not None:
            log.append((logits.detach().clone(), targets.clone()))
        F.cross_entropy(logits, targets).backward()
        bank.update(update, float(LRS[t]), t, finite=torch.tensor(True) if sync_free else None)


def final(bank: InstanceBank, now: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    bank.bring_up_to_date(now)
    return tuple(x.clone() for x in bank.rows.table())


def assert_same(a, b):
    for x, y, name in zip(a, b, ("weight", "momentum", "last"), strict=True):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("lag", [0, 2])
@pytest.mark.parametrize("double", [True, False])
@pytest.mark.parametrize("sync_free", [False, True])
def test_the_cached_bank_computes_the_same_numbers_as_the_uncached_one(lag, double, sync_free):
    """Both forms of the update (the host-checked one and the sync-free CUDA one) against the host-checked
    uncached bank: the same bits."""
    ref_log, log = [], []
    ref, bank = make(False, double=double), make(True, lag, double=double)
    run(ref, 0, STEPS, log=ref_log)
    run(bank, 0, STEPS, log=log, sync_free=sync_free)
    if sync_free:  # and the uncached bank's sync-free form too
        again = make(False, double=double)
        run(again, 0, STEPS, sync_free=True)
        assert_same(final(again, STEPS), final(ref, STEPS))
    for t, ((a, ta), (b, tb)) in enumerate(zip(ref_log, log, strict=True)):
        assert torch.equal(ta, tb), t
        assert torch.equal(a, b), t
    assert (ref.rows.table()[0] - make(False, double=double).rows.table()[0]).abs().max() > 0.1  # it trained
    assert_same(final(bank, STEPS), final(ref, STEPS))


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_neither_the_lag_nor_a_flush_changes_low_precision_rows(dtype):
    """Rows leaving the ring are rounded when queued, as the bank stores them: a row read back from the queue or
    from the bank (after a checkpoint's flush) is the same number."""
    ref = make(True, lag=0, dtype=dtype)
    run(ref, 0, STEPS)
    bank = make(True, lag=2, dtype=dtype)
    run(bank, 0, 50)
    bank.checkpoint(50)
    run(bank, 50, 51)
    bank.checkpoint(51)
    run(bank, 51, STEPS)
    assert_same(final(bank, STEPS), final(ref, STEPS))


def test_the_cached_bank_with_the_correction_table_and_odd_sizes():
    """The CUDA branch's incremental table on the CPU; K = 10 (not a multiple of B = 4); and B = 16 > K = 10."""
    for k, batch in ((10, B), (10, 16)):
        ref, bank = make(False, k=k, batch=batch, table=True), make(True, k=k, batch=batch, table=True)
        steps = len(batches(batch))
        run(ref, 0, steps, batch)
        run(bank, 0, steps, batch)
        assert_same(final(bank, steps), final(ref, steps))


def test_a_step_reads_and_writes_at_most_b_bank_rows():
    bank = make(True, lag=2)
    reads, writes = [], []
    inner = bank.rows.inner
    read, write = inner.read, inner.write
    inner.read = lambda rows: (reads.append(rows.numel()), read(rows))[1]
    inner.write = lambda rows, *a: (writes.append(rows.numel()), write(rows, *a))[1]
    run(bank, 0, 60)
    warm = K // B  # the ring fills after K/B steps
    assert reads[:2] == [B, B] and max(reads[warm + 1:]) == B  # (the uncached bank reads K + B = 16 each step)
    assert 0 < sum(writes) <= B * 60 and max(writes) <= B
    # nothing is written in the ring's first K/B steps, then B rows per step, `lag` steps later
    assert len(writes) == 60 - warm - 2


@pytest.mark.parametrize("dtype,storage", [("fp32", "device"), ("bf16", "device"), ("bf16", "mmap")])
def test_a_checkpoint_resumes_exactly(dtype, storage, tmp_path):
    folder = str(tmp_path / "bank") if storage == "mmap" else ""
    ref = make(True, dtype=dtype)
    run(ref, 0, STEPS)
    if storage == "mmap":  # the uninterrupted reference on its own file
        ref = make(True, dtype=dtype, storage="mmap", folder=str(tmp_path / "ref"))
        run(ref, 0, STEPS)
    bank = make(True, dtype=dtype, storage=storage, folder=folder)
    run(bank, 0, 77)
    state = saved(bank, 77)  # writes the queue and the ring's rows back into the bank first
    assert state["rows"]["ring_rows"]["w"].dtype == torch.float32
    run(bank, 77, 120)  # then killed
    again = make(True, dtype=dtype, storage=storage, folder=folder)
    again.restore(state)
    run(again, 77, STEPS)
    assert_same(final(again, STEPS), final(ref, STEPS))


def test_without_the_saved_cache_the_ring_is_read_back_from_the_bank():
    """fp32 rows: the flushed bank holds the cache exactly (a checkpoint of an uncached run, or an older one)."""
    ref = make(True)
    run(ref, 0, STEPS)
    bank = make(True)
    run(bank, 0, 50)
    state = saved(bank, 50)
    state["rows"]["ring_rows"] = None
    again = make(True)
    again.restore(state)
    run(again, 50, STEPS)
    assert_same(final(again, STEPS), final(ref, STEPS))
    # and an uncached bank resumes a cached run's checkpoint (the bank was written back), and the other way round
    plain = make(False)
    plain.restore(state)
    run(plain, 50, STEPS)
    assert_same(final(plain, STEPS), final(ref, STEPS))


def test_bf16_rows_rounded_once_per_visit_stay_closer_to_the_fp64_reference():
    errs = {}
    for cache in (False, True):
        bank = make(cache, dtype="bf16")
        w0 = bank.rows.table()[0].double().clone()
        run(bank, 0, STEPS)
        w_ref, _ = run_masked_full(w0, WD)
        errs[cache] = rel_err(final(bank, STEPS)[0], w_ref)
    # measured 2026-12-02: uncached 1.9e-2, cached 8.3e-3 (fp16: 2.6e-3, 9.9e-4); the claim is only "clearly smaller"
    assert errs[True] < 0.5 * errs[False], errs


@pytest.mark.parametrize("correction", ["exact", "none"])
def test_a_skipped_step_applies_the_zero_gradient_update(correction):
    """Step 40's loss is non-finite (finite=False): the cached bank updates the candidates with g = 0 at once, the
    uncached one leaves them to the closed-form correction; the same rows up to rounding. Without a correction
    (pic.correction=none) neither moves them."""
    out = []
    for cache in (False, True):
        bank = make(cache, double=True, correction=correction)
        g = torch.Generator().manual_seed(7)
        for t, ids in enumerate(batches()[:STEPS]):
            z = torch.randn(len(ids), D, generator=g, dtype=torch.float64)
            logits, targets, update = bank(z, ids, t)
            F.cross_entropy(logits, targets).backward()
            finite = torch.tensor(t != 40)
            bank.update(update, float(LRS[t]), t, finite=finite)
        out.append(final(bank, STEPS))
    for x, y in zip(out[0][:2], out[1][:2], strict=True):
        assert (x - y).abs().max().item() < 1e-10


def test_a_row_waiting_in_the_write_back_queue_is_never_read_from_the_bank():
    """What keeps a shared bank's readers off rows its writer may be writing (model/bank/files.py, case b: under
    NCCL a rank can still be reading step t while the node's writer writes rows that left the ring earlier): such a
    row is served from every rank's own queue until the barrier after its write. Here the bank's copy of every
    queued row is garbage during the steps it waits, as a reader might see it mid-write: the run is unchanged."""
    ref = make(True)
    run(ref, 0, STEPS)

    def scribble(bank):
        weight, momentum, _ = bank.rows.table()
        for ev in bank.rows.queue._queue:
            weight[ev.rows], momentum[ev.rows] = float("nan"), float("nan")

    bank = make(True)
    run(bank, 0, STEPS, before_step=scribble)
    assert_same(final(bank, STEPS), final(ref, STEPS))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_evictions_wait_for_their_copy_on_the_rows_own_device():
    """Rows on cuda:1 leave the ring while cuda:0 is the current device: their copy to pinned host memory is queued
    on cuda:1's stream, behind its work, so the event the write-back waits on must be recorded there (on cuda:0's
    idle stream it would be complete at once, and the host would write a buffer the copy has not filled)."""
    torch.cuda.set_device(0)
    rows_device = torch.device("cuda", 1)
    queue = EvictionQueue(lag=0)
    w = torch.zeros(1 << 14, 128, device=rows_device)
    with torch.cuda.device(rows_device):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of queued work on cuda:1 before the rows are ready
    w = w + 1
    queue.put(0, torch.arange(len(w), device=rows_device), w, w, torch.device("cpu"))
    (ev,) = queue.due(0)
    assert (ev.staged[1] == 1).all()


def test_the_eviction_queue_serves_the_newest_value_and_writes_after_the_lag():
    q = EvictionQueue(lag=2)
    cpu = torch.device("cpu")
    q.put(5, torch.tensor([3, 7]), torch.full((2, 2), 1.0), torch.full((2, 2), 10.0), cpu)
    q.put(6, torch.tensor([7]), torch.full((1, 2), 2.0), torch.full((1, 2), 20.0), cpu)
    ids = torch.tensor([7, 3, 9])
    w, u, last = q.lookup(ids, torch.zeros(3, 2), torch.zeros(3, 2), torch.full((3,), -1))
    assert w[:, 0].tolist() == [2.0, 1.0, 0.0] and u[:, 0].tolist() == [20.0, 10.0, 0.0]
    assert last.tolist() == [6, 5, -1]
    assert q.due(6) == [] and [ev.step for ev in q.due(7)] == [5] and len(q) == 1
    assert [ev.step for ev in q.drain()] == [6] and len(q) == 0


@pytest.mark.parametrize("storage", ["device", "host"])
def test_train_py_with_and_without_the_cache_ends_bit_identical(id_folder, tmp_path, storage):
    """End to end through train.py (fp32 rows): the losses and every saved tensor, backbone and bank, are equal."""
    from conftest import tiny_config

    import train

    out = {}
    for cache in ("off", "on"):
        cfg = tiny_config(str(id_folder), str(tmp_path), optim={"epochs": 4},
                          pic={"negatives": "recent", "k": 32, "bank_storage": storage, "bank_cache": cache},
                          run={"name": f"{storage}-{cache}"})
        out[cache] = (train.train(cfg)["losses"], torch.load(tmp_path / f"{storage}-{cache}" / "last.pt",
                                                              weights_only=True))
    (loss_off, ck_off), (loss_on, ck_on) = out["off"], out["on"]
    assert loss_on == loss_off and len(loss_on) == 12
    assert ck_on["bank"]["rows"]["ring_rows"] is not None and "ring_rows" not in ck_off["bank"]["rows"]
    on = checkpoint_tensors(ck_on)
    assert "bank.weight" in on
    for k, v in checkpoint_tensors(ck_off).items():
        assert torch.equal(v, on[k]), k
