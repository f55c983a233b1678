"""One config object for a run: nested dataclasses whose defaults are the paper's ImageNet recipe.

Overrides, in order: a preset (`--preset=demo`), a YAML/JSON file (`--config=FILE`), then `--section.key=value`.
Unknown sections or keys and values of the wrong type are errors that name the key. The values derived from a config
and a data set are plan.py's (`resolve`); `config.json` in the run folder holds both.
"""

from __future__ import annotations

import json
import math
import os
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from pipeline import BACKENDS


class ConfigError(ValueError):
    pass


def machine_workers() -> int:
    """data.workers' default: the CPU cores this process may use, shared by the processes of this node (torchrun
    sets LOCAL_WORLD_SIZE), at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)))


@dataclass
class DataConfig:
    path: str = ""  # ImageNet-layout folder, a file list, or (backend ffcv) a .beton; "" = built-in digits
    eval_path: str = ""  # labelled folder or .beton for the kNN (queries); "" = none (or digits/val for the demo)
    backend: str = "torch"  # data pipeline (pipeline/): PIL reference, GPU decode, in-memory, FFCV, DALI
    batch_size: int = 256  # global batch (all ranks together)
    # DataLoader processes (torch, torch-gpu, memory backends) or DALI / FFCV threads
    workers: int = field(default_factory=machine_workers)  # decode workers; default: the cores / local processes
    image_size: int = 224  # output size of the (large) crop, px
    eval_size: int = 224  # image size of the evaluations (kNN, linear probe; resize + centre crop), px
    scheduler: str = "epoch"  # epochs, or the sliding window of docs/method.md §3
    window: int = 131072  # sliding window W (instances), clamped to N (with a note)
    stride: int = 16384  # window stride S, clamped to the (clamped) W
    color_aug_on: str = "worker"  # torch backend: colour augmentation in the workers (PIL) or batched on the device
    pin_memory: bool = True  # torch backend on CUDA: DataLoader batches in pinned memory
    subset: int = 0  # use only the first n instances (0 = all)
    # a .beton's fields are found by type (pipeline/beton.py); these name them where a type has several
    ffcv_image_field: str = ""  # .beton (data.path, data.eval_path): the RGB image field ("" = found by type)
    ffcv_label_field: str = ""  # .beton: the int label field ("" = found by type, or the one named label)


@dataclass
class AugConfig:
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area fraction
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop aspect-ratio range
    flip_p: float = 0.5  # horizontal flip probability
    jitter: tuple[float, float, float, float] = (0.8, 0.8, 0.8, 0.2)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8  # probability of the colour jitter
    gray_p: float = 0.2  # probability of grayscale
    blur_p: float = 0.5  # probability of the Gaussian blur
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # Gaussian blur sigma range, px, at every crop size
    small_crops: int = 0  # multi-crop: number of small crops (paper: 3), 0 = single crop
    small_size: int = 96  # side of the small crops, px
    small_scale: tuple[float, float] = (0.08, 0.14)  # RandomResizedCrop area fraction of the small crops


@dataclass
class ModelConfig:
    arch: str = "resnet50"  # backbone (tiny: a 4-layer CNN for CPU demos and tests)
    head_hidden: int = 2048  # MLP head hidden width (docs/method.md §1)
    dim: int = 128  # feature dimension
    channels_last: bool = True  # channels_last memory format for the backbone
    amp: str = "bf16"  # autocast dtype: bf16 on CUDA (a CPU run is fp32); fp16 on any device, with a loss scaler
    compile: bool = False  # torch.compile the encoder (for CUDA; honoured on a CPU too, where it only costs time)
    bn_groups: int = 1  # BN statistics over B/bn_groups chunks ("ghost BN": per-GPU BN of the paper on one GPU)
    sync_bn: bool = False  # under torchrun: SyncBatchNorm across ranks instead of per-GPU BN (the paper's setting)


@dataclass
class PICConfig:
    temperature: float = 0.2  # τ (the released code's default 0.07 is wrong, docs/method.md §1)
    init_std: float = 0.01  # W ~ N(0, std²)
    negatives: str = "full"  # soft-max over all N rows, or over the K recent ones + the batch (docs/method.md §4)
    k: int = 65536  # recent negatives K (at least 1; K >= N is the full soft-max)
    correction: str = "exact"  # closed-form update of skipped rows: chronological, the paper's M(η)^t', off (§5)
    # cpu: host memory, not pinned; the K+B candidate rows go to the GPU and their gradient back each step, which
    # waits for the GPU once per step
    bank_device: str = "auto"  # where W, momentum and `last` live: the training device, or host memory
    # device: tensors of each rank (replicated); host: one copy per node in /dev/shm shared by the node's ranks;
    # mmap: a memory-mapped folder on disk (N beyond RAM; checkpoints refer to it, an undo journal keeps resume exact)
    bank_storage: str = "device"  # the bank's storage: per-rank tensors, one shared copy per node, or a disk file
    bank_dtype: str = "fp32"  # W and momentum as stored (bf16/fp16: half the bytes; the row math stays fp32)
    bank_file: str = ""  # folder of a host/mmap bank ("" with host: /dev/shm/pic-<uid>-<run.name>-<hash>-bank)
    # the recent-negative ring's rows kept on the training device, so a step reads and writes B bank rows instead
    # of K+B (model/bank/ring_cache.py; same numbers, bf16 rows rounded once per visit); auto = on for a host or mmap
    # bank, or a bank_device=cpu bank under a GPU, with negatives=recent
    bank_cache: str = "auto"  # keep the ring's rows on the training device: B bank rows read/written per step


@dataclass
class OptimConfig:
    epochs: int = 200  # training epochs (with the window scheduler: ceil(epochs·N/W) windows)
    warmup_epochs: float = -1.0  # linear warm-up; -1 = epochs/40, the released recipe (5 at 200, 40 at 1600)
    lr: float = 0.03  # per 256 images; scaled by batch/256
    min_lr: float = 1e-6  # end of the cosine schedule
    momentum: float = 0.9  # SGD momentum (backbone, head and the instance bank)
    weight_decay: float = 1e-4  # on every parameter, BN and biases included, and on the bank's rows
    max_nonfinite: int = 20  # stop after this many consecutive non-finite losses


@dataclass
class RunConfig:
    name: str = "pic"  # run folder name: out_dir/name
    out_dir: str = "runs"  # parent folder of the run folders
    seed: int = 0  # the data order, augmentation and initialisation are functions of it
    device: str = "auto"  # auto = CUDA when there is one
    log_every: int = 10  # steps between log lines (a log step reads the loss back: a GPU sync)
    # checkpoints: at the end of every unit (epoch or window), on exit, and every ckpt_every steps / ckpt_minutes
    # minutes (0 = off); the previous one is kept as prev.pt, so a corrupt last.pt falls back to it
    ckpt_every: int = 0  # also checkpoint every this many steps (0 = off)
    ckpt_minutes: float = 15.0  # also checkpoint every this many minutes (0 = off)
    max_steps: int = 0  # stop after this many steps in this invocation (0 = run to the end); for smoke tests
    resume: str = ""  # "" = start fresh, auto = the run folder's last.pt (else prev.pt), or a checkpoint path
    eval: str = "auto"  # after training: instance retrieval, and kNN when the data have labels
    knn_k: int = 20  # neighbours of the kNN evaluations (the final one and the monitor's)
    # the online monitor (eval/monitor.py): kNN and retrieval top-1 of the current backbone on a fixed subset,
    # in log.jsonl, on the console and in TensorBoard; it never changes the training (same weights with or without)
    monitor_every: int = -1  # units (epochs/windows) between monitor points; -1 = auto (~4, + the start); 0 = off
    monitor_images: int = 1000  # the monitor's fixed, seeded subset: this many training (and data.eval_path) images
    tensorboard: bool = False  # also write TensorBoard events into the run folder (the extra: pic[tensorboard])
    threads: int = 0  # CPU threads of torch's and numba's pools, set together (0 = the cores / local processes)
    # torch.profiler trace of this many steps (after 3 warm-up steps; rank 0) into run_dir/profile/ (TensorBoard /
    # Chrome trace), with the top operators and the data-wait share printed; 0 = off
    profile: int = 0  # steps to profile with torch.profiler (0 = off)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pic: PICConfig = field(default_factory=PICConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


# The demo: a small, fast backbone and many visits per instance, so that PIC visibly learns on 2 CPU cores in a
# few minutes (see README "What the demo shows").
PRESETS: dict[str, dict[str, Any]] = {
    "demo": {
        "data": {"backend": "memory", "batch_size": 256, "workers": 2, "image_size": 32, "eval_size": 32},
        "aug": {"crop_scale": [0.2, 1.0], "blur_p": 0.0, "jitter": [0.4, 0.4, 0.4, 0.1]},
        "model": {"arch": "tiny", "head_hidden": 512, "dim": 128},
        "optim": {"epochs": 200, "warmup_epochs": 5, "lr": 0.5},  # 150 epochs measured: loss 0.67 ln N
        # the monitor at 512 images: ~0.5 s a point on 2 cores, ~1.5 % of the demo's training at 5 points
        "run": {"name": "demo", "log_every": 20, "monitor_images": 512},
    },
}

# The paper's multi-crop recipe (docs/method.md §2): one 160-px crop at scale (0.14, 1) and three 96-px crops at
# (0.08, 0.14), every crop its own BN statistics, W trained by the large crop only. Combine with the ImageNet flags.
PRESETS["multicrop"] = {
    "data": {"image_size": 160},
    "aug": {"crop_scale": [0.14, 1.0], "small_crops": 3, "small_size": 96, "small_scale": [0.08, 0.14]},
}

# The paper's ImageNet recipe with both of its system ideas on: the sliding window (docs/method.md §3) and recent
# negatives with the closed-form correction (§4, §5). The schedule and model keys repeat the defaults on purpose:
# the recommended ImageNet run stays this one flag if a default changes. Add --preset=multicrop for multi-crop.
PRESETS["imagenet"] = {
    "data": {"scheduler": "window", "window": 131072, "stride": 16384, "batch_size": 256},
    "model": {"arch": "resnet50", "dim": 128},
    "pic": {"negatives": "recent", "k": 65536, "correction": "exact", "temperature": 0.2},
    "optim": {"epochs": 200},
}

ENUMS = {
    "data.backend": tuple(BACKENDS),  # the registry (pipeline/__init__.py) is the one list
    "data.scheduler": ("epoch", "window"),
    "data.color_aug_on": ("worker", "device"),
    "model.arch": ("resnet18", "resnet34", "resnet50", "tiny"),
    "model.amp": ("bf16", "fp16", "off"),
    "pic.negatives": ("full", "recent"),
    "pic.correction": ("exact", "const", "none"),
    "pic.bank_device": ("auto", "cpu"),
    "pic.bank_storage": ("device", "host", "mmap"),
    "pic.bank_dtype": ("fp32", "bf16", "fp16"),
    "pic.bank_cache": ("auto", "on", "off"),
    "run.device": ("auto", "cpu", "cuda"),
    "run.eval": ("auto", "none"),
}



@dataclass(frozen=True)
class Range:
    """The valid values of a numeric key (each value of a tuple key): lo..hi, each bound included unless open,
    plus named special values outside it (-1 = auto). `ordered`: a (low, high) pair, low <= high."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    special: tuple[tuple[float, str], ...] = ()  # (value, meaning)
    ordered: bool = False
    what: str = ""  # what the value is, for the message ("the number of recent negatives")

    def allows(self, v: float) -> bool:
        if any(v == s for s, _ in self.special):
            return True
        if not math.isfinite(v):
            return False
        lo_ok = self.lo is None or (v > self.lo if self.lo_open else v >= self.lo)
        hi_ok = self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)
        return lo_ok and hi_ok

    def describe(self) -> str:
        if self.lo is not None and self.hi is not None:
            text = f"in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            text = f"{'greater than' if self.lo_open else 'at least'} {_num(self.lo)}"
        else:
            text = f"{'less than' if self.hi_open else 'at most'} {_num(self.hi)}"
        if self.special:
            text = " or ".join([f"{_num(s)} ({meaning})" for s, meaning in self.special] + [text])
        return text + (", the first at most the second" if self.ordered else "")


