"""The digest of an instance index's paths (their order and bytes), kept in every checkpoint so that a resume can
tell whether its manifest is the index the run trained on, and where two indexes part (pipeline.manifest).

One pass over the path bytes (SHA-1, hardware-accelerated on current x86; not a security device) into at most
DIGEST_BLOCKS block hashes: ~200 KB per checkpoint however large N, a mismatch located to a block (to the path when
N <= DIGEST_BLOCKS).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from pipeline.dataset import PathTable

DIGEST_BLOCKS = 4096  # at most this many block hashes per digest
DIGEST_VERSION = "sha1-blocks-v1"  # how index_digest hashes: a digest of another version is not compared


def index_digest(paths: PathTable, block: int = 0) -> dict:
    """A digest of the paths (their order and bytes), as plain data for a checkpoint: n, the block size, one
    64-bit hash (SHA-1's first 8 bytes) per block of `block` paths (at most DIGEST_BLOCKS blocks), the first path
    of every block (to name where two indexes part), and the hash of it all."""
    n = len(paths)
    block = block or max(1, -(-n // DIGEST_BLOCKS))
    buf, off = paths.raw()
    starts = range(0, n, block)
    hashes = np.empty(len(starts), np.uint64)
    for b, a in enumerate(starts):
        e = min(n, a + block)
        h = hashlib.sha1(np.diff(off[a:e + 1]).tobytes())  # the lengths: where one path ends, the next starts
        h.update(buf[off[a]:off[e]])
        hashes[b] = np.frombuffer(h.digest()[:8], np.uint64)[0]
    whole = hashlib.sha1(np.array([n, block], np.int64).tobytes() + hashes.tobytes())
    return {"version": DIGEST_VERSION, "n": n, "block": block, "digest": whole.hexdigest(),
            "blocks": torch.from_numpy(hashes.view(np.int64)),
            "firsts": paths.tolist() if block == 1 else [paths[a] for a in starts]}


def digest_difference(saved: dict, paths: PathTable, what: str = "the manifest") -> str:
    """"" when `paths` are the index `saved` (an index_digest) was made of, else where they part, in words (`what`
    names where `paths` come from)."""
    mine = index_digest(paths, block=saved["block"])
    if mine["digest"] == saved["digest"]:
        return ""
    block = saved["block"]
    ours, theirs = mine["blocks"].numpy(), np.asarray(saved["blocks"]).reshape(-1)
    common = min(len(ours), len(theirs))
    differ = np.flatnonzero(ours[:common] != theirs[:common])
    if differ.size == 0:
        return (f"{what} has {len(paths):,} paths, the checkpoint's index {saved['n']:,} (the first "
                f"{min(len(paths), saved['n']):,} agree)")
    b = int(differ[0])
    a = b * block
    if block == 1 or mine["firsts"][b] != saved["firsts"][b]:
        return f"instance {a} is {mine['firsts'][b]!r} in {what} but {saved['firsts'][b]!r} in the checkpoint"
    return (f"they part within instances {a}..{min(len(paths), a + block) - 1} ({what}'s {paths[a]!r} on; "
            f"the checkpoint keeps one hash per {block:,} paths)")
