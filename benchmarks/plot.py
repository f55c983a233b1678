"""Charts of benchmark records (the JSON files that the benchmarks write).

    python -m benchmarks.plot RESULT.json [RESULT.json ...] [--out DIR]

bench_loader  -> images/s per backend and mode, the plain library pipelines in grey (raw-decode reference as a line);
bench_convert -> folder -> .beton images/s per converter and max resolution;
bench_e2e    -> end-to-end images/s per backend next to the synthetic step;
bench_step   -> supervised vs PIC step images/s per arch/size/batch;
bench_bank   -> classifier ms/step per N for each bank storage:dtype[:cache] (log N), the bank's size on the labels.
One PNG per record, named like the record.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _title(rec: dict) -> str:
    env = rec.get("env", {})
    gpu = (env.get("gpu") or {}).get("name")
    cpu = env.get("cpu") or {}
    where = gpu or f"{cpu.get('model', 'CPU')} ({cpu.get('cores', '?')} cores)"
    return f"{rec['benchmark']} on {where}, git {env.get('git_sha', '?')}"


def paired_bars(ax, rows: list[dict], labels: list[str], series: dict[str, str]) -> None:
    """Two bars per row side by side: series {key: legend label} (left, right)."""
    x = range(len(rows))
    for offset, (key, label) in zip((-0.2, 0.2), series.items(), strict=True):
        ax.bar([i + offset for i in x], [r[key] for r in rows], width=0.4, label=label)
    ax.set_xticks(list(x), labels)
    ax.legend()


def plot_record(rec: dict, out: Path, plt) -> None:
    rows = [r for r in rec["rows"] if "skipped" not in r]
    fig, ax = plt.subplots(figsize=(8, 4))
    name = rec["benchmark"]
    if name == "bench_loader":
        raw = next((r["images_per_second"] for r in rows if r["backend"] == "raw_decode"), None)
        rows = [r for r in rows if r["backend"] != "raw_decode"]
        # variant "cpu_resize=numba" -> "(numba)"
        labels = [f"{r['backend']}\n{r['mode']}" + (f"\n({r['variant'].split('=')[-1]})" if r.get("variant") else "")
                  for r in rows]
        fig.set_figwidth(max(8.0, 1.1 * len(rows)))
        plain = ("torchvision", "ffcv-plain", "dali-plain")  # what a user would write instead: grey
        ax.bar(labels, [r["images_per_second"] for r in rows],
               color=["tab:gray" if r["backend"] in plain else "tab:blue" for r in rows])
        if raw:
            ax.axhline(raw, color="tab:red", ls="--", label=f"raw PIL decode {raw:.0f} img/s")
            ax.legend()
    elif name == "bench_convert":
        names = list(dict.fromkeys(r["converter"] for r in rows))
        res = sorted({r["max_res"] for r in rows})
        w = 0.8 / max(1, len(names))
        for j, conv in enumerate(names):
            ax.bar([i + (j - (len(names) - 1) / 2) * w for i in range(len(res))],
                   [next((r["images_per_second"] for r in rows if r["converter"] == conv and r["max_res"] == m), 0)
                    for m in res], width=w, label=conv.replace("_", " "))
        ax.set_xticks(list(range(len(res))), [f"max resolution {m}" for m in res])
        ax.legend()
    elif name == "bench_e2e":
        paired_bars(ax, rows, [r["backend"] for r in rows], {"e2e_img_s": "end to end",
                                                              "step_only_img_s": "step only (synthetic)"})
    elif name == "bench_step":
        paired_bars(ax, rows, [f"{r['arch']}@{r['size']}\nB={r['batch']}" for r in rows],
                    {"supervised_img_s": "supervised step", "pic_img_s": "PIC step"})
    elif name == "bench_bank":
        def config(r):  # records before the ring's cache have no "cache" key
            return r["storage"], r["dtype"], bool(r.get("cache"))

        for storage, dtype, cache in sorted({config(r) for r in rows}):
            rs = sorted((r for r in rows if config(r) == (storage, dtype, cache)), key=lambda r: r["N"])
            series = f"{storage} {dtype}" + (" + ring cache" if cache else "")
            line, = ax.plot([r["N"] for r in rs], [r["ms_median"] for r in rs], marker="o", label=f"{series} (wall)")
            if all("cpu_ms_median" in r for r in rs):  # CPU time: steadier on a shared machine
                ax.plot([r["N"] for r in rs], [r["cpu_ms_median"] for r in rs], marker="x", ls="--",
                        color=line.get_color(), label=f"{series} (CPU)")
            for r in rs:
                ax.annotate(f"{r['bank_gb']:.2g} GB", (r["N"], r["ms_median"]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
        ax.set_xscale("log")
        ax.set_xlabel("N (instances)")
        ax.set_ylabel("ms per classifier step")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
        ax.set_title(_title(rec), fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out, dpi=110)
        plt.close(fig)
        print(f"wrote {out}")
        return
    else:
        plt.close(fig)
        return
    ax.set_ylabel("images / s")
    ax.set_title(_title(rec), fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("records", nargs="+")
    ap.add_argument("--out", default="", help="folder for the PNGs (default: beside each record)")
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for path in map(Path, args.records):
        rec = json.loads(path.read_text())
        out_dir = Path(args.out) if args.out else path.parent
        out_dir.mkdir(parents=True, exist_ok=True)
        plot_record(rec, out_dir / (path.stem + ".png"), plt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
