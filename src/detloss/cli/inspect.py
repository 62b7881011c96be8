"""``detloss inspect``: what the matcher did on one image.

Draws the ground truth, the positive priors/anchors coloured by their GT, the ignored ones
and (for the families that mine, with random logits from ``--seed``) the mined hard
negatives, and prints per GT: its best IoU, its positives, whether it was matched only
through bipartite forcing, or not at all. For the task-aligned preset (``yolov8-640``) each
GT line also gives its candidates (anchor points inside the floored box), its own top-k by
the alignment metric, the anchors it lost to and won from other GTs in conflicts, and its
largest soft score; the predictions are those of an untrained head (``--seed``).
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch
import torch.nn.functional as F

from .. import pad_ground_truth
from . import plots
from .data import load_coco, make_synthetic, read_image
from .errors import CLIError
from .presets import PRESETS, Preset, get_preset, to_input


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "inspect",
        help="draw which priors/anchors were matched, ignored, mined for one image",
        description="Run a preset's matcher on one image and draw positives (coloured by GT), ignored "
        "priors and mined hard negatives; print positives per GT.",
    )
    p.add_argument("--preset", default="ssd300-voc",
                   help=f"one of {', '.join(PRESETS)}, yolov8-obb-1024 (rotated boxes) (default: ssd300-voc)")
    p.add_argument("--image", default=None, help="image file (default: a generated synthetic sample)")
    p.add_argument("--boxes", default=None, help='ground truth "x1,y1,x2,y2,label;..." in image pixels')
    p.add_argument("--annotations", default=None, help="COCO-format file to take the boxes from (with --image-id)")
    p.add_argument("--image-id", type=int, default=None, help="image id in --annotations")
    p.add_argument("--images", default=None, metavar="DIR", help="image directory of --annotations (default: its folder)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic sample and the random logits (default: 0)")
    p.add_argument("--out", default="detloss-inspect.png", help="output PNG (default: detloss-inspect.png)")
    p.set_defaults(handler=run)
    return p


def parse_boxes(text: str) -> tuple[np.ndarray, np.ndarray]:
    """``"x1,y1,x2,y2,label;..."`` -> ``(boxes (n, 4) float32, labels (n,) int64)``."""
    boxes, labels = [], []
    for k, item in enumerate(t for t in text.split(";") if t.strip()):
        parts = item.split(",")
        try:
            if len(parts) != 5:
                raise ValueError
            x1, y1, x2, y2 = (float(v) for v in parts[:4])
            label = int(parts[4])
        except ValueError:
            raise CLIError(f"--boxes: box {k}: expected 'x1,y1,x2,y2,label' (numbers, integer label), got {item.strip()!r}") from None
        if not all(np.isfinite([x1, y1, x2, y2])):
            raise CLIError(f"--boxes: box {k}: expected finite coordinates, got {item.strip()!r}")
        if x2 <= x1 or y2 <= y1:
            raise CLIError(f"--boxes: box {k}: negative or zero size (x2 - x1 = {x2 - x1:g}, y2 - y1 = {y2 - y1:g})")
        if label < 0:
            raise CLIError(f"--boxes: box {k}: expected a label >= 0, got {label}")
        boxes.append((x1, y1, x2, y2))
        labels.append(label)
    return np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64)


def load_sample(args: argparse.Namespace, preset: Preset) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """``(image (H, W, 3) uint8, boxes (n, 4), labels (n,), label names)`` in image pixels."""
    if args.annotations is not None:
        if args.boxes is not None:
            raise CLIError("--boxes and --annotations: expected one of them, got both")
        if args.image_id is None:
            raise CLIError("--image-id: required with --annotations")
        coco = load_coco(args.annotations)
        info = next((im for im in coco.images if im["id"] == args.image_id), None)
        if info is None:
            raise CLIError(f"--image-id: image id {args.image_id} not in {args.annotations}")
        path = args.image or os.path.join(args.images or os.path.dirname(os.path.abspath(args.annotations)),
                                          str(info.get("file_name", "")))
        names = [coco.class_names[l] for l in coco.labels[info["id"]]]
        return read_image(path), coco.boxes[info["id"]], coco.labels[info["id"]], names
    if args.image is not None:
        image = read_image(args.image)
        if args.boxes is None:
            raise CLIError("--boxes: required with --image (or use --annotations)")
        boxes, labels = parse_boxes(args.boxes)
        return image, boxes, labels, [str(l) for l in labels]
    sample = make_synthetic(1, preset.image_size, args.seed)
    if args.boxes is not None:
        boxes, labels = parse_boxes(args.boxes)
        return sample.images[0], boxes, labels, [str(l) for l in labels]
    labels = sample.labels[0]
    return sample.images[0], sample.boxes[0], labels, [sample.class_names[l] for l in labels]


def to_input_image(image: np.ndarray, preset: Preset) -> np.ndarray:
    """The image as the network sees it (stretched or letterboxed to ``S x S``)."""
    h, w = image.shape[:2]
    s = preset.image_size
    size = (s, s) if preset.resize == "stretch" else (max(1, round(h * s / max(h, w))), max(1, round(w * s / max(h, w))))
    t = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    t = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
    out = np.full((s, s, 3), 114, np.uint8)
    out[: size[0], : size[1]] = t[0].permute(1, 2, 0).clamp(0, 255).byte().numpy()
    return out


def summarize(preset: Preset, boxes: np.ndarray, names: list[str], positives: np.ndarray,
              strong: np.ndarray, best_iou: np.ndarray, n_ignored: int, n_neg: "int | None") -> list[str]:
    """The text report: one line per GT, then the forced-only and unmatched GTs."""
    lines = [f"preset {preset.name} ({preset.family}, {preset.image_size} px, {preset.resize}): "
             f"{int(positives.sum())} positive, {n_ignored} ignored"
             + (f", {n_neg} hard negatives" if n_neg is not None else "") + f", {len(boxes)} GT"]
    for g, box in enumerate(boxes):
        how = "no positive" if positives[g] == 0 else ("below-threshold match only" if strong[g] == 0 else "")
        lines.append(f"  GT{g} {names[g]:<10} [{box[0]:6.1f} {box[1]:6.1f} {box[2]:6.1f} {box[3]:6.1f}]  "
                     f"best IoU {best_iou[g]:.3f}  positives {int(positives[g]):3d}"
                     + (f"  ({how})" if how else ""))
    forced = [f"GT{g}" for g in range(len(boxes)) if positives[g] > 0 and strong[g] == 0]
    missing = [f"GT{g}" for g in range(len(boxes)) if positives[g] == 0]
    if preset.family in ("ssd", "retinaface"):
        lines.append(f"matched only through bipartite forcing: {', '.join(forced) or 'none'}")
    elif preset.family == "retinanet":
        lines.append(f"matched only through low-quality (best-IoU) matches: {', '.join(forced) or 'none'}")
    lines.append(f"no positive at all: {', '.join(missing) or 'none'}")
    return lines


def task_aligned_report(preset: Preset, gt: np.ndarray, labels: np.ndarray, names: list[str],
                        seed: int) -> tuple[list[str], "torch.Tensor", "torch.Tensor"]:
    """Summary lines of the task-aligned assignment, and its ``(P,)`` foreground and matched GT."""
    gt_t = torch.from_numpy(gt).reshape(1, -1, 4)
    lab_t = torch.from_numpy(labels).reshape(1, -1)
    valid = torch.ones(lab_t.shape, dtype=torch.bool)
    joint = preset.match_yolov8(gt_t, lab_t, valid, seed)
    fg, matched = joint.foreground[0], joint.matched_gt[0]
    points, strides = preset.yolov8_points()
    side = float(strides.unique()[1])
    lines = [f"preset {preset.name} ({preset.family}, {preset.image_size} px, {preset.resize}): "
             f"{int(fg.sum())} positive anchor points, {len(gt)} GT; best IoU = the largest max(CIoU, 0) "
             f"of a candidate's predicted box (untrained head, seed {seed})"]
    for g in range(len(gt)):
        box = gt[g]
        # candidates: points strictly inside the box, sides floored at stride[1] about its centre
        centre, size = (box[:2] + box[2:]) / 2, np.maximum(box[2:] - box[:2], side)
        lo, hi = torch.from_numpy(centre - size / 2), torch.from_numpy(centre + size / 2)
        candidates = int((((points - lo) > 1e-9) & ((hi - points) > 1e-9)).all(-1).sum())
        alone = dict(gt_boxes=gt_t[:, g:g + 1], gt_labels=lab_t[:, g:g + 1], gt_valid=valid[:, g:g + 1], seed=seed)
        scored = preset.match_yolov8(**alone, topk=points.shape[0])  # every candidate with a positive metric
        own = preset.match_yolov8(**alone).foreground[0]  # its own top-k, before conflicts
        mine = fg & (matched == g)
        best = float(scored.overlap.max()) if candidates else 0.0
        soft = float(joint.scores[0][mine].max()) if mine.any() else 0.0
        lines.append(f"  GT{g} {names[g]:<10} [{box[0]:6.1f} {box[1]:6.1f} {box[2]:6.1f} {box[3]:6.1f}]  "
                     f"best IoU {best:.3f}  positives {int(mine.sum()):3d}  candidates {candidates:4d}  "
                     f"own top-k {int(own.sum()):2d}  lost {int((own & ~mine).sum())} / won {int((mine & ~own).sum())} "
                     f"in conflicts  soft score max {soft:.3f}")
    missing = [f"GT{g}" for g in range(len(gt)) if not (fg & (matched == g)).any()]
    lines.append(f"no positive at all: {', '.join(missing) or 'none'}")
    return lines, fg, torch.where(fg, matched, -1)


def run(args: argparse.Namespace) -> int:
    from .inspect_obb import OBB_PRESETS

    if args.preset in OBB_PRESETS:  # oriented boxes: the rotated task-aligned assignment (inspect_obb.py)
        from .inspect_obb import run as run_rotated

        return run_rotated(args)
    preset = get_preset(args.preset)
    image, boxes, labels, names = load_sample(args, preset)
    h, w = image.shape[:2]
    gt = to_input(boxes, (h, w), preset)
    gt_t, lab_t, valid = pad_ground_truth([torch.from_numpy(gt)], [torch.from_numpy(labels)])
    m = gt.shape[0]
    if preset.family == "yolov8":
        lines, fg, matched = task_aligned_report(preset, gt, labels, names, args.seed)
        cells = preset.priors_xyxy().numpy()
        out = plots.assignment_figure(
            to_input_image(image, preset), gt, [(cells[(matched == g).numpy()], g) for g in range(m)],
            cells[:0], cells[:0], args.out, lines[0].split(";")[0] + "\npositive anchor cells coloured by GT", names,
        )
        print("\n".join(lines))
        print(f"wrote {os.path.abspath(out)}")
        return 0
    result = preset.assign(gt_t, lab_t, valid)
    negatives = preset.mine(result, args.seed)
    positives = result.positives_per_gt(m)[0].numpy()
    # YOLO's threshold is on anchor shapes, not box IoU: it has no "below threshold" positives
    strong = positives if preset.family == "yolov3" else result.threshold_positives_per_gt(m, preset.pos_iou)[0].numpy()
    best_iou = result.iou[0].max(-1).values.numpy() if m else np.zeros(0)
    priors = preset.priors_xyxy().numpy()
    pos = result.positive[0].numpy()
    matched = result.matched_gt[0].numpy()
    ignored = result.ignored[0].numpy()
    neg = negatives[0].numpy() if negatives is not None else np.zeros_like(pos)
    lines = summarize(preset, gt, names, positives, strong, best_iou, int(ignored.sum()),
                      None if negatives is None else int(neg.sum()))
    title = lines[0] + "\npositives coloured by GT, ignored grey dashed" + (", hard negatives red" if negatives is not None else "")
    out = plots.assignment_figure(
        to_input_image(image, preset), gt, [(priors[pos & (matched == g)], g) for g in range(m)],
        priors[ignored], priors[neg], args.out, title, names,
    )
    print("\n".join(lines))
    print(f"wrote {os.path.abspath(out)}")
    return 0
