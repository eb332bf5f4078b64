"""train.py's flags, and what turns them into the objects a run is built from: the
parser (one flag per ModelConfig field, the recipe, the objective, the data, the run),
the checks argparse cannot make alone, and the model config they give.

    python train.py --help          # every flag, what it does and what to pick

tools/bench.py and the studies in experiments/ take the same flags from here.
"""
import argparse
import os
from dataclasses import fields, replace

from checkpoint import read_checkpoint, saved_model_config
from data import TOKENIZERS, existing_shards, is_caption_table
from distributed import default_workers
from eval import NAMED_CLASSNAMES
from faults import (OneLineErrorParser, UserError, below_one, device_name, fraction,
                    non_negative_float, non_negative_int, one_character, positive_float,
                    positive_int, seed)
from losses import REGULARIZERS
from model import OBJECTIVES, PRESETS, ModelConfig, model_config
from synthetic import COLORS, SHAPES

# The paper's form of nCLIP as flags: NCLIPLoss's defaults (tau_s 0.1, tau_t 0.04,
# lambda_me 1, no entropy term) and raw cosines for logits. At this scale it collapses.
PAPER_FORM = ("--no-center-prototype-logits", "--entropy-weight", "0", "--me-max-weight", "1",
              "--student-temp", "0.1", "--teacher-temp", "0.04")

# The flags that decide what a run computes besides the objective, the architecture and the
# global batch (which checkpoint.check_resumable compares itself): a run resumes only with
# its checkpoint's. Logging, evaluation, devices and workers change nothing it computes.
COMPUTATION_FLAGS = (
    "seed", "steps", "lr", "wd", "warmup", "beta1", "beta2", "eps", "grad_clip", "accum_freq",
    "nclip_weight", "me_max_weight", "entropy_weight", "student_temp", "teacher_temp",
    "regularizer", "center_momentum", "target_grad", "train_data", "train_num_samples",
    "csv_img_key", "csv_caption_key", "csv_separator", "shuffle_buffer", "min_crop_scale",
    "synthetic_loose_fraction", "synthetic_unrelated_fraction", "synthetic_heldout_pairs",
    "precision")


def add_model_flags(parser):
    """One flag per ModelConfig field; a flag not given keeps the preset's value."""
    model_flags = parser.add_argument_group("model fields (override the preset)")
    for f in fields(ModelConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            model_flags.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                     help=f.metadata["help"])
        elif f.type is str:
            model_flags.add_argument(flag, choices=tuple(TOKENIZERS), default=None,
                                     help=f.metadata["help"])
        else:
            model_flags.add_argument(flag, type=positive_int, default=None,
                                     help=f.metadata["help"])


