r"""Evaluation, the paper's downstream suite as far as it runs here: zero-shot classification
(ImageNet and its out-of-domain variants), image-text retrieval, the linear and kNN probes
on image features, and the text tower on its own (a linear probe on sentences, semantic
textual similarity); on image folders and tables or on the built-in data. One command
line for all.

    python eval.py zeroshot --checkpoint CKPT --data imagenet/val --classnames imagenet \
        --templates openai
    python eval.py zeroshot --checkpoint CKPT --classnames imagenet --templates openai \
        --data imagenet/val imagenetv2/ imagenet-sketch/ imagenet-a/ imagenet-r/
    python eval.py retrieval --checkpoint CKPT --data coco_5k.csv
    python eval.py linear-probe --checkpoint CKPT --train-data cifar/train --test-data cifar/test
    python eval.py knn --checkpoint CKPT --train-data cifar/train --test-data cifar/test
    python eval.py text-probe --checkpoint CKPT --train-data sst2/train.tsv --test-data sst2/dev.tsv
    python eval.py sts --checkpoint CKPT --data stsb/dev.tsv
    python eval.py synthetic --checkpoint CKPT     # all of them on the built-in val data

Every function below the command line's takes explicit arguments: call them from a
notebook with a model from checkpoint.load.
"""
import argparse
import hashlib
import json
import math
import os
import re
import sys
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import load_model
from data import (EvalTransform, IndexedImages, collate_readable, group_captions_by_image,
                  has_words, is_caption_table, make_loader, name_examples, normalize, open_image,
                  read_image_caption_pairs, read_image_folder, read_lines, read_table_columns,
                  tokenizer_for)
from faults import (DataError, OneLineErrorParser, device_name, non_negative_int,
                    one_character, positive_float, positive_int, reported_in_one_line, writing)
from distributed import default_device
from model import autocast_context
from synthetic import COLORS, SHAPES, object_labels, scored_scenes, with_article

# "a photo of a {}." and the 7 of CLIP's 80 ImageNet templates that its prompt-engineering
# notebook recommends as a small ensemble.
DEFAULT_TEMPLATES = ("a photo of a {}.", "itap of a {}.", "a bad photo of the {}.",
                     "a origami {}.", "a photo of the large {}.", "a {} in a video game.",
                     "art of the {}.", "a photo of the small {}.")
# Lists that ship in prompts/: ImageNet's 1000 class names and the 80 prompt templates that
# CLIP's authors published (CLIP's notebook Prompt_Engineering_for_ImageNet.ipynb; the same
# lists as open_clip's zero_shot_metadata.py and clip_benchmark's imagenet1k).
PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")
NAMED_CLASSNAMES = {"imagenet": os.path.join(PROMPTS, "imagenet_classnames.txt")}
# ImageNet's 1000 WordNet ids, in the order of its class names (the class index order), for
# the variants laid out by id: ImageNet's val, -Sketch, and the 200 classes of -A and -R.
IMAGENET_WORDNET_IDS = os.path.join(PROMPTS, "imagenet_wnids.txt")
NAMED_TEMPLATES = {"openai": os.path.join(PROMPTS, "openai_imagenet_templates.txt")}
WORDNET_ID = re.compile(r"n\d{8}")
RECALL_AT = (1, 5, 10)
L2_GRID = tuple(10.0 ** k for k in range(-6, 3))


# ---------------------------------------------------------------------------------------- features

@torch.no_grad()
def encode_images(model, dataset, device, *, projected=True, batch_size=256, workers=0,
                  desc="images"):
    """Encode the readable images of `dataset` (batches of (image or None, index)) ->
    (features, dataset index of each row): the unit CLIP embeddings u, or with
    projected=False the tower features f_v. Unreadable images are skipped."""
    model.eval()
    loader = make_loader(dataset, batch_size, workers=workers, collate_fn=collate_readable,
                         pin_memory=torch.device(device).type == "cuda")
    features, indices = [], []
    for images, batch_indices in tqdm(loader, desc=desc, leave=False, disable=None):
        if images is not None:
            with autocast_context(device):
                images = normalize(images.to(device))
                encoded = (model.encode_image(images, normalize=True) if projected
                           else model.image_tower_features(images))
                features.append(encoded.float().cpu())
            indices.append(batch_indices)
    if not features:
        raise DataError(f"none of the {len(dataset)} images could be read")
    return torch.cat(features), torch.cat(indices)


@torch.no_grad()
def encode_texts(model, tokenizer, texts, device, *, projected=True, batch_size=256):
    """The unit text embeddings w of `texts`, in order, or with projected=False the text
    tower's features f_t. -> (N, embed_dim) or (N, text_width)"""
    model.eval()
    encoded = []
    for start in tqdm(range(0, len(texts), batch_size), desc="texts", leave=False, disable=None):
        tokens = tokenizer.trim_padding(tokenizer(texts[start:start + batch_size])).to(device)
        with autocast_context(device):
            features = (model.encode_text(tokens, normalize=True) if projected
                        else model.text_tower_features(tokens))
            encoded.append(features.float().cpu())
    return torch.cat(encoded)


# --------------------------------------------------------------------------------------- zero-shot

