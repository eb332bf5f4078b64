"""Each objective against an independent computation, gradients against finite
differences, and ME-MAX at its extremes."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from losses import (NCLIPLoss, Objective, clip_loss, collapse_monitors, entropy, sinkhorn,
                    xclip_loss)
from model import TwoTowerOutput


def unit_rows(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def clip_loss_by_loops(u, w, s):
    """1/2 [CE(logits, diag) + CE(logits^T, diag)] written out element by element."""
    n = len(u)
    logits = [[s * float(np.dot(u[i], w[j])) for j in range(n)] for i in range(n)]
    image_to_text = sum(-logits[i][i] + math.log(sum(math.exp(logits[i][j]) for j in range(n)))
                        for i in range(n)) / n
    text_to_image = sum(-logits[j][j] + math.log(sum(math.exp(logits[i][j]) for i in range(n)))
                        for j in range(n)) / n
    return (image_to_text + text_to_image) / 2


def softmax_np(x, temperature):
    z = np.exp((x - x.max(axis=1, keepdims=True)) / temperature)
    return z / z.sum(axis=1, keepdims=True)


def nclip_loss_numpy(image_logits, text_logits, tau_s, tau_t, lambda_me, lambda_ent):
    p_v, p_t = softmax_np(image_logits, tau_s), softmax_np(text_logits, tau_s)
    q_v, q_t = softmax_np(image_logits, tau_t), softmax_np(text_logits, tau_t)
    prediction = 0.5 * (-(q_t * np.log(p_v)).sum(1).mean() - (q_v * np.log(p_t)).sum(1).mean())
    pbar_v, pbar_t = p_v.mean(0), p_t.mean(0)
    mean_entropy = -0.5 * (-(pbar_v * np.log(pbar_v)).sum() - (pbar_t * np.log(pbar_t)).sum())
    sample_entropy = 0.5 * (-(p_v * np.log(p_v)).sum(1).mean() - (p_t * np.log(p_t)).sum(1).mean())
    return prediction + lambda_me * mean_entropy + lambda_ent * sample_entropy


def test_clip_loss_matches_explicit_loops():
    u, w = unit_rows(7, 5, seed=1), unit_rows(7, 5, seed=2)
    expected = clip_loss_by_loops(u.numpy(), w.numpy(), 14.3)
    assert clip_loss(u, w, torch.tensor(14.3)).item() == pytest.approx(expected, rel=1e-5)


def test_clip_loss_is_low_for_aligned_pairs_and_log_batch_for_random_ones():
    u = unit_rows(16, 8)
    assert clip_loss(u, u, torch.tensor(100.0)).item() < 1e-3
    assert clip_loss(u, u, torch.tensor(0.0)).item() == pytest.approx(math.log(16), rel=1e-6)


def test_clip_local_loss_equals_global_loss_on_one_process():
    u, w, s = unit_rows(9, 4, seed=3), unit_rows(9, 4, seed=4), torch.tensor(20.0)
    assert clip_loss(u, w, s, local_loss=True).item() == pytest.approx(clip_loss(u, w, s).item())


@pytest.mark.parametrize("lambda_me,lambda_ent", [(0.0, 0.0), (1.0, 0.0), (2.5, 0.7)])
def test_nclip_loss_matches_numpy(lambda_me, lambda_ent):
    image_logits = torch.randn(6, 11, generator=torch.Generator().manual_seed(5)).tanh()
    text_logits = torch.randn(6, 11, generator=torch.Generator().manual_seed(6)).tanh()
    nclip = NCLIPLoss(11, student_temp=0.1, teacher_temp=0.04, me_max_weight=lambda_me,
                      entropy_weight=lambda_ent)
    loss, _ = nclip(image_logits.double(), text_logits.double())
    expected = nclip_loss_numpy(image_logits.double().numpy(), text_logits.double().numpy(),
                                0.1, 0.04, lambda_me, lambda_ent)
    assert loss.item() == pytest.approx(expected, rel=1e-10)


def test_xclip_loss_is_clip_plus_weighted_nclip():
    model_output = TwoTowerOutput(unit_rows(5, 4, seed=7), unit_rows(5, 4, seed=8),
                                  torch.tensor(10.0),
                                  torch.randn(5, 13).tanh(), torch.randn(5, 13).tanh(),
                                  unit_rows(5, 4, seed=9), unit_rows(5, 4, seed=10))
    clip = clip_loss(model_output.image_embeddings, model_output.text_embeddings,
                     model_output.logit_scale)
    nclip, _ = NCLIPLoss(13)(model_output.image_prototype_logits,
                             model_output.text_prototype_logits)
    loss, metrics = Objective("xclip", 13, nclip_weight=0.5)(model_output)
    assert loss.item() == pytest.approx(clip.item() + 0.5 * nclip.item(), rel=1e-6)
    assert xclip_loss(clip, nclip, 0.5).item() == pytest.approx(loss.item(), rel=1e-6)
    assert metrics["clip/loss"].item() == pytest.approx(clip.item())


def test_clip_loss_gradcheck():
    u = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u, w, s: clip_loss(u, w, s), (u, w, s))


def nclip_with_center(num_prototypes, regularizer, generator, **options):
    """An NCLIPLoss in eval mode (its DINO center frozen) with a random center."""
    nclip = NCLIPLoss(num_prototypes, regularizer=regularizer, student_temp=0.1, teacher_temp=0.04,
                      me_max_weight=1.0, **options).double().eval()
    center = torch.randn(2, num_prototypes, dtype=torch.float64, generator=generator) * 0.1
    nclip.dino_center.copy_(center)
    return nclip


def random_logits(batch, num_prototypes, generator):
    """Prototype logits of a batch, in (-1, 1) like cosines, float64 for gradient checks."""
    return (torch.randn(batch, num_prototypes, dtype=torch.float64, generator=generator)
            .tanh().requires_grad_())


@pytest.mark.parametrize("regularizer", ["memax", "center"])
def test_nclip_loss_gradcheck_with_gradient_through_targets(regularizer):
    generator = torch.Generator().manual_seed(11)
    image_logits = random_logits(4, 6, generator)
    text_logits = random_logits(4, 6, generator)
    nclip = nclip_with_center(6, regularizer, generator, entropy_weight=0.5, target_grad=True)
    assert torch.autograd.gradcheck(lambda v, t: nclip(v, t)[0], (image_logits, text_logits))


def numerical_gradient(f, x, eps=1e-6):
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        x[index] += eps
        up = f(x)
        x[index] -= 2 * eps
        down = f(x)
        x[index] += eps
        grad[index] = (up - down) / (2 * eps)
    return grad


def frozen_target_loss_numpy(image_logits, text_logits, q_v, q_t, tau_s, lambda_me, lambda_ent):
    """L_nCLIP with the targets q held fixed: what the stop-gradient differentiates."""
    p_v, p_t = softmax_np(image_logits, tau_s), softmax_np(text_logits, tau_s)
    prediction = 0.5 * (-(q_t * np.log(p_v)).sum(1).mean() - (q_v * np.log(p_t)).sum(1).mean())
    pbar_v, pbar_t = p_v.mean(0), p_t.mean(0)
    me_max = 0.5 * ((pbar_v * np.log(pbar_v)).sum() + (pbar_t * np.log(pbar_t)).sum())
    sample_entropy = 0.5 * (-(p_v * np.log(p_v)).sum(1).mean() - (p_t * np.log(p_t)).sum(1).mean())
    return prediction + lambda_me * me_max + lambda_ent * sample_entropy


@pytest.mark.parametrize("regularizer", ["memax", "center", "sinkhorn"])
def test_nclip_gradient_with_stopped_targets_matches_finite_differences(regularizer):
    generator = torch.Generator().manual_seed(10)
    image_logits = random_logits(5, 7, generator)
    text_logits = random_logits(5, 7, generator)
    nclip = nclip_with_center(7, regularizer, generator, entropy_weight=0.5)
    loss, _ = nclip(image_logits, text_logits)
    loss.backward()
    q_v = nclip.targets(image_logits.detach(), 0).numpy()
    q_t = nclip.targets(text_logits.detach(), 1).numpy()
    lambda_me = 1.0 if regularizer == "memax" else 0.0
    x_v, x_t = image_logits.detach().numpy().copy(), text_logits.detach().numpy().copy()

    def loss_of_image(x):
        return frozen_target_loss_numpy(x, x_t, q_v, q_t, 0.1, lambda_me, 0.5)

    def loss_of_text(x):
        return frozen_target_loss_numpy(x_v, x, q_v, q_t, 0.1, lambda_me, 0.5)
    np.testing.assert_allclose(image_logits.grad.numpy(), numerical_gradient(loss_of_image, x_v),
                               atol=1e-6)
    np.testing.assert_allclose(text_logits.grad.numpy(), numerical_gradient(loss_of_text, x_t),
                               atol=1e-6)


def test_xclip_objective_gradcheck():
    objective = Objective("xclip", 5, nclip_weight=0.7, target_grad=True)
    u = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    image_logits = torch.randn(4, 5, dtype=torch.float64).tanh().requires_grad_()
    text_logits = torch.randn(4, 5, dtype=torch.float64).tanh().requires_grad_()

    def loss(u, w, image_logits, text_logits):
        out = TwoTowerOutput(u, w, torch.tensor(2.0, dtype=torch.float64),
                             image_logits, text_logits, image_bottleneck=u, text_bottleneck=w)
        return objective(out)[0]
    assert torch.autograd.gradcheck(loss, (u, w, image_logits, text_logits))


def monitors_of(image_logits, text_logits, student_temp=0.01):
    bottleneck = torch.zeros(len(image_logits), 4)
    out = TwoTowerOutput(image_prototype_logits=image_logits, text_prototype_logits=text_logits,
                         image_bottleneck=bottleneck, text_bottleneck=bottleneck)
    return collapse_monitors(out, student_temp)


def test_monitors_of_a_batch_collapsed_onto_one_prototype():
    logits = torch.full((8, 16), -1.0)
    logits[:, 3] = 1.0  # every sample picks prototype 3: the mean distribution is one-hot
    monitors = monitors_of(logits, logits)
    assert monitors["nclip/image_perplexity"].item() == pytest.approx(1.0, abs=1e-4)
    assert monitors["nclip/information"].item() == pytest.approx(0.0, abs=1e-4)
    assert monitors["nclip/image_logit_spread"].item() == 0.0


def test_monitors_of_a_batch_collapsed_onto_one_wide_distribution():
    logits = torch.linspace(-1, 1, 16).repeat(8, 1)  # every sample gets the same distribution
    monitors = monitors_of(logits, logits, student_temp=1.0)
    assert monitors["nclip/image_perplexity"].item() > 12  # the usage looks healthy...
    assert monitors["nclip/information"].item() == pytest.approx(0.0, abs=1e-5)  # ...it is not
    assert monitors["nclip/same_prototype"].item() == 1.0  # and agreement is meaningless


def test_monitors_of_confident_balanced_agreeing_assignments():
    logits = torch.eye(16) * 2 - 1  # sample i picks prototype i: the mean is uniform
    monitors = monitors_of(logits, logits)
    assert monitors["nclip/text_perplexity"].item() == pytest.approx(16, rel=1e-4)
    assert monitors["nclip/information"].item() == pytest.approx(math.log(16), rel=1e-3)
    assert monitors["nclip/same_prototype"].item() == 1.0
    assert monitors["nclip/deviation_correlation"].item() == pytest.approx(1.0)


def test_deviation_correlation_is_near_zero_for_unrelated_modalities():
    generator = torch.Generator().manual_seed(12)
    image_logits = torch.randn(512, 32, generator=generator)
    text_logits = torch.randn(512, 32, generator=generator)
    assert abs(monitors_of(image_logits, text_logits)["nclip/deviation_correlation"].item()) < 0.05


def test_entropy_of_uniform_and_one_hot():
    assert entropy(torch.full((10,), 0.1)).item() == pytest.approx(math.log(10))
    assert entropy(F.one_hot(torch.tensor(2), 10).double()).item() == 0.0


def test_sinkhorn_targets_use_every_prototype_equally():
    scores = torch.randn(32, 8, generator=torch.Generator().manual_seed(9)) * 3
    q = sinkhorn(scores, iterations=50)
    assert torch.allclose(q.sum(dim=1), torch.ones(32), atol=1e-5)
    assert torch.allclose(q.sum(dim=0), torch.full((8,), 32 / 8), atol=1e-3)


def test_center_regularizer_updates_its_ema_and_drops_memax():
    nclip = NCLIPLoss(4, regularizer="center", center_momentum=0.9, entropy_weight=0.0)
    image_logits, text_logits = torch.rand(6, 4), torch.rand(6, 4)
    loss, terms = nclip(image_logits, text_logits)
    assert torch.allclose(nclip.dino_center[0], 0.1 * image_logits.mean(0))
    assert torch.allclose(nclip.dino_center[1], 0.1 * text_logits.mean(0))
    assert loss.item() == pytest.approx(terms["prediction"].item())
