"""The one batch contract every backend obeys, and the loader protocol.

Buffer ownership: a `Batch` yielded by a loader is valid until the loader's iterator is advanced again. Backends
that recycle buffers (DALI owns its output memory; FFCV and the pinned-memory torch path reuse theirs) are allowed
to overwrite the tensors of batch t when batch t+1 is produced. The training step consumes a batch before asking
for the next one; code that wants to keep a batch longer (tests, feature banks) must `.clone()` it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from typing import NamedTuple, Protocol

import torch

# ImageNet statistics, in [0, 1] units (torchvision's Normalize convention).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Batch(NamedTuple):
    """One training batch.

    images: float [B,3,H,W], normalised with ImageNet mean/std, on the target device (the large crop).
    ids:    int64 [B], the instance id of every image, read from the data (manifest / .beton field / DALI label),
            never derived from the position in the batch.
    crops:  extra crop groups for multi-crop (each float [B,3,h,w], same order of instances as `images`);
            empty for single-crop training.
    """

    images: torch.Tensor
    ids: torch.Tensor
    crops: tuple[torch.Tensor, ...] = ()


class Loader(Protocol):
    """What `train.py` needs from a backend.

    A loader is stateless across epochs: the order of epoch e (or window e, for the sliding-window scheduler) is a
    pure function of (seed, e), and so is the augmentation randomness of every batch, so that a run resumed at
    (epoch, batch) sees exactly the batches the uninterrupted run would have seen.
    """

    num_instances: int

    def __len__(self) -> int:
        """Batches per epoch (or per window)."""
        ...

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Yield the batches of epoch `epoch`, skipping the first `start_batch` of them."""
        ...


def to_device_async(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without making the host wait: on CUDA through pinned memory with a non-blocking
    copy (torch's pinned-memory cache keeps the staging block until the copy has run). A plain `.to("cuda")` of
    pageable memory waits for the copy, a sync per call; the loaders make one or two such copies per batch."""
    device = torch.device(device)
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


_CONSTANTS: dict[tuple, torch.Tensor] = {}


def device_constant(values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
    """[1,C,1,1] constant (e.g. IMAGENET_MEAN) on `like`'s device and dtype, made once per (values, device, dtype):
    `torch.tensor(values, device="cuda")` per batch would be a blocking copy per batch."""
    key = (values, like.device, like.dtype)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = to_device_async(torch.tensor(values, dtype=like.dtype).view(1, -1, 1, 1), like.device)
    return _CONSTANTS[key]


def note_corrupt(seen: dict[int, str], bad: Iterable[tuple[int, str]]) -> None:
    """Record undecodable files in `seen` (id -> reason) and warn once per file; the caller skips them."""
    for iid, reason in bad:
        if iid not in seen:
            seen[iid] = reason
            warnings.warn(f"skipping undecodable image (instance {iid}): {reason}", stacklevel=3)
