"""Pairwise IoU of many anchors against a few boxes: time and peak memory, chunked vs not.

    python benchmarks/bench_boxes.py [--n 200000] [--m 100] [--kinds iou ciou] [--threads 1]

Each configuration runs in a fresh subprocess, so the peak resident-set size (``ru_maxrss``)
it reports belongs to that configuration alone: the printed "peak MB" is the high-water
mark during the measured calls minus the resident size just before them (inputs and a
warm-up already allocated). Next to it the script prints the analytical size of the
output and of one chunk's temporaries, ``(chunk or N) x M x 4 bytes`` per live
``(rows, M)`` float32 temporary. Timings are the median of ``--repeat`` calls. On the CPU
only; no GPU needed. Runs in well under a minute with the defaults.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def _rss_mb() -> float:
    """Current resident set size (MB) from /proc (Linux)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _worker(n: int, m: int, kind: str, chunk: int, repeat: int, threads: int) -> dict:
    import torch

    from detloss import box_iou

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(n, 2, generator=g) * 800
    anchors = torch.cat([xy, xy + 8 + torch.rand(n, 2, generator=g) * 200], -1)
    xy = torch.rand(m, 2, generator=g) * 800
    gt = torch.cat([xy, xy + 8 + torch.rand(m, 2, generator=g) * 200], -1)
    chunk_size = chunk or None
    box_iou(anchors[:1000], gt, kind, chunk_size=chunk_size)  # warm-up: kernels, allocator
    base = _rss_mb()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = box_iou(anchors, gt, kind, chunk_size=chunk_size)
        times.append((time.perf_counter() - t0) * 1e3)
        del out
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB -> MB on Linux
    return {"ms": statistics.median(times), "peak_mb": max(peak - base, 0.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000, help="anchors (rows)")
    parser.add_argument("--m", type=int, default=100, help="boxes (columns)")
    parser.add_argument("--kinds", nargs="+", default=["iou", "ciou"])
    parser.add_argument("--chunks", nargs="+", type=int, default=[0, 50_000, 10_000], help="0 = unchunked")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        kind, chunk = args.worker.split(":")
        print(json.dumps(_worker(args.n, args.m, kind, int(chunk), args.repeat, args.threads)))
        return

    out_mb = args.n * args.m * 4 / 2**20
    print(f"box_iou pairwise, N={args.n} x M={args.m}, float32, {args.threads} thread(s), median of {args.repeat}")
    print(f"output alone: {out_mb:.1f} MB")
    print(f"{'kind':<5} {'chunk':>8} {'ms':>9} {'peak MB':>9} {'chunk tmp MB':>13} {'ms ratio':>9} {'mem ratio':>10}")
    for kind in args.kinds:
        ref = None
        for chunk in args.chunks:
            cmd = [sys.executable, __file__, "--n", str(args.n), "--m", str(args.m), "--repeat", str(args.repeat),
                   "--threads", str(args.threads), "--worker", f"{kind}:{chunk}"]
            res = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
            rows = chunk or args.n
            tmp_mb = rows * args.m * 4 / 2**20  # one (rows, M) float32 temporary
            if ref is None:
                ref = res
            print(
                f"{kind:<5} {chunk or 'none':>8} {res['ms']:>9.1f} {res['peak_mb']:>9.1f} {tmp_mb:>13.1f} "
                f"{res['ms'] / ref['ms']:>9.2f} {res['peak_mb'] / max(ref['peak_mb'], 1e-9):>10.2f}"
            )


if __name__ == "__main__":
    main()
