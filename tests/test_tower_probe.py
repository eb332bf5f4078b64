"""tower_probe.py trains the image tower alone on shape labels (and color labels, when
asked) and learns past chance."""
import math
import re

import pytest

from conftest import run_in_process, run_script


def val_accuracies(stdout):
    return [float(x) for x in re.findall(r"val shape top-1 ([0-9.]+)", stdout)]


def test_the_tiny_tower_learns_shape_from_labels_past_chance():
    result = run_script("experiments/tower_probe.py", "--steps", "80", "--batch-size", "64",
                        "--eval-every", "40", "--val-samples", "200", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    accuracies = val_accuracies(result.stdout)
    assert len(accuracies) == 2
    assert accuracies[-1] > 0.3  # chance is 1/6


def first_loss(*flags):
    result = run_script("experiments/tower_probe.py", "--steps", "1", "--batch-size", "16",
                        "--val-samples", "20", *flags, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return float(re.search(r"step 1: loss ([0-9.]+)", result.stdout).group(1))


def test_color_labels_add_the_color_cross_entropy_to_the_loss():
    # At initialization each cross entropy is near the log of its class count.
    added = first_loss("--color-labels") - first_loss()
    assert added == pytest.approx(math.log(8), abs=0.3)


@pytest.mark.parametrize("flags,message", [
    (["--steps", "0"], "must be a positive integer"),
    (["--patch-size", "6", "--image-size", "36"], "--conv-stem needs a power-of-2"),
])
def test_a_bad_flag_is_one_line_and_exit_code_2(monkeypatch, capsys, flags, message):
    result = run_in_process(monkeypatch, capsys, "experiments/tower_probe.py", *flags)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
