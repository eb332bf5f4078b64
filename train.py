"""Train CLIP, nCLIP or xCLIP.

    python train.py                                   # xCLIP, tiny model, built-in data, CPU
    torchrun --nproc_per_node=8 train.py --model vit_b16 --loss xclip ...

Settings at the top (the flags), then the setup (DDP from the torchrun environment, data,
model), the step (forward under autocast, loss, backward, clip, AdamW), and one plain loop
that reads top to bottom: schedule, batch, step, log, evaluate, save, stop. Evaluation
runs on rank 0; checkpoints are checkpoint.py's, one-line errors and signals faults.py's.
"""
import argparse
import gc
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from datetime import timedelta
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Subset
from tqdm import tqdm

from checkpoint import (CheckpointWriter, check_resumable, initialize_from, read_checkpoint,
                        restore_checkpoint)
from data import (RANKS, SKIP_REASONS, CaptionTableDataset, EvalTransform, ResumableSampler,
                  TOKENIZERS, TarShardStream, TrainTransform, existing_shards, held_out_pairs,
                  is_caption_table, make_loader, normalize, stream_seed,
                  tokenizer_for)
from distributed import all_reduce_sum
from eval import (HEADLINE_METRICS, NAMED_CLASSNAMES, caption_retrieval, dataset_name,
                  folder_zero_shot, synthetic_evaluation, synthetic_zero_shot)
from faults import (DataError, NonFiniteLoss, OneLineErrorParser, StopRequest, StopRequested,
                    below_one, device_name, fail, fraction, non_negative_float,
                    non_negative_int, one_character, positive_float, positive_int, seed,
                    take_out_dir, user_message, writing)
from losses import REGULARIZERS, Objective
from model import (OBJECTIVES, PRESETS, ModelConfig, TwoTowerModel, TwoTowerOutput,
                   autocast_context, default_device, model_config)
from plots import Panel, line_panels
from synthetic import COLORS, SHAPES, INDICES, SyntheticCaptions


# ----------------------------------------------------------------------------------------- flags

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
                                "L_ent (the paper form: 1; 3 balances --entropy-weight, "
                                "see experiments/README.md)")
    objective.add_argument("--entropy-weight", type=non_negative_float, default=1.0,
                           help="lambda_ent: weight of the mean per-sample entropy mean_i H(p_i), "
                                "minimized (MSN, TWIST; not in the paper: 0 turns it off)")
    objective.add_argument("--student-temp", type=positive_float, default=0.05,
                           help="tau_s, temperature of the predictions p (the paper form: 0.1)")
    objective.add_argument("--teacher-temp", type=positive_float, default=0.02,
                           help="tau_t, temperature of the targets q; below tau_s it sharpens them "
                                "(the paper form: 0.04)")
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
    data.add_argument("--workers", type=non_negative_int, default=None,
                      help="data-loader processes per rank (default: the CPUs this process "
                           "may use, shared among the node's ranks, less one for each rank; "
                           "at most 16)")
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
                     help="class names for --zeroshot-data, one per line in sorted folder "
                          "order; 'imagenet' for ImageNet's (default: the folder names)")
    return p


def model_config_from_args(args):
    """The --model preset, or --init-from's architecture, with every model-field flag
    that was given."""
    overrides = {f.name: getattr(args, f.name) for f in fields(ModelConfig)}
    if getattr(args, "init_from", None):  # experiments/tower_probe.py has no --init-from
        saved = ModelConfig(**read_checkpoint(args.init_from)["model_config"])
        return replace(saved, **{k: v for k, v in overrides.items() if v is not None})
    return model_config(args.model, **overrides)


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
    return model_config_problem(model_config_from_args(args))


