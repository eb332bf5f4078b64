"""Charts drawn with pillow, so that the project needs no plotting library: panels of
line curves (training runs) and grouped bars with error bars (final metrics), and a
training run's curves.png from its log.jsonl.

    line_panels("curves.png", [Panel("CLIP loss", "step", {"clip": ([0, 10], [4.8, 3.1])})])
    bar_chart("bars.png", "final metrics", ["shape", "color"], {"clip": [0.2, 1.0]}, errors)
    training_curves("out")        # out/curves.png from out/log.jsonl
"""
import json
import math
import os
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

from faults import DataError, writing

COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
          (140, 86, 75), (227, 119, 194), (127, 127, 127))
BACKGROUND, INK, GRID = (255, 255, 255), (30, 30, 30), (225, 225, 225)
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 62, 16, 30, 44


def font(size=13):
    """Pillow's bundled scalable font (Pillow >= 10.1), or its bitmap font before that."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


@dataclass
class Panel:
    title: str
    x_label: str
    series: dict = field(default_factory=dict)  # name -> (xs, ys)
    y_label: str = ""


def nice_ticks(low, high, count=5):
    """About `count` round tick values covering [low, high]."""
    if not high > low:  # one value: a range around it
        pad = abs(low) / 10 or 1.0
        low, high = low - pad, high + pad
    raw_step = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw_step))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw_step)
    first = math.floor(low / step) * step
    return [first + i * step for i in range(int(math.ceil((high - first) / step)) + 1)]


def tick_text(value, step):
    """The tick's value with as many decimals as the spacing between ticks needs."""
    if abs(value) >= 1e4:
        return f"{value:.0e}"
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    if round(step * 10 ** decimals, 6) % 1:  # a step of 2.5 x 10^k needs one more
        decimals += 1
    return f"{value:.{decimals}f}"


class Axes:
    """Maps data coordinates into a pixel box and draws the frame, grid and tick labels."""

    def __init__(self, draw, box, x_range, y_range):
        self.draw, self.box = draw, box
        self.x_ticks, self.y_ticks = nice_ticks(*x_range), nice_ticks(*y_range)
        self.x_low, self.x_high = self.x_ticks[0], self.x_ticks[-1]
        self.y_low, self.y_high = self.y_ticks[0], self.y_ticks[-1]

    def point(self, x, y):
        left, top, right, bottom = self.box
        px = left + (x - self.x_low) / (self.x_high - self.x_low) * (right - left)
        py = bottom - (y - self.y_low) / (self.y_high - self.y_low) * (bottom - top)
        return px, py

    def draw_frame(self, x_labels=None):
        left, top, right, bottom = self.box
        small = font(11)
        for y in self.y_ticks:
            _, py = self.point(self.x_low, y)
            self.draw.line([(left, py), (right, py)], fill=GRID)
            y_step = self.y_ticks[1] - self.y_ticks[0]
            self.draw.text((left - 6, py), tick_text(y, y_step), fill=INK, font=small, anchor="rm")
        if x_labels is None:
            for x in self.x_ticks:
                px, _ = self.point(x, self.y_low)
                x_step = self.x_ticks[1] - self.x_ticks[0]
                self.draw.text((px, bottom + 5), tick_text(x, x_step), fill=INK, font=small,
                               anchor="mt")
        self.draw.rectangle(self.box, outline=INK)


def draw_legend(draw, entries, right, top):
    """entries: (name, color) pairs, listed top down at the panel's top right."""
    small = font(11)
    y = top + 6
    for name, color in entries:
        width = draw.textlength(name, font=small)
        draw.line([(right - width - 34, y + 6), (right - width - 14, y + 6)], fill=color, width=3)
        draw.text((right - width - 8, y), name, fill=INK, font=small)
        y += 16


def draw_panel(draw, origin, size, panel, names):
    x0, y0 = origin
    width, height = size
    box = (x0 + MARGIN_LEFT, y0 + MARGIN_TOP,
           x0 + width - MARGIN_RIGHT, y0 + height - MARGIN_BOTTOM)
    points = [(x, y) for xs, ys in panel.series.values() for x, y in zip(xs, ys)
              if math.isfinite(y)]
    draw.text((x0 + width / 2, y0 + 8), panel.title, fill=INK, font=font(14), anchor="mt")
    if not points:
        center = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
        draw.text(center, "no data", fill=INK, font=font(12), anchor="mm")
        return
    xs, ys = zip(*points)
    axes = Axes(draw, box, (min(xs), max(xs)), (min(ys), max(ys)))
    axes.draw_frame()
    for name, (series_xs, series_ys) in panel.series.items():
        color = COLORS[names.index(name) % len(COLORS)]
        line = [axes.point(x, y) for x, y in zip(series_xs, series_ys) if math.isfinite(y)]
        if len(line) > 1:
            draw.line(line, fill=color, width=2, joint="curve")
        for px, py in line if len(line) < 12 else line[-1:]:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
    draw.text(((box[0] + box[2]) / 2, y0 + height - 6), panel.x_label, fill=INK, font=font(12),
              anchor="mb")
    if panel.y_label:
        draw.text((x0 + 4, box[1] - 14), panel.y_label, fill=INK, font=font(11))
    entries = [(name, COLORS[names.index(name) % len(COLORS)]) for name in panel.series]
    draw_legend(draw, entries, box[2], box[1])


