"""Train CLIP, nCLIP or xCLIP.

    python train.py                                   # xCLIP, tiny model, built-in data, CPU
    torchrun --nproc_per_node=8 train.py --model vit_b16 --loss xclip ...

One plain loop: schedule, batch, step (forward under autocast, loss, backward, clip, AdamW),
log, checkpoint. DDP comes from the torchrun environment; evaluation runs on rank 0.
"""
import argparse
import gc
import json
import math
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from data import (SKIP_REASONS, CaptionTableDataset, DataError, OneLineErrorParser,
                  ResumableSampler, TarShardStream, Tokenizer, TrainTransform, expand_shards,
                  fraction, make_loader, name_examples, non_negative_float, positive_float,
                  positive_int, stream_seed)
from eval import print_table
from losses import REGULARIZERS, Objective
from model import (OBJECTIVES, PRESETS, ModelConfig, TwoTowerModel, autocast_context,
                   default_device, model_config)
from synthetic import INDICES, SyntheticCaptions, evaluation, zero_shot_evaluation

RANKS = 1 << 16  # radix of the per-rank seed (see data.stream_seed)


# ----------------------------------------------------------------------------------------- flags

def build_parser():
    p = OneLineErrorParser(description="Train CLIP, nCLIP or xCLIP (Zhou et al., CVPR 2023).")
    p.add_argument("--loss", choices=OBJECTIVES, default="xclip",
                   help="objective: clip (contrastive), nclip (non-contrastive), xclip (both)")
    p.add_argument("--model", choices=list(PRESETS), default="tiny",
                   help="architecture preset; tiny runs on a CPU, vit_b16 is the paper's")
    model_flags = p.add_argument_group("model fields (override the preset)")
    for f in fields(ModelConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            model_flags.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                     help=f.metadata["help"] + f" (default: {f.default})")
        else:
            model_flags.add_argument(flag, type=positive_int, default=None,
                                     help=f.metadata["help"])
    p.add_argument("--batch-size", type=positive_int, default=128,
                   help="images per process; the global batch is this times the processes")
    p.add_argument("--steps", type=positive_int, default=500, help="optimizer steps")
    p.add_argument("--lr", type=non_negative_float, default=5e-4,
                   help="peak learning rate (CLIP's for B/16; on the tiny preset 2e-3 learns "
                        "no shape)")
    p.add_argument("--wd", type=non_negative_float, default=0.2,
                   help="AdamW weight decay on weight matrices")
    p.add_argument("--warmup", type=int, default=50,
                   help="linear warm-up steps before the cosine decay")
    p.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    p.add_argument("--beta2", type=float, default=0.98, help="AdamW beta2")
    p.add_argument("--eps", type=float, default=1e-6, help="AdamW epsilon")
    p.add_argument("--grad-clip", type=non_negative_float, default=1.0,
                   help="max gradient norm (0: off)")
    objective = p.add_argument_group("objective")
    objective.add_argument("--nclip-weight", type=non_negative_float, default=1.0,
                           help="lambda_n in L_xCLIP = L_CLIP + lambda_n L_nCLIP")
    objective.add_argument("--me-max-weight", type=non_negative_float, default=3.0,
                           help="lambda_me in L_nCLIP = L_pred + lambda_me L_me + lambda_ent "
                                "L_ent (METHOD.md's choice is 1; 3 balances --entropy-weight, "
                                "see README)")
    objective.add_argument("--entropy-weight", type=non_negative_float, default=1.0,
                           help="lambda_ent: weight of the mean per-sample entropy mean_i H(p_i), "
                                "minimized (MSN, TWIST; not in the paper: 0 turns it off)")
    objective.add_argument("--student-temp", type=positive_float, default=0.05,
                           help="tau_s, temperature of the predictions p (METHOD.md's choice: 0.1)")
    objective.add_argument("--teacher-temp", type=positive_float, default=0.02,
                           help="tau_t, temperature of the targets q; below tau_s it sharpens them "
                                "(METHOD.md's choice: 0.04)")
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
    data.add_argument("--csv-separator", default=None,
                      help="caption table separator (default: tab for .tsv, else comma)")
    data.add_argument("--shuffle-buffer", type=positive_int, default=1000,
                      help="tar shards: samples held per loader worker to shuffle within")
    data.add_argument("--synthetic-loose-fraction", type=fraction, default=0.15,
                      help="synthetic captions that describe only part of the image")
    data.add_argument("--synthetic-unrelated-fraction", type=fraction, default=0.05,
                      help="synthetic captions of another image")
    data.add_argument("--synthetic-heldout-pairs", type=int, default=4,
                      help="(color, shape) pairs never shown in training, for compositional "
                           "zero-shot")
    data.add_argument("--min-crop-scale", type=fraction, default=None,
                      help="smallest area fraction of the random resized crop (default: 0.5, as "
                           "CLIP recipes use on photos; 0.8 on the synthetic data, whose objects "
                           "sit near edges)")
    data.add_argument("--workers", type=int, default=1, help="data-loader processes per rank")
    run = p.add_argument_group("run")
    run.add_argument("--out-dir", default="out",
                     help="checkpoints, log.jsonl and final_metrics.json go here")
    run.add_argument("--resume", default=None, help="checkpoint to continue from")
    run.add_argument("--seed", type=int, default=0, help="seed for initialization and data")
    run.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    run.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                     help="bf16 autocast or fp32; auto picks bf16 on GPU, fp32 on CPU")
    run.add_argument("--compile", action="store_true", help="torch.compile the model")
    run.add_argument("--grad-checkpointing", action="store_true",
                     help="recompute transformer blocks in backward: less memory, more time")
    run.add_argument("--log-every", type=positive_int, default=10, help="steps between log lines")
    run.add_argument("--save-every", type=positive_int, default=500,
                     help="steps between checkpoints")
    run.add_argument("--val-samples", type=positive_int, default=1000,
                     help="synthetic val images per eval task")
    run.add_argument("--val-every", type=int, default=0,
                     help="steps between zero-shot evaluations on the built-in val data during "
                          "training, logged to log.jsonl under final_metrics.json's keys (0: off)")
    return p




