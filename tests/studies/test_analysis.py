"""Attention analysis: correlation and localisation by hand, the shapes dataset, `atc attention`, curves.png."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from compressor.data.shapes import CLASSES, load_shapes, render
from compressor.studies.attention import Net, analyze, mass_inside, pick_images, spatial_correlation
from tests.helpers import run_atc


def test_spatial_correlation_by_hand():
    a = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 0.0, 1.0]])
    b = torch.tensor([[2.0, 4.0, 6.0], [3.0, 2.0, 1.0], [0.0, 5.0, 0.0]])
    assert spatial_correlation(a, b).tolist() == pytest.approx([1.0, -1.0, -1.0], abs=1e-6)
    # [1, 2, 4] vs [1, 3, 2]: centred [-4/3, -1/3, 5/3] and [-1, 1, 0] → (4/3 − 1/3) / (√(42/9) · √2) = 0.32733
    assert float(spatial_correlation(torch.tensor([[1.0, 2.0, 4.0]]), torch.tensor([[1.0, 3.0, 2.0]]))) == pytest.approx(0.327327, abs=1e-5)


def test_mass_inside_by_hand():
    maps = torch.tensor([[[1.0, 0.0], [0.0, 3.0]]])  # mass [0.25, 0, 0, 0.75]
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, :2, :2] = True        # the whole top-left cell
    mask[0, 2:, 2] = True         # half of the bottom-right cell
    assert float(mass_inside(maps, mask)) == pytest.approx(0.25 + 0.75 * 0.5)
    assert float(mass_inside(torch.ones(1, 2, 2), mask)) == pytest.approx(float(mask.float().mean()))  # uniform = chance


def test_dilate_by_hand():
    from compressor.studies.attention import dilate

    m = torch.zeros(1, 5, 5, dtype=torch.bool)
    m[0, 2, 2] = True
    assert int(dilate(m, 1).sum()) == 9 and int(dilate(m, 2).sum()) == 25 and torch.equal(dilate(m, 0), m)
    m[0] = False
    m[0, 0, 0] = True
    assert int(dilate(m, 1).sum()) == 4  # clipped at the border


def test_shapes_are_deterministic_and_masks_match_the_pixels():
    x1, y1, m1 = render(100, 24, seed=3)
    x2, y2, m2 = render(100, 24, seed=3)
    x3, _, _ = render(100, 24, seed=4)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(m1, m2)
    assert not torch.equal(x1, x3)
    assert x1.shape == (100, 3, 24, 24) and x1.dtype == torch.uint8 and m1.shape == (100, 24, 24)
    assert torch.bincount(y1, minlength=len(CLASSES)).tolist() == [20] * 5
    area = m1.float().flatten(1).mean(1)
    assert 0.02 < float(area.min()) and float(area.max()) < 0.45
    # Rings have a hole: their mask covers less of the bounding disc than circles do at the same radius.
    ring, circle = area[y1 == CLASSES.index("ring")].mean(), area[y1 == CLASSES.index("circle")].mean()
    assert ring < circle
    # An object is one colour (plus texture): its pixels vary less than the whole image does.
    inside_std = torch.stack([x1[i].float()[:, m1[i]].std(1).mean() for i in range(20)]).mean()
    whole_std = x1[:20].float().flatten(2).std(2).mean()
    assert inside_std < whole_std


def test_shapes_through_open_dataset_and_subset_keep_masks():
    from compressor.data.open import open_dataset

    data = open_dataset("shapes", image_size=16)
    assert data.name == "shapes" and data.class_names == list(CLASSES) and data.input_size == (3, 16, 16)
    sub = data.subset(train=50, test=30, seed=0)
    assert len(sub.train_y) == 50 and sub.test_masks.shape == (30, 16, 16)
    idx = [i for i in range(len(data.test_y)) if torch.equal(data.test_x[i], sub.test_x[0])][0]
    assert torch.equal(sub.test_masks[0], data.test_masks[idx])


class _Probe(nn.Module):
    """A 1×1 conv that sums the channels (the only stage), then a linear classifier."""

    def __init__(self, sign: float = 1.0):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1, bias=False)
        nn.init.constant_(self.conv.weight, sign / 3)
        self.fc = nn.Linear(1, 2)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def test_analyze_identical_models_and_object_only_inputs():
    masks = torch.zeros(6, 8, 8, dtype=torch.bool)
    for i in range(6):
        masks[i, i:i + 2, 1:1 + i + 1] = True
    x = (masks.unsqueeze(1).expand(-1, 3, -1, -1) * 255).to(torch.uint8)  # bright object, black background
    y = torch.zeros(6, dtype=torch.long)
    t = Net("t", _Probe(), [0.0] * 3, [1.0] * 3)
    s = Net("s", _Probe(-2.0), [0.0] * 3, [1.0] * 3)  # |A|^p ignores the sign and the scale
    res = analyze(t, s, x, y, masks=masks, batch_size=4)
    (st,) = res.stages
    assert st.teacher_module == "conv" and st.resolution == (8, 8)
    assert st.at_distance == pytest.approx(0.0, abs=1e-12) and st.correlation == pytest.approx(1.0, abs=1e-6)
    assert st.teacher_localization == pytest.approx(1.0) and st.student_localization == pytest.approx(1.0)
    assert st.chance == pytest.approx(float(masks.float().flatten(1).mean(1).mean()))
    # A uniform input spreads the attention evenly: localisation = the mask's share of the image.
    flat = torch.full_like(x, 200)
    res = analyze(t, None, flat, y, masks=masks)
    assert res.stages[0].teacher_localization == pytest.approx(res.stages[0].chance, abs=1e-6)
    assert res.student is None and res.stages[0].correlation is None
    # A prior equal to each test mask's own footprint would be perfect; an empty corner scores nothing.
    corner = torch.zeros(8, 8)
    corner[7, 7] = 1.0
    res = analyze(t, None, x, y, masks=masks, prior=corner)
    assert res.stages[0].position_prior == pytest.approx(float(masks[:, 7, 7].float().mean()))
    res = analyze(t, None, x[:1], y[:1], masks=masks[:1], prior=masks[0].float())
    assert res.stages[0].position_prior == pytest.approx(1.0)
    # The gradient mechanism has one map, at input resolution.
    res = analyze(t, s, x, y, attention="gradient", p=1)
    assert [g.label for g in res.stages] == ["input gradient"] and res.stages[0].resolution == (8, 8)


def test_pick_images_spreads_over_the_test_set():
    assert pick_images(100, 5) == [0, 25, 50, 74, 99]
    assert pick_images(3, 10) == [0, 1, 2]


@pytest.fixture(scope="module")
def shape_checkpoints(tmp_path_factory, tiny_teacher):
    """Two untrained WRN-10-1 checkpoints for 16×16 shapes (what is measured does not need training)."""
    d = tmp_path_factory.mktemp("ckpt")
    return [tiny_teacher("wrn-10-1", len(CLASSES), 16, path=d / name, mean=0.5, std=0.25, class_names=CLASSES, seed=seed)
            for seed, name in ((0, "t.pt"), (1, "s.pt"))]


@pytest.mark.slow
def test_attention_cli_writes_png_and_numbers(shape_checkpoints, tmp_path):
    t, s = shape_checkpoints
    png = tmp_path / "maps.png"
    r = run_atc("attention", "--teacher", str(t), "--student-checkpoint", str(s), "--data", "shapes", "--preset", "demo", "--images", "3",
                "--test-images", "60", "--localization", "--out", str(png), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [st["teacher_module"] for st in res["stages"]] == ["group0", "group1", "group2"]
    assert [tuple(st["resolution"]) for st in res["stages"]] == [(16, 16), (8, 8), (4, 4)]
    data = load_shapes(16)
    sel = pick_images(len(data.test_y), 60)
    chance = float(data.test_masks[sel].float().flatten(1).mean(1).mean())
    for st in res["stages"]:
        assert st["chance"] == pytest.approx(chance, abs=1e-5)
        assert chance < st["position_prior"] < 1  # objects cluster near the centre: knowing that beats a uniform map
        assert 0 <= st["teacher_localization"] <= 1 and 0 <= st["student_localization"] <= 1
        assert -1 <= st["correlation"] <= 1 and st["at_distance"] > 0


def test_attention_refusals(shape_checkpoints, tmp_path):
    from typer.testing import CliRunner

    from cli.app import app
    from compressor.config import load_config
    from compressor.errors import DataError, OutputError
    from compressor.studies.attention import AttentionOptions, attention_report

    with pytest.raises(DataError, match="--data shapes"):
        attention_report(shape_checkpoints[0], "digits", tmp_path / "d.png", load_config("demo"),
                         view=AttentionOptions(localization=True))
    (tmp_path / "m.png").write_bytes(b"x")
    r = CliRunner().invoke(app, ["attention", "--teacher", str(shape_checkpoints[0]), "--data", "shapes", "--out", str(tmp_path / "m.png")])
    assert isinstance(r.exception, OutputError) and "--overwrite" in str(r.exception)


def test_curves_png(tmp_path):
    from compressor.report.plots import curve, plot_curves

    hist = [{"epoch": 1, "train_loss": 2.0, "test_loss": 1.9, "train_top1": 30.0, "test_top1": 31.0},
            {"epoch": 2, "train_loss": 1.5, "test_loss": 1.6, "train_top1": 45.0}]
    assert curve(hist, "test_top1") == ([1.0], [31.0])
    assert curve(hist, "train_loss") == ([1.0, 2.0], [2.0, 1.5])
    plot_curves(tmp_path / "curves.png", ("wrn-16-2", hist), [("wrn-16-1 (at)", hist[:1]), ("empty", [])])
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