def build_parser():
    p = OneLineErrorParser(description="Train CLIP, nCLIP or xCLIP (Zhou et al., CVPR 2023).")
    p.add_argument("--loss", choices=OBJECTIVES, default="xclip",
                   help="objective: clip (contrastive), nclip (non-contrastive), xclip (both)")
    p.add_argument("--model", choices=list(PRESETS), default="tiny",
                   help="architecture preset; tiny runs on a CPU, vit_b16 is the paper's")
    add_model_flags(p)
    p.add_argument("--batch-size", type=positive_int, default=128,
                   help="images per process; the global batch is this times the processes")
    p.add_argument("--accum-freq", type=positive_int, default=1,
                   help="micro-batches of --batch-size per optimizer step; the loss and gradient "
                        "are those of the whole batch (its negatives and ME-MAX included)")
    p.add_argument("--steps", type=positive_int, default=500, help="optimizer steps")
    p.add_argument("--lr", type=non_negative_float, default=2e-3,
                   help="peak learning rate, tuned for the tiny preset on the built-in data "
                        "(CLIP used 5e-4 for ViT-B/16)")
    p.add_argument("--wd", type=non_negative_float, default=0.2,
                   help="AdamW weight decay on weight matrices")
    p.add_argument("--warmup", type=non_negative_int, default=125,
                   help="linear warm-up steps before the cosine decay (a quarter of the default "
                        "run: at full --lr from the start, xCLIP's towers settle on color and "
                        "never learn shape; see experiments/README.md)")
    p.add_argument("--beta1", type=below_one, default=0.9, help="AdamW beta1, in [0, 1)")
    p.add_argument("--beta2", type=below_one, default=0.98, help="AdamW beta2, in [0, 1)")
    p.add_argument("--eps", type=positive_float, default=1e-6, help="AdamW epsilon")
    p.add_argument("--grad-clip", type=non_negative_float, default=1.0,
                   help="max gradient norm (0: off)")
    objective = p.add_argument_group("objective")
    objective.add_argument("--nclip-weight", type=non_negative_float, default=1.0,
                           help="lambda_n in L_xCLIP = L_CLIP + lambda_n L_nCLIP")
    objective.add_argument("--me-max-weight", type=non_negative_float, default=3.0,
                           help="lambda_me in L_nCLIP = L_pred + lambda_me L_me + lambda_ent "
                                "L_ent (the paper's: 1; 3 balances --entropy-weight, "
                                "see experiments/README.md)")
    objective.add_argument("--entropy-weight", type=non_negative_float, default=1.0,
                           help="lambda_ent: weight of the mean per-sample entropy mean_i H(p_i), "
                                "minimized (MSN, TWIST; not in the paper: 0 turns it off)")
    objective.add_argument("--student-temp", type=positive_float, default=0.05,
                           help="tau_s, temperature of the predictions p (the paper's: 0.1)")
    objective.add_argument("--teacher-temp", type=positive_float, default=0.02,
                           help="tau_t, temperature of the targets q; below tau_s it sharpens them "
                                "(the paper's: 0.04)")
    objective.add_argument("--regularizer", choices=REGULARIZERS, default="memax",
                           help="nCLIP anti-collapse: memax (the paper's mean-entropy "
                                "maximization), center (DINO's EMA center), sinkhorn (SwAV's "
                                "equipartition)")
    objective.add_argument("--center-momentum", type=fraction, default=0.9,
                           help="EMA momentum of the center for --regularizer center")
    objective.add_argument("--target-grad", action="store_true",
                           help="let gradient flow through the targets q (ablation; the paper "
                                "stops it)")
    objective.add_argument("--local-loss", action="store_true",
                           help="CLIP: score local rows against the global batch only (same "
                                "gradient, less memory)")
    data = p.add_argument_group("data")
    data.add_argument("--train-data", default="synthetic",
                      help="'synthetic' (built-in), a .csv/.tsv/.jsonl caption table, or "
                           "webdataset tar shards as img2dataset writes them, e.g. "
                           "'/data/cc3m/{00000..00331}.tar'")
    data.add_argument("--train-num-samples", type=positive_int, default=None,
                      help="samples in one epoch of tar shards (needed for them; sets where "
                           "--resume restarts)")
    data.add_argument("--csv-img-key", default="filepath",
                      help="caption table column with the image path")
    data.add_argument("--csv-caption-key", default="title",
                      help="caption table column with the caption")
    data.add_argument("--csv-separator", type=one_character, default=None,
                      help="caption table separator (default: tab for .tsv, else comma)")
    data.add_argument("--val-data", default=None,
                      help="held-out pairs, a caption table (.csv/.tsv/.jsonl) or tar shards "
                           "(e.g. CC3M's validation split): at --val-every, the validation "
                           "loss and both retrieval recalls, logged under the keys of eval.py "
                           "retrieval (open_clip's --val-data)")
    data.add_argument("--shuffle-buffer", type=positive_int, default=1000,
                      help="tar shards: samples held per loader worker to shuffle within")
    data.add_argument("--synthetic-loose-fraction", type=fraction, default=0.15,
                      help="synthetic captions that describe only part of the image")
    data.add_argument("--synthetic-unrelated-fraction", type=fraction, default=0.05,
                      help="synthetic captions of another image")
    data.add_argument("--synthetic-heldout-pairs", type=non_negative_int, default=4,
                      help="(color, shape) pairs never shown in training, for compositional "
                           "zero-shot")
    data.add_argument("--min-crop-scale", type=fraction, default=None,
                      help="smallest area fraction of the random resized crop (default: 0.5, as "
                           "CLIP recipes use on photos; 0.8 on the synthetic data, whose objects "
                           "sit near edges)")
    data.add_argument("--workers", type=non_negative_int, default=default_workers(),
                      help="data-loader processes per rank (default: the CPUs this process "
                           "may use, shared among the node's ranks, less one for each rank; "
                           "at most 16; here %(default)s)")
    run = p.add_argument_group("run")
    run.add_argument("--out-dir", default="out",
                     help="checkpoints, log.jsonl and final_metrics.json go here")
    run.add_argument("--init-from", default=None, metavar="CKPT",
                     help="start from this checkpoint's weights (train.py's, or CLIP weights "
                          "brought in by interop.py import) at step 0 with a fresh optimizer; "
                          "its architecture replaces --model's; what it lacks (a CLIP "
                          "checkpoint's nCLIP heads) starts fresh, and is printed")
    run.add_argument("--resume", default=None,
                     help="checkpoint to continue from; 'latest': OUT_DIR/ckpt.pt if there is "
                          "one, else start fresh (resubmit a preempted job unchanged)")
    run.add_argument("--plot", metavar="OUT_DIR", default=None,
                     help="only draw OUT_DIR/curves.png from OUT_DIR/log.jsonl (a finished or "
                          "running run), then exit")
    run.add_argument("--seed", type=seed, default=0,
                     help="seed for initialization and data, in [0, 2**32)")
    run.add_argument("--device", type=device_name, default=None,
                     help="cuda, cuda:N or cpu (default: cuda when available)")
    run.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                     help="bf16 autocast or fp32; auto picks bf16 on GPU, fp32 on CPU")
    run.add_argument("--compile", action="store_true", help="torch.compile the model")
    run.add_argument("--dist-timeout", type=positive_int, default=60,
                     help="minutes a rank waits for the others at a collective before the run "
                          "fails (rank 0's --val-every evaluation included)")
    run.add_argument("--grad-checkpointing", action="store_true",
                     help="recompute transformer blocks in backward: less memory, more time")
    run.add_argument("--on-nonfinite", choices=("stop", "skip"), default="stop",
                     help="a NaN or infinite loss or gradient: stop at the next log line without "
                          "saving it (default), or skip that step's update and count it")
    run.add_argument("--log-every", type=positive_int, default=10, help="steps between log lines")
    run.add_argument("--save-every", type=positive_int, default=100,
                     help="steps between checkpoints (each replaces the last): what a crash "
                          "can cost")
    run.add_argument("--keep-every", type=non_negative_int, default=0,
                     help="steps between checkpoints kept as OUT_DIR/ckpt_<step>.pt beside the "
                          "rolling ckpt.pt (0: keep none)")
    run.add_argument("--save-optimizer", action=argparse.BooleanOptionalAction, default=True,
                     help="write the AdamW state with the weights (needed to --resume; "
                          "--no-save-optimizer writes a third of the bytes)")
    run.add_argument("--val-samples", type=positive_int, default=1000,
                     help="synthetic val images per eval task")
    run.add_argument("--val-every", type=non_negative_int, default=0,
                     help="steps between zero-shot evaluations during training (on the built-in "
                          "val data, or --zeroshot-data), logged to log.jsonl under "
                          "final_metrics.json's keys (0: off)")
    run.add_argument("--val-probe", action="store_true",
                     help="with --val-every on the built-in data: retrieval and the linear "
                          "probes too (slower)")
    run.add_argument("--zeroshot-data", default=None,
                     help="ImageNet-style folder DATA/<class>/<image> for --val-every "
                          "(open_clip's --imagenet-val)")
    run.add_argument("--classnames", default=None,
                     help="class names for --zeroshot-data, as eval.py zeroshot takes them: "
                          "'imagenet' for ImageNet's (folders named by WordNet id or class "
                          "index), or a file of names (default: the folder names)")
    return p


