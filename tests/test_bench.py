"""tools/bench.py as a user runs it, and the FLOP count its MFU rests on."""
from contextlib import nullcontext

import pytest
import torch
import torch._dynamo
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tools.bench import flops_per_sample, synthetic_batch
from conftest import run_script
from losses import Objective
from model import OBJECTIVES, TwoTowerModel, model_config
from train import Trainee, train_step


# One quick step on the CPU: the shallowest towers, one warm-up step.
QUICK = ["--device", "cpu", "--warmup-steps", "1", "--vision-layers", "1", "--text-layers", "1"]


def run_bench(*flags):
    return run_script("tools/bench.py", *flags, timeout=300)


def test_bench_prints_its_figures_on_cpu():
    result = run_bench(*QUICK, "--batch-size", "8", "--steps", "2")
    assert result.returncode == 0, result.stderr
    for figure in ("ms/step:", "samples/s:", "peak memory:", "model FLOPs/sample:",
                   "MFU: not reported"):
        assert figure in result.stdout


def test_bench_reports_mfu_against_a_given_peak():
    result = run_bench(*QUICK, "--batch-size", "8", "--steps", "1", "--peak-tflops", "1")
    assert result.returncode == 0, result.stderr
    assert "% of 1 TFLOP/s" in result.stdout


@pytest.mark.parametrize("flags,message", [
    (["--precision", "fp8"], "invalid choice: 'fp8'"),
    (["--compare", "clip", "open_clip"], "pass --no-conv-stem"),  # before importing open_clip
])
def test_bad_flag_is_one_line_and_exit_code_2(flags, message):
    result = run_bench(*flags)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("conv_stem", (True, False))
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_flop_count_matches_torch_flop_counter(objective, conv_stem):
    config = model_config("tiny", vision_layers=2, text_layers=2, conv_stem=conv_stem)
    batch_size = 4
    model = TwoTowerModel(config, objective)
    loss_fn = Objective(objective, config.num_prototypes)
    images, tokens = synthetic_batch(config, batch_size, "cpu")
    counter = FlopCounterMode(display=False)
    # The math backend spells attention out in matmuls, which the counter sees.
    with counter, sdpa_kernel(SDPBackend.MATH):
        loss, _ = loss_fn(model(images, tokens))
        loss.backward()
    expected = flops_per_sample(config, objective, batch_size) * batch_size
    assert counter.get_total_flops() == expected


def test_synthetic_captions_end_in_one_end_of_text_token_then_padding():
    config = model_config("tiny")
    _, tokens = synthetic_batch(config, 16, "cpu")
    is_eot = tokens == config.eot_token_id
    assert torch.equal(is_eot.sum(dim=1), torch.ones(16, dtype=torch.long))
    after_eot = is_eot.int().cumsum(dim=1).bool() & ~is_eot
    assert torch.all(tokens[after_eot] == 0) and torch.all(tokens[~is_eot & ~after_eot] > 0)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_compiled_step_has_one_graph_and_no_recompiles(objective):
    """What --compile compiles: the model, in one graph (fullgraph raises at a graph break),
    that later steps reuse whatever their text length (error_on_recompile raises at a
    recompile). The eager backend traces exactly as inductor does, without generating
    code."""
    config = model_config("tiny", vision_layers=1, text_layers=1)
    model = TwoTowerModel(config, objective)
    optimizer = model.configure_optimizers(1e-3, 0.1, (0.9, 0.98), 1e-6)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    trainee = Trainee(model, compiled, Objective(objective, config.num_prototypes), optimizer,
                      nullcontext(), 1.0, compiled=True)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for length in (12, 20, 7):  # train.py cuts the text after each batch's longest caption
            images, tokens = synthetic_batch(config, 4, "cpu")
            tokens[:, length - 1] = config.eot_token_id
            metrics = train_step(trainee, images, tokens[:, :length])
    assert torch.isfinite(metrics["loss"])


def test_bench_times_an_accumulated_step_on_the_whole_batch():
    result = run_bench(*QUICK, "--batch-size", "4", "--accum-freq", "2", "--steps", "1")
    assert result.returncode == 0, result.stderr
    assert "batch 8 = 2 x 4" in result.stdout
    assert "xclip, whole batch:" in result.stdout  # the same step without accumulation
