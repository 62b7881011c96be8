"""Data for the command line: synthetic shapes (and faces), COCO-format files, batching.

Everything is held in memory as a :class:`Dataset`: ``images (N, S, S, 3)`` uint8 and, per
image, ``boxes (n, 4)`` float32 xyxy **pixels** of the ``S x S`` network input, ``labels (n,)``
int64 in ``[0, C-1]``, ``landmarks (n, 10)`` float32 pixels (five ``x, y`` points; zeros when
absent) and ``has_landmarks (n,)`` bool. :func:`collate` turns a list of indices into a
padded :class:`Batch` (``detloss.pad_ground_truth``).

The synthetic sets are a pure function of ``(seed, count, image_size)``: the same seed gives
the same pixels on every machine, so the training set is generated once and cached.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .. import pad_ground_truth
from .errors import CLIError

SHAPE_CLASSES = ("rectangle", "ellipse", "triangle")
FACE_CLASSES = ("face",)
PIXEL_MEAN = 0.45
PIXEL_STD = 0.25
PAD_VALUE = 114


@dataclass
class Dataset:
    """Images and per-image ground truth in network-input pixels (see the module docstring)."""

    images: np.ndarray
    boxes: list[np.ndarray]
    labels: list[np.ndarray]
    class_names: tuple[str, ...]
    landmarks: list[np.ndarray] = field(default_factory=list)
    has_landmarks: list[np.ndarray] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass
class Batch:
    """A padded batch: ``images (B, 3, S, S)`` float32 normalised, ``boxes (B, M, 4)`` xyxy
    pixels, ``labels (B, M)`` int64 (-1 padding), ``valid (B, M)`` bool, ``landmarks (B, M, 10)``
    pixels, ``has_landmarks (B, M)`` bool."""

    images: Tensor
    boxes: Tensor
    labels: Tensor
    valid: Tensor
    landmarks: Tensor
    has_landmarks: Tensor

    def to(self, device: torch.device) -> "Batch":
        return Batch(*(t.to(device) for t in (
            self.images, self.boxes, self.labels, self.valid, self.landmarks, self.has_landmarks
        )))


# ----------------------------------------------------------------------------- synthetic


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A noisy background: a random colour gradient plus Gaussian noise, float in [0, 255]."""
    c0, c1 = rng.uniform(20, 140, 3), rng.uniform(20, 140, 3)
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)
    ramp = t[:, None] if rng.random() < 0.5 else t[None, :]
    img = c0 + (c1 - c0) * ramp[..., None]
    img = np.broadcast_to(img, (size, size, 3)) + rng.normal(0, 12, (size, size, 3))
    return img.astype(np.float32)


def _shape_colour(rng: np.random.Generator) -> np.ndarray:
    """A saturated colour that stands out from the darker backgrounds."""
    colour = rng.uniform(0, 110, 3)
    colour[rng.integers(3)] = rng.uniform(180, 255)
    if rng.random() < 0.5:
        colour[rng.integers(3)] = rng.uniform(150, 255)
    return colour


