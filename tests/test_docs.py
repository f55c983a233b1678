"""The README and docs/ as a newcomer uses them: every relative link and image resolves (anchors included), nothing
in the repository points outside it, every `python -m ...` command they show and every console command answers
`--help`, and `pip install -e .` puts one name on the import path."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from pic.commands import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# `python -m MODULE` in the docs; the module's optional package when it needs one (skipped where it is absent)
PYTHON_M = re.compile(r"python3? -m ((?:benchmarks|eval|pipeline)\.[a-z0-9_]+)")
NEEDS = {"pipeline.convert_ffcv": "ffcv"}
# what no file may hold: the development machine's folders and the notes that lived beside the checkout
OUTSIDE = re.compile("|".join([re.escape("/wo" + "rk/"), re.escape("../sha" + "red"), "PIC_" + "SPEC"]))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text))


def anchors(md: Path) -> set[str]:
    out = set()
    in_code = False
    for line in md.read_text().splitlines():
        in_code ^= line.startswith("```")
        if not in_code and line.startswith("#"):
            out.add(slug(line.lstrip("#")))
    return out


def links(md: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)  # code blocks hold no links
    return LINK.findall(text)


@pytest.mark.parametrize("md", DOCS, ids=lambda p: p.name)
def test_every_relative_link_and_image_resolves(md):
    bad = []
    for target in links(md):
        if re.match(r"[a-z]+:", target):  # https:, mailto:: not followed here (no network)
            continue
        path, _, anchor = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        if ROOT not in dest.parents and dest != ROOT:
            bad.append(f"{target}: outside the repository")
        elif not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading with that anchor in {dest.name}")
    assert not bad, f"{md.name}: " + "; ".join(bad)


def test_docs_index_in_the_readme_lists_every_page():
    readme_links = {t.partition("#")[0] for t in links(ROOT / "README.md")}
    missing = [p.name for p in DOCS[1:] if f"docs/{p.name}" not in readme_links]
    assert not missing, f"docs pages the README does not link: {missing}"


def test_readme_stays_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 210


def repository_files() -> list[Path]:
    try:
        names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                               text=True, check=True, timeout=60).stdout.split("\n")
        files = [ROOT / n for n in names if n]
    except (OSError, subprocess.SubprocessError):  # not a git checkout (an unpacked archive): walk it
        skip = {".git", ".venv", ".venv-gpustack", "runs", "data", "__pycache__", ".pytest_cache", ".ruff_cache"}
        files = [p for p in ROOT.rglob("*") if p.is_file() and not skip & set(p.relative_to(ROOT).parts)]
    return [f for f in files if f.is_file() and f.suffix not in (".png", ".jpg", ".pt", ".npy", ".beton")]


def test_no_file_points_outside_the_repository():
    hits = []
    for f in repository_files():
        try:
            text = f.read_text()
        except UnicodeDecodeError:
            continue
        hits += [f"{f.relative_to(ROOT)}:{n}" for n, line in enumerate(text.splitlines(), 1) if OUTSIDE.search(line)]
    assert not hits, "paths outside the repository: " + ", ".join(hits[:20])


# tracker numbers (the word issue and a number) and references to the old spec (spec, § and a number): the method is
# docs/method.md
TRACKER = re.compile(r"\b[Ii]ssue[ -]\d+|\bspec §\d+")


def test_no_tracker_numbers_or_old_spec_references():
    hits = []
    for f in repository_files():
        rel = f.relative_to(ROOT).as_posix()
        if f.suffix == ".json":
            continue
        try:
            lines = f.read_text().splitlines()
        except UnicodeDecodeError:
            continue
        hits += [f"{rel}:{n}" for n, line in enumerate(lines, 1) if TRACKER.search(line)]
    assert not hits, "tracker numbers or old spec references: " + ", ".join(hits[:20])


def doc_modules() -> list[str]:
    found = set()
    for md in DOCS:
        found |= set(PYTHON_M.findall(md.read_text()))
    return sorted(found)


# Runs each command's --help in one process (torch is imported once, not once per command): prints one JSON line
# {name: [exit code, output]}; a command is "train.py", a module run as `python -m`, or "pkg.mod:function"
HELP_RUNNER = """
import contextlib, io, json, runpy, sys, importlib
out = {}
for name, kind, target in json.loads(sys.argv[1]):
    buf, code = io.StringIO(), None
    sys.argv = [name, "--help"]
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            if kind == "script":
                runpy.run_path(target, run_name="__main__")
            elif kind == "module":
                runpy.run_module(target, run_name="__main__", alter_sys=True)
            else:
                mod, fn = target.split(":")
                getattr(importlib.import_module(mod), fn)()
    except SystemExit as e:
        code = e.code
    except BaseException as e:
        code = f"{type(e).__name__}: {e}"
    out[name] = [0 if code is None else code, buf.getvalue()]