def zero_shot_classifier(model, tokenizer, classnames, templates, device):
    """One column per class: the normalized mean of the normalized embeddings of
    every template filled with the class name. -> (embed_dim, C)"""
    prompts = [template.replace("{}", name) for name in classnames for template in templates]
    embeddings = encode_texts(model, tokenizer, prompts, device)
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


def linear_probe(train_features, train_labels, test_features, test_labels, *, l2_grid=L2_GRID,
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


# --------------------------------------------------------------------------------------- kNN probe

def knn_probe(train_features, train_labels, test_features, test_labels, *, k=20,
              temperature=0.07, block_size=1024):
    """DINO's weighted k-nearest-neighbour classifier (Wu et al. 2018; DINO's eval_knn.py),
    how self-supervised features are usually judged beside the linear probe: features
    L2-normalized, each test image's k most cosine-similar training images vote for
    their class with weight exp(cos / temperature). No fitting, no hyperparameter sweep.
    -> {"top1", "top5"} (top5 only with at least 5 classes)"""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    train_features = F.normalize(train_features.float(), dim=-1)
    test_features = F.normalize(test_features.float(), dim=-1)
    k = min(k, len(train_features))
    hits = []
    for start in range(0, len(test_features), block_size):
        similarity = test_features[start:start + block_size] @ train_features.t()
        nearest_similarity, nearest = similarity.topk(k, dim=1)  # (B, k), nearest first
        # exp(cos / T) over each query's largest: the same ranking of the classes, and no
        # overflow to infinity at a small temperature (exp(1 / 0.01) is beyond float32)
        weights = ((nearest_similarity - nearest_similarity[:, :1]) / temperature).exp()
        votes = torch.zeros(len(similarity), num_classes)
        votes.scatter_add_(1, train_labels[nearest], weights)
        # the first of tied classes wins, as in scikit-learn's KNeighborsClassifier
        ranked = torch.cat([votes.argmax(dim=1, keepdim=True),
                            votes.topk(min(5, num_classes), dim=1).indices], dim=1)
        hits.append(ranked == test_labels[start:start + block_size, None])
    hits = torch.cat(hits)
    metrics = {"top1": hits[:, 0].double().mean().item()}
    if num_classes >= 5:
        metrics["top5"] = hits.any(dim=1).double().mean().item()
    return metrics


# --------------------------------------------------------------------------------- the text tower

def average_ranks(values):
    """1-based ranks of a 1-D tensor's values, tied values sharing their mean rank."""
    order = values.argsort(stable=True)
    _, tie_group, counts = torch.unique_consecutive(values[order], return_inverse=True,
                                                    return_counts=True)
    last = counts.cumsum(0).double()  # the 1-based rank of each tie group's last value
    ranks = torch.empty(len(values), dtype=torch.float64)
    ranks[order] = (last - (counts - 1) / 2)[tie_group]
    return ranks


def spearman(x, y):
    """Spearman's rank correlation: Pearson's correlation of the average ranks."""
    x, y = average_ranks(x), average_ranks(y)
    x, y = x - x.mean(), y - y.mean()
    return (x @ y / (x.norm() * y.norm())).item()


def labelled_sentences(path, text_key, label_key, separator=None):
    """(sentences, labels as text) of a table, and how many rows had no sentence (skipped)."""
    rows = read_table_columns(path, (text_key, label_key), separator)
    kept = [(str(text), str(label).strip()) for text, label in rows if has_words(str(text))]
    if not kept:
        raise DataError(f"{path}: no row has a sentence")
    return [text for text, _ in kept], [label for _, label in kept], len(rows) - len(kept)


def text_probe(model, tokenizer, train_path, test_path, device, *, text_key="sentence",
               label_key="label", separator=None, l2_grid=L2_GRID, batch_size=256):
    """The linear probe (linear_probe: L-BFGS, L2 picked on a held-out fifth) on frozen
    text-tower features f_t of two tables of sentences and labels (GLUE's single-sentence
    tasks: SST-2's `sentence`, `label`). Labels are classes by their text; rows without a
    sentence are skipped and counted."""
    splits = {split: labelled_sentences(path, text_key, label_key, separator)
              for split, path in (("train", train_path), ("test", test_path))}
    classes = sorted(set(splits["train"][1]))
    unseen = sorted(set(splits["test"][1]) - set(classes))
    if unseen:
        raise DataError(f"{test_path}: label(s) {name_examples(unseen)} are not in {train_path}")
    features, labels = {}, {}
    for split, (sentences, names, _) in splits.items():
        features[split] = encode_texts(model, tokenizer, sentences, device, projected=False,
                                       batch_size=batch_size)
        labels[split] = torch.tensor([classes.index(name) for name in names])
    result = linear_probe(features["train"], labels["train"], features["test"], labels["test"],
                          l2_grid=l2_grid, device=device)
    return {**result, "train_sentences": len(labels["train"]),
            "test_sentences": len(labels["test"]),
            "skipped_sentences": splits["train"][2] + splits["test"][2]}


def sentence_similarity(model, tokenizer, path, device, *, keys=("sentence1", "sentence2", "score"),
                        separator=None, batch_size=256):
    """Semantic textual similarity (STS-B's layout: sentence1, sentence2, score): Spearman's
    correlation between the gold scores and the cosine of the two sentences' text-tower
    features f_t ("tower"), and of their embeddings w ("embedding"). A pair without two
    sentences and a number is skipped and counted."""
    pairs = []
    rows = read_table_columns(path, keys, separator)
    for first, second, score in rows:
        try:
            gold = float(score)
        except (TypeError, ValueError):
            continue
        if has_words(str(first)) and has_words(str(second)) and math.isfinite(gold):
            pairs.append((str(first), str(second), gold))
    if len(pairs) < 2:
        raise DataError(f"{path}: {len(pairs)} pair(s) with two sentences and a score; "
                        "a correlation needs two or more")
    gold = torch.tensor([score for _, _, score in pairs], dtype=torch.float64)
    metrics = {}
    for name, projected in (("tower", False), ("embedding", True)):
        first, second = (encode_texts(model, tokenizer, [pair[i] for pair in pairs], device,
                                      projected=projected, batch_size=batch_size)
                         for i in (0, 1))
        cosine = F.cosine_similarity(first.double(), second.double(), dim=-1)
        metrics[f"{name}/spearman"] = spearman(cosine, gold)
    return {**metrics, "pairs": len(pairs), "skipped_pairs": len(rows) - len(pairs)}


def text_to_text_recall(embeddings, caption_image, recall_at=(1, 5)):
    """Captions finding the other captions of their image: for each caption, whether one
    of its K nearest other captions (cosine of unit embeddings) describes the same image.
    -> {"text_to_text/R@K"}"""
    caption_image = torch.as_tensor(caption_image)
    similarity = embeddings @ embeddings.t()
    similarity.fill_diagonal_(-math.inf)  # a caption does not find itself
    nearest = similarity.topk(max(recall_at), dim=1).indices
    hits = caption_image[nearest] == caption_image[:, None]
    return {f"text_to_text/R@{k}": hits[:, :k].any(dim=1).float().mean().item()
            for k in recall_at}


# -------------------------------------------------------------------------- folders, caption files

def encode_readable_images(model, paths, device, *, projected=True, batch_size=256, workers=0,
                           desc="images", load=open_image):
    """Features of the images at `paths` (or whatever `load` opens, e.g. a tar sample's
    bytes with open_image_bytes) that can be read, the row indices into `paths`, and how
    many were skipped (printed with the first few names)."""
    dataset = IndexedImages(paths, load, EvalTransform(model.config.image_size))
    features, indices = encode_images(model, dataset, device, projected=projected,
                                       batch_size=batch_size, workers=workers, desc=desc)
    skipped = sorted(set(range(len(paths))) - set(indices.tolist()))
    if skipped:
        names = name_examples([paths[i] if isinstance(paths[i], str) else f"sample {i}"
                               for i in skipped])
        print(f"skipped {len(skipped)} unreadable image(s): {names}", file=sys.stderr)
    return features, indices, len(skipped)


def folder_class_names(root, folders, classnames_file=None):
    """The class name of each class folder of ROOT (`folders`, sorted), by the folders' own
    layout, so that no folder is named by its place in the sorted list by accident:

    - `classnames_file` "imagenet" (ImageNet's 1000 names): folders named by WordNet id
      (ImageNet's val, -Sketch, any subset such as the 200 of -A and -R) take their id's
      name; folders named by class index, 0 to 999 (ImageNet-V2), the name at that index;
      any other folder is refused;
    - a file of your own: folders named by integers take the line at that index; other
      folders take the lines in sorted folder order, one line each;
    - no file: the folder names; a folder named by WordNet id is refused, since its
      prompts would read like no caption."""
    indexed = all(folder.isdigit() for folder in folders)
    if classnames_file in NAMED_CLASSNAMES:
        names = read_lines(NAMED_CLASSNAMES[classnames_file], 1000)
        wordnet_ids = read_lines(IMAGENET_WORDNET_IDS, 1000)
        if all(folder in wordnet_ids for folder in folders):
            return [names[wordnet_ids.index(folder)] for folder in folders]
        if not indexed:
            odd = [f for f in folders if f not in wordnet_ids]
            raise DataError(f"{root}: --classnames {classnames_file} names ImageNet's classes "
                            "by WordNet id (n01440764) or class index (0..999, ImageNet-V2); "
                            f"{len(odd)} class folder(s) are neither: {name_examples(odd)}")
    elif classnames_file:
        names = read_lines(classnames_file, None if indexed else len(folders))
    else:
        wordnet = [folder for folder in folders if WORDNET_ID.fullmatch(folder)]
        if wordnet:
            raise DataError(f"{root}: {len(wordnet)} class folder(s) are WordNet ids "
                            f"({name_examples(wordnet)}), which make prompts no caption reads "
                            "like; pass --classnames imagenet for ImageNet's classes, or a file "
                            "of class names")
        return list(folders)
    too_large = [folder for folder in folders if int(folder) >= len(names)]
    if too_large:
        raise DataError(f"{root}: class folder(s) {name_examples(too_large)} name a class index "
                        f"beyond the {len(names)} class names")
    return [names[int(folder)] for folder in folders]


def folder_zero_shot(model, tokenizer, root, device, *, classnames_file=None,
                     templates_file=None, batch_size=256, workers=0):
    """Zero-shot top-1 and top-5 on an ImageNet-style folder ROOT/<class>/<image>, the
    classes named by folder_class_names, prompted with DEFAULT_TEMPLATES or the lines of
    `templates_file` ("openai" for CLIP's 80). The classifier holds the folders' classes
    (the 200 of ImageNet-A or -R). Per class: its top-1 and the name it was given."""
    folders, samples = read_image_folder(root)
    classnames = folder_class_names(root, folders, classnames_file)
    templates = read_templates(templates_file)
    paths = [path for path, _ in samples]
    embeddings, kept, skipped = encode_readable_images(model, paths, device,
                                                       batch_size=batch_size, workers=workers)
    labels = torch.tensor([label for _, label in samples])[kept]
    classifier = zero_shot_classifier(model, tokenizer, classnames, templates, device)
    accuracy = zero_shot_accuracy(embeddings, labels, classifier, class_keys=folders)
    given = {f"class_name/{folder}": name for folder, name in zip(folders, classnames)}
    return {**accuracy, "images": len(kept), "skipped_images": skipped, **given}


def read_templates(templates_file=None):
    """Prompt templates: DEFAULT_TEMPLATES, CLIP's 80 for "openai", or a file's lines."""
    templates_file = NAMED_TEMPLATES.get(templates_file, templates_file)
    templates = read_lines(templates_file) if templates_file else DEFAULT_TEMPLATES
    bad = [template for template in templates if "{}" not in template]
    if bad:
        raise DataError(f"{templates_file}: template(s) without {{}} for the class name: "
                        f"{name_examples(bad)}")
    return templates


def zero_shot_suite(model, tokenizer, roots, device, *, names=None, **options):
    """folder_zero_shot on each folder of `roots`, the class names and templates shared;
    the first is in-domain (ImageNet's val), the others out-of-domain (its variants), whose
    mean top-1 and top-5 is the paper's out-of-domain average. -> flat metrics
    zeroshot/<name>/..., and zeroshot/ood_mean/... with two or more folders."""
    names = names or [dataset_name(root) for root in roots]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise DataError(f"--data: two sets are named {repeated[0]}; rename a folder or pass "
                        "--name, one per set")
    metrics = {}
    for root, name in zip(roots, names):
        result = folder_zero_shot(model, tokenizer, root, device, **options)
        metrics.update({f"zeroshot/{name}/{key}": value for key, value in result.items()})
    for key in ("top1", "top5") if len(roots) > 1 else ():
        values = [metrics.get(f"zeroshot/{name}/{key}") for name in names[1:]]
        if None not in values:
            metrics[f"zeroshot/ood_mean/{key}"] = sum(values) / len(values)
    return metrics


def caption_retrieval(model, tokenizer, path, device, *, image_key="filepath",
                      caption_key="title", separator=None, batch_size=256, workers=0):
    """Recall@K both ways on a caption table, several rows per image allowed, or on
    webdataset tar shards, a caption per image."""
    pairs, load, shard_skips = read_image_caption_pairs(path, image_key, caption_key, separator)
    if is_caption_table(path):
        image_paths, captions, caption_image = group_captions_by_image(pairs)
    else:
        image_paths, captions = [image for image, _ in pairs], [caption for _, caption in pairs]
        caption_image = list(range(len(pairs)))
    image_embeddings, kept, skipped = encode_readable_images(
        model, image_paths, device, batch_size=batch_size, workers=workers, load=load)
    skipped += shard_skips.get("bad_image", 0)
    # Captions of a skipped image leave with it; the kept images are renumbered 0..n-1.
    new_index = torch.full((len(image_paths),), -1, dtype=torch.long)
    new_index[kept] = torch.arange(len(kept))
    caption_image = new_index[torch.tensor(caption_image)]
    captions = [caption for caption, image in zip(captions, caption_image.tolist()) if image >= 0]
    caption_embeddings = encode_texts(model, tokenizer, captions, device, batch_size=batch_size)
    readable = caption_image >= 0
    recall = retrieval_recall(image_embeddings, caption_embeddings, caption_image[readable])
    shard_counts = {f"skipped_{reason.removeprefix('bad_')}s": shard_skips[reason]
                    for reason in ("bad_caption", "bad_shard") if shard_skips.get(reason)}
    return {**recall, "images": len(kept), "captions": len(captions), "skipped_images": skipped,
            **shard_counts}


def file_digest(path, chunk_size=2**20):
    """SHA-1 of a file's bytes (a B/16 checkpoint: a few seconds)."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def feature_cache_path(cache_dir, checkpoint_digest, samples):
    """Where a feature cache keeps the features of one folder's `samples` ((path, label)
    pairs): one .npy pair per checkpoint content and folder listing, each image's path,
    class, size and modification time. A changed checkpoint, or an image added, removed,
    moved or rewritten, gives a new pair: stale features are never read."""
    listing = [(os.path.abspath(path), label, os.path.getsize(path), os.path.getmtime(path))
               for path, label in samples]
    identity = json.dumps([checkpoint_digest, listing])
    return os.path.join(cache_dir, hashlib.sha1(identity.encode()).hexdigest()[:16])


def cached_tower_features(model, root, device, *, cache_dir=None, checkpoint_digest=None,
                          batch_size=256, workers=0):
    """f_v and labels of the readable images of an image folder, through a .npy pair in
    `cache_dir` when given (see feature_cache_path)."""
    folders, samples = read_image_folder(root)
    paths = [path for path, _ in samples]
    labels = torch.tensor([label for _, label in samples])
    cache = cache_dir and feature_cache_path(cache_dir, checkpoint_digest, samples)
    cached = read_feature_cache(cache) if cache and os.path.isfile(f"{cache}_indices.npy") else None
    if cached is not None:
        features, kept = cached
    else:
        features, kept, _ = encode_readable_images(model, paths, device, projected=False,
                                                    batch_size=batch_size, workers=workers,
                                                    desc=root)
        if cache:
            with writing(f"--feature-cache {os.path.dirname(cache)}"):
                np.save(f"{cache}_features.npy", features.numpy())
                np.save(f"{cache}_indices.npy", kept.numpy())  # last: it marks a whole pair
    return folders, features, labels[kept], len(paths) - len(kept)


def read_feature_cache(cache):
    """(features, indices) of a .npy pair, or None (said on stderr) when a file is cut short
    or unreadable: the features are then computed again and the pair rewritten."""
    try:
        features, kept = (torch.from_numpy(np.load(f"{cache}_{part}.npy"))
                          for part in ("features", "indices"))
    except (OSError, ValueError, EOFError) as error:
        print(f"feature cache {cache}_*.npy unreadable ({error}): computing the features "
              "again", file=sys.stderr)
        return None
    if len(features) != len(kept):
        print(f"feature cache {cache}_*.npy: {len(features)} features for {len(kept)} images: "
              "computing the features again", file=sys.stderr)
        return None
    return features, kept


def folder_probe(model, train_root, test_root, device, *, probe="linear", l2_grid=L2_GRID,
                 k=20, temperature=0.07, feature_cache=None, checkpoint_path=None,
                 batch_size=256, workers=0):
    """The linear probe (`probe` "linear") or the kNN probe ("knn") on f_v of two image
    folders with the same class folders. With `feature_cache` (a folder) the features
    of `checkpoint_path`'s model are kept there and reused while the checkpoint's bytes
    and each folder's images are the same."""
    digest = None
    if feature_cache:  # checked before the first feature is computed
        with writing(f"--feature-cache {feature_cache}"):
            os.makedirs(feature_cache, exist_ok=True)
        if not os.access(feature_cache, os.W_OK):
            raise DataError(f"--feature-cache {feature_cache} is not writable")
        digest = file_digest(checkpoint_path)
    splits = {}
    for split, root in (("train", train_root), ("test", test_root)):
        splits[split] = cached_tower_features(model, root, device, cache_dir=feature_cache,
                                              checkpoint_digest=digest, batch_size=batch_size,
                                              workers=workers)
    (train_classes, train_features, train_labels, train_skipped) = splits["train"]
    (test_classes, test_features, test_labels, test_skipped) = splits["test"]
    if train_classes != test_classes:
        raise DataError(f"{train_root} and {test_root} have different class folders")
    if probe == "knn":
        result = knn_probe(train_features, train_labels, test_features, test_labels, k=k,
                           temperature=temperature)
    else:
        result = linear_probe(train_features, train_labels, test_features, test_labels,
                              l2_grid=l2_grid, device=device)
    return {**result, "train_images": len(train_labels), "test_images": len(test_labels),
            "skipped_images": train_skipped + test_skipped}


