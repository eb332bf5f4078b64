"""tower_probe.py trains the image tower alone on shape labels and learns past chance."""
import re

import pytest

from conftest import run_in_process, run_script


def val_accuracies(stdout):
    return [float(x) for x in re.findall(r"val shape top-1 ([0-9.]+)", stdout)]


def test_the_tiny_tower_learns_shape_from_labels_past_chance():
    result = run_script("tower_probe.py", "--steps", "80", "--batch-size", "64",
                        "--eval-every", "40", "--val-samples", "200", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    accuracies = val_accuracies(result.stdout)
    assert len(accuracies) == 2
    assert accuracies[-1] > 0.3  # chance is 1/6


@pytest.mark.parametrize("flags,message", [
    (["--steps", "0"], "must be a positive integer"),
    (["--patch-size", "6", "--image-size", "36"], "--conv-stem needs a power-of-2"),
])
def test_a_bad_flag_is_one_line_and_exit_code_2(monkeypatch, capsys, flags, message):
    result = run_in_process(monkeypatch, capsys, "tower_probe.py", *flags)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
