"""Lazy correction of classifier rows that sat out of the sampled soft-max (docs/method.md §5).

Derivation. PyTorch SGD (dampening 0, no Nesterov) updates a row with gradient g at step s as
    d = g + λw,   u ← m·u + d,   w ← w − η_s·u.
With g = 0 the update is linear in x = [w; u]:
    u_new = λw + m·u,   w_new = w − η_s·u_new = (1 − η_sλ)·w − η_s m·u,
    x ← M(η_s)·x,   M(η) = [[1 − ηλ, −ηm], [λ, m]],   det M(η) = m.
A row last updated by step a (a = −1: the initial state, u = 0; PyTorch's first-step buffer init u = d equals
m·0 + d) that skipped steps a+1 … t−1 therefore reaches, just before step t,
    x = P·x_a,   P = M(η_{t−1}) ··· M(η_{a+1})        (later steps on the LEFT; t' = t−a−1 factors, t' = 0 → I).
Writing M(η) = A + ηB gives M(η1)M(η2) − M(η2)M(η1) = (η2−η1)(AB − BA) ≠ 0, so under warm-up/cosine the product
must be chronological ("exact"). The paper's form uses one η for the whole gap: P = M(η)^{t'} ("const", repeated
squaring). Rows with the same a share P, which is applied as one 2×2 mix per row: w' = P00·w + P01·u,
u' = P10·w + P11·u. P is built as a suffix product backwards from t−1 (Q_{t−1} = I, Q_{s−1} = Q_s·M(η_s)) and
never as a ratio of prefix products, because det = m^{t'} underflows (0.9^7000 ≈ 1e−320) and the inverse would
cancel catastrophically. Sanity check for λ = 0: u' = m^{t'}·u and w' = w − ηm(1 − m^{t'})/(1 − m)·u.

`correct_rows` does one-off corrections (numba on CPU, torch elsewhere). `CorrectionTable` keeps Q for every past
step on the device and updates it incrementally with no host sync; the GPU training loop uses it.

The bank's rows take one `Correction` (make_bank chooses it once, by where the rows are corrected): `Correction()`
corrects nothing (pic.correction=none, no lr history, or the full soft-max, where no row is ever stale),
`KernelCorrection` calls `correct_rows` per step, `TableCorrection` keeps a `CorrectionTable` on the rows' device.
Both correct every stale row at the end of a run with `correct_rows` (`catch_up`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from numba import njit, prange

MODES = ("exact", "const", "none")
BACKENDS = ("auto", "numba", "torch")

Rows = np.ndarray | torch.Tensor
LrHistory = Sequence[float] | np.ndarray | torch.Tensor


def step_matrix(lr: float, momentum: float, weight_decay: float) -> np.ndarray:
    """float64 [2,2]: M(η), which maps [w; u] through one zero-gradient SGD step with lr η."""
    return np.array([[1.0 - lr * weight_decay, -lr * momentum], [weight_decay, momentum]], dtype=np.float64)


def const_lr_index(now: int, num_lrs: int) -> int:
    """The step whose lr the "const" mode uses: the current step `now`, or the last known one past the end.

    Which η the paper's M(η)^t' means is not stated; with the constant lr the paper writes it for, every choice is
    the same. We take the η of the step that needs the row (the current one) because it is the only lr every rank
    and every resume knows without the history, which is the point of the "const" form (no per-step table); under
    warm-up/cosine it is an approximation, and "exact" (the default) is the chronological product."""
    return min(now, num_lrs - 1)


# ---------------------------------------------------------------------------------------------------------------
# Numba backend (numpy arrays, CPU tensors)
# ---------------------------------------------------------------------------------------------------------------
@njit(cache=True)
def _suffix_table_nb(lrs, m, lam, lo, now):  # pragma: no cover - compiled
    """float64 [now−lo, 2, 2]: entry i = Q(lo+i) = M(η_{now−1})···M(η_{lo+i+1})."""
    n = now - lo
    out = np.empty((n, 2, 2))
    a, b, c, d = 1.0, 0.0, 0.0, 1.0  # Q(now−1) = I
    for i in range(n - 1, -1, -1):
        out[i, 0, 0], out[i, 0, 1], out[i, 1, 0], out[i, 1, 1] = a, b, c, d
        if i > 0:  # Q(s−1) = Q(s)·M(η_s) with s = lo+i ≥ 0
            eta = lrs[lo + i]
            m00, m01 = 1.0 - eta * lam, -eta * m
            a, b, c, d = a * m00 + b * lam, a * m01 + b * m, c * m00 + d * lam, c * m01 + d * m
    return out


@njit(cache=True, parallel=True)
def _power_table_nb(powers, ts):  # pragma: no cover - compiled
    """float64 [len(ts), 2, 2]: M^ts[i], from powers[k] = M^(2^k) (powers of one M commute, so order is free)."""
    out = np.empty((ts.shape[0], 2, 2))
    for i in prange(ts.shape[0]):
        a, b, c, d = 1.0, 0.0, 0.0, 1.0
        t, k = ts[i], 0
        while t > 0:
            if t & 1:
                p00, p01, p10, p11 = powers[k, 0, 0], powers[k, 0, 1], powers[k, 1, 0], powers[k, 1, 1]
                a, b, c, d = a * p00 + b * p10, a * p01 + b * p11, c * p00 + d * p10, c * p01 + d * p11
            t >>= 1
            k += 1
        out[i, 0, 0], out[i, 0, 1], out[i, 1, 0], out[i, 1, 1] = a, b, c, d
    return out


@njit(cache=True, parallel=True)
def _mix_rows_nb(w, u, table, idx):  # pragma: no cover - compiled
    """In place: [w_j; u_j] ← table[idx[j]]·[w_j; u_j] for every row j (arithmetic in float64)."""
    for j in prange(w.shape[0]):
        p = idx[j]
        p00, p01, p10, p11 = table[p, 0, 0], table[p, 0, 1], table[p, 1, 0], table[p, 1, 1]
        for k in range(w.shape[1]):
            wk, uk = w[j, k], u[j, k]
            w[j, k] = p00 * wk + p01 * uk
            u[j, k] = p10 * wk + p11 * uk


def _powers_np(mat: np.ndarray, nbits: int) -> np.ndarray:
    """float64 [nbits, 2, 2]: mat^(2^k) for k < nbits (repeated squaring)."""
    out = np.empty((max(nbits, 1), 2, 2))
    out[0] = mat
    for k in range(1, len(out)):
        out[k] = out[k - 1] @ out[k - 1]
    return out


def _lrs_numpy(lr_history: LrHistory) -> np.ndarray:
    if isinstance(lr_history, torch.Tensor):
        lr_history = lr_history.detach().cpu().numpy()
    return np.ascontiguousarray(lr_history, dtype=np.float64).reshape(-1)


def _as_numpy_rows(x: Rows) -> np.ndarray:
    """A C-contiguous numpy view of x (a copy only if x is not contiguous)."""
    return np.ascontiguousarray(x.detach().numpy() if isinstance(x, torch.Tensor) else x)


def _check_last(last: np.ndarray, now: int) -> None:
    if last.size and (last.min() < -1 or last.max() > now - 1):
        raise ValueError(f"last must lie in [-1, now-1 = {now - 1}], got [{last.min()}, {last.max()}]")


def _correct_numba(w, u, last, now, lr_history, momentum, weight_decay, mode):
    wn, un = _as_numpy_rows(w), _as_numpy_rows(u)
    lastn = np.ascontiguousarray(last.cpu().numpy() if isinstance(last, torch.Tensor) else last, dtype=np.int64)
    _check_last(lastn, now)
    if lastn.size:
        lrs = _lrs_numpy(lr_history)
        if mode == "exact":
            lo = int(lastn.min())
            if len(lrs) < now and lo < now - 1:
                raise ValueError(f"lr_history has {len(lrs)} entries, steps up to now-1 = {now - 1} need lrs")
            table, idx = _suffix_table_nb(lrs, float(momentum), float(weight_decay), lo, int(now)), lastn - lo
        else:  # const
            mat = step_matrix(lrs[const_lr_index(now, len(lrs))], momentum, weight_decay)
            uniq, idx = np.unique(now - 1 - lastn, return_inverse=True)
            table = _power_table_nb(_powers_np(mat, int(uniq[-1]).bit_length()), uniq)
        _mix_rows_nb(wn, un, table, idx.astype(np.int64))
    if isinstance(w, torch.Tensor):
        return torch.from_numpy(wn), torch.from_numpy(un)
    return wn, un


# ---------------------------------------------------------------------------------------------------------------
# Torch backend (any device, no per-row python loop, no host sync)
# ---------------------------------------------------------------------------------------------------------------
def _split_step_matrix(momentum: float, weight_decay: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 [2,2] A and B with M(η) = A + η·B."""
    a = torch.tensor([[1.0, 0.0], [weight_decay, momentum]], dtype=torch.float64, device=device)
    b = torch.tensor([[-weight_decay, -momentum], [0.0, 0.0]], dtype=torch.float64, device=device)
    return a, b