def model_config_from_args(args):
    """The --model preset, or --init-from's architecture, with every model-field flag
    that was given; a UserError for an architecture that cannot be built."""
    overrides = {f.name: getattr(args, f.name) for f in fields(ModelConfig)}
    given = {name: value for name, value in overrides.items() if value is not None}
    try:
        if getattr(args, "init_from", None):  # experiments/tower_probe.py has no --init-from
            checkpoint = read_checkpoint(args.init_from)
            return replace(saved_model_config(checkpoint, args.init_from), **given)
        return model_config(args.model, **given)
    except ValueError as error:  # ModelConfig.problem
        raise UserError(str(error)) from None


def check_flags(args):
    """What argparse types cannot see alone: files, flags that go together, head counts,
    held-out pairs. -> the first problem, as a one-line message, or None."""
    if args.val_every and args.train_data != "synthetic" and not (args.zeroshot_data
                                                                    or args.val_data):
        return ("--val-every evaluates on the built-in val data, which goes with --train-data "
                "synthetic; pass --zeroshot-data FOLDER or --val-data TABLE to evaluate on "
                "your own data")
    if os.path.isdir(args.train_data):
        return (f"--train-data {args.train_data} is a folder: it takes 'synthetic', a "
                ".csv/.tsv/.jsonl caption table of image paths and captions, or tar shards")
    if args.val_data and is_caption_table(args.val_data) and not os.path.isfile(args.val_data):
        return f"--val-data {args.val_data}: no such file"
    if args.val_data and not is_caption_table(args.val_data):
        existing_shards(args.val_data, f"--val-data {args.val_data} (a caption table or tar "
                                       "shards)")
    if args.val_data and not args.val_every:
        return "--val-data is scored at --val-every steps; pass --val-every N"
    if args.init_from and args.resume:
        return ("--init-from starts a new run from a checkpoint's weights, --resume continues "
                "one; pass one of them")
    if args.init_from and not os.path.isfile(args.init_from):
        return f"--init-from {args.init_from}: no such checkpoint"
    if args.val_probe and (args.zeroshot_data or args.val_data or not args.val_every):
        return ("--val-probe adds the built-in data's probes to --val-every; it needs "
                "--val-every and no --zeroshot-data or --val-data")
    if args.classnames and not args.zeroshot_data:
        return "--classnames names the classes of --zeroshot-data; pass that folder too"
    if args.zeroshot_data and not os.path.isdir(args.zeroshot_data):
        return f"--zeroshot-data {args.zeroshot_data}: no such folder"
    if args.classnames not in (None, *NAMED_CLASSNAMES) and not os.path.isfile(args.classnames):
        return f"--classnames {args.classnames}: no such file"
    if args.resume and args.resume != "latest" and not os.path.isfile(args.resume):
        return f"--resume {args.resume}: no such checkpoint"
    pairs = len(COLORS) * len(SHAPES)
    if args.synthetic_heldout_pairs >= pairs:
        return (f"--synthetic-heldout-pairs {args.synthetic_heldout_pairs}: there are {pairs} "
                f"(color, shape) pairs and training needs at least one; pass at most {pairs - 1}")
    try:
        model_config_from_args(args)
    except UserError as error:
        return str(error)
    return None


def resume_path(args):
    """The checkpoint --resume names; for 'latest', OUT_DIR/ckpt.pt if there is one."""
    if args.resume == "latest":
        latest = os.path.join(args.out_dir, "ckpt.pt")
        return latest if os.path.isfile(latest) else None
    return args.resume

