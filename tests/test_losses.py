"""Each objective against an independent computation, gradients against finite
differences, and ME-MAX at its extremes."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from losses import Objective, clip_loss, entropy, nclip_loss, prototype_targets, sinkhorn, xclip_loss
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


def nclip_loss_numpy(image_logits, text_logits, tau_s, tau_t, lambda_me):
    p_v, p_t = softmax_np(image_logits, tau_s), softmax_np(text_logits, tau_s)
    q_v, q_t = softmax_np(image_logits, tau_t), softmax_np(text_logits, tau_t)
    prediction = 0.5 * (-(q_t * np.log(p_v)).sum(1).mean() - (q_v * np.log(p_t)).sum(1).mean())
    pbar_v, pbar_t = p_v.mean(0), p_t.mean(0)
    mean_entropy = -0.5 * (-(pbar_v * np.log(pbar_v)).sum() - (pbar_t * np.log(pbar_t)).sum())
    return prediction + lambda_me * mean_entropy


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


@pytest.mark.parametrize("lambda_me", [0.0, 1.0, 2.5])
def test_nclip_loss_matches_numpy(lambda_me):
    image_logits = torch.randn(6, 11, generator=torch.Generator().manual_seed(5)).tanh()
    text_logits = torch.randn(6, 11, generator=torch.Generator().manual_seed(6)).tanh()
    loss, _ = nclip_loss(image_logits.double(), text_logits.double(), 0.1, 0.04, lambda_me)
    expected = nclip_loss_numpy(image_logits.double().numpy(), text_logits.double().numpy(), 0.1, 0.04, lambda_me)
    assert loss.item() == pytest.approx(expected, rel=1e-10)


def test_xclip_loss_is_clip_plus_weighted_nclip():
    model_output = TwoTowerOutput(unit_rows(5, 4, seed=7), unit_rows(5, 4, seed=8), torch.tensor(10.0),
                                  torch.randn(5, 13).tanh(), torch.randn(5, 13).tanh())
    clip = clip_loss(model_output.image_embeddings, model_output.text_embeddings, model_output.logit_scale)
    nclip, _ = nclip_loss(model_output.image_prototype_logits, model_output.text_prototype_logits)
    loss, metrics = Objective("xclip", nclip_weight=0.5)(model_output)
    assert loss.item() == pytest.approx(clip.item() + 0.5 * nclip.item(), rel=1e-6)
    assert xclip_loss(clip, nclip, 0.5).item() == pytest.approx(loss.item(), rel=1e-6)
    assert metrics["clip/loss"].item() == pytest.approx(clip.item())


def test_clip_loss_gradcheck():
    u = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u, w, s: clip_loss(u, w, s), (u, w, s))


@pytest.mark.parametrize("regularizer", ["memax", "center"])
def test_nclip_loss_gradcheck_with_gradient_through_targets(regularizer):
    image_logits = torch.randn(4, 6, dtype=torch.float64).tanh().requires_grad_()
    text_logits = torch.randn(4, 6, dtype=torch.float64).tanh().requires_grad_()
    center = torch.randn(6, dtype=torch.float64) * 0.1

    def loss(image_logits, text_logits):
        return nclip_loss(image_logits, text_logits, 0.1, 0.04, 1.0, regularizer, center, center,
                          target_grad=True)[0]
    assert torch.autograd.gradcheck(loss, (image_logits, text_logits))


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


def frozen_target_loss_numpy(image_logits, text_logits, q_v, q_t, tau_s, lambda_me):
    """L_nCLIP with the targets q held fixed: what the stop-gradient differentiates."""
    p_v, p_t = softmax_np(image_logits, tau_s), softmax_np(text_logits, tau_s)
    prediction = 0.5 * (-(q_t * np.log(p_v)).sum(1).mean() - (q_v * np.log(p_t)).sum(1).mean())
    pbar_v, pbar_t = p_v.mean(0), p_t.mean(0)
    return prediction + lambda_me * 0.5 * ((pbar_v * np.log(pbar_v)).sum() + (pbar_t * np.log(pbar_t)).sum())


@pytest.mark.parametrize("regularizer", ["memax", "center", "sinkhorn"])
def test_nclip_gradient_with_stopped_targets_matches_finite_differences(regularizer):
    generator = torch.Generator().manual_seed(10)
    image_logits = torch.randn(5, 7, dtype=torch.float64, generator=generator).tanh().requires_grad_()
    text_logits = torch.randn(5, 7, dtype=torch.float64, generator=generator).tanh().requires_grad_()
    center = torch.randn(7, dtype=torch.float64, generator=generator) * 0.1
    loss, _ = nclip_loss(image_logits, text_logits, 0.1, 0.04, 1.0, regularizer, center, center)
    loss.backward()
    q_v = prototype_targets(image_logits.detach(), 0.04, regularizer, center).numpy()
    q_t = prototype_targets(text_logits.detach(), 0.04, regularizer, center).numpy()
    lambda_me = 1.0 if regularizer == "memax" else 0.0
    x_v, x_t = image_logits.detach().numpy().copy(), text_logits.detach().numpy().copy()
    numeric_v = numerical_gradient(lambda x: frozen_target_loss_numpy(x, x_t, q_v, q_t, 0.1, lambda_me), x_v)
    numeric_t = numerical_gradient(lambda x: frozen_target_loss_numpy(x_v, x, q_v, q_t, 0.1, lambda_me), x_t)
    np.testing.assert_allclose(image_logits.grad.numpy(), numeric_v, atol=1e-6)
    np.testing.assert_allclose(text_logits.grad.numpy(), numeric_t, atol=1e-6)


def test_xclip_objective_gradcheck():
    objective = Objective("xclip", nclip_weight=0.7, target_grad=True)
    u = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    image_logits = torch.randn(4, 5, dtype=torch.float64).tanh().requires_grad_()
    text_logits = torch.randn(4, 5, dtype=torch.float64).tanh().requires_grad_()

    def loss(u, w, image_logits, text_logits):
        return objective(TwoTowerOutput(u, w, torch.tensor(2.0, dtype=torch.float64),
                                        image_logits, text_logits))[0]
    assert torch.autograd.gradcheck(loss, (u, w, image_logits, text_logits))


def test_memax_scores_a_collapsed_batch_with_minimal_entropy():
    logits = torch.full((8, 16), -1.0)
    logits[:, 3] = 1.0  # every sample picks prototype 3: the mean distribution is one-hot
    _, monitors = nclip_loss(logits, logits, student_temp=0.01)
    assert monitors["nclip/mean_entropy"].item() == pytest.approx(0.0, abs=1e-6)
    assert monitors["nclip/image_perplexity"].item() == pytest.approx(1.0, abs=1e-4)


def test_memax_scores_a_uniformly_spread_batch_with_maximal_entropy():
    logits = torch.eye(16) * 2 - 1  # sample i picks prototype i: the mean is uniform
    _, monitors = nclip_loss(logits, logits, student_temp=0.01)
    assert monitors["nclip/mean_entropy"].item() == pytest.approx(-math.log(16), rel=1e-5)
    assert monitors["nclip/text_perplexity"].item() == pytest.approx(16, rel=1e-4)
    assert monitors["nclip/same_prototype"].item() == 1.0


def test_entropy_of_uniform_and_one_hot():
    assert entropy(torch.full((10,), 0.1)).item() == pytest.approx(math.log(10))
    assert entropy(F.one_hot(torch.tensor(2), 10).double()).item() == 0.0


def test_sinkhorn_targets_use_every_prototype_equally():
    scores = torch.randn(32, 8, generator=torch.Generator().manual_seed(9)) * 3
    q = sinkhorn(scores, iterations=50)
    assert torch.allclose(q.sum(dim=1), torch.ones(32), atol=1e-5)
    assert torch.allclose(q.sum(dim=0), torch.full((8,), 32 / 8), atol=1e-3)


def test_center_regularizer_updates_its_ema_and_drops_memax():
    objective = Objective("nclip", num_prototypes=4, regularizer="center", center_momentum=0.9)
    image_logits, text_logits = torch.rand(6, 4), torch.rand(6, 4)
    loss, metrics = objective(TwoTowerOutput(image_prototype_logits=image_logits,
                                             text_prototype_logits=text_logits))
    assert torch.allclose(objective.image_center, 0.1 * image_logits.mean(0))
    assert loss.item() == pytest.approx(metrics["nclip/prediction"].item())