def model_config_from_args(args):
    """The --model preset with every model-field flag that was given."""
    overrides = {f.name: getattr(args, f.name) for f in fields(ModelConfig)}
    return model_config(args.model, **overrides)


def fail(message):
    print(f"train.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def check_writable(directory):
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory):
            pass
    except OSError as error:
        fail(f"--out-dir {directory} is not writable: {error.strerror or error}")


# ----------------------------------------------------------------------------------------- setup

def setup_distributed(device_arg):
    """(rank, world_size, device) from the torchrun environment, or a single process."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = device_arg or default_device()
    if device == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world_size, device


def build_train_loader(args, image_size, tokenizer, rank, world_size, start_sample):
    """The training loader for train.py's flags (`args`): the built-in synthetic data,
    a CSV/TSV/JSONL caption table, or webdataset tar shards; from global sample
    `start_sample` on, for a resumed run."""
    min_crop_scale = args.min_crop_scale or (0.8 if args.train_data == "synthetic" else 0.5)
    transform = TrainTransform(image_size, scale=(min_crop_scale, 1.0))
    sampler = None
    if args.train_data == "synthetic":
        dataset = SyntheticCaptions(
            "train", INDICES, args.seed, image_size, transform, tokenizer,
            args.synthetic_loose_fraction, args.synthetic_unrelated_fraction,
            args.synthetic_heldout_pairs)
        sampler = ResumableSampler(None, args.batch_size, rank, world_size, start_sample,
                                   args.seed, finite=False)
    elif args.train_data.endswith((".csv", ".tsv", ".jsonl")):
        dataset = CaptionTableDataset(args.train_data, transform, tokenizer, args.csv_img_key,
                                      args.csv_caption_key, args.csv_separator)
        sampler = ResumableSampler(len(dataset), args.batch_size, rank, world_size, start_sample,
                                   args.seed)
    else:
        dataset = tar_shard_stream(args, transform, tokenizer, rank, world_size, start_sample)
    return make_loader(dataset, args.batch_size, sampler, args.workers,
                       pin_memory=torch.cuda.is_available())


def tar_shard_stream(args, transform, tokenizer, rank, world_size, start_sample):
    shards = expand_shards(args.train_data)
    missing = [path for path in shards if not os.path.isfile(path)]
    if missing:
        raise DataError(f"--train-data: {len(missing)} of {len(shards)} shards missing: "
                        f"{name_examples(missing)}")
    if not args.train_num_samples:
        raise DataError("--train-num-samples is needed with tar shards: the samples in one epoch")
    epoch, position = divmod(start_sample, args.train_num_samples)
    return TarShardStream(shards, transform, tokenizer, rank, world_size, args.seed,
                          args.shuffle_buffer, epoch, position / args.train_num_samples)


def build_model(args, device):
    """Model, objective (with its state: DINO's centers) and optimizer for train.py's
    flags; the same initial weights on every rank."""
    torch.manual_seed(args.seed)
    config = model_config_from_args(args)
    model = TwoTowerModel(config, args.loss, args.student_temp).to(device)
    objective = Objective(
        args.loss, config.num_prototypes, nclip_weight=args.nclip_weight,
        local_loss=args.local_loss, student_temp=args.student_temp,
        teacher_temp=args.teacher_temp, me_max_weight=args.me_max_weight,
        entropy_weight=args.entropy_weight, regularizer=args.regularizer,
        center_momentum=args.center_momentum, target_grad=args.target_grad).to(device)
    if args.grad_checkpointing:
        model.enable_grad_checkpointing()
    optimizer = model.configure_optimizers(args.lr, args.wd, (args.beta1, args.beta2), args.eps)
    return model, objective, optimizer


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


# -------------------------------------------------------------------------------------- the step

def learning_rate(step, args):
    """Linear warm-up to --lr, then cosine decay to 0 at --steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * 0.5 * (1 + math.cos(math.pi * progress))


def train_step(trainee, images, tokens):
    """Forward under autocast, loss, backward, clip, AdamW step, clamp the logit scale.
    Nothing here waits for the device: the metrics stay tensors until a log line reads
    them. -> {"loss", "grad_norm", and the objective's metrics}"""
    with trainee.autocast:
        loss, metrics = trainee.objective(trainee.train_model(images, tokens))
    loss.backward()
    max_norm = trainee.grad_clip or float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(trainee.model.parameters(), max_norm)
    trainee.optimizer.step()
    trainee.optimizer.zero_grad(set_to_none=True)
    trainee.model.clamp_logit_scale()
    return {"loss": loss.detach(), "grad_norm": grad_norm, **metrics}


# ---------------------------------------------------------------------------------- checkpoints

def save_checkpoint(path, trainee, step, args):
    """Write to a temporary file, then rename: a crash never leaves a half-written file."""
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    checkpoint = {
        "model": trainee.model.state_dict(),
        "objective_state": trainee.objective.state_dict(),
        "optimizer": trainee.optimizer.state_dict(),
        "step": step,
        "args": vars(args),
        "model_config": asdict(trainee.model.config),
        "objective": trainee.model.objective,
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                "python": random.getstate(), "cuda": cuda_rng},
    }
    temporary = path + ".tmp"
    torch.save(checkpoint, temporary)
    os.replace(temporary, path)


