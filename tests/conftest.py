"""What the tests share: the small model they train, how they run a script, and the data
files they write themselves (tar shards as img2dataset lays them out)."""
import importlib
import io
import os
import signal
import subprocess
import sys
import tarfile

from PIL import Image

from model import model_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The model the tests train with train.py and experiments/claims.py: seconds per run on a
# laptop CPU, yet large enough to learn color from the built-in data in a hundred steps.
SMALL_MODEL = ["--vision-layers", "2", "--text-layers", "2", "--vision-width", "64",
               "--text-width", "64", "--embed-dim", "64", "--head-hidden-dim", "128",
               "--num-prototypes", "16", "--workers", "0"]


# The smallest model train.py builds here, with its batch and evaluation: a run is a few
# seconds, evaluation included; for tests of behaviour rather than of learning.
MINI = ["--vision-layers", "1", "--text-layers", "1", "--vision-width", "32", "--text-width", "32",
        "--vision-heads", "2", "--text-heads", "2", "--embed-dim", "16", "--head-hidden-dim", "32",
        "--head-bottleneck-dim", "16", "--num-prototypes", "16", "--batch-size", "16",
        "--val-samples", "20", "--workers", "0"]


def small_config(**overrides):
    """The same small model for tests that build it in process, on 16-pixel images,
    8-token captions and a 1000-token vocabulary (end of text: 999)."""
    fields = dict(vision_layers=1, text_layers=1, vision_width=32, text_width=32, vision_heads=2,
                  text_heads=2, embed_dim=16, num_prototypes=16, head_hidden_dim=32,
                  head_bottleneck_dim=16, vocab_size=1000, eot_token_id=999, image_size=16,
                  patch_size=8, context_length=8)
    return model_config("tiny", **{**fields, **overrides})


def run_script(script, *flags, timeout=600):
    """python SCRIPT FLAGS in the repository root, as a user runs it."""
    return subprocess.run([sys.executable, script, *flags], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def run_train(*flags, timeout=600):
    return run_script("train.py", *flags, timeout=timeout)


def run_in_process(monkeypatch, capsys, script, *flags):
    """python SCRIPT FLAGS as its main() in this process: for a command that must stop
    before it trains or scores (a bad flag, path or checkpoint), the code a user runs
    without a Python start-up per case. Returns what run_script returns; a train.py run
    leaves no lock in its --out-dir."""
    module = importlib.import_module(script.removesuffix(".py").replace("/", "."))
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", [script, *flags])
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # pytest keeps its handlers
    try:
        module.main()
        returncode = 0
    except SystemExit as exit:
        returncode = exit.code
    finally:
        if script == "train.py":
            remove_own_lock(flags[flags.index("--out-dir") + 1] if "--out-dir" in flags else "out")
    captured = capsys.readouterr()
    return subprocess.CompletedProcess([script, *flags], returncode, captured.out, captured.err)


def remove_own_lock(out_dir):
    """train.py's lock in `out_dir` if this process holds it (a subprocess's lock goes
    when it exits; ours would stay until pytest does)."""
    lock = os.path.join(out_dir, "train.lock")
    if os.path.isfile(lock):
        with open(lock) as f:
            ours = f.read().strip() == str(os.getpid())
        if ours:
            os.remove(lock)


def jpeg_bytes(color, size=(40, 30)):
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG")
    return buffer.getvalue()


def add_file(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tar_shards(folder, num_shards, per_shard, truncated=(), empty_caption=()):
    """Shards {folder}/{00000..}.tar of {key}.jpg + {key}.txt (+ {key}.json); the keys in
    `truncated` get half a JPEG, those in `empty_caption` an empty .txt. The caption of
    sample k is 'caption k'. Returns the shard paths."""
    paths = []
    for shard in range(num_shards):
        path = os.path.join(folder, f"{shard:05d}.tar")
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                k = shard * per_shard + i
                key = f"{k:09d}"
                image = jpeg_bytes((k * 7 % 256, k * 13 % 256, 90))
                add_file(tar, f"{key}.jpg", image[: len(image) // 2] if k in truncated else image)
                add_file(tar, f"{key}.txt", b"" if k in empty_caption else f"caption {k}".encode())
                add_file(tar, f"{key}.json", b'{"key": "%s"}' % key.encode())
        paths.append(path)
    return paths
