"""The two-tower model of CLIP, nCLIP and xCLIP: a ViT image tower, a causal text
tower, the CLIP projections and the nCLIP prototype heads.

Reads top to bottom in the order data flows: config and presets, attention, MLP,
block, the two towers, the prototype head, then the model that ties them together,
its optimizer groups and the learning-rate schedule.
"""
import math
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from distributed import global_mean

OBJECTIVES = ("clip", "nclip", "xclip")
CONTRASTIVE = ("clip", "xclip")       # the objectives with CLIP's projections and logit scale
NON_CONTRASTIVE = ("nclip", "xclip")  # the objectives with nCLIP's prototype heads


def _field(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    image_size: int = _field(224, "input image side in pixels")
    patch_size: int = _field(16, "ViT patch side in pixels")
    conv_stem: bool = _field(
        False, "patchify with stride-2 3x3 convolutions instead of one patch-sized one "
               "(see ConvStem; the patch side must be a power of 2); on in the tiny preset, off "
               "in the paper's ViTs")
    conv_stem_norm: bool = _field(
        False, "normalize the conv stem's feature maps between its convolutions (GroupNorm, "
               "one group: see ConvStem); on in the tiny preset")
    vision_width: int = _field(768, "image tower width")
    vision_layers: int = _field(12, "image tower depth")
    vision_heads: int = _field(12, "image tower attention heads")
    context_length: int = _field(77, "text tokens per caption, end-of-text included")
    vocab_size: int = _field(100277, "token vocabulary (cl100k_base has 100277)")
    text_width: int = _field(512, "text tower width")
    text_layers: int = _field(12, "text tower depth")
    text_heads: int = _field(8, "text tower attention heads")
    embed_dim: int = _field(512, "CLIP joint embedding dimension")
    mlp_ratio: int = _field(4, "MLP hidden width as a multiple of the block width")
    quick_gelu: bool = _field(
        False, "QuickGELU, x * sigmoid(1.702 x), in the towers' MLPs instead of GELU: what "
               "OpenAI's CLIP weights were trained with (interop.py import sets it)")
    num_prototypes: int = _field(16384, "nCLIP prototypes K")
    head_hidden_dim: int = _field(2048, "nCLIP head MLP hidden width")
    head_bottleneck_dim: int = _field(256, "nCLIP head bottleneck before the prototypes")
    head_layers: int = _field(3, "nCLIP head MLP layers")
    center_prototype_logits: bool = _field(
        True, "subtract each prototype logit's batch mean before the softmaxes (see "
              "PrototypeHead); on in every preset")
    eot_token_id: int = _field(100257, "end-of-text token, where the text tower pools")
    tokenizer: str = _field(
        "cl100k", "the captions' BPE (data.tokenizer_for): cl100k (tiktoken's cl100k_base) or "
                  "clip (CLIP's 49,408 tokens, from open_clip: what OpenAI's weights read)")

    def __post_init__(self):
        problem = self.problem()
        if problem:
            raise ValueError(problem)

    def problem(self):
        """What makes this architecture unbuildable, as a one-line message naming the
        flags; None if nothing."""
        for tower in ("vision", "text"):
            width, heads = getattr(self, f"{tower}_width"), getattr(self, f"{tower}_heads")
            if width % heads:
                return f"--{tower}-width {width} is not a multiple of --{tower}-heads {heads}"
        if self.context_length < 2:
            return (f"--context-length {self.context_length} leaves no room for a word beside "
                    "the end-of-text token; pass at least 2 (CLIP: 77)")
        if self.image_size < self.patch_size:
            return f"--image-size {self.image_size} is smaller than --patch-size {self.patch_size}"
        if self.conv_stem and (self.patch_size & (self.patch_size - 1)
                               or self.image_size % self.patch_size):
            return (f"--conv-stem needs a power-of-2 --patch-size that divides --image-size; got "
                    f"--patch-size {self.patch_size}, --image-size {self.image_size}")
        if self.conv_stem and self.vision_width < self.patch_size // 2:
            return (f"--conv-stem halves --vision-width once per stride-2 convolution: it needs "
                    f"at least {self.patch_size // 2} for --patch-size {self.patch_size}")
        return None


PRESETS = {
    # Seconds per step on a laptop CPU; what the default job and the tests train.
    "tiny": dict(image_size=32, patch_size=8, conv_stem=True, conv_stem_norm=True,
                 vision_width=128, vision_layers=4, vision_heads=4, context_length=24,
                 text_width=128, text_layers=2, text_heads=4, embed_dim=128, num_prototypes=64,
                 head_hidden_dim=512, head_bottleneck_dim=128),
    "vit_s16": dict(vision_width=384, vision_heads=6, text_width=384, text_heads=6,
                    embed_dim=384),
    "vit_b16": dict(),  # the paper's ViT-B/16 with CLIP's text transformer
}


def model_config(preset, **overrides):
    """The preset's config with any field replaced; None means keep the preset's."""
    config = replace(ModelConfig(), **PRESETS[preset])
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})


