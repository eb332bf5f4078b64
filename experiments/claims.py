"""Does it reproduce the paper? CLIP, nCLIP and xCLIP trained with the same budget and
seeds on the built-in data, evaluated by the same code, and the paper's three claims
decided from the numbers.

    python experiments/claims.py                       # 3 objectives x seeds 0 1 2
    python experiments/claims.py --noise               # and at three noisier caption levels
    python experiments/claims.py --batch-sizes 64 256  # and each objective at these batches
    python experiments/claims.py --batch-sizes 64 256 --equal-images   # and at equal images
    python experiments/claims.py --prototype-ratios 0.5 4 16   # nCLIP's K against the batch
    python experiments/claims.py --ablations           # nCLIP's departures, one at a time
    python experiments/claims.py --model vit_b16 --train-data "cc3m/{00000..00331}.tar" \
        --zeroshot-data imagenet/val --classnames imagenet --templates openai \
        --retrieval-data coco_5k.csv --probe-train-data cifar/train --probe-test-data cifar/test \
        -- --train-num-samples 2800000 --device cuda --batch-size 512 --steps 20000

Run from the repository root. Everything after `--` goes to every train.py run. Writes,
under --out-dir (default experiments/results/):
results.json (each run's command, wall time and final metrics), table.md (mean and standard
deviation per objective, and the verdicts), curves.png and bars.png, noise.png, batch.png and
prototypes.png for those rows; ablations.md for --ablations. The runs go to runs/ (their
curves in log.jsonl); a run whose final_metrics.json exists is read, not rerun: delete its
folder to redo it.

A claim compares two means over seeds. It "holds" when the difference in the claimed
direction exceeds twice its standard error sqrt(sd_a^2/n_a + sd_b^2/n_b), "does not hold"
when it exceeds twice the standard error the other way, and is "within noise" otherwise.
With one seed there is no standard error, and the verdict is the sign, marked as such.

On your own data (--train-data), each run is scored by eval.py's commands on the data
given (zero-shot, retrieval, linear and kNN probes), and the claims are decided from those.
"""
import glob
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the paper's code
from eval import HEADLINE_METRICS, dataset_name
import faults
from faults import OneLineErrorParser, fail, positive_float, positive_int
from flags import PAPER_FORM
from flags import build_parser as train_parser
from model import NON_CONTRASTIVE, OBJECTIVES, PRESETS
from plots import Panel, bar_chart, line_panels

# column -> key in final_metrics.json (or in the last log line for nclip/*)
METRICS = {**HEADLINE_METRICS, "kNN shape": "knn/synthetic_shape/top1",
           "kNN color": "knn/synthetic_color/top1",
           "text probe shape": "text_probe/synthetic_shape/top1",
           "text probe color": "text_probe/synthetic_color/top1",
           "text→text R@1": "text_retrieval/synthetic/text_to_text/R@1",
           "nCLIP information": "nclip/information"}
ABLATION_METRICS = ("nclip/information", "nclip/same_prototype", "nclip/image_perplexity",
                    "zeroshot/color/top1", "zeroshot/shape/top1",
                    "retrieval/synthetic/image_to_text/R@1", "linear_probe/synthetic_shape/top1")
ZERO_SHOT = ("zeroshot/shape/top1", "zeroshot/color/top1")
PROBE = ("linear_probe/synthetic_shape/top1", "linear_probe/synthetic_color/top1")
KNN = ("knn/synthetic_shape/top1", "knn/synthetic_color/top1")
TEXT_PROBE = ("text_probe/synthetic_shape/top1", "text_probe/synthetic_color/top1")
# What each claim averages, on the built-in data: (zero-shot, linear probe, kNN probe, the
# text tower's linear probe) keys.
SYNTHETIC_KEYS = (ZERO_SHOT, PROBE, KNN, TEXT_PROBE)
# Web-style caption noise of the built-in data, (unrelated, loose) caption fractions; the
# first is train.py's default, where the claims rows are.
NOISE_LEVELS = ((0.05, 0.15), (0.15, 0.2), (0.25, 0.3), (0.5, 0.5))

# Each of nCLIP's departures from the paper's objective, turned off one at a time, then all
# (the paper's form, with K 4 x the batch); then the tiny preset's conv stem, its
# normalization, and the long warm-up, each off.
PAPER_FORM_ROW = " ".join(PAPER_FORM) + " --num-prototypes 512"
ABLATIONS = (
    ("nclip", ""),
    ("nclip", "--no-center-prototype-logits"),
    ("nclip", "--entropy-weight 0"),
    ("nclip", "--me-max-weight 1"),
    ("nclip", "--student-temp 0.1 --teacher-temp 0.04"),
    ("nclip", "--num-prototypes 512"),
    ("nclip", PAPER_FORM_ROW),
    ("xclip", ""),
    ("xclip", PAPER_FORM_ROW),
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
    p = OneLineErrorParser(description="Check the paper's claims on the built-in data.")
    p.add_argument("--seeds", type=faults.seed, nargs="+", default=[0, 1, 2],
                   help="seeds per objective, each once; two or more for a verdict")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="training steps (default: train.py's)")
    p.add_argument("--model", choices=list(PRESETS), default=None,
                   help="preset (default: train.py's, tiny)")
    p.add_argument("--batch-sizes", type=positive_int, nargs="*", default=[],
                   help="also train each objective at these batch sizes, on every seed")
    p.add_argument("--equal-images", action="store_true",
                   help="with --batch-sizes: also at equal images seen (steps and warm-up "
                        "scaled by default batch / batch)")
    p.add_argument("--noise", action="store_true",
                   help="also train each objective on every seed at the caption-noise levels "
                        f"{NOISE_LEVELS[1:]} (unrelated, loose fractions); with --real-data, "
                        "on its captions_unrelated_F.csv tables")
    p.add_argument("--prototype-ratios", type=positive_float, nargs="*", default=[],
                   help="also train nCLIP and xCLIP (first seed) with K = ratio x batch "
                        "prototypes, at each of --prototype-batches")
    p.add_argument("--prototype-batches", type=positive_int, nargs="+", default=[128, 256],
                   help="global batches of the --prototype-ratios rows (above --batch-size by "
                        "--accum-freq)")
    real = p.add_argument_group("your own data (instead of the built-in data)")
    real.add_argument("--real-data", metavar="DIR", default=None,
                      help="a folder experiments/real_data.py exported (fashion-mnist, mnist "
                           "or both): the flags below from its layout, and --noise from its "
                           "captions_unrelated_F.csv tables")
    real.add_argument("--train-data", default=None,
                      help="train.py's --train-data: tar shards or a caption table")
    real.add_argument("--zeroshot-data", help="image folder for zero-shot (claims 1 and 3)")
    real.add_argument("--classnames", help="its class names (eval.py zeroshot --classnames)")
    real.add_argument("--templates", help="its prompt templates (eval.py zeroshot --templates)")
    real.add_argument("--retrieval-data", help="caption table or shards for retrieval")
    real.add_argument("--probe-train-data", help="image folder the probes are fit on")
    real.add_argument("--probe-test-data", help="image folder the probes are scored on")
    p.add_argument("--ablations", action="store_true",
                   help="run the nCLIP ablations (first seed) instead of the claims")
    p.add_argument("--val-every", type=positive_int, default=100,
                   help="steps between zero-shot curve points")
    p.add_argument("--out-dir", default=None,
                   help="where runs, tables and plots go (default: experiments/results, or "
                        "experiments/results/real/NAME for --real-data)")
    p.add_argument("--launcher", default=None,
                   help="what runs train.py instead of this Python, e.g. 'torchrun "
                        "--nproc_per_node=8' for a node of GPUs")
    args = p.parse_args(argv)
    args.train_flags = train_flags
    check_study_flags(p, args)
    if args.real_data:
        use_real_data(p, args)
    args.out_dir = args.out_dir or os.path.join("experiments", "results", *(
        ("real", os.path.basename(os.path.normpath(args.real_data))) if args.real_data else ()))
    if args.noise and args.train_data and not args.real_data:
        p.error("--noise on your own data takes its noisier tables from --real-data DIR")
    if args.train_data and not (args.zeroshot_data and args.probe_train_data
                                and args.probe_test_data):
        p.error("--train-data needs --zeroshot-data, --probe-train-data and --probe-test-data: "
                "the claims compare zero-shot and the probes")
    return args


def check_study_flags(parser, args):
    """What would otherwise fail after hours of runs, or give a verdict it cannot: refused
    before the first run."""
    for flag, values in (("--seeds", args.seeds), ("--batch-sizes", args.batch_sizes),
                         ("--prototype-ratios", args.prototype_ratios),
                         ("--prototype-batches", args.prototype_batches)):
        repeated = sorted({value for value in values if values.count(value) > 1})
        if repeated:
            parser.error(f"{flag}: {repeated[0]:g} is given twice; each counts once")
    if args.out_dir and os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        parser.error(f"--out-dir {args.out_dir} is a file; name a folder")
    if args.launcher:
        program = (shlex.split(args.launcher) or [""])[0]
        if not shutil.which(program):
            parser.error(f"--launcher {args.launcher!r}: no program {program!r} here")


def use_real_data(parser, args):
    """The own-data flags of an exported real-data folder (experiments/real_data.py)."""
    folder = args.real_data
    if not os.path.isfile(os.path.join(folder, "captions.csv")):
        parser.error(f"--real-data {folder}: no captions.csv there; export it with "
                     "python experiments/real_data.py export DIR")
    args.train_data = os.path.join(folder, "captions.csv")
    args.zeroshot_data = args.probe_test_data = os.path.join(folder, "test")
    args.probe_train_data = os.path.join(folder, "probe_train")
    args.classnames = os.path.join(folder, "classnames.txt")
    args.templates = os.path.join(folder, "templates.txt")


def sources_of(args):
    """{source: its class folders} of a run on both/ (its sources.json); {} otherwise."""
    path = os.path.join(args.real_data or "", "sources.json")
    if not args.real_data or not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def source_scores(args, metrics):
    """Each source's zero-shot top-1 in a run on both/: the mean of its classes' top-1 (the
    test splits are balanced), out of all the classes. -> {key: value}"""
    name = dataset_name(args.zeroshot_data)
    return {f"zeroshot/{name}/{source}/top1": statistics.fmean(
        metrics[f"zeroshot/{name}/class_top1/{folder}"] for folder in folders)
        for source, folders in sources_of(args).items()}


def own_data_keys(args):
    """(columns {label: metric key}, (zero-shot, linear probe, kNN probe, no text probe)
    keys) of the eval.py commands a run on --train-data is scored with."""
    zero_shot = dataset_name(args.zeroshot_data)
    probe = dataset_name(args.probe_test_data)
    columns = {f"zero-shot {zero_shot} top-1": f"zeroshot/{zero_shot}/top1"}
    if args.retrieval_data:
        retrieval = dataset_name(args.retrieval_data)
        columns["image→text R@1"] = f"retrieval/{retrieval}/image_to_text/R@1"
        columns["text→image R@1"] = f"retrieval/{retrieval}/text_to_image/R@1"
    for source in sources_of(args):
        columns[f"zero-shot {source} (of {zero_shot})"] = f"zeroshot/{zero_shot}/{source}/top1"
    columns.update({f"probe {probe}": f"linear_probe/{probe}/top1",
                    f"kNN {probe}": f"knn/{probe}/top1", "nCLIP information": "nclip/information"})
    keys = ((columns[f"zero-shot {zero_shot} top-1"],), (columns[f"probe {probe}"],),
            (columns[f"kNN {probe}"],), None)
    return columns, keys


def eval_commands(args, checkpoint):
    """The eval.py commands that score a run on your own data: (output file, command)."""
    folder = os.path.dirname(checkpoint)
    common = ["--checkpoint", checkpoint] + (["--device", device_flag(args)]
                                             if device_flag(args) else [])
    zeroshot = ["zeroshot", "--data", args.zeroshot_data]
    zeroshot += ["--classnames", args.classnames] if args.classnames else []
    zeroshot += ["--templates", args.templates] if args.templates else []
    probes = ["--train-data", args.probe_train_data, "--test-data", args.probe_test_data,
              "--feature-cache", os.path.join(folder, "features")]
    tasks = [zeroshot, ["linear-probe", *probes], ["knn", *probes]]
    if args.retrieval_data:
        tasks.append(["retrieval", "--data", args.retrieval_data])
    return [(os.path.join(folder, f"eval_{task[0]}.json"),
             [sys.executable, os.path.join(ROOT, "eval.py"), *task, *common,
              "--output", os.path.join(folder, f"eval_{task[0]}.json")]) for task in tasks]


