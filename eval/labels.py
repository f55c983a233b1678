"""Evaluation labels by class name, in the training set's numbering.

Every folder (or .beton, or file list) numbers its own classes, so a validation folder that lacks a training class,
or has one more, would shift every later label. An evaluation therefore maps each image's class *name* through the
training set's classes: an image of a class the training set lacks can be neither a neighbour's label nor a linear
probe's output, so it is left out and counted; an image without a label is left out everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.dataset import InstanceIndex


@dataclass(frozen=True)
class AlignedLabels:
    """labels: int64 [M], each image's label in the training set's numbering; -1 = left out (unlabelled, or a class
    the training set lacks)."""

    labels: np.ndarray
    unlabelled: int
    unknown: int  # labelled with a class the training set lacks
    unknown_classes: tuple[str, ...]

    @property
    def kept(self) -> np.ndarray:
        return np.flatnonzero(self.labels >= 0)

    def note(self, what: str) -> str:
        """One line naming what was left out ("" when nothing was)."""
        parts = []
        if self.unknown:
            shown = ", ".join(self.unknown_classes[:3]) + (", ..." if len(self.unknown_classes) > 3 else "")
            parts.append(f"{self.unknown} of {len(self.unknown_classes)} class(es) the training set lacks ({shown})")
        if self.unlabelled:
            parts.append(f"{self.unlabelled} without a label")
        return f"note: {what}: left out {' and '.join(parts)}" if parts else ""


def align_labels(train_classes: tuple[str, ...], index: InstanceIndex) -> AlignedLabels:
    """index's labels re-numbered by class name through `train_classes`."""
    to_train = {c: k for k, c in enumerate(train_classes)}
    table = np.array([to_train.get(c, -1) for c in index.classes] + [-1], np.int64)  # [-1]: unlabelled
    own = np.where(index.labels >= 0, index.labels, len(index.classes))
    labels = table[own]
    unlabelled = int((index.labels < 0).sum())
    unknown_mask = (labels < 0) & (index.labels >= 0)
    unknown_classes = tuple(index.classes[c] for c in np.unique(index.labels[unknown_mask]).tolist())
    return AlignedLabels(labels, unlabelled, int(unknown_mask.sum()), unknown_classes)