# ---------------------------------------------------------------------------- the built-in data

SHAPE_TEMPLATES = ("a photo of a {}.", "there is a {} in the picture.",
                   "a {} on a cluttered background.")
# Color is named with a shape in the captions, so a color's prompts enumerate the shapes,
# as CLIP's ImageNet templates enumerate photo styles. Class names carry their article.
COLOR_TEMPLATES = tuple(f"a photo of {{}} {shape}." for shape in SHAPES)
# The numbers a reader looks for first, as train.py prints them and the study tabulates
# them: label -> key of synthetic_evaluation's metrics.
HEADLINE_METRICS = {
    "zero-shot shape": "zeroshot/shape/top1",
    "zero-shot color": "zeroshot/color/top1",
    "held-out pairs, shape": "zeroshot/heldout_shape/top1",
    "image→text R@1": "retrieval/synthetic/image_to_text/R@1",
    "text→image R@1": "retrieval/synthetic/text_to_image/R@1",
    "probe shape": "linear_probe/synthetic_shape/top1",
    "probe color": "linear_probe/synthetic_color/top1",
}


def encode_scenes(model, scenes, device, projected=True, batch_size=256):
    images = IndexedImages(range(len(scenes)), scenes.image, scenes.transform)
    return encode_images(model, images, device, projected=projected, batch_size=batch_size)[0]


