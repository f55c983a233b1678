"""Spec §14 oracle 4: sampled soft-max + lazy correction ≡ full-table SGD with the logits outside C_t masked.

The real InstanceBank (fp64 rows) runs the recent-negative sampled soft-max with the closed-form correction of the
rows that sat out (applied before each forward, and to every row at the end). The reference is a dense [N,D]
parameter stepped by torch.optim.SGD every step, with the same momentum / weight decay / lr table, whose logits are −∞
outside the candidate set C_t (taken from a second RecentNegatives fed the identical id stream). Rows outside C_t get
zero gradient there, so torch's SGD applies exactly the zero-gradient steps the bank skips and corrects later.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.bank import NORM_EPS, BankOptions, InstanceBank, make_bank
from model.bank.negatives import RecentNegatives
from model.optim import lr_table
from pipeline.schedule import SlidingWindow

N, D, B, K, STEPS = 64, 8, 4, 12, 200
TAU, M, BASE_LR, WARMUP = 0.2, 0.9, 0.5, 20
INIT_STD = 0.3  # rows of norm ≈ 0.85: the cosine gradient (∝ 1/‖w‖) stays moderate over 200 steps


def id_stream(steps: int = STEPS) -> list[torch.Tensor]:
    """Batches of B ids from a small sliding window (W=16, S=4): short revisits inside a burst, long gaps between
    bursts, and instances that come back while still in the FIFO (dedup in C_t)."""
    sw = SlidingWindow(N, 16, 4, seed=3)
    flat = np.concatenate([sw.window_ids(k) for k in range(steps * B // 16 + 1)])
    return [torch.from_numpy(flat[t * B:(t + 1) * B].copy()) for t in range(steps)]


def features(steps: int = STEPS) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randn(B, D, generator=g, dtype=torch.float64) for _ in range(steps)]


def make(wd: float, correction: str = "exact", table: bool = False) -> tuple[InstanceBank, np.ndarray]:
    """table: the rows corrected by the incremental CorrectionTable, the CUDA form, here on the CPU."""
    lrs = lr_table(BASE_LR, WARMUP, STEPS, 1e-6)
    options = BankOptions(dim=D, temperature=TAU, init_std=INIT_STD, momentum=M, weight_decay=wd,
                          negatives="recent", k=K, batch_size=B, correction=correction, dtype="fp64")
    bank = make_bank(options, N, lrs, generator=torch.Generator().manual_seed(1),
                     correction_form="table" if table else "auto")
    weight, _, last = bank.rows.table()
    assert bank.negatives is not None and weight.dtype == torch.float64 and last.dtype == torch.int64
    return bank, lrs


def run_bank(wd: float, correction: str = "exact", table: bool = False):
    bank, lrs = make(wd, correction, table)
    w0 = bank.rows.table()[0].clone()
    sizes = []
    for t, (ids, z) in enumerate(zip(id_stream(), features(), strict=True)):
        logits, targets, update = bank(z, ids, t)
        assert logits.dtype == torch.float64
        sizes.append(logits.shape[1])
        F.cross_entropy(logits, targets).backward()
        bank.update(update, float(lrs[t]), t)
    bank.bring_up_to_date(STEPS)
    weight, momentum, _ = bank.rows.table()
    return w0, weight.clone(), momentum.clone(), sizes


def run_masked_full(w0: torch.Tensor, wd: float):
    """Dense reference: every row stepped by torch SGD every step; logits outside C_t = −∞."""
    lrs = lr_table(BASE_LR, WARMUP, STEPS, 1e-6)
    w = torch.nn.Parameter(w0.clone())
    opt = torch.optim.SGD([w], lr=float(lrs[0]), momentum=M, weight_decay=wd)
    fifo = RecentNegatives(K, B)
    for t, (ids, z) in enumerate(zip(id_stream(), features(), strict=True)):
        cand, _ = fifo.candidates(ids)
        mask = torch.zeros(N, dtype=torch.bool)
        mask[cand] = True
        logits = F.normalize(z, dim=1, eps=NORM_EPS) @ F.normalize(w, dim=1, eps=NORM_EPS).t() / TAU
        logits = torch.where(mask, logits, torch.tensor(-float("inf"), dtype=logits.dtype))
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(logits, ids).backward()
        assert torch.all(w.grad[~mask] == 0)
        opt.param_groups[0]["lr"] = float(lrs[t])
        opt.step()
        fifo.push(ids)
    return w.detach().clone(), opt.state[w]["momentum_buffer"].clone()


@pytest.fixture(scope="module", autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add noise on a shared box
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("wd", [1e-4, 5e-2])
def test_lazy_correction_equals_masked_full_table_sgd(wd):
    w0, w_lazy, u_lazy, sizes = run_bank(wd, "exact")
    w_ref, u_ref = run_masked_full(w0, wd)
    # The setting really is sparse: C_t holds at most K+B = 16 of 64 rows, and it was full for most steps.
    assert max(sizes) <= K + B and np.median(sizes) >= K
    assert (w_ref - w0).abs().max() > 0.1  # training moved the rows
    dw, du = (w_lazy - w_ref).abs().max().item(), (u_lazy - u_ref).abs().max().item()
    assert dw < 1e-10, dw
    assert du < 1e-10, du

    # The same run without the correction is clearly different (the stale rows miss wd and the momentum carry).
    _, w_none, u_none, _ = run_bank(wd, "none")
    assert (w_none - w_ref).abs().max().item() > 1e-3
    assert (u_none - u_ref).abs().max().item() > 1e-3

    # CorrectionTable (the path the bank takes on CUDA) gives the same result.
    _, w_tab, u_tab, _ = run_bank(wd, "exact", table=True)
    assert (w_tab - w_ref).abs().max().item() < 1e-10
    assert (u_tab - u_ref).abs().max().item() < 1e-10
    assert (w_tab - w_lazy).abs().max().item() < 1e-11
