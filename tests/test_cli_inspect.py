"""``detloss inspect``: every preset draws a PNG and its summary agrees with the matchers."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from detloss.cli import main
from detloss.cli.data import make_synthetic, save_coco
from detloss.cli.inspect import parse_boxes
from detloss.cli.presets import PRESETS, get_preset
from detloss.matching.bipartite import match_priors
from detloss.boxes import box_iou

pytest.importorskip("matplotlib")
import matplotlib.image as mpimg  # noqa: E402


def _gt_lines(text: str) -> list[tuple[int, float, int]]:
    """(gt index, best IoU, positives) of each GT line of the summary."""
    pat = re.compile(r"GT(\d+) .*best IoU ([0-9.]+)\s+positives\s+(\d+)")
    return [(int(m.group(1)), float(m.group(2)), int(m.group(3))) for m in map(pat.search, text.splitlines()) if m]


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_writes_a_png_and_a_summary(tmp_path, capsys, preset):
    torch.set_num_threads(1)
    out = tmp_path / f"{preset}.png"
    assert main(["inspect", "--preset", preset, "--seed", "2", "--out", str(out)]) == 0
    img = mpimg.imread(out)
    assert img.ndim == 3 and min(img.shape[:2]) > 100
    text = capsys.readouterr().out
    rows = _gt_lines(text)
    assert rows and all(0.0 <= iou <= 1.0 and pos >= 0 for _, iou, pos in rows)
    assert "no positive at all" in text


def test_ssd_summary_matches_match_priors_and_reports_forcing(tmp_path, capsys):
    """Two tiny GTs share their best prior: the later one wins it (forced only), the earlier
    has no positive; the big GT's positive count equals match_priors' own count."""
    torch.set_num_threads(1)
    spec = "10,10,20,20,1;100,100,140,300,2;12,12,22,22,3"
    assert main(["inspect", "--boxes", spec, "--out", str(tmp_path / "a.png")]) == 0
    text = capsys.readouterr().out
    boxes, _ = parse_boxes(spec)
    preset = get_preset("ssd300-voc")
    priors = preset.priors_xyxy() / 300
    gt = torch.from_numpy(boxes)[None] / 300
    match = match_priors(priors, gt, torch.ones(1, 3, dtype=torch.bool), pos_iou=0.5, priors_format="xyxy")
    expected = [int(((match.matched_gt[0] == g) & match.positive[0]).sum()) for g in range(3)]
    best = box_iou(gt[0], priors).max(-1).values
    rows = _gt_lines(text)
    assert [r[2] for r in rows] == expected
    np.testing.assert_allclose([r[1] for r in rows], best.numpy(), atol=1e-3)
    forced = [g for g in range(3) if expected[g] > 0 and best[g] < 0.5]
    missing = [g for g in range(3) if expected[g] == 0]
    assert f"bipartite forcing: {', '.join(f'GT{g}' for g in forced) or 'none'}" in text
    assert f"no positive at all: {', '.join(f'GT{g}' for g in missing) or 'none'}" in text
    assert forced == [2] and missing == [0]  # the later GT wins the shared prior


def test_image_and_annotations_inputs(tmp_path, capsys):
    torch.set_num_threads(1)
    data = make_synthetic(3, 96, seed=5)
    ann = save_coco(data, str(tmp_path / "ann.json"), str(tmp_path / "img"))
    assert main(["inspect", "--preset", "retinanet-800", "--annotations", ann, "--image-id", "2",
                 "--images", str(tmp_path / "img"), "--out", str(tmp_path / "b.png")]) == 0
    assert len(_gt_lines(capsys.readouterr().out)) == len(data.boxes[1])
    assert main(["inspect", "--image", str(tmp_path / "img" / "000000.png"), "--boxes", "5,5,60,40,0",
                 "--out", str(tmp_path / "c.png")]) == 0
    assert len(_gt_lines(capsys.readouterr().out)) == 1
    assert mpimg.imread(tmp_path / "c.png").ndim == 3


@pytest.mark.parametrize("args, expected", [
    (["--preset", "ssd512-nope"], "unknown preset"),
    (["--boxes", "10,10,5,20,1"], "negative or zero size"),
    (["--boxes", "1,2,3"], "expected 'x1,y1,x2,y2,label'"),
    (["--image", "/nonexistent/x.png", "--boxes", "1,1,5,5,0"], "file not found"),
    (["--annotations", "/nonexistent/a.json", "--image-id", "1"], "file not found"),
])
def test_errors_are_one_line_with_exit_code_2(tmp_path, args, expected):
    res = subprocess.run([sys.executable, "-m", "detloss", "inspect", *args, "--out", str(tmp_path / "x.png")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], res.stderr


def test_unknown_image_id_and_category(tmp_path):
    data = {"images": [{"id": 1, "file_name": "a.png", "width": 8, "height": 8}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 9, "bbox": [1, 1, 2, 2]}],
            "categories": [{"id": 1, "name": "x"}]}
    path = tmp_path / "a.json"
    path.write_text(json.dumps(data))
    res = subprocess.run([sys.executable, "-m", "detloss", "inspect", "--annotations", str(path), "--image-id", "1"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "unknown category id 9" in res.stderr and "Traceback" not in res.stderr
