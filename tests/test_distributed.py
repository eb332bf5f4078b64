"""N ranks against one process: the same global batch gives the same loss and, after
DDP averages them, the same parameter gradients. And a 2-rank torchrun of train.py on
tar shards with bad samples in them."""
import gc
from contextlib import nullcontext
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import MINI, ROOT, SMALL_MODEL, small_config, write_tar_shards
from faults import UserError
from synthetic import export
from losses import Objective
from model import TwoTowerModel
from distributed import distributed_model, process_device
from train import Trainee, forward_backward
GLOBAL_BATCH, EOT = 8, 999  # the small config's end-of-text token


def loss_and_gradients(objective_name, local_loss=False, rank=0, world_size=1, accum_freq=1,
                       device="cpu"):
    """This rank's share of one fixed global batch: the loss averaged over ranks, and
    the parameter gradients as DDP leaves them (on the CPU); with accum_freq, in that many
    micro-batches (train.py's --accum-freq)."""
    torch.manual_seed(0)
    # float64: the nCLIP gradients reach the hundreds at this size, where float32 rounding
    # alone differs between a sum over 8 rows and two sums over 4.
    model = TwoTowerModel(small_config(), objective_name).double().to(device)
    objective = Objective(objective_name, num_prototypes=16, local_loss=local_loss)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=generator, dtype=torch.float64)
    tokens = torch.randint(0, EOT, (GLOBAL_BATCH, 8), generator=generator)
    tokens[:, 5] = EOT
    images, tokens = images.to(device), tokens.to(device)
    local = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
    trained = distributed_model(model) if world_size > 1 else model
    trainee = Trainee(model, trained, objective, None, nullcontext(), 1.0)
    loss, _ = forward_backward(trainee, images[local], tokens[local], accum_freq)
    loss = loss.detach()
    if world_size > 1:
        dist.all_reduce(loss)
        loss /= world_size
    return loss.cpu(), {name: p.grad.cpu() for name, p in model.named_parameters()}


def rank_main(rank, world_size, port, objective_name, local_loss, result_path, accum_freq=1,
              device="cpu"):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    result = loss_and_gradients(objective_name, local_loss, rank, world_size, accum_freq, device)
    if rank == 0:
        torch.save(result, result_path)
    gc.collect()  # free DDP's reducer now, not during interpreter teardown, where gloo can abort
    dist.barrier()  # no rank tears the group down while another still uses it
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("objective_name,local_loss",
                         [("clip", False), ("clip", True), ("nclip", False), ("xclip", False)])
def test_two_ranks_match_one_process_on_the_same_global_batch(tmp_path, objective_name,
                                                              local_loss):
    result_path = str(tmp_path / "two_ranks.pt")
    mp.spawn(rank_main, args=(2, free_port(), objective_name, local_loss, result_path),
             nprocs=2)
    loss, gradients = torch.load(result_path)
    expected_loss, expected_gradients = loss_and_gradients(objective_name, local_loss)
    torch.testing.assert_close(loss, expected_loss, atol=1e-10, rtol=1e-10)
    assert gradients.keys() == expected_gradients.keys()
    for name, expected in expected_gradients.items():
        torch.testing.assert_close(gradients[name], expected, atol=1e-10, rtol=1e-10, msg=name)


def assert_same_loss_and_gradients(result, expected):
    (loss, gradients), (expected_loss, expected_gradients) = result, expected
    torch.testing.assert_close(loss, expected_loss, atol=1e-10, rtol=1e-10)
    assert gradients.keys() == expected_gradients.keys()
    for name, expected_gradient in expected_gradients.items():
        torch.testing.assert_close(gradients[name], expected_gradient, atol=1e-10, rtol=1e-10,
                                   msg=name)


@pytest.mark.parametrize("objective_name", ["clip", "nclip", "xclip"])
def test_accumulating_four_micro_batches_equals_the_whole_batch(objective_name):
    whole = loss_and_gradients(objective_name)
    assert_same_loss_and_gradients(loss_and_gradients(objective_name, accum_freq=4), whole)


def centers_after_one_batch(accum_freq):
    """The head's running center and DINO's center after one batch, in micro-batches."""
    torch.manual_seed(0)
    model = TwoTowerModel(small_config(), "nclip").double()
    objective = Objective("nclip", num_prototypes=16, regularizer="center").double()
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=generator, dtype=torch.float64)
    tokens = torch.randint(0, EOT, (GLOBAL_BATCH, 8), generator=generator)
    tokens[:, 5] = EOT
    forward_backward(Trainee(model, model, objective, None, nullcontext(), 1.0), images, tokens,
                     accum_freq)
    return model.image_head.running_center, objective.nclip.dino_center