def model_config_problem(config):
    """What makes this architecture unbuildable, as a one-line message; None if nothing."""
    for tower in ("vision", "text"):
        width, heads = getattr(config, f"{tower}_width"), getattr(config, f"{tower}_heads")
        if width % heads:
            return f"--{tower}-width {width} is not a multiple of --{tower}-heads {heads}"
    if config.context_length < 2:
        return (f"--context-length {config.context_length} leaves no room for a word beside "
                "the end-of-text token; pass at least 2 (CLIP: 77)")
    if config.image_size < config.patch_size:
        return f"--image-size {config.image_size} is smaller than --patch-size {config.patch_size}"
    if config.conv_stem and (config.patch_size & (config.patch_size - 1)
                             or config.image_size % config.patch_size):
        return (f"--conv-stem needs a power-of-2 --patch-size that divides --image-size; got "
                f"--patch-size {config.patch_size}, --image-size {config.image_size}")
    if config.conv_stem and config.vision_width < config.patch_size // 2:
        return (f"--conv-stem halves --vision-width once per stride-2 convolution: it needs at "
                f"least {config.patch_size // 2} for --patch-size {config.patch_size}")
    return None


# ----------------------------------------------------------------------------------------- setup

def setup_distributed(device_arg, timeout_minutes=60):
    """(rank, world_size, device) from the torchrun environment, or a single process."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device = process_device(device_arg, int(os.environ.get("LOCAL_RANK", 0)), world_size)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # --precision fp32 on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    if world_size > 1:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                timeout=timedelta(minutes=timeout_minutes))
    return rank, world_size, device


def process_device(device_arg, local_rank=0, world_size=1):
    """--device (default: cuda where there is one); a GPU is the one of LOCAL_RANK, so that
    each rank of torchrun has its own."""
    device = device_arg or default_device()
    if device == "cuda":
        return f"cuda:{local_rank}"
    if device.startswith("cuda") and world_size > 1:
        raise DataError(f"--device {device} under torchrun: each rank takes the GPU of its "
                        "LOCAL_RANK; pass --device cuda")
    return device


def default_workers():
    """The --workers default: this process's CPUs shared among the node's ranks, less one
    for each rank itself; at least 1, at most 16."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, min(16, cpus // ranks_here - 1))


def build_train_loader(args, tokenizer, image_size, rank=0, world_size=1, *, start_sample=0):
    """The training loader for train.py's flags (`args`): the built-in synthetic data,
    a CSV/TSV/JSONL caption table, or webdataset tar shards; from global sample
    `start_sample` on, for a resumed run."""
    min_crop_scale = args.min_crop_scale or (0.8 if args.train_data == "synthetic" else 0.5)
    transform = TrainTransform(image_size, scale=(min_crop_scale, 1.0))
    batch_size = args.batch_size * args.accum_freq  # this rank's samples per optimizer step
    sampler = None
    if args.train_data == "synthetic":
        dataset = SyntheticCaptions(
            "train", INDICES, args.seed, image_size, transform, tokenizer,
            args.synthetic_loose_fraction, args.synthetic_unrelated_fraction,
            args.synthetic_heldout_pairs)
        sampler = ResumableSampler(None, batch_size, rank, world_size, start_sample,
                                   args.seed, finite=False)
    elif args.train_data.endswith((".csv", ".tsv", ".jsonl")):
        dataset = CaptionTableDataset(args.train_data, transform, tokenizer, args.csv_img_key,
                                      args.csv_caption_key, args.csv_separator, args.seed)
        refuse_smaller_than_batch(args.train_data, len(dataset), "rows", batch_size * world_size)
        sampler = ResumableSampler(len(dataset), batch_size, rank, world_size, start_sample,
                                   args.seed)
    else:
        shards = existing_shards(args.train_data, "--train-data")
        if not args.train_num_samples:
            raise DataError("--train-num-samples is needed with tar shards: the samples in one "
                            "epoch")
        refuse_smaller_than_batch("--train-num-samples", args.train_num_samples, "samples",
                                  batch_size * world_size)
        epoch, position = divmod(start_sample, args.train_num_samples)
        dataset = TarShardStream(shards, transform, tokenizer, rank, world_size, args.seed,
                                 args.shuffle_buffer, epoch, position / args.train_num_samples)
    return make_loader(dataset, batch_size, sampler, args.workers,
                       pin_memory=torch.cuda.is_available())


