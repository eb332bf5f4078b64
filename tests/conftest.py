"""Data files the tests write themselves: tar shards as img2dataset lays them out."""
import io
import os
import tarfile

from PIL import Image


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
