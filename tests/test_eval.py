"""eval.py: readers for image folders and caption files, the three tasks against
independent brute-force versions, and the command line on a checkpoint of a short run."""
import json
import math
import os
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from conftest import SMALL_MODEL, run_script
from data import (DataError, EvalTransform, IndexedImages, Tokenizer, group_captions_by_image,
                  open_image, read_caption_table, read_image_folder, read_lines)
from eval import (NAMED_CLASSNAMES, NAMED_TEMPLATES, encode_images, encode_texts,
                  fit_logistic_regression, folder_class_names, knn_probe, linear_probe,
                  retrieval_recall, spearman, text_to_text_recall, zero_shot_accuracy,
                  zero_shot_classifier)
from synthetic import SHAPES


def write_image(path, color, size=(12, 10)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path)


def write_folder(root, corrupt=True):
    """Two classes, five readable images, and (with `corrupt`) one broken .jpg."""
    for i in range(2):
        write_image(f"{root}/b_dog/{i}.png", (0, 0, 200 + i))
    for i in range(3):
        write_image(f"{root}/a_cat/{i}.jpg", (200 + i, 0, 0))
    (root / "a_cat" / "notes.txt").write_text("not an image: ignored")
    if corrupt:
        (root / "b_dog" / "broken.jpg").write_bytes(b"not a jpeg")
    return root


def write_captions(root):
    """Three images, one of them with two captions, as CSV and as JSONL."""
    for i in range(3):
        write_image(f"{root}/img/{i}.png", (60 * i, 0, 0))
    rows = [("img/0.png", "a black square"), ("img/1.png", "a dark red square"),
            ("img/0.png", "an unlit square"), ("img/2.png", "a red square")]
    (root / "captions.csv").write_text("filepath,title\n" + "".join(f"{p},{c}\n" for p, c in rows))
    (root / "captions.jsonl").write_text("".join(json.dumps({"image": p, "text": c}) + "\n"
                                                 for p, c in rows))
    return rows


class FakeImageModel(nn.Module):
    """Mean color as the image embedding: enough to see which images were read."""

    def encode_image(self, images, normalize=False):
        return images.mean(dim=(2, 3))


def test_image_folder_reads_classes_in_sorted_order_and_only_image_files(tmp_path):
    write_folder(tmp_path)
    classes, samples = read_image_folder(str(tmp_path))
    assert classes == ["a_cat", "b_dog"]
    assert samples == [(str(tmp_path / f"a_cat/{i}.jpg"), 0) for i in range(3)] + [
        (str(tmp_path / "b_dog/0.png"), 1), (str(tmp_path / "b_dog/1.png"), 1),
        (str(tmp_path / "b_dog/broken.jpg"), 1)]


def test_unreadable_image_is_skipped_not_replaced(tmp_path):
    write_folder(tmp_path)
    paths = [path for path, _ in read_image_folder(str(tmp_path))[1]]
    features, indices = encode_images(FakeImageModel(),
                                       IndexedImages(paths, open_image, EvalTransform(8)),
                                       "cpu", batch_size=4)
    assert indices.tolist() == [0, 1, 2, 3, 4]  # broken.jpg, the last, is gone
    assert features.shape == (5, 3)
    assert features[3, 2] > features[3, 0]  # a blue dog image, in its place


def test_image_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_image_folder(str(tmp_path / "absent"))
    write_folder(tmp_path)
    os.makedirs(tmp_path / "c_empty")
    with pytest.raises(DataError, match="1 class folder.* without images: c_empty"):
        read_image_folder(str(tmp_path))


def test_caption_files_group_several_captions_per_image(tmp_path):
    rows = write_captions(tmp_path)
    expected = ([str(tmp_path / f"img/{i}.png") for i in range(3)], [c for _, c in rows],
                [0, 1, 0, 2])
    assert group_captions_by_image(read_caption_table(str(tmp_path / "captions.csv"))) == expected
    jsonl_rows = read_caption_table(str(tmp_path / "captions.jsonl"), "image", "text")
    assert group_captions_by_image(jsonl_rows) == expected


def test_caption_file_naming_missing_images_is_an_error(tmp_path):
    write_captions(tmp_path)
    (tmp_path / "more.csv").write_text("filepath,title\nimg/0.png,ok\ngone/1.png,x\ngone/2.png,y\n")
    with pytest.raises(DataError,
                       match="2 captioned image.* not found: .*gone/1.png, .*gone/2.png"):
        group_captions_by_image(read_caption_table(str(tmp_path / "more.csv")))


