"""A run's instance index on disk, and the proof that a resumed run trains on the same data.

A run folder holds `manifest.tsv` (instance_id, label, path: which file is instance i) and, for a scanned folder,
`manifest.stat.npy` (uint64 [N]: each file's size and modification time when the run started; see
`pipeline.dataset.file_stat`). Every checkpoint records a digest of the index's paths (`pipeline.digest.index_digest`).

A resume trains on the run's own manifest, never on a fresh scan: an id keeps its meaning (its bank row, its place
in the schedule) whatever happened to the folder since. `resume_index` compares the manifest with the folder as it
is now (one scan, what a fresh start costs) and:

* refuses a manifest that does not belong to the checkpoint (its digest differs), naming the first paths that
  differ;
* treats a file gone since (deleted, renamed, or moved away) as undecodable: replaced by the next image of its
  unit, named in bad_files.tsv, like every bad file;
* treats a file whose size or modification time changed (replaced under its name) the same way. Limits: a file
  rewritten with the same size and its old mtime (`touch -r`, some restores) is not seen; when most files' mtimes
  changed (a copy without `-p`/`-a`) mtimes say nothing, so only sizes are compared (with a note); a file list's
  files are not stat-ed when the run starts (10⁹ stats on a network disk), so with a file list only files gone
  are seen;
* leaves files added since untrained (one note): they have no id in this run;
* refuses data that hold fewer than half of the manifest's files unchanged (another data set under similar names).

Scale: the digest is one pass over the path bytes (SHA-1, hardware-accelerated on current x86; not a security
device) into at most 4,096 block hashes, so a checkpoint carries ~200 KB however large N, and a mismatch is located
to a block (to the path when N <= 4,096). Comparing two sorted path tables is one numba merge over their bytes;
nothing builds N Python strings.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numba import njit

from pipeline.dataset import MANIFEST_HEADER, DataError, InstanceIndex, PathTable, _Rows, _sorted_table
from pipeline.digest import DIGEST_VERSION, digest_difference

MANIFEST = "manifest.tsv"
STATS = "manifest.stat.npy"
CLASSES = "manifest.classes.json"
_LOW = np.uint64(0xFFFFFFFF)


# ============ writing and reading ============

def write_run_manifest(index: InstanceIndex, run_dir: Path) -> None:
    """manifest.tsv and, when the index has them, the files' stats (manifest.stat.npy), each written atomically."""
    stats = run_dir / STATS
    if index.stats is None:
        stats.unlink(missing_ok=True)
    else:
        tmp = run_dir / f"{STATS}.tmp"
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(index.stats, np.uint64))
        os.replace(tmp, stats)
    index.write_manifest(run_dir / MANIFEST)
    # the class names of its label numbers: a class folder added or removed later renumbers a new scan's classes
    tmp = run_dir / f"{CLASSES}.tmp"
    tmp.write_text(json.dumps(list(index.classes)), encoding="utf-8")
    os.replace(tmp, run_dir / CLASSES)


def read_manifest(path: Path, root: Path) -> InstanceIndex:
    """A manifest.tsv written by `InstanceIndex.write_manifest` (ids 0..N-1 in order, paths sorted), with the
    stats beside it when there are (N of them). Paths are relative to `root`. csv handles quoted paths."""
    rows = _Rows()
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        if tuple(next(reader, ())) != MANIFEST_HEADER:
            raise DataError(f"{path}: not a manifest (first line must be {'<TAB>'.join(MANIFEST_HEADER)})")
        for i, row in enumerate(reader):
            if len(row) != 3 or row[0] != str(i):
                raise DataError(f"{path}:{i + 2}: expected instance id {i}, a label and a path, got {row!r}")
            rows.add(row[2], int(row[1]))
    paths, labels, _, _ = _sorted_table(rows, sort=False)
    buf, off = paths.raw()
    if (bad := _first_unsorted(buf, off)) >= 0:
        raise DataError(f"{path}:{bad + 3}: paths are not in sorted order ({paths[bad]!r} then {paths[bad + 1]!r}): "
                        f"not a manifest written by this program")
    stats_file = path.with_name(STATS)
    stats = np.load(stats_file) if stats_file.is_file() else None
    if stats is not None and len(stats) != len(paths):
        stats = None  # from another index: unusable
    return InstanceIndex(root, paths, labels, (), (), stats)


