"""train.py as a user runs it: a run can be stopped and resumed exactly, evaluation
during training changes nothing, and each objective learns on the built-in data (the
collapse monitor catches the paper's form of nCLIP collapsing). Bad input: test_faults.py."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from conftest import MINI, ROOT, SMALL_MODEL, run_script, run_train, write_tar_shards
from flags import PAPER_FORM
from synthetic import export

SMALL = SMALL_MODEL + ["--batch-size", "32", "--val-samples", "200"]


def final_weights(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)["model"]


def test_a_stopped_run_resumes_to_the_same_weights(tmp_path):
    flags = SMALL + ["--steps", "30", "--log-every", "1", "--val-samples", "20"]
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    assert run_train(*flags, "--out-dir", straight).returncode == 0

    process = subprocess.Popen([sys.executable, "train.py", *flags, "--out-dir", stopped],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    log = os.path.join(stopped, "log.jsonl")
    while not (os.path.exists(log) and len(open(log).readlines()) >= 5):
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM
    saved_step = torch.load(os.path.join(stopped, "ckpt.pt"), weights_only=True)["step"]
    assert 5 <= saved_step < 30

    resumed = run_train(*flags, "--out-dir", stopped, "--resume", os.path.join(stopped, "ckpt.pt"))
    assert resumed.returncode == 0, resumed.stderr
    expected, actual = final_weights(straight), final_weights(stopped)
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short run per objective, shared by the tests that read its results."""
    def train(loss):
        out_dir = str(tmp_path_factory.mktemp(loss))
        result = run_train(*SMALL, "--loss", loss, "--steps", "150", "--out-dir", out_dir,
                           "--lr", "2e-3")
        assert result.returncode == 0, result.stderr[-2000:]
        with open(os.path.join(out_dir, "final_metrics.json")) as f:
            metrics = json.load(f)
        with open(os.path.join(out_dir, "log.jsonl")) as f:
            log = [json.loads(line) for line in f]
        return metrics, log
    return train


@pytest.mark.parametrize("loss", ["clip", "xclip"])
def test_clip_and_xclip_learn_zero_shot_color_well_above_chance(trained, loss):
    metrics, log = trained(loss)
    assert metrics["zeroshot/color/top1"] > 0.5  # chance: 1/8
    assert log[-1]["clip/loss"] < log[0]["clip/loss"] - 0.5


def test_nclip_keeps_prototype_usage_spread(trained):
    metrics, log = trained("nclip")
    for modality in ("image", "text"):
        assert log[-1][f"nclip/{modality}_perplexity"] > 10  # a one-hot collapse drives it to 1


def last_training_line(log):
    return [line for line in log if "loss" in line][-1]


def test_nclip_prototypes_carry_information_about_the_sample(trained):
    metrics, log = trained("nclip")
    last = last_training_line(log)
    assert last["nclip/information"] > 0.5  # nats; 0 when every sample gets one distribution
    assert last["nclip/same_prototype"] > 0.2  # chance: 1/16
    assert metrics["zeroshot/color/top1"] > 0.3  # chance: 1/8


