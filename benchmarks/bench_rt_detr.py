"""Real-time DETR loss benchmark: RT-DETR and D-FINE, B = 8 images, Q = 300 queries, 80 classes,
6 decoder layers (5 auxiliary + final) plus the encoder's top-k output, contrastive denoising
(``num_denoising = 100``: ``G = max(1, 100 // objects)`` groups of ``2 x objects`` queries, as
RT-DETR builds them), 10 / 100 / 300 objects per image.

Compares ``detloss.compat.transformers`` (``RTDetrForObjectDetectionLoss``,
``DFineForObjectDetectionLoss``: one padded cost of every layer and the encoder output, one solve)
with transformers 5.23.0's formulation written out here (not imported): per set (final layer,
each auxiliary layer, the encoder output) one ``(B Q) x (all objects)`` cost, copied to the host
and solved image by image with SciPy; the terms gather the matched pairs through index lists;
``num_boxes.item()``; D-FINE's DDF with boolean-mask means. Both take the inputs in the layout a
transformers model hands to its loss function and give the same total (checked before timing).

Timings are medians of interleaved runs in one process (wall clock of the loss forward +
backward with matching). Host round trips per step are counted in the code: a detloss solve is
one device-to-host copy of the stacked cost and one host-to-device copy of the result; the
baseline copies one cost per set and reads ``num_boxes`` (and, on an accelerator, would send the
index lists back per image). Peak memory is the peak resident size of one forward + backward above
the resident size with the inputs built, in a fresh subprocess per row, after a warm-up step.

    python benchmarks/bench_rt_detr.py [--objects 10 100 300] [--runs 7] [--threads 2] [--models rt_detr d_fine]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import types

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from detloss.compat import transformers as T
from detloss.functional import weighting_function
from detloss.matching import hungarian as H
from resident_memory import PeakResident

B, Q, C, L, NUM_DENOISING, BINS = 8, 300, 80, 6, 100, 32


def config(model: str) -> types.SimpleNamespace:
    values = dict(
        num_labels=C, auxiliary_loss=True, use_focal_loss=True, focal_loss_alpha=0.75, focal_loss_gamma=2.0,
        matcher_alpha=0.25, matcher_gamma=2.0, matcher_class_cost=2.0, matcher_bbox_cost=5.0, matcher_giou_cost=2.0,
        weight_loss_vfl=1.0, weight_loss_bbox=5.0, weight_loss_giou=2.0,
    )
    if model == "d_fine":
        values.update(weight_loss_fgl=0.15, weight_loss_ddf=1.5, max_num_bins=BINS, up=0.5, reg_scale=4.0)
    return types.SimpleNamespace(**values)


def make_inputs(model: str, objects: int, seed: int = 0) -> tuple[list, dict]:
    """The positional and keyword arguments a transformers model passes to its loss function."""
    rng = np.random.default_rng(seed)
    groups = max(1, NUM_DENOISING // objects)
    d = 2 * objects * groups
    n = d + Q
    t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731

    def boxes(*shape):
        return t(np.concatenate((rng.uniform(0.1, 0.9, (*shape, 2)), rng.uniform(0.02, 0.4, (*shape, 2))), -1))

    outputs_class, outputs_coord = t(rng.normal(-2, 1, (B, L, n, C))), boxes(B, L, n)
    labels = [{"class_labels": torch.tensor(rng.integers(0, C, objects)), "boxes": boxes(objects)} for _ in range(B)]
    positive = [torch.cat([torch.arange(objects) + g * 2 * objects for g in range(groups)]) for _ in range(B)]
    kwargs = dict(enc_topk_logits=t(rng.normal(-2, 1, (B, Q, C))), enc_topk_bboxes=boxes(B, Q),
                  denoising_meta_values={"dn_positive_idx": positive, "dn_num_group": groups, "dn_num_split": [d, Q]})
    if model == "d_fine":
        kwargs.update(predicted_corners=t(rng.normal(0, 1, (B, L, n, 4 * (BINS + 1)))), initial_reference_points=boxes(B, L, n))
    args = [outputs_class[:, -1].clone(), labels, torch.device("cpu"), outputs_coord[:, -1].clone(), config(model),
            outputs_class, outputs_coord]
    return args, kwargs


# ---------------------------------------------------------- transformers' formulation
class Counter:
    solves = host_copies = 0


def _xyxy(b):
    return torch.cat((b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2), -1)


def _pair_iou(a, b):  # (N, 4) x (M, 4) xyxy -> iou, union
    area_a, area_b = (a[:, 2:] - a[:, :2]).prod(-1), (b[:, 2:] - b[:, :2]).prod(-1)
    inter = (torch.min(a[:, None, 2:], b[None, :, 2:]) - torch.max(a[:, None, :2], b[None, :, :2])).clamp(min=0).prod(-1)
    union = area_a[:, None] + area_b[None] - inter
    return inter / union, union


def _pair_giou(a, b):
    iou, union = _pair_iou(a, b)
    hull = (torch.max(a[:, None, 2:], b[None, :, 2:]) - torch.min(a[:, None, :2], b[None, :, :2])).clamp(min=0).prod(-1)
    return iou - (hull - union) / hull


def baseline_match(logits, boxes, targets, cfg):
    """One set: ``(B Q) x (all objects)`` cost, one host copy, one SciPy call per image."""
    with torch.no_grad():
        bsz, nq = logits.shape[:2]
        prob = logits.flatten(0, 1).sigmoid()
        ids = torch.cat([t["class_labels"] for t in targets])
        tgt = torch.cat([t["boxes"] for t in targets])
        p = prob[:, ids]
        a, g = cfg.matcher_alpha, cfg.matcher_gamma
        cls = a * (1 - p) ** g * -(p + 1e-8).log() - (1 - a) * p**g * -(1 - p + 1e-8).log()
        out = boxes.flatten(0, 1)
        cost = cfg.matcher_bbox_cost * torch.cdist(out, tgt, p=1) + cfg.matcher_class_cost * cls \
            - cfg.matcher_giou_cost * _pair_giou(_xyxy(out), _xyxy(tgt))
        cost = torch.nan_to_num(cost, nan=3.4e38, posinf=3.4e38, neginf=3.4e38).view(bsz, nq, -1).cpu()
        Counter.host_copies += 1
        sizes = [len(t["boxes"]) for t in targets]
        result = []
        for i, c in enumerate(cost.split(sizes, -1)):
            Counter.solves += 1
            r, col = linear_sum_assignment(c[i])
            result.append((torch.as_tensor(r, dtype=torch.int64), torch.as_tensor(col, dtype=torch.int64)))
        return result


def _idx(indices):
    return (torch.cat([torch.full_like(s, i) for i, (s, _) in enumerate(indices)]), torch.cat([s for s, _ in indices]))


def baseline_terms(out, targets, indices, num_boxes, cfg, local):
    idx = _idx(indices)
    src = out["pred_boxes"][idx]
    tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)])
    iou = torch.diag(_pair_iou(_xyxy(src.detach()), _xyxy(tgt))[0])
    logits = out["logits"]
    classes = torch.full(logits.shape[:2], C, dtype=torch.int64)
    classes[idx] = torch.cat([t["class_labels"][j] for t, (_, j) in zip(targets, indices)])
    onehot = F.one_hot(classes, C + 1)[..., :-1]
    score = torch.zeros(logits.shape[:2])
    score[idx] = iou
    score = score[..., None] * onehot
    weight = cfg.focal_loss_alpha * logits.detach().sigmoid().pow(cfg.focal_loss_gamma) * (1 - onehot) + score
    terms = {"vfl": F.binary_cross_entropy_with_logits(logits, score, weight=weight, reduction="none").mean(1).sum()
             * logits.shape[1] / num_boxes * cfg.weight_loss_vfl}
    terms["bbox"] = F.l1_loss(src, tgt, reduction="none").sum() / num_boxes * cfg.weight_loss_bbox
    terms["giou"] = (1 - torch.diag(_pair_giou(_xyxy(src), _xyxy(tgt)))).sum() / num_boxes * cfg.weight_loss_giou
    if local and "pred_corners" in out:
        corners = out["pred_corners"][idx].reshape(-1, BINS + 1)
        refs = out["ref_points"][idx].detach()
        grid = weighting_function(BINS, cfg.up, cfg.reg_scale)
        x1y1x2y2 = _xyxy(tgt)
        r = cfg.reg_scale
        dist = torch.stack([(refs[:, 0] - x1y1x2y2[:, 0]) / (refs[:, 2] / r + 1e-16) - 0.5 * r,
                            (refs[:, 1] - x1y1x2y2[:, 1]) / (refs[:, 3] / r + 1e-16) - 0.5 * r,
                            (x1y1x2y2[:, 2] - refs[:, 0]) / (refs[:, 2] / r + 1e-16) - 0.5 * r,
                            (x1y1x2y2[:, 3] - refs[:, 1]) / (refs[:, 3] / r + 1e-16) - 0.5 * r], -1).reshape(-1)
        k = (grid[None] <= dist[:, None]).sum(1) - 1
        inside = (k >= 0) & (k < BINS)
        kk = k.clamp(0, BINS - 1)
        dl, dr = (dist - grid[kk]).abs(), (grid[kk + 1] - dist).abs()
        wr = torch.where(inside, dl / (dl + dr), (k >= BINS).float())
        wl = torch.where(inside, 1 - wr, (k < 0).float())
        label = torch.where(k < 0, 0, torch.where(k >= BINS, BINS - 1, k))
        w = iou[:, None].repeat(1, 4).reshape(-1)
        fgl = (F.cross_entropy(corners, label, reduction="none") * wl + F.cross_entropy(corners, label + 1, reduction="none") * wr)
        terms["fgl"] = (fgl * w).sum() / num_boxes * cfg.weight_loss_fgl
        pred_all = out["pred_corners"].reshape(-1, BINS + 1)
        teacher = out["teacher_corners"].reshape(-1, BINS + 1)
        if torch.equal(pred_all, teacher):
            terms["ddf"] = pred_all.sum() * 0
        else:
            wt = out["teacher_logits"].sigmoid().max(-1)[0]
            mask = torch.zeros_like(wt, dtype=torch.bool)
            mask[idx] = True
            mask = mask[..., None].repeat(1, 1, 4).reshape(-1)
            wt[idx] = iou.to(wt.dtype)
            wt = wt[..., None].repeat(1, 1, 4).reshape(-1).detach()
            kl = wt * 25 * F.kl_div(F.log_softmax(pred_all / 5, 1), F.softmax(teacher.detach() / 5, 1), reduction="none").sum(-1)
            scale = 1 / out["pred_boxes"].shape[0]
            npos, nneg = (mask.sum() * scale) ** 0.5, ((~mask).sum() * scale) ** 0.5
            pos = kl[mask].mean() if mask.any() else 0
            neg = kl[~mask].mean() if (~mask).any() else 0
            terms["ddf"] = (pos * npos + neg * nneg) / (npos + nneg) * cfg.weight_loss_ddf
    return terms


def baseline_loss(logits, labels, device, pred_boxes, cfg, outputs_class, outputs_coord, enc_topk_logits=None,
                  enc_topk_bboxes=None, denoising_meta_values=None, predicted_corners=None, initial_reference_points=None):
    local = predicted_corners is not None
    split = denoising_meta_values["dn_num_split"]
    clamp = (lambda x: x.clamp(0, 1)) if local else (lambda x: x)  # noqa: E731
    _, logits = torch.split(logits, split, 1)
    _, pred_boxes = torch.split(pred_boxes, split, 1)
    dn_coord, coord = torch.split(clamp(outputs_coord), split, 2)
    dn_class, cls = torch.split(outputs_class, split, 2)
    sets = [{"logits": logits, "pred_boxes": clamp(pred_boxes)}]
    dn_sets = []
    if local:
        dn_corners, corners = torch.split(predicted_corners, split, 2)
        dn_refs, refs = torch.split(initial_reference_points, split, 2)
        sets += [{"logits": cls[:, i], "pred_boxes": coord[:, i], "pred_corners": corners[:, i], "ref_points": refs[:, i],
                  "teacher_corners": corners[:, -1], "teacher_logits": cls[:, -1]} for i in range(L - 1)]
        dn_sets = [{"logits": dn_class[:, i], "pred_boxes": dn_coord[:, i], "pred_corners": dn_corners[:, i],
                    "ref_points": dn_refs[:, i], "teacher_corners": dn_corners[:, -1], "teacher_logits": dn_class[:, -1]}
                   for i in range(L)]
    else:
        sets += [{"logits": cls[:, i], "pred_boxes": coord[:, i]} for i in range(L - 1)]
        dn_sets = [{"logits": dn_class[:, i], "pred_boxes": dn_coord[:, i]} for i in range(L)]
    sets.append({"logits": enc_topk_logits, "pred_boxes": clamp(enc_topk_bboxes)})
    num_boxes = torch.clamp(torch.as_tensor([float(sum(len(t["class_labels"]) for t in labels))]), min=1).item()
    total = 0
    for s in sets:
        indices = baseline_match(s["logits"], s["pred_boxes"], labels, cfg)
        total = total + sum(baseline_terms(s, labels, indices, num_boxes, cfg, local).values())
    groups = denoising_meta_values["dn_num_group"]
    dn_indices = [(p, torch.arange(len(t["class_labels"])).tile(groups))
                  for p, t in zip(denoising_meta_values["dn_positive_idx"], labels)]
    for s in dn_sets:
        total = total + sum(baseline_terms(s, labels, dn_indices, num_boxes * groups, cfg, local).values())
    return total


# --------------------------------------------------------------------------------- timing
def leaves(args, kwargs):
    args = [a.detach().clone().requires_grad_() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
    kwargs = {k: v.detach().clone().requires_grad_() if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in kwargs.items()}
    return args, kwargs


def step(impl, model, args, kwargs):
    args, kwargs = leaves(args, kwargs)
    if impl == "baseline":
        total = baseline_loss(*args, **kwargs)
    else:
        fn = T.RTDetrForObjectDetectionLoss if model == "rt_detr" else T.DFineForObjectDetectionLoss
        total = fn(*args, **kwargs)[0]
    total.backward()
    return total.detach()


def memory_row(impl: str, model: str, objects: int) -> float:
    args, kwargs = make_inputs(model, objects)
    step(impl, model, args, kwargs)
    with PeakResident() as probe:
        step(impl, model, args, kwargs)
    return probe.growth_mib


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--objects", type=int, nargs="+", default=[10, 100, 300])
    parser.add_argument("--models", nargs="+", default=["rt_detr", "d_fine"])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory", nargs=3, metavar=("IMPL", "MODEL", "OBJECTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory:
        print(json.dumps(memory_row(args.memory[0], args.memory[1], int(args.memory[2]))))
        return
    print(f"Real-time DETR losses, B={B}, Q={Q}, {C} classes, {L} decoder layers + encoder output, "
          f"{NUM_DENOISING} denoising queries, {torch.get_num_threads()} threads, CPU")
    print(f"{'model':>7} {'objects':>7} {'impl':>9} {'fwd+bwd ms':>11} {'speed-up':>8} {'scipy calls':>11} "
          f"{'D2H':>4} {'H2D':>4} {'peak MiB':>8}")
    for model in args.models:
        for objects in args.objects:
            inputs = make_inputs(model, objects)
            ref, got = step("baseline", model, *inputs), step("detloss", model, *inputs)
            assert torch.allclose(ref, got, rtol=1e-4), (model, objects, ref, got)
            times = {impl: [] for impl in ("baseline", "detloss")}
            counts = {}
            for _ in range(args.runs):
                for impl in ("baseline", "detloss"):
                    Counter.solves = Counter.host_copies = 0
                    round_trips, scipy_calls = [], []
                    real_solve_all, real_solver = H._solve_all, H.scipy_solver
                    H._solve_all = lambda cost, *a: round_trips.append(1) or real_solve_all(cost, *a)
                    H.scipy_solver = lambda: (lambda c: scipy_calls.append(1) or linear_sum_assignment(c))
                    try:
                        t0 = time.perf_counter()
                        step(impl, model, *inputs)
                        times[impl].append(time.perf_counter() - t0)
                    finally:
                        H._solve_all, H.scipy_solver = real_solve_all, real_solver
                    if impl == "baseline":  # one cost copy per set; the index lists go back per image
                        counts[impl] = (Counter.solves, Counter.host_copies, Counter.solves)
                    else:
                        counts[impl] = (len(scipy_calls), len(round_trips), len(round_trips))
            base = statistics.median(times["baseline"])
            for impl in ("baseline", "detloss"):
                mem = subprocess.run(
                    [sys.executable, __file__, "--memory", impl, model, str(objects), "--threads", str(args.threads)],
                    capture_output=True, text=True, check=True, env=dict(os.environ),
                ).stdout.strip().splitlines()[-1]
                ms = 1e3 * statistics.median(times[impl])
                solves, d2h, h2d = counts[impl]
                print(f"{model:>7} {objects:>7} {impl:>9} {ms:>11.1f} {base * 1e3 / ms:>7.2f}x {solves:>11} {d2h:>4} {h2d:>4} "
                      f"{float(mem):>8.1f}", flush=True)


if __name__ == "__main__":
    main()
