"""The CLIP, nCLIP and xCLIP objectives, over the global batch.

Read top to bottom in the paper's order: the CLIP loss, the nCLIP loss (a module, like
DINOLoss, since its DINO-center ablation carries state) with SwAV's Sinkhorn for its
ablation, the xCLIP sum, then `Objective`, which turns a TwoTowerOutput into (loss,
metrics) for train.py, and last the monitors that show nCLIP collapsing. Everything that
crosses ranks goes through distributed.py.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from distributed import (all_reduce_max, all_reduce_sum, gather_with_grad, global_mean, rank,
                         world_size)
from model import CONTRASTIVE, NON_CONTRASTIVE, at_least_float32

REGULARIZERS = ("memax", "center", "sinkhorn")


# ------------------------------------------------------------------------------------------ CLIP

def clip_loss(image_embeddings, text_embeddings, logit_scale, local_loss=False):
    """CLIP (Radford et al. 2021), over the global batch:

        logits_ij = s * <u_i, w_j>
        L_CLIP = 1/2 [ CE(logits, diag) + CE(logits^T, diag) ]

    u, w: (B, D) unit-norm local embeddings. With `local_loss` each rank scores only
    its own rows against all columns (open_clip's local_loss): the same gradient,
    B x NB logits instead of NB x NB; the returned value is then this rank's share.
    """
    all_images = gather_with_grad(image_embeddings)
    all_texts = gather_with_grad(text_embeddings)
    if local_loss:
        batch = image_embeddings.shape[0]
        targets = torch.arange(batch, device=image_embeddings.device) + rank() * batch
        logits_per_image = logit_scale * image_embeddings @ all_texts.t()  # (B, NB)
        logits_per_text = logit_scale * text_embeddings @ all_images.t()   # (B, NB)
    else:
        targets = torch.arange(all_images.shape[0], device=image_embeddings.device)
        logits_per_image = logit_scale * all_images @ all_texts.t()        # (NB, NB)
        logits_per_text = logits_per_image.t()
    image_to_text = F.cross_entropy(logits_per_image, targets)
    text_to_image = F.cross_entropy(logits_per_text, targets)
    return (image_to_text + text_to_image) / 2


# ----------------------------------------------------------------------------------------- nCLIP

def soft_cross_entropy(log_predictions, targets):
    """H(q, p) = -mean_i sum_k q_ik log p_ik, for log p (B, K) and targets q (B, K): the
    argument order of F.cross_entropy, with a distribution for a target."""
    return -(targets * log_predictions).sum(dim=-1).mean()


def entropy(probabilities):
    """H(p) = -sum_k p_k log p_k, over the last dimension."""
    return -(probabilities * torch.log(probabilities.clamp_min(1e-12))).sum(dim=-1)


class NCLIPLoss(nn.Module):
    """nCLIP: each modality predicts the other's sharpened prototype distribution.

        p_v = softmax(h_v(f_v) / tau_s)        q_v = sg softmax(h_v(f_v) / tau_t)
        p_t = softmax(h_t(f_t) / tau_s)        q_t = sg softmax(h_t(f_t) / tau_t)
        L_pred = 1/2 [ H(q_t, p_v) + H(q_v, p_t) ]
        L_me   = -1/2 [ H(pbar_v) + H(pbar_t) ],   pbar = mean of p over the global batch
        L_ent  = 1/2 [ mean_i H(p_v,i) + mean_i H(p_t,i) ]
        L_nCLIP = L_pred + lambda_me L_me + lambda_ent L_ent

    The constructor's defaults are the paper's form: tau_s 0.1, tau_t 0.04, lambda_me 1,
    and no L_ent (lambda_ent 0; MSN's ent_weight, TWIST's sharpness term, not in the
    paper). train.py's flags hold this project's tuned values, each flag's help the
    paper's beside it.

    The inputs are the prototype logits h(f), (B, K) each: the cosines between each
    sample's bottleneck feature and the prototypes, which the model centres over the
    batch first (PrototypeHead.prototype_logits, ModelConfig.center_prototype_logits).
    `regularizer` picks how collapse is fought: `memax` adds L_me (the paper); `center`
    subtracts DINO's EMA center from the target logits; `sinkhorn` makes the targets use
    every prototype equally over the batch (SwAV). The latter two drop L_me.
    """

    def __init__(self, num_prototypes, *, student_temp=0.1, teacher_temp=0.04, me_max_weight=1.0,
                 entropy_weight=0.0, regularizer="memax", center_momentum=0.9, target_grad=False):
        super().__init__()
        assert regularizer in REGULARIZERS, regularizer
        self.student_temp, self.teacher_temp = student_temp, teacher_temp
        self.me_max_weight, self.entropy_weight = me_max_weight, entropy_weight
        self.regularizer, self.center_momentum = regularizer, center_momentum
        self.target_grad = target_grad
        # DINO's center of the target logits, (image, text): --regularizer center only
        self.register_buffer("dino_center", torch.zeros(2, num_prototypes))

    def forward(self, image_logits, text_logits):
        """Returns (L_nCLIP, terms): the loss and its detached parts."""
        image_logits, text_logits = at_least_float32(image_logits), at_least_float32(text_logits)
        log_p_v = F.log_softmax(image_logits / self.student_temp, dim=-1)
        log_p_t = F.log_softmax(text_logits / self.student_temp, dim=-1)
        q_v, q_t = self.targets(image_logits, 0), self.targets(text_logits, 1)
        prediction = (soft_cross_entropy(log_p_v, q_t) + soft_cross_entropy(log_p_t, q_v)) / 2

        p_v, p_t = log_p_v.exp(), log_p_t.exp()
        mean_entropy = (entropy(global_mean(p_v)) + entropy(global_mean(p_t))) / 2
        sample_entropy = (entropy(p_v).mean() + entropy(p_t).mean()) / 2
        me_max = -mean_entropy if self.regularizer == "memax" else torch.zeros_like(mean_entropy)
        loss = prediction + self.me_max_weight * me_max + self.entropy_weight * sample_entropy
        terms = {"prediction": prediction, "me_max": me_max, "sample_entropy": sample_entropy}
        return loss, {name: value.detach() for name, value in terms.items()}

    def targets(self, logits, modality):
        """q = softmax(h(f) / tau_t), or its Sinkhorn or DINO-centered variant; no gradient
        unless --target-grad."""
        if self.regularizer == "sinkhorn":
            return sinkhorn(logits.detach() / self.teacher_temp)
        if self.regularizer == "center":
            centered = logits - self.dino_center[modality]
            if self.training:  # DINO: c <- m c + (1 - m) mean of the batch's logits
                batch_mean = global_mean(logits.detach())
                self.dino_center[modality].lerp_(batch_mean, 1 - self.center_momentum)
            logits = centered
        targets = F.softmax(logits / self.teacher_temp, dim=-1)
        return targets if self.target_grad else targets.detach()


@torch.no_grad()
def sinkhorn(scores, iterations=3):
    """SwAV's equipartition over the global batch: Q = diag(a) exp(scores) diag(b)
    with every prototype used equally and every sample's row summing to 1."""
    scores = at_least_float32(scores)
    q = torch.exp(scores - all_reduce_max(scores.max())).t()  # (K, B)
    num_prototypes, global_batch = q.shape[0], q.shape[1] * world_size()
    q /= all_reduce_sum(q.sum())
    for _ in range(iterations):
        q /= all_reduce_sum(q.sum(dim=1, keepdim=True)) * num_prototypes
        q /= q.sum(dim=0, keepdim=True) * global_batch
    return (q * global_batch).t()


# ----------------------------------------------------------------------------------------- xCLIP

def xclip_loss(clip, nclip, nclip_weight=1.0):
    """xCLIP: L_xCLIP = L_CLIP + lambda_n * L_nCLIP, on shared encoders."""
    return clip + nclip_weight * nclip


class Objective(nn.Module):
    """CLIP, nCLIP or xCLIP by name (model.OBJECTIVES): turns a TwoTowerOutput into
    (loss, metrics). `nclip_options` are NCLIPLoss's."""

    def __init__(self, name, num_prototypes=0, *, nclip_weight=1.0, local_loss=False,
                 **nclip_options):
        super().__init__()
        self.name, self.nclip_weight, self.local_loss = name, nclip_weight, local_loss
        if name in NON_CONTRASTIVE:
            self.nclip = NCLIPLoss(num_prototypes, **nclip_options)

    def forward(self, out):
        metrics, loss = {}, 0.0
        if self.name in CONTRASTIVE:
            loss = clip_loss(out.image_embeddings, out.text_embeddings, out.logit_scale,
                             self.local_loss)
            metrics["clip/loss"] = loss.detach()
            metrics["logit_scale"] = out.logit_scale.detach()
        if self.name in NON_CONTRASTIVE:
            nclip, terms = self.nclip(out.image_prototype_logits, out.text_prototype_logits)
            metrics["nclip/loss"] = nclip.detach()
            metrics.update({f"nclip/{name}_loss": value for name, value in terms.items()})
            metrics.update(collapse_monitors(out, self.nclip.student_temp))
            loss = nclip if self.name == "nclip" else xclip_loss(loss, nclip, self.nclip_weight)
        return loss, metrics


# -------------------------------------------------------------------------------------- monitors

@torch.no_grad()
def collapse_monitors(out, student_temp):
    """What shows nCLIP collapse, from a TwoTowerOutput (local batch; train.py averages
    over ranks and log steps):

    - perplexity exp H(pbar) per modality: prototype usage; 1 = one prototype for all;
    - information H(pbar) - mean_i H(p_i): what the distribution says about the sample;
      0 when every sample gets the same distribution, however spread that one is;
    - same_prototype: share of pairs whose image and text pick the same argmax;
    - logit and bottleneck spread per modality: root-mean-square deviation from the batch
      mean (cosine units); they fall towards 0 as the heads turn into constants;
    - deviation_correlation: correlation between the image's and the text's per-sample
      logit deviations over the pairs; near 0, each modality's targets are noise to the other.
    """
    monitors = {}
    sample_entropies, mean_entropies, deviations = [], [], []
    for modality in ("image", "text"):
        logits = at_least_float32(getattr(out, f"{modality}_prototype_logits"))
        p = F.softmax(logits / student_temp, dim=-1)
        pbar_entropy = entropy(p.mean(dim=0))
        sample_entropies.append(entropy(p).mean())
        mean_entropies.append(pbar_entropy)
        deviation = logits - logits.mean(dim=0)
        deviations.append(deviation)
        bottleneck = at_least_float32(getattr(out, f"{modality}_bottleneck"))
        bottleneck_deviation = bottleneck - bottleneck.mean(dim=0)
        monitors[f"nclip/{modality}_perplexity"] = pbar_entropy.exp()
        monitors[f"nclip/{modality}_logit_spread"] = deviation.pow(2).mean().sqrt()
        bottleneck_spread = bottleneck_deviation.pow(2).sum(-1).mean().sqrt()
        monitors[f"nclip/{modality}_bottleneck_spread"] = bottleneck_spread
    sample_entropy = sum(sample_entropies) / 2
    monitors["nclip/sample_entropy"] = sample_entropy
    monitors["nclip/information"] = sum(mean_entropies) / 2 - sample_entropy
    same = out.image_prototype_logits.argmax(-1) == out.text_prototype_logits.argmax(-1)
    monitors["nclip/same_prototype"] = same.float().mean()
    image_deviation, text_deviation = deviations
    covariance = (image_deviation * text_deviation).sum()
    monitors["nclip/deviation_correlation"] = covariance / (
        image_deviation.norm() * text_deviation.norm()).clamp_min(1e-12)
    return monitors
