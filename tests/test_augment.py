import torch

from config import AugConfig
from pipeline.augment import BatchColorAugment, batch_random_resized_crop, generator, sample_rrc_boxes


def test_rrc_boxes_lie_inside_and_respect_scale():
    g = generator(0)
    h = torch.tensor([100, 375, 50] * 200)
    w = torch.tensor([100, 500, 300] * 200)
    boxes = sample_rrc_boxes(h, w, (0.08, 1.0), (3 / 4, 4 / 3), g)
    x1, y1, x2, y2 = boxes.unbind(1)
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= w).all() and (y2 <= h).all()
    frac = (x2 - x1) * (y2 - y1) / (h * w)
    normal = frac <= 1.0 + 1e-6
    assert normal.all() and (frac[:400] >= 0.07).all()


def test_batch_augment_is_deterministic_per_generator_and_in_distribution():
    aug = AugConfig()
    x = torch.rand(400, 3, 32, 32)
    c = BatchColorAugment(aug, 32)
    a = c(batch_random_resized_crop(x, 24, aug.crop_scale, aug.crop_ratio, 0.5, generator(1)), generator(2))
    b = c(batch_random_resized_crop(x, 24, aug.crop_scale, aug.crop_ratio, 0.5, generator(1)), generator(2))
    assert a.shape == (400, 3, 24, 24) and torch.equal(a, b)
    # grayscale fraction ~ 0.2: grey images have equal channels after un-normalising
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    rgb = a * std + mean
    grey = ((rgb[:, 0] - rgb[:, 1]).abs().amax((1, 2)) < 1e-4) & ((rgb[:, 1] - rgb[:, 2]).abs().amax((1, 2)) < 1e-4)
    assert 0.12 < grey.float().mean() < 0.28


def test_flip_only_flips():
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(64, 3, 1, 1)
    y = batch_random_resized_crop(x, 4, (1.0, 1.0), (1.0, 1.0), 0.5, generator(0))
    # roi_align's 2x2 sub-sampling softens the border pixels a little; the interior is exact
    d_flip = (y - x.flip(-1))[..., 1:-1, 1:-1].abs().amax((1, 2, 3))
    d_same = (y - x)[..., 1:-1, 1:-1].abs().amax((1, 2, 3))
    flipped = d_flip < 1e-4
    assert ((d_flip < 1e-4) | (d_same < 1e-4)).all() and 15 < flipped.sum() < 49


def test_normalise_uint8_gives_contiguous_float_with_the_same_numbers():
    """The workers' normalisation of a PILToTensor view (HWC memory seen as [3,H,W]): x * (1/(255 std)) - mean/std
    in float32, every value as before, and a contiguous tensor (the strided arithmetic was the torch backend's
    largest per-image cost after decode and resize)."""
    import numpy as np
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF

    from pipeline.augment import _NORM_BIAS, _NORM_SCALE_U8, NormalizeUint8

    x = TF.pil_to_tensor(Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)))
    assert not x.is_contiguous()
    y = NormalizeUint8()(x)
    scale, bias = (torch.tensor(v, dtype=torch.float32).view(3, 1, 1) for v in (_NORM_SCALE_U8, _NORM_BIAS))
    assert y.dtype == torch.float32 and y.is_contiguous()
    assert torch.equal(y, x.contiguous().float() * scale + bias)
