"""Cross-rank operations that keep the gradient, for losses over the global batch.

Each is the identity on one process. Their backward passes sum the gradient over ranks,
so that after DistributedDataParallel averages parameter gradients, N ranks get exactly
the gradient of one process on the same global batch.
"""
import torch
import torch.distributed as dist


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
