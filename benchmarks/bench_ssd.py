"""Benchmark: SSD300 VOC and RetinaFace 640 losses, forward + backward, batch 32.

For each configuration it prints

* the median (and min) forward+backward milliseconds of the detloss native loss over ``--runs``;
* the same for a straightforward per-image-loop formulation of the originals' algorithm
  (written here: loop over images for matching, forcing loop over GTs, then the batched
  double-argsort mining and masked-select losses of ssd.pytorch / Pytorch_Retinaface), and
  the speed-up;
* the peak resident memory of each, measured in a fresh subprocess (``ru_maxrss``), and
  the peak's increase over the resident size just before the first loss call
  (:mod:`resident_memory`);
* the memory-traffic floor: bytes a loss must at least move (read the predictions, write their
  gradients, read priors / GT, one float32 loss and one label byte per prior), in MB and in
  ms at the copy bandwidth measured on this machine (a large copy into an existing buffer, as
  ``bench_yolov3.py``; also at the lower bandwidth of copying into a fresh allocation, whose
  page faults a newly allocated gradient pays).

Usage: ``python benchmarks/bench_ssd.py [--runs 20] [--threads 2] [--config ssd|retinaface|all] [--compile] [--phases]``
(``--compile`` also times the native loss under ``torch.compile(fullgraph=True)``, compile time excluded;
``--phases`` times its pieces alone: the matcher, the ranking cross-entropy, the mining, the forward).
The machine's load average is printed: other processes sharing the CPU slow everything down.
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

import torch
import torch.nn.functional as F

import detloss
from detloss.priors import SSD_PRESETS, retinaface_priors, ssd_priors
from dispatch_count import describe_dense
from resident_memory import PeakResident

BATCH = 32


# --------------------------------------------------------------------------- inputs

def make_inputs(config: str, seed: int = 0) -> dict:
    """Predictions, priors and padded GT of one benchmark configuration (float32, CPU)."""
    gen = torch.Generator().manual_seed(seed)
    if config == "ssd":
        priors, num_classes, max_gt = ssd_priors(SSD_PRESETS["voc300"]), 21, 6
    else:
        priors, num_classes, max_gt = retinaface_priors((640, 640)), 2, 6
    p = priors.shape[0]
    counts = torch.randint(1, max_gt + 1, (BATCH,), generator=gen)
    xy = torch.rand(BATCH, max_gt, 2, generator=gen) * 0.7
    wh = torch.rand(BATCH, max_gt, 2, generator=gen) * 0.3 + 0.03
    gt_boxes = torch.cat([xy, xy + wh], -1)
    gt_valid = torch.arange(max_gt)[None] < counts[:, None]
    x = dict(
        config=config,
        num_classes=num_classes,
        box_pred=torch.randn(BATCH, p, 4, generator=gen),
        cls_logits=torch.randn(BATCH, p, num_classes, generator=gen),
        priors=priors,
        gt_boxes=gt_boxes,
        gt_valid=gt_valid,
        gt_labels=torch.randint(0, num_classes - 1, (BATCH, max_gt), generator=gen),
    )
    if config == "retinaface":
        x["landmark_pred"] = torch.randn(BATCH, p, 10, generator=gen)
        x["gt_landmarks"] = xy.repeat(1, 1, 5) + torch.rand(BATCH, max_gt, 10, generator=gen) * wh.repeat(1, 1, 5)
        x["gt_has_landmarks"] = torch.rand(BATCH, max_gt, generator=gen) < 0.7
    return x


def predictions(x: dict) -> list[torch.Tensor]:
    """The prediction leaves (created once, gradients cleared), so no copy is timed."""
    names = ["box_pred", "cls_logits"] + (["landmark_pred"] if x["config"] == "retinaface" else [])
    for n in names:
        x[n].requires_grad_()
        x[n].grad = None
    return [x[n] for n in names]


# --------------------------------------------------------------------------- native

def native_step_forward(x: dict, loss_module) -> dict:
    preds = predictions(x)
    if x["config"] == "ssd":
        return loss_module(preds[0], preds[1], x["priors"], x["gt_boxes"], x["gt_labels"], x["gt_valid"])
    return loss_module(preds[0], preds[1], preds[2], x["priors"], x["gt_boxes"], x["gt_landmarks"],
                       x["gt_has_landmarks"], x["gt_valid"])


def native_step(x: dict, loss_module) -> None:
    native_step_forward(x, loss_module)["loss"].backward()


def native_loss(x: dict):
    if x["config"] == "ssd":
        return detloss.SSDLoss(x["num_classes"])
    return detloss.RetinaFaceLoss(x["num_classes"])


# --------------------------------------------------------------------------- per-image loop reference

def _jaccard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    area_a = ((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]))[:, None]
    area_b = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))[None, :]
    return inter / (area_a + area_b - inter)


def _encode(matched, priors, v=(0.1, 0.2)):
    c = ((matched[:, :2] + matched[:, 2:]) / 2 - priors[:, :2]) / (v[0] * priors[:, 2:])
    s = torch.log((matched[:, 2:] - matched[:, :2]) / priors[:, 2:]) / v[1]
    return torch.cat([c, s], 1)


def _match_one(truths, priors, threshold, floor=None):
    """The originals' ``match()`` for one image: returns (matched GT idx, positive mask)."""
    overlaps = _jaccard(truths, torch.cat([priors[:, :2] - priors[:, 2:] / 2, priors[:, :2] + priors[:, 2:] / 2], 1))
    best_prior_overlap, best_prior_idx = overlaps.max(1)
    forcing = best_prior_idx if floor is None else best_prior_idx[best_prior_overlap >= floor]
    best_truth_overlap, best_truth_idx = overlaps.max(0)
    best_truth_overlap.index_fill_(0, forcing, 2)
    for j in range(best_prior_idx.size(0)):
        best_truth_idx[best_prior_idx[j]] = j
    positive = best_truth_overlap >= threshold
    if floor is not None and forcing.numel() == 0:
        positive = torch.zeros_like(positive)
    return best_truth_idx, positive


