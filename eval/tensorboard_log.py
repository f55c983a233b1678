"""TensorBoard scalars of a run (`--run.tensorboard=true`), written beside log.jsonl into the run folder.

    tensorboard --logdir runs            # every run of the folder side by side

The `tensorboard` package is an optional extra (`pip install 'pic[tensorboard]'`); without it a run that asks for
TensorBoard stops at start-up with one line saying what to install, and every other run does not import it.
"""

from __future__ import annotations

from pathlib import Path

from config import ConfigError

# log.jsonl key -> TensorBoard tag
TRAIN_TAGS = {"loss": "train/loss", "lr": "train/lr", "img_s": "train/images_per_s",
              "data_wait_pct": "train/data_wait_pct", "nonfinite": "train/nonfinite_losses"}
MONITOR_TAGS = {"knn_top1": "monitor/knn_top1_pct", "retrieval_top1": "monitor/retrieval_top1_pct",
                "seconds": "monitor/seconds"}


def require() -> None:
    """A one-line ConfigError when the tensorboard package is missing (checked before any work is done)."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ConfigError("run.tensorboard=true needs the tensorboard package: pip install 'pic[tensorboard]' "
                          "(or pip install tensorboard), or leave run.tensorboard off") from None


class Scalars:
    """A SummaryWriter over the run folder that takes log.jsonl records."""

    def __init__(self, run_dir: Path):
        require()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir))

    def write(self, record: dict, tags: dict[str, str], step: int) -> None:
        for key, tag in tags.items():
            if key in record:
                self.writer.add_scalar(tag, float(record[key]), global_step=step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the run folder's event files: tag -> [(step, value)] (tensorboard's own reader)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
