"""Prior boxes and anchors: pure functions of a configuration, in the originals' order.

=====================  ==========================  ==========================================
family                 function                    format / units
=====================  ==========================  ==========================================
SSD (ssd.pytorch)      :func:`ssd_priors`          ``(P, 4)`` cx, cy, w, h, normalised
RetinaFace             :func:`retinaface_priors`   ``(P, 4)`` cx, cy, w, h, normalised
Faster R-CNN           :func:`rcnn_base_anchors`,  ``(9, 4)`` / ``(H*W*9, 4)`` x1, y1, x2, y2
                       :func:`rcnn_anchors`        pixels, inclusive (+1) convention
RetinaNet              :func:`retinanet_anchors`   ``(A, 4)`` x1, y1, x2, y2 pixels
YOLOv3                 :func:`yolov3_anchors`,     ``(3, 3, 2)`` anchor w, h; ``(H, W, 2)``
                       :func:`yolo_grid`           cell x (column), y (row) offsets
=====================  ==========================  ==========================================

The values are computed in float64 with the originals' arithmetic and cast to float32
once, so they equal the originals' float32 outputs exactly. The functions are cached:
call them freely.
"""
from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ._validate import require_choice, require_positive


@dataclass(frozen=True)
class SSDPriorConfig:
    """Configuration of SSD prior boxes (the fields of ssd.pytorch's ``data/config.py``).

    Attributes:
        feature_maps: side of each square feature map, e.g. ``(38, 19, 10, 5, 3, 1)``.
        image_size: input side in pixels (``min_dim``).
        steps: pixel stride of each map; centres are ``(j + 0.5) / (image_size / step)``.
        min_sizes, max_sizes: pixel size of the small square prior and the bound of the
            large square prior ``sqrt(min * max)`` per map.
        aspect_ratios: extra aspect ratios per map; each adds two priors (ar and 1/ar).
        clip: clamp the ``(cx, cy, w, h)`` values to ``[0, 1]`` (as the original does).
    """

    feature_maps: tuple[int, ...]
    image_size: int
    steps: tuple[int, ...]
    min_sizes: tuple[float, ...]
    max_sizes: tuple[float, ...]
    aspect_ratios: tuple[tuple[int, ...], ...]
    clip: bool = True

    def __post_init__(self) -> None:
        n = len(self.feature_maps)
        for name in ("steps", "min_sizes", "max_sizes", "aspect_ratios"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"{name}: expected {n} entries (one per feature map), "
                    f"got {len(getattr(self, name))}"
                )
        if self.image_size <= 0:
            raise ValueError(f"image_size: expected a positive size, got {self.image_size}")

    @property
    def num_priors(self) -> int:
        """Total number of priors this configuration generates."""
        return sum(
            f * f * (2 + 2 * len(ars)) for f, ars in zip(self.feature_maps, self.aspect_ratios)
        )


SSD_PRESETS: dict[str, SSDPriorConfig] = {
    # ssd.pytorch data/config.py `voc`: 8732 priors
    "voc300": SSDPriorConfig(
        feature_maps=(38, 19, 10, 5, 3, 1),
        image_size=300,
        steps=(8, 16, 32, 64, 100, 300),
        min_sizes=(30, 60, 111, 162, 213, 264),
        max_sizes=(60, 111, 162, 213, 264, 315),
        aspect_ratios=((2,), (2, 3), (2, 3), (2, 3), (2,), (2,)),
    ),
    # ssd.pytorch data/config.py `coco`: 8732 priors, smaller minimum sizes
    "coco300": SSDPriorConfig(
        feature_maps=(38, 19, 10, 5, 3, 1),
        image_size=300,
        steps=(8, 16, 32, 64, 100, 300),
        min_sizes=(21, 45, 99, 153, 207, 261),
        max_sizes=(45, 99, 153, 207, 261, 315),
        aspect_ratios=((2,), (2, 3), (2, 3), (2, 3), (2,), (2,)),
    ),
    # the SSD paper's 512 model (Caffe SSD / lufficc/SSD VOC512): 24564 priors.
    # ssd.pytorch itself ships no 512 configuration.
    "voc512": SSDPriorConfig(
        feature_maps=(64, 32, 16, 8, 4, 2, 1),
        image_size=512,
        steps=(8, 16, 32, 64, 128, 256, 512),
        min_sizes=(35.84, 76.8, 153.6, 230.4, 307.2, 384.0, 460.8),
        max_sizes=(76.8, 153.6, 230.4, 307.2, 384.0, 460.8, 537.6),
        aspect_ratios=((2,), (2, 3), (2, 3), (2, 3), (2, 3), (2,), (2,)),
    ),
}


