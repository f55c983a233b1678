"""The training loop end to end on CPU: resume exactness, checkpoints, errors, export, the demo's evaluation."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import ROOT, checkpoint_tensors, tiny_config, wait_until

import train
from config import to_dict
from model.checkpoint import CheckpointError, load
from model.optim import lr_table


def losses_of(run_dir: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if "event" not in r]


@pytest.mark.parametrize("negatives", ["full", "recent"])
def test_resume_reproduces_the_uninterrupted_loss_sequence(digits_root, tmp_path, negatives):
    kw = dict(pic={"negatives": negatives, "k": 32}, data={"subset": 96})
    full = tiny_config(str(digits_root / "train"), str(tmp_path / "a"), **kw)
    out = train.train(full)
    assert out["steps"] == 12
    part = tiny_config(str(digits_root / "train"), str(tmp_path / "b"), run={"max_steps": 5}, **kw)
    assert train.train(part)["step"] == 5
    rest = tiny_config(str(digits_root / "train"), str(tmp_path / "b"), run={"resume": "auto"}, **kw)
    train.train(rest)
    a, b = losses_of(tmp_path / "a" / "t"), losses_of(tmp_path / "b" / "t")
    assert len(a) == len(b) == 12
    assert a == b  # bit-identical on CPU
    wa = checkpoint_tensors(load(tmp_path / "a" / "t" / "last.pt"))
    wb = checkpoint_tensors(load(tmp_path / "b" / "t" / "last.pt"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_checkpoint_is_plain_data_and_guards_against_other_runs(digits_root, tmp_path):
    cfg = tiny_config(str(digits_root / "train"), str(tmp_path), data={"subset": 64}, run={"max_steps": 2})
    train.train(cfg)
    ckpt_path = tmp_path / "t" / "last.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)  # loads with the safe unpickler
    assert ckpt["progress"]["step"] == 2 and ckpt["meta"]["num_instances"] == 64
    assert ckpt["config"] == to_dict(cfg)
    other = tiny_config(str(digits_root / "train"), str(tmp_path), data={"subset": 80}, run={"resume": "auto"})
    with pytest.raises(CheckpointError, match="trained with data.subset=64; this run asks 80"):
        train.train(other)
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bogus.pt"):
        load(bogus)
    assert ckpt_path.exists()  # nothing already written is lost


def test_main_reports_bad_input_in_one_line(tmp_path, capsys):
    assert train.main([f"--data.path={tmp_path / 'missing'}", f"--run.out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing" in err[0]
    assert train.main(["--optim.lrr=1"]) == 2
    assert "optim.lrr" in capsys.readouterr().err


def _config_args(cfg, tmp_path: Path, **run) -> list[str]:
    """train.main's command line for `cfg` (through --config) plus run.* overrides."""
    f = tmp_path / "cfg.json"
    f.write_text(json.dumps(to_dict(cfg)))
    return [f"--config={f}", *(f"--run.{k}={v}" for k, v in run.items())]


def test_a_fresh_run_in_a_folder_that_holds_a_run_is_refused_and_resume_of_a_complete_run_trains_nothing(
        digits_root, tmp_path, capsys):
    cfg = tiny_config(str(digits_root / "train"), str(tmp_path), data={"subset": 32}, optim={"epochs": 1})
    assert train.main(_config_args(cfg, tmp_path)) == 0
    run = tmp_path / "t"
    files = {n: (run / n).read_bytes() for n in ("last.pt", "log.jsonl", "results.json", "config.json")}
    capsys.readouterr()
    assert train.main(_config_args(cfg, tmp_path)) == 2  # the same command again: refused before any write
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: run folder ") and str(run) in err[0], err
    assert "--run.resume=auto" in err[0] and "--run.name" in err[0] and "delete the folder" in err[0]
    assert {n: (run / n).read_bytes() for n in files} == files
    # resumed, the complete run trains nothing and rewrites nothing (`make demo` twice)
    assert train.main(_config_args(cfg, tmp_path, resume="auto")) == 0
    assert "is a complete run (step 2/2): nothing to train" in capsys.readouterr().out
    assert {n: (run / n).read_bytes() for n in ("last.pt", "log.jsonl", "results.json")} == \
        {n: files[n] for n in ("last.pt", "log.jsonl", "results.json")}
    # a folder whose run stopped at a config error (an empty log, no checkpoint) holds nothing: a fresh run starts
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "log.jsonl").write_text("")
    assert train.main(_config_args(cfg, tmp_path, name="e", max_steps=1)) == 0


def _folder_files(run: Path) -> dict[str, bytes]:
    """Every file of a run folder and its bytes (not the lock file, which records the process holding the folder)."""
    return {p.name: p.read_bytes() for p in sorted(run.iterdir()) if p.is_file() and p.name != ".pic.lock"}


