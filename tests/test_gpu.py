"""On a GPU only (skipped elsewhere): a bf16 step of each objective is finite and close to
float32, both towers attend with the flash kernel, a checkpoint's host copy is the state
at its save though training goes on, the compiled step does not recompile as caption
lengths change, and two processes sharing one GPU match one process.
`bash tools/gpu_check.sh --out DIR` runs these and the GPU benchmarks."""
from contextlib import nullcontext

import pytest
import torch
import torch._dynamo
import torch.multiprocessing as mp
from torch.nn.attention import SDPBackend, sdpa_kernel

from checkpoint import HostCopy
from losses import Objective
from model import OBJECTIVES, TwoTowerModel, model_config
from test_distributed import (assert_same_loss_and_gradients, free_port, loss_and_gradients,
                              rank_main)
from tools.bench import synthetic_batch
from train import Trainee, forward_backward, train_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def b16_like(objective):
    """A two-block model with vit_b16's widths and heads, at 224 px."""
    torch.manual_seed(0)
    config = model_config("vit_b16", vision_layers=2, text_layers=2)
    return TwoTowerModel(config, objective).cuda(), config


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_a_bf16_step_is_finite_and_close_to_float32(objective):
    model, config = b16_like(objective)
    loss_function = Objective(objective, config.num_prototypes).cuda()
    images, tokens = synthetic_batch(config, 32, "cuda")
    losses = {}
    bf16 = torch.autocast("cuda", torch.bfloat16)
    for precision, autocast in (("fp32", nullcontext()), ("bf16", bf16)):
        trainee = Trainee(model, model, loss_function, None, autocast, 1.0)
        loss, _ = forward_backward(trainee, images, tokens)
        model.zero_grad(set_to_none=True)
        losses[precision] = loss.item()
    assert all(torch.isfinite(torch.tensor(list(losses.values()))))
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.02, abs=0.02)


def test_both_towers_attend_with_the_flash_kernel():
    """With only the flash backend allowed, SDPA raises where it cannot use it."""
    model, config = b16_like("xclip")
    images, tokens = synthetic_batch(config, 8, "cuda")
    with torch.autocast("cuda", torch.bfloat16), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = model(images, tokens)
    assert torch.isfinite(out.image_embeddings).all() and torch.isfinite(out.text_embeddings).all()


def test_a_checkpoint_host_copy_is_the_state_when_saved_though_training_goes_on():
    model, config = b16_like("xclip")
    optimizer = model.configure_optimizers(1e-3, 0.1, (0.9, 0.98), 1e-6)
    trainee = Trainee(model, model, Objective("xclip", config.num_prototypes).cuda(), optimizer,
                      torch.autocast("cuda", torch.bfloat16), 1.0)
    host = HostCopy()
    for _ in range(2):  # the second save reuses the first's pinned buffers
        train_step(trainee, *synthetic_batch(config, 16, "cuda"))
        expected = {name: tensor.cpu() for name, tensor in model.state_dict().items()}
        copy, copied = host.copy({"model": model.state_dict()})
        train_step(trainee, *synthetic_batch(config, 16, "cuda"))  # queued behind the copies
        copied.synchronize()
        assert all(torch.equal(copy["model"][name], expected[name]) for name in expected)
        assert not torch.equal(copy["model"]["logit_scale"], model.logit_scale.detach().cpu())


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_the_compiled_bf16_step_does_not_recompile_as_caption_lengths_change(objective):
    model, config = b16_like(objective)
    optimizer = model.configure_optimizers(1e-4, 0.1, (0.9, 0.98), 1e-6)
    trainee = Trainee(model, torch.compile(model), Objective(objective, config.num_prototypes),
                      optimizer, torch.autocast("cuda", torch.bfloat16), 1.0, compiled=True)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for length in (30, 50, 12):
            images, tokens = synthetic_batch(config, 16, "cuda")
            tokens[:, length - 1] = config.eot_token_id
            metrics = train_step(trainee, images, tokens[:, :length])
    assert torch.isfinite(metrics["loss"])


@pytest.mark.parametrize("objective_name", OBJECTIVES)
def test_two_processes_on_one_gpu_equal_one_process(tmp_path, objective_name):
    result_path = str(tmp_path / "two_ranks.pt")
    mp.spawn(rank_main, args=(2, free_port(), objective_name, False, result_path, 1, "cuda"),
             nprocs=2)
    result = torch.load(result_path)
    assert_same_loss_and_gradients(result, loss_and_gradients(objective_name, device="cuda"))
