import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

from model.backbone import make_backbone
from model.bank import BankOptions, make_bank
from model.optim import lr_at, lr_table
from model.pic import build_pic


def test_lr_schedule_spec_oracle_12():
    base, wu, total = 0.03, 100, 1000
    assert lr_at(0, base, wu, total) == pytest.approx(base / 100, abs=1e-12)
    assert lr_at(wu, base, wu, total) == pytest.approx(base, abs=1e-12)
    assert lr_at(total, base, wu, total) == pytest.approx(1e-6, abs=1e-9)
    lrs = lr_table(base, wu, total, 1e-6)
    assert (lrs[:wu + 1] == sorted(lrs[:wu + 1])).all()  # warm-up rises
    assert (lrs[wu:] == sorted(lrs[wu:], reverse=True)).all()  # cosine falls
    assert lrs[wu + (total - wu) // 2] == pytest.approx((base + 1e-6) / 2, rel=1e-6)


def test_initial_loss_is_ln_n_spec_oracle_11():
    torch.manual_seed(0)
    for n in (100, 5000):
        model = build_pic("tiny", make_bank(BankOptions(dim=128), n), head_hidden=64, dim=128)
        x = torch.randn(32, 3, 32, 32)
        ids = torch.randint(0, n, (32,))
        logits, targets, _ = model(x, ids, step=0)
        loss = F.cross_entropy(logits, targets).item()
        assert abs(loss - math.log(n)) < 0.3, (n, loss)


# Identities checked in float64 (a bank of .double() rows, fp64 features): their rounding (~1e-16 relative, a few
# dozen operations deep) is far below 1e-12 in any summation order, where a real violation is O(1e-3) or more.
EXACT = 1e-12


def test_cosine_logits_spec_oracle_9():
    torch.manual_seed(0)
    bank = make_bank(BankOptions(dim=8, temperature=0.2, dtype="fp64"), 50)
    z = torch.randn(6, 8, dtype=torch.float64)
    ids = torch.arange(6)
    logits, _, _ = bank(z, ids, 0)
    assert logits.dtype == torch.float64 and logits.abs().max() <= 1 / 0.2 + EXACT
    bank.rows.table()[0][3] *= 7.5  # scale one row
    logits2, _, update = bank(z * 3, ids, 0)  # and the features
    assert (logits - logits2).abs().max() < EXACT
    loss = F.cross_entropy(logits2, ids)
    loss.backward()
    w_leaf = update.weight
    radial = (w_leaf.grad * w_leaf.detach()).sum(1)  # <grad w_j, w_j> = 0: the logits are scale-invariant in w_j
    assert radial.abs().max() < EXACT * w_leaf.grad.norm()


def test_multicrop_small_crops_give_no_w_gradient_spec_oracle_10():
    torch.manual_seed(0)
    model = build_pic("tiny", make_bank(BankOptions(dim=16, dtype="fp64"), 40), head_hidden=32, dim=16).double()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    small = tuple(torch.randn(4, 3, 16, 16, dtype=torch.float64) for _ in range(3))
    ids = torch.tensor([3, 7, 11, 39])
    logits, targets, update = model(x, ids, 0, small)
    assert logits.shape == (16, 40)
    assert targets.tolist() == ids.tolist() * 4  # crop-major
    F.cross_entropy(logits, targets).backward()  # mean over 4B rows
    g_multi = update.weight.grad.clone()
    model.zero_grad()
    logits_l, targets_l, update = model(x, ids, 0)
    # the large crop's rows are 1/4 of the multi-crop mean, so W.grad(multi) = W.grad(large only) / 4
    F.cross_entropy(logits_l, targets_l).backward()
    g_large = update.weight.grad
    assert (g_multi * 4 - g_large).abs().max() < EXACT
    assert g_large.abs().sum() > 0


def test_bank_update_equals_torch_sgd_full_softmax():
    torch.manual_seed(0)
    bank = make_bank(BankOptions(dim=4, momentum=0.9, weight_decay=1e-2, dtype="fp64"), 20)
    ref = torch.nn.Parameter(bank.rows.table()[0].clone())
    opt = torch.optim.SGD([ref], lr=0.5, momentum=0.9, weight_decay=1e-2)
    for step in range(5):
        z = torch.randn(3, 4, dtype=torch.float64)
        ids = torch.randint(0, 20, (3,))
        logits, t, update = bank(z, ids, step)
        F.cross_entropy(logits, t).backward()
        bank.update(update, 0.5, step)
        opt.zero_grad()
        F.cross_entropy(F.normalize(z, dim=1) @ F.normalize(ref, dim=1, eps=1e-6).t() / 0.2, ids).backward()
        opt.step()
    # rows grow to a few hundred (a small row's cosine gradient is ∝ 1/‖w‖): relative to the largest, below 1e-12
    assert ((bank.rows.table()[0] - ref.detach()).abs().max() / ref.abs().max()) < EXACT


@pytest.mark.parametrize("arch", ["resnet18"])
def test_backbone_state_loads_into_torchvision_with_only_fc_missing(arch):
    backbone, dim = make_backbone(arch)
    assert dim == 512
    tv = getattr(torchvision.models, arch)()
    result = tv.load_state_dict(backbone.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    # docs/method.md §1: the last BN gamma of every residual block starts at 0
    assert backbone.layer1[0].bn2.weight.abs().sum() == 0
