"""The model builds what its objective needs, with the parameter count the
architecture implies, and its towers pool where the paper says."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import small_config
from data import normalize as normalize_pixels
from model import OBJECTIVES, PRESETS, ConvStem, TwoTowerModel, model_config
from synthetic import scored_scenes


def block_params(width, mlp_ratio):
    attention = 3 * width * width + 3 * width + width * width + width
    mlp = 2 * mlp_ratio * width * width + mlp_ratio * width + width
    return attention + mlp + 4 * width  # two LayerNorms


def stem_params(c):
    if not c.conv_stem:  # one patch-sized convolution, no bias
        return 3 * c.patch_size ** 2 * c.vision_width
    convolutions = round(math.log2(c.patch_size))  # each one halves the side
    channels = [3] + [c.vision_width // 2 ** (convolutions - i)
                      for i in range(1, convolutions + 1)]
    params = sum(9 * a * b + b for a, b in zip(channels, channels[1:]))  # 3x3 kernels, biases
    if c.conv_stem_norm:  # a GroupNorm's scale and shift after each convolution but the last
        params += sum(2 * b for b in channels[1:-1])
    return params


def expected_params(c, objective):
    vision = (stem_params(c) + c.vision_width
              + ((c.image_size // c.patch_size) ** 2 + 1) * c.vision_width
              + c.vision_layers * block_params(c.vision_width, c.mlp_ratio) + 4 * c.vision_width)
    text = ((c.vocab_size + c.context_length) * c.text_width
            + c.text_layers * block_params(c.text_width, c.mlp_ratio) + 2 * c.text_width)
    total = vision + text
    if objective in ("clip", "xclip"):
        total += (c.vision_width + c.text_width) * c.embed_dim + 1
    if objective in ("nclip", "xclip"):
        hidden, bottleneck = c.head_hidden_dim, c.head_bottleneck_dim
        mlp_tail = ((c.head_layers - 2) * (hidden * hidden + hidden)
                    + hidden * bottleneck + bottleneck)
        for width in (c.vision_width, c.text_width):
            total += width * hidden + hidden + mlp_tail + c.num_prototypes * bottleneck
    return total


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_every_preset_and_objective_builds_with_the_expected_parameter_count(preset, objective):
    config = model_config(preset)
    with torch.device("meta"):
        model = TwoTowerModel(config, objective)
    assert model.num_params() == expected_params(config, objective)
    assert hasattr(model, "image_projection") == (objective != "nclip")
    assert hasattr(model, "image_head") == (objective != "clip")


def test_vit_b16_clip_has_openai_clips_parameter_count_with_its_vocabulary():
    # OpenAI's ViT-B/16 CLIP has 149,620,737 parameters with its 49,408-token vocabulary;
    # cl100k_base's 100,277 tokens add (100277 - 49408) * 512 to the token embedding.
    with torch.device("meta"):
        openai_vocab = TwoTowerModel(model_config("vit_b16", vocab_size=49408), "clip")
        ours = TwoTowerModel(model_config("vit_b16"), "clip")
    assert openai_vocab.num_params() == 149_620_737
    assert ours.num_params() == 149_620_737 + (100277 - 49408) * 512


def test_preset_fields_can_be_overridden():
    config = model_config("tiny", vision_layers=2, num_prototypes=64, text_width=None)
    assert (config.vision_layers, config.num_prototypes) == (2, 64)
    assert config.text_width == PRESETS["tiny"]["text_width"]


def small_model(objective="xclip"):
    torch.manual_seed(0)
    return TwoTowerModel(small_config(), objective, student_temp=0.05).eval()


def test_forward_shapes_and_unit_norm_embeddings():
    model = small_model()
    images, tokens = torch.randn(3, 3, 16, 16), torch.tensor([[5, 6, 999, 0, 0, 0, 0, 0]] * 3)
    out = model(images, tokens)
    assert out.image_embeddings.shape == out.text_embeddings.shape == (3, model.config.embed_dim)
    assert torch.allclose(out.image_embeddings.norm(dim=-1), torch.ones(3))
    assert out.image_prototype_logits.shape == (3, model.config.num_prototypes)
    assert out.text_bottleneck.shape == (3, model.config.head_bottleneck_dim)


def test_text_feature_is_read_at_the_end_of_text_token():
    model = small_model()
    tokens = torch.tensor([[5, 6, 7, 999, 0, 0, 0, 0]])
    after_eot = tokens.clone()
    after_eot[0, 4:] = 42  # causal attention: what follows the end-of-text is never seen
    before_eot = tokens.clone()
    before_eot[0, 1] = 42
    feature = model.text_tower_features(tokens)
    assert torch.allclose(feature, model.text_tower_features(after_eot))
    assert not torch.allclose(feature, model.text_tower_features(before_eot))


def test_encode_image_and_text_are_clips_projected_embeddings():
    """As in CLIP and open_clip: encode_* project the tower feature, normalize=True
    makes it the unit embedding the CLIP loss scores."""
    model = small_model("clip")
    images, tokens = torch.randn(2, 3, 16, 16), torch.tensor([[5, 6, 999, 0, 0, 0, 0, 0]] * 2)
    projected = model.image_projection(model.image_tower_features(images))
    assert torch.allclose(model.encode_image(images), projected)
    assert not torch.allclose(model.encode_image(images).norm(dim=-1), torch.ones(2))
    out = model(images, tokens)
    assert torch.allclose(model.encode_image(images, normalize=True), out.image_embeddings)
    assert torch.allclose(model.encode_text(tokens, normalize=True), out.text_embeddings)


def test_nclip_zero_shot_embedding_is_the_root_of_the_prototype_distribution():
    model = small_model("nclip")
    images = torch.randn(2, 3, 16, 16)
    embedding = model.encode_image(images, normalize=True)
    logits = model(images, torch.full((2, 8), 999)).image_prototype_logits
    p = torch.softmax(logits / model.student_temp, dim=-1)
    assert torch.allclose(embedding.norm(dim=-1), torch.ones(2))
    assert torch.allclose(embedding ** 2, p, atol=1e-6)


def test_weight_decay_applies_to_weight_matrices_only():
    model = small_model()
    optimizer = model.configure_optimizers(1e-3, 0.2, (0.9, 0.98), 1e-6)
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in decayed}
    assert "visual.transformer.blocks.0.attn.qkv.weight" in names
    assert "image_head.prototypes" in names
    assert not any(k in name for name in names
                   for k in ("bias", "ln_", "embedding", "logit_scale"))
    assert optimizer.param_groups[1]["weight_decay"] == 0.0


def test_centered_prototype_logits_have_zero_batch_mean_in_training():
    model = small_model("nclip").train()
    images = torch.randn(6, 3, 16, 16)
    logits = model(images, torch.full((6, 8), 999)).image_prototype_logits
    zeros = torch.zeros(model.config.num_prototypes)
    assert torch.allclose(logits.mean(dim=0), zeros, atol=1e-6)


def test_evaluation_subtracts_the_running_center_of_the_training_batches():
    head = small_model("nclip").train().image_head
    features = torch.randn(6, head.mlp[0].in_features)
    bottleneck, cosines = head(features)
    assert torch.allclose(cosines, bottleneck @ F.normalize(head.prototypes, dim=-1).t())
    head.prototype_logits(cosines)
    # momentum 0.9, from 0
    assert torch.allclose(head.running_center, 0.1 * cosines.mean(0), atol=1e-6)
    head.eval()
    assert torch.allclose(head.prototype_logits(cosines), cosines - head.running_center, atol=1e-6)


def test_uncentered_prototype_logits_are_cosines():
    config = small_config(center_prototype_logits=False)
    model = TwoTowerModel(config, "nclip")
    logits = model(torch.randn(4, 3, 16, 16), torch.full((4, 8), 999)).image_prototype_logits
    assert logits.abs().max() <= 1 + 1e-6
    assert not hasattr(model.image_head, "running_center")


@pytest.mark.parametrize("normalize", (True, False))
@pytest.mark.parametrize("patch_size", (4, 8, 16))
def test_the_conv_stem_gives_one_token_per_patch_as_the_patch_projection_does(patch_size,
                                                                              normalize):
    stem = ConvStem(patch_size, width=64, normalize=normalize)
    patches = stem(torch.randn(2, 3, 4 * patch_size, 4 * patch_size))
    assert patches.shape == (2, 64, 4, 4)
    convolutions = [m for m in stem.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convolutions) == round(math.log2(patch_size))


@pytest.mark.parametrize("normalize", (True, False))
def test_only_the_normalized_conv_stem_starts_with_patches_that_outweigh_the_positions(normalize):
    # Built-in images through the tiny tower at initialization: without normalization the
    # image-dependent part of the patch features is smaller than the position embedding
    # added to it, so every image looks alike to the blocks.
    torch.manual_seed(0)
    tower = TwoTowerModel(model_config("tiny", conv_stem_norm=normalize), "clip").visual
    scenes = scored_scenes("val", 32, 0, 32, 4)
    images = normalize_pixels(torch.stack([scenes[i][0] for i in range(len(scenes))]))
    with torch.no_grad():
        patches = tower.patch_projection(images)  # (B, D, 4, 4)
    image_dependent = (patches - patches.mean(dim=0)).std()
    positions = tower.position_embedding.std()
    assert (image_dependent > positions) == normalize


def test_nclip_targets_under_bf16_autocast_equal_float32_ones():
    """The prototype head runs in float32 under autocast: the sharpened targets divide the
    cosines by tau_t, where bf16's rounding would move them by tenths of a nat."""
    model = small_model("nclip")
    features = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))

    def targets():
        _, cosines = model.image_head(features)
        return torch.softmax((cosines - cosines.mean(dim=0)) / 0.02, dim=-1)
    with torch.autocast("cpu", torch.bfloat16):
        under_autocast = targets()
    assert (under_autocast - targets()).abs().max() < 1e-3
