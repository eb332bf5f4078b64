"""The pillow charts: round ticks that cover the data, and images of the promised size."""
from PIL import Image

from plots import COLORS, Panel, bar_chart, line_panels, nice_ticks


def test_ticks_are_round_and_cover_the_range():
    ticks = nice_ticks(0.13, 0.87)
    assert ticks[0] <= 0.13 and ticks[-1] >= 0.87
    assert all(round(t / 0.2, 6).is_integer() for t in ticks)
    assert nice_ticks(3.0, 3.0)[-1] > 3.0  # a flat series still gets a range


def test_line_panels_and_bar_chart_write_images(tmp_path):
    panels = [Panel("loss", "step", {"clip": ([0, 10, 20], [4.8, 3.0, 2.5])}),
              Panel("zero-shot", "step", {"clip": ([10, 20], [0.2, 0.4]),
                                          "nclip": ([10, 20], [0.1, 0.2])}),
              Panel("empty", "step", {})]
    line_panels(tmp_path / "curves.png", panels, columns=2, panel_size=(300, 200))
    with Image.open(tmp_path / "curves.png") as image:
        assert image.size == (600, 400)
        assert len(image.getcolors(1 << 16)) > 3  # something was drawn
    bar_chart(tmp_path / "bars.png", "metrics", ["a", "b"],
              {"clip": [0.5, 1.0], "nclip": [0.2, float("nan")]},
              {"clip": [0.05, 0.0], "nclip": [0.01, 0.0]}, size=(500, 300))
    with Image.open(tmp_path / "bars.png") as image:
        assert image.size == (500, 300)


def test_a_series_keeps_its_color_across_figures_given_the_order(tmp_path):
    order = ("clip", "nclip", "xclip")
    only_xclip = [Panel("nCLIP loss", "step", {"xclip": ([0, 10, 20], [-4.0, -6.0, -7.0])})]
    line_panels(tmp_path / "ordered.png", only_xclip, series_order=order)
    line_panels(tmp_path / "unordered.png", only_xclip)
    with Image.open(tmp_path / "ordered.png") as image:
        drawn = {color for _, color in image.convert("RGB").getcolors(1 << 16)}
    assert COLORS[2] in drawn and COLORS[0] not in drawn
    with Image.open(tmp_path / "unordered.png") as image:
        drawn = {color for _, color in image.convert("RGB").getcolors(1 << 16)}
    assert COLORS[0] in drawn and COLORS[2] not in drawn
