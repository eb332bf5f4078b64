"""The built-in data: a procedurally drawn world of one or two coloured shapes on
cluttered backgrounds, captioned with varied templates and synonyms, with configurable
web-style noise (loose and unrelated captions). Sample i of a split is a pure function of
(seed, split, i), so every process and worker draws the same data. How a model is scored
on it is eval.py's (`synthetic_evaluation`, `python eval.py synthetic --checkpoint CKPT`).

    python synthetic.py export demo               # as image folders and a caption CSV
"""
import csv
import math
import os
import random
import sys
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from data import EvalTransform, no_skips, stream_seed
from faults import OneLineErrorParser, fail, positive_int

SHAPES = {
    "circle": ("circle", "disc", "round dot"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "wedge"),
    "star": ("star", "five-pointed star"),
    "cross": ("cross", "plus sign"),
    "ring": ("ring", "hollow circle", "donut"),
}
COLORS = {
    "red": ((215, 35, 35), ("red", "crimson", "scarlet")),
    "green": ((40, 165, 55), ("green", "emerald")),
    "blue": ((35, 75, 215), ("blue", "cobalt")),
    "yellow": ((235, 205, 30), ("yellow", "golden")),
    "purple": ((135, 55, 185), ("purple", "violet")),
    "orange": ((245, 135, 20), ("orange", "amber")),
    "pink": ((245, 120, 190), ("pink", "rose")),
    "cyan": ((30, 200, 210), ("cyan", "turquoise")),
}
SIZES = {"small": ("small", "tiny", "little"), "large": ("large", "big", "huge")}
RADII = {"small": (0.26, 0.30), "large": (0.33, 0.38)}  # fractions of the image side
TWO_OBJECT_SCALE = 0.7  # objects shrink to fit two side by side
RELATIONS = {  # (dx, dy) of the first object relative to the second
    (-1, 0): ("to the left of", "left of"), (1, 0): ("to the right of", "right of"),
    (0, -1): ("above", "over"), (0, 1): ("below", "under"),
}
ONE_OBJECT_TEMPLATES = (
    "a photo of {a_color_shape}", "{a_size_color_shape}", "there is {a_color_shape} in the picture",
    "{a_color_shape} on a cluttered background", "a photo of {a_size_color_shape}",
    "{a_shape} colored {color}",
)
OBJECT_PHRASES = ("a_color_shape", "a_size_color_shape")
TWO_OBJECT_TEMPLATES = (
    "{first} {relation} {second}", "a photo of {first} {relation} {second}",
    "{first} and {second}", "two shapes: {first} and {second}",
)
LOOSE_TEMPLATES = ("something {color}", "{a_color} thing", "a photo of something {size}",
                   "{a_size_color_shape} and some clutter", "{a_shape}")
SPLIT_IDS = {"train": 0, "val": 1}


def with_article(phrase):
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def held_out_combinations(count):
    """`count` (color, shape) combinations never drawn in training, the same in every run
    (--synthetic-heldout-pairs)."""
    pairs = [(color, shape) for color in COLORS for shape in SHAPES]
    return set(random.Random(1234).sample(pairs, count))


@dataclass
class SceneObject:
    shape: str
    color: str
    size: str
    center: tuple  # (x, y), fractions of the image side
    radius: float  # fraction of the image side
    angle: float   # radians, within +-20 degrees


def draw_scene(rng, two_object_fraction, excluded_pairs, only_pairs=None):
    """One or two random objects for an image, and for two, how the first relates to
    the second (a key of RELATIONS)."""
    def draw_object(x_range, y_range, radius_scale):
        while True:
            shape, color = rng.choice(list(SHAPES)), rng.choice(list(COLORS))
            if only_pairs:
                color, shape = rng.choice(sorted(only_pairs))
            if (color, shape) not in excluded_pairs:
                break
        size = rng.choice(list(SIZES))
        radius = rng.uniform(*RADII[size])
        center = (rng.uniform(*x_range), rng.uniform(*y_range))
        angle = rng.uniform(-0.35, 0.35)
        return SceneObject(shape, color, size, center, radius * radius_scale, angle)

    if rng.random() >= two_object_fraction:
        return [draw_object((0.35, 0.65), (0.35, 0.65), 1.0)], None
    relation = rng.choice(list(RELATIONS))
    near, middle, far = (0.25, 0.32), (0.35, 0.65), (0.68, 0.75)
    first_ranges = [near if d < 0 else far if d > 0 else middle for d in relation]
    second_ranges = [far if d < 0 else near if d > 0 else middle for d in relation]
    first = draw_object(*first_ranges, TWO_OBJECT_SCALE)
    second = draw_object(*second_ranges, TWO_OBJECT_SCALE)
    return [first, second], relation


