"""Precision boundaries of the instance bank: fp32 logits under autocast, and fp16's loss scale kept out of the
bank's row update (issue: the bank read its gradients still multiplied by the scale)."""

from __future__ import annotations

import copy

import torch

from model.classifier import InstanceBank
from model.pic import build_pic
from model.step import TrainStep, make_optimizer


def test_bank_logits_are_fp32_under_bf16_autocast():
    bank = InstanceBank(300, 16, temperature=0.2, generator=torch.Generator().manual_seed(0))
    z = torch.randn(8, 16).bfloat16()
    ids = torch.arange(8)
    ref, _ = copy.deepcopy(bank)(z.float(), ids, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = bank(z, ids, 0)
    assert logits.dtype == torch.float32
    assert (logits - ref).abs().max() < 1e-5  # in bf16 the error was ~0.025 at τ = 0.2


def _step_once(scaler, bank_overflow: bool = False):
    torch.manual_seed(0)
    model = build_pic("tiny", 64, head_hidden=32, dim=16, lr_history=[0.1] * 10, negatives="recent", k=16,
                      batch_size=8)
    opt = make_optimizer(list(model.backbone.parameters()) + list(model.head.parameters()), 0.1, 0.9, 1e-4,
                         torch.device("cpu"))
    step = TrainStep(model, opt, torch.device("cpu"), amp="off", channels_last=False, grad_scaler=scaler)
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    if bank_overflow:  # the bank's row gradient overflows, the backbone's does not: both must skip
        unscale = model.bank.unscale_grad_

        def overflowing(inv_scale):
            model.bank._pending[1].grad[0, 0] = float("inf")
            return unscale(inv_scale)

        model.bank.unscale_grad_ = overflowing
    before = copy.deepcopy(model.state_dict())
    step(x, torch.arange(8), (), 0, 0.1)
    return before, model.state_dict()


def test_grad_scaler_is_kept_out_of_the_bank_update():
    _, plain = _step_once(None)
    _, scaled = _step_once(torch.amp.GradScaler("cpu", init_scale=1024.0))
    for k in plain:
        torch.testing.assert_close(scaled[k].float(), plain[k].float(), rtol=1e-5, atol=1e-7, msg=k)


def test_an_overflowing_bank_gradient_skips_backbone_and_bank_together():
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    before, after = _step_once(scaler, bank_overflow=True)
    for k in ("bank.weight", "bank.momentum", "bank.last", "backbone.features.0.weight", "head.0.weight"):
        assert torch.equal(before[k], after[k]), k
    assert scaler.get_scale() == 512.0  # backed off, as GradScaler does on its own skips
