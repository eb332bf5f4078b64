"""How fast can an image tower learn shape at all? Trains the ViT image tower alone, with
a linear classifier on f_v and the shape label of single-object built-in images (cross
entropy, AdamW, train.py's warm-up and cosine schedule), and prints val shape top-1 as it
goes. It separates the tower's ability from the signal the objective gives it: if a tower
cannot learn shape from labels in a few hundred steps, no caption will teach it faster.

With --color-labels a second linear classifier learns the color label beside it (the two
cross entropies summed): the tower must then learn color as well, as it must under any
objective whose captions name colors, and what that costs shape shows.

    python experiments/tower_probe.py                  # the tiny preset: conv stem, 32 px
    python experiments/tower_probe.py --color-labels   # shape and color together
    python experiments/tower_probe.py --color-labels --no-conv-stem-norm   # stem not normalized

Takes train.py's model flags; only the image tower's fields matter.
"""
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the paper's code
from data import TrainTransform, normalize
from faults import OneLineErrorParser, non_negative_float, positive_int, reported_in_one_line
from flags import add_model_flags, model_config_from_args
from model import PRESETS, VisionTransformer, learning_rate
from synthetic import COLORS, SHAPES, SyntheticCaptions, object_labels, scored_scenes


def build_parser():
    p = OneLineErrorParser(description="Train the image tower alone on shape labels.")
    p.add_argument("--model", choices=list(PRESETS), default="tiny",
                   help="architecture preset (train.py's)")
    add_model_flags(p)
    p.add_argument("--batch-size", type=positive_int, default=128, help="images per step")
    p.add_argument("--steps", type=positive_int, default=300, help="optimizer steps")
    p.add_argument("--lr", type=non_negative_float, default=2e-3, help="peak learning rate")
    p.add_argument("--warmup", type=positive_int, default=50, help="linear warm-up steps")
    p.add_argument("--wd", type=non_negative_float, default=0.2, help="AdamW weight decay")
    p.add_argument("--eval-every", type=positive_int, default=50,
                   help="steps between val evaluations")
    p.add_argument("--val-samples", type=positive_int, default=500, help="val images")
    p.add_argument("--seed", type=int, default=0, help="seed for initialization and data")
    p.add_argument("--color-labels", action="store_true",
                   help="also learn the color label, with a second linear classifier")
    return p


def labelled_batch(scenes, first_index, batch_size):
    """Images, shape labels and color labels of samples first_index, first_index + 1, ..."""
    indices = range(first_index, first_index + batch_size)
    images = normalize(torch.stack([scenes[i][0] for i in indices]))
    objects = [scenes.scene(i)[0][0] for i in indices]
    shapes = torch.tensor([list(SHAPES).index(obj.shape) for obj in objects])
    colors = torch.tensor([list(COLORS).index(obj.color) for obj in objects])
    return images, shapes, colors


def main(argv=None):
    args = build_parser().parse_args(argv)
    with reported_in_one_line("tower_probe.py"):
        config = model_config_from_args(args)
    torch.manual_seed(args.seed)
    tower = VisionTransformer(config)
    classifier = nn.Linear(config.vision_width, len(SHAPES))
    heads = [classifier]
    if args.color_labels:
        heads.append(nn.Linear(config.vision_width, len(COLORS)))
    parameters = [p for module in (tower, *heads) for p in module.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=args.wd,
                                  betas=(0.9, 0.98), eps=1e-6)
    size = config.image_size
    train_scenes = SyntheticCaptions("train", seed=args.seed, image_size=size,
                                     transform=TrainTransform(size, scale=(0.8, 1.0)),
                                     two_object_fraction=0.0)
    val_scenes = scored_scenes("val", args.val_samples, args.seed, size, 4,
                               two_object_fraction=0.0)
    val_images = normalize(torch.stack([val_scenes[i][0] for i in range(len(val_scenes))]))
    val_labels = object_labels(val_scenes, "shape", SHAPES)
    print(f"image tower: {sum(p.numel() for p in tower.parameters()) / 1e6:.2f}M parameters, "
          f"{size} px, patch {config.patch_size}, conv stem {config.conv_stem}")
    started = time.perf_counter()
    for step in tqdm(range(args.steps), desc="steps"):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.lr, args.warmup, args.steps)
        images, shapes, colors = labelled_batch(train_scenes, step * args.batch_size,
                                                args.batch_size)
        features = tower(images)
        loss = sum(F.cross_entropy(head(features), labels)
                   for head, labels in zip(heads, (shapes, colors)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            tower.eval()
            with torch.no_grad():
                predictions = classifier(tower(val_images)).argmax(dim=1)
            tower.train()
            accuracy = (predictions == val_labels).float().mean().item()
            tqdm.write(f"step {step + 1}: loss {loss.item():.3f} | val shape top-1 "
                       f"{accuracy:.3f} (chance {1 / len(SHAPES):.3f}) | "
                       f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