def shape_polygon(obj, side):
    """Vertices of the object's outline, in pixels, rotated by its angle."""
    cx, cy, r = obj.center[0] * side, obj.center[1] * side, obj.radius * side
    if obj.shape == "triangle":
        points = [(1, a) for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)]
    elif obj.shape == "square":
        points = [(0.85, math.pi / 4 + k * math.pi / 2) for k in range(4)]
    elif obj.shape == "star":
        points = [(1 if k % 2 == 0 else 0.42, k * math.pi / 5) for k in range(10)]
    else:  # cross: a plus of arms 0.3 r wide
        w = 0.3
        corners = [(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1),
                   (-w, -1), (-w, -w), (-1, -w), (-1, w), (-w, w), (-w, 1)]
        points = [(math.hypot(x, y), math.atan2(y, x)) for x, y in corners]
    return [(cx + r * rho * math.cos(theta + obj.angle), cy + r * rho * math.sin(theta + obj.angle))
            for rho, theta in points]


def render_scene(objects, rng, size, supersample=2):
    """Cluttered background, then the objects, drawn at `supersample` x for smooth edges."""
    side = size * supersample
    base = rng.randint(70, 170)
    background = tuple(max(0, min(255, base + rng.randint(-20, 20))) for _ in range(3))
    image = Image.new("RGB", (side, side), background)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(0, 5)):  # muted lines and dots
        muted = tuple((c + rng.randint(0, 255)) // 2 for c in background)
        x, y = rng.uniform(0, side), rng.uniform(0, side)
        if rng.random() < 0.5:
            end = (x + rng.uniform(-side, side) / 3, y + rng.uniform(-side, side) / 3)
            draw.line([(x, y), end], fill=muted, width=supersample)
        else:
            dot = rng.uniform(1, 2) * supersample
            draw.ellipse([x - dot, y - dot, x + dot, y + dot], fill=muted)
    for obj in objects:
        color = COLORS[obj.color][0]
        cx, cy, r = obj.center[0] * side, obj.center[1] * side, obj.radius * side
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        elif obj.shape == "ring":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=color,
                         width=max(2, round(0.35 * r)))
        else:
            draw.polygon(shape_polygon(obj, side), fill=color)
    return image.reduce(supersample)


def pick_name(names, rng, synonym_probability=0.2):
    """The first, plain name, or now and then one of its synonyms."""
    return rng.choice(names[1:]) if rng.random() < synonym_probability else names[0]


def describe(objects, relation, rng, loose=False):
    """A caption of the scene; `loose` describes only part of it (web-style noise)."""
    def words(obj):
        shape = pick_name(SHAPES[obj.shape], rng)
        color = pick_name(COLORS[obj.color][1], rng)
        size = pick_name(SIZES[obj.size], rng)
        return dict(shape=shape, color=color, size=size, a_shape=with_article(shape),
                    a_color=with_article(color),
                    a_color_shape=with_article(f"{color} {shape}"),
                    a_size_shape=with_article(f"{size} {shape}"),
                    a_size_color_shape=with_article(f"{size} {color} {shape}"))

    if loose:
        return rng.choice(LOOSE_TEMPLATES).format(**words(rng.choice(objects)))
    if len(objects) == 1:
        return rng.choice(ONE_OBJECT_TEMPLATES).format(**words(objects[0]))
    first, second = (words(obj)[rng.choice(OBJECT_PHRASES)] for obj in objects)
    return rng.choice(TWO_OBJECT_TEMPLATES).format(
        first=first, second=second, relation=rng.choice(RELATIONS[relation]))


# The random streams of one sample, so that e.g. a caption's draws never shift its scene's.
SCENE, CAPTION, UNRELATED_SCENE, RENDERING, CROP, EXTRA_CAPTION = range(6)
STREAMS, INDICES = 8, 2**40  # radices of the sample seeds (see data.stream_seed)