def _step_matrices_torch(lrs: torch.Tensor, momentum: float, weight_decay: float) -> torch.Tensor:
    """float64 [L, 2, 2]: M(η) for every η in lrs [L] (a 0-d lrs gives [1, 2, 2])."""
    a, b = _split_step_matrix(momentum, weight_decay, lrs.device)
    return a + lrs.to(torch.float64).reshape(-1, 1, 1) * b


def _prefix_products(mats: torch.Tensor) -> torch.Tensor:
    """[L,2,2] → [L,2,2]: out[k] = mats[0] @ … @ mats[k] (Hillis–Steele scan, log2 L batched matmuls)."""
    out = mats.clone()
    d = 1
    while d < len(out):
        out[d:] = out[:-d] @ out[d:]  # the right side is evaluated before the overlapping write
        d *= 2
    return out


def suffix_table_torch(lrs: torch.Tensor, now: int, momentum: float, weight_decay: float) -> torch.Tensor:
    """float64 [now+1, 2, 2] on lrs' device: entry s+1 = Q(s) = M(η_{now−1})···M(η_{s+1}) for s in [−1, now−1].

    Reversing time turns the suffix products into prefix products of M(η_{now−1}), M(η_{now−2}), …, M(η_0).
    """
    eye = torch.eye(2, dtype=torch.float64, device=lrs.device).unsqueeze(0)
    if now == 0:
        return eye
    if len(lrs) < now:
        raise ValueError(f"lr_history has {len(lrs)} entries, steps up to now-1 = {now - 1} need lrs")
    prefix = _prefix_products(_step_matrices_torch(lrs[:now].flip(0), momentum, weight_decay))
    return torch.cat([prefix.flip(0), eye])


