"""train.py with test hooks, run as a script (a test's child process, or one rank of a job):

    python tests/hooked_train.py --config=...      # environment:
        BLOCK_ON=img_040.jpg    decoding that file blocks (a loader stuck on a dead network mount)
        BLOCK_AFTER=20          the 20th decode of this process blocks instead
        BLOCK_RANK=1            ... on that rank only (RANK, as torchrun sets it)
        BLOCKED_MARK=/path      a file written when the decode blocks: the test then knows where the loop waits
        STEP_SLEEP=0.2          every step sleeps first, so that a test can signal or kill it mid-run

The block is a sleep, which a signal's handler interrupts as it would a read from a hung mount.
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import model.step as step_module  # noqa: E402
import pipeline.decode as decode_module  # noqa: E402
import pipeline.torch_backend as torch_backend  # noqa: E402

BLOCK_ON, BLOCK_AFTER = os.environ.get("BLOCK_ON"), int(os.environ.get("BLOCK_AFTER", "0"))
BLOCK_HERE = os.environ.get("BLOCK_RANK", os.environ.get("RANK", "0")) == os.environ.get("RANK", "0")
STEP_SLEEP = float(os.environ.get("STEP_SLEEP", "0"))
real_decode, real_step = decode_module.decode_rgb, step_module.TrainStep.__call__
decodes = 0


def decode(path, *args, **kwargs):
    global decodes
    decodes += 1
    if BLOCK_HERE and ((BLOCK_ON and str(path).endswith(BLOCK_ON)) or decodes == BLOCK_AFTER):
        if os.environ.get("BLOCKED_MARK"):
            Path(os.environ["BLOCKED_MARK"]).write_text(str(path))
        time.sleep(3600)
    return real_decode(path, *args, **kwargs)


def step(self, *args, **kwargs):
    time.sleep(STEP_SLEEP)
    return real_step(self, *args, **kwargs)


decode_module.decode_rgb = torch_backend.decode_rgb = decode
step_module.TrainStep.__call__ = step

import train  # noqa: E402

if __name__ == "__main__":
    sys.exit(train.main(sys.argv[1:]))