def _num(v: float) -> str:
    return str(v) if isinstance(v, int) else f"{v:g}"


_PROBABILITY = Range(0, 1)
_AT_LEAST_1, _AT_LEAST_0, _POSITIVE = Range(1), Range(0), Range(0, lo_open=True)
_CROP_SCALE = Range(0, 1, lo_open=True, ordered=True)

# Every numeric key's valid values, checked wherever a value is set (apply_overrides: presets, files, the command
# line, saved configs), so a bad value is one error line naming the key before any work. Importing this module
# fails when a numeric key has no row here: a new key cannot go unchecked.
RANGES: dict[str, Range | tuple[Range, ...]] = {  # a tuple: one Range per value of a tuple key
    "data.batch_size": _AT_LEAST_1,
    "data.workers": _AT_LEAST_0,
    "data.image_size": _AT_LEAST_1,
    "data.eval_size": _AT_LEAST_1,
    "data.window": _AT_LEAST_1,
    "data.stride": _AT_LEAST_1,
    "data.subset": Range(1, special=((0, "all"),)),
    "aug.crop_scale": _CROP_SCALE,
    "aug.crop_ratio": Range(0, lo_open=True, ordered=True),
    "aug.flip_p": _PROBABILITY,
    "aug.jitter": (Range(0, what="the brightness"), Range(0, what="the contrast"), Range(0, what="the saturation"),
                   Range(0, 0.5, what="the hue (at most half the colour circle)")),
    "aug.jitter_p": _PROBABILITY,
    "aug.gray_p": _PROBABILITY,
    "aug.blur_p": _PROBABILITY,
    "aug.blur_sigma": Range(0, lo_open=True, ordered=True),
    "aug.small_crops": _AT_LEAST_0,
    "aug.small_size": _AT_LEAST_1,
    "aug.small_scale": _CROP_SCALE,
    "model.head_hidden": _AT_LEAST_1,
    "model.dim": _AT_LEAST_1,
    "model.bn_groups": _AT_LEAST_1,
    "pic.temperature": Range(0, lo_open=True, what="the soft-max temperature"),
    "pic.init_std": _POSITIVE,
    "pic.k": Range(1, what="the number of recent negatives"),
    "optim.epochs": _AT_LEAST_1,
    "optim.warmup_epochs": Range(0, special=((-1, "epochs/40"),)),
    "optim.lr": _POSITIVE,
    "optim.min_lr": _AT_LEAST_0,
    "optim.momentum": Range(0, 1, hi_open=True),
    "optim.weight_decay": _AT_LEAST_0,
    "optim.max_nonfinite": _AT_LEAST_1,
    "run.seed": Range(0, 2**63 - 1),
    "run.log_every": _AT_LEAST_1,
    "run.ckpt_every": Range(1, special=((0, "off"),)),
    "run.ckpt_minutes": Range(0, lo_open=True, special=((0, "off"),)),
    "run.max_steps": Range(1, special=((0, "to the end"),)),
    "run.knn_k": _AT_LEAST_1,
    "run.monitor_every": Range(1, special=((-1, "auto"), (0, "off"))),
    "run.monitor_images": _AT_LEAST_1,
    "run.threads": Range(1, special=((0, "auto"),)),
    "run.profile": Range(1, special=((0, "off"),), what="the number of steps to profile"),
}