def brute_force_recall(similarity, caption_image, k):
    """Full sort of every row and column: the rank of the best own caption, of the own image."""
    caption_image = torch.as_tensor(caption_image)
    image_ranks = [(similarity[i] > similarity[i, caption_image == i].max()).sum().item()
                   for i in range(similarity.shape[0])]
    text_ranks = [(similarity[:, j] > similarity[caption_image[j], j]).sum().item()
                  for j in range(similarity.shape[1])]
    return (sum(r < k for r in image_ranks) / len(image_ranks),
            sum(r < k for r in text_ranks) / len(text_ranks))


def test_retrieval_counts_an_image_correct_when_any_of_its_captions_ranks_first():
    images = torch.eye(3)
    # Image 0's captions are 0 and 1: caption 1 (its second) is its best match; caption 0
    # is closer to image 1 than to image 0. Image 1's only caption 2 points at image 2.
    captions = torch.tensor([[0.5, 0.8, 0.0], [0.9, 0.45, 0.0], [0.0, 0.3, 0.7], [0.1, 0.0, 0.9]])
    recall = retrieval_recall(images, F.normalize(captions, dim=-1), [0, 0, 1, 2], recall_at=(1, 2))
    assert recall["image_to_text/R@1"] == pytest.approx(2 / 3)  # images 0 and 2
    assert recall["image_to_text/R@2"] == pytest.approx(2 / 3)  # image 1's caption ranks 3rd
    assert recall["text_to_image/R@1"] == pytest.approx(2 / 4)  # captions 1 and 3
    assert recall["text_to_image/R@2"] == pytest.approx(4 / 4)


def test_blocked_retrieval_equals_brute_force_with_several_captions_per_image():
    generator = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(40, 8, generator=generator), dim=-1)
    caption_image = torch.cat([torch.arange(40), torch.randint(0, 40, (60,), generator=generator)])
    noise = 0.9 * torch.randn(100, 8, generator=generator)
    captions = F.normalize(images[caption_image] + noise, dim=-1)
    recall = retrieval_recall(images, captions, caption_image, recall_at=(1, 5, 10), block_size=7)
    for k in (1, 5, 10):
        image_to_text, text_to_image = brute_force_recall(images @ captions.t(), caption_image, k)
        assert recall[f"image_to_text/R@{k}"] == pytest.approx(image_to_text, abs=1e-7)
        assert recall[f"text_to_image/R@{k}"] == pytest.approx(text_to_image, abs=1e-7)
    assert 0 < recall["image_to_text/R@1"] < recall["image_to_text/R@10"] < 1


class FakeTextModel(nn.Module):
    """Looks each prompt up in a table, so the test knows every text embedding."""

    def __init__(self, tokenizer, table):
        super().__init__()
        self.tokenizer, self.table = tokenizer, table

    def encode_text(self, tokens, normalize=False):
        return torch.stack([self.table[self.tokenizer.decode(row)] for row in tokens])


def test_zero_shot_classifier_is_normalized_mean_of_normalized_template_embeddings():
    tokenizer, generator = Tokenizer(16), torch.Generator().manual_seed(0)
    classes, templates = ["cat", "dog", "fish"], ["a {}.", "a photo of a {}.", "{} art"]
    # Not unit rows, so a classifier that skips the first normalization differs.
    table = {t.replace("{}", c): torch.randn(4, generator=generator) * (1 + i) for c in classes
             for i, t in enumerate(templates)}
    classifier = zero_shot_classifier(FakeTextModel(tokenizer, table), tokenizer, classes,
                                      templates, "cpu")
    for column, name in enumerate(classes):
        prompts = torch.stack([F.normalize(table[t.replace("{}", name)], dim=0) for t in templates])
        assert torch.allclose(classifier[:, column], F.normalize(prompts.mean(dim=0), dim=0),
                              atol=1e-6)