def at_least_float32(x):  # bf16 from autocast -> float32; float64 stays (gradcheck)
    return x.to(torch.promote_types(x.dtype, torch.float32))


def autocast_context(device, precision="auto"):
    """bf16 autocast for precision "bf16", or "auto" on a GPU; plain fp32 otherwise."""
    device_type = torch.device(device).type
    use_bf16 = precision == "bf16" or (precision == "auto" and device_type == "cuda")
    return torch.autocast(device_type, torch.bfloat16) if use_bf16 else nullcontext()


class Attention(nn.Module):
    def __init__(self, width, heads, causal):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x):  # (B, L, D)
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, H, L, D/H)
        return self.out(y.transpose(1, 2).reshape(B, L, D))


class MLP(nn.Module):
    def __init__(self, width, ratio, quick_gelu=False):
        super().__init__()
        self.fc = nn.Linear(width, ratio * width)
        self.proj = nn.Linear(ratio * width, width)
        self.quick_gelu = quick_gelu

    def forward(self, x):
        hidden = self.fc(x)
        # QuickGELU, CLIP's sigmoid approximation of GELU, for OpenAI's weights
        hidden = hidden * torch.sigmoid(1.702 * hidden) if self.quick_gelu else F.gelu(hidden)
        return self.proj(hidden)


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, width, heads, mlp_ratio, causal, quick_gelu=False):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, causal)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_ratio, quick_gelu)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, mlp_ratio, causal, quick_gelu=False):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, causal, quick_gelu)
                                    for _ in range(layers))
        self.grad_checkpointing = False

    def forward(self, x):
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


class ConvStem(nn.Module):
    """Early convolutions (Xiao et al. 2021, "Early Convolutions Help Transformers See
    Better"): log2(patch) stride-2 3x3 convolutions with GELU between them, channels
    doubling up to the width, give one token per patch as the patch-sized convolution
    does, from features that have seen edges and corners first. Xiao et al. end with a 1x1
    convolution; here the ViT's ln_pre follows.

    `normalize` puts a normalization before each GELU, as Xiao et al. put BatchNorm there.
    Without one, PyTorch's default initialization shrinks the signal at every convolution:
    the patch features start about three times smaller than the position embedding they
    are added to, every image looks alike to the blocks, and the tower is slow to learn
    shape (experiments/README.md). This uses GroupNorm with one group, which
    standardizes each image's feature map over its channels and positions: unlike
    BatchNorm it does not mix the samples of a batch, so N processes and gradient
    accumulation still compute exactly one batch's gradient."""

    def __init__(self, patch_size, width, normalize=False):
        super().__init__()
        channels = self.channels(patch_size, width)
        layers = []
        for i in range(len(channels) - 1):
            layers.append(nn.Conv2d(channels[i], channels[i + 1], 3, stride=2, padding=1))
            if i < len(channels) - 2:
                if normalize:
                    layers.append(nn.GroupNorm(1, channels[i + 1]))
                layers.append(nn.GELU())
        self.layers = nn.Sequential(*layers)

    @staticmethod
    def channels(patch_size, width):
        """RGB, then one count per stride-2 convolution, doubling up to `width`."""
        depth = patch_size.bit_length() - 1
        return [3] + [width >> (depth - i) for i in range(1, depth + 1)]

    def forward(self, images):  # (B, 3, H, W) -> (B, width, H / patch, W / patch)
        return self.layers(images)


