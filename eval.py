"""Downstream evaluation: zero-shot classification, image-text retrieval, linear probe.

    python eval.py zeroshot --checkpoint CKPT --data imagenet/val --classnames names.txt
    python eval.py retrieval --checkpoint CKPT --data coco_5k.csv
    python eval.py linear-probe --checkpoint CKPT --train-data cifar/train --test-data cifar/test

The same three tasks on the built-in data: `python synthetic.py eval --checkpoint CKPT`.
"""
import argparse
import hashlib
import json
import os
import sys
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import (DataError, EvalTransform, IndexedImages, OneLineErrorParser, Tokenizer,
                  collate_readable, device_name, group_captions_by_image, make_loader,
                  name_examples, non_negative_int, open_image, positive_float, positive_int,
                  read_caption_table, read_image_folder, read_lines)
from model import TwoTowerModel, autocast_context, default_device

# "a photo of a {}." and the 7 of CLIP's 80 ImageNet templates that its prompt-engineering
# notebook recommends as a small ensemble.
DEFAULT_TEMPLATES = ("a photo of a {}.", "itap of a {}.", "a bad photo of the {}.",
                     "a origami {}.", "a photo of the large {}.", "a {} in a video game.",
                     "art of the {}.", "a photo of the small {}.")
RECALL_AT = (1, 5, 10)
L2_GRID = tuple(10.0 ** k for k in range(-6, 3))


# ---------------------------------------------------------------------------------------- features

@torch.no_grad()
def image_features(model, dataset, device, projected=True, batch_size=256, workers=0,
                   desc="images"):
    """Encode the readable images of `dataset` (batches of (image or None, index)) ->
    (features, dataset index of each row): the unit CLIP embeddings u, or with
    projected=False the tower features f_v. Unreadable images are skipped."""
    model.eval()
    encode = model.embed_image if projected else model.encode_image
    loader = make_loader(dataset, batch_size, workers=workers, collate_fn=collate_readable,
                         pin_memory=torch.device(device).type == "cuda")
    features, indices = [], []
    for images, batch_indices in tqdm(loader, desc=desc, leave=False, disable=None):
        if images is not None:
            with autocast_context(device):
                features.append(encode(images.to(device)).float().cpu())
            indices.append(batch_indices)
    if not features:
        raise DataError(f"none of the {len(dataset)} images could be read")
    return torch.cat(features), torch.cat(indices)


@torch.no_grad()
def text_embeddings(model, tokenizer, texts, device, batch_size=256):
    """Unit text embeddings w of `texts`, in order. -> (N, embed_dim)"""
    model.eval()
    embeddings = []
    for start in tqdm(range(0, len(texts), batch_size), desc="texts", leave=False, disable=None):
        tokens = tokenizer.trim_padding(tokenizer(texts[start:start + batch_size])).to(device)
        with autocast_context(device):
            embeddings.append(model.embed_text(tokens).float().cpu())
    return torch.cat(embeddings)


# --------------------------------------------------------------------------------------- zero-shot

def zero_shot_classifier(model, tokenizer, classnames, templates, device):
    """One column per class: the normalized mean of the normalized embeddings of
    every template filled with the class name. -> (embed_dim, C)"""
    prompts = [template.replace("{}", name) for name in classnames for template in templates]
    embeddings = text_embeddings(model, tokenizer, prompts, device)
    embeddings = embeddings.view(len(classnames), len(templates), -1)
    return F.normalize(F.normalize(embeddings, dim=-1).mean(dim=1), dim=-1).t()


def zero_shot_accuracy(image_embeddings, labels, classifier, topk=(1, 5), class_keys=None):
    """Top-k accuracy of image_embeddings @ classifier against integer labels, and with
    `class_keys` (one per class) the top-1 accuracy of each class."""
    scores = image_embeddings @ classifier  # (N, C)
    ranked = scores.topk(min(max(topk), scores.shape[1]), dim=1).indices
    hits = ranked == labels.view(-1, 1)
    metrics = {f"top{k}": hits[:, :k].any(dim=1).float().mean().item()
               for k in topk if k <= scores.shape[1]}
    for label, key in enumerate(class_keys or ()):
        if (labels == label).any():  # a class whose images were all unreadable has no accuracy
            metrics[f"class_top1/{key}"] = hits[labels == label, 0].float().mean().item()
    return metrics


