"""A run's report: one PNG of its curves and monitor points, and one HTML page with that picture, the final
results, the monitor points, the config and the provenance (git sha, versions, hardware).

    python -m eval.report runs/NAME                          # -> runs/NAME/report.png and report.html
    python -m eval.report --compare runs/A runs/B            # A and B overlaid -> runs/A/compare.png and .html
    python -m eval.report runs/A --compare runs/B --out cmp  # the same, written to cmp.png and cmp.html

Everything comes from the run folder: log.jsonl (training lines and `"event": "monitor"` points), results.json
(written when a run completes), config.json (config, plan, and the environment the run started in). A folder
without a readable, non-empty log.jsonl is one `error:` line and exit 2. Curves are drawn over epochs (the unit
two runs with different batch sizes share); a resumed run's redone steps count once (the last record wins).
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

RESULT_LABELS = {  # results.json key -> what the table calls it
    "knn_top1": "kNN top-1, held-out images (%)", "knn_top1_random_init": "kNN top-1, random init (%)",
    "retrieval_top1": "instance retrieval top-1, gallery of min(N, 100k) (%)",
    "retrieval_top1_random_init": "instance retrieval top-1, random init (%)",
    "final_loss": "final loss (mean of the last unit)", "ln_num_instances": "ln N",
    "num_instances": "instances N", "epochs": "epochs", "steps": "steps", "train_seconds": "training time (s)",
    "images_per_second": "images / s (training loop)", "monitor_points": "monitor points",
    "monitor_seconds": "monitor time (s)", "monitor_pct_of_training": "monitor cost (% of training time)",
    "bad_files": "undecodable files", "arch": "backbone", "backend": "data backend", "device": "device",
    "git_sha": "git sha", "seconds": "wall time of the run (s)",
}


class ReportError(ValueError):
    pass


@dataclass
class Run:
    name: str
    path: Path
    steps: list[dict]  # training log lines, one per logged step
    monitor: list[dict]  # monitor points
    results: dict = field(default_factory=dict)  # results.json ({} for an unfinished run)
    config: dict = field(default_factory=dict)  # config.json: {"config", "resolved", "env"}

    @property
    def num_instances(self) -> int | None:
        return self.results.get("num_instances") or self.config.get("resolved", {}).get("num_instances")


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def read_run(path: str | Path) -> Run:
    path = Path(path)
    log = path / "log.jsonl"
    if not log.is_file():
        raise ReportError(f"no log.jsonl in {path}: not a run folder (runs/NAME)")
    steps: dict[int, dict] = {}
    monitor: dict[int, dict] = {}
    for n, line in enumerate(log.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            if n == len(log.read_text().splitlines()):  # a killed run's half-written last line
                continue
            raise ReportError(f"{log}: line {n} is not JSON") from None
        if "event" not in r:
            steps[r["step"]] = r
        elif r["event"] == "monitor":
            monitor[r["step"]] = r
    if not steps and not monitor:
        raise ReportError(f"{log} has no training lines yet: nothing to report")
    return Run(path.resolve().name, path, [steps[k] for k in sorted(steps)], [monitor[k] for k in sorted(monitor)],
               _json(path / "results.json"), _json(path / "config.json"))


# ============ the picture ============

def draw(runs: list[Run], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.2))
    (ax_loss, ax_knn, ax_ret), (ax_lr, ax_ips, ax_wait) = axes
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        c = colors[i % len(colors)]
        label = run.name if len(runs) > 1 else "this run"
        ep = [r["epoch"] for r in run.steps]
        ax_loss.plot(ep, [math.nan if r["loss"] is None else r["loss"] for r in run.steps], color=c, lw=1.2,
                     label=f"{label}: loss")  # None: a non-finite loss (run_log.strict_json)
        width, what = chance(run)
        if width and width not in [chance(r)[0] for r in runs[:i]]:  # one line per soft-max width
            ax_loss.axhline(_ln(width), color=c, ls=":", lw=1, label=f"chance: {what}")
        ax_lr.plot(ep, [r["lr"] for r in run.steps], color=c, lw=1.2, label=label)
        ax_ips.plot(ep, [r["img_s"] for r in run.steps], color=c, lw=1, label=label)
        ax_wait.plot(ep, [r["data_wait_pct"] for r in run.steps], color=c, lw=1, label=label)
        for ax, key, final_key, final_what in ((ax_knn, "knn_top1", "knn_top1", "end-of-run kNN, held-out images"),
                                               (ax_ret, "retrieval_top1", "retrieval_top1",
                                                "end-of-run, gallery of min(N, 100k)")):
            pts = [r for r in run.monitor if key in r]
            if pts:
                kinds = " + ".join(sorted({_knn_kind(r) for r in pts})) if key == "knn_top1" else ""
                ax.plot([r["epoch"] for r in pts], [r[key] for r in pts], "o-", color=c, lw=1.4, ms=5, clip_on=False,
                        label=f"{label}: monitor{f' ({kinds})' if kinds else ''}")
            if final_key in run.results:
                ax.plot([run.results.get("epochs", ep[-1] if ep else 0)], [run.results[final_key]], "*", color=c,
                        ms=13, mec="black", mew=0.6, clip_on=False, label=f"{label}: {final_what}")
    ax_loss.set(title="training loss", ylabel="cross-entropy (nats)")
    kinds = {_knn_kind(r) for run in runs for r in run.monitor if "knn_top1" in r}
    # two kinds of monitor kNN on one axis are two measures (different queries), not one curve to compare
    mixed = "\nmonitor points of different kinds: not comparable with each other" if len(kinds) > 1 else ""
    ax_knn.set(title=f"kNN top-1 (weighted, k = 20, T = 0.07){mixed}", ylabel="top-1 accuracy (%)")
    ax_ret.set(title="instance retrieval top-1 (monitor: among its subset)", ylabel="top-1 accuracy (%)")
    for ax in (ax_knn, ax_ret):
        ax.set_ylim(0, 100)  # percentages: the axis is the scale (markers at 100 drawn unclipped)
    ax_lr.set(title="learning rate", ylabel="lr")
    ax_ips.set(title="throughput (logged windows)", ylabel="images / s")
    ax_wait.set(title="time waiting for data", ylabel="data wait (% of step time)")
    for ax in axes.flat:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    for ax in (ax_knn, ax_ret):
        if not ax.lines:
            ax.text(0.5, 0.5, "no monitor points in log.jsonl", ha="center", va="center", transform=ax.transAxes,
                    color="gray")
    fig.suptitle(" vs ".join(_title(r) for r in runs), fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _knn_kind(point: dict) -> str:
    """Which kNN a monitor point measured (eval.monitor's knn_on): the eval_path images as queries, or each
    training subset image against the others (leave-one-out, when the run has no labelled eval_path)."""
    on = str(point.get("knn_on", ""))
    if on.startswith("leave-one-out"):
        return "leave-one-out on training images"
    return "eval_path queries" if "eval_path" in on else "kNN of unknown kind"


def _ln(n: int) -> float:
    import math

    return math.log(n)


def chance(run: Run) -> tuple[int | None, str]:
    """(the soft-max's width, what it is): the loss of a model that knows nothing is ln of it. The full soft-max
    spans N rows; recent negatives span the K recent rows and the batch, K + B (at most N), whatever N is."""
    n = run.num_instances
    cfg = run.config.get("config", {})
    pic, batch = cfg.get("pic", {}), cfg.get("data", {}).get("batch_size")
    if n and pic.get("negatives") == "recent" and batch and pic.get("k", n) < n:
        width = min(n, pic["k"] + batch)
        return width, f"ln(K + B) = {_ln(width):.2f} (K + B = {pic['k']:,} + {batch:,}; N = {n:,})"
    return n, (f"ln N = {_ln(n):.2f} (N = {n:,})" if n else "")


def _title(run: Run) -> str:
    cfg = run.config.get("config", {})
    arch = cfg.get("model", {}).get("arch") or run.results.get("arch", "?")
    n = run.num_instances
    last = run.steps[-1] if run.steps else {}
    done = "complete" if run.results else f"in progress / stopped at epoch {last.get('epoch', 0):.1f}"
    return f"{run.name}: {arch}, N = {n}, {done}"


# ============ the page ============

def _flat(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, list | tuple):
        return ", ".join(_fmt(x) for x in v)
    return "" if v is None else str(v)


def _table(title: str, runs: list[Run], rows: dict[str, list[object]], mark_differences: bool = False) -> str:
    head = "".join(f"<th>{html.escape(r.name)}</th>" for r in runs)
    body = []
    for key, values in rows.items():
        cells = [_fmt(v) for v in values]
        cls = ' class="diff"' if mark_differences and len(set(cells)) > 1 else ""
        body.append(f"<tr{cls}><td>{html.escape(key)}</td>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells)
                    + "</tr>")
    return f"<h2>{html.escape(title)}</h2><table><tr><th></th>{head}</tr>{''.join(body)}</table>"


def page(runs: list[Run], png: Path) -> str:
    img = base64.b64encode(png.read_bytes()).decode()
    results_keys = [k for k in RESULT_LABELS if any(k in r.results for r in runs)]
    results = {RESULT_LABELS[k]: [r.results.get(k) for r in runs] for k in results_keys}
    if results:
        results["loss at chance (ln of the soft-max's width)"] = [chance(r)[1] for r in runs]
    parts = [f"<img src='data:image/png;base64,{img}' alt='curves'>"]
    parts.append(_table("Final results (results.json)", runs, results) if results else
                 "<h2>Final results</h2><p>No results.json: the run has not completed.</p>")
    for run in runs:
        if run.monitor:
            rows = "".join(
                f"<tr><td>{r['epoch']:.2f}</td><td>{r['step']}</td><td>{_fmt(r.get('knn_top1'))}</td>"
                f"<td>{_fmt(r.get('retrieval_top1'))}</td><td>{r['seconds']:.2f}</td>"
                f"<td>{html.escape(str(r.get('knn_on', '')))}</td></tr>" for r in run.monitor)
            parts.append(f"<h2>Monitor points: {html.escape(run.name)}</h2><table><tr><th>epoch</th><th>step</th>"
                         f"<th>kNN top-1 (%)</th><th>retrieval top-1 (%)</th><th>seconds</th><th>kNN on</th></tr>"
                         f"{rows}</table>")
    configs = [_flat(r.config.get("config", {})) | _flat(r.config.get("resolved", {}), "plan.") for r in runs]
    keys = sorted({k for c in configs for k in c})
    if keys:
        parts.append(_table("Config (config.json; rows that differ are marked)", runs,
                            {k: [c.get(k) for c in configs] for k in keys}, mark_differences=len(runs) > 1))
    envs = [_flat(r.config.get("env", {})) for r in runs]
    for r, e in zip(runs, envs, strict=True):
        e.setdefault("git_sha", r.results.get("git_sha"))
    keys = sorted({k for e in envs for k in e})
    parts.append(_table("Provenance (the environment the run started in)", runs,
                        {k: [e.get(k) for e in envs] for k in keys}, mark_differences=len(runs) > 1))
    title = "PIC run report: " + " vs ".join(html.escape(r.name) for r in runs)
    style = ("body{font-family:sans-serif;max-width:1500px;margin:1em auto}img{max-width:100%}"
             "table{border-collapse:collapse;margin-bottom:1em}td,th{border:1px solid #ccc;padding:2px 8px;"
             "text-align:left;font-size:13px}tr.diff{background:#fff3c4}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{style}</style></head>"
            f"<body><h1>{title}</h1>{''.join(parts)}</body></html>")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", nargs="?", help="a run folder (runs/NAME)")
    ap.add_argument("--compare", nargs="+", default=[], metavar="RUN", help="run folders to overlay")
    ap.add_argument("--out", default="", help="output path without suffix (default: report / compare in the "
                                              "first run's folder)")
    args = ap.parse_args(argv)
    paths = ([args.run_dir] if args.run_dir else []) + args.compare
    if not paths:
        ap.error("give a run folder, or --compare RUN_A RUN_B")
    try:
        runs = [read_run(p) for p in paths]
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stem = Path(args.out) if args.out else runs[0].path / ("report" if len(runs) == 1 else "compare")
    stem.parent.mkdir(parents=True, exist_ok=True)
    png, page_path = stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".html")
    draw(runs, png)
    page_path.write_text(page(runs, png), encoding="utf-8")
    print(f"wrote {png} and {page_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
