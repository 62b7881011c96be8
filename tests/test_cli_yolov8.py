"""``detloss demo --loss yolov8`` and ``detloss inspect --preset yolov8-640``: the head, the report, the default run."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from detloss import YOLOv8Loss
from detloss.cli import main
from detloss.cli.data import collate, make_synthetic
from detloss.cli.heads import YOLOv8Head
from detloss.cli.presets import get_preset
from oracles import task_aligned as O

matplotlib = pytest.importorskip("matplotlib")

BOXES = "100,100,300,260,1;120,110,290,250,2;400,400,410,405,3;50,50,52,52,0"
LINE = re.compile(r"GT(\d+) .*positives\s+(\d+)\s+candidates\s+(\d+)\s+own top-k\s+(\d+)\s+lost (\d+) / won (\d+)")


def test_inspect_report_agrees_with_the_matcher(tmp_path, capsys):
    torch.set_num_threads(1)
    assert main(["inspect", "--preset", "yolov8-640", "--boxes", BOXES, "--seed", "3", "--out", str(tmp_path / "a.png")]) == 0
    rows = {int(m.group(1)): [int(v) for v in m.groups()[1:]] for m in map(LINE.search, capsys.readouterr().out.splitlines()) if m}
    assert sorted(rows) == [0, 1, 2, 3]
    # independent computation: the seeded untrained-head predictions (the preset's documented recipe) through
    # the float64 NumPy oracle of the assigner, candidates counted by hand
    preset = get_preset("yolov8-640")
    strides = np.concatenate([np.full((640 // s) ** 2, s, np.float64) for s in (8, 16, 32)])
    points = np.concatenate([np.stack(np.meshgrid(np.arange(640 // s), np.arange(640 // s))[::1], -1).reshape(-1, 2)
                             for s in (8, 16, 32)]).astype(np.float64)
    points = (points + 0.5) * strides[:, None]
    gen = torch.Generator().manual_seed(3)
    scores = torch.rand(1, len(points), max(preset.num_classes, 1), generator=gen).double().numpy()
    dist = (torch.rand(1, len(points), 4, generator=gen) * 3.5 + 0.5).double().numpy() * strides[:, None]
    pred = np.concatenate((points - dist[..., :2], points + dist[..., 2:]), -1)
    gt = np.array([[[100.0, 100, 300, 260], [120, 110, 290, 250], [400, 400, 410, 405], [50, 50, 52, 52]]])
    labels = np.array([[1, 2, 3, 0]])
    kw = dict(topk=10, alpha=0.5, beta=6.0, min_box_side=16.0)
    fg, matched = O.match(scores, pred, points, gt, labels, np.ones((1, 4), bool), **kw)[:2]
    for g, (positives, candidates, own, lost, won) in rows.items():
        mine = fg[0] & (matched[0] == g)
        alone = O.match(scores, pred, points, gt[:, g:g + 1], labels[:, g:g + 1], np.ones((1, 1), bool), **kw)[0][0]
        centre, size = (gt[0, g, :2] + gt[0, g, 2:]) / 2, np.maximum(gt[0, g, 2:] - gt[0, g, :2], 16.0)
        inside = ((points - (centre - size / 2) > 1e-9) & ((centre + size / 2) - points > 1e-9)).all(-1)
        assert (positives, candidates, own) == (int(mine.sum()), int(inside.sum()), int(alone.sum())), g
        assert (lost, won) == (int((alone & ~mine).sum()), int((mine & ~alone).sum())), g
    # the two overlapping boxes compete for the same anchors; the 2 px box has no candidate CIoU > 0
    assert rows[0][3] + rows[1][3] > 0
    assert rows[3][0] == 0


def test_head_loss_and_decode_round_trip():
    torch.manual_seed(0)
    head = YOLOv8Head(3, 64)
    assert isinstance(head.criterion, YOLOv8Loss) and head.points.shape == (84, 2)
    # distributions peaked at bin 2 on every side decode to boxes 2 strides around each point
    box = torch.full((1, 84, 4 * 16), -20.0)
    box.view(1, 84, 4, 16)[..., 2] = 20.0
    decoded = head.decode(box)[0]
    expect = torch.cat((head.points - 2 * head.strides[:, None], head.points + 2 * head.strides[:, None]), -1)
    torch.testing.assert_close(decoded, expect, rtol=0, atol=1e-3)
    batch = collate(make_synthetic(2, 64, 0), [0, 1])
    raw = {"box": torch.randn(2, 84, 64, requires_grad=True), "cls": torch.randn(2, 84, 3, requires_grad=True)}
    out = head.loss(raw, batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and raw["box"].grad.abs().sum() > 0
    assert len(head.predict({k: v.detach() for k, v in raw.items()})) == 2


@pytest.mark.slow
def test_default_demo_learns(tmp_path):
    """The default yolov8 run (12 epochs of 1200 synthetic 128 px images) reaches mAP@.5 >= 0.5."""
    torch.set_num_threads(2)
    assert main(["demo", "--loss", "yolov8", "--out", str(tmp_path), "--no-progress"]) == 0
    metrics = json.load(open(tmp_path / "metrics.json"))
    assert metrics["mAP50"] >= 0.5, metrics