def _shape_mask(kind: str, box: np.ndarray, ys: np.ndarray, xs: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    """Pixel mask of one shape inside ``box`` (xyxy) and its tight xyxy box."""
    x1, y1, x2, y2 = box
    if kind == "rectangle":
        return (xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2), box
    if kind == "ellipse":
        cx, cy, a, b = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
        return ((xs + 0.5 - cx) / a) ** 2 + ((ys + 0.5 - cy) / b) ** 2 <= 1.0, box
    # triangle: apex on the top edge, base on the bottom edge (or flipped)
    apex_x = rng.uniform(x1, x2)
    if rng.random() < 0.5:
        pts = np.array([[apex_x, y1], [x2, y2], [x1, y2]])
    else:
        pts = np.array([[apex_x, y2], [x1, y1], [x2, y1]])
    px, py = xs + 0.5, ys + 0.5
    edges = [
        (bx - ax) * (py - ay) - (by - ay) * (px - ax)
        for (ax, ay), (bx, by) in zip(pts, np.roll(pts, -1, axis=0))
    ]
    inside = ((edges[0] >= 0) & (edges[1] >= 0) & (edges[2] >= 0)) | (
        (edges[0] <= 0) & (edges[1] <= 0) & (edges[2] <= 0)
    )
    return inside, box


def _max_overlap(box: np.ndarray, others: list[np.ndarray]) -> float:
    """Largest intersection over the smaller box's area between ``box`` and ``others``."""
    if not others:
        return 0.0
    o = np.stack(others)
    iw = np.clip(np.minimum(box[2], o[:, 2]) - np.maximum(box[0], o[:, 0]), 0, None)
    ih = np.clip(np.minimum(box[3], o[:, 3]) - np.maximum(box[1], o[:, 1]), 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (o[:, 2] - o[:, 0]) * (o[:, 3] - o[:, 1])
    return float((iw * ih / np.minimum(area, areas)).max())


def _random_box(rng: np.random.Generator, size: int, placed: list[np.ndarray]) -> Optional[np.ndarray]:
    """A box of side 12-50% of the image, aspect 1:2-2:1, covering at most 35% of any other box."""
    for _ in range(20):
        side = rng.uniform(0.12, 0.5) * size
        aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
        w, h = side * np.sqrt(aspect), side / np.sqrt(aspect)
        w, h = min(w, size - 2), min(h, size - 2)
        x1, y1 = rng.uniform(0, size - w), rng.uniform(0, size - h)
        box = np.array([x1, y1, x1 + w, y1 + h], dtype=np.float32)
        if _max_overlap(box, placed) <= 0.35:
            return box
    return None


def _face_points(box: np.ndarray) -> np.ndarray:
    """Five face points (left eye, right eye, nose, left and right mouth corner), ``(10,)``."""
    x1, y1, x2, y2 = box
    cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
    pts = [(cx - 0.2 * w, cy - 0.15 * h), (cx + 0.2 * w, cy - 0.15 * h), (cx, cy + 0.05 * h),
           (cx - 0.17 * w, cy + 0.25 * h), (cx + 0.17 * w, cy + 0.25 * h)]
    return np.asarray(pts, dtype=np.float32).reshape(10)


def make_synthetic(count: int, image_size: int = 128, seed: int = 0, *, faces: bool = False) -> Dataset:
    """Generate ``count`` images of ``image_size`` px with 1-4 objects each, deterministic by seed.

    Shapes (``faces=False``): rectangles, ellipses and triangles of varied size, aspect and
    colour, partially overlapping (at most 35% of the smaller box), on noisy gradient backgrounds. Faces
    (``faces=True``): skin-coloured ellipses with two eyes, a nose and a mouth whose five
    points are the landmarks, plus unlabelled distractor rectangles and triangles.
    """
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:image_size, 0:image_size].astype(np.float32)
    images = np.empty((count, image_size, image_size, 3), dtype=np.uint8)
    all_boxes, all_labels, all_lms, all_has = [], [], [], []
    for i in range(count):
        img = _background(rng, image_size)
        boxes, labels, lms = [], [], []
        n_obj = int(rng.integers(1, 5))
        n_distract = int(rng.integers(0, 3)) if faces else 0
        placed: list[np.ndarray] = []
        for j in range(n_obj + n_distract):
            box = _random_box(rng, image_size, placed)
            if box is None:
                continue
            placed.append(box)
            is_object = j < n_obj
            if faces:
                kind = "ellipse" if is_object else SHAPE_CLASSES[int(rng.choice([0, 2]))]
                colour = rng.uniform([170, 120, 90], [240, 190, 150]) if is_object else _shape_colour(rng)
            else:
                label = int(rng.integers(len(SHAPE_CLASSES)))
                kind = SHAPE_CLASSES[label]
                colour = _shape_colour(rng)
            mask, box = _shape_mask(kind, box, ys, xs, rng)
            img[mask] = colour + rng.normal(0, 6, (int(mask.sum()), 3))
            if faces and is_object:
                pts = _face_points(box)
                r = max(1.2, 0.06 * float(min(box[2] - box[0], box[3] - box[1])))
                for k in range(5):
                    dot = (xs + 0.5 - pts[2 * k]) ** 2 + (ys + 0.5 - pts[2 * k + 1]) ** 2 <= r * r
                    img[dot] = (30, 20, 20)
                boxes.append(box)
                labels.append(0)
                lms.append(pts)
            elif not faces:
                boxes.append(box)
                labels.append(label)
                lms.append(np.zeros(10, dtype=np.float32))
        images[i] = np.clip(img, 0, 255).astype(np.uint8)
        n = len(boxes)
        all_boxes.append(np.asarray(boxes, dtype=np.float32).reshape(n, 4))
        all_labels.append(np.asarray(labels, dtype=np.int64).reshape(n))
        all_lms.append(np.asarray(lms, dtype=np.float32).reshape(n, 10))
        all_has.append(np.full(n, faces, dtype=bool))
    return Dataset(images, all_boxes, all_labels, FACE_CLASSES if faces else SHAPE_CLASSES, all_lms, all_has)


# ----------------------------------------------------------------------------- COCO files


def read_json(path: str, what: str = "annotations") -> dict:
    """Load a JSON file; missing files and malformed JSON become a :class:`CLIError`."""
    if not os.path.isfile(path):
        raise CLIError(f"{what}: file not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise CLIError(f"{what}: malformed JSON in {path}: {exc.msg} (line {exc.lineno})") from None


@dataclass
class CocoAnnotations:
    """A checked COCO-format annotation file: images, per-image boxes (xyxy pixels of the
    original image) and contiguous labels ``[0, C-1]`` (in category-id order)."""

    images: list[dict]
    boxes: dict[int, np.ndarray]
    labels: dict[int, np.ndarray]
    category_ids: list[int]
    class_names: tuple[str, ...]


def load_coco(path: str) -> CocoAnnotations:
    """Read and validate a COCO detection file (``images``, ``annotations``, ``categories``).

    Raises :class:`CLIError` naming the problem: missing keys, a bbox that is not four
    numbers or has a negative size, an unknown category or image id.
    """
    data = read_json(path)
    if not isinstance(data, dict):
        raise CLIError(f"annotations: expected a JSON object with images/annotations/categories in {path}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise CLIError(f"annotations: missing list {key!r} in {path}")
    try:
        cats = sorted(data["categories"], key=lambda c: int(c["id"]))
        cat_ids = [int(c["id"]) for c in cats]
        names = tuple(str(c.get("name", c["id"])) for c in cats)
        images = [dict(img, id=int(img["id"])) for img in data["images"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise CLIError(f"annotations: malformed image or category entry in {path}: {exc}") from None
    cat_index = {c: i for i, c in enumerate(cat_ids)}
    image_ids = {img["id"] for img in images}
    boxes: dict[int, list] = {i: [] for i in image_ids}
    labels: dict[int, list] = {i: [] for i in image_ids}
    for ann in data["annotations"]:
        ann_id = ann.get("id", "?") if isinstance(ann, dict) else "?"
        try:
            x, y, w, h = (float(v) for v in ann["bbox"])
            cat, img_id = int(ann["category_id"]), int(ann["image_id"])
        except (KeyError, TypeError, ValueError):
            raise CLIError(f"annotations: annotation {ann_id}: expected bbox [x, y, w, h], category_id and image_id") from None
        if not (w >= 0 and h >= 0):
            raise CLIError(f"annotations: annotation {ann_id}: bbox has negative size (w={w:g}, h={h:g})")
        if cat not in cat_index:
            raise CLIError(f"annotations: annotation {ann_id}: unknown category id {cat} (known: {cat_ids})")
        if img_id not in image_ids:
            raise CLIError(f"annotations: annotation {ann_id}: unknown image id {img_id}")
        if ann.get("iscrowd", 0):
            continue
        boxes[img_id].append((x, y, x + w, y + h))
        labels[img_id].append(cat_index[cat])
    return CocoAnnotations(
        images,
        {i: np.asarray(b, dtype=np.float32).reshape(-1, 4) for i, b in boxes.items()},
        {i: np.asarray(l, dtype=np.int64).reshape(-1) for i, l in labels.items()},
        cat_ids,
        names,
    )


def read_image(path: str) -> np.ndarray:
    """Read an image file as ``(H, W, 3)`` uint8 RGB (matplotlib's reader; PNG, JPEG via Pillow)."""
    import matplotlib.image as mpimg

    if not os.path.isfile(path):
        raise CLIError(f"image: file not found: {path}")
    try:
        img = np.asarray(mpimg.imread(path))
    except Exception as exc:  # the readers raise many types for a corrupt file
        raise CLIError(f"image: cannot read {path}: {exc}") from None
    if img.dtype != np.uint8:
        img = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3])


def letterbox(image: np.ndarray, boxes: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Resize ``image (H, W, 3)`` so its longer side is ``size``, pad bottom/right to a square.

    Returns the ``(size, size, 3)`` uint8 image, the boxes (xyxy pixels) scaled the same way,
    and the scale factor.
    """
    h, w = image.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    t = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    t = F.interpolate(t, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    out = np.full((size, size, 3), PAD_VALUE, dtype=np.uint8)
    out[:nh, :nw] = t[0].permute(1, 2, 0).clamp(0, 255).round().byte().numpy()
    return out, (boxes * scale).astype(np.float32), scale


def load_coco_dataset(annotations: str, image_dir: str, image_size: int) -> Dataset:
    """A COCO-format data set letterboxed to ``image_size``; boxes below 1 px are dropped."""
    coco = load_coco(annotations)
    if not os.path.isdir(image_dir):
        raise CLIError(f"images: directory not found: {image_dir}")
    images, boxes, labels = [], [], []
    for info in coco.images:
        img = read_image(os.path.join(image_dir, str(info.get("file_name", ""))))
        out, b, _ = letterbox(img, coco.boxes[info["id"]], image_size)
        keep = ((b[:, 2] - b[:, 0]) >= 1) & ((b[:, 3] - b[:, 1]) >= 1)
        images.append(out)
        boxes.append(b[keep])
        labels.append(coco.labels[info["id"]][keep])
    if not images:
        raise CLIError(f"annotations: no images listed in {annotations}")
    n = [len(b) for b in boxes]
    return Dataset(
        np.stack(images), boxes, labels, coco.class_names,
        [np.zeros((k, 10), np.float32) for k in n], [np.zeros(k, bool) for k in n],
    )


def split(dataset: Dataset, num_val: int) -> tuple[Dataset, Dataset]:
    """The first ``len - num_val`` images for training, the last ``num_val`` held out."""
    if not 0 < num_val < len(dataset):
        raise CLIError(f"--val-images: expected between 1 and {len(dataset) - 1} for {len(dataset)} images, got {num_val}")
    cut = len(dataset) - num_val

    def part(sl: slice) -> Dataset:
        return Dataset(dataset.images[sl], dataset.boxes[sl], dataset.labels[sl], dataset.class_names,
                       dataset.landmarks[sl], dataset.has_landmarks[sl])

    return part(slice(0, cut)), part(slice(cut, None))


# ----------------------------------------------------------------------------- batching


def normalise_images(images: np.ndarray) -> Tensor:
    """``(B, S, S, 3)`` uint8 -> ``(B, 3, S, S)`` float32, ``(x / 255 - mean) / std``."""
    t = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return (t / 255.0 - PIXEL_MEAN) / PIXEL_STD


def collate(dataset: Dataset, indices: Sequence[int]) -> Batch:
    """Stack the images at ``indices`` and pad their boxes with ``detloss.pad_ground_truth``."""
    idx = list(indices)
    boxes = [torch.from_numpy(dataset.boxes[i]) for i in idx]
    labels = [torch.from_numpy(dataset.labels[i]) for i in idx]
    extras = [
        torch.cat([torch.from_numpy(dataset.landmarks[i]),
                   torch.from_numpy(dataset.has_landmarks[i]).float()[:, None]], dim=1)
        for i in idx
    ]
    b, l, v, e = pad_ground_truth(boxes, labels, extras)
    if e.shape[-1] != 11:  # every image empty
        e = e.new_zeros(*b.shape[:2], 11)
    return Batch(normalise_images(dataset.images[idx]), b, l, v, e[..., :10].contiguous(), e[..., 10] > 0.5)


def save_coco(dataset: Dataset, annotations: str, image_dir: str) -> str:
    """Write ``dataset`` as PNG files in ``image_dir`` and a COCO annotation file (the
    format :func:`load_coco_dataset` reads); returns the annotation path."""
    import matplotlib.image as mpimg

    os.makedirs(image_dir, exist_ok=True)
    images, anns = [], []
    for i in range(len(dataset)):
        name = f"{i:06d}.png"
        mpimg.imsave(os.path.join(image_dir, name), dataset.images[i])
        images.append({"id": i + 1, "file_name": name, "width": dataset.image_size, "height": dataset.image_size})
        for box, label in zip(dataset.boxes[i], dataset.labels[i]):
            w, h = float(box[2] - box[0]), float(box[3] - box[1])
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(label) + 1,
                         "bbox": [float(box[0]), float(box[1]), w, h], "area": w * h, "iscrowd": 0})
    cats = [{"id": k + 1, "name": n} for k, n in enumerate(dataset.class_names)]
    with open(annotations, "w", encoding="utf-8") as fh:
        json.dump({"images": images, "annotations": anns, "categories": cats}, fh)
    return annotations
