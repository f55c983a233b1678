"""One training step, shared by train.py and the benchmarks.

forward under autocast (bf16 on CUDA) -> fp32 cross-entropy -> backward -> backbone/head SGD -> bank row update.
On CUDA: channels_last inputs, optional torch.compile of the module, fused SGD. The loss is read back once per step
(`loss.item()`), the price of skipping non-finite steps before they touch any weight.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from model.pic import PIC


def make_optimizer(params, lr: float, momentum: float, weight_decay: float, device: torch.device):
    # wd on every parameter, BN and biases included (spec §1, §6). fused=True: one kernel for all params on CUDA.
    fused = device.type == "cuda"
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=fused or None)


class TrainStep:
    def __init__(self, model: PIC, optimizer: torch.optim.Optimizer, device: torch.device, amp: str = "bf16",
                 channels_last: bool = True, compile: bool = False):
        self.model = model
        self.optimizer = optimizer
        self.channels_last = channels_last
        on_cuda = device.type == "cuda"
        self.forward = torch.compile(model) if (compile and on_cuda) else model
        self.amp = nullcontext()
        if on_cuda and amp != "off":
            self.amp = torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
        self.scaler = torch.amp.GradScaler("cuda", enabled=on_cuda and amp == "fp16")

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def __call__(self, images: torch.Tensor, ids: torch.Tensor, crops: tuple[torch.Tensor, ...], step: int,
                 lr: float) -> float:
        """Run step `step` at learning rate `lr`; returns the loss (non-finite: nothing was updated)."""
        self.set_lr(lr)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
            crops = tuple(c.contiguous(memory_format=torch.channels_last) for c in crops)
        with self.amp:
            logits, targets = self.forward(images, ids, step, crops)
        loss = F.cross_entropy(logits.float(), targets)
        self.optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        if not math.isfinite(value):
            self.model.bank.skip_step()
            return value
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.model.bank.step(lr, step)
        return value