def restore_checkpoint(path, trainee):
    """Load the training state saved at `path` into `trainee`; -> its step."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    trainee.model.load_state_dict(checkpoint["model"])
    trainee.objective.load_state_dict(checkpoint["objective_state"])
    trainee.optimizer.load_state_dict(checkpoint["optimizer"])
    torch.set_rng_state(checkpoint["rng"]["torch"])
    np.random.set_state(checkpoint["rng"]["numpy"])
    random.setstate(checkpoint["rng"]["python"])
    if checkpoint["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
    return checkpoint["step"]


# -------------------------------------------------------------------------------------- logging

stop_signal = None


def request_stop(signum, frame):
    """Ctrl-C or SIGTERM: finish the step, save at the next log line, exit."""
    global stop_signal
    stop_signal = signum


class TrainingLog:
    """Sums the step metrics on the device between log lines; a log line averages them
    over its steps and over ranks in one all-reduce (the loop's only host sync), adds
    the heads' norms and the skip counts, and on rank 0 appends it to log.jsonl and
    shows it on the progress bar. The all-reduce also agrees across ranks on stopping."""

    BAR_KEYS = ("loss", "lr", "logit_scale", "nclip/image_perplexity", "nclip/information",
                "nclip/same_prototype")

    def __init__(self, path, global_batch, world_size, device, is_main, bar):
        self.path, self.global_batch = path, global_batch
        self.world_size, self.device = world_size, device
        self.is_main, self.bar = is_main, bar
        self.sums, self.steps, self.started = {}, 0, time.time()
        self.last = {}
        self.zero_shot_shape = None  # the last evaluation's shape top-1, for the bar

    def add(self, step_metrics):
        self.sums = {k: self.sums.get(k, 0) + v for k, v in step_metrics.items()}
        self.steps += 1

    def write(self, step, lr, skipped, extra):
        """One log line; -> whether some rank was asked to stop."""
        averaged = {k: v / self.steps for k, v in self.sums.items()}
        stop = torch.tensor(float(stop_signal is not None), device=self.device)
        # skip counts are summed over ranks: a mean times the number of ranks
        skips = {f"skipped/{reason}": count.to(self.device) * self.world_size
                 for reason, count in zip(SKIP_REASONS, skipped)}
        line = self.reduce({**averaged, **extra, "stop": stop, **skips})
        now = time.time()
        samples = self.steps * self.global_batch
        line.update(step=step, lr=lr, samples_per_second=samples / (now - self.started))
        self.sums, self.steps, self.started = {}, 0, now
        stopping = line.pop("stop") > 0
        self.last = line
        if self.is_main:
            self.show(line)
            self.append(line)
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
        if self.zero_shot_shape is not None:
            shown["shape"] = f"{self.zero_shot_shape:.3f}"
        self.bar.set_postfix(shown)

    def append(self, line):
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")

    def skip_counts(self):
        return {k: int(v) for k, v in self.last.items() if k.startswith("skipped/")}


def evaluate_during_training(trainee, tokenizer, args, device, log, step):
    """Zero-shot on the built-in val data, on rank 0 while the others wait, logged under
    final_metrics.json's keys. It draws no random numbers from the training's
    generators and leaves the model in training mode."""
    if log.is_main:
        cuda_devices = [device] if device.startswith("cuda") else []
        with torch.random.fork_rng(devices=cuda_devices):
            metrics = zero_shot_evaluation(trainee.model, tokenizer, args.val_samples, args.seed,
                                           args.synthetic_heldout_pairs, device)
        trainee.model.train()
        log.zero_shot_shape = metrics["zeroshot/shape/top1"]
        log.append({"step": step, **metrics})
    if dist.is_initialized():
        dist.barrier()


def final_evaluation(trainee, tokenizer, args, device, skip_counts, checkpoint_path):
    """All three tasks on the built-in val data (rank 0), printed and written to
    final_metrics.json with the skip counts."""
    metrics = dict(skip_counts)
    counts = ", ".join(f"{k.split('/')[1]} {v}" for k, v in skip_counts.items())
    print(f"bad samples skipped: {counts}")
    if args.train_data == "synthetic":
        metrics.update(evaluation(trainee.model, tokenizer, args.val_samples, args.seed,
                                  args.synthetic_heldout_pairs, device))
    else:
        print(f"evaluate on your own data with: python eval.py TASK --checkpoint "
              f"{checkpoint_path} ...")
    metrics_path = os.path.join(args.out_dir, "final_metrics.json")
    with open(metrics_path, "w") as f:
        json.dump(metrics, f, indent=1)
    print(f"final metrics ({metrics_path}):")
    print_table(metrics)


# ------------------------------------------------------------------------------------- the loop

def train(args):
    rank, world_size, device = setup_distributed(args.device)
    is_main = rank == 0
    if is_main:
        check_writable(args.out_dir)
    model, objective, optimizer = build_model(args, device)
    train_model = DistributedDataParallel(model) if world_size > 1 else model
    if args.compile:
        train_model = torch.compile(train_model)
    trainee = Trainee(model, train_model, objective, optimizer,
                      autocast_context(device, args.precision), args.grad_clip)
    start_step = restore_checkpoint(args.resume, trainee) if args.resume else 0
    torch.manual_seed(stream_seed(args.seed, (rank, RANKS)) + start_step)
    tokenizer = Tokenizer(model.config.context_length)
    global_batch = args.batch_size * world_size
    loader = build_train_loader(args, model.config.image_size, tokenizer, rank, world_size,
                                start_sample=start_step * global_batch)
    checkpoint_path = os.path.join(args.out_dir, "ckpt.pt")
    if is_main:
        print(f"{args.loss} | {args.model}: {model.num_params() / 1e6:.2f}M parameters | "
              f"global batch {global_batch} on {world_size} x {device}", flush=True)
    bar = tqdm(total=args.steps, initial=start_step, disable=not is_main, dynamic_ncols=True)
    log = TrainingLog(os.path.join(args.out_dir, "log.jsonl"), global_batch, world_size, device,
                      is_main, bar)
    batches = iter(loader)
    skipped = torch.zeros(len(SKIP_REASONS), dtype=torch.long)  # bad samples passed over here
    for step in range(start_step, args.steps):
        lr = learning_rate(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, tokens, skipped_now = next(batches)
        skipped += skipped_now.sum(dim=0)
        log.add(train_step(trainee, images.to(device, non_blocking=True),
                           tokens.to(device, non_blocking=True)))
        bar.update(1)
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            if log.write(done, lr, skipped, model.head_norms()):
                stop_on_signal(trainee, checkpoint_path, done, args, is_main)
        if args.val_every and done % args.val_every == 0 and args.train_data == "synthetic":
            evaluate_during_training(trainee, tokenizer, args, device, log, done)
        if is_main and done % args.save_every == 0:
            save_checkpoint(checkpoint_path, trainee, done, args)
    bar.close()
    if is_main:
        save_checkpoint(checkpoint_path, trainee, args.steps, args)
        final_evaluation(trainee, tokenizer, args, device, log.skip_counts(), checkpoint_path)
    if world_size > 1:
        del trainee, train_model
        gc.collect()  # DDP's reducer goes before its process group, not in interpreter teardown
        dist.destroy_process_group()


def stop_on_signal(trainee, checkpoint_path, step, args, is_main):
    """Ctrl-C or SIGTERM reached some rank: keep what was learned, then exit."""
    if is_main:
        save_checkpoint(checkpoint_path, trainee, step, args)
        print(f"\nstopped by a signal: saved step {step} to {checkpoint_path}; "
              "continue with --resume", file=sys.stderr)
    sys.exit(128 + (stop_signal or signal.SIGTERM))


def main():
    args = build_parser().parse_args()
    if args.resume and not os.path.isfile(args.resume):
        fail(f"--resume {args.resume}: no such checkpoint")
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        train(args)
    except DataError as error:
        fail(str(error))


if __name__ == "__main__":
    main()