# --------------------------------------------------------------------------------------- retrieval

def retrieval_recall(image_embeddings, caption_embeddings, caption_image, recall_at=RECALL_AT,
                     block_size=1024):
    """Image->text and text->image Recall@K; caption_image[j] is the image caption j
    describes. An image query is correct if any of its captions is in its top K; a
    caption query if its image is. One pass over blocks of image rows of the similarity
    matrix, keeping only top-K lists: memory O(block_size x captions)."""
    caption_image = torch.as_tensor(caption_image)
    depth, num_captions = max(recall_at), len(caption_embeddings)
    image_hits = []
    # (<= depth, captions): the best images found so far for each caption, best first
    best_scores = caption_embeddings.new_empty(0, num_captions)
    best_images = torch.empty(0, num_captions, dtype=torch.long)
    for start in range(0, len(image_embeddings), block_size):
        block = image_embeddings[start:start + block_size]
        scores = block @ caption_embeddings.t()  # (B, captions)
        top_captions = scores.topk(min(depth, num_captions), dim=1).indices  # (B, depth)
        block_images = torch.arange(start, start + len(scores))[:, None]
        image_hits.append(caption_image[top_captions] == block_images)
        block_best = scores.topk(min(depth, len(scores)), dim=0)  # per caption, in this block
        candidate_scores = torch.cat([best_scores, block_best.values])
        candidate_images = torch.cat([best_images, block_best.indices + start])
        best = candidate_scores.topk(min(depth, len(candidate_scores)), dim=0)
        best_scores, best_images = best.values, candidate_images.gather(0, best.indices)
    hits = {"image_to_text": torch.cat(image_hits),
            "text_to_image": (best_images == caption_image).t()}
    return {f"{direction}/R@{k}": found[:, :k].any(dim=1).float().mean().item()
            for direction, found in hits.items() for k in recall_at}


# ------------------------------------------------------------------------------------ linear probe

def fit_logistic_regression(features, labels, num_classes, l2, max_iter=1000):
    """Multinomial logistic regression to convergence by full-batch L-BFGS in float64:
        min_{W,b} mean_i CE(W x_i + b, y_i) + l2/2 ||W||^2      (b not penalized)
    which is scikit-learn's LogisticRegression(C = 1 / (l2 N)). -> (W, b)"""
    weight = features.new_zeros(features.shape[1], num_classes, requires_grad=True)
    bias = features.new_zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-6, tolerance_change=1e-10,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(features @ weight + bias, labels) + l2 / 2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def probe_accuracy(train_features, train_labels, test_features, test_labels, num_classes, l2):
    """Standardize with the training statistics, fit, return the test top-1."""
    mean, std = train_features.mean(dim=0), train_features.std(dim=0).clamp_min(1e-8)
    weight, bias = fit_logistic_regression((train_features - mean) / std, train_labels,
                                           num_classes, l2)
    predictions = ((test_features - mean) / std @ weight + bias).argmax(dim=1)
    return (predictions == test_labels).double().mean().item()


