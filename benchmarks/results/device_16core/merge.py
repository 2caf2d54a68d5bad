"""Merge the device runs in raw/ (peers and ours in separate perf_bench invocations) into
side-by-side reports, re-rendered with benchmarks.perf_bench's own renderer, plus scaling.png.

    .venv/bin/python benchmarks/results/device_16core/merge.py

Pure rendering: starts nothing. Figures are the device's, unchanged; only the layout is new.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # the repository root

from benchmarks import perf_bench as pb  # noqa: E402

RAW = HERE / "raw"
DEVICE_CPUS = 16  # the renderer reads os.cpu_count() for the CPU-share column: the device's, not this machine's
SHAPES = (1, 2, 4, 8)


def load(name: str) -> dict[str, Any]:
    return json.loads((RAW / f"{name}_perf.json").read_text())


def merged(ours_run: str, peer_runs: list[str]) -> dict[str, Any]:
    o = load(ours_run)
    res = copy.deepcopy(o)
    runs = [load(p) for p in peer_runs]
    systems = {k: v for r in runs for k, v in r["systems"].items()}
    systems["ours"] = o["systems"]["ours"]
    res["systems"] = systems
    res["config"]["peers"] = sorted(int(k[5:-1]) for k in systems if k.startswith("peer-"))
    res["header"]["command"] = " ; ".join(r["header"]["command"] for r in [*runs, o])
    res["header"]["git_commit"] = "e6b9333 + the --router-replicas/--qa-replicas edit of benchmarks/perf_bench.py (see NOTES.md)"
    res["header"]["git_dirty"] = False
    res["total_s"] = round(sum(r["total_s"] for r in [*runs, o]), 1)
    res["merged_from"] = [f"raw/{n}_perf.json" for n in [*peer_runs, ours_run]]
    res["targets"] = pb.build_targets(systems, pb.Cfg(**res["config"]))
    res["slo"] = pb.slo_report(systems, pb.Cfg(**res["config"]))
    return res


def plot_scaling(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = pb._g
    ours = {n: load(f"ours{n}x{n}")["systems"]["ours"] for n in SHAPES}
    peers = {**load("peers")["systems"], **load("peer8w")["systems"]}
    peer = {n: peers[f"peer-{n}w"] for n in SHAPES}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = [
        ("Misses (50 ms LM)", [("closed c=64", ("miss", "c64", "throughput_rps"), "-"),
                               ("open loop, best rate with p99 < 1 s", ("miss", "sweep", "best_throughput_rps"), "--")]),
        ("Zipf mix (~50 % hits for ours; all misses for the peer)", [
            ("closed c=64", ("zipf", "c64", "throughput_rps"), "-")]),
        ("Hits (ours) vs misses (peer), closed c=64", [("c=64", None, "-")]),
    ]
    for ax, (title, series) in zip(axes, panels):
        for label, path_, ls in series:
            op = path_ or ("hit", "c64", "throughput_rps")
            pp = path_ or ("miss", "c64", "throughput_rps")
            ax.plot(SHAPES, [g(ours[n], *op) for n in SHAPES], ls, marker="o", color="C0", label=f"ours, N Routers + N qa: {label}")
            ax.plot(SHAPES, [g(peer[n], *pp) for n in SHAPES], ls, marker="s", color="C1", label=f"peer, N uvicorn workers: {label}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(SHAPES, [str(n) for n in SHAPES])
        ax.set_xlabel("N (replicas of Router and of qa / uvicorn workers)")
        ax.set_ylabel("req/s")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
        ax.set_ylim(bottom=0)
    fig.suptitle("16-core device: throughput vs replicas / workers (one Cache replica in every shape)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    os.cpu_count = lambda: DEVICE_CPUS  # type: ignore[assignment]
    peer_runs = ["peers", "peer8w"]
    for n in SHAPES:
        res = merged(f"ours{n}x{n}", peer_runs)
        md = pb.render_markdown(res)
        if n == 4:
            (HERE / "perf.json").write_text(json.dumps(res, indent=1, default=str))
            pb.plot_sweep(res["systems"], HERE / "miss_sweep.png")
            (HERE / "perf.md").write_text(md)
        else:
            (HERE / f"perf_ours{n}x{n}.md").write_text(md.replace("](miss_sweep.png)", f"](miss_sweep_ours{n}x{n}.png)"))
            pb.plot_sweep(res["systems"], HERE / f"miss_sweep_ours{n}x{n}.png")
    plot_scaling(HERE / "scaling.png")


if __name__ == "__main__":
    main()
