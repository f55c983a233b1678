"""torch.distributed helpers that are no-ops in a single process, so `python train.py` needs no launcher.

Under `torchrun` (RANK / WORLD_SIZE / LOCAL_RANK in the environment) `init()` starts the process group: NCCL on
CUDA, gloo on CPU (used by the tests).
"""

from __future__ import annotations

import os
import weakref
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
        host_group()  # made here, where every rank passes in the same order (new_group is a collective)
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


def host_group():
    """A gloo group of all ranks, for CPU tensors: under NCCL its collectives neither touch nor wait for the GPU
    (under gloo it is the world). Made by `init`, or on the first call, which every rank must make alike."""
    global _HOST
    if _HOST is None:
        _HOST = dist.new_group(list(range(world())), backend="gloo") if dist.get_backend() != "gloo" else \
            dist.group.WORLD
    return _HOST


def all_gather_cat_host(t: torch.Tensor) -> torch.Tensor:
    """`all_gather_cat` of a CPU tensor over the host group (no GPU sync under NCCL)."""
    if not active():
        return t
    parts = [torch.empty_like(t) for _ in range(world())]
    dist.all_gather(parts, t.contiguous(), group=host_group())
    return torch.cat(parts)


WAIT_SLICE = timedelta(milliseconds=200)


def all_reduce_max_host_(t: torch.Tensor) -> torch.Tensor:
    """In-place max over ranks of a small CPU tensor on the host group, waited in slices of WAIT_SLICE: a plain
    wait blocks in C++ until every rank has joined, and Python runs no signal handler meanwhile, so a rank whose
    peer never comes could not even be asked to leave (see lifecycle.StopFlag). Keep `t` alive across calls (a
    buffer): a gloo worker thread may drop the collective's last reference to it after the wait returns."""
    if not active():
        return t
    work = dist.all_reduce(t, op=dist.ReduceOp.MAX, group=host_group(), async_op=True)
    while True:
        try:
            work.wait(WAIT_SLICE)
            return t
        except RuntimeError:  # the slice ran out ("Operation timed out!"), or the collective failed
            if work.is_completed():
                work.wait()  # done meanwhile, or failed (a peer left): its result, or its own error
                return t


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


_WRAPPERS: weakref.WeakSet = weakref.WeakSet()  # the DDP wrappers made by `ddp` (see shutdown)
_KEPT: list = []  # group handles kept until the interpreter exits (see shutdown)


def ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`module` under DistributedDataParallel (release it before `shutdown`: TrainStep.release)."""
    wrapped = torch.nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None)
    _WRAPPERS.add(wrapped)
    return wrapped


def shutdown() -> None:
    """Destroy every process group: the world, the host group and this node's group.

    Who drops a group's last reference matters. ~ProcessGroupGloo joins its worker threads, and a worker may still
    be releasing a finished collective whose tensors hold Python objects, which needs the GIL. torch's Python
    handles of a group release the GIL while they destroy it; DDP's C++ Reducer does not, so when the Reducer held
    the last reference its dealloc joined a worker that waited for the GIL held by that very join, forever (seen
    on torch 2.11 under CPU load: a finished torchrun job that never exited). So the last references are the
    handles held here, dropped after torch's own (destroy_process_group and its native registry) and after the
    DDP wrappers: release those first (TrainStep.release); a wrapper still alive here keeps the handles until the
    interpreter exits, so that its Reducer is never the last holder."""
    global _LOCAL, _HOST
    if active():
        handles = [dist.group.WORLD, _HOST, _LOCAL[0] if _LOCAL else None]
        _LOCAL = _HOST = None
        dist.destroy_process_group()  # every group; torch drops its references
        if len(_WRAPPERS):
            _KEPT.extend(handles)
        handles.clear()  # the last references: through the Python handles, without the GIL
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
