"""Peak memory and time of assignment at scale: 200k anchors x 200 GTs x batch 2.

Each measurement runs in a fresh subprocess (so the RSS high-water mark belongs to it alone):
after building the inputs the current RSS is read, the matcher runs once (cold, first call:
the time includes one-off allocation), and the high-water mark ``ru_maxrss`` minus that RSS is
the peak extra memory of matching.

Bound checked (and printed): peak extra RSS < 2 x the (B, A) outputs + the IoU chunk
temporaries, ``TEMPORARIES`` float32 arrays of ``B x chunk x M`` (the pairwise IoU of one chunk
and the intermediates of :func:`detloss.box_iou` and of the matcher: widths, heights,
intersection, union, masks, maxima; measured, about 20 such arrays are alive at the peak).
Without chunking the (B, A, M) float32 IoU matrix alone would be 2 * 200k * 200 * 4 B = 305 MiB,
and its intermediates several times that.

    python benchmarks/bench_matching_memory.py [--anchors 200000] [--gts 200] [--batch 2]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CHILD = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(1)
import detloss
which, a, m, b, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
chunk = chunk or None
g = torch.Generator().manual_seed(0)
xy = torch.rand(a, 2, generator=g) * 0.9
anchors = torch.cat((xy, xy + 0.02 + torch.rand(a, 2, generator=g) * 0.1), 1)
gxy = torch.rand(b, m, 2, generator=g) * 0.8
gt = torch.cat((gxy, gxy + 0.05 + torch.rand(b, m, 2, generator=g) * 0.15), -1)
valid = torch.ones(b, m, dtype=torch.bool)
if which == "bipartite":
    priors = detloss.xyxy_to_cxcywh(anchors)
    run = lambda: detloss.match_priors(priors, gt, valid, pos_iou=0.5, chunk_size=chunk)
else:
    run = lambda: detloss.max_iou_match(anchors, gt, valid, pos_iou=0.5, neg_iou=0.4, chunk_size=chunk)
import gc, os
gc.collect()
with open("/proc/self/statm") as f:
    before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024  # current RSS, KiB
t = time.perf_counter()
out = run()
ms = (time.perf_counter() - t) * 1e3
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
outputs = sum(v.numel() * v.element_size() for v in vars(out).values() if isinstance(v, torch.Tensor))
print(json.dumps({"ms": ms, "extra_mb": (after - before) / 1024, "outputs_mb": outputs / 2**20}))
"""


def measure(which: str, anchors: int, gts: int, batch: int, chunk: int) -> dict:
    res = subprocess.run(
        [sys.executable, "-c", CHILD, which, str(anchors), str(gts), str(batch), str(chunk)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--anchors", type=int, default=200_000)
    parser.add_argument("--gts", type=int, default=200)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--chunk", type=int, nargs="+", default=[1024, 4096], help="anchors per IoU chunk")
    args = parser.parse_args()
    for chunk in args.chunk:
        run_config(args, chunk)


TEMPORARIES = 24


def run_config(args: argparse.Namespace, chunk: int) -> None:
    full_iou_mb = args.batch * args.anchors * args.gts * 4 / 2**20
    chunk_mb = TEMPORARIES * args.batch * chunk * args.gts * 4 / 2**20
    print(f"matching {args.anchors} anchors x {args.gts} GTs x batch {args.batch}, chunk {chunk} "
          f"(an unchunked float32 IoU matrix would be {full_iou_mb:.0f} MB)")
    ok = True
    for which in ("bipartite", "max_iou"):
        r = measure(which, args.anchors, args.gts, args.batch, chunk)
        bound = 2 * r["outputs_mb"] + chunk_mb
        ok &= r["extra_mb"] < bound
        print(f"  {which:9s}: {r['ms']:8.1f} ms  peak extra RSS {r['extra_mb']:7.1f} MB  "
              f"(outputs {r['outputs_mb']:.1f} MB; bound 2 x outputs + {TEMPORARIES} x B x chunk x M x 4 B = {bound:.1f} MB) "
              f"{'OK' if r['extra_mb'] < bound else 'OVER'}")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
