"""Train CLIP, nCLIP or xCLIP.

    python train.py                                   # xCLIP, tiny model, built-in data, CPU
    torchrun --nproc_per_node=8 train.py --model vit_b16 --loss xclip ...

The setup (the data, the model, its objective and optimizer, a resumed state), the step
(forward under autocast, loss, backward, clip, AdamW), the log, the evaluation during
and after training, then one plain loop that reads top to bottom: schedule, batch,
step, log, evaluate, save. The flags are flags.py's; ranks, distributed.py's;
checkpoints, checkpoint.py's; one-line errors and signals, faults.py's.
"""
import gc
import json
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch.utils.data import Subset
from tqdm import tqdm

import distributed
from checkpoint import (CheckpointWriter, check_resumable, initialize_from, read_checkpoint,
                        restore_checkpoint)
from data import (RANKS, SKIP_REASONS, CaptionTableDataset, EvalTransform, ResumableSampler,
                  TarShardStream, TrainTransform, existing_shards, group_captions_by_image,
                  is_caption_table, make_loader, normalize, read_image_caption_pairs, skip_text,
                  stream_seed, tokenizer_for)
from distributed import all_reduce_sum, launched_rank
from eval import (HEADLINE_METRICS, caption_retrieval, dataset_name, folder_zero_shot,
                  synthetic_evaluation, synthetic_zero_shot)
from faults import (DataError, NonFiniteLoss, StopRequest, StopRequested, UserError,
                    reported_in_one_line, take_out_dir, writing)
from flags import (COMPUTATION_FLAGS, build_parser, check_flags, model_config_from_args,
                   resume_path)
from losses import Objective
from model import TwoTowerModel, TwoTowerOutput, autocast_context, learning_rate
from plots import training_curves
from synthetic import INDICES, SyntheticCaptions


# ----------------------------------------------------------------------------------------- setup

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
    elif is_caption_table(args.train_data):
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
    wrapped_model: Any
    objective: Objective
    optimizer: torch.optim.Optimizer
    autocast: Any
    grad_clip: float
    compiled: bool = False

    def forward(self, images, tokens):
        """wrapped_model's output, prototype cosines not yet centered (see forward_backward).
        A compiled model sees the text length as dynamic: one graph for every length."""
        if self.compiled and tokens.shape[1] > 1:
            torch._dynamo.mark_dynamic(tokens, 1)
        return self.wrapped_model(images, tokens, raw_cosines=True)


def build_trainee(args, device, world_size=1):
    """Model, objective (with its state: DINO's centers) and optimizer for train.py's
    flags, the same initial weights on every rank, wrapped for DDP and --compile."""
    torch.manual_seed(args.seed)
    config = model_config_from_args(args)
    model = TwoTowerModel(config, args.loss, args.student_temp).to(device)
    if args.init_from:
        fresh, unused = initialize_from(read_checkpoint(args.init_from), args.init_from, model)
        if distributed.rank() == 0:
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
    wrapped_model = distributed.distributed_model(model) if world_size > 1 else model
    if args.compile:
        wrapped_model = torch.compile(wrapped_model)
    return Trainee(model, wrapped_model, objective, optimizer,
                   autocast_context(device, args.precision), args.grad_clip, args.compile)


def resume(path, args, trainee, global_batch):
    """Load the checkpoint at `path` (--resume's) into `trainee` after checking that it
    matches the flags. -> (its step, its bad-sample counts); (0, {}) without one."""
    if not path:
        return 0, {}
    checkpoint = read_checkpoint(path)
    computed_by = {name: getattr(args, name) for name in COMPUTATION_FLAGS}
    check_resumable(checkpoint, path, args.loss, model_config_from_args(args), global_batch,
                    computed_by)
    return restore_checkpoint(checkpoint, trainee), checkpoint["skipped"]




# -------------------------------------------------------------------------------------- the step

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
        with gradient_sync(trainee.wrapped_model, last):
            with trainee.autocast:
                fresh = trainee.forward(micro_images, micro_tokens)
                whole = concatenate_outputs(cached[:j] + [fresh] + cached[j + 1:], fresh,
                                            accum_freq)
                whole = trainee.model.center_cosines(whole, update_running_center=last)
                loss, metrics = trainee.objective(whole)
            loss.backward()
    return loss, metrics


def gradient_sync(wrapped_model, now):
    """DDP all-reduces the gradients in the last micro-batch's backward only: the others
    run under its no_sync() and add into the local gradients."""
    no_sync = getattr(wrapped_model, "no_sync", None)
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
        values = all_reduce_sum(torch.stack([v.float() for v in metrics.values()]))
        return dict(zip(metrics, (values / self.world_size).tolist()))

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
    distributed.barrier()


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


