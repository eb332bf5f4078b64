"""claims.py end to end on a minuscule budget, and verdicts that follow the numbers."""
import json

from PIL import Image

from conftest import SMALL_MODEL, run_script
from experiments.claims import claim_verdicts, compare, curve, verdict


def test_claims_writes_results_table_verdicts_and_plots(tmp_path):
    result = run_script("experiments/claims.py", "--seeds", "0", "--steps", "4", "--val-every", "2",
                        "--out-dir", str(tmp_path), "--", *SMALL_MODEL, "--batch-size", "16",
                        "--val-samples", "30", "--log-every", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    with open(tmp_path / "results.json") as f:
        runs = json.load(f)
    assert sorted(run["objective"] for run in runs) == ["clip", "nclip", "xclip"]
    assert all(run["command"].startswith("python train.py --loss") for run in runs)
    assert all("zeroshot/shape/top1" in run["metrics"] for run in runs)
    table = (tmp_path / "table.md").read_text()
    for claim in ("1. nCLIP alone trails CLIP", "2. The non-contrastive", "3. xCLIP beats CLIP"):
        assert claim in table
    assert table.count("(one seed)**") == 3  # one seed: each verdict says it has no noise estimate
    for picture in ("curves.png", "bars.png"):
        with Image.open(tmp_path / picture) as image:
            assert image.width > 400 and image.height > 200


def test_a_difference_beyond_twice_its_standard_error_decides_the_verdict():
    assert verdict(*compare([0.90, 0.91, 0.92], [0.50, 0.52, 0.51])) == "holds"
    assert verdict(*compare([0.50, 0.52, 0.51], [0.90, 0.91, 0.92])) == "does not hold"
    assert verdict(*compare([0.50, 0.70, 0.60], [0.55, 0.65, 0.60])) == "within noise"


def fake_runs(zero_shot, probe):
    """Three seeds of one objective with the given zero-shot and probe top-1s."""
    keys = ("zeroshot/shape/top1", "zeroshot/color/top1",
            "linear_probe/synthetic_shape/top1", "linear_probe/synthetic_color/top1")
    return [{"metrics": dict(zip(keys, (zero_shot + d, zero_shot + d, probe + d, probe + d)))}
            for d in (0.0, 0.01, 0.02)]


def test_the_verdicts_change_when_the_numbers_do():
    paper_like = {"clip": fake_runs(0.6, 0.5), "nclip": fake_runs(0.3, 0.6),
                  "xclip": fake_runs(0.7, 0.6)}
    assert [outcome for _, _, outcome in claim_verdicts(paper_like)] == ["holds"] * 3
    reversed_world = {"clip": fake_runs(0.6, 0.6), "nclip": fake_runs(0.8, 0.5),
                      "xclip": fake_runs(0.5, 0.5)}
    outcomes = [outcome for _, _, outcome in claim_verdicts(reversed_world)]
    assert outcomes == ["does not hold"] * 3


def test_a_curve_ends_at_the_final_evaluation_when_the_log_stops_short_of_it():
    def logged_run(final):
        log = [{"step": 100, "zeroshot/shape/top1": 0.3}, {"step": 250, "loss": 1.0}]
        return {"log": log, "metrics": {"zeroshot/shape/top1": final}}
    assert curve([logged_run(0.5), logged_run(0.7)], "zeroshot/shape/top1") == ([100, 250],
                                                                               [0.3, 0.6])
    evaluated_at_the_end = logged_run(0.5)
    evaluated_at_the_end["log"].append({"step": 250, "zeroshot/shape/top1": 0.4})
    assert curve([evaluated_at_the_end], "zeroshot/shape/top1") == ([100, 250], [0.3, 0.4])
