"""Seeds from tuples of integers, without torch: the converter (which never needs torch) and the augmentation
(`pipeline.augment`, which builds torch generators from them) draw from the same streams."""

from __future__ import annotations

_MIX = 0x9E3779B97F4A7C15


def seed_for(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix-style), so (seed, epoch, position) streams never collide."""
    h = 0
    for p in parts:
        h = (h ^ (int(p) + _MIX + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF
