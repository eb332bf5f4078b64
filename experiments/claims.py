"""Does it reproduce the paper? CLIP, nCLIP and xCLIP trained with the same budget and
seeds on the built-in data, evaluated by the same code, and the paper's three claims
decided from the numbers.

    python experiments/claims.py                       # 3 objectives x seeds 0 1 2
    python experiments/claims.py --batch-sizes 64 256  # and each objective at these batches
    python experiments/claims.py --ablations           # nCLIP's departures, one at a time
    python experiments/claims.py --model vit_s16 --steps 5000 -- --device cuda --batch-size 512

Run from the repository root. Everything after `--` goes to every train.py run. Writes,
under --out-dir (default experiments/results/):
results.json (each run's command, wall time, final metrics and curves), table.md (mean and
standard deviation per objective, and the verdicts), curves.png and bars.png; ablations.md
for --ablations. A run whose final_metrics.json exists is read, not rerun: delete its folder
under runs/ to redo it.

A claim compares two means over seeds. It "holds" when the difference in the claimed
direction exceeds twice its standard error sqrt(sd_a^2/n_a + sd_b^2/n_b), "does not hold"
when it exceeds twice the standard error the other way, and is "within noise" otherwise.
With one seed there is no standard error, and the verdict is the sign, marked as such.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the paper's code
from eval import HEADLINE_METRICS
from plots import Panel, bar_chart, line_panels

OBJECTIVES = ("clip", "nclip", "xclip")
# column -> key in final_metrics.json (or in the last log line for nclip/*)
METRICS = {**HEADLINE_METRICS, "nCLIP information": "nclip/information"}
ABLATION_METRICS = ("nclip/information", "nclip/same_prototype", "nclip/image_perplexity",
                    "zeroshot/color/top1", "zeroshot/shape/top1",
                    "retrieval/synthetic/image_to_text/R@1", "linear_probe/synthetic_shape/top1")
ZERO_SHOT = ("zeroshot/shape/top1", "zeroshot/color/top1")
PROBE = ("linear_probe/synthetic_shape/top1", "linear_probe/synthetic_color/top1")
# Each of nCLIP's departures from the paper's objective, turned off one at a time, then all;
# then the tiny preset's conv stem, its normalization, and the long warm-up, each off.
PAPER_FORM = ("--no-center-prototype-logits --entropy-weight 0 --me-max-weight 1 "
              "--student-temp 0.1 --teacher-temp 0.04 --num-prototypes 512")
ABLATIONS = (
    ("nclip", ""),
    ("nclip", "--no-center-prototype-logits"),
    ("nclip", "--entropy-weight 0"),
    ("nclip", "--me-max-weight 1"),
    ("nclip", "--student-temp 0.1 --teacher-temp 0.04"),
    ("nclip", "--num-prototypes 512"),
    ("nclip", PAPER_FORM),
    ("xclip", ""),
    ("xclip", PAPER_FORM),
    ("clip", "--no-conv-stem"),  # the tiny preset's image stem, for every objective
    ("xclip", "--no-conv-stem"),
    ("clip", "--no-conv-stem-norm"),
    ("xclip", "--no-conv-stem-norm"),
    ("clip", "--warmup 50"),
    ("xclip", "--warmup 50"),
)


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    train_flags = []
    if "--" in argv:
        split = argv.index("--")
        argv, train_flags = argv[:split], argv[split + 1:]
    p = argparse.ArgumentParser(description="Check the paper's claims on the built-in data.")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds per objective")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: train.py's)")
    p.add_argument("--model", default=None, help="preset (default: train.py's, tiny)")
    p.add_argument("--batch-sizes", type=int, nargs="*", default=[],
                   help="also train each objective at these batch sizes, first seed only")
    p.add_argument("--ablations", action="store_true",
                   help="run the nCLIP ablations (first seed) instead of the claims")
    p.add_argument("--val-every", type=int, default=100,
                   help="steps between zero-shot curve points")
    p.add_argument("--out-dir", default=os.path.join("experiments", "results"),
                   help="where runs, tables and plots go")
    args = p.parse_args(argv)
    args.train_flags = train_flags
    return args


def train_command(args, objective, seed, run_dir, extra=()):
    command = [sys.executable, os.path.join(ROOT, "train.py"), "--loss", objective,
               "--seed", str(seed), "--out-dir", run_dir, "--val-every", str(args.val_every)]
    if args.steps:
        command += ["--steps", str(args.steps)]
    if args.model:
        command += ["--model", args.model]
    return command + list(extra) + args.train_flags


def read_run(run_dir):
    """Final metrics (plus the last log line's nCLIP monitors) and the log's curves."""
    with open(os.path.join(run_dir, "final_metrics.json")) as f:
        metrics = json.load(f)
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    train_lines = [line for line in log if "loss" in line]
    for key in ("nclip/information", "nclip/same_prototype", "nclip/image_perplexity",
                "nclip/text_perplexity"):
        if train_lines and key in train_lines[-1]:
            metrics[key] = train_lines[-1][key]
    return metrics, log


def run(args, name, objective, seed, extra=()):
    """Train (unless done before) and read one run."""
    run_dir = os.path.join(args.out_dir, "runs", name)
    command = train_command(args, objective, seed, run_dir, extra)
    printable = " ".join(["train.py", *command[2:]])
    done = os.path.exists(os.path.join(run_dir, "final_metrics.json"))
    started = time.time()
    if not done:
        print(f"[{time.strftime('%H:%M:%S')}] {printable}", flush=True)
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"claims.py: error: the run {name} failed ({result.returncode}):\n"
                     + result.stderr[-2000:])
        with open(os.path.join(run_dir, "wall_seconds"), "w") as f:
            f.write(f"{time.time() - started:.0f}\n")
    with open(os.path.join(run_dir, "wall_seconds")) as f:
        wall_seconds = float(f.read())
    metrics, log = read_run(run_dir)
    return {"name": name, "objective": objective, "seed": seed, "command": "python " + printable,
            "wall_seconds": wall_seconds, "metrics": metrics, "log": log}


def mean_sd(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def score(run, keys):
    return statistics.fmean(run["metrics"][key] for key in keys)


def compare(better, worse):
    """(difference of means, its standard error, n): `better` minus `worse`, lists of values."""
    (mean_b, sd_b), (mean_w, sd_w) = mean_sd(better), mean_sd(worse)
    standard_error = math.sqrt(sd_b ** 2 / len(better) + sd_w ** 2 / len(worse))
    return mean_b - mean_w, standard_error, min(len(better), len(worse))


def verdict(difference, standard_error, n):
    if n < 2:
        return "holds (one seed)" if difference > 0 else "does not hold (one seed)"
    if difference > 2 * standard_error:
        return "holds"
    if difference < -2 * standard_error:
        return "does not hold"
    return "within noise"


def claim_verdicts(runs_by_objective):
    """The paper's three claims, each with its verdict and the numbers behind it."""
    def scores(objective, keys):
        return [score(run, keys) for run in runs_by_objective.get(objective, [])]

    def line(difference, standard_error, n):
        numbers = f"{difference:+.3f} ± {2 * standard_error:.3f} (2 SE)"
        return numbers, verdict(difference, standard_error, n)

    claims = []
    numbers, outcome = line(*compare(scores("clip", ZERO_SHOT), scores("nclip", ZERO_SHOT)))
    claims.append(("1. nCLIP alone trails CLIP at zero-shot classification",
                   f"CLIP − nCLIP, zero-shot (mean of shape and color top-1): {numbers}",
                   outcome))
    numbers, outcome = line(*compare(scores("nclip", PROBE), scores("clip", PROBE)))
    claims.append(("2. The non-contrastive objective helps representation learning",
                   f"nCLIP − CLIP, linear probe (mean of shape and color top-1): {numbers}",
                   outcome))
    zero_shot = compare(scores("xclip", ZERO_SHOT), scores("clip", ZERO_SHOT))
    probe = compare(scores("xclip", PROBE), scores("clip", PROBE))
    outcomes = [verdict(*zero_shot), verdict(*probe)]
    if all(o.startswith("holds") for o in outcomes):
        outcome = outcomes[0]
    elif any(o.startswith("does not hold") for o in outcomes):
        outcome = next(o for o in outcomes if o.startswith("does not hold"))
    else:
        outcome = "within noise"
    numbers = f"xCLIP − CLIP, zero-shot: {line(*zero_shot)[0]}; linear probe: {line(*probe)[0]}"
    claims.append(("3. xCLIP beats CLIP on both zero-shot and linear probe", numbers, outcome))
    return claims


def format_cell(values):
    mean, sd = mean_sd(values)
    if math.isnan(mean):
        return "—"
    return f"{mean:.3f} ± {sd:.3f}" if len(values) > 1 else f"{mean:.3f}"


def metrics_table(rows):
    """Markdown: one row per (label, runs), a column per METRICS entry, mean ± sd."""
    lines = ["| | runs | " + " | ".join(METRICS) + " | wall time |",
             "| --- | --- | " + " | ".join("---" for _ in METRICS) + " | --- |"]
    for label, runs in rows:
        cells = [format_cell([run["metrics"].get(key, math.nan) for run in runs])
                 for key in METRICS.values()]
        wall = statistics.fmean(run["wall_seconds"] for run in runs)
        lines.append(f"| {label} | {len(runs)} | " + " | ".join(cells) + f" | {wall:.0f} s |")
    return "\n".join(lines)


# nCLIP counts as alive at the end of a run when its prototypes say something about the
# sample, the two modalities agree on it, and many prototypes are in use.
ALIVE = {"nclip/information": 1.5, "nclip/same_prototype": 0.3,
         "nclip/image_perplexity": 32, "nclip/text_perplexity": 32}


def collapse_table(runs):
    """Markdown: the nCLIP monitors of each run's last log line, and whether it is alive."""
    bar = ", ".join(f"{key.split('/')[1]} ≥ {value:g}" for key, value in ALIVE.items())
    lines = ["| run | " + " | ".join(key.split("/")[1] for key in ALIVE) + f" | alive ({bar}) |",
             "| --- | " + " | ".join("---" for _ in ALIVE) + " | --- |"]
    for run in runs:
        values = [run["metrics"].get(key, math.nan) for key in ALIVE]
        alive = all(value >= bar for value, bar in zip(values, ALIVE.values()))
        cells = " | ".join(f"{value:.3f}" for value in values)
        lines.append(f"| {run['name']} | {cells} | {'yes' if alive else 'no'} |")
    return "\n".join(lines)


def curve(runs, key):
    """Mean over runs of `key` at each step the log has it, and at the last step from the
    final evaluation where the log has nothing there: ([steps], [values])."""
    by_step = {}
    for run in runs:
        points = {line["step"]: line[key] for line in run["log"] if key in line}
        last_step = max(line["step"] for line in run["log"])
        if key in run["metrics"] and last_step not in points:
            points[last_step] = run["metrics"][key]
        for step, value in points.items():
            by_step.setdefault(step, []).append(value)
    steps = sorted(by_step)
    return steps, [statistics.fmean(by_step[step]) for step in steps]


def draw_plots(out_dir, runs_by_objective):
    panels = []
    for title, key in (("CLIP loss", "clip/loss"), ("nCLIP loss", "nclip/loss"),
                       ("zero-shot shape top-1 (val)", "zeroshot/shape/top1"),
                       ("zero-shot color top-1 (val)", "zeroshot/color/top1"),
                       ("nCLIP information (nats)", "nclip/information"),
                       ("nCLIP same prototype", "nclip/same_prototype")):
        series = {objective: curve(runs, key) for objective, runs in runs_by_objective.items()}
        panels.append(Panel(title, "step", {name: xy for name, xy in series.items() if xy[0]}))
    line_panels(os.path.join(out_dir, "curves.png"), panels)
    groups = ["zero-shot shape", "zero-shot color", "image→text R@1", "probe shape",
              "probe color"]
    values, errors = {}, {}
    for objective, runs in runs_by_objective.items():
        stats = [mean_sd([run["metrics"][METRICS[group]] for run in runs]) for group in groups]
        values[objective] = [mean for mean, _ in stats]
        errors[objective] = [sd for _, sd in stats]
    seeds = len(next(iter(runs_by_objective.values())))
    bar_chart(os.path.join(out_dir, "bars.png"), f"final metrics, mean ± sd over {seeds} seed(s)",
              groups, values, errors, y_label="top-1 / recall")


def claims_study(args):
    runs_by_objective = {objective: [run(args, f"{objective}-seed{seed}", objective, seed)
                                     for seed in args.seeds] for objective in OBJECTIVES}
    batch_rows = []
    for batch_size in args.batch_sizes:
        for objective in OBJECTIVES:
            name = f"{objective}-batch{batch_size}-seed{args.seeds[0]}"
            batch_run = run(args, name, objective, args.seeds[0], ["--batch-size", str(batch_size)])
            batch_rows.append((f"{objective}, batch {batch_size}", [batch_run]))
    all_runs = [r for runs in runs_by_objective.values() for r in runs] + [r for _, rs in batch_rows
                                                                         for r in rs]
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump([{k: v for k, v in r.items() if k != "log"} for r in all_runs], f, indent=1)
    claims = claim_verdicts(runs_by_objective)
    rows = [(objective, runs) for objective, runs in runs_by_objective.items()]
    text = [f"Seeds {' '.join(map(str, args.seeds))}; commands in results.json. "
            "Mean ± sd over seeds; chance is 1/6 for shape, 1/8 for color.", "",
            metrics_table(rows), "", "| claim | the numbers | verdict |", "| --- | --- | --- |"]
    text += [f"| {claim} | {numbers} | **{outcome}** |" for claim, numbers, outcome in claims]
    nclip_runs = runs_by_objective["nclip"] + runs_by_objective["xclip"]
    text += ["", "nCLIP at the end of each run (last log line):", "", collapse_table(nclip_runs)]
    if batch_rows:
        text += ["", "Batch size (first seed; the rows above use train.py's default):", "",
                 metrics_table(batch_rows)]
    with open(os.path.join(args.out_dir, "table.md"), "w") as f:
        f.write("\n".join(text) + "\n")
    draw_plots(args.out_dir, runs_by_objective)
    print("\n".join(text))


MONITOR_STEPS = (10, 20, 50, 100, 200, 300, 500)
MONITOR_COLUMNS = (  # column -> the log keys it shows, image / text where there are two
    ("information", ("nclip/information",)),
    ("same prototype", ("nclip/same_prototype",)),
    ("perplexity", ("nclip/image_perplexity", "nclip/text_perplexity")),
    ("logit spread", ("nclip/image_logit_spread", "nclip/text_logit_spread")),
    ("bottleneck spread", ("nclip/image_bottleneck_spread", "nclip/text_bottleneck_spread")),
    ("bias / weight norm", ("nclip/image_head_bias_norm", "nclip/image_head_weight_norm",
                            "nclip/text_head_bias_norm", "nclip/text_head_weight_norm")),
    ("deviation correlation", ("nclip/deviation_correlation",)),
)


def monitor_table(log, steps=MONITOR_STEPS):
    """Markdown: the collapse monitors of one run's log at the given steps and its last
    (each log line averages the steps since the one before)."""
    by_step = {line["step"]: line for line in log if "loss" in line}
    lines = ["| step | " + " | ".join(column for column, _ in MONITOR_COLUMNS) + " |",
             "| --- | " + " | ".join("---" for _ in MONITOR_COLUMNS) + " |"]
    last_step = max(by_step)
    for step in sorted({s for s in steps if s in by_step} | {last_step}):
        line = by_step[step]
        cells = []
        for column, keys in MONITOR_COLUMNS:
            values = [line.get(key, math.nan) for key in keys]
            if column == "bias / weight norm":  # image, text
                cells.append(f"{values[0] / values[1]:.3f} / {values[2] / values[3]:.3f}")
            else:
                cells.append(" / ".join(f"{value:.3g}" for value in values))
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ablation_study(args):
    seed = args.seeds[0]
    lines = ["| objective | flags | information | same prototype | image perplexity "
             "| zero-shot color "
             "| zero-shot shape | image→text R@1 | probe shape | command |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    runs = []
    for index, (objective, flags) in enumerate(ABLATIONS):
        # The defaults row is the claims study's run of that objective and seed.
        name = f"ablation{index:02d}-{objective}-seed{seed}" if flags else f"{objective}-seed{seed}"
        result = run(args, name, objective, seed, flags.split())
        runs.append(result)
        m = result["metrics"]
        # A CLIP run has no nCLIP monitors.
        cells = [f"{m[key]:.3f}" if key in m else "—" for key in ABLATION_METRICS]
        lines.append(f"| {objective} | `{flags or '(defaults)'}` | " + " | ".join(cells)
                     + f" | `{result['command']}` |")
    with open(os.path.join(args.out_dir, "ablations.json"), "w") as f:
        json.dump([{k: v for k, v in r.items() if k != "log"} for r in runs], f, indent=1)
    for index, (objective, flags) in enumerate(ABLATIONS):
        if objective == "nclip" and flags in ("", PAPER_FORM):
            title = "defaults" if not flags else "the paper's form"
            lines += ["", f"Collapse monitors of nCLIP, {title} (`{runs[index]['command']}`; "
                      "image / text where there are two):", "", monitor_table(runs[index]["log"])]
    with open(os.path.join(args.out_dir, "ablations.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    args = parse_args()
    os.makedirs(os.path.join(args.out_dir, "runs"), exist_ok=True)
    started = time.time()
    (ablation_study if args.ablations else claims_study)(args)
    print(f"\n{time.time() - started:.0f} s; written under {args.out_dir}/")


if __name__ == "__main__":
    main()