def test_zero_shot_accuracy_counts_top_k_and_each_class():
    classifier = torch.eye(3)  # class c scores image feature c
    images = torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.2, 0.7], [0.2, 0.7, 0.1], [0.5, 0.1, 0.4]])
    labels = torch.tensor([0, 1, 1, 2])  # right, 2nd-ranked, right, 2nd-ranked
    metrics = zero_shot_accuracy(images, labels, classifier, topk=(1, 2),
                                 class_keys=["a", "b", "c"])
    assert metrics == {"top1": 0.5, "top2": 1.0,
                       "class_top1/a": 1.0, "class_top1/b": 0.5, "class_top1/c": 0.0}


def separable_features(n, generator):
    labels = torch.randint(0, 3, (n,), generator=generator)
    return torch.randn(n, 16, generator=generator) + 4 * torch.eye(3, 16)[labels], labels


def test_linear_probe_separates_separable_features():
    generator = torch.Generator().manual_seed(0)
    probe = linear_probe(*separable_features(150, generator), *separable_features(150, generator),
                         l2_grid=(1e-4, 1e-2, 1))
    assert probe["top1"] >= 0.98
    assert set(probe) == {"top1", "l2", "sweep/l2=0.0001/heldout_top1",
                          "sweep/l2=0.01/heldout_top1", "sweep/l2=1/heldout_top1"}


def test_linear_probe_stays_near_chance_on_shuffled_labels():
    generator = torch.Generator().manual_seed(0)
    train, test = separable_features(150, generator), separable_features(150, generator)
    shuffle = lambda labels: labels[torch.randperm(len(labels), generator=generator)]
    probe = linear_probe(train[0], shuffle(train[1]), test[0], shuffle(test[1]),
                         l2_grid=(1e-4, 1e-2, 1))
    assert probe["top1"] < 0.5  # chance: 1/3


def test_a_probe_of_features_that_are_not_finite_is_nan():
    generator = torch.Generator().manual_seed(0)
    (train, train_labels), test = (separable_features(150, generator) for _ in range(2))
    train[7, 1] = float("nan")  # a diverged model's features
    assert math.isnan(linear_probe(train, train_labels, *test)["top1"])


def overlapping_blobs(n, generator, classes=5, dim=20):
    centers = torch.randn(classes, dim, generator=torch.Generator().manual_seed(1)).double()
    labels = torch.randint(0, classes, (n,), generator=generator)
    noise = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    return centers[labels] + 1.5 * noise, labels


def test_logistic_regression_is_fit_to_convergence():
    """At the optimum of mean CE + l2/2 ||W||^2, the gradient vanishes."""
    features, labels = overlapping_blobs(400, torch.Generator().manual_seed(0))
    weight, bias = fit_logistic_regression(features, labels, 5, l2=1e-2)
    weight.requires_grad_(), bias.requires_grad_()
    objective = F.cross_entropy(features @ weight + bias, labels) + 1e-2 / 2 * weight.pow(2).sum()
    gradients = torch.autograd.grad(objective, (weight, bias))
    assert max(g.abs().max().item() for g in gradients) < 1e-5


@pytest.mark.parametrize("l2", [1e-4, 1e-2, 1.0])
def test_logistic_regression_matches_scikit_learn(l2):
    """Against scikit-learn where it is installed (it is not a dependency):
    pytest tests/test_eval.py -k scikit in a virtualenv that has it."""
    sklearn = pytest.importorskip("sklearn.linear_model")
    generator = torch.Generator().manual_seed(0)
    train_x, train_y = overlapping_blobs(600, generator)
    test_x, test_y = overlapping_blobs(600, generator)
    weight, bias = fit_logistic_regression(train_x, train_y, 5, l2)
    reference = sklearn.LogisticRegression(C=1 / (l2 * len(train_y)), tol=1e-10, max_iter=10_000)
    reference.fit(train_x.numpy(), train_y.numpy())
    assert torch.allclose(weight.t(), torch.from_numpy(reference.coef_), atol=1e-3)
    ours, theirs = (test_x @ weight + bias).argmax(1).numpy(), reference.predict(test_x.numpy())
    assert (ours == test_y.numpy()).mean() == pytest.approx((theirs == test_y.numpy()).mean(),
                                                            abs=0.01)


def dino_knn(train_x, train_y, test_x, k, temperature, classes):
    """DINO's eval_knn.knn_classifier, one test image at a time: the predicted class."""
    train_x, test_x = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    predictions = []
    for query in test_x:
        similarity, nearest = (train_x @ query).topk(k)
        weights = (similarity / temperature).exp()
        votes = torch.zeros(classes).index_add_(0, train_y[nearest], weights)
        predictions.append(int(votes.argmax()))
    return torch.tensor(predictions)