@contextmanager
def cpu_threads(count):
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def linear_probe(train_features, train_labels, test_features, test_labels, l2_grid=L2_GRID,
                 heldout_fraction=0.2, seed=0, device="cpu"):
    """Pick the L2 strength with the best top-1 on a random held-out part of the train
    split (ties go to the stronger), refit on the whole split, report test top-1.
    Features that are not all finite (a diverged model) have no probe: NaN at once, where
    L-BFGS's line search would spin to max_iter on a NaN loss."""
    if not (torch.isfinite(train_features).all() and torch.isfinite(test_features).all()):
        return {"top1": float("nan"), "l2": float("nan")}
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    train_features = train_features.to(device, torch.float64)
    test_features = test_features.to(device, torch.float64)
    train_labels, test_labels = train_labels.to(device), test_labels.to(device)
    order = torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(seed))
    heldout_count = int(heldout_fraction * len(order))
    heldout, fit = order[:heldout_count], order[heldout_count:]
    # A small fit is thousands of tiny steps, where waking threads costs more than it saves
    # (on a busy CPU, up to a scheduler time slice per step).
    small = train_features.numel() * num_classes < 10**7
    with cpu_threads(1 if small else torch.get_num_threads()):
        sweep = {}
        for l2 in sorted(l2_grid, reverse=True):
            sweep[l2] = probe_accuracy(train_features[fit], train_labels[fit],
                                       train_features[heldout], train_labels[heldout],
                                       num_classes, l2)
        best_l2 = max(sweep, key=sweep.get)
        top1 = probe_accuracy(train_features, train_labels, test_features, test_labels,
                              num_classes, best_l2)
    sweep_metrics = {f"sweep/l2={l2:g}/heldout_top1": accuracy for l2, accuracy in sweep.items()}
    return {"top1": top1, "l2": best_l2, **sweep_metrics}


# -------------------------------------------------------------------------- folders, caption files

def readable_image_features(model, paths, args, projected=True, desc="images"):
    """Features of the images at `paths` that can be read, the row indices into
    `paths`, and how many were skipped (printed with the first few names)."""
    dataset = IndexedImages(paths, open_image, EvalTransform(model.config.image_size))
    features, indices = image_features(model, dataset, args.device, projected, args.batch_size,
                                       args.workers, desc)
    skipped = sorted(set(range(len(paths))) - set(indices.tolist()))
    if skipped:
        names = name_examples([paths[i] for i in skipped])
        print(f"skipped {len(skipped)} unreadable image(s): {names}", file=sys.stderr)
    return features, indices, len(skipped)


def folder_zero_shot(model, tokenizer, args):
    folders, samples = read_image_folder(args.data)
    classnames = read_lines(args.classnames, len(folders)) if args.classnames else folders
    templates = read_lines(args.templates) if args.templates else DEFAULT_TEMPLATES
    bad = [template for template in templates if "{}" not in template]
    if bad:
        raise DataError(f"{args.templates}: template(s) without {{}} for the class name: "
                        f"{name_examples(bad)}")
    embeddings, kept, skipped = readable_image_features(model, [path for path, _ in samples], args)
    labels = torch.tensor([label for _, label in samples])[kept]
    classifier = zero_shot_classifier(model, tokenizer, classnames, templates, args.device)
    accuracy = zero_shot_accuracy(embeddings, labels, classifier, class_keys=folders)
    return {**accuracy, "images": len(kept), "skipped_images": skipped}


def caption_retrieval(model, tokenizer, args):
    pairs = read_caption_table(args.data, args.csv_img_key, args.csv_caption_key,
                               args.csv_separator)
    image_paths, captions, caption_image = group_captions_by_image(pairs)
    image_embeddings, kept, skipped = readable_image_features(model, image_paths, args)
    # Captions of a skipped image leave with it; the kept images are renumbered 0..n-1.
    new_index = torch.full((len(image_paths),), -1, dtype=torch.long)
    new_index[kept] = torch.arange(len(kept))
    caption_image = new_index[torch.tensor(caption_image)]
    captions = [caption for caption, image in zip(captions, caption_image.tolist()) if image >= 0]
    caption_embeddings = text_embeddings(model, tokenizer, captions, args.device, args.batch_size)
    readable = caption_image >= 0
    recall = retrieval_recall(image_embeddings, caption_embeddings, caption_image[readable])
    return {**recall, "images": len(kept), "captions": len(captions), "skipped_images": skipped}


def feature_cache_path(args, root):
    """Where --feature-cache keeps one folder's features: one .npy pair per (checkpoint
    file and its modification time, folder)."""
    checkpoint = os.path.abspath(args.checkpoint)
    identity = f"{checkpoint}:{os.path.getmtime(checkpoint)}:{os.path.abspath(root)}"
    return os.path.join(args.feature_cache, hashlib.sha1(identity.encode()).hexdigest()[:16])