def synthetic_zero_shot(model, tokenizer, device, *, num_samples=1000, seed=0,
                        num_heldout_pairs=4, batch_size=256):
    """Zero-shot shape (with each shape's top-1) and color on single-object val images,
    and shape on the held-out (color, shape) pairs (compositional generalization)."""
    size = model.config.image_size
    single = scored_scenes("val", num_samples, seed, size, num_heldout_pairs,
                           two_object_fraction=0.0)
    shape_classifier = zero_shot_classifier(model, tokenizer, list(SHAPES), SHAPE_TEMPLATES,
                                            device)
    color_names = [with_article(color) for color in COLORS]
    color_classifier = zero_shot_classifier(model, tokenizer, color_names, COLOR_TEMPLATES, device)
    embeddings = encode_scenes(model, single, device, batch_size=batch_size)
    shape_labels = object_labels(single, "shape", SHAPES)
    color_labels = object_labels(single, "color", COLORS)
    tasks = {"zeroshot/shape": zero_shot_accuracy(embeddings, shape_labels, shape_classifier,
                                                  class_keys=list(SHAPES)),
             "zeroshot/color": zero_shot_accuracy(embeddings, color_labels, color_classifier)}
    if num_heldout_pairs:
        heldout = scored_scenes("val", num_samples, seed, size, num_heldout_pairs,
                                two_object_fraction=0.0, only_heldout=True)
        heldout_embeddings = encode_scenes(model, heldout, device, batch_size=batch_size)
        heldout_labels = object_labels(heldout, "shape", SHAPES)
        tasks["zeroshot/heldout_shape"] = zero_shot_accuracy(heldout_embeddings, heldout_labels,
                                                             shape_classifier)
    return flat_metrics(tasks)


