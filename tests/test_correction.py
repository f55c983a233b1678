"""Spec §5 / §14 oracles 1–3 for the lazy weight correction, both backends, and the incremental table."""

from contextlib import contextmanager

import numpy as np
import pytest
import torch

from model.bank.correction import CorrectionTable, correct_rows, step_matrix

M, WD = 0.9, 1e-4
BACKENDS = ("numba", "torch")


def _rows(r, d, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(r, d)).astype(dtype), rng.normal(size=(r, d)).astype(dtype)


def _cosine(n, base=0.03, seed=None):
    lrs = 1e-6 + (base - 1e-6) * (1 + np.cos(np.pi * np.arange(n) / n)) / 2
    return lrs if seed is None else lrs * np.random.default_rng(seed).uniform(0.5, 1.5, n)


def sgd_steps(w, u, lrs, momentum=M, wd=WD):
    """Real torch.optim.SGD with zero gradients, one step per lr; u=None means a fresh (never-stepped) buffer."""
    p = torch.nn.Parameter(torch.tensor(w, dtype=torch.float64))
    opt = torch.optim.SGD([p], lr=float(lrs[0]), momentum=momentum, weight_decay=wd)
    if u is not None:
        opt.state[p]["momentum_buffer"] = torch.tensor(u, dtype=torch.float64)
    for lr in lrs:
        opt.param_groups[0]["lr"] = float(lr)
        p.grad = torch.zeros_like(p)
        opt.step()
    return p.detach().numpy(), opt.state[p]["momentum_buffer"].numpy()


def recurrence(w, u, lrs, momentum=M, wd=WD):
    """The same zero-gradient steps as a plain fp64 loop (fast enough for tens of thousands of steps)."""
    w, u = w.astype(np.float64), u.astype(np.float64)
    for lr in lrs:
        u = momentum * u + wd * w
        w = w - lr * u
    return w, u


def correct(w, u, last, now, lrs, backend, mode="exact", momentum=M, wd=WD):
    """correct_rows on copies, results as numpy."""
    w2, u2 = correct_rows(w.copy(), u.copy(), np.asarray(last), now, lrs, momentum, wd, mode=mode, backend=backend)
    return np.asarray(w2), np.asarray(u2)