def cached_tower_features(model, root, args):
    """f_v and labels of the readable images of an image folder, through --feature-cache
    when given."""
    folders, samples = read_image_folder(root)
    paths = [path for path, _ in samples]
    labels = torch.tensor([label for _, label in samples])
    cache = feature_cache_path(args, root) if args.feature_cache else None
    if cache and os.path.isfile(f"{cache}_indices.npy"):
        features = torch.from_numpy(np.load(f"{cache}_features.npy"))
        kept = torch.from_numpy(np.load(f"{cache}_indices.npy"))
    else:
        features, kept, _ = readable_image_features(model, paths, args, projected=False, desc=root)
        if cache:
            try:
                os.makedirs(args.feature_cache, exist_ok=True)
                np.save(f"{cache}_features.npy", features.numpy())
                np.save(f"{cache}_indices.npy", kept.numpy())  # last: it marks a whole pair
            except OSError as error:
                raise DataError(f"--feature-cache {args.feature_cache}: "
                                f"{error.strerror or error}") from None
    return folders, features, labels[kept], len(paths) - len(kept)


def folder_linear_probe(model, tokenizer, args):
    train_classes, train_features, train_labels, train_skipped = cached_tower_features(
        model, args.train_data, args)
    test_classes, test_features, test_labels, test_skipped = cached_tower_features(
        model, args.test_data, args)
    if train_classes != test_classes:
        raise DataError(f"{args.train_data} and {args.test_data} have different class folders")
    probe = linear_probe(train_features, train_labels, test_features, test_labels, args.l2_grid,
                         device=args.device)
    return {**probe, "train_images": len(train_labels), "test_images": len(test_labels),
            "skipped_images": train_skipped + test_skipped}


# ------------------------------------------------------------------------------------ command line

def print_table(metrics, file=sys.stdout):
    """One line per metric; per-class accuracies only go to the JSON."""
    shown = {k: v for k, v in metrics.items() if "/class_top1/" not in k}
    width = max(len(k) for k in shown)
    for key, value in shown.items():  # an L2 strength in its own scale, accuracies to 4 places
        is_accuracy = isinstance(value, float) and not key.endswith("/l2")
        text = f"{value:.4f}" if is_accuracy else f"{value:g}"
        print(f"{key:<{width}}  {text}", file=file)
    if len(shown) < len(metrics):
        hidden = len(metrics) - len(shown)
        print(f"(and {hidden} per-class top-1 accuracies in the JSON)", file=file)


def non_finite_tensors(state_dict):
    """Names of the floating-point tensors of a state_dict that hold a NaN or an infinity."""
    return [name for name, tensor in state_dict.items()
            if tensor.is_floating_point() and not torch.isfinite(tensor).all()]


def read_checkpoint(path):
    """A train.py checkpoint, or a DataError that says what is wrong with the file."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # truncated, empty, text, another format: all say the same
        text = str(error).strip()
        reason = text.splitlines()[0][:120] if text else type(error).__name__
        raise DataError(f"{path} is not a readable checkpoint ({reason})") from None
    missing = {"model", "optimizer", "step", "args", "model_config", "objective"} - set(
        checkpoint if isinstance(checkpoint, dict) else ())
    if missing:
        raise DataError(f"{path} is not a checkpoint written by train.py (no "
                        f"{', '.join(sorted(missing))})")
    broken = non_finite_tensors(checkpoint["model"])
    if broken:  # train.py never writes one; an older or edited file might hold one
        raise DataError(f"{path} has weights that are not finite ({broken[0]} and "
                        f"{len(broken) - 1} more): the run diverged")
    return checkpoint


def load_model(path, device):
    """The model of a train.py checkpoint, on `device`, and the checkpoint itself."""
    if not os.path.isfile(path):
        raise DataError(f"checkpoint not found: {path}")
    checkpoint = read_checkpoint(path)
    model = TwoTowerModel.from_checkpoint(checkpoint).to(device)
    return model, checkpoint


def dataset_name(path):
    """'imagenet' for imagenet/val/, 'coco_5k' for coco_5k.csv: the keys of the metrics."""
    path = os.path.abspath(path)
    name = os.path.splitext(os.path.basename(path))[0]
    if name in ("train", "val", "test", "images"):
        return os.path.basename(os.path.dirname(path))
    return name


def checkpoint_flags():
    """The flags every evaluation command shares, as an argparse parent."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--checkpoint", required=True, help="checkpoint written by train.py")
    common.add_argument("--device", type=device_name, default=default_device(),
                        help="where to run the model: cpu, cuda or cuda:N")
    common.add_argument("--batch-size", type=positive_int, default=256,
                        help="images or captions per forward pass")
    common.add_argument("--workers", type=non_negative_int, default=2,
                        help="image-loading processes")
    common.add_argument("--output", default=None,
                        help="JSON of flat metrics (default: eval_<task>[_<name>].json beside "
                             "the checkpoint)")
    return common