def test_the_collapse_monitor_catches_the_papers_form_collapsing(tmp_path):
    result = run_train(*SMALL, "--loss", "nclip", "--steps", "100", *PAPER_FORM,
                       "--val-samples", "20", "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    with open(tmp_path / "log.jsonl") as f:
        last = last_training_line([json.loads(line) for line in f])
    assert last["nclip/information"] < 0.05
    assert last["nclip/image_perplexity"] > 5  # the usage alone would not have shown it


def test_evaluation_during_training_is_logged_and_changes_nothing(tmp_path):
    flags = SMALL + ["--steps", "10", "--val-samples", "20", "--log-every", "5"]
    plain, evaluated = str(tmp_path / "plain"), str(tmp_path / "evaluated")
    assert run_train(*flags, "--out-dir", plain).returncode == 0
    assert run_train(*flags, "--val-every", "5", "--out-dir", evaluated).returncode == 0
    with open(os.path.join(evaluated, "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    assert [line["step"] for line in log if "zeroshot/shape/top1" in line] == [5, 10]
    expected, actual = final_weights(plain), final_weights(evaluated)
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def test_accumulation_on_the_command_line_trains_like_the_whole_batch(tmp_path):
    flags = SMALL_MODEL + ["--steps", "3", "--val-samples", "20", "--loss", "xclip"]
    whole, accumulated = str(tmp_path / "whole"), str(tmp_path / "accumulated")
    assert run_train(*flags, "--batch-size", "32", "--out-dir", whole).returncode == 0
    result = run_train(*flags, "--batch-size", "8", "--accum-freq", "4", "--out-dir", accumulated)
    assert result.returncode == 0, result.stderr[-2000:]
    expected, actual = final_weights(whole), final_weights(accumulated)
    # float32 sums in another order: equal to rounding, not bit for bit
    assert all(torch.allclose(expected[k], actual[k], atol=1e-5) for k in expected)


def test_evaluation_during_training_on_an_image_folder(tmp_path):
    export(str(tmp_path / "demo"), num_images=24)
    result = run_train(*SMALL, "--steps", "4", "--val-every", "2", "--val-samples", "20",
                       "--zeroshot-data", str(tmp_path / "demo" / "val"),
                       "--out-dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-2000:]
    with open(tmp_path / "out" / "log.jsonl") as f:
        log = [json.loads(line) for line in f]
    assert [line["step"] for line in log if "zeroshot/demo/top1" in line] == [2, 4]


def test_a_run_draws_its_curves_and_plot_redraws_them(tmp_path):
    result = run_train(*MINI, "--steps", "4", "--log-every", "1", "--val-every", "2",
                       "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    first = Image.open(tmp_path / "curves.png")
    assert first.width > 800 and first.height > 250
    os.remove(tmp_path / "curves.png")
    assert run_train("--plot", str(tmp_path)).returncode == 0
    assert Image.open(tmp_path / "curves.png").size == first.size


def test_plot_without_a_log_is_one_line(tmp_path):
    result = run_train("--plot", str(tmp_path))
    assert result.returncode == 2 and "no log.jsonl there" in result.stderr


@pytest.mark.parametrize("source", ["table", "shards"])
def test_val_data_logs_what_eval_py_retrieval_scores_on_the_checkpoint(tmp_path, source):
    """--val-data at --val-every: the loss and eval.py retrieval's keys and values; with
    --keep-every the step checkpoints stay, and --no-save-optimizer's cannot resume."""
    if source == "table":
        export(str(tmp_path / "held_out"), num_images=24)
        pairs = str(tmp_path / "held_out" / "captions.csv")
    else:  # 32 samples, one with a truncated image and one with an empty caption
        os.makedirs(tmp_path / "held_out")
        write_tar_shards(str(tmp_path / "held_out"), 2, 16, truncated={3}, empty_caption={20})
        pairs = str(tmp_path / "held_out" / "{00000..00001}.tar")
    out_dir = tmp_path / "run"
    result = run_train(*MINI, "--steps", "6", "--val-data", pairs, "--val-every", "3",
                       "--keep-every", "3", "--no-save-optimizer", "--out-dir", str(out_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    name = "captions" if source == "table" else "held_out"
    with open(out_dir / "log.jsonl") as f:
        evaluations = [json.loads(line) for line in f if f"val/{name}/loss" in line]
    assert [line["step"] for line in evaluations] == [3, 6]
    evaluated = run_script("eval.py", "retrieval", "--checkpoint", str(out_dir / "ckpt.pt"),
                           "--data", pairs, "--workers", "0", "--output", str(tmp_path / "r.json"))
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads((tmp_path / "r.json").read_text())
    assert f"retrieval/{name}/image_to_text/R@1" in metrics
    assert {key: evaluations[-1][key] for key in metrics} == metrics
    if source == "shards":
        assert (metrics["retrieval/held_out/images"] == 30
                and metrics["retrieval/held_out/skipped_images"] == 1
                and metrics["retrieval/held_out/skipped_captions"] == 1)

    kept = {name: torch.load(out_dir / name, weights_only=True) for name in
            ("ckpt_3.pt", "ckpt_6.pt", "ckpt.pt")}
    assert [checkpoint["step"] for checkpoint in kept.values()] == [3, 6, 6]
    assert not any("optimizer" in checkpoint for checkpoint in kept.values())
    resumed = run_train(*MINI, "--steps", "8", "--resume", "latest", "--out-dir", str(out_dir))
    assert resumed.returncode == 2 and "--init-from" in resumed.stderr


def test_init_from_a_clip_checkpoint_starts_xclip_with_its_towers(tmp_path):
    clip_dir, xclip_dir = tmp_path / "clip", tmp_path / "xclip"
    assert run_train(*MINI, "--loss", "clip", "--steps", "2", "--out-dir",
                     str(clip_dir)).returncode == 0
    result = run_train(*MINI, "--loss", "xclip",
                       "--lr", "0", "--steps", "1", "--init-from", str(clip_dir / "ckpt.pt"),
                       "--out-dir", str(xclip_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "fresh: image_head, text_head" in result.stdout
    clip, xclip = final_weights(clip_dir), final_weights(xclip_dir)
    assert all(torch.equal(clip[name], xclip[name]) for name in clip)  # lr 0: still CLIP's
    assert any(name.startswith("image_head") for name in xclip)
