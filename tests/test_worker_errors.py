"""An exception inside a data worker (a DataLoader process, a DALI or FFCV thread) ends the run with the error, in
seconds, exit != 0: the workers are torn down on every exit path (a worker that ignores SIGTERM, as ours do, would
otherwise keep multiprocessing's exit handler waiting for it forever)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, write_id_folder

from pipeline import backend_unavailable

BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(bool(backend_unavailable(b)), reason=backend_unavailable(b)))
            for b in ("torch", "torch-gpu", "memory", "ffcv", "dali")]

# train.main() in a child whose data worker raises: BOOM names the backend, BOOM_MARK a file that gets the time of
# each raise (so the test measures from the error, not from a start-up that a loaded machine makes slow)
CHILD = r"""
import os, sys, time
sys.path.insert(0, {root!r})

def boom(*args, **kwargs):
    with open(os.environ["BOOM_MARK"], "a") as f:
        f.write(f"{{time.time()}}\n")
    raise RuntimeError("boom in a data worker")

backend = os.environ["BOOM"]
if backend in ("torch", "memory"):  # their DataLoader workers decode with it
    import pipeline.decode
    pipeline.decode.decode_rgb = boom
elif backend == "torch-gpu":  # its workers read the bytes
    import pipeline.torch_gpu_backend
    pipeline.torch_gpu_backend.RawBytes.__getitem__ = boom
elif backend == "dali":  # the external source, run by DALI's thread
    import pipeline.dali_backend
    pipeline.dali_backend.EpochSource._checked_bytes = boom
elif backend == "ffcv":  # FFCV's loader thread
    import ffcv.loader.epoch_iterator
    ffcv.loader.epoch_iterator.EpochIterator.run = boom
import train
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_exception_in_a_data_worker_ends_the_run_within_seconds(backend, tmp_path):
    folder = write_id_folder(tmp_path / "d", n=32, classes=1)
    data = str(folder)
    if backend == "ffcv":
        from pipeline.convert_ffcv import ConvertSettings, convert

        data = str(tmp_path / "d.beton")
        convert(str(folder), data, ConvertSettings(max_resolution=40, write_mode="raw", workers=1))
    mark = tmp_path / "raised"
    args = [f"--data.path={data}", f"--data.backend={backend}", "--data.workers=2", "--data.batch_size=8",
            "--data.image_size=16", "--model.arch=tiny", "--model.head_hidden=32", "--model.dim=16",
            "--optim.epochs=2", "--run.eval=none", "--run.monitor_every=0", "--run.device=cpu", "--run.threads=1",
            f"--run.out_dir={tmp_path}"]
    proc = subprocess.Popen([sys.executable, "-c", CHILD.format(root=str(ROOT)), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "BOOM": backend, "BOOM_MARK": str(mark)})
    try:
        deadline = time.time() + 180  # start-up (imports, a DALI pipeline, FFCV's compile) on a loaded machine
        while not mark.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert mark.exists(), "the hook never raised"
        out, _ = proc.communicate(timeout=60)  # without the teardown: forever (the workers are never joined)
        ended = time.time()
        raised = float(mark.read_text().split()[0])
        assert proc.returncode not in (0, None) and "boom in a data worker" in out, out[-3000:]
        assert ended - raised < 30, f"the process took {ended - raised:.0f} s to end after the error"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the process group: the child and its DataLoader workers
        proc.communicate()