def test_accumulation_moves_each_center_once_per_step():
    for whole, accumulated in zip(centers_after_one_batch(1), centers_after_one_batch(4)):
        torch.testing.assert_close(accumulated, whole, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("objective_name", ["clip", "nclip", "xclip"])
def test_two_ranks_accumulating_equal_one_process_on_the_whole_batch(tmp_path, objective_name):
    result_path = str(tmp_path / "two_ranks.pt")
    mp.spawn(rank_main, args=(2, free_port(), objective_name, False, result_path, 2), nprocs=2)
    assert_same_loss_and_gradients(torch.load(result_path), loss_and_gradients(objective_name))


def test_torchrun_two_ranks_on_tar_shards_with_bad_samples(tmp_path):
    write_tar_shards(str(tmp_path), num_shards=4, per_shard=8, truncated={3}, empty_caption={21})
    out_dir = str(tmp_path / "out")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "train.py", *SMALL_MODEL,
               "--train-data", str(tmp_path / "{00000..00003}.tar"), "--train-num-samples", "32",
               "--shuffle-buffer", "4", "--steps", "8", "--batch-size", "4", "--workers", "1",
               "--log-every", "2", "--out-dir", out_dir]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(out_dir, "final_metrics.json")) as f:
        metrics = json.load(f)
    # 8 steps of 4 read each rank's 16 samples twice: each bad one is met once or more
    assert metrics["skipped/bad_image"] >= 1 and metrics["skipped/bad_caption"] >= 1
    assert metrics["skipped/bad_shard"] == 0
    assert (f"bad samples skipped: bad_image {metrics['skipped/bad_image']:.0f}, "
            f"bad_caption {metrics['skipped/bad_caption']:.0f}, bad_shard 0") in result.stdout
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        assert len(f.readlines()) == 4


def torchrun(*flags, nproc=2, timeout=600, env=None):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "train.py", *flags]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_torchrun_compiles_with_checkpointing_and_accumulation_without_graph_breaks(tmp_path):
    """torch.compile over DDP, activation checkpointing and accumulation on two gloo ranks:
    the model compiles without a graph break, and after the first step nothing compiles
    again (two graphs of the model: the cached pass without gradient and the one with)."""
    result = torchrun(*MINI, "--compile", "--grad-checkpointing", "--accum-freq", "2",
                      "--steps", "3", "--log-every", "1", "--out-dir", str(tmp_path),
                      env={"TORCH_LOGS": "graph_breaks,recompiles"})
    assert result.returncode == 0, result.stderr[-3000:]
    model_py = os.path.join(ROOT, "model.py")
    assert f"Graph break in user code at {model_py}" not in result.stderr
    assert "size mismatch" not in result.stderr  # the text length is dynamic from the start
    with open(tmp_path / "log.jsonl") as f:
        assert [json.loads(line)["step"] for line in f if "loss" in line] == [1, 2, 3]


def test_a_checkpoint_of_two_ranks_resumes_on_one_with_the_same_global_batch(tmp_path):
    flags = [*MINI, "--steps", "6", "--log-every", "2"]
    two_ranks = torchrun(*flags, "--batch-size", "8", "--keep-every", "4",
                         "--out-dir", str(tmp_path / "two"))
    assert two_ranks.returncode == 0, two_ranks.stderr[-3000:]
    one_rank = subprocess.run([sys.executable, "train.py", *flags, "--batch-size", "16",
                               "--resume", str(tmp_path / "two" / "ckpt_4.pt"),
                               "--out-dir", str(tmp_path / "one")],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert one_rank.returncode == 0, one_rank.stderr[-3000:]
    two, one = (torch.load(tmp_path / name / "ckpt.pt", weights_only=True)
                for name in ("two", "one"))
    assert one["step"] == 6  # and the last two steps on one process as on two ranks:
    assert all(torch.allclose(two["model"][k], one["model"][k], atol=1e-5) for k in two["model"])


def test_each_torchrun_rank_takes_the_gpu_of_its_local_rank():
    assert process_device("cuda", local_rank=3, world=8) == "cuda:3"
    assert process_device("cuda:1", local_rank=0, world=1) == "cuda:1"
    assert process_device("cpu", local_rank=3, world=8) == "cpu"
    with pytest.raises(UserError, match="pass --device cuda"):
        process_device("cuda:1", local_rank=3, world=8)


def test_the_validation_loss_of_two_ranks_is_that_of_one_process(tmp_path):
    """--val-data's loss is over global batches, each rank scoring its slice: two ranks of
    8 give one process's loss at batch 16 (at --lr 0 both keep the initial weights)."""
    export(str(tmp_path / "data"), num_images=24)
    flags = [*MINI, "--lr", "0", "--steps", "2", "--val-every", "2",
             "--val-data", str(tmp_path / "data" / "captions.csv")]
    two_ranks = torchrun(*flags, "--batch-size", "8", "--out-dir", str(tmp_path / "two"))
    assert two_ranks.returncode == 0, two_ranks.stderr[-3000:]
    one = subprocess.run([sys.executable, "train.py", *flags, "--batch-size", "16",
                          "--out-dir", str(tmp_path / "one")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    logged = []
    for run in ("one", "two"):
        with open(tmp_path / run / "log.jsonl") as f:
            logged.append([json.loads(line) for line in f if "val/captions/loss" in line][-1])
    assert logged[0]["val/captions/loss"] == pytest.approx(logged[1]["val/captions/loss"],
                                                           abs=1e-5)
    assert logged[0]["retrieval/captions/text_to_image/R@5"] == \
        logged[1]["retrieval/captions/text_to_image/R@5"]