def test_knn_probe_is_dino_weighted_vote():
    generator = torch.Generator().manual_seed(0)
    (train_x, train_y), (test_x, test_y) = (overlapping_blobs(300, generator) for _ in range(2))
    train_x, test_x = train_x.float(), test_x.float()
    expected = (dino_knn(train_x, train_y, test_x, 20, 0.07, 5) == test_y).double().mean().item()
    result = knn_probe(train_x, train_y, test_x, test_y, block_size=64)
    assert result["top1"] == pytest.approx(expected, abs=1e-12)
    assert 0.5 < result["top1"] <= result["top5"] == 1.0  # 5 classes: top-5 is every class


def test_knn_votes_are_stable_at_a_small_temperature():
    """At T = 0.01 the votes exp(cos / T) are beyond float32: each query's class is the one
    whose neighbours' log-sum-exp of cos / T is largest, computed here in float64."""
    generator = torch.Generator().manual_seed(3)
    train_x, train_y = overlapping_blobs(300, generator)
    test_x, test_y = overlapping_blobs(100, generator)
    result = knn_probe(train_x, train_y, test_x, test_y, k=20, temperature=0.01)
    train_n, test_n = F.normalize(train_x.double(), dim=-1), F.normalize(test_x.double(), dim=-1)
    nearest_similarity, nearest = (test_n @ train_n.t()).topk(20, dim=1)
    scores = torch.full((100, 5), -math.inf, dtype=torch.float64)
    for c in range(5):
        mine = torch.where(train_y[nearest] == c, nearest_similarity / 0.01, -math.inf)
        scores[:, c] = torch.logsumexp(mine, dim=1)
    assert result["top1"] == pytest.approx((scores.argmax(1) == test_y).double().mean().item())


@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_knn_probe_matches_scikit_learn(temperature):
    """scikit-learn's KNeighborsClassifier with cosine distance d = 1 - cos and weights
    exp((1 - d) / T): the same vote, where scikit-learn is installed."""
    neighbors = pytest.importorskip("sklearn.neighbors")
    generator = torch.Generator().manual_seed(1)
    (train_x, train_y), (test_x, test_y) = (overlapping_blobs(400, generator) for _ in range(2))
    reference = neighbors.KNeighborsClassifier(
        n_neighbors=20, metric="cosine", algorithm="brute",
        weights=lambda distance: np.exp((1 - distance) / temperature))
    reference.fit(train_x.numpy(), train_y.numpy())
    theirs = (reference.predict(test_x.numpy()) == test_y.numpy()).mean()
    ours = knn_probe(train_x.float(), train_y, test_x.float(), test_y, temperature=temperature)
    assert ours["top1"] == pytest.approx(theirs, abs=1e-12)


