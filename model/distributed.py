"""torch.distributed helpers that are no-ops in a single process, so `python train.py` needs no launcher.

Under `torchrun` (RANK / WORLD_SIZE / LOCAL_RANK in the environment) `init()` starts the process group: NCCL on
CUDA, gloo on CPU (used by the tests).
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


class DeviceError(ValueError):
    pass


def pick_device(name: str = "auto") -> torch.device:
    """"auto" = CUDA when available, else CPU; asking for CUDA where there is none is an error naming it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} was asked for but no CUDA device is available")
    return device


def init(device_name: str = "auto") -> torch.device:
    """Start the process group when launched by torchrun; return this process's device."""
    use_cuda = pick_device(device_name).type == "cuda"
    if not launched():
        return pick_device(device_name)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not active():
        backend, timeout = ("nccl" if use_cuda else "gloo"), timedelta(minutes=10)
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if attempt == 0:
            dist.init_process_group(backend, timeout=timeout)
        else:
            # After a torchrun restart the agent's store still holds the previous attempt's peer addresses under
            # the default keys (seen with gloo: "connectFullMesh ... Connection refused"), so key this attempt.
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                  timeout=timeout)
            dist.init_process_group(backend, store=dist.PrefixStore(f"pic_attempt_{attempt}", store),
                                    rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                                    timeout=timeout)
    return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def restarted() -> bool:
    """True when torchrun restarted the workers after a failure (--max-restarts): resume from the checkpoint."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors from all ranks, rank-major (no gradient)."""
    if not active():
        return t
    parts = [torch.empty_like(t) for _ in range(world())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


_HOST: object | None = None


def all_gather_cat_host(t: torch.Tensor) -> torch.Tensor:
    """`all_gather_cat` of a CPU tensor over a gloo group of all ranks: under NCCL it does not touch (or wait for)
    the GPU. The group is made on the first call, which every rank makes at the same step (a collective)."""
    global _HOST
    if not active():
        return t
    if _HOST is None:
        _HOST = dist.new_group(list(range(world())), backend="gloo") if dist.get_backend() != "gloo" else \
            dist.group.WORLD
    parts = [torch.empty_like(t) for _ in range(world())]
    dist.all_gather(parts, t.contiguous(), group=_HOST)
    return torch.cat(parts)


def all_reduce_mean_(t: torch.Tensor) -> torch.Tensor:
    if active():
        dist.all_reduce(t)
        t /= world()
    return t


def all_reduce_max_(t: torch.Tensor) -> torch.Tensor:
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def barrier() -> None:
    if active():
        dist.barrier()


def shutdown() -> None:
    global _LOCAL, _HOST
    if active():
        dist.destroy_process_group()
    _LOCAL = _HOST = None


_LOCAL: tuple | None = None


def local_group():
    """(gloo group of this node's ranks or None, local rank, local world size). Nodes are the torchrun blocks of
    LOCAL_WORLD_SIZE consecutive ranks (torchrun sets it; without it every rank counts as its own node). Created
    once, by every rank (new_group is a collective)."""
    global _LOCAL
    if not active():
        return None, 0, 1
    if _LOCAL is None:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if world() % local_world:
            raise ValueError(f"LOCAL_WORLD_SIZE={local_world} does not divide the world size {world()}")
        mine = None
        for node in range(world() // local_world):
            ranks = list(range(node * local_world, (node + 1) * local_world))
            group = dist.new_group(ranks, backend="gloo")
            if rank() in ranks:
                mine = group
        _LOCAL = (mine, rank() % local_world, local_world)
    return _LOCAL
