"""Ranks: the one file that knows about them. Process setup from torchrun's environment
(the device, the process group, the loader workers a rank may use, DDP's wrapper), then
the cross-rank operations that keep the gradient, for losses over the global batch.

Each operation is the identity on one process. Their backward passes sum the gradient over
ranks, so that after DistributedDataParallel averages parameter gradients, N ranks get
exactly the gradient of one process on the same global batch.
"""
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from faults import UserError


# ----------------------------------------------------------------------------------- setup

def launched_rank():
    """This process's rank as torchrun's environment gives it, known before the process
    group is (0 outside torchrun)."""
    return int(os.environ.get("RANK", 0))


def setup(device_arg=None, timeout_minutes=60):
    """(rank, world_size, device) from the torchrun environment, or a single process."""
    rank, world = launched_rank(), int(os.environ.get("WORLD_SIZE", 1))
    device = process_device(device_arg, int(os.environ.get("LOCAL_RANK", 0)), world)
    use_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                timeout=timedelta(minutes=timeout_minutes))
    return rank, world, device


def use_device(device):
    """Make `device` this process's: a GPU becomes the current one, and float32 matrix
    products use its tensor cores (TF32), as for --precision fp32 in training."""
    if str(device).startswith("cuda"):
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def process_device(device_arg, local_rank=0, world=1):
    """--device (default: cuda where there is one); a GPU is the one of LOCAL_RANK, so that
    each rank of torchrun has its own."""
    device = device_arg or default_device()
    if device == "cuda":
        return f"cuda:{local_rank}"
    if device.startswith("cuda") and world > 1:
        raise UserError(f"--device {device} under torchrun: each rank takes the GPU of its "
                        "LOCAL_RANK; pass --device cuda")
    return device


def default_workers():
    """Loader processes a rank may use: this process's CPUs shared among the node's ranks,
    less one for each rank itself; at least 1, at most 16."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, min(16, cpus // ranks_here - 1))


def distributed_model(model):
    """DDP as the training step needs it. No buffer broadcast at each forward: the only
    buffers, the heads' running centers, move by global means, the same on every rank.
    Gradients are views of DDP's all-reduce buckets, not copies."""
    return DistributedDataParallel(model, broadcast_buffers=False, gradient_as_bucket_view=True)


def barrier():
    if world_size() > 1:
        dist.barrier()


def teardown():
    if world_size() > 1:
        dist.destroy_process_group()


# ------------------------------------------------------------------------ the global batch

def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank():
    return dist.get_rank() if world_size() > 1 else 0


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local):
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, local.contiguous())
        return torch.cat(gathered)

    @staticmethod
    def backward(ctx, grad):
        # Every rank's loss depends on every rank's rows: sum their gradients, keep ours.
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


class _AllReduceWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local):
        total = local.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad


def gather_with_grad(local):
    """(B, D) on each rank -> (N*B, D) in rank order; gradient reaches the local rows."""
    return local if world_size() == 1 else _GatherWithGrad.apply(local)


def all_reduce_with_grad(local):
    """Sum over ranks; gradient reaches the local summand."""
    return local if world_size() == 1 else _AllReduceWithGrad.apply(local)


def global_mean(local):
    """(B, K) on each rank -> (K,), the mean over the global batch."""
    return all_reduce_with_grad(local.sum(dim=0)) / (local.shape[0] * world_size())


@torch.no_grad()
def all_reduce_max(value):
    if world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


@torch.no_grad()
def all_reduce_sum(value):
    """Sum over ranks, without gradient (statistics, Sinkhorn's normalizers)."""
    if world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
    return value