def _numeric_keys() -> list[str]:
    """Every key whose type is a number or a tuple of numbers."""
    out = []
    for sec in fields(Config):
        for name, tp in typing.get_type_hints(type(getattr(Config(), sec.name))).items():
            args = typing.get_args(tp) if typing.get_origin(tp) is tuple else (tp,)
            if all(a in (int, float) for a in args):
                out.append(f"{sec.name}.{name}")
    return out


if _unchecked := sorted(set(_numeric_keys()) - set(RANGES)):
    raise ImportError(f"config.py: numeric keys without a row in RANGES: {', '.join(_unchecked)}")


def range_text(key: str) -> str:
    """RANGES[key] in words (--help)."""
    rng = RANGES[key]
    if isinstance(rng, tuple):
        return "; ".join(f"{r.what.split(' (')[0].removeprefix('the ')} {r.describe()}" for r in rng)
    return rng.describe()


def check_range(key: str, value: Any) -> None:
    """A ConfigError naming `key`, its value and its valid values when the value is outside RANGES[key]."""
    rng = RANGES.get(key)
    if rng is None:
        return
    values = value if isinstance(value, tuple) else (value,)
    shown = ",".join(map(_num, values))
    if isinstance(rng, tuple):  # one Range per value
        for v, r in zip(values, rng, strict=True):
            if not r.allows(v):
                raise ConfigError(f"{key}={shown}: {r.what} must be {r.describe()}")
        return
    if all(rng.allows(v) for v in values) and not (rng.ordered and values[0] > values[1]):
        return
    each = "each value " if isinstance(value, tuple) and not rng.ordered else ""
    raise ConfigError(f"{key}={shown}: {rng.what + ' ' if rng.what else each}must be {rng.describe()}")