def flat_metrics(tasks):
    return {f"{task}/{key}": value
            for task, result in tasks.items() for key, value in result.items()}


def synthetic_evaluation(model, tokenizer, device, *, num_samples=1000, seed=0,
                         num_heldout_pairs=4, batch_size=256):
    """Every task on the built-in data: zero-shot (synthetic_zero_shot), retrieval with the
    val captions, shape and color linear and kNN probes on f_v, fit on train-split and
    scored on val-split single-object images, and the text tower's (synthetic_text_tasks).
    `seed` and `num_heldout_pairs` are those of the training run (train.py's --seed,
    --synthetic-heldout-pairs)."""
    size = model.config.image_size
    metrics = synthetic_zero_shot(model, tokenizer, device, num_samples=num_samples, seed=seed,
                                  num_heldout_pairs=num_heldout_pairs, batch_size=batch_size)
    captioned = scored_scenes("val", num_samples, seed, size, num_heldout_pairs)  # 1 or 2 objects
    captions = [captioned.caption(i) for i in range(len(captioned))]
    caption_embeddings = encode_texts(model, tokenizer, captions, device)
    image_embeddings = encode_scenes(model, captioned, device, batch_size=batch_size)
    tasks = {"retrieval/synthetic": retrieval_recall(image_embeddings, caption_embeddings,
                                                     range(len(captions)))}
    single = {split: scored_scenes(split, num_samples, seed, size, num_heldout_pairs,
                                   two_object_fraction=0.0) for split in ("train", "val")}
    features = {split: encode_scenes(model, scenes, device, projected=False, batch_size=batch_size)
                for split, scenes in single.items()}
    for attribute, names in (("shape", SHAPES), ("color", COLORS)):
        labels = {split: object_labels(scenes, attribute, names)
                  for split, scenes in single.items()}
        tasks[f"linear_probe/synthetic_{attribute}"] = linear_probe(
            features["train"], labels["train"], features["val"], labels["val"], device=device)
        tasks[f"knn/synthetic_{attribute}"] = knn_probe(features["train"], labels["train"],
                                                        features["val"], labels["val"])
    tasks.update(synthetic_text_tasks(model, tokenizer, device, single, captioned, batch_size))
    metrics.update(flat_metrics(tasks))
    return metrics


