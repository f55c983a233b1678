"""The instance bank: PIC's N-way cosine classifier with its own row-sparse momentum SGD. Only the arithmetic is
here; the rows live behind `Rows` (model/bank/rows.py), built with every rule by `make_bank` (model/bank/__init__.py).

Per training step t (docs/method.md §4–§5):
    1. candidates C_t: all rows (full soft-max), or the current batch ∪ the recent-negative FIFO as K+B fixed slots
       (sorted ids, duplicates masked: static shapes, no host sync);
    2. their rows, brought up to date by the rows' correction: steps last[j]+1 … t−1 ran with zero gradient for
       them (model/bank/correction.py); with the full soft-max every row is updated every step, nothing is stale;
    3. logits s = ẑ·ŵ_Cᵀ/τ (fp32 under any autocast), targets = positions of the batch ids in C_t;
    4. after backward, `update(handle, lr, t, finite)`: u ← m·u + (g + λw); w ← w − η·u on rows C_t only,
       last[C_t] ← t; the batch's ids enter the FIFO.
`forward` returns the logits, the targets and the handle `update` needs: nothing waits hidden between the two.

The bank is kept outside the backbone's optimizer because that optimizer would update (and decay) all N rows every
step; here the untouched rows cost nothing and are corrected lazily, exactly.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from model import distributed as dist
from model.bank.negatives import RecentNegatives, Slots
from model.bank.rows import Rows

NORM_EPS = 1e-6  # docs/method.md §11: the released code's 1e-12 is one suspect for late NaNs


@dataclass
class RowUpdate:
    """What a forward's rows need for their update: the handle `InstanceBank.update` takes."""

    ids: torch.Tensor  # [B·world] the global batch's ids (pushed into the recent-negative FIFO)
    weight: torch.Tensor  # [C,D] the (corrected) rows as a leaf on the logits' device; .grad is the row gradient
    momentum: torch.Tensor  # [C,D] their (corrected) momentum, where the update runs
    slots: Slots | None  # the K+B candidate slots; None: every row (full soft-max)
    last: torch.Tensor | None = None  # full soft-max: the stored `last` (a skipped step keeps it)
    applied: bool = False

    @torch.no_grad()
    def unscale_(self, inv_scale: float) -> torch.Tensor:
        """fp16 with a GradScaler: the row gradient carries the loss scale like every other gradient, but the
        scaler only unscales its optimizer's parameters. Unscale it here; returns whether it is finite (a 0-d bool
        tensor on its device: no sync)."""
        if self.weight.grad is None:
            return torch.ones((), dtype=torch.bool)
        self.weight.grad.mul_(inv_scale)
        return torch.isfinite(self.weight.grad).all()


class Forward(NamedTuple):
    logits: torch.Tensor  # [(1+crops)·B, C] fp32, crop-major
    targets: torch.Tensor  # [(1+crops)·B]
    update: RowUpdate


