"""Training data from caption tables and tar shards: exactly the pairs written, every
sample once per epoch across ranks and loader workers, bad samples skipped and counted."""
import os

import pytest

from conftest import jpeg_bytes, write_tar_shards
from data import (SKIP_REASONS, CaptionTableDataset, DataError, ResumableSampler, TarShardStream,
                  Tokenizer, EvalTransform, expand_shards, make_loader, tar_samples)
from flags import build_parser
from train import build_train_loader

TOKENIZER = Tokenizer(context_length=8)
TRANSFORM = EvalTransform(16)


def captions_of(batches):
    return [TOKENIZER.decode(tokens) for _, batch_tokens, _ in batches for tokens in batch_tokens]


def skip_counts(batches):
    return dict(zip(SKIP_REASONS, sum(skipped.sum(0) for _, _, skipped in batches).tolist()))


def test_brace_expansion_keeps_zero_padding_and_lists():
    assert expand_shards("/d/{00008..00011}.tar") == [f"/d/{i:05d}.tar" for i in range(8, 12)]
    assert expand_shards("/d/{a,b}-{0..1}.tar") == ["/d/a-0.tar", "/d/a-1.tar",
                                                    "/d/b-0.tar", "/d/b-1.tar"]
    assert expand_shards("/x.tar::/y/{1..2}.tar") == ["/x.tar", "/y/1.tar", "/y/2.tar"]


def test_tar_samples_group_files_by_key(tmp_path):
    [shard] = write_tar_shards(str(tmp_path), 1, 3)
    samples = list(tar_samples(shard))
    assert [key for key, _ in samples] == ["000000000", "000000001", "000000002"]
    assert samples[1][1]["txt"] == b"caption 1" and set(samples[1][1]) == {"jpg", "txt", "json"}
    assert samples[2][1]["jpg"] == jpeg_bytes((14, 26, 90))


@pytest.mark.parametrize("world_size,workers", [(1, 0), (2, 2)])
def test_tar_stream_reads_every_sample_once_per_epoch_across_ranks_and_workers(tmp_path,
                                                                               world_size, workers):
    shards = write_tar_shards(str(tmp_path), num_shards=5, per_shard=4)
    seen = []
    for rank in range(world_size):
        stream = TarShardStream(shards, TRANSFORM, TOKENIZER, rank, world_size, seed=3,
                                shuffle_buffer=3, epochs=1)
        seen += captions_of(make_loader(stream, batch_size=1, workers=workers))
    assert sorted(seen) == sorted(f"caption {k}" for k in range(20))


def test_tar_stream_skips_and_counts_bad_images_captions_and_shards(tmp_path):
    shards = write_tar_shards(str(tmp_path), 2, 4, truncated={1}, empty_caption={6})
    (tmp_path / "broken.tar").write_bytes(b"this is not a tar file" * 40)
    stream = TarShardStream(shards + [str(tmp_path / "broken.tar")], TRANSFORM, TOKENIZER, seed=2,
                            shuffle_buffer=1, epochs=1)
    batches = list(make_loader(stream, batch_size=2))
    assert sorted(captions_of(batches)) == sorted(f"caption {k}" for k in (0, 2, 3, 4, 5, 7))
    assert skip_counts(batches) == {"bad_image": 1, "bad_caption": 1, "bad_shard": 1}


def test_tar_stream_resume_skips_the_shards_already_read(tmp_path):
    shards = write_tar_shards(str(tmp_path), 4, 2)
    whole = TarShardStream(shards, TRANSFORM, TOKENIZER, seed=1, shuffle_buffer=1, epochs=1)
    resumed = TarShardStream(shards, TRANSFORM, TOKENIZER, seed=1, shuffle_buffer=1, epochs=1,
                             start_fraction=0.5)
    whole_captions = captions_of(make_loader(whole, batch_size=1))
    assert captions_of(make_loader(resumed, batch_size=1)) == whole_captions[4:]


def write_caption_table(folder, count, corrupt=(), empty=()):
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    rows = ["filepath,title"]
    for k in range(count):
        path = os.path.join(folder, "images", f"{k}.jpg")
        with open(path, "wb") as f:
            f.write(b"corrupt" if k in corrupt else jpeg_bytes((k, 0, 0)))
        rows.append(f"images/{k}.jpg,{'' if k in empty else f'caption {k}'}")
    with open(os.path.join(folder, "train.csv"), "w") as f:
        f.write("\n".join(rows) + "\n")
    return os.path.join(folder, "train.csv")


def test_caption_table_epoch_covers_every_row_once_across_ranks_and_workers(tmp_path):
    table = write_caption_table(str(tmp_path), 12)
    dataset = CaptionTableDataset(table, TRANSFORM, TOKENIZER)
    seen = []
    for rank in range(2):
        sampler = ResumableSampler(len(dataset), batch_size=3, rank=rank, world_size=2, seed=4)
        loader = iter(make_loader(dataset, 3, sampler, workers=2))
        seen += captions_of([next(loader) for _ in range(2)])  # 2 steps x 3 x 2 ranks = one epoch
    assert sorted(seen) == sorted(f"caption {k}" for k in range(12))


def test_caption_table_passes_over_corrupt_images_and_empty_captions(tmp_path):
    dataset = CaptionTableDataset(write_caption_table(str(tmp_path), 5, corrupt={1}, empty={2}),
                                  TRANSFORM, TOKENIZER)
    image, tokens, skipped = dataset[1]  # rows 1 and 2 are bad: row 3 stands in
    assert TOKENIZER.decode(tokens) == "caption 3"
    assert dict(zip(SKIP_REASONS, skipped.tolist())) == {"bad_image": 1, "bad_caption": 1,
                                                         "bad_shard": 0}


def loader_args(train_data, *flags):
    """train.py's own flags, so that the loader sees every field a real run gives it."""
    return build_parser().parse_args(["--train-data", train_data, "--batch-size", "2",
                                      "--workers", "0", "--shuffle-buffer", "4", *flags])


def test_train_loader_names_missing_shards_and_needs_a_sample_count(tmp_path):
    write_tar_shards(str(tmp_path), 2, 2)
    three_shards = str(tmp_path / "{00000..00002}.tar")
    two_shards = str(tmp_path / "{00000..00001}.tar")
    with pytest.raises(DataError, match="1 of 3 shards missing"):
        build_train_loader(loader_args(three_shards, "--train-num-samples", "8"), TOKENIZER, 16)
    with pytest.raises(DataError, match="--train-num-samples"):
        build_train_loader(loader_args(two_shards), TOKENIZER, 16)
    loader = build_train_loader(loader_args(two_shards, "--train-num-samples", "8"), TOKENIZER, 16)
    images, tokens, skipped = next(iter(loader))
    assert images.shape == (2, 3, 16, 16) and tokens.shape == (2, 8) and skipped.shape == (2, 3)
