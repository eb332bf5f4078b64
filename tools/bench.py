"""Time the training step of CLIP, nCLIP or xCLIP on synthetic tensors.

    python tools/bench.py                                  # xCLIP, tiny model, CPU
    python tools/bench.py --model vit_b16 --batch-size 256 --device cuda --precision bf16 --compile

Takes train.py's flags (those about data, logging and checkpoints do nothing here) and
times its step: forward under autocast, loss, backward, gradient clipping, AdamW step.
Prints ms/step, samples/s, peak memory, model FLOPs per sample and MFU.

    python tools/bench.py --compare clip xclip open_clip --no-conv-stem   # interleaved, one process
    python tools/bench.py --batch-size 32 --accum-freq 4   # accumulation, against one batch of 128

--compare times several steps on the same batch, alternating one step of each, so a busy
machine slows them all alike, and prints each one's speed against the first. `open_clip`
is open_clip's own training step (its CLIP model at this architecture, its ClipLoss, its
optimizer grouping); it needs `pip install open_clip_torch`, in a separate virtualenv: it
is never a dependency of this project.
"""
import argparse
import io
import math
import os
import resource
import statistics
import sys
import tarfile
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the paper's code
from data import skip_text, tokenizer_for
from distributed import default_device, use_device
from eval import retrieval_recall
from faults import UserError, positive_float, positive_int, reported_in_one_line
from flags import build_parser, model_config_from_args
from model import CONTRASTIVE, NON_CONTRASTIVE, OBJECTIVES, ConvStem, autocast_context
from synthetic import SyntheticCaptions
from train import build_train_loader, build_trainee, train_step  # the step it times

# Dense bf16 tensor-core peaks from the data sheets (TFLOP/s), by the exact name
# torch.cuda.get_device_name gives: the PCIe and NVL parts of a GPU are slower than its
# SXM part. MFU is reported against this peak whatever --precision is, as PaLM and
# nanoGPT do, and against --peak-tflops when given: what the chip's matrix products reach
# (an H200 multiplies bf16 8192 x 8192 matrices at about 790, not 989).
PEAK_TFLOPS = {
    "NVIDIA H100 80GB HBM3": 989.0,  # SXM
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H100 NVL": 835.0,
    "NVIDIA H200": 989.0,  # SXM
    "NVIDIA H200 NVL": 835.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
}


def parse_args():
    p = build_parser()
    p.description = "Time train.py's training step on synthetic tensors."
    p.set_defaults(steps=20, batch_size=64)
    p.add_argument("--warmup-steps", type=int, default=5,
                   help="untimed steps first (compilation, allocator and cache warm-up)")
    p.add_argument("--compare", nargs="+", choices=(*OBJECTIVES, "open_clip"),
                   default=None,
                   help="time these steps in one run, interleaved, against the first (replaces "
                        "--loss)")
    p.add_argument("--loader", action="store_true",
                   help="time train.py's data loader for --train-data instead (decode, augment, "
                        "tokenize)")
    p.add_argument("--jpeg-shards", action="store_true",
                   help="with --loader: time it on 16 generated shards of 250 256-px JPEGs "
                        "(CC3M as img2dataset writes it at --image_size 256)")
    p.add_argument("--largest-batch", action="store_true",
                   help="the largest batch whose step fits on the GPU, doubling from "
                        "--batch-size up to --max-batch")
    p.add_argument("--max-batch", type=positive_int, default=16384,
                   help="with --largest-batch: stop doubling here")
    p.add_argument("--retrieval", action="store_true",
                   help="time eval.py's retrieval for 5,000 images x 25,000 captions (COCO 5k's "
                        "size) instead")
    p.add_argument("--peak-tflops", type=positive_float, default=None,
                   help="a second peak for MFU, e.g. what the chip's bf16 matrix products "
                        "reach; MFU is also given against the data sheet's for known GPUs")
    return p.parse_args()