class VisionTransformer(nn.Module):
    """ViT as in CLIP: patches + class token + positions, LayerNorm, blocks, LayerNorm.
    The class token's final state is the image feature f_v."""

    def __init__(self, c):
        super().__init__()
        num_patches = (c.image_size // c.patch_size) ** 2
        if c.conv_stem:
            self.patch_projection = ConvStem(c.patch_size, c.vision_width, c.conv_stem_norm)
        else:
            self.patch_projection = nn.Conv2d(3, c.vision_width, c.patch_size, c.patch_size,
                                              bias=False)
        self.class_embedding = nn.Parameter(torch.randn(c.vision_width) * c.vision_width ** -0.5)
        self.position_embedding = nn.Parameter(
            torch.randn(num_patches + 1, c.vision_width) * c.vision_width ** -0.5)
        self.ln_pre = nn.LayerNorm(c.vision_width)
        self.transformer = Transformer(c.vision_width, c.vision_layers, c.vision_heads,
                                       c.mlp_ratio, causal=False, quick_gelu=c.quick_gelu)
        self.ln_post = nn.LayerNorm(c.vision_width)

    def forward(self, images):  # (B, 3, H, W) -> (B, vision_width)
        patches = self.patch_projection(images).flatten(2).transpose(1, 2)  # (B, N, D)
        class_token = self.class_embedding.expand(patches.shape[0], 1, -1)
        x = torch.cat([class_token, patches], dim=1) + self.position_embedding
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0])


class TextTransformer(nn.Module):
    """Causal transformer over BPE tokens; the text feature f_t is the final-LayerNorm
    state at the end-of-text token, which has seen the whole caption."""

    def __init__(self, c):
        super().__init__()
        self.eot_token_id = c.eot_token_id
        self.token_embedding = nn.Embedding(c.vocab_size, c.text_width)
        self.position_embedding = nn.Parameter(torch.randn(c.context_length, c.text_width) * 0.01)
        self.transformer = Transformer(c.text_width, c.text_layers, c.text_heads,
                                       c.mlp_ratio, causal=True, quick_gelu=c.quick_gelu)
        self.ln_final = nn.LayerNorm(c.text_width)

    def forward(self, tokens):  # (B, L) -> (B, text_width)
        x = self.token_embedding(tokens) + self.position_embedding[: tokens.shape[1]]
        x = self.ln_final(self.transformer(x))
        eot_positions = (tokens == self.eot_token_id).int().argmax(dim=1)
        return x[torch.arange(x.shape[0], device=x.device), eot_positions]


class PrototypeHead(nn.Module):
    """nCLIP head h (DINO-style): MLP to a bottleneck, L2-normalize, then a
    weight-normalized linear layer without bias onto K prototypes. The prototype
    norms are fixed at 1 (DINO's norm_last_layer), so a logit is the cosine between
    the bottleneck feature and a prototype, in [-1, 1].

    With `center_logits`, each prototype's logit has its mean over the global batch
    subtracted (mean-only batch normalization, Salimans & Kingma 2016; DINO's centering,
    here on predictions and targets alike and with the current batch's mean). Without it,
    the component every sample shares dominates the logits at initialization, every
    sharpened target picks the same prototypes, and nCLIP collapses (experiments/README.md).
    Evaluation subtracts a running mean instead, as BatchNorm does."""

    def __init__(self, in_dim, hidden_dim, bottleneck_dim, num_prototypes, layers,
                 center_logits=True, center_momentum=0.9):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (layers - 1) + [bottleneck_dim]
        mlp = []
        for i in range(layers):
            mlp.append(nn.Linear(dims[i], dims[i + 1]))
            if i < layers - 1:
                mlp.append(nn.GELU())
        self.mlp = nn.Sequential(*mlp)
        self.prototypes = nn.Parameter(torch.randn(num_prototypes, bottleneck_dim))
        self.center_logits, self.center_momentum = center_logits, center_momentum
        if center_logits:
            self.register_buffer("running_center", torch.zeros(num_prototypes))

    def forward(self, features):  # (B, in_dim) -> bottleneck (B, bottleneck_dim), cosines (B, K)
        # In float32 under autocast too: the targets divide the cosines by tau_t = 0.02, which
        # turns bf16's rounding of a cosine (up to 0.004) into 0.2 nats. The head is a few
        # million multiply-adds a sample against the towers' billions.
        with torch.autocast(features.device.type, enabled=False):
            bottleneck = F.normalize(self.mlp(at_least_float32(features)), dim=-1)
            return bottleneck, bottleneck @ F.normalize(self.prototypes, dim=-1).t()

    def prototype_logits(self, cosines, update_running_center=True):
        """The prototype logits h(f) from forward's cosines: minus each prototype's mean
        over the global batch in training (and that mean folded into the running center),
        minus the running center in evaluation; the cosines themselves without centering."""
        if not self.center_logits:
            return cosines
        if not self.training:
            return cosines - self.running_center
        center = global_mean(at_least_float32(cosines))
        if update_running_center:
            with torch.no_grad():
                running_center = self.running_center
                running_center.lerp_(center.to(running_center.dtype), 1 - self.center_momentum)
        return cosines - center

    @torch.no_grad()
    def parameter_norms(self):
        """Norms of the MLP's weight matrices and of its biases: a head that collapses
        through its biases shows a growing bias norm."""
        linears = [layer for layer in self.mlp if isinstance(layer, nn.Linear)]
        weight_norm = torch.stack([layer.weight.norm() for layer in linears]).norm()
        bias_norm = torch.stack([layer.bias.norm() for layer in linears]).norm()
        return weight_norm, bias_norm