def _image_hw(image_size: "int | Sequence[int]", name: str = "image_size") -> tuple[int, int]:
    """``(height, width)`` from one positive int or a pair of them, else a named error."""
    one_side = isinstance(image_size, numbers.Integral) and not isinstance(image_size, bool)
    try:
        # ints, NumPy ints, integer 0-d tensors
        hw = [operator.index(v) for v in ((image_size, image_size) if one_side else image_size)]
    except TypeError:
        raise TypeError(f"{name}: expected an int or (height, width) ints, got {image_size!r}") from None
    if len(hw) != 2 or min(hw) <= 0:
        raise ValueError(f"{name}: expected a positive int or (height, width), got {image_size!r}")
    return hw[0], hw[1]


def _positive_numbers(values: Sequence[float], name: str) -> tuple[float, ...]:
    """A non-empty sequence of positive finite numbers, else a named ``ValueError``."""
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a sequence of positive numbers, got {values!r}") from None
    if not out or not all(math.isfinite(v) and v > 0 for v in out):
        raise ValueError(f"{name}: expected a non-empty sequence of positive numbers, got {values!r}")
    return out


def _fresh_tensor(arr: np.ndarray, device: Optional[torch.device], dtype: torch.dtype) -> Tensor:
    """A new tensor holding the cached array ``arr``: callers may modify it in place safely."""
    return torch.tensor(arr, device=device, dtype=dtype)


def _resolve_ssd_config(config: "str | SSDPriorConfig") -> SSDPriorConfig:
    if isinstance(config, SSDPriorConfig):
        return config
    if config not in SSD_PRESETS:
        raise ValueError(f"config: expected one of {tuple(SSD_PRESETS)} or an SSDPriorConfig, got {config!r}")
    return SSD_PRESETS[config]


@lru_cache(maxsize=16)
def _ssd_priors_np(config: SSDPriorConfig) -> np.ndarray:
    rows = []
    for f, step, min_size, max_size, ars in zip(
        config.feature_maps, config.steps, config.min_sizes, config.max_sizes, config.aspect_ratios
    ):
        f_k = config.image_size / step
        idx = np.arange(f, dtype=np.float64)
        cy, cx = np.meshgrid((idx + 0.5) / f_k, (idx + 0.5) / f_k, indexing="ij")
        s_k = min_size / config.image_size
        s_k_prime = math.sqrt(s_k * (max_size / config.image_size))
        sizes = [(s_k, s_k), (s_k_prime, s_k_prime)]
        for ar in ars:
            sizes += [(s_k * math.sqrt(ar), s_k / math.sqrt(ar)), (s_k / math.sqrt(ar), s_k * math.sqrt(ar))]
        wh = np.array(sizes, dtype=np.float64)  # (K, 2)
        k = len(sizes)
        cell = np.stack([cx.ravel(), cy.ravel()], axis=1)  # (f*f, 2) row-major
        boxes = np.concatenate(
            [np.repeat(cell, k, axis=0), np.tile(wh, (f * f, 1))], axis=1
        )
        rows.append(boxes)
    out = np.concatenate(rows, axis=0)
    if config.clip:
        out = np.clip(out, 0.0, 1.0)
    return out.astype(np.float32)


