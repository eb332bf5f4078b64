"""Checkpoints: what train.py writes, how a run resumes from one, and how eval.py gets a
model back. A checkpoint is a dict of tensors and plain Python values, read with
torch.load(weights_only=True): opening a checkpoint from someone else cannot run code.

    {"model", "objective_state", "optimizer": state dicts, "step": int,
     "args": train.py's flags, "model_config": ModelConfig fields, "objective": "xclip",
     "rng": {"torch", "numpy", "python", "cuda"}, "skipped": bad samples so far, by reason}
"""
import os
import random
from dataclasses import asdict

import numpy as np
import torch

from faults import DataError, NonFiniteLoss
from model import ModelConfig, TwoTowerModel

KEYS = {"model", "optimizer", "step", "args", "model_config", "objective"}


def save_checkpoint(path, trainee, step, flags, skip_counts=None):
    """The training state of `trainee` (.model, .objective, .optimizer) after `step`
    steps, with the run's `flags` (a dict). Written to a temporary file, then renamed: a
    crash never leaves a half-written file, and a full disk leaves the previous
    checkpoint as it was."""
    checkpoint = {
        "model": trainee.model.state_dict(),
        "objective_state": trainee.objective.state_dict(),
        "optimizer": trainee.optimizer.state_dict(),
        "step": step,
        "args": flags,
        "model_config": asdict(trainee.model.config),
        "objective": trainee.model.objective,
        "rng": random_states(),
        "skipped": skip_counts or {},
    }
    broken = non_finite_tensors(checkpoint["model"])
    if broken:  # an update with a finite loss and gradient can still overflow the weights
        raise NonFiniteLoss(f"{len(broken)} weight tensor(s) are not finite at step {step} "
                            f"({broken[0]}, ...); {path} is untouched. Try a lower --lr")
    temporary = path + ".tmp"
    try:
        torch.save(checkpoint, temporary)
        os.replace(temporary, path)
    except (OSError, RuntimeError) as error:  # torch.save reports a full disk as RuntimeError
        if os.path.exists(temporary):
            os.remove(temporary)
        reason = getattr(error, "strerror", None) or str(error).splitlines()[0]
        raise DataError(f"could not write {path} ({reason}); the previous checkpoint, if any, "
                        "is untouched") from None


def random_states():
    """Every generator a resumed run must continue, as tensors and plain values."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss,
                   cached_gaussian)
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate(),
            "cuda": cuda}


def non_finite_tensors(state_dict):
    """Names of the floating-point tensors of a state_dict that hold a NaN or an infinity."""
    return [name for name, tensor in state_dict.items()
            if tensor.is_floating_point() and not torch.isfinite(tensor).all()]


def read_checkpoint(path):
    """A train.py checkpoint, or a DataError that says what is wrong with the file."""
    if not os.path.isfile(path):
        raise DataError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, empty, text, code in the pickle: all say the same
        text = str(error).strip()
        reason = text.splitlines()[0][:120] if text else type(error).__name__
        raise DataError(f"{path} is not a readable checkpoint ({reason})") from None
    missing = KEYS - set(checkpoint if isinstance(checkpoint, dict) else ())
    if missing:
        raise DataError(f"{path} is not a checkpoint written by train.py (no "
                        f"{', '.join(sorted(missing))})")
    broken = non_finite_tensors(checkpoint["model"])
    if broken:  # train.py never writes one; an older or edited file might hold one
        raise DataError(f"{path} has weights that are not finite ({broken[0]} and "
                        f"{len(broken) - 1} more): the run diverged")
    return checkpoint


def check_resumable(checkpoint, path, loss, config, global_batch):
    """The objective, the architecture (`config`, a ModelConfig) and the global batch,
    which decides the data order, must be the checkpoint's: name the first that differs
    and the flags to pass."""
    saved = checkpoint["args"]
    if checkpoint["objective"] != loss:
        raise DataError(f"{path} was trained with --loss {checkpoint['objective']}; pass "
                        f"--loss {checkpoint['objective']}")
    fields = asdict(config)
    # A field that an older checkpoint lacks had ModelConfig's default then.
    for name, value in {**asdict(ModelConfig()), **checkpoint["model_config"]}.items():
        if fields.get(name) != value:
            flag = "--" + name.replace("_", "-")
            if isinstance(value, bool):
                flag = flag if value else "--no-" + flag[2:]
                raise DataError(f"{path} was trained with {flag}; pass --model "
                                f"{saved.get('model')} and {flag}")
            raise DataError(f"{path} has {flag} {value}, these flags give {fields.get(name)}; "
                            f"pass --model {saved.get('model')} and {flag} {value}")
    if saved.get("global_batch") != global_batch:
        flags = f"--batch-size {saved.get('batch_size')}"
        if saved.get("accum_freq", 1) > 1:
            flags += f" --accum-freq {saved['accum_freq']}"
        raise DataError(f"{path} was trained with a global batch of {saved.get('global_batch')}, "
                        f"these flags give {global_batch}: the data order would differ; pass "
                        f"{flags} (on as many processes)")


def restore_checkpoint(checkpoint, trainee):
    """Load a training state into `trainee` (.model, .objective, .optimizer) and the
    random generators; -> its step."""
    trainee.model.load_state_dict(checkpoint["model"])
    trainee.objective.load_state_dict(checkpoint["objective_state"])
    trainee.optimizer.load_state_dict(checkpoint["optimizer"])
    rng = checkpoint["rng"]
    torch.set_rng_state(rng["torch"])
    name, keys, position, has_gauss, cached_gaussian = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss,
                         cached_gaussian))
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return checkpoint["step"]


def load_model(path, device):
    """The model of a train.py checkpoint, weights loaded, in eval mode on `device`; and
    the checkpoint itself."""
    checkpoint = read_checkpoint(path)
    config = ModelConfig(**checkpoint["model_config"])
    model = TwoTowerModel(config, checkpoint["objective"],
                          checkpoint["args"].get("student_temp", 0.05))
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval(), checkpoint