def flops_per_sample(c, objective, batch_size):
    """Model FLOPs of one sample's training step, counted as PaLM and nanoGPT do: 2 per
    multiply-add of each weight matrix, times the tokens it sees (both towers, the
    projections and the prototype heads), plus attention's QK^T and AV, 4 T^2 D per layer
    and sequence, causal or not. Backward costs twice the forward, so a step is 3x it.
    Not counted: embedding lookups, norms, softmaxes, the optimizer. This is what
    torch.utils.flop_counter counts for the step (tests/test_bench.py checks it)."""
    def tower(width, layers, tokens):
        weights = (4 + 2 * c.mlp_ratio) * width ** 2  # qkv 3D^2, out D^2, MLP 2 r D^2
        return layers * (2 * weights * tokens + 4 * tokens ** 2 * width)

    patches = (c.image_size // c.patch_size) ** 2
    if c.conv_stem:  # stride-2 3x3 convolutions, channels doubling up to the width
        channels = ConvStem.channels(c.patch_size, c.vision_width)
        stem = [2 * 9 * channels[i] * channels[i + 1] * (c.image_size >> (i + 1)) ** 2
                for i in range(len(channels) - 1)]
    else:
        stem = [2 * 3 * c.patch_size ** 2 * c.vision_width * patches]
    forward = (sum(stem) + tower(c.vision_width, c.vision_layers, patches + 1)
               + tower(c.text_width, c.text_layers, c.context_length))
    if objective in CONTRASTIVE:  # projections, then this sample's row of logits
        forward += 2 * (c.vision_width + c.text_width) * c.embed_dim
        forward += 2 * batch_size * c.embed_dim
    if objective in NON_CONTRASTIVE:
        head = [c.head_hidden_dim] * (c.head_layers - 1)
        head += [c.head_bottleneck_dim, c.num_prototypes]
        for dims in ([c.vision_width] + head, [c.text_width] + head):
            forward += 2 * sum(a * b for a, b in zip(dims, dims[1:]))
    return 3 * forward - stem[0]  # pixels need no gradient: one backward matmul there


def synthetic_batch(c, batch_size, device):
    """Random images, and random captions that end in the end-of-text token and pad with 0."""
    images = torch.randn(batch_size, 3, c.image_size, c.image_size, device=device)
    tokens = torch.randint(1, c.eot_token_id, (batch_size, c.context_length), device=device)
    lengths = torch.randint(1, c.context_length, (batch_size, 1), device=device)
    positions = torch.arange(c.context_length, device=device)
    tokens = tokens.masked_fill(positions > lengths, 0)
    tokens = tokens.masked_fill(positions == lengths, c.eot_token_id)
    return images, tokens


def peak_memory_text(device):
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated by torch"
    # Linux reports kilobytes: the whole process, Python and libraries included.
    resident = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return f"{resident:.2f} GiB resident (process)"


def peaks(args, device):
    """{label: TFLOP/s} MFU is reported against: the data sheet's for a known GPU, and
    --peak-tflops."""
    known = {}
    if device.type == "cuda" and torch.cuda.get_device_name(device) in PEAK_TFLOPS:
        known["data sheet"] = PEAK_TFLOPS[torch.cuda.get_device_name(device)]
    if args.peak_tflops:
        known["--peak-tflops"] = args.peak_tflops
    return known


def mfu_text(achieved, peaks, device):
    """'MFU: 41.0% of 989 TFLOP/s (data sheet), 51.3% of 790 (--peak-tflops)'."""
    if not peaks:
        return (f"MFU: not reported (no peak known for {device}; pass --peak-tflops); "
                f"{achieved:.3f} TFLOP/s achieved")
    return "MFU: " + ", ".join(f"{100 * achieved / peak:.1f}% of {peak:g} TFLOP/s ({label})"
                               for label, peak in peaks.items())


def open_clip_step(args, config, device, autocast):
    """open_clip's training step on our architecture: its CLIP with the same widths,
    depths, heads, patch and context, its ClipLoss, AdamW without decay on gains, biases
    and the logit scale (as its main.py groups them), gradient clipping, and the logit
    scale clamped at 100 afterwards (as its train.py does)."""
    import open_clip
    c = config
    vision = open_clip.model.CLIPVisionCfg(
        layers=c.vision_layers, width=c.vision_width, mlp_ratio=c.mlp_ratio,
        head_width=c.vision_width // c.vision_heads, patch_size=c.patch_size,
        image_size=c.image_size)
    text = open_clip.model.CLIPTextCfg(
        context_length=c.context_length, vocab_size=c.vocab_size, width=c.text_width,
        heads=c.text_heads, layers=c.text_layers, mlp_ratio=c.mlp_ratio)
    torch.manual_seed(args.seed)
    model = open_clip.CLIP(c.embed_dim, vision, text).to(device)

    def no_decay(name, p):
        return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0},
              {"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": args.wd}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps)
    train_model = torch.compile(model) if args.compile else model
    loss_fn = open_clip.ClipLoss()

    def step(images, tokens):
        with autocast:
            loss = loss_fn(*train_model(images, tokens))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
    return step, sum(p.numel() for p in model.parameters())


