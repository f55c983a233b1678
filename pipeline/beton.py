"""A .beton read without FFCV's loader: its fields, its instance table, and random access to its images.

Three layouts are read, whatever wrote them:

* **ours** (`pipeline.convert_ffcv`): FFCV's standard pair of fields, `image` (RGBImageField) and `label`
  (IntField), as ffcv-imagenet's `write_imagenet.py` writes them, so other FFCV code reads the file unchanged; the
  instance ids live in the sidecars beside it: OUT.beton.manifest.tsv lists the samples in sample order (row j =
  sample j: its instance id, label and source path), OUT.beton.rejects.tsv the files that got an id but no sample,
  OUT.beton.json the instance count, class names and source folder.
* **ours, older**: a third IntField `instance_id` holds each sample's id, and -1 marks a tombstone (a file that
  failed after the sample slots were fixed), which is never read.
* **foreign** (no sidecars: FFCV's DatasetWriter as ffcv-imagenet's or FFCV-SSL's scripts use it, or any other
  writer): instance id = sample index, N = the sample count, labels from the int label field (class names are the
  label numbers, so evaluation by class name still pairs a train and a val .beton); one note line says so.

Fields are found by type: the RGBImageField is the image, an IntField (other than our older `instance_id`) the
label. Where a type has several fields, the one named `image` / `label` is taken, or `data.ffcv_image_field` /
`data.ffcv_label_field` names it; a .beton without an image field, or with an ambiguous one, is refused in one
line that lists its fields. A foreign .beton without an int field trains unlabelled (no kNN).

ffcv is imported inside the functions: `import pipeline.beton` works where FFCV is not installed (a folder is
then read as before; a .beton needs FFCV in any case).
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.dataset import MANIFEST_HEADER, DataError, InstanceIndex, beton_sidecars, load_index

IMAGE_NAME, LABEL_NAME, OLD_ID_NAME = "image", "label", "instance_id"


def is_beton(path: str | os.PathLike) -> bool:
    return str(path).endswith(".beton")


# ---------------------------------------------------------------------------------------------------------------
# the file's layout (header and field descriptors only)
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BetonLayout:
    """Which field of a .beton is what. `fields`: name -> FFCV field class name, in file order."""

    path: Path
    num_samples: int
    fields: dict[str, str]
    image: str
    label: str | None  # None: no int label field
    has_old_ids: bool  # our older layout: an `instance_id` IntField (-1 = tombstone)
    metadata_offset: int
    metadata_dtype: np.dtype
    alloc_table_ptr: int

    def describe(self) -> str:
        return ", ".join(f"{n} ({t})" for n, t in self.fields.items())

    def column(self, name: str) -> np.ndarray:
        """The metadata of field `name` for every sample, memory-mapped (no copy of the whole table)."""
        meta = np.memmap(self.path, dtype=self.metadata_dtype, mode="r", offset=self.metadata_offset,
                         shape=(self.num_samples,))
        return meta[f"f{list(self.fields).index(name)}"]


def _pick(path: Path, kind: str, candidates: list[str], conventional: str, key: str, chosen: str,
          fields: str) -> str | None:
    """The field of `kind` (image, label): the one named by `chosen` (a data.* key), else the only candidate, else
    the one with the conventional name; None when there is no candidate (and none was asked for)."""
    if chosen:
        if chosen not in candidates:
            raise DataError(f"{path}: data.{key}={chosen} is not an {kind} field of it (fields: {fields})")
        return chosen
    if len(candidates) == 1:
        return candidates[0]
    if conventional in candidates:
        return conventional
    if candidates:
        raise DataError(f"{path} has several {kind} fields ({', '.join(candidates)}): name one with "
                        f"--data.{key}=NAME (fields: {fields})")
    return None


def read_layout(path: str | os.PathLike, image_field: str = "", label_field: str = "") -> BetonLayout:
    """The fields of a .beton from its header (a few KB read); a file that does not fit is one DataError line."""
    import ffcv
    from ffcv.fields import IntField, RGBImageField
    from ffcv.types import CURRENT_VERSION, TYPE_ID_HANDLER, FieldDescType, HeaderType, get_metadata_type

    path = Path(path)
    if not path.is_file():
        raise DataError(f".beton file does not exist: {path} (make one with python -m pipeline.convert_ffcv)")
    header = np.fromfile(path, dtype=HeaderType, count=1)
    if len(header) == 0 or int(header[0]["version"]) != CURRENT_VERSION:
        got = int(header[0]["version"]) if len(header) else "none: the file is too short"
        raise DataError(f"{path} is not a .beton that FFCV {ffcv.__version__} reads (format version {got}, "
                        f"expected {CURRENT_VERSION})")
    h = header[0]
    desc = np.fromfile(path, dtype=FieldDescType, count=int(h["num_fields"]), offset=HeaderType.itemsize)
    names = [d["name"].tobytes().split(b"\0")[0].decode("ascii", "replace") for d in desc]
    classes = [TYPE_ID_HANDLER.get(int(d["type_id"])) for d in desc]
    fields = {n: (c.__name__ if c is not None else "custom") for n, c in zip(names, classes, strict=True)}
    shown = ", ".join(f"{n} ({t})" for n, t in fields.items()) or "none"
    custom = [n for n, c in zip(names, classes, strict=True) if c is None]
    if custom or len(desc) != int(h["num_fields"]):
        raise DataError(f"{path}: field(s) {', '.join(custom) or '?'} of a custom type, which FFCV cannot read "
                        f"without the writer's own field class (fields: {shown})")
    images = [n for n, c in zip(names, classes, strict=True) if c is RGBImageField]
    ints = [n for n, c in zip(names, classes, strict=True) if c is IntField]
    image = _pick(path, "image", images, IMAGE_NAME, "ffcv_image_field", image_field, shown)
    if image is None:
        raise DataError(f"{path} has no RGB image field (fields: {shown}): the ffcv backend trains on a .beton "
                        f"with an RGBImageField")
    label = _pick(path, "label", [n for n in ints if n != OLD_ID_NAME] if not label_field else ints, LABEL_NAME,
                  "ffcv_label_field", label_field, shown)
    handlers = [c.from_binary(d["arguments"]) for c, d in zip(classes, desc, strict=True)]
    return BetonLayout(path, int(h["num_samples"]), fields, image, label, OLD_ID_NAME in ints,
                       HeaderType.itemsize + desc.nbytes, get_metadata_type(handlers), int(h["alloc_table_ptr"]))


# ---------------------------------------------------------------------------------------------------------------
# images, read one at a time (evaluation and monitor: no source folder needed)
# ---------------------------------------------------------------------------------------------------------------


class BetonImages:
    """The pixels of an index's instances, read from a .beton: `read(i)` -> 8-bit RGB PIL image of position i.

    samples: int64 [M], the .beton sample of each position of the index (-1: the instance has no sample, it was
    rejected at conversion; reading it raises CorruptImageError, like an undecodable file). Random access through a
    memory map, decoded with PIL (JPEG) or taken as stored (raw pixels): the same images FFCV's loader decodes.
    Pickles without its maps (DataLoader workers reopen them).
    """

    def __init__(self, layout: BetonLayout, samples: np.ndarray, note: str = ""):
        self.layout, self.samples, self.note = layout, np.asarray(samples, np.int64), note
        self._maps = None

    def take(self, positions) -> BetonImages:
        return BetonImages(self.layout, self.samples[np.asarray(positions, np.int64)], self.note)

    def __getstate__(self):
        return {**self.__dict__, "_maps": None}

    def _open(self):
        """(image metadata column, the file's bytes, sorted data pointers, their sizes), once per process."""
        if self._maps is None:
            from ffcv.types import ALLOC_TABLE_TYPE

            lay = self.layout
            alloc = np.fromfile(lay.path, dtype=ALLOC_TABLE_TYPE, offset=lay.alloc_table_ptr)
            order = np.argsort(alloc["ptr"], kind="stable")
            self._maps = (lay.column(lay.image), np.memmap(lay.path, np.uint8, mode="r"),
                          np.ascontiguousarray(alloc["ptr"][order]), np.ascontiguousarray(alloc["size"][order]))
        return self._maps

    def read(self, i: int):
        from PIL import Image

        from pipeline.decode import CorruptImageError

        s = int(self.samples[i])
        name = self.layout.path.name
        if s < 0:
            raise CorruptImageError(f"{name}: instance {i} has no sample (rejected when the .beton was written)")
        meta, data, ptrs, sizes = self._open()
        m = meta[s]
        h, w, ptr = int(m["height"]), int(m["width"]), int(m["data_ptr"])
        if int(m["mode"]) == 1:  # raw: uint8 [h,w,3]
            return Image.fromarray(np.array(data[ptr:ptr + 3 * h * w]).reshape(h, w, 3))
        k = int(np.searchsorted(ptrs, ptr))
        if k >= len(ptrs) or int(ptrs[k]) != ptr:
            raise CorruptImageError(f"{name}: sample {s} points at no allocation")
        try:
            with Image.open(io.BytesIO(data[ptr:ptr + int(sizes[k])].tobytes())) as img:
                return img.convert("RGB")
        except (OSError, ValueError, SyntaxError) as e:
            raise CorruptImageError(f"{name}: sample {s}: {type(e).__name__}: {e}") from e


# ---------------------------------------------------------------------------------------------------------------
# the instance table
# ---------------------------------------------------------------------------------------------------------------


def _read_tsv(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:  # non-UTF-8 names
        return [row for row in csv.reader(f, delimiter="\t") if row]


def beton_index(path: str | os.PathLike, image_field: str = "", label_field: str = "") -> InstanceIndex:
    """The instance table of a .beton, whatever wrote it (see the module docstring); `index.images` reads its pixels
    and says in `note` what was assumed (foreign files). Nothing here needs the source images."""
    layout = read_layout(path, image_field, label_field)
    if beton_sidecars(layout.path)["manifest"].is_file():
        return _our_index(layout)
    return _foreign_index(layout)


def _foreign_index(layout: BetonLayout) -> InstanceIndex:
    n = layout.num_samples
    if n == 0:
        raise DataError(f"{layout.path} holds no samples")
    if layout.label is not None:
        labels = np.asarray(layout.column(layout.label), np.int64).copy()
        labels[labels < 0] = -1
        k = int(labels.max()) + 1
        said = (f"labels from its int field '{layout.label}' (class names are the label numbers 0..{k - 1})" if k
                else f"its int field '{layout.label}' holds no label >= 0: unlabelled")
    else:
        labels, k = np.full(n, -1, np.int64), 0
        said = "no int label field: unlabelled (no kNN)"
    width = len(str(n - 1))
    paths = [f"{layout.path.name}#{j:0{width}d}" for j in range(n)]  # sorted = sample order
    note = (f"note: {layout.path.name} has no sidecar files of pipeline.convert_ffcv: instance id = sample index, "
            f"N = {n:,} samples, {said}; image field '{layout.image}'")
    return InstanceIndex(layout.path.parent, paths, labels, tuple(str(c) for c in range(k)),
                         images=BetonImages(layout, np.arange(n, dtype=np.int64), note))


def _our_index(layout: BetonLayout) -> InstanceIndex:
    """Every id 0..N-1 of the source index, rejected ones included (so the scheduler's ids and the bank's size
    match the other backends'); `root` is the source folder as recorded at conversion (it need not exist)."""
    sidecars = beton_sidecars(layout.path)
    manifest = sidecars["manifest"]
    rows = _read_tsv(manifest)
    if not rows or tuple(rows[0]) != MANIFEST_HEADER:
        raise DataError(f"{manifest}: first line must be {'<TAB>'.join(MANIFEST_HEADER)}")
    listed = np.array([int(r[0]) for r in rows[1:]], np.int64)  # row j: sample j (current layout)
    entries = {int(r[0]): (r[2], int(r[1])) for r in rows[1:]}
    if sidecars["rejects"].is_file():
        for r in _read_tsv(sidecars["rejects"])[1:]:
            if len(r) >= 3 and r[2]:
                entries.setdefault(int(r[2]), (r[0], -1))
    info = json.loads(sidecars["info"].read_text(encoding="utf-8")) if sidecars["info"].is_file() else {}
    n = int(info.get("num_instances", max(entries, default=-1) + 1))
    missing = sorted(set(range(n)) - set(entries))
    if not entries or missing or max(entries) >= n:
        raise DataError(f"{manifest}: ids do not cover 0..{n - 1} (e.g. {missing[:3]}); the sidecar files do not "
                        "belong together")
    if layout.has_old_ids:
        sample_ids = np.asarray(layout.column(OLD_ID_NAME), np.int64)  # -1: a tombstone
    else:
        sample_ids = listed
        if len(listed) != layout.num_samples:
            raise DataError(f"{manifest} lists {len(listed):,} images but {layout.path.name} holds "
                            f"{layout.num_samples:,} samples: the sidecar files do not belong to it")
    if sample_ids.size and (sample_ids.min() < -1 or sample_ids.max() >= n):
        raise DataError(f"{layout.path}: instance ids up to {int(sample_ids.max())} but its sidecars list {n} "
                        "instances: the sidecar files do not belong to it")
    samples = np.full(n, -1, np.int64)
    live = np.flatnonzero(sample_ids >= 0)
    samples[sample_ids[live]] = live
    paths = tuple(entries[i][0] for i in range(n))
    labels = np.array([entries[i][1] for i in range(n)], np.int64)
    return InstanceIndex(Path(info.get("source", layout.path.parent)), paths, labels, tuple(info.get("classes", ())),
                         images=BetonImages(layout, samples))


def sample_instance_ids(index: InstanceIndex) -> np.ndarray:
    """int64 [num_samples]: the instance id of every sample of the .beton behind `index` (-1: a tombstone of the
    older layout, or a sample outside a subset)."""
    images = index.images
    if not isinstance(images, BetonImages):
        raise DataError(f"the index of {index.root} is not read from a .beton")
    out = np.full(images.layout.num_samples, -1, np.int64)
    live = np.flatnonzero(images.samples >= 0)
    out[images.samples[live]] = live
    return out


def open_index(path: str | os.PathLike, image_field: str = "", label_field: str = "", key: str = "") -> InstanceIndex:
    """Any data path an evaluation reads: a .beton (images read from it), an image folder or a file list. key: the
    config key that named `path`, named by every error."""
    if is_beton(path) and Path(path).is_file():
        return beton_index(path, image_field, label_field)
    return load_index(path, key=key)