def build_parser():
    common = checkpoint_flags()
    parser = OneLineErrorParser(description="Evaluate a checkpoint of train.py on your data.")
    tasks = parser.add_subparsers(dest="task", required=True)
    zeroshot = tasks.add_parser("zeroshot", parents=[common],
                                help="zero-shot classification of an image folder")
    zeroshot.add_argument("--data", required=True,
                          help="ImageNet-style folder: DATA/<class>/<image>")
    zeroshot.add_argument("--classnames",
                          help="class names, one per line, in sorted class-folder order "
                               "(default: the folder names)")
    zeroshot.add_argument("--templates",
                          help="prompt templates, one per line, {} for the class name "
                               "(default: 8 of CLIP's ImageNet templates)")
    retrieval = tasks.add_parser("retrieval", parents=[common],
                                 help="image<->text retrieval on captioned images")
    retrieval.add_argument("--data", required=True,
                           help="CSV, TSV or JSONL of image paths (relative to the file) and "
                                "captions; several rows per image allowed")
    retrieval.add_argument("--csv-img-key", default="filepath", help="column of the image paths")
    retrieval.add_argument("--csv-caption-key", default="title", help="column of the captions")
    retrieval.add_argument("--csv-separator", default=None,
                           help="CSV separator (default: tab for .tsv, else comma)")
    probe = tasks.add_parser("linear-probe", parents=[common],
                             help="logistic regression on frozen image features")
    probe.add_argument("--train-data", required=True,
                       help="ImageNet-style folder of training images")
    probe.add_argument("--test-data", required=True,
                       help="folder of test images, the same class folders")
    probe.add_argument("--l2-grid", type=positive_float, nargs="+", default=L2_GRID,
                       help="L2 strengths to sweep on 20%% of the training images "
                            "(C = 1 / (l2 N) in scikit-learn)")
    probe.add_argument("--feature-cache", default=None,
                       help="folder for .npy image features, reused while checkpoint and "
                            "folder path are the same")
    for task in (zeroshot, retrieval, probe):
        task.add_argument("--name", default=None,
                          help="dataset name in the metric keys (default: from the path)")
    return parser


TASKS = {"zeroshot": folder_zero_shot, "retrieval": caption_retrieval,
         "linear-probe": folder_linear_probe}


def write_metrics(metrics, output):
    print_table(metrics)
    with open(output, "w") as f:
        json.dump(metrics, f, indent=1)
    print(f"wrote {output}")


def check_output(path):
    """Fail before any work if the metrics could not be written there."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise DataError(f"--output {path}: no folder {folder}")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.output:
            check_output(args.output)
        model, _ = load_model(args.checkpoint, args.device)
        tokenizer = Tokenizer(model.config.context_length)
        data = args.test_data if args.task == "linear-probe" else args.data
        name = args.name or dataset_name(data)
        prefix = f"{args.task.replace('-', '_')}/{name}"
        results = TASKS[args.task](model, tokenizer, args)
    except DataError as error:
        parser.error(str(error))
    metrics = {f"{prefix}/{key}": value for key, value in results.items()}
    default_output = os.path.join(os.path.dirname(args.checkpoint), f"eval_{args.task}_{name}.json")
    write_metrics(metrics, args.output or default_output)


if __name__ == "__main__":
    main()