def our_step(args, loss, device, accum_freq):
    trainee = build_trainee(argparse.Namespace(**{**vars(args), "loss": loss}), device)

    def step(images, tokens):
        train_step(trainee, images, tokens, accum_freq=accum_freq)
    return step, trainee.model.num_params()


def largest_batch(args, config, device):
    """The largest batch, doubling from --batch-size up to --max-batch, whose training step
    runs on the GPU (two steps, the optimizer's state included)."""
    fits, batch_size, on_gpu = None, args.batch_size, device.type == "cuda"
    while batch_size <= args.max_batch:
        try:
            if on_gpu:
                torch.cuda.reset_peak_memory_stats(device)
            step, _ = our_step(args, args.loss, device, 1)
            for _ in range(2):
                step(*synthetic_batch(config, batch_size, device))
            if on_gpu:
                torch.cuda.synchronize(device)
            fits, memory = batch_size, peak_memory_text(device)
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            step = None
            if on_gpu:
                torch.cuda.empty_cache()
        batch_size *= 2
    checkpointing = "with" if args.grad_checkpointing else "without"
    print(f"largest batch | {args.model} {args.loss} | {checkpointing} --grad-checkpointing: "
          f"{fits} ({memory if fits else 'not even --batch-size'})")


def time_interleaved(steps, batch, warmup_steps, timed_steps, sync):
    """Warm each step up, then time one step of each in turn. -> (seconds of each step's
    timed steps, seconds of each step's warm-up: compilation, for a compiled step)."""
    warmup_seconds = []
    for step in steps:
        started = time.perf_counter()
        for _ in range(warmup_steps):
            step(*batch)
        sync()
        warmup_seconds.append(time.perf_counter() - started)
    seconds = [[] for _ in steps]
    for _ in range(timed_steps):
        for step, times in zip(steps, seconds):
            started = time.perf_counter()
            step(*batch)
            sync()
            times.append(time.perf_counter() - started)
    return seconds, warmup_seconds


