"""The CLIP, nCLIP and xCLIP objectives, over the global batch.

Everything that crosses ranks goes through `gather_with_grad` and `all_reduce_with_grad`,
which are the identity on one process. Their backward passes sum the gradient over
ranks, so that after DistributedDataParallel averages parameter gradients, N ranks
get exactly the gradient of one process on the same global batch.
"""

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

REGULARIZERS = ("memax", "center", "sinkhorn")


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


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


def global_mean(local):  # (B, K) -> (K,): mean over the global batch
    return all_reduce_with_grad(local.sum(dim=0)) / (local.shape[0] * world_size())


def clip_loss(image_embeddings, text_embeddings, logit_scale, local_loss=False):
    """CLIP (Radford et al. 2021), over the global batch:

        logits_ij = s * <u_i, w_j>
        L_CLIP = 1/2 [ CE(logits, diag) + CE(logits^T, diag) ]

    u, w: (B, D) unit-norm local embeddings. With `local_loss` each rank scores only
    its own rows against all columns (open_clip's local_loss): the same gradient,
    B x NB logits instead of NB x NB; the returned value is then this rank's share.
    """
    all_images, all_texts = gather_with_grad(image_embeddings), gather_with_grad(text_embeddings)
    if local_loss:
        batch = image_embeddings.shape[0]
        rank = dist.get_rank() if world_size() > 1 else 0
        targets = torch.arange(batch, device=image_embeddings.device) + rank * batch
        logits_per_image = logit_scale * image_embeddings @ all_texts.t()  # (B, NB)
        logits_per_text = logit_scale * text_embeddings @ all_images.t()   # (B, NB)
    else:
        targets = torch.arange(all_images.shape[0], device=image_embeddings.device)
        logits_per_image = logit_scale * all_images @ all_texts.t()         # (NB, NB)
        logits_per_text = logits_per_image.t()
    return (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_text, targets)) / 2


def at_least_float32(x):  # bf16 logits from autocast -> fp32; float64 stays (gradcheck)
    return x.to(torch.promote_types(x.dtype, torch.float32))


def cross_entropy(targets, log_predictions):
    """H(q, p) = -mean_i sum_k q_ik log p_ik."""
    return -(targets * log_predictions).sum(dim=-1).mean()


def entropy(probabilities):
    """H(p) = -sum_k p_k log p_k, over the last dimension."""
    return -(probabilities * torch.log(probabilities.clamp_min(1e-12))).sum(dim=-1)


@torch.no_grad()
def sinkhorn(scores, iterations=3):
    """SwAV's equipartition over the global batch: Q = diag(a) exp(scores) diag(b)
    with every prototype used equally and every sample's row summing to 1."""
    scores = at_least_float32(scores)
    q = torch.exp(scores - all_reduce_max(scores.max())).t()  # (K, B)
    num_prototypes, global_batch = q.shape[0], q.shape[1] * world_size()
    q /= all_reduce_with_grad(q.sum())
    for _ in range(iterations):
        q /= all_reduce_with_grad(q.sum(dim=1, keepdim=True)) * num_prototypes
        q /= q.sum(dim=0, keepdim=True) * global_batch
    return (q * global_batch).t()