def check_validation_data(args, global_batch):
    """--val-data before the first step, not at the first --val-every: one global batch of
    pairs at least (for the loss), and for a table every image there (for retrieval)."""
    pairs, _, _ = read_image_caption_pairs(args.val_data, args.csv_img_key,
                                           args.csv_caption_key, args.csv_separator)
    if len(pairs) < global_batch:
        raise DataError(f"--val-data {args.val_data}: {len(pairs)} pairs, fewer than one "
                        f"global batch of {global_batch}; pass a smaller --batch-size")
    if is_caption_table(args.val_data):
        group_captions_by_image(pairs)


@torch.no_grad()
def validation_loss(trainee, tokenizer, args, device):
    """The objective on --val-data's pairs in global batches of --batch-size x processes,
    each rank scoring its slice of each, as in training; the model in evaluation mode
    (nCLIP centers with its running center), the objective's state left as it is, the
    last partial batch left out. -> {"val/<name>/loss": the mean over batches}"""
    model, objective = trainee.model, trainee.objective
    pairs, load, _ = read_image_caption_pairs(args.val_data, args.csv_img_key, args.csv_caption_key,
                                    args.csv_separator)
    dataset = CaptionTableDataset(args.val_data, EvalTransform(model.config.image_size),
                                  tokenizer, seed=args.seed, pairs=pairs, load=load)
    rank, world_size = distributed.rank(), distributed.world_size()
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
    print(f"bad samples {skip_text(metrics[f'skipped/{reason}'] for reason in SKIP_REASONS)}")
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
    """Set up from the flags, then one loop: schedule, batch, step, log, evaluate, save;
    then the final checkpoint and evaluation. `stop`: a faults.StopRequest."""
    rank, world_size, device = distributed.setup(args.device, args.dist_timeout)
    trainee = build_trainee(args, device, world_size)
    model = trainee.model
    global_batch = args.batch_size * args.accum_freq * world_size
    resume_from = resume_path(args)
    start_step, skip_counts = resume(resume_from, args, trainee, global_batch)
    if args.val_data:
        check_validation_data(args, global_batch)
    writer = CheckpointWriter(os.path.join(args.out_dir, "ckpt.pt"),
                              {**vars(args), "global_batch": global_batch}, args.save_optimizer)
    torch.manual_seed(stream_seed(args.seed, (rank, RANKS)) + start_step)
    tokenizer = tokenizer_for(model.config)
    batches = iter(build_train_loader(args, tokenizer, model.config.image_size, rank, world_size,
                                      start_sample=start_step * global_batch))
    bar = tqdm(total=args.steps, initial=min(start_step, args.steps), disable=rank != 0,
               dynamic_ncols=True)
    log = TrainingLog(os.path.join(args.out_dir, "log.jsonl"), global_batch, world_size,
                      device, bar, is_main=rank == 0, start_step=start_step,
                      skip_counts=skip_counts, on_nonfinite=args.on_nonfinite)
    if log.is_main:
        print(f"{args.loss} | {args.model}: {model.num_params() / 1e6:.2f}M parameters | "
              f"global batch {global_batch} on {world_size} x {device}", flush=True)
    step = start_step
    try:
        for step in range(start_step, args.steps):
            lr = learning_rate(step, args.lr, args.warmup, args.steps)
            for group in trainee.optimizer.param_groups:
                group["lr"] = lr
            with stop.waiting():  # for data that may never come: a signal stops it at once
                images, tokens, skipped = next(batches)
            images, tokens = batch_to_device(images, tokens, tokenizer, device)
            log.add(train_step(trainee, images, tokens, args.on_nonfinite, args.accum_freq),
                    skipped)
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
    except StopRequested:  # while waiting for data: nothing of this step is done
        save_and_stop(writer, trainee, step, log, stop)
    bar.close()
    if start_step >= args.steps and log.is_main:
        print(f"{resume_from} is at step {start_step}, --steps is {args.steps}: nothing to "
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
            print(f"wrote {training_curves(args.out_dir)}")
        final_evaluation(model, tokenizer, args, device, log)
    del trainee, model
    gc.collect()  # DDP's reducer goes before its process group, not in interpreter teardown
    distributed.teardown()


def main():
    args = build_parser().parse_args()
    with reported_in_one_line("train.py"):
        if args.plot:
            return print(f"wrote {training_curves(args.plot)}")
        problem = check_flags(args)
        if problem:
            raise UserError(problem)
        release_out_dir = take_out_dir(args.out_dir) if launched_rank() == 0 else None
        stop = StopRequest(on_exit=release_out_dir)
        stop.install()
        train(args, stop)


if __name__ == "__main__":
    main()