class InstanceBank:
    def __init__(self, rows: Rows, temperature: float = 0.2, momentum: float = 0.9, weight_decay: float = 1e-4,
                 negatives: RecentNegatives | None = None):
        """rows: where the rows live (their correction included); negatives: the recent-negative FIFO, None for the
        full soft-max."""
        self.rows, self.negatives = rows, negatives
        self.temperature, self.m, self.wd = temperature, momentum, weight_decay
        self.num_instances, self.dim = rows.n, rows.dim

    def __call__(self, z: torch.Tensor, ids: torch.Tensor, step: int, z_small: tuple[torch.Tensor, ...] = (),
                 ids_host: torch.Tensor | None = None) -> Forward:
        """z: [B,D] features of the large crop (normalised or not), ids: [B] instance ids, z_small: [B,D] per small
        crop, ids_host: the same ids in host memory if the loader has them (a host bank under a GPU then reads its
        rows without copying the ids back from the GPU)."""
        dev = z.device
        # Under DDP every rank builds the same candidate set from the global batch (ids gathered rank-major) and
        # keeps the targets of its own rows; the row gradients are averaged in update(), so all replicas stay equal.
        global_ids = dist.all_gather_cat(ids).to(dev)
        mask = None
        if self.negatives is not None:
            b = ids.shape[0]
            slots = self.negatives.slots(global_ids)
            targets = slots.targets[dist.rank() * b:(dist.rank() + 1) * b]
            host_ids = None
            if ids_host is not None and self.rows.reads_in_host_memory and dev.type != "cpu":
                host_ids = dist.all_gather_cat_host(ids_host.to(torch.int64))  # gloo: no GPU sync
            w, u = self.rows.candidates(slots, global_ids, step, dev, host_ids)
            handle = RowUpdate(global_ids, w.requires_grad_(), u, slots)
            mask = ~slots.valid.to(dev)
        else:
            targets = ids
            w, u, last = self.rows.read(None)  # (in-memory fp32 rows: the storage itself, updated in place)
            handle = RowUpdate(global_ids, w.detach().to(dev).requires_grad_(), u, None, last)
        logits = self.logits(z, z_small, handle.weight)
        if mask is not None:  # duplicate slots: no probability mass, no gradient
            logits = logits.masked_fill(mask, float("-inf"))
        return Forward(logits, targets.to(dev).repeat(1 + len(z_small)), handle)

    def logits(self, z: torch.Tensor, z_small: tuple[torch.Tensor, ...], w: torch.Tensor) -> torch.Tensor:
        """Cosine logits / τ of the large crop's and the small crops' features against rows w [C,D]."""
        work = torch.promote_types(w.dtype, torch.float32)  # fp32 logits (fp64 for an fp64 bank: the tests)
        # Autocast off: under bf16 autocast the matmul below would run in bf16 (logit error ~0.025 at τ = 0.2,
        # row gradients in bf16); a soft-max over 65k+ columns at τ = 0.2 wants fp32 (docs/method.md §1).
        dev = z.device
        with torch.autocast(dev.type, enabled=False) if dev.type != "meta" else nullcontext():  # (meta: the tests)
            w_hat = F.normalize(w.to(work), dim=1, eps=NORM_EPS)  # [C,D]
            out = [F.normalize(z.to(work), dim=1, eps=NORM_EPS) @ w_hat.t()]
            # Small crops train only the encoder: W gets gradient from the large crop alone (docs/method.md §2).
            w_hat_const = w_hat.detach()
            out += [F.normalize(zs.to(work), dim=1, eps=NORM_EPS) @ w_hat_const.t() for zs in z_small]
            return torch.cat(out) / self.temperature

    @torch.no_grad()
    def update(self, handle: RowUpdate, lr: float, step: int, finite: bool | torch.Tensor | None = None) -> None:
        """Momentum SGD (PyTorch semantics, dampening 0) on the rows of `handle`, as step `step` with lr `lr`.

        finite: None (or True) the loss was finite; False the caller knows on the host that it was not (the step is
        skipped); a 0-d bool tensor decides on the device, without a host sync (the CUDA loop). A skipped step
        changes no row, except where the rows apply its zero-gradient update at once (the ring cache); the batch's
        ids still enter the FIFO (the sync-free path cannot make that host-side push conditional without a sync),
        and rows corrected lazily later treat the step as a zero-gradient one (weight decay and momentum), while
        the backbone did not step: a negligible difference, only on skips."""
        if handle.applied:
            raise RuntimeError("this forward's rows were updated already")
        handle.applied = True
        if finite is False and not self.rows.skips_change_rows:
            if self.negatives is not None:
                self.negatives.push(handle.ids)
            return
        u = handle.momentum
        g = handle.weight.grad if handle.weight.grad is not None else torch.zeros_like(handle.weight)
        dist.all_reduce_mean_(g)  # |C|xD (sampled) or NxD (full soft-max) rows, the same on every rank afterwards
        w = handle.weight.detach().to(u.device)
        g = g.to(u.device, w.dtype)
        ok = None
        if finite is not None and finite is not True:
            ok = torch.as_tensor(finite, device=u.device)
            g = torch.where(ok, g, torch.zeros((), dtype=g.dtype, device=g.device))  # (NaN * 0 would be NaN)
        if handle.slots is None:
            self._update_every_row(w, u, g, handle.last, lr, step, ok)
            return
        u_new = u.mul(self.m).add_(g).add_(w, alpha=self.wd)
        w_new = w.sub(u_new, alpha=lr)
        self.rows.commit(handle.slots, handle.ids, (w, u), (w_new, u_new), step, ok)
        self.negatives.push(handle.ids)

    def _update_every_row(self, w, u, g, last, lr, step, ok) -> None:
        """The full soft-max: the table in place (N rows: no copies). A skipped step (ok false) leaves w, u and
        `last` unchanged: f = 0 in the same arithmetic (g zeroed first)."""
        new_last = torch.full((), step, dtype=torch.int64, device=last.device)
        if ok is None:
            u.mul_(self.m).add_(g).add_(w, alpha=self.wd)
            w.sub_(u, alpha=lr)
        else:
            f = ok.to(w.dtype)
            u.mul_(1 + f * (self.m - 1)).add_(g).add_(w * (f * self.wd))
            w.sub_(u * (f * lr))
            new_last = torch.where(ok.to(last.device), new_last, last)
        self.rows.write(None, w, u, new_last)
        self.rows.sync_ranks()

    # ---- life ------------------------------------------------------------------------------------------------

    def checkpoint(self, step: int) -> dict:
        """Every rank, before a checkpoint of the state at the start of step `step`: the whole bank's state (the
        rows' tensors or a reference to their file, the FIFO, the ring cache)."""
        return {"rows": self.rows.checkpoint(step),
                "negatives": self.negatives.state_dict() if self.negatives is not None else None}

    def committed(self, step: int) -> None:
        """Every rank, once rank 0 has renamed the checkpoint of `step` into place (an mmap bank deletes the undo
        journals that only older checkpoints needed)."""
        self.rows.committed(step)

    def restore(self, state: dict) -> None:
        """Every rank: back to a checkpoint's state (an mmap bank rolls its file back; a mismatch is one line)."""
        if self.negatives is not None and state.get("negatives") is not None:
            self.negatives.load_state_dict(state["negatives"])
        self.rows.restore(state["rows"])

    @torch.no_grad()
    def bring_up_to_date(self, now: int) -> None:
        """Every row corrected to its state just before step `now` (the end of training; every rank, then a
        checkpoint saves them)."""
        self.rows.bring_up_to_date(now)

    def close(self) -> None:
        """Release the rows (a host bank's files are removed: the checkpoints hold its rows)."""
        self.rows.close()

    def __enter__(self) -> InstanceBank:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
