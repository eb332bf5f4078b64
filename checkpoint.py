"""Checkpoints: what train.py writes, how a run resumes from one, and how eval.py gets a
model back. A checkpoint is a dict of tensors and plain Python values, read with
torch.load(weights_only=True): opening a checkpoint from someone else cannot run code.

    {"model", "objective_state", "optimizer": state dicts, "step": int,
     "args": train.py's flags, "model_config": ModelConfig fields, "objective": "xclip",
     "skipped": bad samples so far, by reason}

Written with --no-save-optimizer, a checkpoint has no "optimizer" (a third of the size):
it evaluates and starts runs (--init-from) but does not resume one.
"""
import errno
import os
import re
import shutil
import threading
from dataclasses import asdict, fields

import torch

from data import EvalTransform, normalize, tokenizer_for
from faults import DataError, NonFiniteLoss, UserError
from model import ModelConfig, TwoTowerModel

KEYS = {"model", "step", "args", "model_config", "objective"}


class CheckpointWriter:
    """Writes OUT_DIR/ckpt.pt in a background thread, so that training goes on while a
    large checkpoint (a B/16 with its AdamW state: 2.4 GB) reaches the disk. `save`
    queues the copy of the state to the host and returns; a write that failed raises its
    UserError at the next `save` or at `wait`."""

    def __init__(self, path, flags, save_optimizer=True):
        self.path, self.flags = path, flags  # flags: train.py's, saved with every checkpoint
        self.save_optimizer = save_optimizer
        self.thread, self.error = None, None
        self.host = HostCopy()

    def save(self, trainee, step, skip_counts=None, keep=False):
        """The training state of `trainee` (.model, .objective, .optimizer) after `step`
        steps, and the bad samples counted so far. With `keep`, the file stays also as
        ckpt_<step>.pt beside the path, which the next save replaces."""
        self.wait()
        optimizer = trainee.optimizer if self.save_optimizer else None
        checkpoint = make_checkpoint(trainee.model, step, self.flags, skip_counts,
                                     trainee.objective, optimizer)
        broken = non_finite_tensors(checkpoint["model"])
        if broken:  # an update with a finite loss and gradient can still overflow the weights
            raise NonFiniteLoss(f"{len(broken)} weight tensor(s) are not finite at step {step} "
                                f"({broken[0]}, ...); {self.path} is untouched. Try a lower --lr")
        kept = self.kept_path(step) if keep else None
        host_checkpoint, copied = self.host.copy(checkpoint)
        self.thread = threading.Thread(target=self.write, args=(host_checkpoint, kept, copied))
        self.thread.start()

    def kept_path(self, step):
        return os.path.join(os.path.dirname(self.path), f"ckpt_{step}.pt")

    def write(self, checkpoint, kept=None, copied=None):
        """To a temporary file, then renamed: a crash never leaves a half-written file,
        and a full disk leaves the previous checkpoint as it was. A kept copy is a hard
        link to the same file (a copy where the file system has none). `copied`: an
        event the GPU passes once its copies to the host are done."""
        temporary = self.path + ".tmp"
        try:
            if copied is not None:
                copied.synchronize()
            with open(temporary, "wb") as f:  # a full disk is then an OSError saying so
                torch.save(checkpoint, f)
            if kept:
                if os.path.exists(kept):
                    os.remove(kept)
                try:
                    os.link(temporary, kept)
                except OSError:
                    shutil.copyfile(temporary, kept)
            os.replace(temporary, self.path)
        except Exception as error:  # in this thread: whatever it is, wait() raises it
            if os.path.lexists(temporary):
                os.remove(temporary)
            self.error = UserError(f"could not write {self.path} "
                                   f"({write_failure(error, checkpoint, self.path)}); the "
                                   "previous checkpoint, if any, is untouched")

    def wait(self):
        """Until the last checkpoint is on disk; its error, if it had one."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def make_checkpoint(model, step, flags, skip_counts=None, objective=None, optimizer=None):
    """The checkpoint dict of `model` (a TwoTowerModel) after `step` steps, trained with
    `flags` (train.py's, as a dict); with the objective's state (DINO's center) and the
    optimizer's where given."""
    checkpoint = {"model": model.state_dict(), "step": step, "args": dict(flags),
                  "model_config": asdict(model.config), "objective": model.objective,
                  "skipped": skip_counts or {}}
    if objective is not None:
        checkpoint["objective_state"] = objective.state_dict()
    if optimizer is not None:
        checkpoint["optimizer"] = optimizer.state_dict()
    return checkpoint


def write_failure(error, checkpoint, path):
    """Why a checkpoint could not be written, in words. A full disk reaches torch.save's
    zip writer as "unexpected pos" where no OSError says so: the bytes needed against
    those free tell it."""
    needed = tensor_bytes(checkpoint)
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
    if getattr(error, "errno", None) == errno.ENOSPC or free < needed:
        return (f"No space left on device; the checkpoint needs about {needed / 2**20:.0f} "
                f"MiB, {free / 2**20:.0f} MiB are free there")
    return (getattr(error, "strerror", None)
            or (str(error).splitlines() or [type(error).__name__])[0])


def tensor_bytes(value):
    """The bytes of the tensors in `value` (nested dicts, lists, tuples)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(item) for item in value)
    return 0


class HostCopy:
    """Copies of a checkpoint's tensors in host memory, for the writer thread while the
    training goes on updating the originals. A GPU's tensors go into pinned buffers kept
    from one save to the next (allocating 2.4 GB of pinned memory costs more than the
    copy) without the host waiting for each: the copies queue behind the step on the
    GPU, and an event tells the writer when they are done."""

    def __init__(self):
        self.buffers = {}  # a tensor's place in the checkpoint -> its pinned buffer
        self.queued = False  # whether the last copy queued a GPU tensor

    def copy(self, checkpoint):
        """-> (the copy, a CUDA event recorded after the copies, or None on the CPU)"""
        self.queued = False
        copy = self.to_host(checkpoint, ())
        if not self.queued:
            return copy, None
        event = torch.cuda.Event()
        event.record()
        return copy, event

    def to_host(self, value, place):
        if isinstance(value, torch.Tensor):
            if not value.is_cuda:
                return value.detach().to("cpu", copy=True)
            buffer = self.buffers.get(place)
            if buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype:
                buffer = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
                self.buffers[place] = buffer
            self.queued = True
            return buffer.copy_(value.detach(), non_blocking=True)
        if isinstance(value, dict):
            return {key: self.to_host(item, (*place, key)) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.to_host(item, (*place, index))
                               for index, item in enumerate(value))
        return value


def non_finite_tensors(state_dict):
    """Names of the floating-point tensors of a state_dict that hold a NaN or an infinity
    (one host sync when they are all finite)."""
    floats = {name: tensor for name, tensor in state_dict.items() if tensor.is_floating_point()}
    if not floats or torch.stack([tensor.isfinite().all() for tensor in floats.values()]).all():
        return []
    return [name for name, tensor in floats.items() if not tensor.isfinite().all()]


def read_checkpoint(path):
    """A train.py checkpoint, or a DataError that says what is wrong with the file."""
    if not os.path.isfile(path):
        raise DataError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, empty, text, code in the pickle
        raise DataError(unreadable(path, error, "checkpoint")) from None
    missing = KEYS - set(checkpoint if isinstance(checkpoint, dict) else ())
    if missing:
        raise DataError(f"{path} is not a checkpoint written by train.py (no "
                        f"{', '.join(sorted(missing))})")
    broken = non_finite_tensors(checkpoint["model"])
    if broken:  # train.py never writes one; an older or edited file might hold one
        raise DataError(f"{path} has weights that are not finite ({broken[0]} and "
                        f"{len(broken) - 1} more): the run diverged")
    return checkpoint


def saved_model_config(checkpoint, path):
    """The ModelConfig a checkpoint's model was built with; a DataError naming a field
    this version's ModelConfig does not know (a checkpoint of another version)."""
    saved = checkpoint["model_config"]
    unknown = sorted(set(saved) - {f.name for f in fields(ModelConfig)})
    if unknown:
        raise DataError(f"{path}: its model config has {', '.join(unknown)}, which this "
                        "version's ModelConfig does not know: it was written by another "
                        "version of model.py")
    try:
        return ModelConfig(**saved)
    except ValueError as error:  # ModelConfig.problem
        raise DataError(f"{path}: {error}") from None


def unreadable(path, error, kind):
    """Why torch.load(weights_only=True) could not read `path` (a `kind` of file), in one
    line: a file whose pickle would run code says so and names what it would call."""
    text = str(error).strip()
    code = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if code:
        return (f"{path} holds code, and was not loaded: unpickling it would call "
                f"{code.group(1)}; a {kind} holds tensors and plain values only")
    reason = text.splitlines()[0][:120] if text else type(error).__name__
    return f"{path} is not a readable {kind} ({reason})"


def check_resumable(checkpoint, path, loss, config, global_batch, flags=None):
    """The objective, the architecture (`config`, a ModelConfig), the global batch, which
    decides the data order, and `flags` ({name: value} of the other flags that decide what
    the run computes) must be the checkpoint's: name the first that differs and the flag
    to pass. A flag an older checkpoint does not record is not compared."""
    saved = checkpoint["args"]
    if "optimizer" not in checkpoint:
        raise DataError(f"{path} holds no optimizer state (written with --no-save-optimizer): "
                        f"it cannot be resumed; start a new run from its weights with "
                        f"--init-from {path}")
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
    for name, value in (flags or {}).items():
        if name in saved and saved[name] != value:
            flag = "--" + name.replace("_", "-")
            raise DataError(f"{path} was trained with {flag} {saved[name]}, these flags give "
                            f"{flag} {value}: the run would compute something else; pass "
                            f"{flag} {saved[name]}, or start anew in another --out-dir")


def restore_checkpoint(checkpoint, trainee):
    """Load a training state into `trainee` (.model, .objective, .optimizer); -> its
    step. No random generator state is kept: every stream a run draws from is seeded by
    (--seed, rank, step or sample), so a resumed run on any number of GPUs draws what
    the uninterrupted one would have."""
    try:
        trainee.model.load_state_dict(checkpoint["model"])
        trainee.objective.load_state_dict(checkpoint["objective_state"])
        trainee.optimizer.load_state_dict(checkpoint["optimizer"])
    except (RuntimeError, ValueError, KeyError) as error:  # another version's names or shapes
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise DataError(f"this version cannot restore the checkpoint's state ({reason})") from None
    return checkpoint["step"]


def initialize_from(checkpoint, path, model):
    """Load the weights of a checkpoint (train.py's, or interop.py's import of CLIP
    weights) into a new model of the same towers; what the model has and the checkpoint
    lacks (the nCLIP heads of a CLIP checkpoint) keeps its fresh initialization. -> the
    names of those parts and of the checkpoint's parts the model does not use."""
    state = model.state_dict()
    weights = checkpoint["model"]
    for name, tensor in weights.items():
        if name in state and state[name].shape != tensor.shape:
            raise DataError(f"{path}: {name} has shape {tuple(tensor.shape)}, this model's "
                            f"{tuple(state[name].shape)}")
    result = model.load_state_dict(weights, strict=False)
    return module_names(result.missing_keys), module_names(result.unexpected_keys)


def module_names(keys):
    """'image_head' for image_head.mlp.0.weight, ...: the top-level modules of state keys."""
    return sorted({key.split(".")[0] for key in keys})


def load(path, device="cpu"):
    """A trained model for a notebook, as open_clip's create_model_and_transforms gives:
    (model, preprocess, tokenizer). preprocess takes a PIL image to a normalized float
    tensor (3, H, W); tokenizer takes a list of captions to a (N, context_length) tensor;
    model.encode_image / encode_text give CLIP's embeddings.

        from checkpoint import load
        model, preprocess, tokenizer = load("runs/xclip/ckpt.pt")"""
    model, _ = load_model(path, device)
    transform = EvalTransform(model.config.image_size)
    return model, lambda image: normalize(transform(image)), tokenizer_for(model.config)


def load_model(path, device):
    """The model of a train.py checkpoint, weights loaded, in eval mode on `device`; and
    the checkpoint itself."""
    checkpoint = read_checkpoint(path)
    config = saved_model_config(checkpoint, path)
    model = TwoTowerModel(config, checkpoint["objective"], checkpoint["args"].get("student_temp"))
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:  # names or shapes of another version
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        raise DataError(f"{path}: its weights do not fit this version's model ({reason})") from None
    return model.to(device).eval(), checkpoint