def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check (and, for strings from the command line, parse) a value against a field's annotated type."""
    origin = typing.get_origin(tp)
    if isinstance(value, str) and tp is not str and origin not in (typing.Union, types.UnionType):
        try:
            value = json.loads(value) if tp is not bool else {"true": True, "false": False}[value.lower()]
        except (json.JSONDecodeError, KeyError):
            if tp is bool:
                raise ConfigError(f"{key}: expected true/false, got {value!r}") from None
            if origin is tuple:
                value = [v.strip() for v in value.strip("()[]").split(",")]
            else:
                raise ConfigError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {value!r}") from None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args, strict=True)))
    raise ConfigError(f"{key}: unsupported type {tp}")


def apply_overrides(cfg: Config, overrides: dict[str, Any], source: str = "") -> Config:
    """Apply {"section": {"key": value}} or {"section.key": value}; unknown keys and bad types raise."""
    where = f" (from {source})" if source else ""
    flat: dict[str, Any] = {}
    sections = {f.name for f in fields(Config)}
    for k, v in overrides.items():
        if k in sections and not isinstance(v, dict):
            raise ConfigError(f"config section {k!r}{where} must be a mapping of keys (e.g. {k}: {{key: value}}), "
                              f"got {v!r}")
        if isinstance(v, dict):
            for kk, vv in v.items():
                flat[f"{k}.{kk}"] = vv
        else:
            flat[k] = v
    for key, value in flat.items():
        if key.count(".") != 1:
            raise ConfigError(f"unknown config key {key!r}{where}: use section.key, sections: "
                              f"{', '.join(f.name for f in fields(Config))}")
        section_name, name = key.split(".")
        if section_name not in {f.name for f in fields(Config)}:
            raise ConfigError(f"unknown config section {section_name!r} in {key!r}{where}")
        section = getattr(cfg, section_name)
        hints = typing.get_type_hints(type(section))
        if name not in hints:
            raise ConfigError(f"unknown config key {key!r}{where}; {section_name} has: {', '.join(hints)}")
        v = _coerce(key, value, hints[name])
        if key in ENUMS and v not in ENUMS[key]:
            raise ConfigError(f"{key}: {v!r} is not one of {', '.join(ENUMS[key])}")
        check_range(key, v)
        setattr(section, name, v)
    return cfg


