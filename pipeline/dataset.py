"""Instance index: which file is instance i, stable across runs and backends.

Instance ids are the positions of the sorted relative paths (POSIX separators, sorted as Python sorts str), so
the same folder gives the same ids to the torch, FFCV and DALI backends, on every machine. The manifest
(`instance_id<TAB>label<TAB>path`) records the mapping; it is written into every run folder and beside every
.beton file.
"""

from __future__ import annotations

import bisect
import csv
import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
MANIFEST_HEADER = ("instance_id", "label", "path")


class DataError(ValueError):
    """Bad input data: the message names the file or folder."""


class PathTable(Sequence):
    """An immutable sequence of str (the relative paths), stored as one UTF-8 byte buffer and int64 offsets.

    About (mean path length + 8) bytes a path (ImageNet: ~38 B) instead of ~90 B for a Python str in a tuple, and
    two numpy arrays instead of N Python objects: it pickles as two buffers (DataLoader workers, spawn) and a fork
    does not copy it page by page the way reference counts copy a tuple of N str. `table[i]` decodes one path;
    `table[a:b]` is a view; `table.index(path)` is a binary search (the index keeps its paths sorted).
    """

    __slots__ = ("_buf", "_off")

    def __init__(self, buf: np.ndarray, offsets: np.ndarray):
        self._buf, self._off = buf, offsets  # uint8 [bytes], int64 [n+1] (not necessarily starting at 0: a view)

    @classmethod
    def from_strings(cls, paths) -> PathTable:
        enc = [p.encode("utf-8", "surrogateescape") for p in paths]
        lens = np.fromiter(map(len, enc), np.int64, len(enc))
        off = np.zeros(len(enc) + 1, np.int64)
        np.cumsum(lens, out=off[1:])
        return cls(np.frombuffer(b"".join(enc), np.uint8), off)

    def __len__(self) -> int:
        return len(self._off) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                return PathTable.from_strings([self[j] for j in range(start, stop, step)])
            return PathTable(self._buf, self._off[start:max(start, stop) + 1])
        n = len(self)
        i = int(i)  # numpy integers, ids from tensors
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"path index {i} out of range for {n} paths")
        return self._buf[self._off[i]:self._off[i + 1]].tobytes().decode("utf-8", "surrogateescape")

    def raw(self) -> tuple[np.ndarray, np.ndarray]:
        """(bytes uint8, offsets int64 [n+1]): path i is bytes[offsets[i]:offsets[i+1]] (offsets need not start
        at 0: a slice shares its parent's bytes). For kernels that compare paths without decoding them."""
        return self._buf, self._off

    def tolist(self, start: int = 0, stop: int | None = None) -> list[str]:
        """paths[start:stop] as a list of str, decoded in one go (the fast way to read many)."""
        stop = len(self) if stop is None else min(stop, len(self))
        off = self._off[start:stop + 1]
        if len(off) < 2:
            return []
        raw = self._buf[off[0]:off[-1]].tobytes()
        bounds = (off - off[0]).tolist()
        if raw.isascii():  # byte offsets are character offsets
            text = raw.decode("ascii")
            return [text[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        return [raw[a:b].decode("utf-8", "surrogateescape") for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def __iter__(self):
        for lo in range(0, len(self), 65536):
            yield from self.tolist(lo, lo + 65536)

    def index(self, value, start: int = 0, stop: int | None = None) -> int:
        stop = len(self) if stop is None else stop
        i = bisect.bisect_left(self, value, start, stop)  # the table is sorted (an InstanceIndex keeps it so)
        if i < stop and self[i] == value:
            return i
        for j in range(start, stop):  # not sorted after all (a hand-made table): the plain search
            if self[j] == value:
                return j
        raise ValueError(f"{value!r} is not in the paths")

    def __contains__(self, value) -> bool:
        try:
            self.index(value)
        except ValueError:
            return False
        return True

    def __eq__(self, other) -> bool:
        if isinstance(other, PathTable):
            a, b = self._off, other._off
            return len(a) == len(b) and np.array_equal(np.diff(a), np.diff(b)) and \
                np.array_equal(self._buf[a[0]:a[-1]], other._buf[b[0]:b[-1]])
        if isinstance(other, tuple | list):
            return len(self) == len(other) and all(x == y for x, y in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None

    @property
    def nbytes(self) -> int:
        return int(self._off[-1] - self._off[0]) + self._off.nbytes

    def __repr__(self) -> str:
        head = ", ".join(repr(p) for p in self.tolist(0, 3))
        return f"PathTable([{head}{', ...' if len(self) > 3 else ''}], n={len(self)})"


@dataclass(frozen=True)
class InstanceIndex:
    """The instance table of a data set.

    root:    folder the paths are relative to.
    paths:   relative POSIX paths, sorted (a PathTable; a tuple or list given here is converted); instance i is
             paths[i].
    labels:  int64 [N] class labels (-1 when unknown), used only for evaluation.
    classes: class names, label k is classes[k].
    skipped: relative paths of files that were ignored while scanning (not images by extension, or empty files).
    images:  where the pixels are read: None = the files root/paths[i]; else an object whose `read(i)` returns
             instance i's RGB image and `take(positions)` re-keys it (pipeline.beton.BetonImages: a .beton).
    stats:   uint64 [N] or None: each file's size and modification time when it was scanned (`file_stat`), what
             a resume compares to see a file replaced under its name (pipeline.manifest); None for a file list
             (its files are not stat-ed).
    """

    root: Path
    paths: PathTable
    labels: np.ndarray
    classes: tuple[str, ...]
    skipped: tuple[str, ...] = ()
    stats: np.ndarray | None = None
    images: object | None = None

    def __post_init__(self):
        if not isinstance(self.paths, PathTable):
            object.__setattr__(self, "paths", PathTable.from_strings(self.paths))

    def __len__(self) -> int:
        return len(self.paths)

    @functools.cached_property
    def digest(self) -> dict:
        """`pipeline.digest.index_digest` of the paths (computed once: a checkpoint records it)."""
        from pipeline.digest import index_digest

        return index_digest(self.paths)

    def abspath(self, i: int) -> str:
        return os.path.join(self.root, self.paths[i])

    def subset(self, n: int) -> InstanceIndex:
        """The first n instances (ids keep their meaning: they are still 0..n-1)."""
        images = self.images.take(np.arange(min(n, len(self)))) if self.images is not None else None
        return InstanceIndex(self.root, self.paths[:n], self.labels[:n], self.classes, self.skipped, images=images,
                             stats=None if self.stats is None else self.stats[:n])

    def take(self, positions) -> InstanceIndex:
        """The instances at `positions` (sorted, so they stay in path order), renumbered 0..len-1: a subset to
        evaluate, whose images still come from where this index reads them."""
        pos = np.asarray(positions, np.int64)
        images = self.images.take(pos) if self.images is not None else None
        return InstanceIndex(self.root, PathTable.from_strings(self.paths[int(i)] for i in pos), self.labels[pos],
                             self.classes, (), images=images, stats=None if self.stats is None else self.stats[pos])

    def write_manifest(self, path: str | os.PathLike, ids=None) -> None:
        """`instance_id<TAB>label<TAB>path` of every instance (or of `ids`), written atomically: the one writer of
        the format (run folders, .beton sidecars)."""
        tmp = f"{path}.tmp"
        with open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            w = csv.writer(f, delimiter="\t", lineterminator="\n")
            w.writerow(MANIFEST_HEADER)
            if ids is None:  # in blocks: one decode and one writerows per 65,536 rows
                for lo in range(0, len(self.paths), 65536):
                    paths = self.paths.tolist(lo, lo + 65536)
                    w.writerows(zip(range(lo, lo + len(paths)), self.labels[lo:lo + len(paths)].tolist(), paths,
                                    strict=True))
            else:
                for i in ids:
                    i = int(i)
                    w.writerow((i, int(self.labels[i]), self.paths[i]))
        os.replace(tmp, path)


def beton_sidecars(beton: str | os.PathLike) -> dict[str, Path]:
    """The files that accompany OUT.beton (written by pipeline.convert_ffcv, read by pipeline.ffcv_backend)."""
    return {"manifest": Path(f"{beton}.manifest.tsv"), "rejects": Path(f"{beton}.rejects.tsv"),
            "info": Path(f"{beton}.json")}


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def file_stat(size: int, mtime_ns: int) -> int:
    """A file's identity as far as a stat shows it, in 8 bytes: size mod 2³² in the high half, mtime (ns) mod 2³²
    in the low half. Equality of the two halves is all that is ever asked of them."""
    return ((size & 0xFFFFFFFF) << 32) | (mtime_ns & 0xFFFFFFFF)


# ============ building a sorted table in bounded memory ============

_CHUNK_ROWS = 1 << 20  # paths gathered before they are packed into a fixed-width block
_CHUNK_BYTES = 8 << 20  # bytes of a file list parsed per numpy pass


class _Rows:
    """Collects (path, label[, stat]) rows into fixed-width numpy blocks (`S<width>` + int64 (+ uint64)), so that
    building the index of N paths holds about N·(longest path + 8 (+ 8)) bytes, not N Python objects."""

    def __init__(self, with_stats: bool = False):
        self.with_stats = with_stats
        self.blocks: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []
        self._paths: list[bytes] = []
        self._labels: list[int] = []
        self._stats: list[int] = []

    def add(self, path: str, label: int, stat: int = 0) -> None:
        if "\x00" in path:
            raise DataError(f"path {path!r} holds a NUL character")
        self._paths.append(path.encode("utf-8", "surrogateescape"))
        self._labels.append(label)
        if self.with_stats:
            self._stats.append(stat)
        if len(self._paths) >= _CHUNK_ROWS:
            self.flush()

    def add_block(self, paths: np.ndarray, labels: np.ndarray) -> None:
        self.flush()
        if len(paths):
            self.blocks.append((paths, labels.astype(np.int64, copy=False), None))

    def flush(self) -> None:
        if self._paths:
            stats = np.array(self._stats, np.uint64) if self.with_stats else None
            self.blocks.append((np.array(self._paths, dtype="S"), np.array(self._labels, np.int64), stats))
            self._paths, self._labels, self._stats = [], [], []

    def __len__(self) -> int:
        return sum(len(b[0]) for b in self.blocks) + len(self._paths)


def _sorted_table(rows: _Rows, sort: bool = True) -> tuple[PathTable, np.ndarray, np.ndarray | None, str | None]:
    """(paths sorted bytewise = as Python sorts str, labels and stats (None without) in that order, a duplicated
    path or None). sort=False keeps the rows' order (a manifest, sorted already; `pipeline.manifest` checks it).

    UTF-8 byte order is code point order, so sorting the bytes gives Python's str order. The paths are padded
    with NUL (which no path holds) to a multiple of 8 bytes and sorted as big-endian uint64 words with a stable
    lexsort, faster than an argsort of the `S` array or Python's list sort of str (docs/results.md, the index).
    Peak: the padded matrix, its sorted copy built block by block, and the output table.
    """
    rows.flush()
    n = len(rows)
    width = max((b[0].dtype.itemsize for b in rows.blocks), default=1)
    width = -(-width // 8) * 8
    mat = np.zeros((n, width), np.uint8)
    labels = np.empty(n, np.int64)
    stats = np.empty(n, np.uint64) if rows.with_stats else None
    lo = 0
    while rows.blocks:
        p, lab, st = rows.blocks.pop(0)  # freed as soon as copied
        k = len(p)
        mat[lo:lo + k, :p.dtype.itemsize] = p.view(np.uint8).reshape(k, p.dtype.itemsize)
        labels[lo:lo + k] = lab
        if stats is not None:
            stats[lo:lo + k] = st
        lo += k
    words = mat.view(">u8")
    if sort:
        order = np.lexsort([words[:, j] for j in range(words.shape[1] - 1, -1, -1)])
        labels = labels[order]
        stats = None if stats is None else stats[order]
    else:
        order = np.arange(n)
    bufs, lens, dup, prev = [], [], None, None
    for lo in range(0, n, _CHUNK_ROWS):
        block = mat[order[lo:lo + _CHUNK_ROWS]]
        nz = block != 0
        if dup is None:
            same = (block[1:] == block[:-1]).all(axis=1)
            if prev is not None and (block[0] == prev).all():
                dup = block[0]
            elif same.any():
                dup = block[1 + int(np.flatnonzero(same)[0])]
        prev = block[-1]
        bufs.append(block[nz])
        lens.append(nz.sum(axis=1))
    del mat
    off = np.zeros(n + 1, np.int64)
    np.cumsum(np.concatenate(lens), out=off[1:])
    dup_path = None if dup is None else dup.tobytes().rstrip(b"\x00").decode("utf-8", "surrogateescape")
    return PathTable(np.concatenate(bufs) if bufs else np.zeros(0, np.uint8), off), labels, stats, dup_path


# ============ folders ============

def scan_folder(root: str | os.PathLike) -> InstanceIndex:
    """ImageNet layout: root/<class>/**/<image>. Files directly under root get label -1 (unlabelled).

    Files that are not images by extension, and empty files, are skipped and listed in `skipped`; whether an
    image file actually decodes is checked when it is read (see `decode_rgb`). Hidden files and folders (a name
    starting with ".") are not looked at; symbolic links to folders are followed. One `scandir` entry and, for an
    image name, one `stat` (the empty-file check) per file.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder does not exist: {root}")
    if not root.is_dir():
        raise DataError(f"data path is not a folder: {root}")
    rows, skipped, tops = _Rows(with_stats=True), [], []  # tops: top-level folder names; a label: their position
    stack = [("", -1)]  # (relative folder with a trailing "/", index of its top-level folder in `tops`)
    while stack:
        rel, top = stack.pop()
        with os.scandir(os.path.join(root, rel)) as it:
            for e in it:
                name = e.name
                if name.startswith("."):
                    continue
                if e.is_dir():
                    if top < 0:
                        tops.append(name)
                    stack.append((f"{rel}{name}/", len(tops) - 1 if top < 0 else top))
                elif not _is_image_name(name) or (st := e.stat()).st_size == 0:
                    skipped.append(rel + name)
                else:
                    rows.add(rel + name, top, file_stat(st.st_size, st.st_mtime_ns))
    if not len(rows):
        raise DataError(f"no images found under {root} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    paths, top_of_row, stats, _ = _sorted_table(rows)  # a file system has no duplicate names
    used = np.unique(top_of_row[top_of_row >= 0]).tolist()
    classes = sorted(tops[t] for t in used)  # folders that hold at least one image
    label_of = {c: k for k, c in enumerate(classes)}
    label_of_top = np.array([label_of.get(t, -1) for t in tops] + [-1], np.int64)  # [-1]: files under root
    labels = label_of_top[top_of_row]
    return InstanceIndex(root, paths, labels, tuple(classes), tuple(sorted(skipped)), stats)


# ============ file lists ============

def _parse_list_line(ln: str) -> tuple[str, int | str] | None:
    """One line of a plain file list (not a manifest): (relpath, label) or None for a blank or comment line.

    The label is an integer or a class name (a str). Separated by a tab, whatever follows the path is its label;
    separated by spaces, the last word is the label unless it ends with an image extension (then the line is a
    path with a space in it and no label: a class name never ends with ".jpg")."""
    if not ln.strip() or ln.lstrip().startswith("#"):
        return None
    parts = ln.split("\t") if "\t" in ln else ln.rsplit(maxsplit=1)
    label: int | str = -1
    if len(parts) == 2:
        text = parts[1].strip()
        try:
            label = int(text)
        except ValueError:
            if "\t" not in ln and _is_image_name(text):
                parts = [ln]  # a path with a space in it and no label
            elif text:
                label = text  # a class name
    return parts[0].strip(), label


def _fast_lines(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The common lines of a block of a plain file list, parsed by numpy: `path` or `path label`, printable ASCII,
    no tab, not starting with "#" or a space, the label `-?[0-9]{1,18}` after the last space (exactly what
    `_parse_list_line` returns for such a line). `b` ends with a newline.

    -> (paths S<width> of the fast lines, their labels, start and end offsets of the other lines in `b`).
    """
    ends = np.flatnonzero(b == 10)
    starts = np.empty_like(ends)
    starts[0], starts[1:] = 0, ends[:-1] + 1
    fast = ends > starts
    odd = np.flatnonzero((b < 32) & (b != 10) | (b > 126))  # tab, CR, NUL, non-ASCII, DEL: the Python parser
    if odd.size:
        fast[np.searchsorted(ends, odd)] = False
    first = b[np.minimum(starts, len(b) - 1)]
    fast &= (first != 35) & (first != 32)
    sp = np.flatnonzero(b == 32)
    last = np.searchsorted(sp, ends) - 1
    p = np.where(last >= 0, sp[np.maximum(last, 0)] if sp.size else 0, -1)
    has_sp = fast & (p >= starts)
    pend = np.where(has_sp, p, ends)
    # label = bytes (p, end): optional "-", then 1..18 digits; the byte before the space is not a space
    ls = p + 1
    neg = has_sp & (b[np.minimum(ls, len(b) - 1)] == 45)
    ls = ls + neg
    nd = ends - ls
    ok = ~has_sp | ((nd >= 1) & (nd <= 18) & (b[np.maximum(p - 1, 0)] != 32))
    labels = np.full(len(ends), -1, np.int64)
    lab_rows = np.flatnonzero(has_sp & ok)
    if lab_rows.size:
        m = int(nd[lab_rows].max())
        j = np.arange(m)
        valid = j < nd[lab_rows, None]
        ch = b[np.minimum(ls[lab_rows, None] + j, len(b) - 1)].astype(np.int64) - 48
        digit = (ch >= 0) & (ch <= 9)
        good = (digit | ~valid).all(axis=1)
        ok[lab_rows[~good]] = False
        power = np.where(valid, nd[lab_rows, None] - 1 - j, 0)
        val = np.where(valid & digit, ch, 0) * (10 ** power)
        v = val.sum(axis=1)
        labels[lab_rows] = np.where(neg[lab_rows], -v, v)
    fast &= ok
    rows = np.flatnonzero(fast)
    plen = pend[rows] - starts[rows]
    width = int(plen.max()) if rows.size else 1
    padded = np.concatenate([b, np.zeros(width, np.uint8)])
    paths = np.lib.stride_tricks.sliding_window_view(padded, width)[starts[rows]]  # [rows, width] copy, no index
    paths[np.arange(width) >= plen[:, None]] = 0  # the bytes after each path
    slow = np.flatnonzero(~fast)
    return paths.view(f"S{width}").ravel(), labels[rows], starts[slow], ends[slow]


def _line_of(list_file: Path, rel: str, manifest: bool) -> int:
    """The line number of the second occurrence of `rel` (only for the error message)."""
    seen = 0
    with open(list_file, encoding="utf-8") as f:
        for n, ln in enumerate(f, start=1):
            ln = ln.rstrip("\n")
            if manifest:
                parts = ln.split("\t")
                got = parts[2] if n > 1 and len(parts) == 3 else None
            else:
                parsed = _parse_list_line(ln)
                got = parsed[0] if parsed else None
            if got == rel:
                seen += 1
                if seen == 2:
                    return n
    return 0


_EXIST_SAMPLE = 1024


def _check_list_file(list_file: Path) -> Path:
    """A file list's path, or the error naming what it is instead (missing, an image, a .beton)."""
    if not list_file.is_file():
        raise DataError(f"file list does not exist: {list_file}")
    what = "an image, not a folder or a file list" if _is_image_name(list_file.name) else \
        "an FFCV .beton: add --data.backend=ffcv" if list_file.suffix == ".beton" else ""
    if what:
        raise DataError(f"{list_file} is {what}")
    return list_file


def _list_index(list_file: Path, root: Path, rows: _Rows, names: dict[str, int], numbered: bool,
                manifest: bool) -> InstanceIndex:
    """The index of a parsed file list: sorted, checked (not empty, labels of one kind, no duplicate, the files
    there), class names mapped to labels in sorted order."""
    if not len(rows):
        raise DataError(f"file list is empty: {list_file}")
    if names and numbered:
        raise DataError(f"{list_file}: labels must be all integers or all class names; this list has both (e.g. "
                        f"class {next(iter(names))!r})")
    paths, labels, _, dup = _sorted_table(rows)
    if dup is not None:
        raise DataError(f"{list_file}:{_line_of(list_file, dup, manifest)}: duplicate path {dup!r}")
    n = len(paths)
    sample = range(n) if n <= _EXIST_SAMPLE else np.linspace(0, n - 1, _EXIST_SAMPLE).round().astype(np.int64)
    missing = [paths[int(i)] for i in sample if not (root / paths[int(i)]).is_file()]
    if missing:
        of = f"{len(missing)} file(s)" if n <= _EXIST_SAMPLE else \
            f"{len(missing)} of {_EXIST_SAMPLE} file(s) checked (evenly spaced over {n:,})"
        raise DataError(f"{of} in {list_file} do not exist under {root}, e.g. {missing[0]!r}")
    if names:  # class names: label k is the k-th name in sorted order (as a folder's class folders)
        classes = tuple(sorted(names))
        rank = np.empty(len(names), np.int64)
        rank[list(names.values())] = [classes.index(c) for c in names]  # provisional -> sorted
        labels = np.where(labels >= 0, rank[np.maximum(labels, 0)], -1)
        return InstanceIndex(root, paths, labels, classes)
    n_classes = int(labels.max()) + 1 if labels.size else 0
    return InstanceIndex(root, paths, labels, tuple(str(k) for k in range(n_classes)))


def _list_text(raw: bytes, list_file: Path) -> str:
    """raw decoded, or the error a binary file gets (before any line of its block is looked at)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{list_file} is neither a folder nor a file list (a text file with one `relpath "
                        f"[label]` per line, or a manifest.tsv): it is not UTF-8 text") from None


def read_file_list(list_file: str | os.PathLike, root: str | os.PathLike | None = None) -> InstanceIndex:
    """A file list: one image per line, `relpath` or `relpath<TAB or space>label`; or a manifest TSV we wrote.

    Paths are relative to `root` (default: the list's folder). Ids are still assigned by sorted path, so a
    shuffled list gives the same ids as the folder it came from. Common lines are parsed by numpy in blocks,
    the others (tabs, non-ASCII, comments, a manifest) by `_parse_list_line`. Existence is checked on an evenly
    spaced sample of 1,024 paths (all of them in a shorter list): a wrong root or list is caught at once; a single
    missing file among millions is found when it is read, replaced and named in bad_files.tsv like any
    undecodable image (stat-ing 10⁹ paths on a network file system would take hours).
    """
    list_file = _check_list_file(Path(list_file))
    root = Path(root) if root is not None else list_file.parent
    rows = _Rows()
    manifest = False
    lineno = 0  # lines before the current block
    names: dict[str, int] = {}  # class name -> provisional label (first seen first), sorted at the end
    numbered = [False]  # an integer label was seen (integers and class names do not mix)

    def python_lines(raw: bytes, first_line: int) -> None:
        text = _list_text(raw, list_file)
        # universal newlines, as reading the file in text mode does
        for n, ln in enumerate(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"), start=first_line):
            if manifest:
                if not ln.strip():
                    continue
                parts = ln.split("\t")
                if len(parts) != 3:
                    raise DataError(f"{list_file}:{n}: expected 3 tab-separated columns, got {len(parts)}")
                rows.add(parts[2], int(parts[1]))
            elif (parsed := _parse_list_line(ln)) is not None:
                path, label = parsed
                if isinstance(label, str):
                    label = names.setdefault(label, len(names))
                elif label >= 0:
                    numbered[0] = True
                rows.add(path, label)

    with open(list_file, "rb") as f:
        head = f.readline()
        try:
            first = head.decode("utf-8").replace("\r\n", "\n").rstrip("\n")
        except UnicodeDecodeError:
            first = None
        if first is not None and tuple(first.split("\t")) == MANIFEST_HEADER:
            manifest, lineno, rest = True, 1, b""
        else:
            rest = head
        while True:
            data = f.read(_CHUNK_BYTES)
            block = rest + data
            if not data:
                if block and not block.endswith(b"\n"):
                    block += b"\n"
                cut = len(block)
            else:
                cut = block.rfind(b"\n") + 1
                if cut == 0:  # no newline yet: a very long line
                    rest = block
                    continue
            rest = block[cut:]
            if cut:
                b = np.frombuffer(block, np.uint8, cut)
                if manifest:
                    python_lines(block[:cut - 1], lineno + 1)
                else:
                    paths, labels, s_start, s_end = _fast_lines(b)
                    rows.add_block(paths, labels)
                    numbered[0] = numbered[0] or bool((labels >= 0).any())
                    if s_start.size:  # line numbers: newlines before each slow line
                        _list_text(b"".join(block[a:e] for a, e in zip(s_start.tolist(), s_end.tolist(),
                                                                      strict=True)), list_file)
                        nl_before = np.searchsorted(np.flatnonzero(b == 10), s_start)
                        for a, e, k in zip(s_start.tolist(), s_end.tolist(), nl_before.tolist(), strict=True):
                            python_lines(block[a:e], lineno + k + 1)
                lineno += block.count(b"\n", 0, cut)
            if not data:
                break
    return _list_index(list_file, root, rows, names, numbered[0], manifest)


def load_index(path: str | os.PathLike, root: str | os.PathLike | None = None, key: str = "") -> InstanceIndex:
    """A folder (ImageNet layout) or a file list. key: the config key that named `path` ("data.eval_path"), named
    by every error."""
    p = Path(path)
    if key and not p.exists():
        raise DataError(f"{key}={path} does not exist (it must be an image folder or a file list)")
    try:
        return read_file_list(p, root) if p.is_file() else scan_folder(p)
    except DataError as e:
        if not key:
            raise
        raise DataError(f"{key}={path}: {e}") from None