def synthetic_text_tasks(model, tokenizer, device, single, captioned, batch_size=256):
    """The text tower on its own, on the built-in data: shape and color linear probes on
    f_t of the single-object scenes' captions (fit on the train split's, scored on the
    val split's), and captions finding the other captions of their image (three exact
    captions of each val scene, one or two objects) by their embeddings w."""
    tasks = {}
    features = {split: encode_texts(model, tokenizer, [scenes.caption(i) for i in
                                                       range(len(scenes))], device,
                                    projected=False, batch_size=batch_size)
                for split, scenes in single.items()}
    for attribute, names in (("shape", SHAPES), ("color", COLORS)):
        labels = {split: object_labels(scenes, attribute, names)
                  for split, scenes in single.items()}
        tasks[f"text_probe/synthetic_{attribute}"] = linear_probe(
            features["train"], labels["train"], features["val"], labels["val"], device=device)
    captions = [captioned.exact_captions(i, 3) for i in range(len(captioned))]
    embeddings = encode_texts(model, tokenizer, [c for three in captions for c in three], device,
                              batch_size=batch_size)
    caption_image = torch.arange(len(captions)).repeat_interleave(3)
    tasks["text_retrieval/synthetic"] = text_to_text_recall(embeddings, caption_image)
    return tasks


# ------------------------------------------------------------------------------------ command line

def print_table(metrics, file=sys.stdout):
    """One line per metric; per-class accuracies and the probe's L2 sweep only go to
    the JSON."""
    in_json_only = ("/class_top1/", "/class_name/", "/sweep/")
    shown = {k: v for k, v in metrics.items() if not any(part in k for part in in_json_only)}
    width = max(len(k) for k in shown)
    for key, value in shown.items():  # an L2 strength in its own scale, accuracies to 4 places
        is_accuracy = isinstance(value, float) and not key.endswith("/l2")
        text = f"{value:.4f}" if is_accuracy else f"{value:g}"
        print(f"{key:<{width}}  {text}", file=file)
    if len(shown) < len(metrics):
        hidden = len(metrics) - len(shown)
        print(f"(and {hidden} per-class names and accuracies and L2-sweep accuracies in the "
              "JSON)", file=file)