def loop_step(x: dict) -> None:
    """Per-image loop formulation of ssd.pytorch / Pytorch_Retinaface MultiBoxLoss, fwd + bwd."""
    preds = predictions(x)
    loc, conf = preds[0], preds[1]
    priors = x["priors"]
    b, p, c = conf.shape
    retina = x["config"] == "retinaface"
    loc_t = torch.zeros(b, p, 4)
    conf_t = torch.zeros(b, p, dtype=torch.long)
    landm_t = torch.zeros(b, p, 10)
    with torch.no_grad():
        for i in range(b):
            valid = x["gt_valid"][i]
            truths = x["gt_boxes"][i][valid]
            idx, pos = _match_one(truths, priors, 0.35 if retina else 0.5, 0.2 if retina else None)
            loc_t[i] = _encode(truths[idx], priors)
            if retina:
                label = torch.where(x["gt_has_landmarks"][i][valid], 1, -1)
                conf_t[i] = torch.where(pos, label[idx], 0)
                pts = x["gt_landmarks"][i][valid][idx].view(p, 5, 2)
                landm_t[i] = ((pts - priors[:, None, :2]) / (0.1 * priors[:, None, 2:])).view(p, 10)
            else:
                conf_t[i] = torch.where(pos, x["gt_labels"][i][valid][idx] + 1, 0)
    pos = conf_t != 0
    losses = []
    if retina:
        pos1 = conf_t > 0
        losses.append(F.smooth_l1_loss(preds[2][pos1], landm_t[pos1], reduction="sum") / max(pos1.sum().float(), 1))
        conf_t = pos.long()
    losses.append(F.smooth_l1_loss(loc[pos], loc_t[pos], reduction="sum"))
    batch_conf = conf.detach().view(-1, c)
    x_max = batch_conf.max()
    mining = torch.log(torch.sum(torch.exp(batch_conf - x_max), 1)) + x_max - batch_conf.gather(1, conf_t.view(-1, 1)).squeeze(1)
    mining = mining.view(b, p)
    mining[pos] = 0
    _, loss_idx = mining.sort(1, descending=True)
    _, idx_rank = loss_idx.sort(1)
    num_pos = pos.long().sum(1, keepdim=True)
    num_neg = torch.clamp((7 if retina else 3) * num_pos, max=p - 1)
    neg = idx_rank < num_neg
    sel = pos | neg
    n = max(num_pos.sum().float(), 1)
    losses.append(F.cross_entropy(conf[sel], conf_t[sel], reduction="sum"))
    losses[-2] = losses[-2] / n
    losses[-1] = losses[-1] / n
    sum(losses).backward()


