"""`--run.profile=N`: a torch.profiler trace of N steps of a real run, its top operators and its data-wait share.

The run's Logger (train.py) drives it from the calls the loop already makes to time itself: a step was issued
(`step_done`), the loop starts waiting for the next batch (`waiting`), the batch arrived (`data_ready`). So the
profiled steps are the loop's own, with its loader, its bank and its logging, and the wait for data shows in the
trace as a `data_wait` range on the loop's thread.

The first `SKIP_STEPS` steps (workers starting, allocator and cuDNN warm-up, numba compiling FFCV's pipeline) and one
profiler warm-up step are not recorded; then N steps are. Rank 0 only. The trace is written when the N steps are done
(or when the run ends first) into `RUN/profile/`: `rank0.<time>.pt.trace.json`, which TensorBoard's profiler plugin
(`tensorboard --logdir RUN/profile`) and Chrome's trace viewer (chrome://tracing, ui.perfetto.dev) open, and
`summary.json` with what is printed: the top operators by self time and the share of the profiled wall time the
loop waited for data (the log's data_wait_pct over those steps).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function, schedule, tensorboard_trace_handler

NAME_WIDTH = 44  # an operator's name in the printed table is cut to this (the summary keeps it whole)
SKIP_STEPS = 2  # steps of a run before the profiler warms up (start-up costs, not the steady state)
TOP_OPERATORS = 12


class StepProfiler:
    """A torch.profiler session over steps SKIP_STEPS + 1 .. SKIP_STEPS + steps of this invocation."""

    def __init__(self, run_dir: Path, steps: int):
        self.folder = Path(run_dir) / "profile"
        self.steps = steps
        self.cuda = torch.cuda.is_available() and torch.cuda.is_initialized()  # the model is on the GPU by now
        self.first = SKIP_STEPS + 1  # the step count (this invocation) at which recording starts
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        if not self.cuda:  # kineto logs a spurious "gpuGetDeviceCount failed" ERROR on a machine without a GPU
            os.environ.setdefault("KINETO_LOG_LEVEL", "5")
        self.prof = profile(activities=activities,
                            schedule=schedule(skip_first=SKIP_STEPS, wait=0, warmup=1, active=steps, repeat=1),
                            on_trace_ready=self._ready)
        self.done_steps = 0  # steps issued since the profiler started
        self.wait_s = self.compute_s = 0.0  # over the recorded steps, the loop's own clocks
        self._t = time.perf_counter()
        self._range = None
        self.trace: Path | None = None
        self.summary: dict | None = None
        self.prof.start()

    @property
    def recording(self) -> bool:
        return self.first <= self.done_steps < self.first + self.steps and self.summary is None

    def waiting(self) -> None:
        """The loop starts waiting for its next batch."""
        self._t = time.perf_counter()
        if self.recording:
            self._range = record_function("data_wait")
            self._range.__enter__()

    def data_ready(self) -> None:
        """The batch arrived: the wait ends, the step starts."""
        now = time.perf_counter()
        if self._range is not None:
            self._range.__exit__(None, None, None)
            self._range = None
            self.wait_s += now - self._t
        self._t = now

    def step_done(self) -> None:
        """A step was issued (the loop's `count`): the profiler's step boundary."""
        now = time.perf_counter()
        if self.recording:
            self.compute_s += now - self._t
        self._t = now
        self.done_steps += 1
        if self.summary is None:
            self.prof.step()  # after the last recorded step this writes the trace (`_ready`)

    def close(self) -> None:
        """The run ends: a profile cut short by the run's end is written with the steps it has."""
        if self._range is not None:
            self._range.__exit__(None, None, None)
            self._range = None
        if self.summary is None:
            self.prof.stop()  # in the recording phase: writes the trace; before it: nothing
            if self.summary is None:
                print(f"profile: the run ended after {self.done_steps} step(s), before the profiled steps "
                      f"{self.first + 1}..{self.first + self.steps}: no trace", flush=True)

    # -- the trace is ready ------------------------------------------------------------------------------------
    def _ready(self, prof) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tensorboard_trace_handler(str(self.folder), worker_name="rank0")(prof)
        traces = sorted(self.folder.glob("rank0.*.pt.trace.json"), key=lambda p: p.stat().st_mtime)
        self.trace = traces[-1] if traces else None
        recorded = max(0, min(self.steps, self.done_steps - self.first))  # complete recorded steps
        self.summary = summarise(prof, recorded, self.wait_s, self.compute_s, self.cuda, self.trace)
        (self.folder / "summary.json").write_text(json.dumps(self.summary, indent=2) + "\n")
        print(summary_text(self.summary), flush=True)


def summarise(prof, steps: int, wait_s: float, compute_s: float, cuda: bool, trace: Path | None) -> dict:
    """The top operators by self time (CUDA time on a GPU, else CPU time) and the data-wait share."""
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if e.key != "data_wait" and not e.key.startswith("ProfilerStep")]
    total_us = sum(getattr(e, key) for e in events) or 1.0
    top = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:TOP_OPERATORS]
    wall = wait_s + compute_s
    return {
        "steps": steps, "trace": str(trace) if trace else None, "device_time": cuda,
        "data_wait_pct": 100 * wait_s / wall if wall > 0 else None, "wall_seconds": wall,
        "data_wait_seconds": wait_s,
        "top_operators": [{"name": e.key, "calls": e.count, "self_ms": getattr(e, key) / 1e3,
                           "self_pct": 100 * getattr(e, key) / total_us,
                           "self_cpu_ms": e.self_cpu_time_total / 1e3} for e in top],
    }


def summary_text(s: dict) -> str:
    clock = "self CUDA" if s["device_time"] else "self CPU"
    lines = [f"profile of {s['steps']} step(s): trace {s['trace']} (tensorboard --logdir {Path(s['trace']).parent} "
             "or chrome://tracing)" if s["trace"] else f"profile of {s['steps']} step(s): no trace written",
             f"  data wait: {s['data_wait_pct']:.1f} % of {s['wall_seconds']:.2f} s (the loop waiting for its "
             f"loader)" if s["data_wait_pct"] is not None else "  data wait: no step was recorded",
             f"  {'operator':<{NAME_WIDTH}} {'calls':>7} {clock + ' ms':>13} {'share':>6}"]
    for op in s["top_operators"]:
        name = op["name"][:NAME_WIDTH]
        lines.append(f"  {name:<{NAME_WIDTH}} {op['calls']:>7} {op['self_ms']:>13.1f} {op['self_pct']:>5.1f}%")
    return "\n".join(lines)