def print_zero_shot_suite(metrics, file=sys.stdout):
    """A row per set of a zero-shot suite (zero_shot_suite's metrics), then the
    out-of-domain mean."""
    names = list(dict.fromkeys(key.split("/")[1] for key in metrics if key.endswith("/top1")))
    width = max(len(name) for name in names)
    print(f"{'set':<{width}}  top-1   top-5   images", file=file)
    for name in names:
        top1, top5 = metrics[f"zeroshot/{name}/top1"], metrics.get(f"zeroshot/{name}/top5")
        images = metrics.get(f"zeroshot/{name}/images", "")
        top5 = f"{top5:.4f}" if top5 is not None else "  —   "
        print(f"{name:<{width}}  {top1:.4f}  {top5}  {images}", file=file)


def dataset_name(path):
    """'imagenet' for imagenet/val/, 'coco_5k' for coco_5k.csv, 'cc3m_val' for
    cc3m_val/{00000..00015}.tar: the keys of the metrics."""
    path = os.path.abspath(path)
    if path.endswith(".tar") or "{" in path:  # tar shards: the folder holding them
        path = os.path.dirname(path)
    name = os.path.splitext(os.path.basename(path))[0]
    if name in ("train", "val", "test", "images"):
        return os.path.basename(os.path.dirname(path))
    return name


def build_parser():
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
    parser = OneLineErrorParser(description="Evaluate a checkpoint of train.py.")
    tasks = parser.add_subparsers(dest="task", required=True)
    add_image_tasks(tasks, common)
    add_text_tasks(tasks, common)
    synthetic = tasks.add_parser("synthetic", parents=[common],
                                 help="every task on the built-in val data, as train.py runs "
                                      "them at its end")
    synthetic.add_argument("--val-samples", type=positive_int, default=1000,
                           help="synthetic images per task")
    return parser


def add_image_tasks(tasks, common):
    """zeroshot, retrieval, linear-probe and knn."""
    zeroshot = tasks.add_parser("zeroshot", parents=[common],
                                help="zero-shot classification of image folders (ImageNet and "
                                     "its out-of-domain variants)")
    zeroshot.add_argument("--data", required=True, nargs="+",
                          help="ImageNet-style folders DATA/<class>/<image>; with several, the "
                               "first is in-domain and the mean of the others is reported as "
                               "zeroshot/ood_mean (e.g. imagenet/val imagenetv2 imagenet-sketch "
                               "imagenet-a imagenet-r)")
    zeroshot.add_argument("--classnames",
                          help="'imagenet': ImageNet's 1000 names, for folders named by WordNet "
                               "id (val, -Sketch, the 200 of -A and -R) or by class index "
                               "(-V2); or a file, one name per line, for folders named by index "
                               "or in sorted folder order (default: the folder names)")
    zeroshot.add_argument("--templates",
                          help="prompt templates, one per line, {} for the class name; "
                               "'openai' for CLIP's 80 (default: 8 of those)")
    zeroshot.add_argument("--name", nargs="+", default=None,
                          help="each set's name in the metric keys (default: from the path)")
    retrieval = tasks.add_parser("retrieval", parents=[common],
                                 help="image<->text retrieval on captioned images")
    retrieval.add_argument("--data", required=True,
                           help="CSV, TSV or JSONL of image paths (relative to the file) and "
                                "captions, several rows per image allowed; or webdataset tar "
                                "shards, e.g. 'cc3m_val/{00000..00015}.tar'")
    retrieval.add_argument("--csv-img-key", default="filepath", help="column of the image paths")
    retrieval.add_argument("--csv-caption-key", default="title", help="column of the captions")
    add_separator(retrieval)
    probes = argparse.ArgumentParser(add_help=False)
    probes.add_argument("--train-data", required=True,
                        help="ImageNet-style folder of training images")
    probes.add_argument("--test-data", required=True,
                        help="folder of test images, the same class folders")
    probes.add_argument("--feature-cache", default=None,
                        help="folder for .npy image features, reused while checkpoint and "
                             "folder path are the same")
    probe = tasks.add_parser("linear-probe", parents=[common, probes],
                             help="logistic regression on frozen image features f_v")
    add_l2_grid(probe)
    knn = tasks.add_parser("knn", parents=[common, probes],
                           help="DINO's weighted kNN classifier on frozen image features f_v")
    knn.add_argument("--k", type=positive_int, default=20, help="neighbours that vote (DINO: 20)")
    knn.add_argument("--temperature", type=positive_float, default=0.07,
                     help="a neighbour's vote is exp(cosine / temperature) (DINO: 0.07)")
    for task in (retrieval, probe, knn):
        add_name(task)


def add_text_tasks(tasks, common):
    """text-probe and sts: the text tower on its own."""
    probe = tasks.add_parser("text-probe", parents=[common],
                             help="logistic regression on frozen text-tower features f_t of "
                                  "labelled sentences (SST-2 and GLUE's other single-sentence "
                                  "tasks)")
    probe.add_argument("--train-data", required=True,
                       help="CSV, TSV or JSONL of sentences and labels (GLUE's SST-2 train.tsv)")
    probe.add_argument("--test-data", required=True, help="the same, to score (SST-2's dev.tsv)")
    probe.add_argument("--text-key", default="sentence", help="column of the sentences")
    probe.add_argument("--label-key", default="label", help="column of the labels (any text)")
    add_l2_grid(probe)
    sts = tasks.add_parser("sts", parents=[common],
                           help="semantic textual similarity: Spearman's correlation of the "
                                "cosine of two sentences' features with gold scores (STS-B)")
    sts.add_argument("--data", required=True,
                     help="CSV, TSV or JSONL with sentence1, sentence2, score (STS-B's layout)")
    sts.add_argument("--keys", nargs=3, default=("sentence1", "sentence2", "score"),
                     metavar=("FIRST", "SECOND", "SCORE"), help="the three columns")
    for task in (probe, sts):
        add_separator(task)
        add_name(task)