# ============ comparing two sorted path tables ============

@njit(cache=True)
def _compare(buf_a, a0, a1, buf_b, b0, b1) -> int:
    """-1, 0, 1: bytes a0:a1 of buf_a against b0:b1 of buf_b (byte order = Python's str order)."""
    la, lb = a1 - a0, b1 - b0
    for k in range(min(la, lb)):
        x, y = buf_a[a0 + k], buf_b[b0 + k]
        if x != y:
            return -1 if x < y else 1
    return (la > lb) - (la < lb)


@njit(cache=True)
def _merge(buf_a, off_a, buf_b, off_b, pos):
    """pos[i] = j where path i of a is path j of b, else -1 (both tables sorted)."""
    na, nb = len(off_a) - 1, len(off_b) - 1
    i = j = 0
    while i < na:
        c = 1 if j >= nb else _compare(buf_a, off_a[i], off_a[i + 1], buf_b, off_b[j], off_b[j + 1])
        if c == 0:
            pos[i] = j
            i += 1
            j += 1
        elif c < 0 or j >= nb:
            pos[i] = -1
            i += 1
        else:
            j += 1


@njit(cache=True)
def _first_unsorted(buf, off) -> int:
    """The first i with path i >= path i+1 (not strictly increasing), or -1."""
    for i in range(len(off) - 2):
        if _compare(buf, off[i], off[i + 1], buf, off[i + 1], off[i + 2]) >= 0:
            return i
    return -1


def match_paths(a: PathTable, b: PathTable) -> np.ndarray:
    """int64 [len(a)]: the position in `b` of every path of `a`, -1 where `b` has none (both sorted)."""
    pos = np.empty(len(a), np.int64)
    (buf_a, off_a), (buf_b, off_b) = a.raw(), b.raw()
    _merge(buf_a, off_a, buf_b, off_b, pos)
    return pos


# ============ the resume ============

