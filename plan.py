"""The plan of a run: every value derived from the config and the data set (steps per unit, units, warm-up, the
scaled lr, the clamped window), computed once by `resolve(cfg, num_instances, world_size)`, with the notes a user
should see about them. A resume is refused when the plan's facts changed (train.py: plan_facts).
"""

from __future__ import annotations

from dataclasses import dataclass

from config import Config, ConfigError, DataConfig, OptimConfig, check_values
from model.bank.negatives import uses_full_softmax
from pipeline.schedule import ORDER_GENERATOR, num_windows


@dataclass(frozen=True)
class Resolved:
    """Values derived from the config and the data set, computed once."""

    num_instances: int
    world_size: int
    batch_per_rank: int
    steps_per_unit: int  # steps per scheduler unit (epoch, or window)
    num_units: int  # epochs, or windows (docs/method.md §3: ceil(E·N/W))
    warmup_steps: int
    total_steps: int
    lr: float  # base lr scaled by batch/256
    window: int  # effective W (all ranks together; = N for the epoch scheduler)
    stride: int  # effective S
    notes: tuple[str, ...] = ()  # one line each, printed at the start of a run
    order: str = ""  # the generator of the scheduler's order (pipeline.schedule.ORDER_GENERATOR), checkpointed


def warmup_epochs_of(o: OptimConfig) -> float:
    """optim.warmup_epochs, with -1 meaning epochs/40 (exact for the recipe's 200, 400, 800, 1600 epochs)."""
    if o.warmup_epochs < 0:
        return o.epochs / 40
    return o.warmup_epochs


def resolve(cfg: Config, num_instances: int, world_size: int = 1) -> Resolved:
    """Derived values and the notes a user should see about them (clamped window sizes, a long warm-up)."""
    check_values(cfg)
    d, o, p = cfg.data, cfg.optim, cfg.pic
    notes: list[str] = []
    if p.negatives == "recent" and uses_full_softmax(p.k, num_instances):  # the bank then skips the sampling
        notes.append(f"note: pic.k={p.k} covers all {num_instances} instances: pic.negatives=recent is the full "
                     f"soft-max over every row here (as pic.negatives=full)")
    if d.batch_size % world_size:
        raise ConfigError(f"data.batch_size={d.batch_size} is not divisible by the world size {world_size}")
    # The plan is the world size's business only through the batch per rank: every unit's order is global, and
    # each rank takes its slice of every global batch (pipeline.schedule.RankSchedule), ⌊unit/B⌋ steps per unit.
    b = d.batch_size // world_size
    if d.scheduler == "window":
        w = min(d.window, num_instances)
        s = max(1, min(d.stride, w))
        if (w, s) != (d.window, d.stride):
            notes.append(f"note: window W={d.window}, stride S={d.stride} clamped to W={w}, S={s} "
                         f"({num_instances} images)")
        if w < d.batch_size:
            raise ConfigError(f"data.window ({w}) is smaller than data.batch_size ({d.batch_size}): lower "
                              f"data.batch_size or raise data.window")
        unit = w
    else:
        w = s = unit = num_instances
    steps_per_unit = unit // d.batch_size
    if steps_per_unit < 1:
        raise ConfigError(f"data.batch_size={d.batch_size} is larger than the data set ({num_instances} images)")
    default = DataConfig()
    for key in ("color_aug_on", "pin_memory"):  # read by the torch backend only
        if d.backend != "torch" and getattr(d, key) != getattr(default, key):
            notes.append(f"warning: data.{key} is read by the torch backend only; the {d.backend} backend ignores it")
    num_units = num_windows(o.epochs, num_instances, unit)  # exact: ceil(E·N/unit), no float round-off
    warmup_epochs = warmup_epochs_of(o)
    warmup_units = num_windows(warmup_epochs, num_instances, unit)
    if warmup_units >= num_units and warmup_epochs > 0:
        notes.append(f"warning: the warm-up ({warmup_epochs:g} epochs) is as long as the run ({o.epochs} epochs): "
                     f"the learning rate never reaches its peak; lower optim.warmup_epochs")
    return Resolved(
        num_instances=num_instances,
        world_size=world_size,
        batch_per_rank=b,
        steps_per_unit=steps_per_unit,
        num_units=num_units,
        warmup_steps=min(warmup_units, num_units) * steps_per_unit,
        total_steps=num_units * steps_per_unit,
        lr=o.lr * d.batch_size / 256,
        window=w,
        stride=s,
        notes=tuple(notes),
        order=ORDER_GENERATOR[d.scheduler],
    )
