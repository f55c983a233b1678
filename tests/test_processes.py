"""No test leaves a process behind: a test that fails, or that pytest-timeout stops, while its children run (torchrun
and its ranks, which live in sessions of their own; a grandchild in a session of its own) ends with all of them
killed and gone. Checked on an inner pytest run of two such tests."""

from __future__ import annotations

import json
import os
import sys

from conftest import ROOT

from benchmarks.process_tree import marked

INNER = '''
import json, os, subprocess, sys, time
from pathlib import Path

import pytest
from conftest import free_port, processes, wait_until  # noqa: F401 - the fixture under test

RECORD = Path(os.environ["RECORD"])


def record(tree, at_least):
    wait_until(lambda: len(tree.members()) >= at_least, f"{at_least} processes")
    with RECORD.open("a") as f:
        f.write(json.dumps({"mark": tree.id, "pids": tree.members()}) + "\\n")


def test_fails_while_its_torchrun_job_runs(processes):
    processes.popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--no-python",
                     "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "sleep", "600"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    record(processes, 3)  # torchrun and its 2 ranks
    assert False, "a failure while the job runs"


@pytest.mark.timeout(20)
def test_is_stopped_by_the_timeout_while_a_grandchild_runs_in_a_session_of_its_own(processes):
    processes.popen([sys.executable, "-c", "import subprocess, time; "
                     "subprocess.Popen(['sleep', '600'], start_new_session=True); time.sleep(600)"])
    record(processes, 2)
    time.sleep(600)
'''


def test_a_failing_or_timed_out_test_leaves_no_process_behind(processes, tmp_path):
    inner, record = tmp_path / "test_inner.py", tmp_path / "record.jsonl"
    inner.write_text(INNER)
    r = processes.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(inner)], timeout=600,
                      capture_output=True, text=True, cwd=tmp_path,
                      env={**os.environ, "RECORD": str(record), "PYTHONPATH": f"{ROOT / 'tests'}:{ROOT}"})
    assert "2 failed" in r.stdout and "Timeout" in r.stdout + r.stderr, r.stdout[-3000:] + r.stderr[-2000:]
    trees = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    assert [len(t["pids"]) >= n for t, n in zip(trees, (3, 2), strict=True)] == [True, True], trees
    for t in trees:
        assert marked(t["mark"]) == [], f"left behind: {t}"