# --------------------------------------------------------------------------- measurement

def time_it(step, runs: int) -> tuple[float, float]:
    step()  # warm-up
    step()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times)


def copy_bandwidth_gbs(fresh: bool = False) -> float:
    """Copy bandwidth (read + write bytes per second) of 256 MB of float32, best of 5: into an
    existing buffer (the floor's bandwidth, as in ``bench_yolov3.py``), or with ``fresh`` into a
    new allocation (``clone``: the page faults of first touch included, what a freshly allocated
    gradient pays)."""
    x = torch.ones(64 * 1024 * 1024)
    out = torch.empty_like(x)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        x.clone() if fresh else out.copy_(x)
        best = min(best, time.perf_counter() - start)
    return 2 * x.numel() * 4 / best / 1e9


def traffic_floor_bytes(x: dict) -> int:
    """Bytes that must move: predictions read + gradients written, priors and GT read, one float32
    per-prior loss and one label byte per prior written and read back."""
    preds = sum(x[n].numel() for n in ("box_pred", "cls_logits", "landmark_pred") if n in x) * 4
    fixed = x["priors"].numel() * 4 + x["gt_boxes"].numel() * 4
    per_prior = x["box_pred"].shape[0] * x["box_pred"].shape[1] * (4 + 1) * 2
    return 2 * preds + fixed + per_prior


def phase_times(x: dict, loss_module, runs: int) -> dict[str, tuple[float, float]]:
    """Median and min ms of the native loss's main pieces on these inputs, each timed alone (the
    matcher, the per-prior cross-entropy that ranks negatives, the mining), and of the whole
    forward (its graph built, then dropped) and forward+backward."""
    from detloss.functional.classification import class_cross_entropy_no_grad

    floor = getattr(loss_module, "min_best_iou", None)
    match = lambda: detloss.match_priors(  # noqa: E731
        x["priors"], x["gt_boxes"], x["gt_valid"], pos_iou=loss_module.pos_iou, min_best_iou=floor
    )
    rank = lambda: class_cross_entropy_no_grad(x["cls_logits"], 0)  # noqa: E731
    positive, scores = match().positive, rank()
    mine = lambda: detloss.mine_hard_negatives(scores, positive, neg_pos_ratio=loss_module.neg_pos_ratio)  # noqa: E731

    pieces = {"matching (match_priors)": match, "ranking (per-prior cross-entropy)": rank,
              "mining (mine_hard_negatives)": mine, "forward": lambda: native_step_forward(x, loss_module),
              "forward + backward": lambda: native_step(x, loss_module)}
    return {name: time_it(fn, runs) for name, fn in pieces.items()}


def child(config: str, impl: str, runs: int, threads: int) -> None:
    """Run one (config, implementation) in this fresh process; print JSON with time and memory."""
    torch.set_num_threads(threads)
    x = make_inputs(config)
    loss_module = native_loss(x)
    if impl == "phases":
        print(json.dumps(phase_times(x, loss_module, runs)))
        return
    if impl == "compiled":  # the whole loss under torch.compile(fullgraph=True); compile time excluded
        loss_module = torch.compile(loss_module, fullgraph=True)
    step = (lambda: native_step(x, loss_module)) if impl != "loop" else (lambda: loop_step(x))
    if impl == "dense":  # the accelerators' sync-free strategy, run on the CPU
        detloss.set_execution_strategy("dense")
    with PeakResident() as resident:
        median, best = time_it(step, runs)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(dict(median_ms=median, min_ms=best, peak_rss_mb=peak_mb, rss_increase_mb=resident.growth_mib)))


