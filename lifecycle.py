"""A run's life as a process: the stop signals (the first stops every rank before the same step and saves; a second
leaves at once) and the one teardown of what a run holds, however it ends."""

from __future__ import annotations

import gc
import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from model import distributed as dist
from model.bank import InstanceBank
from model.folder_lock import unlock
from model.trainer import Trainer


class StopRequested(Exception):
    """Raised by the first SIGINT/SIGTERM while the loop waits for its loader (see StopFlag.interruptible)."""


class LeftAlone(KeyboardInterrupt):
    """A second SIGINT/SIGTERM: this process leaves at once, without a checkpoint (RunResources.abandon)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def left_alone(e: BaseException | None) -> LeftAlone | None:
    """The LeftAlone that `e` is, or that caused it (a signal handler's exception raised inside torch.save comes back
    as torch's RuntimeError with it as the context)."""
    seen = 0
    while e is not None and seen < 16:
        if isinstance(e, LeftAlone):
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


class StopFlag:
    """SIGINT/SIGTERM: all ranks stop before the same step, rank 0 saves a checkpoint, every rank exits with the
    resume hint.

    The first signal only sets a flag, which the next step's vote (TrainStep.vote) hands to every rank, so the
    weights are never left half-updated and no rank leaves the others in a collective. While the loop waits for its
    loader (which may be slow, or stuck on a dead worker) the signal also ends that wait (StopRequested) and the rank
    votes without a batch: the first signal is honoured within seconds wherever the process is. A second signal
    leaves at once, alone (LeftAlone)."""

    # Under torchrun a repeat of the first signal this soon after it is the same request, not a second one: a
    # scheduler that signals the whole job (scancel, a kubelet, Ctrl-C in a terminal: the foreground process group)
    # reaches every rank and torchrun, which forwards its copy to the ranks, so each rank gets it twice within
    # moments. A process torchrun did not start gets each signal once: its second one always leaves.
    REPEAT_SECONDS = 2.0

    def __init__(self):
        self.signum = 0
        self._first_at = 0.0
        self.repeat_seconds = self.REPEAT_SECONDS if "TORCHELASTIC_RUN_ID" in os.environ else 0.0
        self._old = {}
        self._waiting = False
        self._pid = os.getpid()

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if os.getpid() != self._pid:  # a forked DataLoader worker inherited this handler: the main process decides
            return
        if self.signum:
            if signum == self.signum and time.monotonic() - self._first_at < self.repeat_seconds:
                return
            raise LeftAlone(signum)
        self.signum, self._first_at = signum, time.monotonic()
        # os.write: a print could re-enter the stream that the interrupted code was writing to
        who, name = f"rank {dist.rank()}: " if dist.active() else "", signal.Signals(signum).name
        os.write(2, f"\n{who}{name}: stopping before the next step and saving a checkpoint; a second {name} leaves "
                    f"at once without one\n".encode())
        if self._waiting:
            raise StopRequested

    @contextmanager
    def interruptible(self):
        if self.signum:
            raise StopRequested
        self._waiting = True
        try:
            yield
        finally:
            self._waiting = False

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


class RunResources:
    """What a run holds that must be let go however it ends. `release` is the one teardown, on every exit (success,
    agreed stop, error), in an order that cannot deadlock: queued device work is waited for, the DDP wrapper is
    dropped while the process groups still exist (model.distributed.shutdown says why), then the shared-memory
    banks go (last.pt holds their rows), then every process group, and the run folder's lock last."""

    def __init__(self):
        self.device: torch.device | None = None
        self.trainer: Trainer | None = None
        self.bank: InstanceBank | None = None  # a host bank's shared memory: each node's writer removes its copy
        self.locks: list[int] = []  # the run folder's (rank 0); the kernel drops it too when a process is killed
        self.loaders: list = []  # their worker processes/threads end with the run, however it ends
        self.checkpoint: Path | None = None

    def release(self) -> None:
        for loader in self.loaders:  # first: a worker must not outlive an error, nor hold a bank's pages
            loader.close()
        self.loaders = []
        if self.trainer is not None:
            if self.device is not None and self.device.type == "cuda":
                try:
                    torch.cuda.synchronize(self.device)  # queued steps and their NCCL collectives
                except RuntimeError:  # a CUDA error ended the run: the context has nothing more to finish
                    pass
            self.trainer.train_step.release()
            self.trainer = None
            gc.collect()  # the wrapper's reference cycles too, now, while the groups exist
        if self.bank is not None:
            self.bank.close()
            self.bank = None
        dist.shutdown()
        for fd in self.locks:
            unlock(fd)
        self.locks = []

    def abandon(self, signum: int) -> None:
        """A second signal: leave now, without a checkpoint, and without any collective or barrier (a peer may
        never come to it). Under torchrun the others cannot save either: say so, remove this node's shared-memory
        bank, and end the process here. Its process groups are not destroyed: destroying one joins its worker
        threads, which may be inside a collective that waits for the ranks left behind."""
        name = signal.Signals(signum).name
        last = f"--run.resume=auto continues from the last one, {self.checkpoint}" if self.checkpoint and \
            self.checkpoint.exists() else "there is none yet"
        if not dist.active():
            print(f"\nsecond {name}: leaving without a checkpoint ({last})", file=sys.stderr, flush=True)
            return
        print(f"\nsecond {name}: rank {dist.rank()} leaves alone, without a checkpoint; the other ranks cannot save "
              f"either and stop with an error ({last})", file=sys.stderr, flush=True)
        if self.bank is not None:
            self.bank.close()
        sys.stdout.flush()
        os._exit(128 + signum)
