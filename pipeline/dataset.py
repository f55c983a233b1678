"""Instance index: which file is instance i, stable across runs and backends.

Instance ids are the positions of the sorted relative paths (POSIX separators, sorted as Python sorts str), so
the same folder gives the same ids to the torch, FFCV and DALI backends, on every machine. The manifest
(`instance_id<TAB>label<TAB>path`) records the mapping; it is written into every run folder and beside every
.beton file.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
MANIFEST_HEADER = ("instance_id", "label", "path")


class DataError(ValueError):
    """Bad input data: the message names the file or folder."""


@dataclass(frozen=True)
class InstanceIndex:
    """The instance table of a data set.

    root:    folder the paths are relative to.
    paths:   relative POSIX paths, sorted; instance i is paths[i].
    labels:  int64 [N] class labels (-1 when unknown), used only for evaluation.
    classes: class names, label k is classes[k].
    skipped: relative paths of files that were ignored while scanning (not images by extension, or empty files).
    """

    root: Path
    paths: tuple[str, ...]
    labels: np.ndarray
    classes: tuple[str, ...]
    skipped: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.paths)

    def abspath(self, i: int) -> str:
        return os.path.join(self.root, self.paths[i])

    def subset(self, n: int) -> InstanceIndex:
        """The first n instances (ids keep their meaning: they are still 0..n-1)."""
        return InstanceIndex(self.root, self.paths[:n], self.labels[:n], self.classes, self.skipped)

    def write_manifest(self, path: str | os.PathLike, ids=None) -> None:
        """`instance_id<TAB>label<TAB>path` of every instance (or of `ids`), written atomically: the one writer of
        the format (run folders, .beton sidecars)."""
        tmp = f"{path}.tmp"
        ids = range(len(self.paths)) if ids is None else [int(i) for i in ids]
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, delimiter="\t", lineterminator="\n")
            w.writerow(MANIFEST_HEADER)
            for i in ids:
                w.writerow((i, int(self.labels[i]), self.paths[i]))
        os.replace(tmp, path)


def beton_sidecars(beton: str | os.PathLike) -> dict[str, Path]:
    """The files that accompany OUT.beton (written by pipeline.convert_ffcv, read by pipeline.ffcv_backend)."""
    return {"manifest": Path(f"{beton}.manifest.tsv"), "rejects": Path(f"{beton}.rejects.tsv"),
            "info": Path(f"{beton}.json")}


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def scan_folder(root: str | os.PathLike) -> InstanceIndex:
    """ImageNet layout: root/<class>/**/<image>. Files directly under root get label -1 (unlabelled).

    Files that are not images by extension, and empty files, are skipped and listed in `skipped`; whether an
    image file actually decodes is checked when it is read (see `decode_rgb`).
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder does not exist: {root}")
    if not root.is_dir():
        raise DataError(f"data path is not a folder: {root}")
    paths: list[str] = []
    skipped: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            full = os.path.join(dirpath, name)
            rel = Path(os.path.relpath(full, root)).as_posix()
            if not _is_image_name(name) or os.path.getsize(full) == 0:
                skipped.append(rel)
                continue
            paths.append(rel)
    if not paths:
        raise DataError(f"no images found under {root} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    paths.sort()
    classes = sorted({p.split("/", 1)[0] for p in paths if "/" in p})
    class_to_label = {c: k for k, c in enumerate(classes)}
    labels = np.array([class_to_label.get(p.split("/", 1)[0], -1) if "/" in p else -1 for p in paths], np.int64)
    return InstanceIndex(root, tuple(paths), labels, tuple(classes), tuple(sorted(skipped)))


def read_file_list(list_file: str | os.PathLike, root: str | os.PathLike | None = None) -> InstanceIndex:
    """A file list: one image per line, `relpath` or `relpath<TAB or space>label`; or a manifest TSV we wrote.

    Paths are relative to `root` (default: the list's folder). Ids are still assigned by sorted path, so a
    shuffled list gives the same ids as the folder it came from.
    """
    list_file = Path(list_file)
    if not list_file.is_file():
        raise DataError(f"file list does not exist: {list_file}")
    root = Path(root) if root is not None else list_file.parent
    entries: dict[str, int] = {}
    what = "an image, not a folder or a file list" if _is_image_name(list_file.name) else \
        "an FFCV .beton: add --data.backend=ffcv" if list_file.suffix == ".beton" else ""
    if what:
        raise DataError(f"{list_file} is {what}")
    try:
        with open(list_file, encoding="utf-8") as f:
            lines = [ln.rstrip("\n") for ln in f]
    except UnicodeDecodeError:
        raise DataError(f"{list_file} is neither a folder nor a file list (a text file with one `relpath [label]` "
                        f"per line, or a manifest.tsv): it is not UTF-8 text") from None
    if lines and tuple(lines[0].split("\t")) == MANIFEST_HEADER:
        for n, ln in enumerate(lines[1:], start=2):
            if not ln.strip():
                continue
            parts = ln.split("\t")
            if len(parts) != 3:
                raise DataError(f"{list_file}:{n}: expected 3 tab-separated columns, got {len(parts)}")
            entries[parts[2]] = int(parts[1])
    else:
        for n, ln in enumerate(lines, start=1):
            if not ln.strip() or ln.lstrip().startswith("#"):
                continue
            parts = ln.split("\t") if "\t" in ln else ln.rsplit(maxsplit=1)
            label = -1
            if len(parts) == 2:
                try:
                    label = int(parts[1])
                except ValueError:
                    parts = [ln]  # a path with a space in it and no label
            rel = parts[0].strip()
            if rel in entries:
                raise DataError(f"{list_file}:{n}: duplicate path {rel!r}")
            entries[rel] = label
    if not entries:
        raise DataError(f"file list is empty: {list_file}")
    missing = [p for p in entries if not (root / p).is_file()]
    if missing:
        raise DataError(f"{len(missing)} file(s) in {list_file} do not exist under {root}, e.g. {missing[0]!r}")
    paths = sorted(entries)
    labels = np.array([entries[p] for p in paths], np.int64)
    n_classes = int(labels.max()) + 1 if labels.size else 0
    return InstanceIndex(root, tuple(paths), labels, tuple(str(k) for k in range(n_classes)))


def load_index(path: str | os.PathLike, root: str | os.PathLike | None = None) -> InstanceIndex:
    """A folder (ImageNet layout) or a file list."""
    p = Path(path)
    if p.is_file():
        return read_file_list(p, root)
    return scan_folder(p)