def write_jpeg_shards(folder, num_shards=16, per_shard=250, side=256):
    """img2dataset's layout ({key}.jpg beside {key}.txt) of `side`-px JPEGs at quality 95
    of the built-in val scenes: what CC3M downloaded with --image_size 256 gives the
    loader to do. -> the shard pattern"""
    scenes = SyntheticCaptions("val", seed=0, image_size=side)
    for shard in range(num_shards):
        with tarfile.open(os.path.join(folder, f"{shard:05d}.tar"), "w") as tar:
            for index in range(shard * per_shard, (shard + 1) * per_shard):
                jpeg = io.BytesIO()
                scenes.image(index).save(jpeg, format="JPEG", quality=95)
                for extension, payload in (("jpg", jpeg.getvalue()),
                                           ("txt", scenes.caption(index).encode())):
                    info = tarfile.TarInfo(f"{index:09d}.{extension}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return os.path.join(folder, f"{{00000..{num_shards - 1:05d}}}.tar")


def time_loader(args, config):
    """Images/s of train.py's loader on --train-data with --workers processes: decoding,
    random resized crop, tokenization and collation of uint8 batches, what a GPU waits
    for. With --jpeg-shards, on generated 256-px JPEG shards instead."""
    tokenizer = tokenizer_for(config)
    loader = build_train_loader(args, tokenizer, config.image_size)
    batches = iter(loader)
    for _ in range(args.warmup_steps):  # worker start-up and prefetch
        next(batches)
    started = time.perf_counter()
    skipped = sum(next(batches)[2].sum(dim=0) for _ in range(args.steps))
    seconds = time.perf_counter() - started
    print(f"loader | {args.train_data} | {config.image_size} px | batch {args.batch_size} | "
          f"{args.workers} worker(s) | {args.steps} batches after {args.warmup_steps} warm-up")
    print(f"images/s: {args.steps * args.batch_size / seconds:.0f} | {skip_text(skipped)}")


def time_retrieval(config, trials=3):
    """Seconds of eval.py's blocked Recall@K for 5,000 images x 25,000 captions, 5 per
    image, unit embeddings of --embed-dim: the similarity matrix is never held whole."""
    images = F.normalize(torch.randn(5000, config.embed_dim), dim=-1)
    caption_image = torch.arange(5000).repeat_interleave(5)
    captions = F.normalize(images[caption_image] + torch.randn(25000, config.embed_dim) / 2, dim=-1)
    for trial in range(trials):
        started = time.perf_counter()
        recall = retrieval_recall(images, captions, caption_image)["image_to_text/R@1"]
        print(f"retrieval 5000 x 25000, {config.embed_dim}-d, {torch.get_num_threads()} threads: "
              f"{time.perf_counter() - started:.2f} s (image_to_text/R@1 {recall:.3f})")


def main():
    args = parse_args()
    with reported_in_one_line("bench.py"):
        config = model_config_from_args(args)
        device = torch.device(args.device or default_device())
        use_device(device)
        if "open_clip" in (args.compare or ()) and config.conv_stem:
            raise UserError("open_clip's ViT has no conv stem; pass --no-conv-stem to compare "
                            "the same architecture")
        if args.loader and args.jpeg_shards:
            with tempfile.TemporaryDirectory(prefix="xclip-bench-") as folder:
                shards = {"train_data": write_jpeg_shards(folder), "train_num_samples": 4000}
                return time_loader(argparse.Namespace(**{**vars(args), **shards}), config)
        if args.loader:
            return time_loader(args, config)
        if args.retrieval:
            return time_retrieval(config)
        if args.largest_batch:
            return largest_batch(args, config, device)
        time_steps(args, config, device)


def time_steps(args, config, device):
    """ms/step, samples/s, MFU and peak memory of each step --compare names (or --loss's),
    timed interleaved on one synthetic batch."""
    autocast = autocast_context(device, args.precision)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    steps, params = {}, {}
    for name in args.compare or [args.loss]:
        if name == "open_clip":
            steps[name], params[name] = open_clip_step(args, config, device, autocast)
            continue
        steps[name], params[name] = our_step(args, name, device, args.accum_freq)
        if args.accum_freq > 1:  # what accumulation costs: the same step on the whole batch
            whole = f"{name}, whole batch"
            steps[whole], params[whole] = our_step(args, name, device, 1)
    names = list(steps)
    step_batch = args.batch_size * args.accum_freq  # samples per optimizer step
    batch = synthetic_batch(config, step_batch, device)
    started = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timed, warmups = time_interleaved([steps[n] for n in names], batch, args.warmup_steps,
                                      args.steps, sync)
    seconds, warmup_seconds = dict(zip(names, timed)), dict(zip(names, warmups))
    precision = "bf16" if isinstance(autocast, torch.autocast) else "fp32"
    compiled = " | compiled" if args.compile else ""
    accumulated = f" = {args.accum_freq} x {args.batch_size}" if args.accum_freq > 1 else ""
    print(f"{args.model} | batch {step_batch}{accumulated} | {device} | {precision}{compiled} | "
          f"median of {args.steps} steps after {args.warmup_steps} warm-up, "
          f"{time.perf_counter() - started:.0f} s in all")
    first = statistics.median(seconds[names[0]])
    for name in names:
        median = statistics.median(seconds[name])
        relative = f" | {first / median:.2f}x the speed of {names[0]}" if name != names[0] else ""
        print(f"{name}: {params[name] / 1e6:.2f}M parameters | ms/step: {1000 * median:.1f} "
              f"(min {1000 * min(seconds[name]):.1f}) | samples/s: {step_batch / median:.1f}"
              f"{relative}")
        print(f"  warm-up: {warmup_seconds[name]:.1f} s for {args.warmup_steps} step(s)"
              + (" (compilation included)" if args.compile else ""))
        if name != "open_clip":
            flops = flops_per_sample(config, name.split(",")[0], step_batch)
            achieved = flops * step_batch / median / 1e12
            print(f"  model FLOPs/sample: {flops / 1e9:.3f} GFLOP (forward + backward) | "
                  f"{mfu_text(achieved, peaks(args, device), device)}")
    together = " (all steps together)" if len(names) > 1 else ""
    print(f"peak memory: {peak_memory_text(device)}{together}")


if __name__ == "__main__":
    main()