def ssd_priors(
    config: "str | SSDPriorConfig" = "voc300",
    *,
    device: Optional[torch.device] = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """SSD prior boxes ``(P, 4)`` as normalised ``(cx, cy, w, h)``, in ssd.pytorch's order.

    Order: feature map, then row (y), column (x), then per cell the small square, the large
    square ``sqrt(s_k * s_k+1)``, then ``(s*sqrt(ar), s/sqrt(ar))`` and its transpose for each
    extra aspect ratio. ``config`` is a preset name (``"voc300"`` -> 8732 priors,
    ``"coco300"`` -> 8732, ``"voc512"`` -> 24564) or an :class:`SSDPriorConfig`.
    """
    cfg = _resolve_ssd_config(config)
    return _fresh_tensor(_ssd_priors_np(cfg), device, dtype)


@lru_cache(maxsize=16)
def _retinaface_priors_np(
    image_hw: tuple[int, int],
    min_sizes: tuple[tuple[int, ...], ...],
    steps: tuple[int, ...],
    clip: bool,
) -> np.ndarray:
    height, width = image_hw
    rows = []
    for sizes, step in zip(min_sizes, steps):
        fh, fw = math.ceil(height / step), math.ceil(width / step)
        cy = (np.arange(fh, dtype=np.float64) + 0.5) * step / height
        cx = (np.arange(fw, dtype=np.float64) + 0.5) * step / width
        gy, gx = np.meshgrid(cy, cx, indexing="ij")
        wh = np.array([(s / width, s / height) for s in sizes], dtype=np.float64)
        cell = np.stack([gx.ravel(), gy.ravel()], axis=1)
        rows.append(
            np.concatenate(
                [np.repeat(cell, len(sizes), axis=0), np.tile(wh, (fh * fw, 1))], axis=1
            )
        )
    out = np.concatenate(rows, axis=0)
    if clip:
        out = np.clip(out, 0.0, 1.0)
    return out.astype(np.float32)


def retinaface_priors(
    image_size: "int | Sequence[int]" = 640,
    *,
    min_sizes: Sequence[Sequence[int]] = ((16, 32), (64, 128), (256, 512)),
    steps: Sequence[int] = (8, 16, 32),
    clip: bool = False,
    device: Optional[torch.device] = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """RetinaFace priors ``(P, 4)`` as normalised ``(cx, cy, w, h)`` (Pytorch_Retinaface order).

    ``image_size`` is ``(height, width)`` or one side. Defaults are the mobilenet config
    (``cfg_mnet``): maps of side ``ceil(size / step)`` for steps 8/16/32 with two square
    anchors per cell; 16800 priors at 640 x 640. Order: map, row, column, anchor size.
    """
    hw = _image_hw(image_size)
    _positive_numbers(steps, "steps")
    for sizes in min_sizes:
        _positive_numbers(sizes, "min_sizes")
    if len(min_sizes) != len(steps):
        raise ValueError(
            f"min_sizes: expected one entry per step ({len(steps)}), got {len(min_sizes)}"
        )
    arr = _retinaface_priors_np(
        (int(hw[0]), int(hw[1])), tuple(tuple(s) for s in min_sizes), tuple(steps), clip
    )
    return _fresh_tensor(arr, device, dtype)


def _whctrs(anchor: np.ndarray) -> tuple[float, float, float, float]:
    w = anchor[2] - anchor[0] + 1
    h = anchor[3] - anchor[1] + 1
    return w, h, anchor[0] + 0.5 * (w - 1), anchor[1] + 0.5 * (h - 1)


def _mkanchors(ws: np.ndarray, hs: np.ndarray, x_ctr: float, y_ctr: float) -> np.ndarray:
    ws, hs = ws[:, None], hs[:, None]
    return np.hstack(
        (x_ctr - 0.5 * (ws - 1), y_ctr - 0.5 * (hs - 1), x_ctr + 0.5 * (ws - 1), y_ctr + 0.5 * (hs - 1))
    )


@lru_cache(maxsize=16)
def _rcnn_base_anchors_np(
    base_size: int, ratios: tuple[float, ...], scales: tuple[float, ...]
) -> np.ndarray:
    base = np.array([1, 1, base_size, base_size], dtype=np.float64) - 1
    w, h, x_ctr, y_ctr = _whctrs(base)
    size_ratios = (w * h) / np.array(ratios, dtype=np.float64)
    ws = np.round(np.sqrt(size_ratios))
    hs = np.round(ws * np.array(ratios, dtype=np.float64))
    ratio_anchors = _mkanchors(ws, hs, x_ctr, y_ctr)
    out = []
    for anchor in ratio_anchors:
        w, h, x_ctr, y_ctr = _whctrs(anchor)
        scale = np.array(scales, dtype=np.float64)
        out.append(_mkanchors(w * scale, h * scale, x_ctr, y_ctr))
    return np.vstack(out)


def rcnn_base_anchors(
    base_size: int = 16,
    ratios: Sequence[float] = (0.5, 1.0, 2.0),
    scales: Sequence[float] = (8, 16, 32),
) -> Tensor:
    """Faster R-CNN base anchors ``(len(ratios) * len(scales), 4)`` x1, y1, x2, y2 (float64).

    The py-faster-rcnn / tf-faster-rcnn ``generate_anchors``: a ``base_size`` square
    ``[0, 0, 15, 15]`` (inclusive pixels), widths rounded per ratio, then scaled; ordered
    ratio-major (scales within a ratio). The defaults give the well-known 9 anchors, e.g.
    ``[-84, -40, 99, 55]`` first.
    """
    require_positive(base_size, "base_size")
    arr = _rcnn_base_anchors_np(int(base_size), _positive_numbers(ratios, "ratios"), _positive_numbers(scales, "scales"))
    return _fresh_tensor(arr, None, torch.float64)


def rcnn_anchors(
    feat_height: int,
    feat_width: int,
    feat_stride: int = 16,
    *,
    ratios: Sequence[float] = (0.5, 1.0, 2.0),
    scales: Sequence[float] = (8, 16, 32),
    device: Optional[torch.device] = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Faster R-CNN anchors over a feature map, ``(H * W * A, 4)`` x1, y1, x2, y2 pixels.

    The base anchors shifted by ``(x * stride, y * stride)``; ordered position-major (row y,
    then column x), then the ``A`` base anchors, as tf-faster-rcnn's ``generate_anchors_pre``.
    """
    if feat_height <= 0 or feat_width <= 0:
        raise ValueError(
            f"feat_height, feat_width: expected positive sizes, got {feat_height} x {feat_width}"
        )
    require_positive(feat_stride, "feat_stride")
    base = rcnn_base_anchors(16, ratios, scales).numpy()
    sx = np.arange(feat_width) * feat_stride
    sy = np.arange(feat_height) * feat_stride
    gx, gy = np.meshgrid(sx, sy)
    shifts = np.stack([gx.ravel(), gy.ravel(), gx.ravel(), gy.ravel()], axis=1)
    anchors = (base[None, :, :] + shifts[:, None, :]).reshape(-1, 4).astype(np.float32)
    return torch.from_numpy(anchors).to(device=device, dtype=dtype)


def retinanet_anchors(
    image_size: "int | Sequence[int]" = 800,
    *,
    strides: Sequence[int] = (8, 16, 32, 64, 128),
    sizes: Sequence[float] = (32, 64, 128, 256, 512),
    scales: Sequence[float] = (1.0, 2 ** (1 / 3), 2 ** (2 / 3)),
    ratios: Sequence[float] = (0.5, 1.0, 2.0),
    offset: float = 0.0,
    device: Optional[torch.device] = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """RetinaNet anchors ``(A, 4)`` x1, y1, x2, y2 pixels over levels P3-P7.

    Per level ``l`` a map of ``ceil(H / stride) x ceil(W / stride)`` cells centred at
    ``((x + offset) * stride, (y + offset) * stride)`` (detectron2's convention, offset 0),
    with ``len(scales) * len(ratios)`` anchors of area ``(size * scale)**2`` and
    ``h / w = ratio``, ordered scale-major. Order: level, row, column, anchor.
    800 x 800 gives 120087 anchors.
    """
    hw = _image_hw(image_size)
    _positive_numbers(strides, "strides")
    _positive_numbers(sizes, "sizes")
    _positive_numbers(scales, "scales")
    _positive_numbers(ratios, "ratios")
    if len(strides) != len(sizes):
        raise ValueError(f"sizes: expected one per stride ({len(strides)}), got {len(sizes)}")
    out = []
    for stride, size in zip(strides, sizes):
        cell = []
        for scale in scales:
            area = (size * scale) ** 2
            for ratio in ratios:
                w = math.sqrt(area / ratio)
                h = w * ratio
                cell.append((-w / 2, -h / 2, w / 2, h / 2))
        base = np.array(cell, dtype=np.float64)
        fh, fw = math.ceil(hw[0] / stride), math.ceil(hw[1] / stride)
        sx = (np.arange(fw) + offset) * stride
        sy = (np.arange(fh) + offset) * stride
        gx, gy = np.meshgrid(sx, sy)
        shifts = np.stack([gx.ravel(), gy.ravel(), gx.ravel(), gy.ravel()], axis=1)
        out.append((shifts[:, None, :] + base[None, :, :]).reshape(-1, 4))
    return torch.from_numpy(np.concatenate(out).astype(np.float32)).to(device=device, dtype=dtype)


# YOLOv3 COCO anchors in pixels of the 416 input (Redmon & Farhadi 2018), small to large.
YOLOV3_ANCHORS_PX = (
    ((10, 13), (16, 30), (33, 23)),
    ((30, 61), (62, 45), (59, 119)),
    ((116, 90), (156, 198), (373, 326)),
)
YOLOV3_STRIDES = (8, 16, 32)


def yolov3_anchors(
    *,
    grid_units: bool = False,
    strides: Sequence[int] = YOLOV3_STRIDES,
    device: Optional[torch.device] = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The default YOLOv3 anchors ``(3 scales, 3 anchors, 2)`` as (w, h).

    In pixels, or with ``grid_units=True`` divided by each scale's stride (the layout of
    tensorflow-yolov3's ``basline_anchors.txt``, e.g. ``1.25, 1.625`` first).
    """
    anchors = torch.tensor(YOLOV3_ANCHORS_PX, dtype=torch.float64)
    if len(_positive_numbers(strides, "strides")) != len(YOLOV3_ANCHORS_PX):
        raise ValueError(f"strides: expected {len(YOLOV3_ANCHORS_PX)} strides (one per scale), got {strides!r}")
    if grid_units:
        anchors = anchors / torch.tensor(strides, dtype=torch.float64).view(-1, 1, 1)
    return anchors.to(device=device, dtype=dtype)


def yolo_grid(
    height: int,
    width: int,
    *,
    device: Optional[torch.device] = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Cell offsets ``(H, W, 2)``: ``[..., 0]`` the column x, ``[..., 1]`` the row y."""
    require_positive(height, "height", allow_zero=True)
    require_positive(width, "width", allow_zero=True)
    ys, xs = torch.meshgrid(
        torch.arange(height, device=device, dtype=dtype),
        torch.arange(width, device=device, dtype=dtype),
        indexing="ij",
    )
    return torch.stack((xs, ys), dim=-1)


def anchor_points(
    feature_sizes: Sequence[tuple[int, int]],
    strides: Sequence[float],
    *,
    offset: float = 0.5,
    dtype: torch.dtype = torch.float32,
    device: Optional[torch.device] = None,
) -> tuple[Tensor, Tensor]:
    """Anchor points of anchor-free heads (YOLOv8 / YOLO11 / YOLO26, FCOS): every cell centre of
    every level, in pixels, and the stride of each.

    ``feature_sizes``: ``(h, w)`` of each level; ``strides``: one per level. Returns
    ``points (A, 2)``, cell ``(x + offset, y + offset)`` times the level's stride, row-major per
    level, levels one after another, and ``strides (A,)``.

    >>> points, strides = anchor_points([(2, 2), (1, 1)], [8, 16])
    >>> points.tolist(), strides.tolist()
    ([[4.0, 4.0], [12.0, 4.0], [4.0, 12.0], [12.0, 12.0], [8.0, 8.0]], [8.0, 8.0, 8.0, 8.0, 16.0])
    """
    if len(feature_sizes) != len(strides):
        raise ValueError(f"feature_sizes, strides: expected one stride per level, got {len(feature_sizes)} "
                         f"sizes and {len(strides)} strides")
    points, per_anchor = [], []
    for (h, w), stride in zip(feature_sizes, strides):
        cells = yolo_grid(h, w, device=device, dtype=dtype).reshape(-1, 2)
        points.append((cells + offset) * float(stride))
        per_anchor.append(torch.full((h * w,), float(stride), dtype=dtype, device=device))
    return torch.cat(points), torch.cat(per_anchor)


def _pair(value: "float | Sequence[float] | None", default: "tuple[float, float]", name: str) -> tuple[float, float]:
    """``None`` -> ``default``; a number -> ``(v, v)``; a ``(vertical, horizontal)`` pair as is."""
    if value is None:
        return default
    if isinstance(value, (int, float)):
        return float(value), float(value)
    if len(value) != 2:
        raise ValueError(f"{name}: expected a number or a (height, width) pair, got {value!r}")
    return float(value[0]), float(value[1])


def _as_layers(value: "Sequence | None", n_layers: int, name: str) -> tuple:
    if value is None:
        return (None,) * n_layers
    if len(value) != n_layers:
        raise ValueError(f"{name}: expected {n_layers} entries (one per predictor layer), got {len(value)}")
    return tuple(v if isinstance(v, (int, float)) else tuple(v) for v in value)


@lru_cache(maxsize=16)
def _ssd_keras_anchors_np(
    img_hw: tuple[int, int],
    predictor_sizes: tuple[tuple[int, int], ...],
    scales: tuple[float, ...],
    aspect_ratios: tuple[tuple[float, ...], ...],
    two_boxes_for_ar1: bool,
    steps: tuple,
    offsets: tuple,
    clip_boxes: bool,
    normalize_coords: bool,
    coords: str,
) -> np.ndarray:
    img_h, img_w = img_hw
    size = min(img_h, img_w)
    layers = []
    for i, (fm_h, fm_w) in enumerate(predictor_sizes):
        this_scale, next_scale = scales[i], scales[i + 1]
        wh = []
        for ar in aspect_ratios[i]:
            if ar == 1:
                wh.append((this_scale * size, this_scale * size))
                if two_boxes_for_ar1:
                    side = np.sqrt(this_scale * next_scale) * size
                    wh.append((side, side))
            else:
                wh.append((this_scale * size * np.sqrt(ar), this_scale * size / np.sqrt(ar)))
        wh_arr = np.array(wh, dtype=np.float64)  # (K, 2)
        step_h, step_w = _pair(steps[i], (img_h / fm_h, img_w / fm_w), "steps")
        off_h, off_w = _pair(offsets[i], (0.5, 0.5), "offsets")
        cy = np.linspace(off_h * step_h, (off_h + fm_h - 1) * step_h, fm_h)
        cx = np.linspace(off_w * step_w, (off_w + fm_w - 1) * step_w, fm_w)
        cx_grid, cy_grid = np.meshgrid(cx, cy)  # (fm_h, fm_w), row-major over (y, x)
        k = wh_arr.shape[0]
        cx_all = np.repeat(cx_grid[..., None], k, axis=-1)
        cy_all = np.repeat(cy_grid[..., None], k, axis=-1)
        w_all, h_all = wh_arr[:, 0], wh_arr[:, 1]
        corners = np.stack(
            [cx_all - w_all / 2.0, cy_all - h_all / 2.0, cx_all + w_all / 2.0, cy_all + h_all / 2.0],
            axis=-1,
        )  # (fm_h, fm_w, K, 4) pixels
        layers.append(corners.reshape(-1, 4))
    boxes = np.concatenate(layers, axis=0)
    if clip_boxes:  # the original's rule: >= side -> side - 1, < 0 -> 0 (pixels)
        for cols, side in (([0, 2], img_w), ([1, 3], img_h)):
            c = boxes[:, cols]
            c[c >= side] = side - 1
            c[c < 0] = 0
            boxes[:, cols] = c
    if normalize_coords:
        boxes[:, [0, 2]] /= img_w
        boxes[:, [1, 3]] /= img_h
    if coords == "centroids":
        return np.stack(
            [
                (boxes[:, 0] + boxes[:, 2]) / 2.0,
                (boxes[:, 1] + boxes[:, 3]) / 2.0,
                boxes[:, 2] - boxes[:, 0],
                boxes[:, 3] - boxes[:, 1],
            ],
            axis=1,
        )
    if coords == "minmax":
        return boxes[:, [0, 2, 1, 3]].copy()
    return boxes


def ssd_keras_anchors(
    img_height: int,
    img_width: int,
    predictor_sizes: Sequence[Sequence[int]],
    scales: Sequence[float],
    aspect_ratios_per_layer: Sequence[Sequence[float]],
    two_boxes_for_ar1: bool = True,
    steps: Optional[Sequence] = None,
    offsets: Optional[Sequence] = None,
    clip_boxes: bool = False,
    normalize_coords: bool = True,
    coords: str = "centroids",
    *,
    device: Optional[torch.device] = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Anchor boxes ``(P, 4)`` of ssd_keras (pierluigiferrari/ssd_keras ``SSDInputEncoder``).

    Args:
        img_height, img_width: input size in pixels.
        predictor_sizes: ``(fm_height, fm_width)`` of each predictor layer.
        scales: ``len(predictor_sizes) + 1`` fractions of ``min(img_height, img_width)``;
            the last one only sizes the extra ar=1 box of the last layer.
        aspect_ratios_per_layer: ``w / h`` ratios of each layer, in the order the boxes appear.
        two_boxes_for_ar1: after each ar=1 box add one of side ``sqrt(s_k * s_k+1) * size``.
        steps: per layer a pixel stride (number or ``(h, w)``); ``None`` -> image / feature map.
        offsets: per layer the first centre as a fraction of the step; ``None`` -> 0.5.
        clip_boxes: clip the pixel corners as the original does (``>= side`` -> ``side - 1``,
            ``< 0`` -> 0).
        normalize_coords: divide by the image width / height.
        coords: output format: ``"centroids"`` ``(cx, cy, w, h)``, ``"corners"``
            ``(xmin, ymin, xmax, ymax)`` or ``"minmax"`` ``(xmin, xmax, ymin, ymax)``.

    Order: layer, row (y), column (x), box of the cell. Computed in float64 with the
    original's operation order (centre -> corners -> clip -> normalise -> ``coords``), so
    float64 output equals the original's template and float32 output its float32 cast.
    The SSD300 configuration of the ssd_keras tutorial gives 8732 anchors.
    """
    require_choice(coords, "coords", ("centroids", "corners", "minmax"))
    sizes = tuple((int(h), int(w)) for h, w in predictor_sizes)
    n = len(sizes)
    if len(scales) != n + 1:
        raise ValueError(f"scales: expected {n + 1} values (one per layer plus one), got {len(scales)}")
    if any(s <= 0 for s in scales):
        raise ValueError(f"scales: expected values > 0, got {tuple(scales)}")
    if len(aspect_ratios_per_layer) != n:
        raise ValueError(
            f"aspect_ratios_per_layer: expected {n} lists (one per layer), got {len(aspect_ratios_per_layer)}"
        )
    ars = tuple(tuple(float(a) for a in layer) for layer in aspect_ratios_per_layer)
    if any(a <= 0 for layer in ars for a in layer):
        raise ValueError(f"aspect_ratios_per_layer: expected values > 0, got {ars}")
    boxes = _ssd_keras_anchors_np(
        (int(img_height), int(img_width)),
        sizes,
        tuple(float(s) for s in scales),
        ars,
        bool(two_boxes_for_ar1),
        _as_layers(steps, n, "steps"),
        _as_layers(offsets, n, "offsets"),
        bool(clip_boxes),
        bool(normalize_coords),
        coords,
    )
    return torch.tensor(boxes, device=device, dtype=dtype)  # a copy: the cache stays intact