def refuse_smaller_than_batch(source, count, unit, global_batch):
    """A batch larger than its data holds some pairs twice, and each copy is scored as a
    negative of the other: refused."""
    if count < global_batch:
        raise DataError(f"{source}: {count} {unit}, fewer than the global batch of "
                        f"{global_batch} (--batch-size x --accum-freq x processes); each batch "
                        "would hold pairs twice, their copies each other's negatives")


@dataclass
class Trainee:
    """What a training step updates: the model, the module the step calls (the model, or
    its DDP and/or compiled wrapper), the objective and the optimizer, and how it steps."""
    model: TwoTowerModel
    train_model: Any
    objective: Objective
    optimizer: torch.optim.Optimizer
    autocast: Any
    grad_clip: float
    compiled: bool = False

    def forward(self, images, tokens):
        """train_model's output, prototype cosines not yet centered (see forward_backward).
        A compiled model sees the text length as dynamic: one graph for every length."""
        if self.compiled and tokens.shape[1] > 1:
            torch._dynamo.mark_dynamic(tokens, 1)
        return self.train_model(images, tokens, raw_cosines=True)


def build_trainee(args, device, world_size=1):
    """Model, objective (with its state: DINO's centers) and optimizer for train.py's
    flags, the same initial weights on every rank, wrapped for DDP and --compile."""
    torch.manual_seed(args.seed)
    config = model_config_from_args(args)
    model = TwoTowerModel(config, args.loss, args.student_temp).to(device)
    if args.init_from:
        fresh, unused = initialize_from(read_checkpoint(args.init_from), args.init_from, model)
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"weights from {args.init_from}" + (f"; fresh: {', '.join(fresh)}" if fresh
                  else "") + (f"; not used: {', '.join(unused)}" if unused else ""), flush=True)
    objective = Objective(
        args.loss, config.num_prototypes, nclip_weight=args.nclip_weight,
        local_loss=args.local_loss, student_temp=args.student_temp,
        teacher_temp=args.teacher_temp, me_max_weight=args.me_max_weight,
        entropy_weight=args.entropy_weight, regularizer=args.regularizer,
        center_momentum=args.center_momentum, target_grad=args.target_grad).to(device)
    if args.grad_checkpointing:
        model.enable_grad_checkpointing()
    optimizer = model.configure_optimizers(args.lr, args.wd, (args.beta1, args.beta2), args.eps)
    train_model = distributed_model(model) if world_size > 1 else model
    if args.compile:
        train_model = torch.compile(train_model)
    return Trainee(model, train_model, objective, optimizer,
                   autocast_context(device, args.precision), args.grad_clip, args.compile)


def distributed_model(model):
    """DDP as the step needs it. No buffer broadcast at each forward: the only buffers,
    the heads' running centers, move by global means, the same on every rank. Gradients
    are views of DDP's all-reduce buckets, not copies."""
    return DistributedDataParallel(model, broadcast_buffers=False, gradient_as_bucket_view=True)


def resume(args, trainee):
    """Load --resume into `trainee` after checking it matches the flags. -> (its step,
    its bad-sample counts); (0, {}) for a fresh start."""
    if not args.resume:
        return 0, {}
    checkpoint = read_checkpoint(args.resume)
    check_resumable(checkpoint, args.resume, args.loss, model_config_from_args(args),
                    args.global_batch)
    return restore_checkpoint(checkpoint, trainee), checkpoint["skipped"]


# -------------------------------------------------------------------------------------- the step

