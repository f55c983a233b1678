"""A loader timed in its steady state (`SteadyRun`), and how a row stops what it started (`stop_loader`): shared by
the rows of bench_loader (our backends) and plain_loaders (the plain pipelines they are compared with)."""

from __future__ import annotations

import time

import torch


class SteadyRun:
    """A loader built and warmed up once, then timed one repeat at a time (`rate`).

    A repeat measures the steady state: it starts a fresh epoch, lets `settle` batches pass untimed (workers and
    queues fill up after the epoch boundary), times the next `batches` batches and stops the clock at the last one,
    before the epoch is abandoned. On ImageNet an epoch is thousands of batches, so neither the refill after an epoch
    boundary nor the work left in flight when an epoch is cut short belongs in a loader's rate; with tiny epochs
    they would dominate it (the torch loader keeps up to 8 batches in flight). When an epoch is shorter than
    settle + batches, the repeat spans epochs instead and the record says so (`spans_epochs`).
    Subclasses provide `iter_epoch(epoch)` (batches whose first element or `.images` is the image tensor) and
    `__len__` (batches per epoch), then call `_warm_up`.
    """

    batch_size: int
    device: torch.device

    def _warm_up(self, batches: int, settle: int) -> None:
        self.batches = batches
        self.spans_epochs = len(self) < settle + batches
        self.settle = 0 if self.spans_epochs else settle
        t = time.perf_counter()
        for b in self.iter_epoch(0):  # warm-up: workers start, numba compiles (FFCV), caches fill
            self._finish(b)
        self.warmup_seconds = time.perf_counter() - t
        self.epoch = 1

    def _finish(self, batch) -> None:
        images = batch.images if hasattr(batch, "images") else batch[0]
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # the batch is finished, not just queued
        _ = images.shape

    def rate(self) -> float:
        """Images/s of `batches` finished batches after `settle` untimed ones.

        A loader whose epochs continue where the last repeat stopped (DALI's iterator) can start a repeat with
        fewer batches left than `settle`: the settling then goes on into the next epoch. A loader that yields no
        batch in two epochs in a row is an error (it would never finish a repeat)."""
        done, end = -self.settle, None
        t = time.perf_counter() if self.settle == 0 else None
        empty = 0
        while end is None:
            yielded = 0
            for b in self.iter_epoch(self.epoch):
                self._finish(b)
                done += 1
                yielded += 1
                if done == 0:
                    t = time.perf_counter()  # the clock starts when the last settle batch is finished
                elif done >= self.batches:
                    end = time.perf_counter()
                    break
            self.epoch += 1
            empty = empty + 1 if yielded == 0 else 0
            if empty >= 2:
                raise RuntimeError(f"bench_loader: the loader yielded no batch in two epochs in a row ({len(self)} "
                                   "batches per epoch planned)")
        return self.batches * self.batch_size / (end - t)

    def close(self) -> None:
        """Stop what the row started (a DataLoader's persistent workers, FFCV's thread, DALI's pipeline threads),
        so that neither the next row nor the interpreter's exit waits for them."""
        stop_loader(getattr(self, "loader", None))
        self.loader = None


def stop_loader(loader) -> None:
    """Shut down a torch DataLoader's persistent workers (ours: the `loader` attribute of TorchLoader), and an FFCV
    epoch iterator left mid-epoch (`_epoch`)."""
    it = getattr(loader, "_epoch", None)
    if it is not None and it.is_alive():
        it.terminate_event.set()  # FFCV's thread stops at its next batch
        it.join(timeout=60)
        it.close()
    inner = getattr(loader, "loader", None)
    dl = loader if isinstance(loader, torch.utils.data.DataLoader) else inner
    if isinstance(dl, torch.utils.data.DataLoader) and getattr(dl, "_iterator", None) is not None:
        dl._iterator._shutdown_workers()
        dl._iterator = None
