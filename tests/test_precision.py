"""Precision boundaries of the instance bank: fp32 logits under autocast, and fp16's loss scale kept out of the
bank's row update (issue: the bank read its gradients still multiplied by the scale)."""

from __future__ import annotations

import copy

import numpy as np
import torch
from conftest import checkpoint_tensors, tiny_config

from model.bank import BankOptions, RowUpdate, make_bank
from model.trainer import build_trainer


def test_bank_logits_are_fp32_under_bf16_autocast():
    bank = make_bank(BankOptions(dim=16, temperature=0.2), 300, generator=torch.Generator().manual_seed(0))
    z = torch.randn(8, 16).bfloat16()
    ids = torch.arange(8)
    ref = bank(z.float(), ids, 0).logits.detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _, _ = bank(z, ids, 0)
    assert logits.dtype == torch.float32
    # both sides run the bank's fp32 kernels on the same (bf16-representable) values: equal on any CPU, where
    # logits computed in bf16 were ~0.025 off at τ = 0.2
    assert (logits - ref).abs().max() < 1e-5


def state_of(model) -> dict:
    """The model's tensors and its bank's."""
    rows = model.bank.checkpoint(0)["rows"]
    return {**model.state_dict(), **{f"bank.{k}": rows[k] for k in ("weight", "momentum", "last")}}


def _step_once(scaler, bank_overflow: bool = False, monkeypatch=None):
    cfg = tiny_config("", "", data={"batch_size": 8}, pic={"negatives": "recent", "k": 16},
                      model={"amp": "off", "channels_last": False})
    trainer = build_trainer(cfg, 64, torch.device("cpu"), lrs=np.full(10, 0.1), grad_scaler=scaler)
    model, step = trainer.model, trainer.train_step
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    if bank_overflow:  # the bank's row gradient overflows, the backbone's does not: both must skip
        unscale = RowUpdate.unscale_

        def overflowing(update, inv_scale):
            update.weight.grad[0, 0] = float("inf")
            return unscale(update, inv_scale)

        monkeypatch.setattr(RowUpdate, "unscale_", overflowing)
    before = copy.deepcopy(state_of(model))
    step(x, torch.arange(8), (), 0, 0.1)
    return before, state_of(model)


def test_grad_scaler_is_kept_out_of_the_bank_update():
    _, plain = _step_once(None)
    _, scaled = _step_once(torch.amp.GradScaler("cpu", init_scale=1024.0))
    for k in plain:  # a power-of-two scale and its inverse are exact in floating point (no overflow here)
        torch.testing.assert_close(scaled[k].float(), plain[k].float(), rtol=1e-5, atol=1e-7, msg=k)


def test_an_overflowing_bank_gradient_skips_backbone_and_bank_together(monkeypatch):
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2)
    _step_once(scaler)  # one good step: the scaler counts towards growing the scale
    before, after = _step_once(scaler, bank_overflow=True, monkeypatch=monkeypatch)
    assert int(scaler._growth_tracker) == 0  # and a skip restarts that count, as GradScaler's own skips do
    for k in ("bank.weight", "bank.momentum", "bank.last", "backbone.features.0.weight", "head.0.weight"):
        assert torch.equal(before[k], after[k]), k
    assert scaler.get_scale() == 512.0  # backed off, as GradScaler does on its own skips


def test_a_resumed_fp16_run_keeps_the_loss_scale(id_folder, tmp_path):
    """model.amp=fp16 runs on a CPU too (CPU autocast + GradScaler("cpu"): the plumbing of a CUDA fp16 run). Its
    first steps overflow at the initial scale (2^16) and are skipped while the scale backs off; a run stopped at
    step 4 and resumed must carry on with that scale and growth count, so it skips exactly the uninterrupted run's
    steps and ends with its scaler state and weights, bit for bit."""
    import train
    from model.checkpoint import load

    kw = {"model": {"amp": "fp16", "channels_last": False}, "optim": {"epochs": 3}}
    train.train(tiny_config(str(id_folder), str(tmp_path / "a"), **kw))
    train.train(tiny_config(str(id_folder), str(tmp_path / "b"), run={"max_steps": 4}, **kw))
    stopped = load(tmp_path / "b" / "t" / "last.pt")
    assert stopped["scaler"]["scale"] < 2.0**16  # steps were skipped before the stop: the scale backed off
    train.train(tiny_config(str(id_folder), str(tmp_path / "b"), run={"resume": "auto"}, **kw))
    a, b = (load(tmp_path / name / "t" / "last.pt") for name in ("a", "b"))
    assert a["progress"]["step"] == b["progress"]["step"] == 9
    assert a["scaler"] == b["scaler"] and a["scaler"]["_growth_tracker"] > 0
    a_tensors, b_tensors = checkpoint_tensors(a), checkpoint_tensors(b)
    for k in a_tensors:  # the model and the bank
        assert torch.equal(a_tensors[k], b_tensors[k]), k
