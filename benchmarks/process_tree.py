"""Processes that a test or a benchmark starts, ended together with everything they started.

Killing a child is not enough: a test that fails or times out while its child runs torchrun leaves torchrun's ranks
running (each in a session of its own, so not even the child's process group reaches them), re-parented to init
once their parent is gone, holding ports and memory. So every process started through a ProcessTree carries a mark
in its environment, which its descendants inherit wherever they are re-parented, and `close()` finds the marked
processes in /proc, stops them (none can start another meanwhile), kills them and waits until they are gone.

    with ProcessTree() as tree:           # tests: the `processes` fixture (tests/conftest.py)
        job = tree.popen([...])           # or tree.run([...], timeout=...), tree.spawn(target, args)
        ...                               # however this block ends, nothing started here outlives it
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Sequence
from multiprocessing import resource_tracker

MARK = "PIC_PROCESS_TREE"
GONE_WITHIN_S = 60.0  # a SIGKILLed process that is still there after this is stuck in the kernel: reported


class ProcessTree:
    def __init__(self):
        self.id = uuid.uuid4().hex
        self._popens: list[subprocess.Popen] = []
        self._spawned: list = []

    def env(self, env: dict[str, str] | None = None) -> dict[str, str]:
        """`env` (default: this process's environment) with this tree's mark."""
        return {**(os.environ if env is None else env), MARK: self.id}

    def popen(self, cmd: Sequence[str], env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, env=self.env(env), **kwargs)
        self._popens.append(proc)
        return proc

    def run(self, cmd: Sequence[str], timeout: float | None = None, env: dict[str, str] | None = None,
            **kwargs) -> subprocess.CompletedProcess:
        """subprocess.run, whose timeout ends the whole tree (subprocess.run kills the child only)."""
        if kwargs.pop("capture_output", False):
            kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc = self.popen(cmd, env=env, **kwargs)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.close()
            raise
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def spawn(self, target: Callable, args: tuple = ()):
        """A started multiprocessing process (spawn context) running target(*args), marked like the others."""
        resource_tracker.ensure_running()  # started unmarked: it serves this process after the tree is gone
        old = os.environ.get(MARK)
        os.environ[MARK] = self.id  # what the spawned interpreter inherits
        try:
            proc = mp.get_context("spawn").Process(target=target, args=args)
            proc.start()
        finally:
            if old is None:
                os.environ.pop(MARK, None)
            else:
                os.environ[MARK] = old
        self._spawned.append(proc)
        return proc

    def members(self) -> list[int]:
        return marked(self.id)

    def close(self) -> None:
        """Stop every marked process until no new one appears, kill them all, and wait until they are gone."""
        stopped: set[int] = set()
        while new := set(self.members()) - stopped:
            for pid in new:
                _send(pid, signal.SIGSTOP)
            stopped |= new
        for pid in self.members():
            _send(pid, signal.SIGKILL)
        for proc in self._popens:  # our children: reaped here
            proc.wait()
        for proc in self._spawned:
            proc.join()
        deadline = time.monotonic() + GONE_WITHIN_S
        while left := self.members():  # descendants: their new parent (init) reaps them
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes {left} survived SIGKILL for {GONE_WITHIN_S:.0f} s")
            time.sleep(0.01)

    def __enter__(self) -> ProcessTree:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def free_port() -> int:
    """A TCP port free on this host now, for the rendezvous of the process group a test or benchmark starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def marked(tree_id: str) -> list[int]:
    """The live processes carrying tree `tree_id`'s mark, this one excepted (zombies have no environment left)."""
    mark = f"{MARK}={tree_id}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if mark in f.read().split(b"\0"):
                    found.append(int(name))
        except OSError:  # gone meanwhile, or a zombie
            continue
    return found


def _send(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