@dataclass
class IndexResume:
    """What a resume trains on: the manifest's index, the ids to treat as undecodable (id -> reason) and the notes
    to print (rank 0)."""

    index: InstanceIndex
    manifest: Path | None = None  # the manifest read (None: the data as they are now, with no manifest to read)
    bad: dict[int, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def resume_index(run_dir: Path, current: InstanceIndex, saved_digest: dict | None, key: str = "data.path",
                 data: str = "", fixed_ids: bool = False, subset: bool = False) -> IndexResume:
    """The index a run resumed from a checkpoint of `run_dir` trains on.

    current: the data as they are now (the folder scanned, the list read, the .beton's sidecars). saved_digest:
    the checkpoint's `index_digest` (None, or of another DIGEST_VERSION: not compared). fixed_ids: the data's ids
    cannot be remapped (a .beton, whose samples carry their ids): the manifest must equal it. subset: data.subset
    is set (files after the manifest's last path are not new: they were never in the subset).
    """
    manifest = run_dir / MANIFEST
    if saved_digest is not None and saved_digest.get("version") != DIGEST_VERSION:
        saved_digest = None  # hashed another way (another version of this program): not comparable
    if not manifest.is_file():
        # nothing to resume from but the data as they are: only when they are provably the checkpoint's
        if saved_digest is not None and (why := digest_difference(saved_digest, current.paths, key)):
            raise DataError(f"{manifest} (the run's instance index) is missing and {key}={data} is not the data the "
                            f"checkpoint was trained on ({why}): ids would change meaning; restore the manifest, or "
                            f"start a new run")
        return IndexResume(current)
    old = read_manifest(manifest, current.root)
    if saved_digest is not None and (why := digest_difference(saved_digest, old.paths)):
        raise DataError(f"{manifest} does not belong to the checkpoint ({why}): resume a run from its own folder's "
                        f"checkpoint, or start a new run")
    classes = current.classes  # a run written before the class names were kept beside the manifest: as scanned now
    if (run_dir / CLASSES).is_file():
        classes = tuple(json.loads((run_dir / CLASSES).read_text(encoding="utf-8")))
    old = InstanceIndex(current.root, old.paths, old.labels, classes, current.skipped, old.stats)
    if old.paths == current.paths and old.stats is None:
        return IndexResume(old, manifest)
    pos = match_paths(old.paths, current.paths)
    present = np.flatnonzero(pos >= 0)
    if fixed_ids and (present.size != len(old) or len(current) != len(old)):
        i = int(np.flatnonzero(pos != np.arange(len(old)))[0]) if (pos != np.arange(len(old))).any() else len(old)
        here = current.paths[i] if i < len(current) else "nothing"
        there = old.paths[i] if i < len(old) else "nothing"
        raise DataError(f"{key}={data} is not the data the run started on: instance {i} is {here!r} there but "
                        f"{there!r} in {manifest}; resume with the .beton the run started on, or start a new run")
    gone = np.flatnonzero(pos < 0)
    changed, by_size_only = _changed(old.stats, current.stats, present, pos)
    if 2 * (present.size - changed.size) < len(old):  # most of the run's files gone: another data set
        lost = int(gone[0]) if gone.size else int(changed[0])
        raise DataError(f"{key}={data} holds {present.size - changed.size:,} of the {len(old):,} files of {manifest} "
                        f"unchanged (e.g. {old.paths[lost]!r} is {'gone' if gone.size else 'replaced'}): not the data "
                        f"the run started on; point {key} at them, or start a new run")
    res = IndexResume(old, manifest)
    res.bad = dict.fromkeys(gone.tolist(), f"gone since the run started (not in {key} any more; its id is the "
                                           f"run's {MANIFEST})")  # one reason string for all
    res.bad.update(dict.fromkeys(changed.tolist(), f"replaced since the run started (its size or modification time "
                                                   f"is not the one in {STATS})"))
    new = np.ones(len(current), bool)
    new[pos[present]] = False
    if subset:  # only what sorts before the manifest's last path would have been in the subset
        new[int(pos[present[-1]]) + 1:] = False
    res.notes += _resume_notes(len(old), len(gone), len(changed), current.paths, np.flatnonzero(new), by_size_only)
    return res


def _changed(old: np.ndarray | None, now: np.ndarray | None, present: np.ndarray, pos: np.ndarray
             ) -> tuple[np.ndarray, bool]:
    """Ids (of `present`) whose stats differ, and whether only sizes were compared (most mtimes differ: a copy)."""
    if old is None or now is None or present.size == 0:
        return np.zeros(0, np.int64), False
    a, b = old[present], now[pos[present]]
    size_differs = (a >> np.uint64(32)) != (b >> np.uint64(32))
    mtime_differs = (a & _LOW) != (b & _LOW)
    by_size_only = 2 * int(mtime_differs.sum()) > present.size
    return present[size_differs if by_size_only else size_differs | mtime_differs], by_size_only


def _resume_notes(n: int, gone: int, changed: int, paths: PathTable, new: np.ndarray, by_size_only: bool
                  ) -> list[str]:
    notes = []
    if gone or changed:
        what = " and ".join(x for x in (f"{gone} file(s) gone" if gone else "",
                                         f"{changed} replaced" if changed else "") if x)
        notes.append(f"note: resumed on the run's {MANIFEST} ({n:,} instances): {what} since the run started, "
                     f"each replaced by the next image of its epoch like an undecodable one (bad_files.tsv)")
    if by_size_only:
        notes.append(f"note: most files' modification times differ from {STATS} (the data were copied without "
                     f"keeping them?): files were compared by size only")
    if new.size:
        notes.append(f"note: {new.size} file(s) added since the run started are not trained on (ids are the run's "
                     f"{MANIFEST}), e.g. {paths[int(new[0])]!r}; a new run would include them")
    return notes