def learning_rate(step, peak, warmup, steps):
    """Linear warm-up to `peak`, then cosine decay to 0 at `steps`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def forward_backward(trainee, images, tokens, accum_freq=1):
    """The loss of the batch and its gradient, accumulated in the parameters' .grad.

    With accum_freq K the batch goes through in K micro-batches and the result is the
    whole batch's, as open_clip accumulates: a no-grad pass caches every micro-batch's
    outputs, then each micro-batch is recomputed with gradient and scored together with
    the cached rest, so that CLIP keeps all its negatives and nCLIP's centering and
    ME-MAX see the whole batch. -> (loss, metrics)"""
    # The prototype cosines are centered over the batch outside the module the step calls:
    # its compiled graph then holds no collective.
    if accum_freq == 1:
        with trainee.autocast:
            out = trainee.forward(images, tokens)
            loss, metrics = trainee.objective(trainee.model.center_cosines(out))
        loss.backward()
        return loss, metrics
    micro_batches = list(zip(images.chunk(accum_freq), tokens.chunk(accum_freq)))
    with torch.no_grad(), trainee.autocast:
        cached = [trainee.forward(i, t) for i, t in micro_batches]
    for j, (micro_images, micro_tokens) in enumerate(micro_batches):
        last = j == accum_freq - 1
        trainee.objective.train(last)  # state (DINO's center) moves once, after its last use
        with gradient_sync(trainee.train_model, last):
            with trainee.autocast:
                fresh = trainee.forward(micro_images, micro_tokens)
                whole = concatenate_outputs(cached[:j] + [fresh] + cached[j + 1:], fresh,
                                            accum_freq)
                whole = trainee.model.center_cosines(whole, update_running_center=last)
                loss, metrics = trainee.objective(whole)
            loss.backward()
    return loss, metrics


def gradient_sync(train_model, now):
    """DDP all-reduces the gradients in the last micro-batch's backward only: the others
    run under its no_sync() and add into the local gradients."""
    no_sync = getattr(train_model, "no_sync", None)
    return nullcontext() if now or no_sync is None else no_sync()


def concatenate_outputs(outputs, fresh, accum_freq):
    """One TwoTowerOutput of the micro-batches' rows, in order. The logit scale scores
    every row, cached ones too: each of the K recomputations passes back 1/K of its
    gradient, so that they add up to the whole batch's."""
    whole = TwoTowerOutput()
    for field in fields(TwoTowerOutput):
        values = [getattr(out, field.name) for out in outputs]
        if field.name == "logit_scale" and fresh.logit_scale is not None:
            scale = fresh.logit_scale
            setattr(whole, field.name, scale.detach() + (scale - scale.detach()) / accum_freq)
        elif values[0] is not None:
            setattr(whole, field.name, torch.cat(values))
    return whole


def batch_to_device(images, tokens, tokenizer, device):
    """The batch on `device`: the uint8 images normalized there, the text cut after the
    batch's longest caption (the same features, less to compute). Both copies are of
    whole pinned tensors, so they overlap with the step before."""
    length = tokenizer.padded_length(tokens)  # on the host: no wait for the device
    images = normalize(images.to(device, non_blocking=True))
    return images, tokens.to(device, non_blocking=True)[:, :length]


def train_step(trainee, images, tokens, on_nonfinite="stop", accum_freq=1):
    """Forward under autocast, loss, backward, clip, AdamW step, clamp the logit scale.
    Nothing here waits for the device: the metrics stay tensors until a log line reads
    them, and a non-finite loss or gradient is counted, then acted on at that line;
    with on_nonfinite="skip" the step checks it at once (a sync) and skips the update.
    -> {"loss", "grad_norm", "nonfinite", and the objective's metrics}"""
    if on_nonfinite == "skip":  # the centers' EMAs, to put back if the step is skipped
        buffers = [*trainee.model.buffers(), *trainee.objective.buffers()]
        buffers_before = [buffer.clone() for buffer in buffers]
    loss, metrics = forward_backward(trainee, images, tokens, accum_freq)
    max_norm = trainee.grad_clip or float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(trainee.model.parameters(), max_norm)
    nonfinite = ~(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm))
    if on_nonfinite != "skip" or not nonfinite.item():
        trainee.optimizer.step()
    else:  # a skipped step leaves everything as it was, the centers' EMAs included
        for buffer, before in zip(buffers, buffers_before):
            buffer.copy_(before)
    trainee.optimizer.zero_grad(set_to_none=True)
    trainee.model.clamp_logit_scale()
    return {"loss": loss.detach(), "grad_norm": grad_norm, "nonfinite": nonfinite.float(),
            **metrics}


# -------------------------------------------------------------------------------------- logging