def test_named_class_names_and_templates_are_clips():
    classnames = read_lines(NAMED_CLASSNAMES["imagenet"], 1000)
    assert classnames[:3] == ["tench", "goldfish", "great white shark"]
    assert classnames[-1] == "toilet paper"
    templates = read_lines(NAMED_TEMPLATES["openai"], 80)
    assert all(template.count("{}") == 1 for template in templates)
    assert templates[0] == "a bad photo of a {}." and "itap of a {}." in templates


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("run")
    result = run_script("train.py", *SMALL_MODEL, "--steps", "3", "--batch-size", "8",
                        "--val-samples", "16", "--out-dir", str(out_dir), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((out_dir / "final_metrics.json").read_text())
    assert {"zeroshot/shape/top1", "retrieval/synthetic/text_to_image/R@10",
            "linear_probe/synthetic_shape/top1"} <= set(metrics)  # train.py reports all three tasks
    per_shape = [metrics[f"zeroshot/shape/class_top1/{shape}"] for shape in SHAPES]
    assert min(per_shape) <= metrics["zeroshot/shape/top1"] <= max(per_shape)
    return str(out_dir / "ckpt.pt")


def run_eval(*flags):
    return run_script("eval.py", *flags, "--workers", "0", timeout=300)


def test_cli_zeroshot_on_a_folder_with_a_corrupt_image(checkpoint, tmp_path):
    write_folder(tmp_path / "pets" / "val")
    output = tmp_path / "zeroshot.json"
    result = run_eval("zeroshot", "--checkpoint", checkpoint,
                      "--data", str(tmp_path / "pets" / "val"), "--output", str(output))
    assert result.returncode == 0, result.stderr
    assert "skipped 1 unreadable image(s)" in result.stderr and "broken.jpg" in result.stderr
    metrics = json.loads(output.read_text())
    assert set(metrics) == {f"zeroshot/pets/{k}" for k in  # no top-5 of 2 classes
                            ("top1", "class_top1/a_cat", "class_top1/b_dog", "images",
                             "skipped_images", "class_name/a_cat", "class_name/b_dog")}
    assert metrics["zeroshot/pets/images"] == 5 and metrics["zeroshot/pets/skipped_images"] == 1


def test_cli_empty_class_folder_is_one_line_and_exit_code_2(checkpoint, tmp_path):
    write_folder(tmp_path)
    os.makedirs(tmp_path / "c_empty")
    result = run_eval("zeroshot", "--checkpoint", checkpoint, "--data", str(tmp_path))
    assert result.returncode == 2
    assert "c_empty" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("folders", [("n01440764", "n01443537"), ("n01440764", "goldfish")])
def test_cli_refuses_wordnet_id_folders_without_class_names(checkpoint, tmp_path, folders):
    for folder in folders:  # all WordNet ids, or one of them among words
        write_image(f"{tmp_path}/val/{folder}/0.png", (10, 20, 30))
    result = run_eval("zeroshot", "--checkpoint", checkpoint, "--data", str(tmp_path / "val"))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "WordNet ids" in result.stderr and "--classnames imagenet" in result.stderr


def test_imagenet_names_folders_by_wordnet_id_whatever_subset_they_are():
    folders = ["n01440764", "n01443537", "n04254680", "n15075141"]  # sorted, as read
    assert folder_class_names("a", folders, "imagenet") == ["tench", "goldfish", "soccer ball",
                                                            "toilet paper"]


def test_imagenet_names_integer_folders_by_value_not_by_sorted_place():
    folders = sorted(str(i) for i in range(12))  # ImageNet-V2: 0, 1, 10, 11, 2, ...
    names = folder_class_names("v2", folders, "imagenet")
    imagenet = read_lines(NAMED_CLASSNAMES["imagenet"], 1000)
    assert folders[2] == "10" and names[2] == imagenet[10] == "brambling"
    assert names == [imagenet[int(folder)] for folder in folders]


def test_a_file_of_class_names_names_integer_folders_by_value(tmp_path):
    (tmp_path / "names.txt").write_text("zero\none\ntwo\n" + "".join(f"c{i}\n" for i in
                                                                      range(3, 11)))
    folders = sorted(["0", "1", "2", "10"])
    assert folder_class_names("d", folders, str(tmp_path / "names.txt")) == [
        "zero", "one", "c10", "two"]


@pytest.mark.parametrize("folders,message", [
    (["cats", "dogs"], "2 class folder(s) are neither: cats, dogs"),
    (["n01440764", "dogs"], "1 class folder(s) are neither: dogs"),
    (["3", "1000"], "1000 name a class index beyond the 1000 class names")])
def test_imagenet_refuses_folders_that_are_neither_ids_nor_indices(folders, message):
    with pytest.raises(DataError, match=re.escape(message)):
        folder_class_names("x", folders, "imagenet")


def test_cli_zeroshot_suite_names_each_class_and_averages_the_out_of_domain_sets(
        checkpoint, tmp_path):
    """ImageNet's val laid out by WordNet id, a -V2 by class index, an -A-like subset of
    ids: one table, each class named in the JSON, and the mean of the last two."""
    layouts = {"imagenet": ["n01440764", "n01443537", "n15075141"],
               "imagenetv2": ["0", "1", "10", "999"], "imagenet-a": ["n01443537", "n15075141"]}
    for name, folders in layouts.items():
        for i, folder in enumerate(folders):
            write_image(f"{tmp_path}/{name}/{folder}/0.png", (60 * i, 30, 90))
    output = tmp_path / "suite.json"
    result = run_eval("zeroshot", "--checkpoint", checkpoint, "--classnames", "imagenet",
                      "--data", *(str(tmp_path / name) for name in layouts),
                      "--output", str(output))
    assert result.returncode == 0, result.stderr
    assert "imagenetv2" in result.stdout and "ood_mean" in result.stdout
    metrics = json.loads(output.read_text())
    assert metrics["zeroshot/imagenet/class_name/n15075141"] == "toilet paper"
    assert metrics["zeroshot/imagenetv2/class_name/10"] == "brambling"
    assert metrics["zeroshot/imagenetv2/class_name/999"] == "toilet paper"
    assert metrics["zeroshot/imagenet-a/class_name/n01443537"] == "goldfish"
    ood = (metrics["zeroshot/imagenetv2/top1"] + metrics["zeroshot/imagenet-a/top1"]) / 2
    assert metrics["zeroshot/ood_mean/top1"] == pytest.approx(ood)


def test_cli_knn_probe(checkpoint, tmp_path):
    for split in ("train", "test"):
        write_folder(tmp_path / "pets" / split, corrupt=False)
    result = run_eval("knn", "--checkpoint", checkpoint, "--k", "3",
                      "--train-data", str(tmp_path / "pets" / "train"),
                      "--test-data", str(tmp_path / "pets" / "test"),
                      "--output", str(tmp_path / "k.json"))
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "k.json").read_text())
    assert metrics["knn/pets/test_images"] == 5 and 0 <= metrics["knn/pets/top1"] <= 1