class SyntheticCaptions(Dataset):
    """Captioned synthetic images: sample `index` of `split` depends only on
    (seed, split, index). Any index is valid; `num_samples` is the nominal length.

    loose_fraction: captions that describe only part of the image.
    unrelated_fraction: captions of another, random image.
    two_object_fraction: images with two objects and a spatial relation; the rest have one.
    num_heldout_pairs: (color, shape) pairs left out of training, for compositional
        zero-shot; `only_heldout` draws val images of those pairs alone.
    """

    def __init__(self, split="train", num_samples=100_000, seed=0, image_size=48,
                 transform=None, tokenizer=None, loose_fraction=0.15, unrelated_fraction=0.05,
                 num_heldout_pairs=4, two_object_fraction=0.3, only_heldout=False):
        assert split in SPLIT_IDS, split
        self.split, self.num_samples, self.seed = split, num_samples, seed
        self.image_size = image_size
        self.transform = transform or EvalTransform(image_size)
        self.tokenizer = tokenizer
        self.loose_fraction, self.unrelated_fraction = loose_fraction, unrelated_fraction
        self.two_object_fraction = two_object_fraction
        self.heldout = held_out_combinations(num_heldout_pairs)
        self.excluded_pairs = self.heldout if split == "train" else set()
        self.only_pairs = self.heldout if only_heldout else None

    def __len__(self):
        return self.num_samples

    def rng(self, index, stream=SCENE):
        digits = (SPLIT_IDS[self.split], len(SPLIT_IDS)), (stream, STREAMS), (index, INDICES)
        return random.Random(stream_seed(self.seed, *digits))

    def scene(self, index):  # -> (objects, relation)
        return draw_scene(self.rng(index), self.two_object_fraction, self.excluded_pairs,
                          self.only_pairs)

    def caption(self, index):
        rng = self.rng(index, CAPTION)
        draw = rng.random()
        if draw < self.unrelated_fraction:
            source = rng.randrange(INDICES)
            objects, relation = draw_scene(self.rng(source, UNRELATED_SCENE),
                                           self.two_object_fraction, self.excluded_pairs)
            return describe(objects, relation, rng)
        loose = draw < self.unrelated_fraction + self.loose_fraction
        return describe(*self.scene(index), rng, loose)

    def exact_captions(self, index, count=3):
        """`count` captions of sample `index`'s scene (at most 3), each drawn from a stream of
        its own and none loose or unrelated: what the scene shows, in different words."""
        streams = (CAPTION, EXTRA_CAPTION, EXTRA_CAPTION + 1)[:count]
        return [describe(*self.scene(index), self.rng(index, stream)) for stream in streams]

    def image(self, index):
        return render_scene(self.scene(index)[0], self.rng(index, RENDERING), self.image_size)

    def __getitem__(self, index):  # -> (image, tokens or caption, skip counts: always none)
        image = self.transform(self.image(index), self.rng(index, CROP))
        caption = self.caption(index)
        tokens = self.tokenizer([caption])[0] if self.tokenizer else caption
        return image, tokens, no_skips()


# ------------------------------------------------------------------ exact captions, labels

def scored_scenes(split, num_samples, seed, image_size, num_heldout_pairs, **options):
    """Scenes with exact captions: retrieval then measures the model, not caption noise."""
    return SyntheticCaptions(split, num_samples, seed, image_size, EvalTransform(image_size),
                             loose_fraction=0.0, unrelated_fraction=0.0,
                             num_heldout_pairs=num_heldout_pairs, **options)


def object_labels(scenes, attribute, names):
    """The class of each single-object scene: the index of its shape or color in `names`."""
    names = list(names)
    first_objects = (scenes.scene(i)[0][0] for i in range(len(scenes)))
    return torch.tensor([names.index(getattr(obj, attribute)) for obj in first_objects])


# ------------------------------------------------------------------------------------ command line

def export(out_dir, num_images=500, seed=0, image_size=48, num_heldout_pairs=4):
    """Write the built-in data in the formats eval.py reads from disk, to try its
    commands without downloading anything: single-object images as ImageNet-style class
    folders by shape (OUT/train, OUT/val), and the val images with several exact
    captions each as a CSV (OUT/captions.csv, open_clip's filepath/title columns)."""
    def single_object_scenes(split):
        return scored_scenes(split, num_images, seed, image_size, num_heldout_pairs,
                             two_object_fraction=0.0)

    def image_path(scenes, index):
        return os.path.join(scenes.split, scenes.scene(index)[0][0].shape, f"{index:05d}.png")

    for split in SPLIT_IDS:
        scenes = single_object_scenes(split)
        for shape in SHAPES:
            os.makedirs(os.path.join(out_dir, split, shape), exist_ok=True)
        for index in range(num_images):
            scenes.image(index).save(os.path.join(out_dir, image_path(scenes, index)))
    scenes = single_object_scenes("val")
    with open(os.path.join(out_dir, "captions.csv"), "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["filepath", "title"])
        for index in range(num_images):
            for caption in scenes.exact_captions(index, 3):
                rows.writerow([image_path(scenes, index), caption])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["eval"]:  # an earlier command, moved where every evaluation is
        fail("synthetic.py", "scoring a checkpoint on the built-in data is eval.py's: "
                             "python eval.py synthetic --checkpoint CKPT")
    parser = OneLineErrorParser(description="Write the built-in data to disk.")
    commands = parser.add_subparsers(dest="command", required=True)
    writer = commands.add_parser("export", help=export.__doc__.split(":")[0])
    writer.add_argument("out_dir", help="folder to write")
    writer.add_argument("--num-images", type=positive_int, default=500, help="images per split")
    writer.add_argument("--seed", type=int, default=0, help="the seed train.py used (--seed)")
    writer.add_argument("--image-size", type=positive_int, default=48, help="image side in pixels")
    args = parser.parse_args(argv)
    export(args.out_dir, args.num_images, args.seed, args.image_size)
    print(f"wrote {args.out_dir}/train, {args.out_dir}/val (class folders by shape) and "
          f"{args.out_dir}/captions.csv")


if __name__ == "__main__":
    main()
