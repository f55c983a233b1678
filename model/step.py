"""One training step, shared by train.py and the benchmarks.

encoder forward under autocast (bf16 on CUDA; DDP-wrapped under torchrun, optionally compiled) -> the bank's fp32
cosine logits -> cross-entropy -> backward -> backbone/head SGD (fused on CUDA) -> bank row update.

Two ways to skip a step whose loss is not finite, before it touches any weight:
* sync (CPU default): read the loss back every step and decide on the host. Under DDP the loss is averaged over
  ranks first (with the stop flag), so every rank decides alike; a rank that skipped alone would leave the others
  waiting in the gradient all-reduce.
* sync-free (CUDA default): decide on the device. The fused SGD kernel takes a `found_inf` tensor and leaves
  parameters and momentum untouched when it is set (the mechanism GradScaler uses), and the bank masks its row
  update the same way, so the loop never waits for the GPU; the loss is read only on log steps.
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
        wrapped = nn.parallel.DistributedDataParallel(
            encoder, device_ids=[device.index] if device.type == "cuda" else None)
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
        self.amp = nullcontext()
        if on_cuda and amp != "off":
            self.amp = torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
        self.scaler = grad_scaler if grad_scaler is not None else torch.amp.GradScaler(
            "cuda", enabled=on_cuda and amp == "fp16")
        self.stop_requested = False  # some rank got a stop signal: every rank stops at the same step
        self.save_requested = False  # some rank's checkpoint timer is due: every rank saves at the same step
        fused = all(g.get("fused") for g in optimizer.param_groups)
        self.sync_free = (on_cuda if sync_free is None else sync_free) and fused and not self.scaler.is_enabled()
        if self.sync_free:
            # A fused step skipped by found_inf on a parameter's very first step leaves its momentum buffer
            # uninitialised (torch.empty); zero buffers give the same first update (u = 0*m + g) and no garbage.
            for group in optimizer.param_groups:
                for p in group["params"]:
                    optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p))

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def __call__(self, images: torch.Tensor, ids: torch.Tensor, crops: tuple[torch.Tensor, ...], step: int,
                 lr: float, stop: bool = False, save: bool = False, ids_host: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """Run step `step` at learning rate `lr`; returns the loss as a 0-d tensor (sync mode: already averaged
        over ranks and on the host's side of a sync; non-finite: nothing was updated). `stop` / `save`: this rank
        got a stop signal / its checkpoint timer is due; `stop_requested` / `save_requested` then say whether any
        rank did (sync-free under DDP: after `poll()`). `ids_host`: the batch's ids in host memory (`Batch.ids_host`),
        for a bank on the host."""
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
            if not dist.active():
                self.stop_requested, self.save_requested = stop, save or self.save_requested
            return loss.detach()
        value = self._agree(loss, stop, save)
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

    def poll(self, stop: bool, save: bool = False) -> None:
        """Sync-free mode under DDP: agree on stopping and saving (a host sync; call it at the same steps on every
        rank, the log steps)."""
        if self.sync_free and dist.active():
            flags = torch.tensor([float(stop), float(save)], device=self.device)
            stop_any, save_any = (dist.all_reduce_max_(flags) > 0).tolist()
            self.stop_requested, self.save_requested = stop_any, save_any or self.save_requested

    def _agree(self, loss: torch.Tensor, stop: bool, save: bool) -> float:
        if not dist.active():
            self.stop_requested, self.save_requested = stop, save or self.save_requested
            return loss.item()
        packed = torch.stack([loss.detach().float(), torch.tensor(float(stop), device=loss.device),
                              torch.tensor(float(save), device=loss.device)])
        mean = dist.all_reduce_mean_(packed).tolist()
        self.stop_requested, self.save_requested = mean[1] > 0, mean[2] > 0 or self.save_requested
        return mean[0]
