"""``detloss demo``: tiny runs write valid files; data, NMS and mAP helpers; errors are one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from detloss import box_iou
from detloss.cli import main
from detloss.cli.data import collate, load_coco_dataset, make_synthetic, save_coco
from detloss.cli.evaluate import coco_map
from detloss.cli.heads import available_families
from detloss.cli.postprocess import Detections, batched_nms

matplotlib = pytest.importorskip("matplotlib")
pytest.importorskip("pycocotools")
pytest.importorskip("tqdm")
import matplotlib.image as mpimg  # noqa: E402

TINY = ["--steps", "3", "--train-images", "16", "--val-images", "8", "--image-size", "64",
        "--batch-size", "4", "--threads", "1", "--no-progress"]


def _check_outputs(out: str, steps: int) -> dict:
    with open(os.path.join(out, "metrics.json")) as fh:
        metrics = json.load(fh)
    for key in ("mAP", "mAP50", "mAP75"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["steps"] == steps
    for name in ("loss_curve.png", "detections.png"):
        img = mpimg.imread(os.path.join(out, name))
        assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    assert ckpt["step"] == steps and ckpt["model"]
    return metrics


@pytest.mark.parametrize("family", available_families())
def test_tiny_demo_writes_valid_files(tmp_path, capsys, family):
    torch.set_num_threads(1)
    out = str(tmp_path / family)
    assert main(["demo", "--loss", family, "--out", out, *TINY]) == 0
    metrics = _check_outputs(out, 3)
    assert metrics["loss"] == family
    assert np.isfinite(metrics["final_losses"]["loss"])
    printed = capsys.readouterr().out
    assert os.path.join(out, "metrics.json") in printed and os.path.join(out, "checkpoint.pt") in printed


@pytest.mark.skipif("ssd" not in available_families(), reason="SSDLoss not available")
def test_resume_continues_from_the_checkpoint(tmp_path):
    torch.set_num_threads(1)
    out = str(tmp_path / "run")
    assert main(["demo", "--out", out, *TINY]) == 0
    args = [a if a != "3" else "5" for a in TINY]
    assert main(["demo", "--out", out, "--resume", os.path.join(out, "checkpoint.pt"), *args]) == 0
    metrics = _check_outputs(out, 5)
    assert metrics["steps"] == 5


@pytest.mark.skipif("ssd" not in available_families(), reason="SSDLoss not available")
def test_coco_dataset_through_the_same_pipeline(tmp_path):
    torch.set_num_threads(1)
    data = make_synthetic(12, 96, seed=4)
    ann = save_coco(data, str(tmp_path / "ann.json"), str(tmp_path / "img"))
    loaded = load_coco_dataset(ann, str(tmp_path / "img"), 64)  # letterboxed 96 -> 64
    assert len(loaded) == 12 and loaded.image_size == 64
    np.testing.assert_allclose(loaded.boxes[3], data.boxes[3] * (64 / 96), rtol=1e-5)
    np.testing.assert_array_equal(loaded.labels[3], data.labels[3])
    out = str(tmp_path / "out")
    args = ["demo", "--data", ann, "--images", str(tmp_path / "img"), "--out", out, "--val-images", "4",
            "--steps", "2", "--image-size", "64", "--batch-size", "4", "--threads", "1", "--no-progress"]
    assert main(args) == 0
    _check_outputs(out, 2)


def test_synthetic_data_is_deterministic_and_valid():
    a, b, c = make_synthetic(6, 64, seed=1), make_synthetic(6, 64, seed=1), make_synthetic(6, 64, seed=2)
    np.testing.assert_array_equal(a.images, b.images)
    assert not np.array_equal(a.images, c.images)
    for boxes, labels in zip(a.boxes, a.labels):
        assert len(boxes) >= 1 and (boxes[:, 2:] > boxes[:, :2]).all()
        assert (boxes >= 0).all() and (boxes <= 64).all() and set(labels) <= {0, 1, 2}
    faces = make_synthetic(4, 64, seed=1, faces=True)
    for boxes, lms in zip(faces.boxes, faces.landmarks):  # the five points lie inside the face box
        x, y = lms[:, 0::2], lms[:, 1::2]
        assert ((x > boxes[:, :1]) & (x < boxes[:, 2:3]) & (y > boxes[:, 1:2]) & (y < boxes[:, 3:4])).all()
    batch = collate(a, [0, 1, 2])
    assert batch.images.shape == (3, 3, 64, 64) and batch.valid.sum() == sum(len(a.boxes[i]) for i in range(3))


def _greedy_nms_oracle(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, thr: float) -> list[int]:
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    keep: list[int] = []
    for i in order:
        ok = True
        for j in keep:
            if labels[i] != labels[j]:
                continue
            iw = max(0.0, min(boxes[i, 2], boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0]))
            ih = max(0.0, min(boxes[i, 3], boxes[j, 3]) - max(boxes[i, 1], boxes[j, 1]))
            inter = iw * ih
            union = np.prod(boxes[i, 2:] - boxes[i, :2]) + np.prod(boxes[j, 2:] - boxes[j, :2]) - inter
            if inter / union > thr:
                ok = False
                break
        if ok:
            keep.append(i)
    return keep


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 12), st.integers(0, 10_000), st.sampled_from([0.3, 0.5, 0.7]))
def test_batched_nms_matches_greedy_oracle(n, seed, thr):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 20, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 15, (n, 2))], 1)
    scores = rng.permutation(n) / max(n, 1) + 0.01  # distinct scores
    labels = rng.integers(0, 3, n)
    got = batched_nms(torch.tensor(boxes, dtype=torch.float64), torch.tensor(scores),
                      torch.tensor(labels), thr).tolist()
    assert got == _greedy_nms_oracle(boxes, scores, labels, thr)


def test_coco_map_is_one_for_perfect_detections_and_lower_for_shifted_ones():
    data = make_synthetic(5, 64, seed=0)
    perfect = [Detections(torch.from_numpy(b), torch.ones(len(b)), torch.from_numpy(l)) for b, l in zip(data.boxes, data.labels)]
    assert coco_map(data, perfect)["mAP"] == pytest.approx(1.0)
    shifted = [Detections(d.boxes + 3.0, d.scores, d.labels) for d in perfect]
    iou = float(box_iou(perfect[0].boxes, shifted[0].boxes).diagonal().min())
    assert iou < 0.95 and coco_map(data, shifted)["mAP"] < 1.0
    assert coco_map(data, [Detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long))] * 5)["mAP"] == 0.0


def _run_cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "detloss", *args], capture_output=True, text=True, timeout=120)


def _bad_coco(tmp_path, mutate) -> str:
    data = {"images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 64}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 10]}],
            "categories": [{"id": 1, "name": "thing"}]}
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("case, expected", [
    ("missing", "file not found"),
    ("malformed", "malformed JSON"),
    ("negative", "negative size"),
    ("category", "unknown category id 7"),
])
def test_bad_input_is_one_line_with_exit_code_2(tmp_path, case, expected):
    if case == "missing":
        ann = str(tmp_path / "nope.json")
    elif case == "malformed":
        ann = str(tmp_path / "broken.json")
        (tmp_path / "broken.json").write_text("{\"images\": [")
    elif case == "negative":
        ann = _bad_coco(tmp_path, lambda d: d["annotations"][0].update(bbox=[1, 2, -3, 4]))
    else:
        ann = _bad_coco(tmp_path, lambda d: d["annotations"][0].update(category_id=7))
    res = _run_cli(["demo", "--data", ann, "--images", str(tmp_path), "--out", str(tmp_path / "o")])
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in res.stderr


def test_bad_options_are_one_line_with_exit_code_2(tmp_path):
    for args, expected in (
        (["demo", "--loss", "nope"], "invalid choice"),
        (["demo", "--image-size", "100"], "multiple of 32"),
        (["demo", "--resume", str(tmp_path / "none.pt"), *TINY], "file not found"),
        (["demo", "--data", str(tmp_path / "a.json")], "--images"),
    ):
        res = _run_cli(args)
        assert res.returncode == 2, (args, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1 and expected in res.stderr, res.stderr


@pytest.mark.slow
@pytest.mark.skipif("ssd" not in available_families(), reason="SSDLoss not available")
def test_default_demo_learns(tmp_path):
    """The default run (about 3-5 minutes on 2 cores) reaches COCO mAP@.5 well above 0.5."""
    torch.set_num_threads(2)
    assert main(["demo", "--out", str(tmp_path), "--no-progress"]) == 0
    metrics = _check_outputs(str(tmp_path), json.load(open(tmp_path / "metrics.json"))["steps"])
    assert metrics["mAP50"] > 0.7, metrics
