"""Downstream evaluation: zero-shot classification with prompt ensembles.

    python eval.py --checkpoint out/ckpt.pt            # synthetic val tasks
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import DataError, EvalTransform, Tokenizer, make_loader
from synthetic import COLORS, SHAPES, SyntheticCaptions, with_article
from model import TwoTowerModel

SHAPE_TEMPLATES = ("a photo of a {}.", "there is a {} in the picture.", "a {} on a cluttered background.")
# Color is named with a shape in the captions, so a color's prompts enumerate the shapes,
# as CLIP's ImageNet templates enumerate photo styles. Class names carry their article.
COLOR_TEMPLATES = tuple(f"a photo of {{}} {shape}." for shape in SHAPES)


@torch.no_grad()
def image_features(model, loader, device, projected=True, desc="images"):
    """Encode every image of `loader` (batches of (images, ...)): the unit CLIP
    embeddings u, or with projected=False the tower features f_v."""
    model.eval()
    encode = model.embed_image if projected else model.encode_image
    outputs = []
    for images, *_ in tqdm(loader, desc=desc, leave=False, disable=None):
        with autocast(device):
            outputs.append(encode(images.to(device)).float().cpu())
    return torch.cat(outputs)


def autocast(device):
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=device_type == "cuda")


@torch.no_grad()
def zero_shot_classifier(model, tokenizer, classnames, templates, device):
    """One column per class: the normalized mean of the normalized embeddings of
    every template filled with the class name. -> (embed_dim, C)"""
    model.eval()
    columns = []
    for name in classnames:
        tokens = tokenizer([template.format(name) for template in templates]).to(device)
        with autocast(device):
            prompts = model.embed_text(tokens).float()  # (T, D), unit rows
        columns.append(F.normalize(prompts.mean(dim=0), dim=-1))
    return torch.stack(columns, dim=1).cpu()


def zero_shot_accuracy(image_embeddings, labels, classifier, topk=(1, 5)):
    """Top-k accuracy of image_embeddings @ classifier against integer labels."""
    scores = image_embeddings @ classifier  # (N, C)
    ranked = scores.topk(min(max(topk), scores.shape[1]), dim=1).indices
    hits = ranked == labels.view(-1, 1)
    return {f"top{k}": hits[:, :k].any(dim=1).float().mean().item() for k in topk if k <= scores.shape[1]}


def synthetic_zero_shot(model, tokenizer, image_size, num_samples=1000, seed=0,
                        num_heldout_pairs=4, device="cpu", batch_size=256):
    """Zero-shot top-1/top-5 on single-object val images: the shape task (6 classes),
    the color task (8) and, with held-out pairs, the shape task on images of the
    (color, shape) pairs never seen in training (compositional generalization)."""
    def run(dataset, classnames, templates, label_of):
        loader = make_loader(dataset, batch_size)
        embeddings = image_features(model, loader, device)
        labels = torch.tensor([label_of(dataset.scene(i)[0][0]) for i in range(len(dataset))])
        return zero_shot_accuracy(embeddings, labels, zero_shot_classifier(
            model, tokenizer, classnames, templates, device))

    val = dict(split="val", num_samples=num_samples, seed=seed, image_size=image_size,
               transform=EvalTransform(image_size), two_object_fraction=0.0, num_heldout_pairs=num_heldout_pairs)
    single_objects = SyntheticCaptions(**val)
    shapes, colors = list(SHAPES), list(COLORS)
    tasks = {
        "shape": run(single_objects, shapes, SHAPE_TEMPLATES, lambda o: shapes.index(o.shape)),
        "color": run(single_objects, [with_article(c) for c in colors], COLOR_TEMPLATES,
                     lambda o: colors.index(o.color)),
    }
    if num_heldout_pairs:  # shape recognition on (color, shape) pairs never seen in training
        tasks["heldout_shape"] = run(SyntheticCaptions(**val, only_heldout=True), shapes, SHAPE_TEMPLATES,
                                     lambda o: shapes.index(o.shape))
    return {f"zeroshot/{task}/{k}": v for task, result in tasks.items() for k, v in result.items()}


def print_table(metrics, file=sys.stdout):
    width = max(len(k) for k in metrics)
    for key, value in metrics.items():
        print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}",
              file=file)


def load_checkpoint(path, device):
    if not os.path.isfile(path):
        raise DataError(f"checkpoint not found: {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    model = TwoTowerModel.from_checkpoint(checkpoint).to(device)
    return model, checkpoint


def main():
    from train import OneLineErrorParser
    parser = OneLineErrorParser(description="Zero-shot evaluation of a trained checkpoint.")
    parser.add_argument("--checkpoint", required=True, help="checkpoint written by train.py")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to run the model")
    parser.add_argument("--val-samples", type=int, default=1000, help="synthetic val images per task")
    parser.add_argument("--output", default=None, help="JSON of flat metrics (default: beside the checkpoint)")
    args = parser.parse_args()
    try:
        model, checkpoint = load_checkpoint(args.checkpoint, args.device)
    except DataError as error:
        parser.error(str(error))
    train_args = checkpoint["args"]
    tokenizer = Tokenizer(model.config.context_length)
    metrics = synthetic_zero_shot(model, tokenizer, model.config.image_size, args.val_samples,
                                  train_args["seed"], train_args["synthetic_heldout_pairs"], args.device)
    print_table(metrics)
    output = args.output or os.path.join(os.path.dirname(args.checkpoint), "eval_metrics.json")
    with open(output, "w") as f:
        json.dump(metrics, f, indent=1)


if __name__ == "__main__":
    main()