class TrainingLog:
    """Sums the step metrics on the device between log lines; a log line averages them
    over its steps and over ranks in one all-reduce (the loop's only host sync), adds
    the heads' norms and the skip counts, and on rank 0 appends it to log.jsonl and
    shows it on the progress bar. The all-reduce also agrees across ranks on stopping."""

    BAR_KEYS = ("loss", "lr", "logit_scale", "nclip/image_perplexity", "nclip/information",
                "nclip/same_prototype")

    def __init__(self, path, global_batch, world_size, device, bar, *, is_main=True,
                 start_step=0, skip_counts=None, on_nonfinite="stop"):
        self.path, self.global_batch = path, global_batch
        self.on_nonfinite = on_nonfinite
        self.world_size, self.device = world_size, device
        self.is_main, self.bar = is_main, bar
        self.sums, self.steps, self.started = {}, 0, time.time()
        self.skipped = torch.zeros(len(SKIP_REASONS), dtype=torch.long)  # by this process
        self.skipped_at_last_line = self.skipped.clone()
        self.skip_offsets = dict(skip_counts or {})  # counted before a resume
        self.last = dict(self.skip_offsets)
        self.zero_shot_top1 = None  # the last evaluation's first top-1, for the bar
        if is_main and os.path.isfile(path):
            self.keep_lines_up_to(start_step)

    def keep_lines_up_to(self, step):
        """A run logs again what came after the step it starts from: drop those lines (on a
        fresh start, all of a former run's)."""
        with open(self.path) as f:
            lines = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with writing(self.path), open(self.path, "w") as f:
            f.writelines(lines)

    def add(self, step_metrics, skipped):
        """One step's metrics, and the bad samples its batch passed over (by SKIP_REASONS)."""
        self.sums = {k: self.sums.get(k, 0) + v for k, v in step_metrics.items()}
        self.steps += 1
        self.skipped += skipped.sum(dim=0)

    def write(self, step, lr, extra, stop_requested=False):
        """One log line. A non-finite step since the last line stops the run here, after
        the line is written (unless --on-nonfinite skip). -> whether some rank was asked
        to stop."""
        nonfinite_steps = self.sums.get("nonfinite", 0)  # on this rank
        averaged = {k: v / self.steps for k, v in self.sums.items()}
        stop = torch.tensor(float(stop_requested), device=self.device)
        # skip counts are summed over ranks: a mean times the number of ranks
        skips = {f"skipped/{reason}": count.to(self.device) * self.world_size
                 for reason, count in zip(SKIP_REASONS, self.skipped)}
        line = self.reduce({**averaged, **extra, "stop": stop, **skips})
        for key, count in self.skip_offsets.items():
            line[key] = line.get(key, 0) + count
        now = time.time()
        samples = self.steps * self.global_batch
        line.update(step=step, lr=lr, samples_per_second=samples / (now - self.started))
        self.sums, self.steps, self.started = {}, 0, now
        self.skipped_at_last_line = self.skipped.clone()
        stopping = line.pop("stop") > 0
        self.last = line
        if self.is_main:
            self.show(line)
            self.append(line)
        if line.get("nonfinite", 0) > 0 and self.on_nonfinite == "stop":
            raise NonFiniteLoss(f"the loss or gradient norm was not finite in "
                                f"{nonfinite_steps:.0f} step(s) up to step {step} (see "
                                f"log.jsonl); the last checkpoint is untouched. Try a lower "
                                f"--lr, or --on-nonfinite skip")
        return stopping

    def reduce(self, metrics):
        values = torch.stack([v.float() for v in metrics.values()])
        if self.world_size > 1:
            dist.all_reduce(values)
            values /= self.world_size
        return dict(zip(metrics, values.tolist()))

    def show(self, line):
        shown = {k.split("/")[-1]: f"{line[k]:.3g}" for k in self.BAR_KEYS if k in line}
        shown["skipped"] = int(sum(line[f"skipped/{reason}"] for reason in SKIP_REASONS))
        if self.zero_shot_top1 is not None:
            shown["zeroshot"] = f"{self.zero_shot_top1:.3f}"
        self.bar.set_postfix(shown)

    def append(self, line):
        with writing(self.path), open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")

    def skip_counts(self):
        """The bad samples counted up to the last log line, and this rank's since then
        (a stop while waiting for data comes between log lines)."""
        counts = {k: v for k, v in self.last.items() if k.startswith("skipped/")}
        since = self.skipped - self.skipped_at_last_line
        for reason, count in zip(SKIP_REASONS, since.tolist()):
            counts[f"skipped/{reason}"] = counts.get(f"skipped/{reason}", 0) + count
        return {k: int(round(v)) for k, v in counts.items()}

    def saw_nonfinite(self):
        """Whether a step since the last log line had a non-finite loss or gradient and
        updated the weights with it (a host sync: only called before saving)."""
        return self.on_nonfinite == "stop" and bool(self.sums.get("nonfinite", 0) > 0)


