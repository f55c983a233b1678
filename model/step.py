"""One training step, shared by train.py and the benchmarks.

encoder forward under autocast (bf16 on CUDA; DDP-wrapped under torchrun, optionally compiled) -> the bank's fp32
cosine logits -> cross-entropy -> backward -> backbone/head SGD (fused on CUDA) -> bank row update.

The loss is read back once per step: the price of skipping a non-finite step before it touches any weight. Under
DDP it is averaged over ranks first (together with the stop flag), so that every rank takes the same decision;
a rank that skipped alone would leave the others waiting in the gradient all-reduce.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from model import distributed as dist
from model.pic import PIC


def make_optimizer(params, lr: float, momentum: float, weight_decay: float, device: torch.device):
    # wd on every parameter, BN and biases included (spec §1, §6). fused=True: one kernel for all params on CUDA.
    fused = device.type == "cuda"
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=fused or None)


def wrap_encoder(model: PIC, device: torch.device, compile: bool = False, sync_bn: bool = False) -> nn.Module:
    """The encoder as the step runs it: SyncBN (option), DDP under torchrun, torch.compile (CUDA)."""
    encoder: nn.Module = model.encoder
    if sync_bn and dist.active():
        model.backbone = nn.SyncBatchNorm.convert_sync_batchnorm(model.backbone)
        model.encoder.backbone = model.backbone
    if dist.active():
        # BN running stats: rank 0's are broadcast each forward (DDP default), so every replica evaluates alike
        encoder = nn.parallel.DistributedDataParallel(
            encoder, device_ids=[device.index] if device.type == "cuda" else None)
    if compile and device.type == "cuda":
        encoder = torch.compile(encoder)
    return encoder


class TrainStep:
    def __init__(self, model: PIC, optimizer: torch.optim.Optimizer, device: torch.device, amp: str = "bf16",
                 channels_last: bool = True, compile: bool = False, sync_bn: bool = False):
        self.model = model
        self.optimizer = optimizer
        self.device = device
        self.channels_last = channels_last
        self.encoder = wrap_encoder(model, device, compile, sync_bn)
        on_cuda = device.type == "cuda"
        self.amp = nullcontext()
        if on_cuda and amp != "off":
            self.amp = torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
        self.scaler = torch.amp.GradScaler("cuda", enabled=on_cuda and amp == "fp16")
        self.stop_requested = False

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def __call__(self, images: torch.Tensor, ids: torch.Tensor, crops: tuple[torch.Tensor, ...], step: int,
                 lr: float, stop: bool = False) -> float:
        """Run step `step` at learning rate `lr`; returns the loss averaged over ranks (non-finite: nothing was
        updated). `stop`: this rank got a stop signal; afterwards `stop_requested` says whether any rank did."""
        self.set_lr(lr)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
            crops = tuple(c.contiguous(memory_format=torch.channels_last) for c in crops)
        with self.amp:
            logits, targets = self.model(images, ids, step, crops, encoder=self.encoder)
        loss = F.cross_entropy(logits.float(), targets)
        self.optimizer.zero_grad(set_to_none=True)
        value = self._agree(loss, stop)
        if not math.isfinite(value):
            self.model.bank.skip_step()
            return value
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.model.bank.step(lr, step)
        return value

    def _agree(self, loss: torch.Tensor, stop: bool) -> float:
        if not dist.active():
            self.stop_requested = stop
            return loss.item()
        packed = torch.stack([loss.detach().float(), torch.tensor(float(stop), device=loss.device)])
        mean = dist.all_reduce_mean_(packed).tolist()
        self.stop_requested = mean[1] > 0
        return mean[0]
