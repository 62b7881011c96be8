"""``detloss anchors``: recall and matched counts against a float64 NumPy oracle; k-means fit."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from detloss.cli import main
from detloss.cli.anchors import coverage, gather_boxes, kmeans_anchors, shape_recall, wh_iou
from detloss.cli.data import make_synthetic, save_coco
from detloss.cli.presets import PRESETS, get_preset

pytest.importorskip("matplotlib")
import matplotlib.image as mpimg  # noqa: E402


def _iou_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None] - inter)


@pytest.fixture(scope="module")
def coco_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("anchors")
    data = make_synthetic(10, 160, seed=11)
    return save_coco(data, str(d / "ann.json"), str(d / "img")), data


@pytest.mark.parametrize("preset", list(PRESETS))
def test_report_matches_numpy_oracle(tmp_path, capsys, coco_file, preset):
    torch.set_num_threads(1)
    ann, data = coco_file
    out = tmp_path / "hist.png"
    assert main(["anchors", "--preset", preset, "--annotations", ann, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert mpimg.imread(out).ndim == 3
    p = get_preset(preset)
    priors = p.priors_xyxy().double().numpy()
    scale = p.image_size / 160  # square images: stretch and letterbox agree
    best = np.concatenate([_iou_np(b * scale, priors).max(1) for b in data.boxes])
    bpr5, bpr7 = map(float, re.findall(r"IoU>=0\.[57] (\d\.\d+)", text.splitlines()[1]))
    assert bpr5 == pytest.approx(float((best >= 0.5).mean()), abs=1e-3)
    assert bpr7 == pytest.approx(float((best >= 0.7).mean()), abs=1e-3)
    assert f"of {len(best)}" in text


def test_positives_per_gt_equal_the_matcher_counts(coco_file):
    ann, data = coco_file
    preset = get_preset("ssd300-voc")
    per_image, areas = gather_boxes(ann, preset)
    report = coverage(preset, per_image, areas, batch=3)
    from detloss.matching.bipartite import match_priors

    expected = []
    for b in per_image:  # one image at a time, straight through the matcher
        m = match_priors(preset.priors_xyxy() / 300, torch.from_numpy(b)[None] / 300,
                         torch.ones(1, len(b), dtype=torch.bool), pos_iou=0.5, priors_format="xyxy")
        expected += [int(((m.matched_gt[0] == g) & m.positive[0]).sum()) for g in range(len(b))]
    np.testing.assert_array_equal(report.positives, expected)
    np.testing.assert_allclose(areas, np.concatenate([(b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) for b in data.boxes]))


def test_kmeans_recovers_separated_clusters():
    rng = np.random.default_rng(0)
    centres = np.array([[10.0, 10.0], [40.0, 20.0], [90.0, 90.0]])
    wh = np.concatenate([c * rng.uniform(0.95, 1.05, (50, 2)) for c in centres])
    fitted = kmeans_anchors(wh, 3, seed=1)
    assert wh_iou(centres, fitted).max(1).min() > 0.9
    np.testing.assert_array_equal(fitted, kmeans_anchors(wh, 3, seed=1))  # deterministic by seed
    # fitting never loses shape recall against anchors that miss the data
    far = np.array([[300.0, 5.0]])
    assert shape_recall(wh, fitted)[0] == 1.0 and shape_recall(wh, far)[0] == 0.0


def test_fit_prints_anchors_and_gain(tmp_path, capsys, coco_file):
    torch.set_num_threads(1)
    ann, _ = coco_file
    assert main(["anchors", "--preset", "yolov3-416", "--annotations", ann, "--fit", "9",
                 "--out", str(tmp_path / "h.png")]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    anchors_line = lines[next(i for i, l in enumerate(lines) if l.startswith("k-means")) + 1]
    assert len(re.findall(r"\d+x\d+", anchors_line)) == 9
    before, after = re.findall(r"(\d\.\d{3}) -> (\d\.\d{3})", text)[0]
    assert 0.0 <= float(before) <= 1.0 and float(after) >= float(before) - 1e-9
    assert "with the fitted anchors" in text


def test_config_file_equal_to_a_preset_gives_the_same_report(tmp_path, capsys, coco_file):
    ann, _ = coco_file
    cfg = {"family": "retinanet", "image_size": 800, "strides": [8, 16, 32, 64, 128],
           "sizes": [32, 64, 128, 256, 512]}
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    assert main(["anchors", "--config", str(path), "--annotations", ann, "--out", str(tmp_path / "a.png")]) == 0
    custom = capsys.readouterr().out.splitlines()[1:4]
    assert main(["anchors", "--preset", "retinanet-800", "--annotations", ann, "--out", str(tmp_path / "b.png")]) == 0
    assert capsys.readouterr().out.splitlines()[1:4] == custom


@pytest.mark.parametrize("kind, expected", [
    ("preset", "unknown preset"),
    ("missing", "file not found"),
    ("family", "'family' must be one of"),
    ("malformed", "malformed JSON"),
])
def test_errors_are_one_line_with_exit_code_2(tmp_path, coco_file, kind, expected):
    ann, _ = coco_file
    bad = tmp_path / "cfg.json"
    if kind == "preset":
        args = ["--preset", "yolov9-640", "--annotations", ann]
    elif kind == "missing":
        args = ["--annotations", str(tmp_path / "none.json")]
    elif kind == "family":
        bad.write_text(json.dumps({"family": "detr"}))
        args = ["--config", str(bad), "--annotations", ann]
    else:
        bad.write_text("{family: ssd")
        args = ["--config", str(bad), "--annotations", ann]
    res = subprocess.run([sys.executable, "-m", "detloss", "anchors", *args, "--out", str(tmp_path / "x.png")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], res.stderr
