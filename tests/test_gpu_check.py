"""tools/gpu_check.sh, the script a lent GPU runs, tried on the CPU with --dry-run (a
one-block model, the same steps and files): every figure reaches summary.txt, at most 8
files come back, and steps past the deadline are skipped and named."""
import os
import subprocess

from conftest import ROOT


def gpu_check(*flags, env=None):
    return subprocess.run(["bash", "tools/gpu_check.sh", *flags], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=env)


def test_the_dry_run_writes_every_figure_to_its_summary(tmp_path):
    result = gpu_check("--dry-run", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    files = sorted(os.listdir(tmp_path))
    assert len(files) <= 8 and "summary.txt" in files and "compiled.log" in files
    summary = (tmp_path / "summary.txt").read_text()
    for figure in ("tokenizer: cl100k_base", "cpus:", "ms/step", "samples/s", "MFU",
                   "peak memory", "(compilation included)", "without --grad-checkpointing: 16",
                   "with --grad-checkpointing: 16", "images/s", "gpu-tests: exit 0"):
        assert figure in summary, figure
    assert "left of the" not in summary and "not run" not in summary
    assert summary.splitlines()[-1].startswith("done in")


def test_steps_past_the_deadline_are_skipped_and_named(tmp_path):
    result = gpu_check("--dry-run", "--deadline", "10", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    summary = (tmp_path / "summary.txt").read_text()
    skipped = next(line for line in summary.splitlines() if line.startswith("not run"))
    assert "compiled" in skipped and "loader" in skipped and "gpu-tests-slow" in skipped


def test_without_a_results_folder_it_stops_in_one_line(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "OUT"}
    result = gpu_check("--dry-run", env=env)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "pass --out DIR" in result.stderr
    result = gpu_check("--deadline", "soon", "--out", str(tmp_path))
    assert result.returncode == 2 and "whole seconds" in result.stderr