def load_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file does not exist: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {p} cannot be read ({type(e).__name__}: {e})") from None
    if p.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"config file {p} is not valid YAML:{where}: {problem}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {p} is not valid JSON: line {e.lineno}, column {e.colno}: {e.msg} "
                              f"(a .yaml/.yml name is read as YAML)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections")
    return data


def parse_args(argv: list[str]) -> Config:
    """`--preset=NAME`, `--config=FILE`, `--section.key=value` (also `--section.key value`)."""
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-h", "--help"):
            raise ConfigError(help_text())
        if not a.startswith("--"):
            raise ConfigError(f"unexpected argument {a!r}: use --section.key=value")
        if "=" in a:
            k, v = a[2:].split("=", 1)
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"{a}: missing value")
            k, v = a[2:], argv[i + 1]
            i += 1
        pairs.append((k, v))
        i += 1
    cfg = Config()
    for k, v in pairs:
        if k == "preset":
            if v not in PRESETS:
                raise ConfigError(f"unknown preset {v!r}; presets: {', '.join(PRESETS)}")
            apply_overrides(cfg, PRESETS[v], f"preset {v}")
    for k, v in pairs:
        if k == "config":
            apply_overrides(cfg, load_file(v), v)
    for k, v in pairs:
        if k not in ("preset", "config"):
            apply_overrides(cfg, {k: v}, "command line")
    return cfg