print(json.dumps(out))
"""


def help_commands() -> tuple[list[tuple[str, str, str]], list[str]]:
    """(name, kind, target) of every command the docs show and every console command, and why some are skipped."""
    cmds, skipped = [("train.py", "script", str(ROOT / "train.py"))], []
    for m in doc_modules():
        need = NEEDS.get(m)
        if need and importlib.util.find_spec(need) is None:
            skipped.append(f"{m} needs {need}, which is not installed")
        else:
            cmds.append((m, "module", m))
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    cmds += [(c, "entry", target) for c, target in scripts.items() if COMMANDS[c][0] not in NEEDS
             or importlib.util.find_spec(NEEDS[COMMANDS[c][0]]) is not None]
    return cmds, skipped


def test_every_command_the_docs_show_answers_help(processes, tmp_path):
    """Each `python -m` module of the docs, train.py and every console command's entry point, from another folder."""
    cmds, skipped = help_commands()
    assert len(doc_modules()) >= 15, doc_modules()  # the extraction still finds the docs' commands
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(ROOT)  # the `python -m` forms run in the checkout; entry points add it themselves
    proc = processes.run([sys.executable, "-c", HELP_RUNNER, json.dumps(cmds)], timeout=280, env=env, cwd=tmp_path,
                         capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    failed = [f"{n}: exit {code}: {text[-300:]}" for n, (code, text) in results.items() if code != 0 or not text]
    assert not failed and len(results) == len(cmds), "\n".join(failed)
    if skipped:
        pytest.skip("; ".join(skipped))


def test_an_installed_console_command_runs_from_any_folder(processes, tmp_path):
    """The installed wrapper itself (what `pip install -e .` writes), from a folder outside the checkout."""
    exe = Path(sys.executable).parent / "pic-train"
    if not exe.exists():
        pytest.skip("the console commands are not installed in this environment (pip install -e .)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = processes.run([str(exe), "--help"], timeout=120, env=env, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0 and "--data.path" in proc.stdout + proc.stderr, proc.stderr[-1000:]


def test_console_commands_are_the_ones_packaged():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == set(COMMANDS)
    readme = (ROOT / "README.md").read_text()
    assert all(c in readme for c in ("pic-train", "pic-convert")), "the README shows the console form"


def test_install_puts_one_name_on_the_import_path(processes, tmp_path):
    """From another folder, without PYTHONPATH: `pic` imports (when installed), the checkout's short names do not."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = ("import importlib.util as u; print(bool(u.find_spec('pic')), "
            "[m for m in ('train', 'config', 'model', 'pipeline', 'eval', 'benchmarks') if u.find_spec(m)])")
    proc = processes.run([sys.executable, "-c", code], timeout=60, env=env, cwd=tmp_path, capture_output=True,
                         text=True)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.strip()
    if not out.startswith("True"):
        pytest.skip("pic is not installed in this environment (pip install -e .)")
    assert out == "True []", out


def test_a_benchmark_record_names_checkout_paths_relative_to_it(tmp_path):
    """A committed record must not point into the machine it ran on: paths inside the checkout are stored relative."""
    from benchmarks.common import write_record

    inside, outside = ROOT / "benchmarks" / "scratch" / "photos", tmp_path / "photos"
    args = {"data": str(inside), "data_path": inside, "json": str(outside), "mode": "crop"}
    rec = json.loads(write_record("bench_x", args, [{"data": str(inside)}], path=tmp_path / "r.json").read_text())
    assert rec["args"] == {"data": "benchmarks/scratch/photos", "data_path": "benchmarks/scratch/photos",
                           "json": str(outside), "mode": "crop"}
    assert rec["rows"] == [{"data": "benchmarks/scratch/photos"}]