def add_separator(task):
    task.add_argument("--csv-separator", type=one_character, default=None,
                      help="CSV separator (default: tab for .tsv, else comma)")


def add_l2_grid(task):
    task.add_argument("--l2-grid", type=positive_float, nargs="+", default=L2_GRID,
                      help="L2 strengths to sweep on 20%% of the training set "
                           "(C = 1 / (l2 N) in scikit-learn)")


def add_name(task):
    task.add_argument("--name", default=None,
                      help="dataset name in the metric keys (default: from the path)")


def run_task(args, model, checkpoint):
    """The metrics of the task the command line names, and its default output file."""
    tokenizer = tokenizer_for(model.config)
    loading = dict(batch_size=args.batch_size, workers=args.workers)
    if args.task == "synthetic":
        trained = checkpoint["args"]
        metrics = synthetic_evaluation(model, tokenizer, args.device, num_samples=args.val_samples,
                                       seed=trained["seed"],
                                       num_heldout_pairs=trained.get("synthetic_heldout_pairs",
                                                                     4),
                                       batch_size=args.batch_size)
        return metrics, "eval_synthetic.json"
    if args.task == "zeroshot":
        return zero_shot_command(args, model, tokenizer, loading)
    name = args.name or dataset_name(args.test_data if "test_data" in args else args.data)
    if args.task == "retrieval":
        results = caption_retrieval(model, tokenizer, args.data, args.device,
                                    image_key=args.csv_img_key, caption_key=args.csv_caption_key,
                                    separator=args.csv_separator, **loading)
    elif args.task == "knn":
        results = folder_probe(model, args.train_data, args.test_data, args.device, probe="knn",
                               k=args.k, temperature=args.temperature,
                               feature_cache=args.feature_cache, checkpoint_path=args.checkpoint,
                               **loading)
    elif args.task == "linear-probe":
        results = folder_probe(model, args.train_data, args.test_data, args.device,
                               l2_grid=args.l2_grid, feature_cache=args.feature_cache,
                               checkpoint_path=args.checkpoint, **loading)
    elif args.task == "text-probe":
        results = text_probe(model, tokenizer, args.train_data, args.test_data, args.device,
                             text_key=args.text_key, label_key=args.label_key,
                             separator=args.csv_separator, l2_grid=args.l2_grid,
                             batch_size=args.batch_size)
    else:
        results = sentence_similarity(model, tokenizer, args.data, args.device, keys=args.keys,
                                      separator=args.csv_separator, batch_size=args.batch_size)
    prefix = f"{args.task.replace('-', '_')}/{name}"
    metrics = {f"{prefix}/{key}": value for key, value in results.items()}
    return metrics, f"eval_{args.task}_{name}.json"


def zero_shot_command(args, model, tokenizer, loading):
    """eval.py zeroshot: one folder, or a suite of them with their out-of-domain mean."""
    if args.name and len(args.name) != len(args.data):
        raise DataError(f"--name: {len(args.name)} name(s) for {len(args.data)} --data folder(s)")
    metrics = zero_shot_suite(model, tokenizer, args.data, args.device, names=args.name,
                              classnames_file=args.classnames, templates_file=args.templates,
                              **loading)
    if len(args.data) == 1:
        return metrics, f"eval_zeroshot_{(args.name or [dataset_name(args.data[0])])[0]}.json"
    return metrics, "eval_zeroshot_suite.json"


def main(argv=None):
    args = build_parser().parse_args(argv)
    with reported_in_one_line("eval.py"):
        check_output(args.output or os.path.dirname(os.path.abspath(args.checkpoint)),
                     is_folder=args.output is None)
        model, checkpoint = load_model(args.checkpoint, args.device)
        metrics, default_name = run_task(args, model, checkpoint)
        output = args.output or os.path.join(os.path.dirname(args.checkpoint), default_name)
        (print_zero_shot_suite if "zeroshot/ood_mean/top1" in metrics else print_table)(metrics)
        with writing(output), open(output, "w") as f:
            json.dump(metrics, f, indent=1)
        print(f"wrote {output}")


def check_output(path, is_folder=False):
    """Before any work: the --output file (or, without one, the checkpoint's folder) can
    be written, so that a long evaluation is not lost at its end."""
    folder = path if is_folder else os.path.dirname(os.path.abspath(path))
    if not is_folder and os.path.isdir(path):
        raise DataError(f"--output {path} is a folder; name the JSON file to write")
    if not os.path.isdir(folder):
        raise DataError(f"--output {path}: no folder {folder}")
    if not os.access(folder, os.W_OK):
        raise DataError(f"{folder} is not writable; pass --output FILE elsewhere")


if __name__ == "__main__":
    main()