def test_cli_retrieval_on_a_caption_file(checkpoint, tmp_path):
    write_captions(tmp_path)
    result = run_eval("retrieval", "--checkpoint", checkpoint,
                      "--data", str(tmp_path / "captions.jsonl"),
                      "--csv-img-key", "image", "--csv-caption-key", "text",
                      "--output", str(tmp_path / "r.json"))
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "r.json").read_text())
    directions = ("image_to_text", "text_to_image")
    assert {f"retrieval/captions/{d}/R@{k}" for d in directions for k in (1, 5, 10)} <= set(metrics)
    assert metrics["retrieval/captions/captions"] == 4 and metrics["retrieval/captions/images"] == 3


def test_cli_linear_probe_with_a_feature_cache(checkpoint, tmp_path):
    for split in ("train", "test"):
        write_folder(tmp_path / "pets" / split, corrupt=split == "test")
    flags = ["linear-probe", "--checkpoint", checkpoint,
             "--train-data", str(tmp_path / "pets" / "train"),
             "--test-data", str(tmp_path / "pets" / "test"),
             "--feature-cache", str(tmp_path / "cache"),
             "--l2-grid", "0.1", "10", "--output", str(tmp_path / "p.json")]
    for _ in range(2):  # the second run reads the cache
        result = run_eval(*flags)
        assert result.returncode == 0, result.stderr
        metrics = json.loads((tmp_path / "p.json").read_text())
        assert (metrics["linear_probe/pets/skipped_images"] == 1
                and metrics["linear_probe/pets/l2"] in (0.1, 10))
    assert len(os.listdir(tmp_path / "cache")) == 4  # features and indices of each split


def test_eval_synthetic_scores_a_checkpoint_on_the_built_in_data(checkpoint, tmp_path):
    result = run_script("eval.py", "synthetic", "--checkpoint", checkpoint, "--val-samples", "16",
                        "--workers", "0", "--output", str(tmp_path / "s.json"), timeout=300)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "s.json").read_text())
    assert {"zeroshot/color/top1", "retrieval/synthetic/image_to_text/R@1",
            "linear_probe/synthetic_shape/top1", "knn/synthetic_color/top1",
            "text_probe/synthetic_shape/top1", "text_probe/synthetic_color/top1",
            "text_retrieval/synthetic/text_to_text/R@1"} <= set(metrics)


# ------------------------------------------------------------------------------- the text tower

def test_spearman_averages_tied_ranks():
    x = torch.tensor([1.0, 2.0, 2.0, 3.0, 5.0])
    y = torch.tensor([10.0, 30.0, 20.0, 40.0, 50.0])
    # ranks of x: 1, 2.5, 2.5, 4, 5; of y: 1, 3, 2, 4, 5; Pearson of the ranks by hand
    rx, ry = np.array([1, 2.5, 2.5, 4, 5]), np.array([1, 3, 2, 4, 5])
    assert spearman(x, y) == pytest.approx(np.corrcoef(rx, ry)[0, 1])


def test_spearman_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 6, (200,), generator=generator).double()  # many ties
    y = x + torch.randn(200, generator=generator, dtype=torch.float64) * 2
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x.numpy(), y.numpy()).statistic)