def all_reduce_max(value):
    if world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def nclip_loss(image_logits, text_logits, student_temp=0.1, teacher_temp=0.04,
               me_max_weight=1.0, regularizer="memax", image_center=None, text_center=None,
               target_grad=False):
    """nCLIP: each modality predicts the other's sharpened prototype distribution.

        p_v = softmax(h_v(f_v) / tau_s)        q_v = sg softmax(h_v(f_v) / tau_t)
        p_t = softmax(h_t(f_t) / tau_s)        q_t = sg softmax(h_t(f_t) / tau_t)
        L_pred = 1/2 [ H(q_t, p_v) + H(q_v, p_t) ]
        L_me   = -1/2 [ H(pbar_v) + H(pbar_t) ],  pbar = mean of p over the global batch
        L_nCLIP = L_pred + lambda_me * L_me

    image_logits, text_logits: (B, K) prototype logits h(f). `regularizer` picks how
    collapse is prevented: `memax` adds L_me (the paper); `center` subtracts an EMA
    center from the target logits (DINO); `sinkhorn` makes targets use every prototype
    equally over the batch (SwAV). Both of the latter drop L_me.
    Returns (loss, monitors), the monitors being detached scalars that show collapse.
    """
    image_logits, text_logits = at_least_float32(image_logits), at_least_float32(text_logits)
    log_p_v = F.log_softmax(image_logits / student_temp, dim=-1)
    log_p_t = F.log_softmax(text_logits / student_temp, dim=-1)
    q_v = prototype_targets(image_logits, teacher_temp, regularizer, image_center)
    q_t = prototype_targets(text_logits, teacher_temp, regularizer, text_center)
    if not target_grad:
        q_v, q_t = q_v.detach(), q_t.detach()
    prediction = (cross_entropy(q_t, log_p_v) + cross_entropy(q_v, log_p_t)) / 2

    pbar_v, pbar_t = global_mean(log_p_v.exp()), global_mean(log_p_t.exp())
    mean_entropy = -(entropy(pbar_v) + entropy(pbar_t)) / 2
    loss = prediction + (me_max_weight * mean_entropy if regularizer == "memax" else 0.0)

    with torch.no_grad():
        sample_entropy = (entropy(log_p_v.exp()).mean() + entropy(log_p_t.exp()).mean()) / 2
        same_prototype = (image_logits.argmax(-1) == text_logits.argmax(-1)).float().mean()
        monitors = {
            "nclip/prediction": prediction.detach(),
            "nclip/mean_entropy": mean_entropy.detach(),
            "nclip/image_perplexity": entropy(pbar_v).exp(),
            "nclip/text_perplexity": entropy(pbar_t).exp(),
            "nclip/sample_entropy": sample_entropy,
            # H(pbar) - mean_i H(p_i): what the prototype says about the sample. It falls to 0
            # when every sample gets the same distribution, however spread that one is.
            "nclip/information": (entropy(pbar_v) + entropy(pbar_t)) / 2 - sample_entropy,
            "nclip/same_prototype": all_reduce_with_grad(same_prototype) / world_size(),
        }
    return loss, monitors


def prototype_targets(logits, teacher_temp, regularizer, center):
    if regularizer == "sinkhorn":
        return sinkhorn(logits / teacher_temp)
    if regularizer == "center":
        logits = logits - center
    return F.softmax(logits / teacher_temp, dim=-1)


def xclip_loss(clip, nclip, nclip_weight=1.0):
    """xCLIP: L_xCLIP = L_CLIP + lambda_n * L_nCLIP, on shared encoders."""
    return clip + nclip_weight * nclip


class Objective(nn.Module):
    """Holds an objective's hyperparameters and state (nCLIP's EMA centers) and turns
    a TwoTowerOutput into (loss, metrics)."""

    def __init__(self, name, num_prototypes=0, student_temp=0.1, teacher_temp=0.04,
                 me_max_weight=1.0, nclip_weight=1.0, regularizer="memax",
                 center_momentum=0.9, target_grad=False, local_loss=False):
        super().__init__()
        assert regularizer in REGULARIZERS, regularizer
        self.name, self.regularizer = name, regularizer
        self.student_temp, self.teacher_temp = student_temp, teacher_temp
        self.me_max_weight, self.nclip_weight = me_max_weight, nclip_weight
        self.center_momentum, self.target_grad, self.local_loss = center_momentum, target_grad, local_loss
        if name != "clip" and regularizer == "center":
            self.register_buffer("image_center", torch.zeros(num_prototypes))
            self.register_buffer("text_center", torch.zeros(num_prototypes))

    def forward(self, out):
        metrics, loss = {}, 0.0
        if self.name in ("clip", "xclip"):
            loss = clip_loss(out.image_embeddings, out.text_embeddings, out.logit_scale,
                             self.local_loss)
            metrics["clip/loss"] = loss.detach()
            metrics["logit_scale"] = out.logit_scale.detach()
        if self.name in ("nclip", "xclip"):
            nclip, monitors = nclip_loss(
                out.image_prototype_logits, out.text_prototype_logits, self.student_temp,
                self.teacher_temp, self.me_max_weight, self.regularizer,
                getattr(self, "image_center", None), getattr(self, "text_center", None),
                self.target_grad)
            metrics.update(monitors, **{"nclip/loss": nclip.detach()})
            loss = nclip if self.name == "nclip" else xclip_loss(loss, nclip, self.nclip_weight)
            if self.regularizer == "center" and self.training:
                self.update_centers(out.image_prototype_logits, out.text_prototype_logits)
        return loss, metrics

    @torch.no_grad()
    def update_centers(self, image_logits, text_logits):
        """DINO's center: c <- m c + (1 - m) mean of the global batch's logits."""
        m = self.center_momentum
        self.image_center.mul_(m).add_(global_mean(at_least_float32(image_logits)), alpha=1 - m)
        self.text_center.mul_(m).add_(global_mean(at_least_float32(text_logits)), alpha=1 - m)
