"""experiments/real_data.py on IDX files the tests write themselves (CI installs no data):
the layouts train.py and eval.py read, captions that name each image's class, the noisier
tables, both sources together, and a missing source named with its install command."""
import csv
import gzip
import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import run_script
from experiments.real_data import SOURCES, read_idx
from faults import DataError


def write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        size.to_bytes(4, "big") for size in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_source(folder, train_per_class=8, test_per_class=3, seed=0):
    """IDX files of a 10-class source: image pixels encode the label (all = 20 * label + 5)."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for split, count in (("train", train_per_class), ("t10k", test_per_class)):
        labels = rng.permutation(np.repeat(np.arange(10), count))
        images = np.repeat(labels[:, None, None] * 20 + 5, 28 * 28).reshape(-1, 28, 28)
        write_idx(os.path.join(folder, f"{split}-images-idx3-ubyte.gz"), images)
        write_idx(os.path.join(folder, f"{split}-labels-idx1-ubyte.gz"), labels)
    return str(folder)


def export(tmp_path, *flags):
    sources = ["--fashion-mnist", write_source(tmp_path / "fashion", seed=1),
               "--mnist", write_source(tmp_path / "digits", seed=2)]
    return run_script("experiments/real_data.py", "export", str(tmp_path / "real"), *sources,
                      "--per-class", "5", "--probe-per-class", "2", *flags)


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_the_export_writes_what_train_py_and_eval_py_read(tmp_path):
    result = export(tmp_path)
    assert result.returncode == 0, result.stderr
    for name in ("fashion-mnist", "mnist"):
        folder = tmp_path / "real" / name
        classnames = (folder / "classnames.txt").read_text().splitlines()
        assert classnames == list(SOURCES[name]["classnames"])
        rows = read_rows(folder / "captions.csv")
        assert len(rows) == 50 and len({row["filepath"] for row in rows}) == 50
        templates = SOURCES[name]["templates"]
        for row in rows:  # the caption names the class the image's pixels encode
            label = (np.asarray(Image.open(folder / row["filepath"]))[0, 0] - 5) // 20
            assert row["title"] in {t.format(classnames[label]) for t in templates}
        assert sorted(os.listdir(folder / "test"), key=int) == [str(i) for i in range(10)]
        assert all(len(os.listdir(folder / "test" / str(i))) == 3 for i in range(10))
        assert all(len(os.listdir(folder / "probe_train" / str(i))) == 2 for i in range(10))
        for level in (0.25, 0.5):  # that fraction of rows has another row's caption
            noisy = read_rows(folder / f"captions_unrelated_{level:g}.csv")
            changed = sum(a["title"] != b["title"] for a, b in zip(rows, noisy))
            assert [r["filepath"] for r in noisy] == [r["filepath"] for r in rows]
            assert changed <= round(level * 50) and changed >= round(level * 50) * 0.7


def test_both_sources_together_are_twenty_classes_linked_to_theirs(tmp_path):
    assert export(tmp_path).returncode == 0
    both = tmp_path / "real" / "both"
    rows = read_rows(both / "captions.csv")
    assert len(rows) == 100 and all(os.path.isfile(both / row["filepath"]) for row in rows)
    assert len((both / "classnames.txt").read_text().splitlines()) == 20
    sources = json.loads((both / "sources.json").read_text())
    assert sources == {"fashion-mnist": [str(i) for i in range(10)],
                       "mnist": [str(i) for i in range(10, 20)]}
    assert os.listdir(both / "test" / "13") == os.listdir(tmp_path / "real" / "mnist" / "test"
                                                          / "3")


def test_a_missing_source_names_its_install_command(tmp_path):
    result = run_script("experiments/real_data.py", "export", str(tmp_path / "real"),
                        "--sources", "fashion-mnist", "--fashion-mnist", str(tmp_path / "none"))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "apt-get install -y dataset-fashion-mnist" in result.stderr


def test_a_file_that_is_not_idx_is_refused(tmp_path):
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"not an idx file at all"))
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(str(tmp_path / "bad.gz"))
    write_idx(str(tmp_path / "short.gz"), np.zeros((4, 28, 28)))
    with open(tmp_path / "short.gz", "rb") as f:
        data = gzip.decompress(f.read())
    (tmp_path / "cut.gz").write_bytes(gzip.compress(data[:-10]))
    with pytest.raises(DataError, match="where its header says"):
        read_idx(str(tmp_path / "cut.gz"))
