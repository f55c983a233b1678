"""The instance bank: PIC's N-way cosine classifier, with its own row-sparse momentum SGD.

State (all saved in checkpoints):
    weight   [N,D]  classifier rows w_j (raw; the logits use w_j/‖w_j‖), init N(0, init_std²)
    momentum [N,D]  SGD momentum buffers u_j
    last     [N]    int64, index of the SGD step that last updated row j (−1 = never)

Per training step t (spec §4–§5):
    1. candidates C_t: all rows (full soft-max) or the current batch ∪ the recent-negative FIFO;
    2. gather rows C_t and bring them up to date: steps last[j]+1 … t−1 ran with zero gradient for them, which the
       closed-form correction applies (model/correction.py) — with the full soft-max every row is updated every
       step, so nothing is stale and no correction runs;
    3. logits s = ẑ·ŵ_Cᵀ/τ (fp32), targets = positions of the batch ids in C_t;
    4. after backward, `step(lr, t)`: u ← m·u + (g + λw); w ← w − η·u on rows C_t only; last[C_t] ← t.

The bank is kept outside the backbone's optimizer because that optimizer would update (and decay) all N rows every
step; here the untouched rows cost nothing and are corrected lazily, exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model import distributed as dist
from model.correction import CorrectionTable, correct_rows
from model.negatives import RecentNegatives, uses_full_softmax

NORM_EPS = 1e-6  # spec §12: the released code's 1e-12 is one suspect for late NaNs


@dataclass
class PendingUpdate:
    """What a forward leaves for `InstanceBank.step`: the candidate rows and the leaf their logits came from."""

    rows: torch.Tensor | None  # [C] row ids of the candidate slots; None: all N rows (full soft-max)
    weight: torch.Tensor  # [C,D] the (corrected) rows as a leaf on the logits' device; .grad is the row gradient
    momentum: torch.Tensor  # [C,D] their (corrected) momentum, or the whole [N,D] buffer
    src: torch.Tensor | None  # [C] the slot whose update each (duplicate) slot takes
    ids: torch.Tensor  # [B·world] the global batch's ids (pushed into the recent-negative FIFO)


class InstanceBank(nn.Module):
    def __init__(self, num_instances: int, dim: int = 128, temperature: float = 0.2, init_std: float = 0.01,
                 momentum: float = 0.9, weight_decay: float = 1e-4, negatives: str = "full", k: int = 65536,
                 batch_size: int = 256, correction: str = "exact", lr_history: np.ndarray | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.num_instances = num_instances
        self.dim = dim
        self.temperature = temperature
        self.m = momentum
        self.wd = weight_decay
        self.correction = correction
        self.register_buffer("weight", torch.randn(num_instances, dim, generator=generator) * init_std)
        self.register_buffer("momentum", torch.zeros(num_instances, dim))
        self.register_buffer("last", torch.full((num_instances,), -1, dtype=torch.int64))
        self.sampled = negatives == "recent" and not uses_full_softmax(k, num_instances)
        self.negatives = RecentNegatives(k, batch_size) if self.sampled else None
        self.lr_history = None if lr_history is None else np.asarray(lr_history, np.float64)
        self._table: CorrectionTable | None = None
        # the correction's form: the incremental device table (sync-free; the default for a CUDA bank) or the
        # one-off numba/torch kernels (default elsewhere); tests set True to run the table on the CPU
        self.use_table: bool | None = None
        self._pending: PendingUpdate | None = None

    @property
    def pending(self) -> PendingUpdate | None:
        """The update the last forward prepared (None after `step` / `skip_step`)."""
        return self._pending

    # ---- step part 1: candidates, correction, logits -------------------------------------------------------

    def _correct(self, rows: torch.Tensor, w: torch.Tensor, u: torch.Tensor, now: int):
        if self.correction == "none" or self.lr_history is None:
            return w, u
        last = self.last.index_select(0, rows)
        if self.use_table if self.use_table is not None else w.device.type == "cuda":
            if self._table is None:
                self._table = CorrectionTable(self.lr_history, self.m, self.wd, self.correction, w.device)
                self._table.seek(now)
            while self._table.now < now:  # one left-multiplication per step, no host sync
                self._table.advance()
            if self._table.now != now:
                self._table.seek(now)
            return self._table.apply(w, u, last)
        return correct_rows(w, u, last, now, self.lr_history, self.m, self.wd, mode=self.correction)

    def forward(self, z: torch.Tensor, ids: torch.Tensor, step: int,
                z_small: tuple[torch.Tensor, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """z: [B,D] features of the large crop (normalised or not), ids: [B] instance ids, z_small: [B,D] per small
        crop. Returns logits [(1+len(z_small))·B, |C|] (crop-major) and targets (same length)."""
        dev = z.device
        # Under DDP every rank builds the same candidate set from the global batch (ids gathered rank-major) and
        # keeps the targets of its own rows; the row gradients are averaged in step(), so all replicas stay equal.
        global_ids = dist.all_gather_cat(ids).to(self.weight.device)
        ids_bank = ids.to(self.weight.device)
        mask = None
        if self.sampled:
            # K+B fixed slots (duplicates masked) instead of unique(): static shapes, no host sync per step
            rows, valid, src, global_targets = self.negatives.candidate_slots(global_ids)
            b = ids.shape[0]
            targets = global_targets[dist.rank() * b:(dist.rank() + 1) * b]
            w = self.weight.index_select(0, rows)
            u = self.momentum.index_select(0, rows)
            w, u = self._correct(rows, w, u, step)
            w_leaf = w.to(dev, non_blocking=True).requires_grad_()
            mask = ~valid.to(dev)
            self._pending = PendingUpdate(rows, w_leaf, u, src, global_ids)
        else:
            targets = ids_bank
            w_leaf = self.weight.detach().to(dev).requires_grad_()
            self._pending = PendingUpdate(None, w_leaf, self.momentum, None, global_ids)
        work = torch.promote_types(w_leaf.dtype, torch.float32)  # fp32 logits (fp64 for a .double() bank: tests)
        # Autocast off: under bf16 autocast the matmul below would run in bf16 (logit error ~0.025 at τ = 0.2,
        # row gradients in bf16); a soft-max over 65k+ columns at τ = 0.2 wants fp32 (spec §1).
        with torch.autocast(dev.type, enabled=False):
            w_hat = F.normalize(w_leaf.to(work), dim=1, eps=NORM_EPS)  # [C,D]
            logits = [F.normalize(z.to(work), dim=1, eps=NORM_EPS) @ w_hat.t()]
            # Small crops train only the encoder: W gets gradient from the large crop alone (spec §2).
            w_hat_const = w_hat.detach()
            logits += [F.normalize(zs.to(work), dim=1, eps=NORM_EPS) @ w_hat_const.t() for zs in z_small]
            logits = torch.cat(logits) / self.temperature
        if mask is not None:  # duplicate slots: no probability mass, no gradient
            logits = logits.masked_fill(mask, float("-inf"))
        targets = targets.to(dev)
        return logits, targets.repeat(1 + len(z_small))

    # ---- step part 2: the row-sparse SGD update --------------------------------------------------------------

    @torch.no_grad()
    def unscale_grad_(self, inv_scale: float) -> torch.Tensor:
        """fp16 with a GradScaler: the row gradient carries the loss scale like every other gradient, but the
        scaler only unscales its optimizer's parameters. Unscale it here; returns whether it is finite (a 0-d bool
        tensor on its device: no sync)."""
        if self._pending is None or self._pending.weight.grad is None:
            return torch.ones((), dtype=torch.bool)
        g = self._pending.weight.grad
        g.mul_(inv_scale)
        return torch.isfinite(g).all()

    @torch.no_grad()
    def step(self, lr: float, step: int, finite: torch.Tensor | None = None) -> None:
        """Momentum SGD (PyTorch semantics, dampening 0) on the rows used by the last forward.

        finite: optional 0-d bool tensor (device-side "the loss was finite"); when false the update is a no-op,
        decided on the device without a host sync (the CUDA loop). None: the caller already checked on the host.
        """
        if self._pending is None:
            raise RuntimeError("InstanceBank.step() called without a forward")
        pending, self._pending = self._pending, None
        rows, w_leaf, u, src = pending.rows, pending.weight, pending.momentum, pending.src
        g = w_leaf.grad
        if g is None:
            g = torch.zeros_like(w_leaf)
        dist.all_reduce_mean_(g)  # |C|xD (sampled) or NxD (full soft-max) rows, same on every rank afterwards
        w = w_leaf.detach().to(self.weight.device)
        g = g.to(self.weight.device, dtype=w.dtype)
        ok = None if finite is None else finite.to(w.device)  # the bank's device: weight, momentum, last
        if ok is None:
            u.mul_(self.m).add_(g).add_(w, alpha=self.wd)
            w.sub_(u, alpha=lr)
        else:  # f = 1: the update above; f = 0: u and w unchanged (g zeroed first: NaN * 0 would be NaN)
            f = ok.to(w.dtype)
            g = torch.where(ok, g, torch.zeros((), dtype=g.dtype, device=g.device))
            u.mul_(1 + f * (self.m - 1)).add_(g).add_(w * (f * self.wd))
            w.sub_(u * (f * lr))
        new_last = torch.full((), step, dtype=torch.int64, device=self.last.device)
        if rows is None:
            if w.data_ptr() != self.weight.data_ptr():  # bank on another device than the logits
                self.weight.copy_(w)
            if ok is None:
                self.last.fill_(step)
            else:
                self.last.copy_(torch.where(ok, new_last, self.last))
        else:
            # every duplicate slot takes the update of its id's valid slot, so the scatter writes one value per row
            w, u = w.index_select(0, src), u.index_select(0, src)
            if ok is not None:  # a skipped step leaves the stored (uncorrected) rows and their `last` as they were
                w = torch.where(ok, w, self.weight.index_select(0, rows))
                u = torch.where(ok, u, self.momentum.index_select(0, rows))
                new_last = torch.where(ok, new_last, self.last.index_select(0, rows))
            self.weight.index_copy_(0, rows, w)
            self.momentum.index_copy_(0, rows, u)
            self.last.index_copy_(0, rows, new_last.expand(rows.shape[0]).contiguous())
            self.negatives.push(pending.ids)

    def skip_step(self) -> None:
        """Drop the pending update (non-finite loss): no row changes. The batch's ids still enter the recent-negative
        FIFO, as in the sync-free path (which cannot make that host-side push conditional without a sync). The step
        index still advances, so rows corrected lazily later treat the skipped step as a zero-gradient step (weight
        decay and momentum applied), while the backbone did not step: a negligible difference, only on skips."""
        if self._pending is not None and self._pending.rows is not None:
            self.negatives.push(self._pending.ids)
        self._pending = None

    @torch.no_grad()
    def bring_up_to_date(self, now: int) -> None:
        """Correct every row to the state just before step `now` (end of training / export)."""
        if not self.sampled or self.correction == "none" or self.lr_history is None:
            return
        stale = (self.last < now - 1).nonzero().flatten()
        if stale.numel() == 0:
            return
        w, u = correct_rows(self.weight[stale], self.momentum[stale], self.last[stale], now, self.lr_history,
                            self.m, self.wd, mode=self.correction)
        self.weight[stale] = w
        self.momentum[stale] = u
        self.last[stale] = now - 1

    # ---- checkpoint --------------------------------------------------------------------------------------------

    def extra_state(self) -> dict:
        return {"negatives": self.negatives.state_dict() if self.negatives is not None else None}

    def load_extra_state(self, state: dict) -> None:
        if self.negatives is not None and state.get("negatives") is not None:
            self.negatives.load_state_dict(state["negatives"])