@pytest.mark.parametrize("change,why", [
    ("--optim.lr=0.05", "was trained with optim.lr=0.1"),  # the schedule
    ("--optim.epochs=3", "was trained with optim.epochs=2"),  # the plan (total steps)
    ("--model.dim=8", "checkpoint has dim=16 but this run has dim=8"),  # the checkpoint
    ("--pic.bank_dtype=bf16", "holds a fp32 bank; this run asks pic.bank_dtype=bf16"),  # the bank
])
def test_a_refused_resume_leaves_the_run_folder_as_it_was(id_folder, tmp_path, capsys, change, why):
    """A resume refused in one line (exit 2) has rewritten nothing: config.json, manifest.tsv and every other file
    of the run folder are byte for byte as the run left them."""
    cfg = tiny_config(str(id_folder), str(tmp_path), pic={"negatives": "recent", "k": 16}, run={"max_steps": 4})
    assert train.main(_config_args(cfg, tmp_path)) == 0
    run = tmp_path / "t"
    before = _folder_files(run)
    assert {"config.json", "manifest.tsv", "last.pt", "prev.pt"} <= before.keys()
    capsys.readouterr()
    assert train.main([*_config_args(cfg, tmp_path, resume="auto"), change]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and why in err[0], err
    assert _folder_files(run) == before


def test_a_refused_resume_from_another_runs_checkpoint_keeps_this_runs_manifest(id_folder, tmp_path, capsys):
    """A run folder resumed from another run's checkpoint gets that run's manifest, but only once the resume is
    accepted: refused (another lr), the folder keeps its own run's manifest.tsv and config.json."""
    data = tmp_path / "data"
    shutil.copytree(id_folder, data)  # (copy2: the same sizes and times, the same files to the other run's manifest)
    other = tmp_path / "other-data"
    shutil.copytree(data, other)
    (other / "class_0" / "img_000.jpg").unlink()  # the other run trained on one file fewer: another manifest
    cfg = tiny_config(str(other), str(tmp_path), run={"name": "other", "max_steps": 2})
    assert train.main(_config_args(cfg, tmp_path)) == 0
    cfg = tiny_config(str(data), str(tmp_path), run={"max_steps": 2})
    assert train.main(_config_args(cfg, tmp_path)) == 0
    run = tmp_path / "t"
    before = _folder_files(run)
    assert before["manifest.tsv"] != (tmp_path / "other" / "manifest.tsv").read_bytes()
    capsys.readouterr()
    args = _config_args(cfg, tmp_path, resume=tmp_path / "other" / "last.pt")
    assert train.main([*args, "--optim.lr=0.05"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was trained with optim.lr=0.1" in err[0], err
    assert _folder_files(run) == before


def test_export_loads_into_torchvision(digits_root, tmp_path):
    cfg = tiny_config(str(digits_root / "train"), str(tmp_path), data={"subset": 32, "batch_size": 16},
                      model={"arch": "resnet18", "head_hidden": 32}, optim={"epochs": 1})
    out = train.train(cfg)
    assert out["num_instances"] == 32
    state = torch.load(tmp_path / "t" / "backbone.pt", weights_only=True)
    m = torchvision.models.resnet18()
    m.load_state_dict(state, strict=True)  # fc.* is torchvision's own init: the backbone has no classifier
    ckpt = torch.load(tmp_path / "t" / "last.pt", weights_only=True)["model"]
    assert torch.equal(m.layer4[1].bn2.weight, ckpt["backbone.layer4.1.bn2.weight"])


def test_nonfinite_loss_is_skipped_then_stops(digits_root, tmp_path):
    cfg = tiny_config(str(digits_root / "train"), str(tmp_path), data={"subset": 64},
                      optim={"lr": 1e30, "max_nonfinite": 3})
    with pytest.raises(FloatingPointError, match=r"non-finite 3 times in a row \(last at step 4\)"):
        train.train(cfg)
    def refuse(constant):  # strict JSON: Python's json writes NaN / Infinity, which other readers refuse
        raise AssertionError(f"log.jsonl holds {constant}")

    events = [json.loads(x, parse_constant=refuse) for x in (tmp_path / "t" / "log.jsonl").read_text().splitlines()]
    bad = [e for e in events if e.get("event") == "nonfinite_loss"]
    # steps done, as everywhere: step 1's loss is taken before any update (finite), steps 2-4 after lr 1e30 ones
    assert [e["step"] for e in bad] == [2, 3, 4]
    assert all(e["loss"] is None and e["value"] in ("nan", "inf", "-inf") for e in bad)
    assert (tmp_path / "t" / "last.pt").exists()


def test_evaluation_writes_results(digits_root, tmp_path):
    small = tmp_path / "small"  # every 8th training digit: 10 classes, ~180 images
    for i, f in enumerate(sorted((digits_root / "train").rglob("*.jpg"))):
        if i % 8 == 0:
            (small / f.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, small / f.parent.name / f.name)
    cfg = tiny_config(str(small), str(tmp_path), data={"eval_path": str(digits_root / "val")},
                      run={"eval": "auto"}, optim={"epochs": 1})
    train.train(cfg)
    res = json.loads((tmp_path / "t" / "results.json").read_text())
    for key in ("retrieval_top1", "retrieval_top1_random_init", "knn_top1", "knn_top1_random_init", "final_loss",
                "num_instances", "images_per_second", "device", "epochs", "seconds"):
        assert key in res
    assert 10 < res["knn_top1_random_init"] <= 100  # digits are easy even for random features


@pytest.mark.timeout(600)
def test_sigterm_saves_a_checkpoint_and_exits(processes, digits_root, tmp_path):
    cmd = [sys.executable, str(ROOT / "train.py"), f"--data.path={digits_root / 'train'}", "--data.backend=memory",
           "--data.workers=0", "--data.image_size=16", "--data.batch_size=16", "--model.arch=tiny",
           "--model.head_hidden=32", "--optim.epochs=1000", f"--run.out_dir={tmp_path}", "--run.name=s",
           "--run.eval=none", "--run.monitor_every=0", "--run.log_every=1", "--run.device=cpu"]
    proc = processes.popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log = tmp_path / "s" / "log.jsonl"
    wait_until(lambda: log.exists() and log.read_text().count("\n") >= 3, "3 logged steps", [proc])
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "SIGTERM: checkpoint saved" in out
    step = load(tmp_path / "s" / "last.pt")["progress"]["step"]
    assert step >= 3


def test_eval_command_lines_run_on_a_checkpoint(digits_root, tmp_path, capsys):
    from eval import knn, linear

    cfg = tiny_config(str(digits_root / "train"), str(tmp_path), data={"subset": 64}, run={"max_steps": 2})
    train.train(cfg)
    ckpt = str(tmp_path / "t" / "last.pt")
    common = ["--ckpt", ckpt, "--train", str(digits_root / "train"), "--val", str(digits_root / "val"),
              "--workers", "0"]
    assert knn.main(common) == 0
    assert "kNN top-1" in capsys.readouterr().out
    assert linear.main(common + ["--cached", "--epochs", "3", "--lr", "1.0"]) == 0
    out = capsys.readouterr().out
    top1 = float(out.split("top-1")[1].split()[0])
    assert top1 > 30  # 10 classes: far above chance even on a barely trained backbone
    assert linear.main(common + ["--epochs", "1", "--batch-size", "64"]) == 0


def test_sync_free_step_equals_the_sync_step_and_skips_on_the_device(tmp_path):
    """The CUDA loop's device-side skip (fused SGD found_inf + masked bank update), run here on the CPU."""
    from model.bank import BankOptions, make_bank
    from model.trainer import build_trainer

    lrs = lr_table(0.5, 2, 50, 1e-6)
    runs = {}
    for sync_free in (False, True):
        for negatives in ("full", "recent"):
            cfg = tiny_config(str(tmp_path), str(tmp_path), data={"batch_size": 8}, run={"seed": 1},
                              pic={"negatives": negatives, "k": 16}, model={"amp": "off", "channels_last": False})
            # float64 (model, momentum buffers, bank, inputs): the two modes run other kernels (fused SGD with
            # found_inf, masked bank update), whose float32 rounding the training amplifies by a CPU-dependent amount
            torch.set_default_dtype(torch.float64)
            try:
                trainer = build_trainer(cfg, 64, torch.device("cpu"), lrs=lrs, fused=True, sync_free=sync_free)
            finally:
                torch.set_default_dtype(torch.float32)
            model, step_fn = trainer.model, trainer.train_step
            model.bank = make_bank(BankOptions.from_config(cfg).replace(dtype="fp64"), 64, lrs, "cpu",
                                   generator=torch.Generator().manual_seed(cfg.run.seed + 1))
            assert step_fn.sync_free == sync_free
            g = torch.Generator().manual_seed(0)
            losses = []
            for s in range(8):
                x = torch.randn(8, 3, 16, 16, generator=g, dtype=torch.float64)
                if s in (0, 3):
                    x[0, 0, 0, 0] = float("nan")  # a poisoned batch: this step must change nothing
                ids = torch.randint(0, 64, (8,), generator=g)
                losses.append(float(step_fn(x, ids, (), s, float(lrs[s]))))
            runs[sync_free, negatives] = (losses, {k: v.clone() for k, v in model.state_dict().items()})
    for negatives in ("full", "recent"):
        (la, sa), (lb, sb) = runs[False, negatives], runs[True, negatives]
        assert [x != x for x in la] == [x != x for x in lb] == [s in (0, 3) for s in range(8)]
        # the losses are float32 (the step's cross-entropy), computed from float64 logits that agree to ~1e-15
        assert [x for x in la if x == x] == pytest.approx([x for x in lb if x == x], rel=1e-6)
        for k in sa:
            if "running" in k:
                continue  # BN running stats saw the NaN batch in both modes (forward runs before the check)
            assert sa[k].dtype in (torch.float64, torch.int64), k
            assert ((sa[k] - sb[k]).abs().max() <= 1e-10 * max(1.0, sa[k].abs().max())), k
