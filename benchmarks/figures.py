"""Figures and tables of the documentation's performance page, from this script's own measurements.

For five families it times one forward + backward of the detloss loss and of the baseline the
family's benchmark compares against (the same functions, imported from ``bench_*.py``), at
several numbers of objects per image, interleaved in one process, and reads the peak of live
allocations above the inputs (``resident_memory.PeakAllocated``). Sizes are reduced from the
family benchmarks' so the whole run stays within a few minutes on two CPU cores:

* SSD300 VOC, batch 8: ``SSDLoss`` against ssd.pytorch's per-image loop (``bench_ssd.loop_step``);
* YOLOv3 416 / 80 classes, batch 2, targets included: ``YOLOv3Loss`` against tensorflow-yolov3's
  per-image NumPy target builder and loss (``bench_yolov3.baseline_*``);
* YOLOv8 640 / 80 classes, batch 2: ``YOLOv8Loss`` against the ``(B, M, A)`` task-aligned
  formulation ultralytics uses (``bench_tal.dense_loss``);
* YOLOv8-OBB 640 / 15 classes, batch 2: the ``v8OBBLoss`` drop-in (on ``YOLOOBBLoss``) against
  the ``(B, M, A)`` rotated formulation (``bench_obb.dense_loss``);
* DETR, batch 2, 300 queries, 91 classes, 6 decoder layers: ``DETRLoss`` against
  facebookresearch/detr's per-layer, per-image matching (``bench_detr.baseline_loss``).

Writes ``docs/assets/performance/speedup.png``, ``memory.png``, ``time.png``, ``results.json``,
``table.md``, ``machine.md`` (the performance page includes them) and ``summary.md`` (the README's
table, checked by ``tests/test_docs.py``); nothing is typed in::

    python benchmarks/figures.py                 # two to four minutes on two CPU cores
    python benchmarks/figures.py --runs 9        # steadier medians, longer

The family benchmarks (``bench_*.py``) measure the full sizes and more (floors, operators,
peak resident memory); ``benchmarks/README.md`` has their numbers.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import detloss  # noqa: E402
from resident_memory import PeakAllocated  # noqa: E402

OUT = HERE.parent / "docs" / "assets" / "performance"


# ------------------------------------------------------------------ the four families
def ssd_case(objects: int):
    import bench_ssd

    bench_ssd.BATCH = batch = 8
    gen = torch.Generator().manual_seed(0)
    priors = detloss.ssd_priors("voc300")
    p = priors.shape[0]
    xy = torch.rand(batch, objects, 2, generator=gen) * 0.7
    wh = torch.rand(batch, objects, 2, generator=gen) * 0.3 + 0.03
    x = dict(config="ssd", num_classes=21, priors=priors, gt_boxes=torch.cat([xy, xy + wh], -1),
             gt_valid=torch.ones(batch, objects, dtype=torch.bool),
             gt_labels=torch.randint(0, 20, (batch, objects), generator=gen),
             box_pred=torch.randn(batch, p, 4, generator=gen), cls_logits=torch.randn(batch, p, 21, generator=gen))
    loss = detloss.SSDLoss(21)
    bench_ssd.predictions(x)
    return (lambda: bench_ssd.native_step(x, loss)), (lambda: bench_ssd.loop_step(x)), [x["box_pred"], x["cls_logits"]]


def yolov3_case(objects: int):
    import bench_yolov3

    bench_yolov3.BOXES_PER_IMAGE = objects
    heads, boxes, labels, valid = bench_yolov3.make_inputs(2, "cpu")
    loss = detloss.YOLOv3Loss(bench_yolov3.NUM_CLASSES)
    anchors = detloss.yolov3_anchors(grid_units=True)
    return (lambda: bench_yolov3.run_native(heads, boxes, labels, valid, loss),
            lambda: bench_yolov3.run_baseline(heads, boxes, labels, valid, anchors), heads)


def yolov8_case(objects: int):
    import bench_tal

    bench_tal.BATCH = 2
    inputs = bench_tal.make_inputs(objects)
    return (lambda: bench_tal.step("detloss", "loss", inputs)), (lambda: bench_tal.step("dense", "loss", inputs)), inputs[:2]


def obb_case(objects: int):
    import bench_obb

    bench_obb.BATCH, bench_obb.SIZE = 2, 640
    inputs = bench_obb.make_inputs(objects)
    preds = inputs[0]
    return ((lambda: bench_obb.step("detloss", "loss", inputs)), (lambda: bench_obb.step("dense", "loss", inputs)),
            [preds["boxes"], preds["scores"], preds["angle"]])


def detr_case(objects: int):
    import bench_detr

    bench_detr.B = 2
    logits, boxes, gt, labels, valid = bench_detr.make_inputs(objects)
    targets = bench_detr.targets_of(gt, labels, valid)
    loss = detloss.DETRLoss(bench_detr.C)

    def native():
        bench_detr.step("detloss", loss, logits, boxes, gt, labels, valid, targets)

    def baseline():
        bench_detr.step("baseline", loss, logits, boxes, gt, labels, valid, targets)

    return native, baseline, []  # each step differentiates fresh leaves


FAMILIES = {
    # name: (case, objects per image, baseline's name)
    "SSD300 (b8)": (ssd_case, (1, 4, 16, 48), "ssd.pytorch per-image loop"),
    "YOLOv3 416 (b2)": (yolov3_case, (2, 8, 32, 100), "tensorflow-yolov3 NumPy targets + loss"),
    "YOLOv8 640 (b2)": (yolov8_case, (10, 50, 200), "(B, M, A) task-aligned form"),
    "YOLOv8-OBB 640 (b2)": (obb_case, (10, 50, 200), "(B, M, A) rotated task-aligned form"),
    "DETR (b2, 6 layers)": (detr_case, (10, 50, 200), "facebookresearch/detr per-layer, per-image"),
}


# ------------------------------------------------------------------------ measurement
def median_ms(native, baseline, runs: int) -> tuple[float, float]:
    native(), baseline()  # warm-up: lazy imports, first-call set-up
    times: dict[str, list[float]] = {"native": [], "baseline": []}
    for _ in range(runs):  # interleaved, so load from other tenants hits both alike
        for name, fn in (("native", native), ("baseline", baseline)):
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times["native"]), statistics.median(times["baseline"])


def peak_mib(fn, leaves) -> float | None:
    """Live allocations of one step above those held before it, its gradients included."""
    for t in leaves:
        t.grad = None
    with PeakAllocated() as probe:
        fn()
    return probe.growth_mib


def machine(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__,
        "python": platform.python_version(), "system": f"{platform.system()} {platform.release()}",
        "load_average": [round(v, 1) for v in os.getloadavg()],
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def measure(runs: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    with PeakAllocated():  # the first dispatch mode of a process allocates ~20 MiB of its own
        torch.ones(1) + 1
    results = {"machine": machine(threads), "runs": runs, "families": {}}
    for family, (case, counts, baseline_name) in FAMILIES.items():
        rows = []
        for objects in counts:
            native, baseline, leaves = case(objects)
            t_native, t_base = median_ms(native, baseline, runs)
            m_native, m_base = peak_mib(native, leaves), peak_mib(baseline, leaves)
            rows.append({"objects": objects, "detloss_ms": t_native, "baseline_ms": t_base,
                         "detloss_peak_mib": m_native, "baseline_peak_mib": m_base})
            print(f"{family:22s} {objects:4d} objects  detloss {t_native:8.1f} ms  baseline {t_base:8.1f} ms  "
                  f"({t_base / t_native:5.1f}x)  peak MiB {m_native:7.1f} / {m_base:7.1f}", flush=True)
        results["families"][family] = {"baseline": baseline_name, "rows": rows}
    return results


# ------------------------------------------------------------------------------ output
def write_outputs(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 20, not 2 x 10^1
    sparse = FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else "")  # minor ticks: 2, 5, 20, 50...

    out.mkdir(parents=True, exist_ok=True)
    m = results["machine"]
    caption = (f"{m['cpu']}, {m['threads']} thread(s) of {m['cores']} cores, torch {m['torch']}, "
               f"median of {results['runs']} interleaved runs, {m['date']}")
    families = results["families"]

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for family, data in families.items():
        x = [r["objects"] for r in data["rows"]]
        ax.plot(x, [r["baseline_ms"] / r["detloss_ms"] for r in data["rows"]], "o-", label=family)
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set(xscale="log", yscale="log", xlabel="objects per image",
           ylabel="speed-up (baseline time / detloss time)", title="forward + backward: detloss against the original's formulation")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(sparse)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.text(0.01, 0.005, caption, fontsize=6, color="grey")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(out / "speedup.png", dpi=110)
    plt.close(fig)

    for kind, key, label in (("memory", "peak_mib", "peak allocated above the inputs (MiB)"),
                             ("time", "ms", "forward + backward (ms)")):
        fig, axes = plt.subplots(1, len(families), figsize=(2.9 * len(families), 3.2))
        for ax, (family, data) in zip(np.atleast_1d(axes), families.items()):
            x = [r["objects"] for r in data["rows"]]
            ax.plot(x, [r[f"detloss_{key}"] for r in data["rows"]], "o-", label="detloss")
            ax.plot(x, [r[f"baseline_{key}"] for r in data["rows"]], "s--", label="baseline")
            ax.set(xscale="log", yscale="log", xlabel="objects per image", title=family)
            ax.yaxis.set_major_formatter(plain)
            low, high = ax.get_ylim()
            ax.yaxis.set_minor_formatter(plain if high / low < 4 else sparse)  # a short range: label every tick
            ax.grid(True, which="both", alpha=0.3)
            ax.title.set_fontsize(9)
        np.atleast_1d(axes)[0].set_ylabel(label)
        np.atleast_1d(axes)[0].legend(fontsize=8)
        fig.text(0.01, 0.005, caption, fontsize=6, color="grey")
        fig.tight_layout(rect=(0, 0.04, 1, 1))
        fig.savefig(out / f"{kind}.png", dpi=110)
        plt.close(fig)

    lines = ["| family | baseline | objects / image | detloss ms | baseline ms | speed-up | peak MiB detloss / baseline |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for family, data in families.items():
        for r in data["rows"]:
            lines.append(f"| {family} | {data['baseline']} | {r['objects']} | {r['detloss_ms']:.1f} | "
                         f"{r['baseline_ms']:.1f} | {r['baseline_ms'] / r['detloss_ms']:.1f}x | "
                         f"{r['detloss_peak_mib']:.1f} / {r['baseline_peak_mib']:.1f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    short = ["| family (batch) | against | speed-up, fewest / most objects | peak MiB at the most, detloss / baseline |",
             "|---|---|---:|---:|"]
    for family, data in families.items():
        a, z = data["rows"][0], data["rows"][-1]
        short.append(f"| {family} | {data['baseline']} | {a['baseline_ms'] / a['detloss_ms']:.1f}x at {a['objects']} / "
                     f"{z['baseline_ms'] / z['detloss_ms']:.1f}x at {z['objects']} | "
                     f"{z['detloss_peak_mib']:.0f} / {z['baseline_peak_mib']:.0f} |")
    (out / "summary.md").write_text("\n".join(short) + "\n")  # the README's table (tests/test_docs.py)
    (out / "machine.md").write_text(
        f"Measured on {m['cpu']} ({m['cores']} cores, {m['threads']} torch thread(s); load average "
        f"{', '.join(str(v) for v in m['load_average'])} at the start), {m['system']}, Python {m['python']}, "
        f"torch {m['torch']}, {m['date']}; medians of {results['runs']} interleaved runs.\n")
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="timed runs per point (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadiest on a shared machine)")
    parser.add_argument("--out", type=Path, default=OUT, help=f"output folder (default: {OUT})")
    parser.add_argument("--replot", action="store_true", help="redraw from OUT/results.json without measuring")
    args = parser.parse_args()
    if args.replot:
        results = json.loads((args.out / "results.json").read_text())
    else:
        results = measure(args.runs, args.threads)
    write_outputs(results, args.out)
    print(f"wrote {', '.join(sorted(p.name for p in args.out.iterdir()))} to {args.out}")


if __name__ == "__main__":
    main()
