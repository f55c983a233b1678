"""One training step, shared by train.py and the benchmarks.

encoder forward under autocast (bf16 on CUDA, fp16 on any device; DDP-wrapped under torchrun, optionally compiled)
-> the bank's fp32 cosine logits -> cross-entropy -> backward -> backbone/head SGD (fused on CUDA) -> bank row update.

Two ways to skip a step whose loss is not finite, before it touches any weight:
* sync (CPU default): read the loss back every step and decide on the host. Under DDP the loss is averaged over
  ranks first (with the stop flag), so every rank decides alike; a rank that skipped alone would leave the others
  waiting in the gradient all-reduce.
* sync-free (CUDA default): decide on the device. The fused SGD kernel takes a `found_inf` tensor and leaves
  parameters and momentum untouched when it is set (the mechanism GradScaler uses), and the bank masks its row
  update the same way, so the loop never waits for the GPU; the loss is read only on log steps.

Stopping and saving are agreed before each step (`vote`), in both modes: under torchrun a rank that leaves or
saves alone would leave the others waiting in the step's collectives.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from model import distributed as dist
from model.pic import PIC, Encoder


def wrap_encoder(encoder: Encoder, device: torch.device, compile: bool = False) -> nn.Module:
    """The encoder as the step runs it: DDP under torchrun, torch.compile when asked (any device: on a CPU it is
    slow to compile and not faster, but it is how the tests exercise the compiled path)."""
    wrapped: nn.Module = encoder
    if dist.active():
        # BN running stats: rank 0's are broadcast each forward (DDP default), so every replica evaluates alike
        wrapped = dist.ddp(encoder, device)
    if compile:
        wrapped = torch.compile(wrapped)
    return wrapped


class TrainStep:
    def __init__(self, model: PIC, optimizer: torch.optim.Optimizer, device: torch.device, amp: str = "bf16",
                 channels_last: bool = True, compile: bool = False, sync_free: bool | None = None,
                 grad_scaler: torch.amp.GradScaler | None = None):
        self.model = model
        self.optimizer = optimizer
        self.device = device
        self.channels_last = channels_last
        self.encoder = wrap_encoder(model.encoder(), device, compile)
        on_cuda = device.type == "cuda"
        if on_cuda:  # shapes are static (drop-last batches, K+B candidate slots): let cuDNN pick its kernels once
            torch.backends.cudnn.benchmark = True
        # bf16 (the default) on CUDA only: a CPU run computes in fp32. fp16, chosen explicitly, on any device, with
        # its loss scaler: on a CPU that is slow but exact, and what runs the scaler's plumbing without a GPU.
        self.amp = nullcontext()
        if amp == "fp16" or (on_cuda and amp == "bf16"):
            self.amp = torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
        self.scaler = grad_scaler if grad_scaler is not None else torch.amp.GradScaler(
            device.type, enabled=amp == "fp16")
        self.stop_signal = 0  # the signal some rank got (0: none): every rank stops before the same step
        self.save_requested = False  # some rank's checkpoint timer is due: every rank saves at the same step
        self._votes = torch.zeros(2, dtype=torch.int64)  # [stop signal, save]: one buffer (dist.all_reduce_max_host_)
        fused = all(g.get("fused") for g in optimizer.param_groups)
        self.sync_free = (on_cuda if sync_free is None else sync_free) and fused and not self.scaler.is_enabled()
        if self.sync_free:
            # A fused step skipped by found_inf on a parameter's very first step leaves its momentum buffer
            # uninitialised (torch.empty); zero buffers give the same first update (u = 0*m + g) and no garbage.
            for group in optimizer.param_groups:
                for p in group["params"]:
                    optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p))

    def scaler_state(self) -> dict:
        """The loss scaler's state for a checkpoint: scale and growth count ({} without fp16). Without it a resumed
        fp16 run restarts at the initial scale and skips other steps than the uninterrupted run."""
        return self.scaler.state_dict()

    def load_scaler_state(self, state: dict | None) -> bool:
        """Restore `scaler_state()`; False when there is nothing to restore into this step's enabled scaler (a
        checkpoint written without fp16, or before the state was saved): it then starts at its initial scale."""
        if not self.scaler.is_enabled():
            return True
        if not state:
            return False
        self.scaler.load_state_dict(state)
        return True

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @property
    def stop_requested(self) -> bool:
        return self.stop_signal != 0

    def vote(self, stop_signal: int, save: bool) -> bool:
        """Before every step, on every rank: this rank's stop signal (0: none) and whether its checkpoint timer is
        due; afterwards `stop_signal` / `save_requested` say what any rank asked. Returns whether to stop now.

        Under torchrun it is the step's first collective, a gloo all-reduce of two integers on the host (no GPU
        work, no sync with it). A rank whose wait for its loader a signal ended votes without a batch: the others,
        already waiting in this vote, learn it before any of the step's collectives, and all stop before the same
        step, so that rank 0 can save it."""
        self._votes[0], self._votes[1] = stop_signal, int(save)
        signal, save_any = dist.all_reduce_max_host_(self._votes).tolist()
        self.stop_signal, self.save_requested = signal, bool(save_any) or self.save_requested
        return self.stop_requested

    def release(self) -> None:
        """Drop the encoder's DDP wrapper (and its compiled form). The run's teardown calls it while the process
        groups still exist: see model.distributed.shutdown for why the order matters."""
        self.encoder = None

    def __call__(self, images: torch.Tensor, ids: torch.Tensor, crops: tuple[torch.Tensor, ...], step: int,
                 lr: float, ids_host: torch.Tensor | None = None) -> torch.Tensor:
        """Run step `step` at learning rate `lr`; returns the loss as a 0-d tensor (sync mode: already averaged
        over ranks and on the host's side of a sync; non-finite: nothing was updated). `ids_host`: the batch's ids
        in host memory (`Batch.ids_host`), for a bank on the host."""
        self.set_lr(lr)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
            crops = tuple(c.contiguous(memory_format=torch.channels_last) for c in crops)
        with self.amp:
            z = self.encoder((images, *crops))  # the large crop's features, then each small crop's
        bank = self.model.bank
        logits, targets, rows = bank(z[0], ids, step, z[1:], ids_host)  # fp32, candidate rows corrected
        loss = F.cross_entropy(logits.float(), targets)
        self.optimizer.zero_grad(set_to_none=True)
        if self.sync_free:
            finite = torch.isfinite(loss.detach())
            if dist.active():  # every rank skips alike: a collective, not a host sync
                finite = dist.all_reduce_max_((~finite).float()) == 0
            self.optimizer.found_inf = (~finite).float().reshape(1)
            loss.backward()
            self.optimizer.step()
            bank.update(rows, lr, step, finite=finite)
            return loss.detach()
        value = self._mean_loss(loss)
        if not math.isfinite(value):
            bank.update(rows, lr, step, finite=False)
            return torch.tensor(value)
        if not self.scaler.is_enabled():
            loss.backward()
            self.optimizer.step()
            bank.update(rows, lr, step)
            return torch.tensor(value)
        # fp16: the scaler unscales the optimizer's gradients, the bank unscales its own; one decision for both
        scale = self.scaler.get_scale()
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        finite = torch.stack([rows.unscale_(1.0 / scale).to(self.device),
                              *(torch.isfinite(g).all() for g in grads)]).all()
        flag = (~finite).float().reshape(1)
        finite = dist.all_reduce_max_(flag).item() == 0  # one host read; every rank skips alike
        if finite:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            bank.update(rows, lr, step)
        else:  # both skip, and the scaler backs off and restarts its growth count, as on its own skips
            self.scaler.update(scale * self.scaler.get_backoff_factor())
            tracker = getattr(self.scaler, "_growth_tracker", None)  # no public way to reset it
            if tracker is not None:
                tracker.zero_()
            bank.update(rows, lr, step, finite=False)
        return torch.tensor(value)

    def _mean_loss(self, loss: torch.Tensor) -> float:
        """Sync mode: the loss averaged over ranks, read on the host (every rank decides alike on a non-finite
        one)."""
        if not dist.active():
            return loss.item()
        return dist.all_reduce_mean_(loss.detach().float().reshape(1).clone()).item()  # a copy: backward comes