def line_panels(path, panels, columns=2, panel_size=(440, 300), series_order=()):
    """Write a grid of line-chart panels to `path` (PNG). A series keeps its color
    across panels; the names in `series_order` take the first colors in that order, so a
    series keeps its color across figures too."""
    rows = math.ceil(len(panels) / columns)
    width, height = panel_size
    image = Image.new("RGB", (width * min(columns, len(panels)), height * rows), BACKGROUND)
    draw = ImageDraw.Draw(image)
    drawn = (name for panel in panels for name in panel.series)
    names = list(dict.fromkeys([*series_order, *drawn]))
    for index, panel in enumerate(panels):
        origin = ((index % columns) * width, (index // columns) * height)
        draw_panel(draw, origin, panel_size, panel, names)
    image.save(path)


def bar_chart(path, title, groups, values, errors=None, y_label="", size=(880, 340)):
    """Grouped bars: one group per entry of `groups` (metric names), one bar per series
    in `values` ({series: [value per group]}), with +-`errors` whiskers if given."""
    errors = errors or {}
    width, height = size
    image = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((width / 2, 8), title, fill=INK, font=font(14), anchor="mt")
    box = (MARGIN_LEFT, MARGIN_TOP, width - MARGIN_RIGHT - 110, height - MARGIN_BOTTOM)
    tops = [v + errors.get(name, [0] * len(groups))[i]
            for name, vs in values.items() for i, v in enumerate(vs) if math.isfinite(v)]
    axes = Axes(draw, box, (0, len(groups)), (min(0.0, *tops), max(tops, default=1.0)))
    axes.draw_frame(x_labels=groups)
    names = list(values)
    bar_width = (box[2] - box[0]) / len(groups) * 0.8 / len(names)
    for group_index, group in enumerate(groups):
        group_left = box[0] + (group_index + 0.1) * (box[2] - box[0]) / len(groups)
        for series_index, name in enumerate(names):
            value = values[name][group_index]
            if not math.isfinite(value):
                continue
            left = group_left + series_index * bar_width
            _, y_value = axes.point(0, value)
            _, y_zero = axes.point(0, 0)
            color = COLORS[series_index % len(COLORS)]
            draw.rectangle([left, min(y_value, y_zero), left + bar_width - 2, max(y_value, y_zero)],
                           fill=color)
            error = errors.get(name, [0] * len(groups))[group_index]
            if error:
                center = left + bar_width / 2 - 1
                _, y_up = axes.point(0, value + error)
                _, y_down = axes.point(0, value - error)
                draw.line([(center, y_up), (center, y_down)], fill=INK, width=1)
                draw.line([(center - 3, y_up), (center + 3, y_up)], fill=INK)
                draw.line([(center - 3, y_down), (center + 3, y_down)], fill=INK)
        label_x = group_left + len(names) * bar_width / 2
        draw.text((label_x, box[3] + 5), group, fill=INK, font=font(11), anchor="mt")
    if y_label:
        draw.text((4, box[1] - 14), y_label, fill=INK, font=font(11))
    small = font(11)
    for index, name in enumerate(names):
        y = box[1] + 6 + 18 * index
        draw.rectangle([box[2] + 14, y, box[2] + 26, y + 12], fill=COLORS[index % len(COLORS)])
        draw.text((box[2] + 32, y), name, fill=INK, font=small)
    image.save(path)


# ----------------------------------------------------------------------------- a run's curves

CURVES = (  # (panel title, log keys): what curves.png shows, where the log has it
    ("loss", ("loss", "clip/loss", "nclip/loss")),
    ("learning rate", ("lr",)),
    ("logit scale", ("logit_scale",)),
    ("nCLIP information (nats)", ("nclip/information",)),
    ("nCLIP same prototype", ("nclip/same_prototype",)),
    ("nCLIP prototype perplexity", ("nclip/image_perplexity", "nclip/text_perplexity")),
    ("zero-shot top-1 (val)", ("zeroshot/shape/top1", "zeroshot/color/top1")),
)


def training_curves(out_dir):
    """OUT_DIR/curves.png from OUT_DIR/log.jsonl (train.py's): loss, learning rate, logit
    scale, the nCLIP collapse monitors and the --val-every zero-shot curve, where logged.
    -> the picture's path"""
    log_path = os.path.join(out_dir, "log.jsonl")
    if not os.path.isfile(log_path):
        raise DataError(f"--plot {out_dir}: no log.jsonl there")
    with open(log_path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    panels = []
    for title, keys in CURVES:
        series = {}
        for key in keys:
            points = [(line["step"], line[key]) for line in lines if key in line]
            if points:
                series[key] = tuple(zip(*points))
        if series:
            panels.append(Panel(title, "step", series))
    path = os.path.join(out_dir, "curves.png")
    with writing(path):
        line_panels(path, panels, columns=3, panel_size=(400, 280))
    return path