def field_docs() -> dict[str, str]:
    """"section.key" -> the comment beside the field in this file (the one place a key is explained)."""
    import inspect
    import io
    import tokenize

    docs: dict[str, str] = {}
    for sec in fields(Config):
        cls = type(getattr(Config(), sec.name))
        lines, _ = inspect.getsourcelines(cls)
        comments: dict[int, str] = {}
        for tok in tokenize.generate_tokens(io.StringIO("".join(lines)).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = tok.string.lstrip("#").strip()
        names = {f.name for f in fields(cls)}
        for n, line in enumerate(lines, start=1):
            name = line.strip().split(":")[0]
            if name in names and n in comments and not line.strip().startswith("#"):
                docs[f"{sec.name}.{name}"] = comments[n]
    return docs


def help_text() -> str:
    docs = field_docs()
    lines = ["usage: python train.py [--preset=NAME] [--config=FILE.yaml] [--section.key=value ...]", "",
             f"presets: {', '.join(PRESETS)} (applied first, then the file, then the command line)", ""]
    for sec in fields(Config):
        lines.append(f"[{sec.name}]")
        obj = getattr(Config(), sec.name)
        for f in fields(obj):
            key = f"{sec.name}.{f.name}"
            value = getattr(obj, f.name)
            shown = (str(value).lower() if isinstance(value, bool) else
                     ",".join(f"{v:g}" for v in value) if isinstance(value, tuple) else str(value))
            allowed = (f" [{' | '.join(ENUMS[key])}]" if key in ENUMS else
                       f" [{range_text(key)}]" if key in RANGES else "")
            lines.append(f"  --{key}={shown}{allowed}")
            if key in docs:
                lines.append(f"      {docs[key]}")
    return "\n".join(lines)


def to_dict(cfg: Any) -> dict[str, Any]:
    return asdict(cfg) if is_dataclass(cfg) else dict(cfg)


def from_dict(d: dict[str, Any]) -> Config:
    cfg = Config()
    apply_overrides(cfg, d, "saved config")
    return cfg


def check_values(cfg: Config) -> None:
    """Values that no data set makes right, refused before any work (train.py calls it first; resolve again). The
    bank's combinations are checked by model/bank/options.py (BankOptions)."""
    for key in RANGES:  # a config built in code (dataclass fields set directly) passes the table too
        section, name = key.split(".")
        check_range(key, getattr(getattr(cfg, section), name))


def replace(cfg: Config, **sections: dict[str, Any]) -> Config:
    """A copy with some section fields changed: replace(cfg, optim={"epochs": 1})."""
    new = from_dict(to_dict(cfg))
    return apply_overrides(new, sections)


__all__ = ["Config", "ConfigError", "PRESETS", "apply_overrides", "check_values", "from_dict", "parse_args", "replace",
           "to_dict"]