def _power_rows_torch(mat: torch.Tensor, ts: torch.Tensor, nbits: int) -> torch.Tensor:
    """float64 [R, 2, 2]: mat^ts[j] per row by repeated squaring (one python iteration per bit, ≤ nbits)."""
    out = torch.eye(2, dtype=torch.float64, device=ts.device).expand(len(ts), 2, 2).clone()
    for k in range(nbits):
        bit = ((ts >> k) & 1).bool().reshape(-1, 1, 1)
        out = torch.where(bit, out @ mat, out)
        mat = mat @ mat
    return out


def mix_rows_torch(w: torch.Tensor, u: torch.Tensor, coef: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w' = P00·w + P01·u, u' = P10·w + P11·u with coef [R,2,2]; in the rows' dtype (at least fp32), new tensors."""
    work = torch.promote_types(w.dtype, torch.float32)  # bf16/fp16 coefficients would cost ~3 digits
    p = coef.to(work)
    wf, uf = w.to(work), u.to(work)
    # addcmul: two passes per output instead of three (1.5x on CPU, 65k x 128 rows); memory-bound on a GPU
    w2 = torch.addcmul(uf * p[:, 0, 1, None], wf, p[:, 0, 0, None])
    u2 = torch.addcmul(uf * p[:, 1, 1, None], wf, p[:, 1, 0, None])
    return w2.to(w.dtype), u2.to(u.dtype)


def _correct_torch(w, u, last, now, lr_history, momentum, weight_decay, mode):
    from_numpy = isinstance(w, np.ndarray)
    if from_numpy:
        w, u = torch.from_numpy(w), torch.from_numpy(u)
    dev = w.device
    last = torch.as_tensor(last, dtype=torch.int64, device=dev)
    lrs = torch.as_tensor(lr_history, dtype=torch.float64, device=dev).reshape(-1)
    if mode == "exact":
        coef = suffix_table_torch(lrs, now, momentum, weight_decay)[last + 1]
    else:  # const
        mat = _step_matrices_torch(lrs[const_lr_index(now, len(lrs))], momentum, weight_decay)[0]
        coef = _power_rows_torch(mat, now - 1 - last, max(int(now).bit_length(), 1))
    w2, u2 = mix_rows_torch(w, u, coef)
    return (w2.numpy(), u2.numpy()) if from_numpy else (w2, u2)


# ---------------------------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------------------------
def _pick_backend(w: Rows, backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    numba_ok = isinstance(w, np.ndarray) or (w.device.type == "cpu" and w.dtype in (torch.float32, torch.float64))
    if backend == "numba" and not numba_ok:
        raise ValueError(f"backend='numba' needs numpy arrays or fp32/fp64 CPU tensors, got {w.dtype} on {w.device}")
    if backend == "auto":
        return "numba" if numba_ok else "torch"
    return backend


def correct_rows(
    w: Rows,
    u: Rows,
    last: np.ndarray | torch.Tensor,
    now: int,
    lr_history: LrHistory,
    momentum: float,
    weight_decay: float,
    mode: str = "exact",
    backend: str = "auto",
) -> tuple[Rows, Rows]:
    """Bring rows to their state just before step `now`, as if they had been stepped with zero gradient.

    w, u:       [R, D] weights and momentum buffers (numpy or torch, fp32/fp64; torch backend: any float dtype).
    last:       int [R], the step that last updated each row (−1 = never; u must then be 0).
    now:        the step about to run; row j gets steps last[j]+1 … now−1, with lr_history[s] at step s.
    lr_history: float [≥ now] (list, numpy or tensor), lr of every step so far.
    mode:       "exact" (chronological per-step product), "const" (M(η)^t' with η = lr of step `now`, or the last
                lr in the history if it does not reach `now`) or "none" (returns the inputs).
    backend:    "numba" (numpy or fp32/fp64 CPU tensors; works in place and returns the same memory),
                "torch" (any device; returns new tensors; builds Q for all `now+1` past steps in O(now log now)),
                "auto" (numba when possible).
    Coefficients are float64; the numba mix runs in float64, the torch one in the rows' dtype (at least fp32).
    Returns (w', u') of the input type. The inputs may be overwritten: always use the returned values.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if tuple(w.shape) != tuple(u.shape) or len(w.shape) != 2 or len(last) != w.shape[0]:
        raise ValueError(
            f"need w, u of one shape [R, D] and last [R], got {tuple(w.shape)}, {tuple(u.shape)}, {len(last)}"
        )
    if now < 0:
        raise ValueError(f"now must be >= 0, got {now}")
    if mode == "none":
        return w, u
    impl = _correct_numba if _pick_backend(w, backend) == "numba" else _correct_torch
    return impl(w, u, last, int(now), lr_history, momentum, weight_decay, mode)


class CorrectionTable:
    """Incremental, sync-free corrections for the training loop (any device).

    Holds Q_now(s) = M(η_{now−1})···M(η_{s+1}) for every s in [−1, now−1] (float64, `table[:, :, s+1]`) in a buffer
    preallocated for total_steps+1 entries: 32 bytes per step (+8 for the lr), e.g. 40 MB for 1e6 steps.
    `advance()` left-multiplies the live entries by M(η_now) and appends I: O(now) elementwise work (≈ 5 passes
    over 32·now bytes) and no host sync (the lrs live on the device). On CPU that is ≈ 45 µs at now = 1e4.

    Per training step t (with table.now == t):
        cand rows: w, u = table.apply(W[cand], U[cand], last[cand])   # state just before step t
        forward/backward on them, SGD step with lr_history[t], write rows back, last[cand] = t
        table.advance()                                               # now = t + 1
    At the end (or for a checkpoint of fully corrected rows) apply it to every row with the final `now`.
    Resume: save `now` and `last`, then `seek(now)` rebuilds the table in O(now log now).
    mode="const" keeps no table: apply() raises M(η_now) to the power t' per row; mode="none" returns the rows.
    """

    def __init__(
        self,
        lr_history: LrHistory,
        momentum: float,
        weight_decay: float,
        mode: str = "exact",
        device: torch.device | str = "cpu",
        total_steps: int | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.lrs = torch.as_tensor(lr_history, dtype=torch.float64).reshape(-1).to(device)
        self.total_steps = len(self.lrs) if total_steps is None else int(total_steps)
        if len(self.lrs) < max(self.total_steps, 1):
            raise ValueError(f"lr_history has {len(self.lrs)} entries, total_steps={self.total_steps} needs that many")
        self.momentum, self.weight_decay, self.mode = float(momentum), float(weight_decay), mode
        self.device = self.lrs.device
        self._a, self._b = _split_step_matrix(self.momentum, self.weight_decay, self.device)  # M(η) = A + η·B
        self._eye = torch.eye(2, dtype=torch.float64, device=self.device)
        self.table = None
        if mode == "exact":
            # Component-major [2, 2, T+1] (entry s+1 is table[:, :, s+1]) so that advance() streams contiguous rows.
            self.table = torch.empty(2, 2, self.total_steps + 1, dtype=torch.float64, device=self.device)
        self.seek(0)

    def seek(self, now: int) -> None:
        """Set the current step to `now` (0 ≤ now ≤ total_steps), rebuilding the table from the lrs."""
        if not 0 <= now <= self.total_steps:
            raise ValueError(f"now must be in [0, total_steps={self.total_steps}], got {now}")
        self.now = int(now)
        if self.table is not None:
            q = suffix_table_torch(self.lrs, now, self.momentum, self.weight_decay)  # [now+1, 2, 2]
            self.table[:, :, : now + 1] = q.permute(1, 2, 0)

    def advance(self) -> None:
        """Account for step `now` (all rows not stepped in it are now one step behind); now += 1."""
        if self.now >= self.total_steps:
            raise RuntimeError(f"advanced past total_steps={self.total_steps}")
        if self.table is not None:
            # live ← M(η_now)·live, as elementwise updates of the contiguous component rows: much faster than a
            # batched [n,2,2] matmul on CPU, and a few bandwidth-bound kernels on GPU.
            m = self._a + self.lrs[self.now] * self._b
            top, bottom = self.table[0, :, : self.now + 1], self.table[1, :, : self.now + 1]  # [2, n] each
            new_top = m[0, 0] * top + m[0, 1] * bottom
            bottom.mul_(m[1, 1]).add_(top, alpha=self.weight_decay)  # m[1, 0] = λ
            top.copy_(new_top)
            self.table[:, :, self.now + 1] = self._eye
        self.now += 1

    def coefficients(self, last: torch.Tensor) -> torch.Tensor:
        """float64 [R, 2, 2]: the product P for rows last updated at `last` [R] (int64, on the table's device)."""
        last = torch.as_tensor(last, dtype=torch.int64, device=self.device)
        if self.mode == "exact":
            return self.table[:, :, last + 1].permute(2, 0, 1)
        mat = self._a + self.lrs[const_lr_index(self.now, len(self.lrs))] * self._b
        return _power_rows_torch(mat, self.now - 1 - last, max(self.now.bit_length(), 1))

    def apply(self, w: torch.Tensor, u: torch.Tensor, last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows w, u [R, D] last updated at `last` [R] → their state just before step `now` (new tensors)."""
        if self.mode == "none":
            return w, u
        return mix_rows_torch(w, u, self.coefficients(last))


class Correction:
    """No correction: rows are used as stored (the base of the strategies below)."""

    active = False  # whether rows that sat out of steps change at all (pic.correction != none)

    def __call__(self, w: torch.Tensor, u: torch.Tensor, last: torch.Tensor, now: int):
        """Rows w, u [R,D] last updated at `last` [R] -> their state just before step `now` (per step)."""
        return w, u

    def catch_up(self, w: torch.Tensor, u: torch.Tensor, last: torch.Tensor, now: int):
        """The same, one-off (every stale row at the end of a run)."""
        return self(w, u, last, now)


class KernelCorrection(Correction):
    """`correct_rows` at every call: numba for CPU rows (in place), torch elsewhere."""

    active = True

    def __init__(self, lr_history: LrHistory, momentum: float, weight_decay: float, mode: str = "exact"):
        self.lrs = np.asarray(lr_history, np.float64)
        self.momentum, self.weight_decay, self.mode = momentum, weight_decay, mode

    def __call__(self, w, u, last, now):
        return correct_rows(w, u, last, now, self.lrs, self.momentum, self.weight_decay, mode=self.mode)

    def catch_up(self, w, u, last, now):
        return KernelCorrection.__call__(self, w, u, last, now)


class TableCorrection(KernelCorrection):
    """A `CorrectionTable` on the rows' device, advanced one step at a time: no host sync (the CUDA loop)."""

    def __init__(self, lr_history: LrHistory, momentum: float, weight_decay: float, mode: str = "exact"):
        super().__init__(lr_history, momentum, weight_decay, mode)
        self.table: CorrectionTable | None = None

    def __call__(self, w, u, last, now):
        if self.table is None:
            self.table = CorrectionTable(self.lrs, self.momentum, self.weight_decay, self.mode, w.device)
            self.table.seek(now)
        while self.table.now < now:  # one left-multiplication per step, no host sync
            self.table.advance()
        if self.table.now != now:  # a resume, or a step repeated
            self.table.seek(now)
        return self.table.apply(w, u, last)


FORMS = ("auto", "kernel", "table")


def make_correction(mode: str, lr_history: LrHistory | None, momentum: float, weight_decay: float,
                    device: torch.device, form: str = "auto") -> Correction:
    """The correction of rows corrected on `device`: none without an lr history or with mode none; else the table
    on CUDA (form auto) and the kernel elsewhere; `form` forces one (the tests run the table on the CPU)."""
    if form not in FORMS:
        raise ValueError(f"correction form must be one of {FORMS}, got {form!r}")
    if mode == "none" or lr_history is None:
        return Correction()
    if form == "table" or (form == "auto" and torch.device(device).type == "cuda"):
        return TableCorrection(lr_history, momentum, weight_decay, mode)
    return KernelCorrection(lr_history, momentum, weight_decay, mode)