def dense_dispatch(x: dict) -> str:
    """Operators and host synchronisations of one dense forward + backward (value checks off)."""
    loss_module = native_loss(x)
    detloss.set_value_checks(False)
    try:
        with detloss.execution_strategy("dense"):
            return describe_dense(lambda: native_step(x, loss_module))
    finally:
        detloss.set_value_checks(True)


def run_child(config: str, impl: str, runs: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, "--config", config, "--runs", str(runs), "--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="timed runs per measurement (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--config", choices=["ssd", "retinaface", "all"], default="all")
    parser.add_argument("--compile", action="store_true", help="also time the native loss under torch.compile")
    parser.add_argument("--phases", action="store_true",
                        help="also time the native loss's pieces alone (matching, ranking, mining, forward)")
    parser.add_argument("--child", choices=["native", "dense", "loop", "compiled", "phases"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.config, args.child, args.runs, args.threads)
        return
    torch.set_num_threads(args.threads)
    bandwidth, fresh_bandwidth = copy_bandwidth_gbs(), copy_bandwidth_gbs(fresh=True)
    print(f"torch {torch.__version__}, threads {args.threads}, runs {args.runs}, "
          f"load average {os.getloadavg()[0]:.2f}, copy bandwidth {bandwidth:.1f} GB/s "
          f"({fresh_bandwidth:.1f} GB/s into fresh allocations)")
    configs = ["ssd", "retinaface"] if args.config == "all" else [args.config]
    for config in configs:
        x = make_inputs(config)
        floor = traffic_floor_bytes(x)
        native = run_child(config, "native", args.runs, args.threads)
        loop = run_child(config, "loop", args.runs, args.threads)
        name = "SSD300 VOC (8732 priors, 21 classes)" if config == "ssd" else "RetinaFace 640 (16800 priors, 2 classes)"
        print(f"\n{name}, batch {BATCH}, forward+backward")
        print(f"  detloss native : median {native['median_ms']:7.1f} ms (min {native['min_ms']:.1f}), "
              f"peak RSS {native['peak_rss_mb']:.0f} MB (+{native['rss_increase_mb']:.0f} MB)")
        print(f"  per-image loop : median {loop['median_ms']:7.1f} ms (min {loop['min_ms']:.1f}), "
              f"peak RSS {loop['peak_rss_mb']:.0f} MB (+{loop['rss_increase_mb']:.0f} MB)")
        print(f"  speed-up       : {loop['median_ms'] / native['median_ms']:.2f}x")
        dense = run_child(config, "dense", args.runs, args.threads)
        print(f"  dense strategy : median {dense['median_ms']:7.1f} ms (min {dense['min_ms']:.1f}) on the CPU, "
              f"{loop['median_ms'] / dense['median_ms']:.2f}x the loop; {dense_dispatch(x)}")
        if args.compile:
            comp = run_child(config, "compiled", args.runs, args.threads)
            print(f"  torch.compile  : median {comp['median_ms']:7.1f} ms (min {comp['min_ms']:.1f}), "
                  f"peak RSS {comp['peak_rss_mb']:.0f} MB, {loop['median_ms'] / comp['median_ms']:.2f}x the loop")
        if args.phases:
            phases = run_child(config, "phases", args.runs, args.threads)
            total = phases["forward + backward"][0]
            for name, (median, best) in phases.items():
                print(f"    {name:34s}: median {median:6.1f} ms (min {best:.1f}), {median / total:4.0%} of forward + backward")
        floor_ms = floor / (bandwidth * 1e9) * 1e3
        fresh_ms = floor / (fresh_bandwidth * 1e9) * 1e3
        print(f"  traffic floor  : {floor / 1e6:.1f} MB = {floor_ms:.1f} ms at {bandwidth:.1f} GB/s "
              f"(native is {native['median_ms'] / floor_ms:.1f}x the floor; "
              f"{fresh_ms:.1f} ms at the fresh-allocation bandwidth, {native['median_ms'] / fresh_ms:.1f}x)")
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