def rel(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


# fp32 rows against an fp64 result: the rows are rounded once on the way in (2^-24), and the correction is one 2x2
# mix w' = p00·w + p01·u per row (numba: in fp64, then rounded; torch: 2 products and a sum in fp32), |p| ≤ ~1.
# So every element is off by at most ~4·2^-24 of the rows' scale, in any operation order: 2.4e-7; bounds below 1e-6
# (two fp32 results) and 1e-5 (fp32 against fp64) hold on any CPU, where a wrong product is off by 1e-4 or more.
FP32_VS_FP32, FP32_VS_FP64 = 1e-6, 1e-5


@contextmanager
def one_torch_thread():
    """Avoid OpenMP stalls on a shared 2-core box (tensors > 32k elements would go multi-threaded)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# -- oracle 1: constant lr ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gap", [1, 7, 300, 5000])
def test_constant_lr_matches_torch_sgd(gap):
    w, u = _rows(3, 8, seed=gap)
    a, lr = 4, 0.03
    now = a + 1 + gap
    lrs = np.full(now + 1, lr)
    ref_w, ref_u = sgd_steps(w, u, lrs[a + 1 : now])
    for backend in BACKENDS:
        for mode in ("exact", "const"):
            w2, u2 = correct(w, u, [a] * 3, now, lrs, backend, mode)
            assert np.abs(w2 - ref_w).max() < 1e-12 and np.abs(u2 - ref_u).max() < 1e-12, (backend, mode)
        w32, u32 = correct(w.astype(np.float32), u.astype(np.float32), [a] * 3, now, lrs, backend)
        assert w32.dtype == np.float32
        assert rel(w32, ref_w) < FP32_VS_FP64 and rel(u32, ref_u) < FP32_VS_FP64, backend


# -- oracle 2: per-step lr, order matters ---------------------------------------------------------------------------
def test_cosine_lr_chronological_product_matches_sgd_and_reversed_fails():
    w, u = _rows(4, 8, seed=1)
    a, now = 50, 2051
    lrs = _cosine(now + 1)
    ref_w, ref_u = sgd_steps(w, u, lrs[a + 1 : now])
    rev = lrs.copy()
    rev[a + 1 : now] = lrs[a + 1 : now][::-1]  # same factors, multiplied in the reversed order
    for backend in BACKENDS:
        w2, u2 = correct(w, u, [a] * 4, now, lrs, backend)
        assert np.abs(w2 - ref_w).max() < 1e-12 and np.abs(u2 - ref_u).max() < 1e-12, backend
        w_rev, _ = correct(w, u, [a] * 4, now, rev, backend)
        assert np.abs(w_rev - ref_w).max() > 1e-4, backend


def test_long_gap_fp64_and_fp32():
    gap = 30000
    w, u = _rows(4, 16, seed=2)
    lrs = _cosine(gap + 1, seed=3)
    ref_w, ref_u = recurrence(w, u, lrs[:gap])
    for backend in BACKENDS:
        w2, u2 = correct(w, u, [-1] * 4, gap, lrs, backend)
        assert rel(w2, ref_w) < 1e-10 and rel(u2, ref_u) < 1e-10, backend
        w32, u32 = correct(w.astype(np.float32), u.astype(np.float32), [-1] * 4, gap, lrs, backend)
        assert rel(w32, ref_w) < FP32_VS_FP64 and rel(u32, ref_u) < FP32_VS_FP64, backend


# -- oracle 3: algebra ----------------------------------------------------------------------------------------------
def test_det_is_momentum():
    for lr in np.random.default_rng(0).uniform(0, 1, 20):
        assert np.linalg.det(step_matrix(lr, M, WD)) == pytest.approx(M, abs=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_weight_decay_closed_form(backend):
    w, u = _rows(5, 4, seed=4)
    lr, now = 0.05, 400
    last = np.array([-1, 10, 200, 398, 399])
    w2, u2 = correct(w, u, last, now, np.full(now, lr), backend, wd=0.0)
    t = (now - 1 - last)[:, None]
    assert np.allclose(u2, M**t * u, rtol=0, atol=1e-13)
    assert np.allclose(w2, w - lr * M * (1 - M**t) / (1 - M) * u, rtol=0, atol=1e-13)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["exact", "const"])
def test_zero_gap_is_identity(backend, mode):
    w, u = _rows(3, 5, seed=5)
    w2, u2 = correct(w, u, [9, 9, 9], 10, _cosine(20), backend, mode)
    assert np.array_equal(w2, w) and np.array_equal(u2, u)


# -- row bookkeeping ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_never_updated_rows_match_fresh_sgd(backend):
    w, _ = _rows(2, 6, seed=6)
    now = 120
    lrs = _cosine(now, seed=7)
    ref_w, ref_u = sgd_steps(w, None, lrs)  # PyTorch's first step initialises the buffer to d
    w2, u2 = correct(w, np.zeros_like(w), [-1, -1], now, lrs, backend)
    assert np.abs(w2 - ref_w).max() < 1e-13 and np.abs(u2 - ref_u).max() < 1e-13


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_lasts_in_one_call(backend):
    now = 700
    lrs = _cosine(now + 5, seed=8)
    last = np.array([-1, 3, 3, 500, 699, 698, 3, -1, 250])
    w, u = _rows(len(last), 7, seed=9)
    w2, u2 = correct(w, u, last, now, lrs, backend)
    for j, a in enumerate(last):
        ref_w, ref_u = recurrence(w[j], u[j], lrs[a + 1 : now])
        assert np.abs(w2[j] - ref_w).max() < 1e-13 and np.abs(u2[j] - ref_u).max() < 1e-13, j


def test_numba_and_torch_backends_agree_fp32():
    now, r = 3000, 300
    rng = np.random.default_rng(10)
    last = rng.integers(-1, now, r)
    w, u = _rows(r, 32, seed=11, dtype=np.float32)
    lrs = _cosine(now, seed=12)
    for mode in ("exact", "const"):
        w_nb, u_nb = correct(w, u, last, now, lrs, "numba", mode)
        w_t, u_t = correct(w, u, last, now, lrs, "torch", mode)
        assert rel(w_t, w_nb) < FP32_VS_FP32 and rel(u_t, u_nb) < FP32_VS_FP32, mode


def test_cpu_tensors_auto_backend_returns_tensors():
    w, u = (torch.from_numpy(x) for x in _rows(4, 3, seed=13, dtype=np.float32))
    last = torch.tensor([-1, 0, 5, 9])
    lrs = _cosine(10)
    w_ref, u_ref = correct(w.numpy(), u.numpy(), last.numpy(), 10, lrs, "torch")
    w2, u2 = correct_rows(w.clone(), u.clone(), last, 10, torch.tensor(lrs), M, WD)
    assert isinstance(w2, torch.Tensor) and w2.dtype == torch.float32
    assert rel(w2.numpy(), w_ref) < FP32_VS_FP32 and rel(u2.numpy(), u_ref) < FP32_VS_FP32


def test_rows_not_passed_are_untouched():
    w, u = _rows(10, 4, seed=14)
    w_all, u_all = w.copy(), u.copy()
    correct_rows(w_all[2:5], u_all[2:5], np.array([0, 1, 2]), 50, _cosine(50), M, WD, backend="numba")  # views
    keep = np.r_[0:2, 5:10]
    assert np.array_equal(w_all[keep], w[keep]) and np.array_equal(u_all[keep], u[keep])
    assert not np.array_equal(w_all[2:5], w[2:5])


def test_mode_none_is_identity():
    w, u = _rows(3, 4, seed=15)
    w2, u2 = correct_rows(w, u, np.array([-1, 0, 1]), 100, _cosine(100), M, WD, mode="none")
    assert w2 is w and u2 is u


@pytest.mark.parametrize("backend", BACKENDS)
def test_const_mode_is_matrix_power(backend):
    now = 900
    lrs = _cosine(now + 1, seed=16)
    last = np.array([-1, 0, 17, 450, 898, 899])
    w, u = _rows(len(last), 5, seed=17)
    w2, u2 = correct(w, u, last, now, lrs, backend, mode="const")
    mat = step_matrix(lrs[now], M, WD)  # const mode uses the lr of the current step
    for j, a in enumerate(last):
        p = np.linalg.matrix_power(mat, now - 1 - a)
        assert np.allclose(w2[j], p[0, 0] * w[j] + p[0, 1] * u[j], rtol=0, atol=1e-13)
        assert np.allclose(u2[j], p[1, 0] * w[j] + p[1, 1] * u[j], rtol=0, atol=1e-13)
    w_end, _ = correct(w, u, last, now + 5, lrs, backend, mode="const")  # history too short: last lr is used
    p = np.linalg.matrix_power(step_matrix(lrs[-1], M, WD), now + 5)
    assert np.allclose(w_end[0], p[0, 0] * w[0] + p[0, 1] * u[0], rtol=0, atol=1e-13)


def test_invalid_arguments():
    w, u = _rows(2, 3)
    with pytest.raises(ValueError, match="last"):
        correct_rows(w, u, np.array([0, 10]), 10, _cosine(10), M, WD)
    with pytest.raises(ValueError, match="mode"):
        correct_rows(w, u, np.array([0, 1]), 10, _cosine(10), M, WD, mode="paper")
    with pytest.raises(ValueError, match="lr_history"):
        correct_rows(w, u, np.array([0, 1]), 10, _cosine(5), M, WD)


# -- incremental table ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["exact", "const", "none"])
def test_table_matches_correct_rows(mode):
    total = 400
    lrs = _cosine(total, seed=18)
    table = CorrectionTable(lrs, M, WD, mode=mode)
    rng = np.random.default_rng(19)
    w, u = _rows(64, 6, seed=20)
    for now in range(total + 1):
        if now in (0, 1, 2, 57, 256, total):
            last = rng.integers(-1, now, len(w)) if now else np.full(len(w), -1)
            w_t, u_t = table.apply(torch.from_numpy(w), torch.from_numpy(u), torch.from_numpy(last))
            w_ref, u_ref = correct(w, u, last, now, lrs, "numba", mode)
            assert rel(w_t.numpy(), w_ref) < 1e-13 and rel(u_t.numpy(), u_ref) < 1e-13, now
        if now < total:
            table.advance()
    with pytest.raises(RuntimeError):
        table.advance()


def test_table_seek_equals_advancing():
    lrs = _cosine(300, seed=21)
    advanced, sought = CorrectionTable(lrs, M, WD), CorrectionTable(lrs, M, WD)
    for _ in range(250):
        advanced.advance()
    sought.seek(250)
    assert torch.allclose(advanced.table[:, :, :251], sought.table[:, :, :251], rtol=1e-13, atol=0)


def test_table_drift_after_20000_steps():
    now = 20000
    lrs = np.random.default_rng(22).uniform(0.0, 0.1, now)
    table = CorrectionTable(lrs, M, WD)
    with one_torch_thread():
        for _ in range(now):
            table.advance()
    last = np.random.default_rng(23).integers(-1, now, 256)
    last[:2] = (-1, now - 1)
    w, u = _rows(len(last), 8, seed=24)
    w_t, u_t = table.apply(torch.from_numpy(w), torch.from_numpy(u), torch.from_numpy(last))
    w_ref, u_ref = correct(w, u, last, now, lrs, "numba")
    assert rel(w_t.numpy(), w_ref) < 1e-10 and rel(u_t.numpy(), u_ref) < 1e-10