def device_flag(args):
    """The --device of the train.py flags after --, for eval.py too."""
    flags = args.train_flags
    return flags[flags.index("--device") + 1] if "--device" in flags[:-1] else None


def train_command(args, objective, seed, run_dir, extra=()):
    launcher = shlex.split(args.launcher) if args.launcher else [sys.executable]
    command = [*launcher, os.path.join(ROOT, "train.py"), "--loss", objective,
               "--seed", str(seed), "--out-dir", run_dir, "--val-every", str(args.val_every)]
    if args.steps:
        command += ["--steps", str(args.steps)]
    if args.model:
        command += ["--model", args.model]
    if args.train_data:  # and the zero-shot curve on the zero-shot folder
        command += ["--train-data", args.train_data, "--zeroshot-data", args.zeroshot_data]
        command += ["--classnames", args.classnames] if args.classnames else []
    return command + args.train_flags + list(extra)  # a row's own flags win


def study_flags(args):
    """train.py's flags of the claims rows (its defaults, the flags after --, --steps):
    the reference the batch and prototype rows scale from."""
    steps = ["--steps", str(args.steps)] if args.steps else []
    return train_parser().parse_args(args.train_flags + steps)


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
    printable = " ".join(["train.py", *command[command.index(os.path.join(ROOT, "train.py")) + 1:]])
    done = os.path.exists(os.path.join(run_dir, "final_metrics.json"))
    started = time.time()
    if not done:
        print(f"[{time.strftime('%H:%M:%S')}] {printable}", flush=True)
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            fail("claims.py", f"the run {name} failed ({result.returncode}):\n"
                 + result.stderr[-2000:])
        with open(os.path.join(run_dir, "wall_seconds"), "w") as f:
            f.write(f"{time.time() - started:.0f}\n")
    with open(os.path.join(run_dir, "wall_seconds")) as f:
        wall_seconds = float(f.read())
    metrics, log = read_run(run_dir)
    if args.train_data:
        for output, evaluation in eval_commands(args, os.path.join(run_dir, "ckpt.pt")):
            if not os.path.exists(output):
                result = subprocess.run(evaluation, capture_output=True, text=True)
                if result.returncode != 0:
                    fail("claims.py", f"scoring {name} failed: {result.stderr[-2000:]}")
            with open(output) as f:
                metrics.update(json.load(f))
        metrics.update(source_scores(args, metrics))
    return {"name": name, "objective": objective, "seed": seed,
            "command": f"{args.launcher or 'python'} {printable}",
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
    if n < 2:  # no standard error: the sign alone is not a result
        return "no verdict (one seed)"
    if difference > 2 * standard_error:
        return "holds"
    if difference < -2 * standard_error:
        return "does not hold"
    return "within noise"


def claim_verdicts(runs_by_objective, keys=SYNTHETIC_KEYS):
    """The paper's three claims, each with its verdict and the numbers behind it; claim 2
    by the linear probe and by the kNN probe, and for the text tower (its linear probe:
    nCLIP's and xCLIP's against CLIP's). `keys`: the metric keys of zero-shot, of the
    linear probe, of the kNN probe and of the text probe (None: no text rows), each
    averaged."""
    zero_shot_keys, probe_keys, knn_keys, text_keys = keys

    def scores(objective, keys):
        return [score(run, keys) for run in runs_by_objective.get(objective, [])]

    def line(difference, standard_error, n):
        numbers = f"{difference:+.3f} ± {2 * standard_error:.3f} (2 SE)"
        return numbers, verdict(difference, standard_error, n)

    claims = []
    of = "(mean of shape and color top-1)" if keys == SYNTHETIC_KEYS else "(top-1)"
    numbers, outcome = line(*compare(scores("clip", zero_shot_keys),
                                     scores("nclip", zero_shot_keys)))
    claims.append(("1. nCLIP alone trails CLIP at zero-shot classification",
                   f"CLIP − nCLIP, zero-shot {of}: {numbers}", outcome))
    for probe_name, probe_of in (("linear probe", probe_keys), ("kNN probe", knn_keys)):
        numbers, outcome = line(*compare(scores("nclip", probe_of), scores("clip", probe_of)))
        claims.append((f"2. The non-contrastive objective helps representation learning "
                       f"({probe_name})", f"nCLIP − CLIP, {probe_name} {of}: {numbers}", outcome))
    for objective in NON_CONTRASTIVE if text_keys else ():
        numbers, outcome = line(*compare(scores(objective, text_keys), scores("clip", text_keys)))
        name = {"nclip": "nCLIP", "xclip": "xCLIP"}[objective]
        claims.append((f"2. The text tower: {name}'s beats CLIP's (text probe)",
                       f"{name} − CLIP, text probe {of}: {numbers}", outcome))
    zero_shot = compare(scores("xclip", zero_shot_keys), scores("clip", zero_shot_keys))
    probe = compare(scores("xclip", probe_keys), scores("clip", probe_keys))
    outcomes = [verdict(*zero_shot), verdict(*probe)]
    if any(o.startswith("no verdict") for o in outcomes):
        outcome = outcomes[0]
    elif all(o.startswith("holds") for o in outcomes):
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


def metrics_table(rows, columns=METRICS):
    """Markdown: one row per (label, runs), a column per `columns` entry, mean ± sd."""
    lines = ["| | runs | " + " | ".join(columns) + " | wall time |",
             "| --- | --- | " + " | ".join("---" for _ in columns) + " | --- |"]
    for label, runs in rows:
        cells = [format_cell([run["metrics"].get(key, math.nan) for run in runs])
                 for key in columns.values()]
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


def draw_plots(out_dir, runs_by_objective, columns=METRICS):
    """curves.png (training curves, mean over seeds) and bars.png (final metrics)."""
    if columns is METRICS:
        zero_shot_curves = (("zero-shot shape top-1 (val)", "zeroshot/shape/top1"),
                            ("zero-shot color top-1 (val)", "zeroshot/color/top1"))
        groups = ["zero-shot shape", "zero-shot color", "image→text R@1", "probe shape",
                  "probe color", "kNN shape", "kNN color"]
    else:
        zero_shot = next(label for label in columns if label.startswith("zero-shot"))
        zero_shot_curves = ((f"{zero_shot} (val)", columns[zero_shot]),)
        groups = [label for label in columns if label != "nCLIP information"]
    panels = []
    for title, key in (("CLIP loss", "clip/loss"), ("nCLIP loss", "nclip/loss"),
                       *zero_shot_curves, ("nCLIP information (nats)", "nclip/information"),
                       ("nCLIP same prototype", "nclip/same_prototype")):
        series = {objective: curve(runs, key) for objective, runs in runs_by_objective.items()}
        panels.append(Panel(title, "step", {name: xy for name, xy in series.items() if xy[0]}))
    line_panels(os.path.join(out_dir, "curves.png"), panels, series_order=OBJECTIVES)
    values, errors = {}, {}
    for objective, runs in runs_by_objective.items():
        stats = [mean_sd([run["metrics"].get(columns[group], math.nan) for run in runs])
                 for group in groups]
        values[objective] = [mean for mean, _ in stats]
        errors[objective] = [sd for _, sd in stats]
    seeds = len(next(iter(runs_by_objective.values())))
    bar_chart(os.path.join(out_dir, "bars.png"), f"final metrics, mean ± sd over {seeds} seed(s)",
              groups, values, errors, y_label="top-1 / recall")


def batch_study(args, clean_runs, columns, keys, equal_images=False):
    """Each objective at each --batch-sizes on every seed, beside the claims rows at the
    default batch: train.py's steps, or with `equal_images` the steps and warm-up that see
    the default run's images. -> ({batch: {objective: [runs]}}, markdown lines)."""
    reference = study_flags(args)
    by_batch = {reference.batch_size: clean_runs}
    for batch_size in args.batch_sizes:
        flags = ["--batch-size", str(batch_size)]
        if equal_images:
            scale = reference.batch_size / batch_size
            flags += ["--steps", str(round(reference.steps * scale)),
                      "--warmup", str(round(reference.warmup * scale))]
        suffix = "-images" if equal_images else ""
        by_batch[batch_size] = {
            objective: [run(args, f"{objective}-batch{batch_size}{suffix}-seed{seed}",
                            objective, seed, flags) for seed in args.seeds]
            for objective in OBJECTIVES}
    by_batch = dict(sorted(by_batch.items()))
    steps = {batch: round(reference.steps * reference.batch_size / batch) if equal_images
             else reference.steps for batch in by_batch}
    rows = [(f"{objective}, batch {batch}, {steps[batch]} steps", runs)
            for batch, runs_by_objective in by_batch.items()
            for objective, runs in runs_by_objective.items()]
    lines = [metrics_table(rows, columns), "", "| what | the numbers | verdict |",
             "| --- | --- | --- |"]
    lines += [f"| {what} | {numbers} | **{outcome}** |"
              for what, numbers, outcome in batch_verdicts(by_batch, reference.batch_size, keys)]
    return by_batch, lines


def changes(reference_runs, runs, keys):
    """Per seed, the score of `runs` minus the score of `reference_runs`."""
    return [score(r, keys) - score(c, keys) for c, r in zip(reference_runs, runs)]


def batch_verdicts(by_batch, reference_batch, keys=SYNTHETIC_KEYS):
    """The paper's argument that a contrastive objective needs a large batch and a
    non-contrastive term less so: at each batch beside the reference, whether the larger of
    the two batches gains CLIP more than it gains xCLIP (and nCLIP), on zero-shot and on the
    linear probe; CLIP's gain minus theirs, per seed, by the two-standard-error rule."""
    verdicts = []
    for batch in by_batch:
        if batch == reference_batch:
            continue
        small, large = sorted((batch, reference_batch))
        for name, of in (("zero-shot", keys[0]), ("linear probe", keys[1])):
            gain = {objective: changes(by_batch[small][objective], by_batch[large][objective], of)
                    for objective in OBJECTIVES}
            for objective in ("xclip", "nclip"):
                difference, standard_error, n = compare(gain["clip"], gain[objective])
                verdicts.append((
                    f"CLIP gains more than {objective} from batch {small} to {large}, {name}",
                    f"gain {statistics.fmean(gain[objective]):+.3f}, CLIP's "
                    f"{statistics.fmean(gain['clip']):+.3f}; CLIP's − {objective}'s "
                    f"{difference:+.3f} ± {2 * standard_error:.3f} (2 SE)",
                    verdict(difference, standard_error, n)))
    return verdicts


def draw_batches(out_dir, by_seen, keys=SYNTHETIC_KEYS):
    """batch.png: zero-shot and linear-probe score against the batch, at the same steps and
    at equal images seen, a line per objective (mean over seeds)."""
    panels = []
    for name, of in (("zero-shot", keys[0]), ("linear probe", keys[1])):
        for seen, by_batch in by_seen.items():
            series = {objective: (list(by_batch), [statistics.fmean(score(r, of)
                                                                    for r in runs[objective])
                                                   for runs in by_batch.values()])
                      for objective in OBJECTIVES}
            panels.append(Panel(f"{name} top-1 (mean of its sets), {seen}", "batch size",
                                series))
    line_panels(os.path.join(out_dir, "batch.png"), panels)


def prototype_study(args):
    """nCLIP and xCLIP (first seed) with K = ratio x the global batch prototypes, at each
    --prototype-batches; a batch above the rows' --batch-size is reached by --accum-freq.
    -> {(objective, batch): {ratio: run}}."""
    by_line, seed, reference = {}, args.seeds[0], study_flags(args)
    for batch in args.prototype_batches:
        accum = max(1, batch // reference.batch_size)
        flags = ["--batch-size", str(batch // accum), "--accum-freq", str(accum)]
        for ratio in args.prototype_ratios:
            prototypes = max(1, round(ratio * batch))
            for objective in NON_CONTRASTIVE:
                name = f"{objective}-K{prototypes}-batch{batch}-seed{seed}"
                by_line.setdefault((objective, batch), {})[ratio] = run(
                    args, name, objective, seed, flags + ["--num-prototypes", str(prototypes)])
    return by_line


def draw_prototypes(out_dir, by_line, keys=SYNTHETIC_KEYS):
    """prototypes.png: nCLIP's information, zero-shot and linear-probe score against K/B
    (log2), a line per objective and global batch."""
    panels = []
    for title, score_of in (("nCLIP information (nats)",
                             lambda r: r["metrics"].get("nclip/information", math.nan)),
                            ("zero-shot top-1 (mean of its sets)", lambda r: score(r, keys[0])),
                            ("linear probe top-1 (mean of its sets)", lambda r: score(r, keys[1]))):
        series = {f"{objective}, batch {batch}": ([math.log2(ratio) for ratio in runs],
                                                  [score_of(r) for r in runs.values()])
                  for (objective, batch), runs in by_line.items()}
        panels.append(Panel(title, "log2 K/B", series))
    line_panels(os.path.join(out_dir, "prototypes.png"), panels)


def noise_levels(args):
    """The caption-noise levels, the cleanest first (the claims rows): [(label, unrelated
    caption fraction, train.py's flags, run name part)]. On the built-in data NOISE_LEVELS;
    on --real-data its captions_unrelated_F.csv tables."""
    if not args.real_data:
        return [(f"unrelated {unrelated:g}, loose {loose:g}", unrelated,
                 ["--synthetic-unrelated-fraction", str(unrelated),
                  "--synthetic-loose-fraction", str(loose)], f"noise{unrelated:g}-{loose:g}")
                for unrelated, loose in NOISE_LEVELS]
    levels = [("unrelated 0", 0.0, [], None)]
    for path in sorted(glob.glob(os.path.join(args.real_data, "captions_unrelated_*.csv"))):
        unrelated = float(path.rsplit("_", 1)[1].removesuffix(".csv"))
        levels.append((f"unrelated {unrelated:g}", unrelated, ["--train-data", path],
                       f"unrelated{unrelated:g}"))
    return levels


def noise_study(args, clean_runs, columns=METRICS, keys=SYNTHETIC_KEYS):
    """Each objective on every seed at each noisier level of noise_levels, beside the
    claims rows at the first: -> ({label: {objective: [runs]}}, {label: unrelated fraction},
    markdown lines)."""
    levels = noise_levels(args)
    by_level = {levels[0][0]: clean_runs}
    for label, _, flags, part in levels[1:]:
        by_level[label] = {
            objective: [run(args, f"{objective}-{part}-seed{seed}", objective, seed, flags)
                        for seed in args.seeds]
            for objective in OBJECTIVES}
    rows = [(f"{objective}, {label}", runs) for label, runs_by_objective in by_level.items()
            for objective, runs in runs_by_objective.items()]
    lines = [metrics_table(rows, columns), "", "| what | the numbers | verdict |",
             "| --- | --- | --- |"]
    lines += [f"| {what} | {numbers} | **{outcome}** |"
              for what, numbers, outcome in noise_verdicts(by_level, keys)]
    return by_level, {label: unrelated for label, unrelated, _, _ in levels}, lines


def noise_verdicts(by_level, keys=SYNTHETIC_KEYS):
    """At each noisier level, whether xCLIP, and nCLIP, lose less than CLIP from the cleanest
    level, on zero-shot and on the linear probe: their drop minus CLIP's, by the
    two-standard-error rule. `by_level`: {label: {objective: runs}}, the cleanest first."""
    verdicts, clean = [], next(iter(by_level.values()))
    for label in list(by_level)[1:]:
        for name, of in (("zero-shot", keys[0]), ("linear probe", keys[1])):
            drop = {objective: changes(clean[objective], by_level[label][objective], of)
                    for objective in OBJECTIVES}
            for objective in ("xclip", "nclip"):
                difference, standard_error, n = compare(drop[objective], drop["clip"])
                verdicts.append((
                    f"{objective} loses less {name} than CLIP at {label}",
                    f"{objective} drop {statistics.fmean(drop[objective]):+.3f}, "
                    f"CLIP drop {statistics.fmean(drop['clip']):+.3f}; difference "
                    f"{difference:+.3f} ± {2 * standard_error:.3f} (2 SE)",
                    verdict(difference, standard_error, n)))
    return verdicts


def draw_noise(out_dir, by_level, unrelated, keys=SYNTHETIC_KEYS):
    """noise.png: zero-shot and linear-probe score against the unrelated-caption fraction
    (`unrelated`: {label: fraction}), a line per objective (mean over seeds)."""
    panels = []
    for title, of in (("zero-shot top-1 (mean of its sets)", keys[0]),
                      ("linear probe top-1 (mean of its sets)", keys[1])):
        series = {}
        for objective in OBJECTIVES:
            labels = sorted(by_level, key=unrelated.get)
            series[objective] = ([unrelated[label] for label in labels],
                                 [statistics.fmean(score(r, of)
                                                   for r in by_level[label][objective])
                                  for label in labels])
        panels.append(Panel(title, "unrelated caption fraction", series))
    line_panels(os.path.join(out_dir, "noise.png"), panels)


def claims_study(args):
    columns, keys = own_data_keys(args) if args.train_data else (METRICS, SYNTHETIC_KEYS)
    runs_by_objective = {objective: [run(args, f"{objective}-seed{seed}", objective, seed)
                                     for seed in args.seeds] for objective in OBJECTIVES}
    rows = [(objective, runs) for objective, runs in runs_by_objective.items()]
    text = [f"Seeds {' '.join(map(str, args.seeds))}; commands in results.json. "
            "Mean ± sd over seeds"
            + ("; chance is 1/6 for shape, 1/8 for color." if not args.train_data else "."), "",
            metrics_table(rows, columns), "", "| claim | the numbers | verdict |",
            "| --- | --- | --- |"]
    text += [f"| {claim} | {numbers} | **{outcome}** |"
             for claim, numbers, outcome in claim_verdicts(runs_by_objective, keys)]
    nclip_runs = runs_by_objective["nclip"] + runs_by_objective["xclip"]
    text += ["", "nCLIP at the end of each run (last log line):", "", collapse_table(nclip_runs)]
    extra_runs = []
    if args.noise:
        by_level, unrelated, lines = noise_study(args, runs_by_objective, columns, keys)
        text += ["", f"Caption noise (seeds {' '.join(map(str, args.seeds))}; the first level "
                 "is the rows above):", "", *lines]
        extra_runs += [r for runs in list(by_level.values())[1:] for rs in runs.values()
                       for r in rs]
        draw_noise(args.out_dir, by_level, unrelated, keys)
    if args.batch_sizes:
        by_seen = {}
        for equal_images in ((False, True) if args.equal_images else (False,)):
            seen = "equal images seen" if equal_images else "the same steps"
            by_batch, lines = batch_study(args, runs_by_objective, columns, keys, equal_images)
            text += ["", f"Batch size, {seen} (seeds {' '.join(map(str, args.seeds))}; "
                     f"batch {study_flags(args).batch_size} is the rows above):", "", *lines]
            extra_runs += [r for runs in by_batch.values() if runs is not runs_by_objective
                           for rs in runs.values() for r in rs]
            by_seen[seen] = by_batch
        draw_batches(args.out_dir, by_seen, keys)
    by_line = prototype_study(args) if args.prototype_ratios else {}
    if by_line:
        rows = [(f"{objective}, K/B {ratio:g} (K {round(ratio * batch)}, batch {batch})", [r])
                for (objective, batch), runs in by_line.items() for ratio, r in runs.items()]
        text += ["", f"Prototypes K against the global batch B (seed {args.seeds[0]}):", "",
                 metrics_table(rows, columns), "", collapse_table([rs[0] for _, rs in rows])]
        extra_runs += [rs[0] for _, rs in rows]
        draw_prototypes(args.out_dir, by_line, keys)
    all_runs = [r for runs in runs_by_objective.values() for r in runs] + extra_runs
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump([{k: v for k, v in r.items() if k != "log"} for r in all_runs], f, indent=1)
    with open(os.path.join(args.out_dir, "table.md"), "w") as f:
        f.write("\n".join(text) + "\n")
    draw_plots(args.out_dir, runs_by_objective, columns)
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
        if objective == "nclip" and flags in ("", PAPER_FORM_ROW):
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
