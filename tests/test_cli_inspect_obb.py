"""``detloss inspect --preset yolov8-obb-1024``: rotated ground truth drawn, the report checked against the
float64 oracle of the rotated assigner on independently rebuilt inputs."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from detloss.cli import main
from test_rotated_task_aligned import oracle

matplotlib = pytest.importorskip("matplotlib")
import matplotlib.image as mpimg  # noqa: E402

BOXES = "100,100,220,180,1;120,110,230,200,2;400,400,404,406,3"
LINE = re.compile(r"GT(\d+) .*best IoU ([0-9.]+)\s+positives\s+(\d+)\s+candidates\s+(\d+)\s+own top-k\s+(\d+)"
                  r"\s+lost (\d+) / won (\d+)")


def test_report_agrees_with_the_oracle(tmp_path, capsys):
    torch.set_num_threads(1)
    out = tmp_path / "obb.png"
    assert main(["inspect", "--preset", "yolov8-obb-1024", "--boxes", BOXES, "--seed", "5", "--out", str(out)]) == 0
    assert mpimg.imread(out).ndim == 3
    text = capsys.readouterr().out
    rows = {int(m.group(1)): m.groups()[1:] for m in map(LINE.search, text.splitlines()) if m}
    assert sorted(rows) == [0, 1, 2] and "no positive at all" in text
    # independent inputs: the synthetic sample is 1024 px, boxes map 1:1; angles and predictions from the
    # documented seeded recipe; anchor cell centres written out
    strides = np.concatenate([np.full((1024 // s) ** 2, s, np.float64) for s in (8, 16, 32)])
    cells = np.concatenate([np.stack(np.meshgrid(np.arange(1024 // s), np.arange(1024 // s)), -1).reshape(-1, 2)
                            for s in (8, 16, 32)])
    points = (cells + 0.5) * strides[:, None]
    xyxy = np.array([[100, 100, 220, 180], [120, 110, 230, 200], [400, 400, 404, 406]], np.float64)
    angle = ((torch.rand(3, generator=torch.Generator().manual_seed(6)) * 2 - 1) * (math.pi / 3)).double().numpy()
    gt = np.concatenate(((xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2], angle[:, None]), -1)[None]
    gen = torch.Generator().manual_seed(5)
    p = len(points)
    scores = torch.rand(1, p, 15, generator=gen).double().numpy()
    sides = (torch.rand(1, p, 2, generator=gen) * 7 + 1).double().numpy() * strides[:, None]
    pred_angle = ((torch.rand(1, p, 1, generator=gen) - 0.5) * math.pi).double().numpy()
    pred = np.concatenate((points[None], sides, pred_angle), -1)
    labels = np.array([[1, 2, 3]])
    near = np.abs(points - gt[0, :, None, :2]).max(-1).min(0) < 200  # the oracle loops in Python: skip far anchors
    fg_near, matched_near, _ = oracle(scores[:, near], pred[:, near], points[near], gt, labels, np.ones((1, 3), bool),
                                      10, 0.5, 6.0, None, 16.0)
    for g, (best, positives, candidates, own, lost, won) in rows.items():
        mine = fg_near[0] & (matched_near[0] == g)
        alone = oracle(scores[:, near], pred[:, near], points[near], gt[:, g:g + 1], labels[:, g:g + 1],
                       np.ones((1, 1), bool), 10, 0.5, 6.0, None, 16.0)[0][0]
        assert int(positives) == int(mine.sum()), g
        assert int(own) == int(alone.sum()), g
        assert (int(lost), int(won)) == (int((alone & ~mine).sum()), int((mine & ~alone).sum())), g
    # the tiny box (4 x 6 px) is floored to 16 px for the candidate test: a few candidates, not none
    assert 0 < int(rows[2][2]) <= 16
    # the two overlapping boxes compete for anchors
    assert int(rows[0][4]) + int(rows[1][4]) > 0