CURVES = (  # (panel title, log keys): what curves.png shows, where the log has it
    ("loss", ("loss", "clip/loss", "nclip/loss")),
    ("learning rate", ("lr",)),
    ("logit scale", ("logit_scale",)),
    ("nCLIP information (nats)", ("nclip/information",)),
    ("nCLIP same prototype", ("nclip/same_prototype",)),
    ("nCLIP prototype perplexity", ("nclip/image_perplexity", "nclip/text_perplexity")),
    ("zero-shot top-1 (val)", ("zeroshot/shape/top1", "zeroshot/color/top1")),
)


def plot_training_curves(out_dir):
    """OUT_DIR/curves.png from OUT_DIR/log.jsonl: loss, learning rate, logit scale, the
    nCLIP collapse monitors and the --val-every zero-shot curve, where logged."""
    log_path = os.path.join(out_dir, "log.jsonl")
    if not os.path.isfile(log_path):
        raise DataError(f"--plot {out_dir}: no log.jsonl there")
    with open(log_path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    panels = []
    for title, keys in CURVES:
        series = {}
        for key in keys:
            points = [(line["step"], line[key]) for line in lines if key in line]
            if points:
                series[key] = tuple(zip(*points))
        if series:
            panels.append(Panel(title, "step", series))
    path = os.path.join(out_dir, "curves.png")
    with writing(path):
        line_panels(path, panels, columns=3, panel_size=(400, 280))
    return path


# ----------------------------------------------------------------------------------- evaluation

def evaluate_during_training(trainee, tokenizer, args, log, step):
    """The --val-data loss on every rank; then on rank 0, while the others wait,
    retrieval on --val-data and zero-shot on --zeroshot-data, or the built-in val data's
    zero-shot (with --val-probe all of its tasks); logged under the keys eval.py and
    final_metrics.json use. It draws no random numbers from the training's generators
    and leaves the model in training mode."""
    metrics = validation_loss(trainee, tokenizer, args, log.device) if args.val_data else {}
    if log.is_main:
        cuda_devices = [log.device] if log.device.startswith("cuda") else []
        with torch.random.fork_rng(devices=cuda_devices):
            metrics.update(validation_metrics(trainee.model, tokenizer, args, log.device))
        trainee.model.train()
        log.zero_shot_top1 = next((v for k, v in metrics.items() if k.endswith("/top1")), None)
        log.append({"step": step, **metrics})
    if dist.is_initialized():
        dist.barrier()


def validation_metrics(model, tokenizer, args, device):
    metrics = {}
    if args.val_data:
        recall = caption_retrieval(model, tokenizer, args.val_data, device,
                                   image_key=args.csv_img_key, caption_key=args.csv_caption_key,
                                   separator=args.csv_separator, workers=args.workers)
        name = dataset_name(args.val_data)
        metrics.update({f"retrieval/{name}/{key}": value for key, value in recall.items()})
    if args.zeroshot_data:
        accuracy = folder_zero_shot(model, tokenizer, args.zeroshot_data, device,
                                    classnames_file=args.classnames, workers=args.workers)
        name = dataset_name(args.zeroshot_data)
        metrics.update({f"zeroshot/{name}/{key}": value for key, value in accuracy.items()})
    if metrics:
        return metrics
    score = synthetic_evaluation if args.val_probe else synthetic_zero_shot
    return score(model, tokenizer, device, num_samples=args.val_samples, seed=args.seed,
                 num_heldout_pairs=args.synthetic_heldout_pairs)


@torch.no_grad()
def validation_loss(trainee, tokenizer, args, device):
    """The objective on --val-data's pairs in global batches of --batch-size x processes,
    each rank scoring its slice of each, as in training; the model in evaluation mode
    (nCLIP centers with its running center), the objective's state left as it is, the
    last partial batch left out. -> {"val/<name>/loss": the mean over batches}"""
    model, objective = trainee.model, trainee.objective
    pairs, load, _ = held_out_pairs(args.val_data, args.csv_img_key, args.csv_caption_key,
                                    args.csv_separator)
    dataset = CaptionTableDataset(args.val_data, EvalTransform(model.config.image_size),
                                  tokenizer, seed=args.seed, pairs=pairs, load=load)
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    global_batch = args.batch_size * world_size
    batches = len(dataset) // global_batch
    if batches == 0:
        raise DataError(f"--val-data {args.val_data}: {len(dataset)} pairs, fewer than one "
                        f"global batch of {global_batch}; pass a smaller --batch-size")
    mine = [b * global_batch + rank * args.batch_size + i
            for b in range(batches) for i in range(args.batch_size)]
    loader = make_loader(Subset(dataset, mine), args.batch_size, workers=args.workers)
    model.eval()
    objective.eval()
    total = torch.zeros((), device=device)
    for images, tokens, _ in loader:
        images, tokens = batch_to_device(images, tokens, tokenizer, device)
        with trainee.autocast:
            loss, _ = objective(model(images, tokens))
        total += loss.detach().float()
    model.train()
    objective.train()
    total = all_reduce_sum(total) / world_size  # each rank's loss is of its rows of the batch
    return {f"val/{dataset_name(args.val_data)}/loss": total.item() / batches}


def final_evaluation(model, tokenizer, args, device, log):
    """All three tasks on the built-in val data (rank 0), written to final_metrics.json
    with the skip counts; the headline numbers printed."""
    metrics = log.skip_counts()
    counts = ", ".join(f"{k.split('/')[1]} {v}" for k, v in metrics.items())
    print(f"bad samples skipped: {counts}")
    if args.train_data == "synthetic":
        metrics.update(synthetic_evaluation(model, tokenizer, device, num_samples=args.val_samples,
                                            seed=args.seed,
                                            num_heldout_pairs=args.synthetic_heldout_pairs))
    else:
        print(f"evaluate on your own data with: python eval.py TASK --checkpoint "
              f"{os.path.join(args.out_dir, 'ckpt.pt')} ...")
    metrics_path = os.path.join(args.out_dir, "final_metrics.json")
    with writing(metrics_path), open(metrics_path, "w") as f:
        json.dump(metrics, f, indent=1)
    headline = {label: metrics[key] for label, key in HEADLINE_METRICS.items() if key in metrics}
    if "nclip/information" in log.last:
        headline["nCLIP information (nats)"] = log.last["nclip/information"]
    for label, value in headline.items():
        print(f"{label:<26} {value:.3f}")
    print(f"all {len(metrics)} numbers: {metrics_path}")


# ------------------------------------------------------------------------------------- the loop

def save(writer, trainee, step, log, keep=False):
    """Rank 0 saves (with `keep` also as ckpt_<step>.pt), unless a step since the last
    log line was not finite: its update is in the weights. -> whether it saved."""
    if not log.is_main or log.saw_nonfinite():
        return False
    writer.save(trainee, step, log.skip_counts(), keep)
    return True


def save_and_stop(writer, trainee, step, log, stop):
    """Ctrl-C or SIGTERM reached some rank: keep what was learned, then exit."""
    if save(writer, trainee, step, log):
        writer.wait()
        print(f"\nstopped by a signal: saved step {step} to {writer.path}; continue with "
              "--resume", file=sys.stderr)
    stop.exit()


def train(args, stop):
    """Set up from the flags, then one loop: schedule, batch, step, log, evaluate, save,
    stop; then the final checkpoint and evaluation. `stop`: a faults.StopRequest."""
    rank, world_size, device = setup_distributed(args.device, args.dist_timeout)
    trainee = build_trainee(args, device, world_size)
    model = trainee.model
    args.global_batch = args.batch_size * args.accum_freq * world_size
    start_step, skip_counts = resume(args, trainee)
    writer = CheckpointWriter(os.path.join(args.out_dir, "ckpt.pt"), vars(args),
                              args.save_optimizer)
    torch.manual_seed(stream_seed(args.seed, (rank, RANKS)) + start_step)
    tokenizer = tokenizer_for(model.config)
    batches = iter(build_train_loader(args, tokenizer, model.config.image_size, rank, world_size,
                                      start_sample=start_step * args.global_batch))
    bar = tqdm(total=args.steps, initial=min(start_step, args.steps), disable=rank != 0,
               dynamic_ncols=True)
    log = TrainingLog(os.path.join(args.out_dir, "log.jsonl"), args.global_batch, world_size,
                      device, bar, is_main=rank == 0, start_step=start_step,
                      skip_counts=skip_counts, on_nonfinite=args.on_nonfinite)
    if log.is_main:
        print(f"{args.loss} | {args.model}: {model.num_params() / 1e6:.2f}M parameters | "
              f"global batch {args.global_batch} on {world_size} x {device}", flush=True)
    for step in range(start_step, args.steps):
        lr = learning_rate(step, args.lr, args.warmup, args.steps)
        for group in trainee.optimizer.param_groups:
            group["lr"] = lr
        stop.phase = "waiting"
        try:
            images, tokens, skipped = next(batches)
        except StopRequested:  # data that may never come: save now
            save_and_stop(writer, trainee, step, log, stop)
        stop.phase = "training"
        images, tokens = batch_to_device(images, tokens, tokenizer, device)
        log.add(train_step(trainee, images, tokens, args.on_nonfinite, args.accum_freq), skipped)
        bar.update(1)
        done = step + 1
        keep = args.keep_every and done % args.keep_every == 0
        saving = done % args.save_every == 0 or keep  # a checkpoint holds a log line's counts
        # one process can stop at any step; ranks agree at log lines
        if (done % args.log_every == 0 or done == args.steps or saving
                or (world_size == 1 and stop.signal)):
            if log.write(done, lr, model.head_norms(), stop.signal is not None):
                save_and_stop(writer, trainee, done, log, stop)
        if args.val_every and done % args.val_every == 0:
            evaluate_during_training(trainee, tokenizer, args, log, done)
        if saving and done < args.steps:
            save(writer, trainee, done, log, keep)
    bar.close()
    if start_step >= args.steps and log.is_main:
        print(f"{args.resume} is at step {start_step}, --steps is {args.steps}: nothing to "
              "train; evaluating it", flush=True)
    elif start_step < args.steps:
        keep = args.keep_every and args.steps % args.keep_every == 0
        save(writer, trainee, args.steps, log, keep)
    writer.wait()
    if stop.signal is not None:  # it came during the last step or the save: both are done
        stop.exit()
    stop.phase = "evaluating"  # the checkpoint is written: a signal may now end the run at once
    if log.is_main:
        if start_step < args.steps:
            print(f"wrote {plot_training_curves(args.out_dir)}")
        final_evaluation(model, tokenizer, args, device, log)
    if world_size > 1:
        del trainee, model
        gc.collect()  # DDP's reducer goes before its process group, not in interpreter teardown
        dist.destroy_process_group()


def main():
    args = build_parser().parse_args()
    try:
        if args.plot:
            return print(f"wrote {plot_training_curves(args.plot)}")
        problem = check_flags(args)
        if problem:
            raise DataError(problem)
        if args.resume == "latest":
            latest = os.path.join(args.out_dir, "ckpt.pt")
            args.resume = latest if os.path.isfile(latest) else None
        if args.workers is None:
            args.workers = default_workers()
        release_out_dir = None
        if int(os.environ.get("RANK", 0)) == 0:
            release_out_dir = take_out_dir(args.out_dir)
        stop = StopRequest(on_exit=release_out_dir)
        stop.install()
        train(args, stop)
    except (DataError, NonFiniteLoss) as error:
        fail("train.py", user_message(error))


if __name__ == "__main__":
    main()
