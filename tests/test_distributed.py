"""Two CPU processes (gloo) against one: the instance bank stays identical on every rank, and the run equals a single
process with the same global batch and the same BN grouping (per-rank BN <-> bn_groups=2). Then torchrun itself:
a killed worker is restarted (--max-restarts) and the run resumes from the checkpoint to the same end state."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, checkpoint_tensors, free_port, no_aug, tiny_config, wait_until, write_id_folder

pytestmark = pytest.mark.slow

STEPS_PER_EPOCH, EPOCHS, BATCH, N = 3, 2, 16, 48




def _run(rank: int, world: int, port: int, data: str, out: str, pic: dict | None = None, tag: str = "",
         local_world: int = 0, double: bool = False) -> None:
    """Train the tiny model with the real components; save losses and this rank's bank. local_world: ranks per
    "node" (default all of them; 1: every rank plays a node of its own). double: the model and the bank in float64
    (the loader's images widened), for comparisons that must not depend on the CPU's float32 reduction order."""
    sys.path.insert(0, str(ROOT))
    if world > 1:
        local_world = local_world or world
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank % local_world), LOCAL_WORLD_SIZE=str(local_world))
    torch.set_num_threads(1)
    from model import distributed as dist
    from model.bank import BankOptions, make_bank
    from model.optim import lr_table
    from model.trainer import build_trainer
    from pipeline import make_loader
    from pipeline.dataset import scan_folder
    from pipeline.schedule import RankSchedule, make_schedule

    device = dist.init("cpu")
    if double:  # before the model is built (and wrapped by DDP, whose buckets take the parameters' dtype)
        torch.set_default_dtype(torch.float64)
    cfg = no_aug(tiny_config(data, out, data={"batch_size": BATCH}, pic={"negatives": "recent", "k": 16, **(pic or {})},
                             model={"bn_groups": 2 if world == 1 else 1, "amp": "off", "channels_last": False},
                             run={"seed": 3}))
    lrs = lr_table(0.2, 2, 100, 1e-6)
    trainer = build_trainer(cfg, N, device, lrs=lrs)
    model, step_fn = trainer.model, trainer.train_step
    if double:  # the bank's rows in float64 too (a device bank, as configured otherwise)
        model.bank = make_bank(BankOptions.from_config(cfg).replace(dtype="fp64"), N, lrs, device,
                               generator=torch.Generator().manual_seed(cfg.run.seed + 1))
        torch.set_default_dtype(torch.float32)  # the loader as in training; its images are widened below
    # one process and every rank of 2 alike: rank r takes its slice of every global batch of the same global order
    schedule = RankSchedule(make_schedule("epoch", N, None, None, 0), BATCH, rank if world > 1 else 0, world)
    loader = make_loader(cfg, scan_folder(data), schedule, device, BATCH // world)
    losses, ids, step = [], [], 0
    for epoch in range(EPOCHS):
        for batch in loader.iter_epoch(epoch):
            images = batch.images.double() if double else batch.images
            losses.append(step_fn(images, batch.ids, batch.crops, step, float(lrs[step])))
            ids.append(batch.ids.tolist())
            step += 1
    from model.bank.files import FileRows
    from model.bank.ring_cache import RingCache

    rows = model.bank.checkpoint(step)["rows"]  # every rank: the ring's rows into the bank; mmap: a checkpoint
    cached = isinstance(model.bank.rows, RingCache)
    files = model.bank.rows.inner if cached else model.bank.rows
    files = files if isinstance(files, FileRows) else None
    if rows["kind"] == "file":  # ... that every node's copy can resume
        again = FileRows("mmap", files.base_folder, files.n, files.dim, files.dtype)  # a restarted process maps it
        assert not again.created
        again.restore(rows)
    maps = Path("/proc/self/maps").read_text()
    w, u, last = (x.clone() for x in model.bank.rows.table())
    torch.save({"losses": losses, "ids": ids, "w": w, "u": u, "last": last, "backbone": model.backbone.state_dict(),
                "writer": files.writer if files else None, "cached": cached,
                "folder": str(files.folder) if files else None,
                "mapped": "weight.bin" in maps}, Path(out) / f"w{world}r{rank}{tag}.pt")
    trainer.close()
    dist.shutdown()


def _spawn(processes, world: int, data: str, out: str, pic: dict | None = None, tag: str = "",
           local_world: int = 0, double: bool = False) -> None:
    port = free_port()
    procs = [processes.spawn(_run, (r, world, port, data, out, pic, tag, local_world, double)) for r in range(world)]
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0, f"worker exit code {p.exitcode}"


# 2 ranks against one process reduce the same sums in another order (DDP averages two half-batch gradients; the
# single process sums the whole batch), so the runs agree to rounding, amplified by the training: in float32 the
# backbones ended 1.5e-4 apart on an AMD EPYC and < 1e-4 on Intel Xeons, a bound no CPU guarantees. In float64 the
# same amplification of a 2^-52 relative rounding (instead of 2^-23) is about 5e8 times smaller (~3e-13 from those
# 1.5e-4): 1e-9 leaves 3,000x of margin on any CPU, and a real difference (another batch, a lost gradient) is O(1e-3+).
AGREE = 1e-9


def test_two_ranks_equal_one_process_with_the_same_global_batch(processes, id_folder, tmp_path):
    _spawn(processes, 2, str(id_folder), str(tmp_path), double=True)
    _spawn(processes, 1, str(id_folder), str(tmp_path), double=True)
    r0, r1 = (torch.load(tmp_path / f"w2r{r}.pt") for r in (0, 1))
    single = torch.load(tmp_path / "w1r0.pt")
    assert r0["w"].dtype == single["backbone"]["features.0.weight"].dtype == torch.float64
    # one consistent bank: bit-identical replicas, updated only on the sampled rows
    assert torch.equal(r0["w"], r1["w"]) and torch.equal(r0["u"], r1["u"]) and torch.equal(r0["last"], r1["last"])
    assert len(r0["losses"]) == STEPS_PER_EPOCH * EPOCHS
    # the ranks' slices of every global batch form the single process's batch
    for k, global_ids in enumerate(single["ids"]):
        assert r0["ids"][k] + r1["ids"][k] == global_ids
    assert r0["losses"] == r1["losses"]  # the logged loss is the mean over ranks
    # the step's cross-entropy is float32 whatever the model's dtype: the mean of 16 positive row losses and the
    # mean of two 8-row means each carry at most (n-1)·2^-24 < 1e-6 relative rounding in any summation order
    np.testing.assert_allclose(r0["losses"], single["losses"], rtol=1e-5, atol=0)
    assert torch.equal(r0["last"], single["last"])
    assert (r0["w"] - single["w"]).abs().max() < AGREE and (r0["u"] - single["u"]).abs().max() < AGREE
    for k, v in single["backbone"].items():
        if "running" in k or "num_batches" in k:
            continue  # BN running stats: rank 0's own batches vs. the single process's sequential chunks
        assert (r0["backbone"][k] - v).abs().max() < AGREE, k


def _train_main(rank: int, world: int, port: int, argv: list[str], record: str) -> None:
    """train.main(argv) as rank `rank` of `world` ranks over gloo (world 1: a plain process), as torchrun would start
    it; the batches its loop receives (ids, per-sample pixel sums) go to the json file `record`."""
    sys.path.insert(0, str(ROOT))
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    from test_train_window import record_batches

    import train

    seen: list = []
    record_batches(seen, pixels=True)
    code = train.main(argv)
    Path(record).write_text(json.dumps(seen))
    sys.exit(code)


def _train_ranks(processes, world: int, argv: list[str], record: Path) -> list[list]:
    """Run `_train_main` on `world` ranks; -> each rank's recorded batches (the processes fixture kills and waits for
    every rank on any exit)."""
    port = free_port()
    procs = [processes.spawn(_train_main, (r, world, port, argv, f"{record}.r{r}.json")) for r in range(world)]
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0, f"rank exit code {p.exitcode}"
    return [json.loads(Path(f"{record}.r{r}.json").read_text()) for r in range(world)]


def _global_batches(ranks: list[list]) -> list[tuple[list[int], list[float]]]:
    """The ranks' batch k in rank order, as the bank's all-gather assembles it: the global batch k."""
    return [(sum((r[k][0] for r in ranks), []), sum((r[k][1] for r in ranks), [])) for k in range(len(ranks[0]))]


# per-sample pixel sums of 16-px views (768 values): the same augmentation gives the same pixels up to the last bits
# of a differently vectorised batch (< 1e-5 a pixel, so < 8e-3 a sum); other colour draws move a sum by O(10-100)
SAME_SUM = 0.05


@pytest.mark.parametrize("scheduler", ["epoch", "window"])
def test_a_run_moves_from_one_rank_to_two_and_back_on_the_same_trajectory(processes, tmp_path, scheduler):
    """1 rank -> 2 ranks -> 1 rank, resumed through train.py each time (gloo, memory backend, augmentation on): the
    global batches, ids and augmentations, are those of an uninterrupted 1-rank run, and so are the bank's
    recent-negative ring and the step each row was last trained at. 49 images at batch 10 on 2 ranks is also the
    case where rank 0's loader had one batch more than the plan."""
    folder = write_id_folder(tmp_path / "d", n=49)
    argv = [f"--data.path={folder}", "--data.backend=memory", "--data.workers=0", "--data.image_size=16",
            "--data.batch_size=10", f"--data.scheduler={scheduler}", "--data.window=30", "--data.stride=10",
            "--model.arch=tiny", "--model.head_hidden=32", "--model.dim=16", "--pic.negatives=recent", "--pic.k=20",
            "--optim.epochs=3", "--optim.warmup_epochs=1", "--run.eval=none", "--run.monitor_every=0",
            "--run.device=cpu", "--run.threads=1", f"--run.out_dir={tmp_path}"]
    total = {"epoch": 3 * (49 // 10), "window": -(-3 * 49 // 30) * (30 // 10)}[scheduler]  # 12 and 15 steps
    ref = _global_batches(_train_ranks(processes, 1, [*argv, "--run.name=ref"], tmp_path / "ref"))
    assert len(ref) == total
    moved = []
    for world, extra in ((1, ["--run.max_steps=3"]), (2, ["--run.resume=auto", "--run.max_steps=5"]),
                         (1, ["--run.resume=auto"])):
        ranks = _train_ranks(processes, world, [*argv, "--run.name=moved", *extra], tmp_path / f"w{world}")
        moved += _global_batches(ranks)
    assert [ids for ids, _ in moved] == [ids for ids, _ in ref]
    for k, ((_, a), (_, b)) in enumerate(zip(moved, ref, strict=True)):
        assert np.abs(np.subtract(a, b)).max() < SAME_SUM, k
    a, b = (torch.load(tmp_path / name / "last.pt", weights_only=True) for name in ("ref", "moved"))
    assert a["progress"]["step"] == b["progress"]["step"] == total
    assert torch.equal(a["bank"]["rows"]["last"], b["bank"]["rows"]["last"])
    assert torch.equal(a["bank"]["negatives"]["recent"], b["bank"]["negatives"]["recent"])


@pytest.mark.parametrize("dtype,cache", [("fp32", "auto"), ("bf16", "off")])
def test_two_ranks_sharing_one_host_bank_equal_two_replicated_banks(processes, id_folder, tmp_path, dtype, cache):
    """One copy in shared memory for the node's 2 ranks, written by local rank 0 (model/bank/files.py), trains
    bit-identically to a bank replicated on each rank. fp32: the host bank keeps the ring's rows on the device
    (pic.bank_cache=auto), the replicated one does not; bf16 (whose rows the cache rounds less often): neither."""
    _spawn(processes, 2, str(id_folder), str(tmp_path), {"bank_dtype": dtype, "bank_cache": cache}, tag="dev")
    folder = str(tmp_path / "shm-bank")
    _spawn(processes, 2, str(id_folder), str(tmp_path), {"bank_dtype": dtype, "bank_storage": "host",
                                                         "bank_file": folder, "bank_cache": cache}, tag="host")
    d0, d1 = (torch.load(tmp_path / f"w2r{r}dev.pt") for r in (0, 1))
    h0, h1 = (torch.load(tmp_path / f"w2r{r}host.pt") for r in (0, 1))
    assert (h0["writer"], h1["writer"]) == (True, False) and h0["mapped"] and h1["mapped"]
    assert h0["cached"] == h1["cached"] == (cache == "auto") and not d0["cached"]
    assert not d0["mapped"]
    assert h0["w"].dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    for k in ("w", "u", "last"):
        assert torch.equal(h0[k], h1[k]), k  # one copy: both ranks read the same rows
        assert torch.equal(h0[k], d0[k]) and torch.equal(d0[k], d1[k]), k
    assert h0["losses"] == d0["losses"]
    assert (h0["w"].float() - torch.load(tmp_path / "w2r0dev.pt")["w"].float()).abs().max() == 0
    assert (h0["last"] >= 0).sum() > 0  # trained


def test_two_nodes_on_one_shared_folder_each_keep_their_own_mmap_copy(processes, id_folder, tmp_path):
    """2 ranks as 2 nodes of 1 (LOCAL_WORLD_SIZE=1) and one pic.bank_file folder, as on a shared file system: each
    node writes its own copy (node0/, node1/), never the other's; both equal the replicated device banks, and a
    checkpoint written once (rank 0's reference) resumes every node's copy."""
    _spawn(processes, 2, str(id_folder), str(tmp_path), tag="dev")
    folder = tmp_path / "shared-fs-bank"
    _spawn(processes, 2, str(id_folder), str(tmp_path), {"bank_storage": "mmap", "bank_file": str(folder)},
           tag="mmap", local_world=1)
    d0 = torch.load(tmp_path / "w2r0dev.pt")
    m0, m1 = (torch.load(tmp_path / f"w2r{r}mmap.pt") for r in (0, 1))
    assert (m0["writer"], m1["writer"]) == (True, True) and m0["cached"]
    assert (m0["folder"], m1["folder"]) == (str(folder / "node0"), str(folder / "node1"))
    for k in ("w", "u", "last"):
        assert torch.equal(m0[k], m1[k]) and torch.equal(m0[k], d0[k]), k
    a, b = ((folder / f"node{r}" / "weight.bin").read_bytes() for r in (0, 1))
    assert a == b
    metas = [json.loads((folder / f"node{r}" / "meta.json").read_text()) for r in (0, 1)]
    assert metas[0]["run_id"] == metas[1]["run_id"]


def _torchrun(processes, args: list[str], out: Path, name: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--max-restarts=2",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", f"--rdzv-id={name}",
           str(ROOT / "train.py"), *args, f"--run.out_dir={out}", f"--run.name={name}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return processes.popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                           start_new_session=True)


def test_torchrun_restart_after_a_killed_worker_resumes_the_same_run(processes, digits_root, tmp_path):
    data = tmp_path / "d"
    for i, f in enumerate(sorted((digits_root / "train").rglob("*.jpg"))[:64]):
        (data / "x").mkdir(parents=True, exist_ok=True)
        shutil.copy(f, data / "x" / f"{i:03d}.jpg")
    args = [f"--data.path={data}", "--data.backend=memory", "--data.workers=0", "--data.image_size=16",
            "--data.batch_size=16", "--model.arch=tiny", "--model.head_hidden=32", "--model.dim=16",
            "--pic.negatives=recent", "--pic.k=32", "--optim.epochs=15", "--run.eval=none", "--run.log_every=1",
            "--run.ckpt_every=4", "--run.threads=1", "--run.device=cpu"]
    ref = _torchrun(processes, args, tmp_path, "ref")
    out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, out
    # the online monitor is on by default (auto: every 4 of 15 epochs, and the end): rank 0 evaluates, rank 1 waits
    recs = map(json.loads, (tmp_path / "ref" / "log.jsonl").read_text().splitlines())
    assert [r["step"] for r in recs if r.get("event") == "monitor"] == [0, 16, 32, 48, 60]
    assert out.count("monitor @ epoch") == 5
    run = _torchrun(processes, args, tmp_path, "killed")
    log = tmp_path / "killed" / "log.jsonl"
    wait_until(lambda: log.exists() and log.read_text().count("\n") >= 6, "6 log lines", [run])
    workers = [int(p) for p in processes.run(["pgrep", "-P", str(run.pid)], capture_output=True,
                                             text=True).stdout.split()]
    assert workers, "no worker processes found"
    os.kill(max(workers), signal.SIGKILL)  # one worker dies mid-run
    out, _ = run.communicate(timeout=300)
    assert run.returncode == 0, out
    assert "resumed from" in out
    a = torch.load(tmp_path / "ref" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "last.pt", weights_only=True)
    assert a["progress"]["step"] == b["progress"]["step"] == 60
    a, b = checkpoint_tensors(a), checkpoint_tensors(b)
    for k in ("bank.weight", "bank.momentum", "bank.last"):
        assert torch.equal(a[k], b[k]), k


def _readback(rank: int, port: int, out: str) -> None:
    sys.path.insert(0, str(ROOT))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    import train
    from model import distributed as dist

    dist.init("cpu")

    class Quiet:
        def record(self, record):
            pass

        def epochs_at(self, step):
            return step

    readback = train.LossReadback(tiny_config("", out, optim={"max_nonfinite": 1}), Quiet())
    # rank 1 alone sees a non-finite loss at step 1: both ranks must count it (and so stop) alike
    losses = {0: [1.0, 2.0, 3.0], 1: [3.0, float("nan"), 5.0]}[rank]
    for s, v in enumerate(losses):
        readback.add(s, 0.1, torch.tensor(v), read_now=s in (1, 2), sync_free=True)
        if s == 1:
            stop_after_1 = readback.too_many_nonfinite()
    torch.save({"losses": readback.losses, "stop": stop_after_1}, f"{out}/readback{rank}.pt")
    dist.shutdown()


def test_sync_free_losses_are_read_back_as_the_mean_over_ranks(processes, tmp_path):
    """The CUDA loop reads losses on log steps only; under DDP every rank must log the same mean and make the
    same non-finite stop decision (one rank raising alone would leave the others waiting)."""
    port = free_port()
    procs = [processes.spawn(_readback, (r, port, str(tmp_path))) for r in (0, 1)]
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    a, b = (torch.load(tmp_path / f"readback{r}.pt") for r in (0, 1))
    assert a == b and a["losses"] == [2.0, 4.0] and a["stop"] is True  # means; the NaN step counted on both


def test_an_mmap_bank_resumes_on_as_many_nodes_as_wrote_it(tmp_path):
    """A device or host bank is in the checkpoint and resumes at any world size; an mmap bank is one folder per
    node (node<i>/ when several): on another number of nodes it is refused before any bank is built, naming both."""
    from model.bank import BankOptions
    from model.bank.files import FileRows
    from model.bank.options import check_resumable
    from model.checkpoint import CheckpointError

    folder = tmp_path / "bank"
    rows = FileRows("mmap", folder, 10, 4, torch.float32)
    ref = rows.reference(0)
    rows.close(remove=True)
    assert ref["nodes"] == 1  # recorded in every checkpoint's reference
    options = BankOptions(dim=4, negatives="recent", storage="mmap", folder=str(folder))
    check_resumable({"rows": ref}, options, "last.pt")  # one node, whatever its ranks: accepted
    with pytest.raises(CheckpointError, match=r"on 2 node\(s\).*this run has 1"):
        check_resumable({"rows": {**ref, "nodes": 2}}, options, "last.pt")