def test_text_to_text_recall_finds_the_other_captions_of_an_image():
    embeddings = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9],
                                           [0.5, 0.5]]), dim=-1)
    caption_image = [0, 0, 1, 1, 2]  # image 2's one caption has no other to find
    recall = text_to_text_recall(embeddings, caption_image, recall_at=(1, 4))
    assert recall["text_to_text/R@1"] == pytest.approx(4 / 5)
    assert recall["text_to_text/R@4"] == pytest.approx(4 / 5)


def write_sentences(path, rows, header=("sentence", "label"), separator="\t"):
    lines = [separator.join(header)] + [separator.join(map(str, row)) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def color_sentences(count, offset=0):
    colors = ["red", "green", "blue"]
    return [(f"a {colors[(i + offset) % 3]} shape number {i}", colors[(i + offset) % 3])
            for i in range(count)]


def test_cli_text_probe_matches_scikit_learn_on_the_same_features(checkpoint, tmp_path):
    linear_model = pytest.importorskip("sklearn.linear_model")
    train = write_sentences(tmp_path / "train.tsv", color_sentences(30) + [("   ", "red")])
    test = write_sentences(tmp_path / "dev.tsv", color_sentences(12, offset=1))
    result = run_eval("text-probe", "--checkpoint", checkpoint, "--train-data", train,
                      "--test-data", test, "--output", str(tmp_path / "t.json"))
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "t.json").read_text())
    assert metrics["text_probe/dev/skipped_sentences"] == 1  # the blank one
    assert metrics["text_probe/dev/train_sentences"] == 30
    from checkpoint import load_model
    model, _ = load_model(checkpoint, "cpu")
    tokenizer = Tokenizer(model.config.context_length)
    features = {name: encode_texts(model, tokenizer, [s for s, _ in rows], "cpu",
                                   projected=False).double()
                for name, rows in (("train", color_sentences(30)),
                                   ("test", color_sentences(12, offset=1)))}
    labels = {name: [label for _, label in rows] for name, rows in
              (("train", color_sentences(30)), ("test", color_sentences(12, offset=1)))}
    mean, std = features["train"].mean(0), features["train"].std(0).clamp_min(1e-8)
    l2 = metrics["text_probe/dev/l2"]
    classifier = linear_model.LogisticRegression(C=1 / (l2 * 30), tol=1e-10, max_iter=10000)
    classifier.fit(((features["train"] - mean) / std).numpy(), labels["train"])
    predicted = classifier.predict(((features["test"] - mean) / std).numpy())
    expected = float(np.mean(predicted == np.array(labels["test"])))
    assert abs(metrics["text_probe/dev/top1"] - expected) <= 1 / 12 + 1e-9


def test_cli_sts_is_the_spearman_of_cosines_with_gold_scores(checkpoint, tmp_path):
    pairs = [("a red circle", "a crimson disc", 4.8), ("a red circle", "a blue star", 0.5),
             ("two shapes", "a pair of shapes", 4.0), ("a green ring", "a hollow circle", 3.1),
             ("a big square", "a small box", 2.2), ("", "an empty sentence", 1.0),
             ("a cross", "a plus sign", "not a number")]
    data = write_sentences(tmp_path / "sts.csv", pairs, ("sentence1", "sentence2", "score"), ",")
    result = run_eval("sts", "--checkpoint", checkpoint, "--data", data,
                      "--output", str(tmp_path / "s.json"))
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "s.json").read_text())
    assert metrics["sts/sts/pairs"] == 5 and metrics["sts/sts/skipped_pairs"] == 2
    from checkpoint import load_model
    model, _ = load_model(checkpoint, "cpu")
    tokenizer = Tokenizer(model.config.context_length)
    for name, projected in (("tower", False), ("embedding", True)):
        first, second = (encode_texts(model, tokenizer, [p[i] for p in pairs[:5]], "cpu",
                                      projected=projected) for i in (0, 1))
        cosines = F.cosine_similarity(first, second).numpy()
        gold = np.array([p[2] for p in pairs[:5]])
        # Spearman as Pearson of ranks, the ranks by argsort twice (no ties here)
        ranks = [np.argsort(np.argsort(v)) for v in (cosines, gold)]
        assert metrics[f"sts/sts/{name}/spearman"] == pytest.approx(
            np.corrcoef(*ranks)[0, 1], abs=1e-6)