@dataclass
class TwoTowerOutput:
    image_embeddings: torch.Tensor = None         # (B, embed_dim), unit norm: u
    text_embeddings: torch.Tensor = None          # (B, embed_dim), unit norm: w
    logit_scale: torch.Tensor = None              # scalar s = exp(t)
    image_prototype_logits: torch.Tensor = None   # (B, K): h_v(f_v)
    text_prototype_logits: torch.Tensor = None    # (B, K): h_t(f_t)
    image_bottleneck: torch.Tensor = None         # (B, bottleneck), unit norm: for the monitors
    text_bottleneck: torch.Tensor = None


class TwoTowerModel(nn.Module):
    """The objective decides what is built: `clip` has projections and a logit scale,
    `nclip` has prototype heads, `xclip` has both, on the same two towers."""

    def __init__(self, config: ModelConfig, objective="xclip", student_temp=None):
        super().__init__()
        assert objective in OBJECTIVES, objective
        # student_temp: tau_s of the objective, which an nCLIP model's embedding needs
        self.config, self.objective, self.student_temp = config, objective, student_temp
        self.visual = VisionTransformer(config)
        self.text = TextTransformer(config)
        self.has_clip = objective in CONTRASTIVE
        self.has_prototypes = objective in NON_CONTRASTIVE
        if self.has_clip:
            self.image_projection = nn.Linear(config.vision_width, config.embed_dim, bias=False)
            self.text_projection = nn.Linear(config.text_width, config.embed_dim, bias=False)
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # t
        if self.has_prototypes:
            head = dict(hidden_dim=config.head_hidden_dim, layers=config.head_layers,
                        bottleneck_dim=config.head_bottleneck_dim,
                        num_prototypes=config.num_prototypes,
                        center_logits=config.center_prototype_logits)
            self.image_head = PrototypeHead(config.vision_width, **head)
            self.text_head = PrototypeHead(config.text_width, **head)
        self._init_weights()

    def _init_weights(self):
        """CLIP's initialization, scaled by each tower's width and depth: a narrow model
        starts with towers whose features already vary with their input."""
        towers = ((self.visual, self.config.vision_width, self.config.vision_layers),
                  (self.text, self.config.text_width, self.config.text_layers))
        for tower, width, layers in towers:
            projection_std = width ** -0.5 * (2 * layers) ** -0.5
            for block in tower.transformer.blocks:
                nn.init.normal_(block.attn.qkv.weight, std=width ** -0.5)
                nn.init.normal_(block.attn.out.weight, std=projection_std)
                nn.init.normal_(block.mlp.fc.weight, std=(2 * width) ** -0.5)
                nn.init.normal_(block.mlp.proj.weight, std=projection_std)
                for linear in (block.attn.qkv, block.attn.out, block.mlp.fc, block.mlp.proj):
                    nn.init.zeros_(linear.bias)
        nn.init.normal_(self.text.token_embedding.weight, std=0.02)
        if self.has_clip:
            nn.init.normal_(self.image_projection.weight, std=self.config.vision_width ** -0.5)
            nn.init.normal_(self.text_projection.weight, std=self.config.text_width ** -0.5)
        if self.has_prototypes:  # DINO's head initialization
            for module in [*self.image_head.mlp, *self.text_head.mlp]:
                if isinstance(module, nn.Linear):
                    nn.init.trunc_normal_(module.weight, std=0.02)
                    nn.init.zeros_(module.bias)

    def image_tower_features(self, images):
        """f_v: the image tower's class-token feature, before any projection; what the
        linear probe uses. -> (B, vision_width)"""
        return self.visual(images)

    def text_tower_features(self, tokens):
        """f_t: the text tower's feature at the end-of-text token. -> (B, text_width)"""
        return self.text(tokens)

    def encode_image(self, images, normalize=False):
        """The image embedding, as in CLIP and open_clip: W_v f_v (u once normalized). An
        nCLIP model has no projection: its embedding is sqrt(p_v), already of unit norm
        (see prototype_embedding). -> (B, embed_dim), or (B, K) for nCLIP"""
        features = self.image_tower_features(images)
        if not self.has_clip:
            _, cosines = self.image_head(features)
            return self.prototype_embedding(self.image_head.prototype_logits(cosines))
        embeddings = self.image_projection(features)
        return F.normalize(embeddings, dim=-1) if normalize else embeddings

    def encode_text(self, tokens, normalize=False):
        """The text embedding: W_t f_t (w once normalized), or sqrt(p_t) for nCLIP."""
        features = self.text_tower_features(tokens)
        if not self.has_clip:
            _, cosines = self.text_head(features)
            return self.prototype_embedding(self.text_head.prototype_logits(cosines))
        embeddings = self.text_projection(features)
        return F.normalize(embeddings, dim=-1) if normalize else embeddings

    def prototype_embedding(self, prototype_logits):
        """nCLIP has no joint space but the prototypes: embed a sample as the square
        root of its distribution p = softmax(h(f) / tau_s), a unit vector whose dot
        product with another is the Bhattacharyya coefficient sum_k sqrt(p_k q_k)."""
        assert self.student_temp, "an nclip model's embedding needs its student_temp (tau_s)"
        return F.softmax(prototype_logits.float() / self.student_temp, dim=-1).sqrt()

    def forward(self, images, tokens, raw_cosines=False):
        """A TwoTowerOutput. With raw_cosines=True the prototype logits are the heads'
        raw cosines, for a caller that centers a larger batch assembled from several
        calls (gradient accumulation, train.py) with center_cosines."""
        image_features = self.image_tower_features(images)
        text_features = self.text_tower_features(tokens)
        out = TwoTowerOutput()
        if self.has_clip:
            out.image_embeddings = F.normalize(self.image_projection(image_features), dim=-1)
            out.text_embeddings = F.normalize(self.text_projection(text_features), dim=-1)
            out.logit_scale = self.logit_scale.exp()
        if self.has_prototypes:
            out.image_bottleneck, out.image_prototype_logits = self.image_head(image_features)
            out.text_bottleneck, out.text_prototype_logits = self.text_head(text_features)
            if not raw_cosines:
                out = self.center_cosines(out)
        return out

    def center_cosines(self, out, update_running_center=True):
        """`out` with each head's cosines turned into its prototype logits, centered over
        the batch (PrototypeHead.prototype_logits)."""
        if not self.has_prototypes:
            return out
        image_logits = self.image_head.prototype_logits(out.image_prototype_logits,
                                                        update_running_center)
        text_logits = self.text_head.prototype_logits(out.text_prototype_logits,
                                                      update_running_center)
        return replace(out, image_prototype_logits=image_logits, text_prototype_logits=text_logits)

    @torch.no_grad()
    def head_norms(self):
        """Weight and bias norms of each prototype head's MLP, for the collapse monitors."""
        norms = {}
        if self.has_prototypes:
            for modality, head in (("image", self.image_head), ("text", self.text_head)):
                weight_norm, bias_norm = head.parameter_norms()
                norms[f"nclip/{modality}_head_weight_norm"] = weight_norm
                norms[f"nclip/{modality}_head_bias_norm"] = bias_norm
        return norms

    @torch.no_grad()
    def clamp_logit_scale(self, max_scale=100.0):
        """Keep s = exp(t) <= 100, as CLIP does after each optimizer step."""
        if self.has_clip:
            self.logit_scale.clamp_(max=math.log(max_scale))

    def enable_grad_checkpointing(self):
        self.visual.transformer.grad_checkpointing = True
        self.text.transformer.grad_checkpointing = True

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def configure_optimizers(self, lr, weight_decay, betas, eps):
        """AdamW with weight decay on weight matrices only: not on norms, biases,
        the token, position and class embeddings, or the logit scale."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            is_embedding = "embedding" in name
            (decay if p.ndim >= 2 and not is_embedding else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        # The fused kernel (CUDA, and CPU since torch 2.4) updates each tensor in one pass;
        # on the tiny preset the step spends 12% of its time in foreach AdamW otherwise.
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)


def learning_rate(step, peak, warmup, steps):
    """Linear warm-up to `peak`, then cosine decay to 0 at `steps`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))
