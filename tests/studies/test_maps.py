"""maps.png (issue 25): maps drawn cell by cell in a perceptually uniform colormap, one colour bar,
the predicted classes, an overlay option. The tests read the matplotlib figure, not pixels."""

import pytest
import torch

from compressor.models.registry import create_model
from compressor.studies.attention import MAP_CMAP, Net, analyze, maps_figure


@pytest.fixture(scope="module")
def tiny_nets():
    torch.manual_seed(0)
    t = Net("wrn-16-1", create_model("wrn-16-1", num_classes=3).eval(), [0.5] * 3, [0.25] * 3)
    s = Net("wrn-10-1", create_model("wrn-10-1", num_classes=3).eval(), [0.5] * 3, [0.25] * 3)
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    y = torch.tensor([0, 1, 2, 0])
    return t, s, x, y, analyze(t, s, x, y)


@pytest.mark.parametrize("overlay", [False, True])
def test_maps_are_cells_in_a_uniform_colormap_with_a_colour_bar_and_predictions(tiny_nets, overlay):
    t, s, x, y, result = tiny_nets
    fig = maps_figure(t, s, x, y, result, ["cat", "dog", "eel"], overlay=overlay)
    grid = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 1 and "maximum" in bars[0].get_ylabel()
    ncol = 1 + 2 * len(result.stages)
    maps = [im for i, ax in enumerate(grid) if i % ncol for im in ax.get_images() if im.get_cmap().name == MAP_CMAP]
    assert MAP_CMAP in ("viridis", "inferno", "magma", "cividis", "plasma")
    assert len(maps) == len(y) * 2 * len(result.stages)  # teacher and student map per stage and image
    assert all(im.get_interpolation() == "nearest" for im in maps)
    assert all(im.get_array().max() == pytest.approx(1.0) for im in maps)  # each map scaled to its own maximum
    greys = [im for i, ax in enumerate(grid) if i % ncol for im in ax.get_images() if im.get_cmap().name == "gray"]
    assert (len(greys) > 0) == overlay
    with torch.no_grad():
        pred = t.model(t.prepare(x, torch.device("cpu"))).argmax(1)
    label = grid[0].get_ylabel()
    assert label.startswith("true: cat\nteacher: " + ["cat", "dog", "eel"][int(pred[0])]) and "\nstudent: " in label
    assert all(grid[r * ncol].get_ylabel().startswith("true: ") for r in range(len(y)))
