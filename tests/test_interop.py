"""tools/interop.py: open_clip models imported into these towers and ours exported to open_clip
give the same embeddings; what does not map is refused in one line; CLIP's tokenizer gives
open_clip's ids; clip_benchmark scores our model as eval.py does.

open_clip and clip_benchmark import torchvision when they are imported, though their ViT
CLIP models and metric functions never use it. Where `import torchvision` fails (it is
not in requirements.txt), tests/stand_ins/torchvision is put on sys.path in its place: its
classes raise if built. Tests that need open_clip or clip_benchmark skip without them."""
import json
import os
import sys
import types
import warnings
from dataclasses import replace

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, TensorDataset

try:
    import torchvision  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "stand_ins"))

from conftest import small_config
from checkpoint import load_model, make_checkpoint
from data import CLIPTokenizer, DataError, Tokenizer, normalize, tokenizer_for
from eval import (SHAPE_TEMPLATES, encode_scenes, retrieval_recall, encode_texts,
                  zero_shot_accuracy, zero_shot_classifier)
from tools.interop import (WEIGHTS_FILE, clip_benchmark_metrics, from_open_clip_state_dict,
                           main, read_state_dict, to_open_clip_state_dict)
from model import TwoTowerModel, model_config
from synthetic import CAPTION, EXTRA_CAPTION, SHAPES, describe, object_labels, scored_scenes

CAPTIONS = ["a photo of a red circle", "two shapes: a blue star and a green ring",
            "a cat", "Résumé of a very long caption that goes on and on past the context length"]
CL100K_END_OF_TEXT = 100257


@pytest.fixture(scope="module")
def open_clip():
    return pytest.importorskip("open_clip")


def perturbed(model, std=0.05):
    """`model` with noise on every parameter: biases and LayerNorms away from their
    initial zeros and ones, so that a tensor mapped to the wrong place shows."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * std)
    return model.eval()


def random_open_clip(open_clip, quick_gelu, vision_head_width=32, text_heads=4,
                     vocab_size=100277):
    """A small randomly initialised open_clip CLIP, on cl100k's vocabulary by default."""
    vision_cfg = dict(image_size=32, patch_size=8, width=64, layers=2,
                      head_width=vision_head_width)
    text_cfg = dict(context_length=24, vocab_size=vocab_size, width=128, heads=text_heads,
                    layers=2)
    return perturbed(open_clip.model.CLIP(64, vision_cfg, text_cfg, quick_gelu=quick_gelu))


def inputs():
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return images, Tokenizer(24)(CAPTIONS)


def assert_same_embeddings(ours, theirs, images, tokens):
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images), theirs.encode_image(images),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.encode_text(tokens), theirs.encode_text(tokens),
                                   atol=1e-5, rtol=0)


def exported_open_clip(open_clip, model):
    state_dict, config = to_open_clip_state_dict(model)
    fresh = open_clip.model.CLIP(**config)
    fresh.load_state_dict(state_dict, strict=True)
    return fresh.eval()


# --------------------------------------------------------------------------- the layouts

def test_cl100k_end_of_text_is_the_largest_id_of_a_caption_so_argmax_pools_there():
    """open_clip's default text pooling takes the largest token id; ours takes the first
    end-of-text token. For cl100k captions they are the same position."""
    _, tokens = inputs()
    encoding = Tokenizer(24).encoding
    assert encoding.eot_token == CL100K_END_OF_TEXT
    assert max(encoding._mergeable_ranks.values()) < CL100K_END_OF_TEXT  # every ordinary token
    assert (tokens.argmax(dim=1) == (tokens == CL100K_END_OF_TEXT).int().argmax(dim=1)).all()


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_imported_open_clip_model_gives_open_clips_embeddings(open_clip, quick_gelu):
    theirs = random_open_clip(open_clip, quick_gelu)
    ours = from_open_clip_state_dict(theirs.state_dict(), quick_gelu=quick_gelu,
                                     vision_heads=2, text_heads=4)
    assert (ours.config.vision_heads, ours.config.text_heads) == (2, 4)
    assert ours.config.quick_gelu == quick_gelu and ours.config.tokenizer == "cl100k"
    assert_same_embeddings(ours, theirs, *inputs())
    assert ours.logit_scale.item() == theirs.logit_scale.item()


def test_imported_model_of_clips_vocabulary_reads_clips_tokens(open_clip):
    """OpenAI's vocabulary: the import picks CLIP's BPE, whose end-of-text id 49407 is the
    largest, so open_clip's argmax pooling and ours agree."""
    theirs = random_open_clip(open_clip, quick_gelu=True, vocab_size=49408)
    ours = from_open_clip_state_dict(theirs.state_dict(), quick_gelu=True, vision_heads=2,
                                     text_heads=4)
    assert (ours.config.tokenizer, ours.config.eot_token_id) == ("clip", 49407)
    tokens = tokenizer_for(ours.config)(CAPTIONS)
    assert torch.equal(tokens, open_clip.tokenize(CAPTIONS, context_length=24))
    assert_same_embeddings(ours, theirs, inputs()[0], tokens)


def test_the_wrong_activation_gives_other_embeddings(open_clip):
    """QuickGELU matters, and the weights cannot say which: the import asks for it."""
    theirs = random_open_clip(open_clip, quick_gelu=True)
    ours = from_open_clip_state_dict(theirs.state_dict(), quick_gelu=False, vision_heads=2,
                                     text_heads=4)
    images, _ = inputs()
    with torch.no_grad():
        assert not torch.allclose(ours.encode_image(images), theirs.encode_image(images),
                                  atol=1e-5)


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_imported_then_exported_model_loads_strictly_into_open_clip(open_clip, quick_gelu):
    theirs = random_open_clip(open_clip, quick_gelu)
    ours = from_open_clip_state_dict(theirs.state_dict(), quick_gelu=quick_gelu,
                                     vision_heads=2, text_heads=4)
    assert_same_embeddings(exported_open_clip(open_clip, ours), theirs, *inputs())


def test_our_xclip_model_exported_gives_our_embeddings_in_open_clip(open_clip):
    config = model_config("tiny", conv_stem=False, conv_stem_norm=False, vision_width=64,
                          vision_heads=2, vision_layers=2, num_prototypes=16)
    ours = perturbed(TwoTowerModel(config, "xclip"))
    state_dict, _ = to_open_clip_state_dict(ours)
    assert not any("head" in name for name in state_dict)  # the prototype heads stay behind
    assert_same_embeddings(ours, exported_open_clip(open_clip, ours), *inputs())


def test_exported_state_dict_has_open_clips_names_and_shapes(open_clip):
    ours = TwoTowerModel(model_config("tiny", conv_stem=False), "clip")
    state_dict, config = to_open_clip_state_dict(ours)
    reference = open_clip.model.CLIP(**config).state_dict()
    assert {name: tuple(t.shape) for name, t in state_dict.items()} == \
           {name: tuple(t.shape) for name, t in reference.items()}


def test_an_exported_safetensors_file_imports_back(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    config = model_config("tiny", conv_stem=False, conv_stem_norm=False, vision_heads=2)
    ours = perturbed(TwoTowerModel(config, "clip"))
    path = str(tmp_path / "open_clip_model.safetensors")
    safetensors.save_file(to_open_clip_state_dict(ours)[0], path)
    back = from_open_clip_state_dict(read_state_dict(path), quick_gelu=False, vision_heads=2,
                                     text_heads=4)
    assert_same_embeddings(back, ours, *inputs())


# --------------------------------------------------------------------------- refusals

def one_line_error(call, *args, **kwargs):
    with pytest.raises(DataError) as caught:
        call(*args, **kwargs)
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_a_conv_stem_is_refused_for_export():
    model = TwoTowerModel(small_config(), "clip")  # the tiny preset's conv stem
    assert "conv stem" in one_line_error(to_open_clip_state_dict, model)


def test_an_nclip_model_is_refused_for_export():
    model = TwoTowerModel(small_config(conv_stem=False), "nclip")
    assert "nCLIP" in one_line_error(to_open_clip_state_dict, model)


def write_torchscript(path):
    """A TorchScript archive, the format of OpenAI's clip .pt files."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script is deprecated
        torch.jit.script(torch.nn.Linear(2, 2)).save(path)
    return path


def test_a_torchscript_file_is_refused_for_import(tmp_path):
    path = write_torchscript(str(tmp_path / "ViT-B-32.pt"))
    assert "TorchScript" in one_line_error(read_state_dict, path)


def test_a_file_that_is_no_state_dict_is_refused_for_import(tmp_path):
    garbage, tensors_list = tmp_path / "garbage.bin", tmp_path / "list.pt"
    garbage.write_bytes(b"not a pickle")
    torch.save([torch.zeros(2)], tensors_list)
    assert "not a readable state dict" in one_line_error(read_state_dict, str(garbage))
    assert "holds no state dict" in one_line_error(read_state_dict, str(tensors_list))


def test_a_state_dict_of_another_layout_is_refused_for_import():
    state_dict = {"visual.proj": torch.zeros(4, 4), "logit_scale": torch.zeros(())}
    assert "layout" in one_line_error(from_open_clip_state_dict, state_dict, quick_gelu=True)


def test_an_open_clip_model_with_extra_tensors_is_refused_for_import(open_clip):
    state_dict = random_open_clip(open_clip, quick_gelu=False).state_dict()
    state_dict["logit_bias"] = torch.zeros(())  # SigLIP's
    message = one_line_error(from_open_clip_state_dict, state_dict, quick_gelu=False,
                             vision_heads=2, text_heads=4)
    assert "logit_bias" in message


# --------------------------------------------------------------------------- CLIP's tokenizer

def test_clip_tokenizer_gives_open_clips_token_ids(open_clip):
    tokens = CLIPTokenizer(77)(CAPTIONS)
    assert torch.equal(tokens, open_clip.tokenize(CAPTIONS))
    simple = open_clip.SimpleTokenizer()
    for row, caption in zip(tokens, CAPTIONS):
        end = len(simple.encode(caption)) + 1  # after <start_of_text> and the caption
        assert row[end] == CLIPTokenizer(77).eot_token_id == 49407
        assert (row[end + 1:] == 0).all()


def test_clip_tokenizer_keeps_the_end_of_text_token_of_a_long_caption(open_clip):
    tokenizer = CLIPTokenizer(8)
    tokens = tokenizer(CAPTIONS)
    assert (tokens[3, -1] == tokenizer.eot_token_id) and tokens.shape == (4, 8)
    assert tokenizer.padded_length(tokens) == 8
    assert tokenizer.decode(tokens[0]) == "a photo of a red circle"


def test_clip_tokenizer_without_open_clip_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)
    monkeypatch.setitem(sys.modules, "open_clip.tokenizer", None)
    assert "pip install open_clip_torch" in one_line_error(CLIPTokenizer, 77)


def test_tokenizer_for_a_config_is_the_one_it_names(open_clip):
    assert type(tokenizer_for(model_config("tiny"))) is Tokenizer
    clip = tokenizer_for(model_config("tiny", tokenizer="clip", eot_token_id=49407))
    assert type(clip) is CLIPTokenizer and clip.context_length == 24
    unknown = model_config("tiny", tokenizer="bpe")
    assert "unknown tokenizer" in one_line_error(tokenizer_for, unknown)


def test_tokenizer_for_refuses_a_config_that_pools_at_another_token(open_clip):
    config = model_config("tiny", tokenizer="clip")  # cl100k's end of text, 100257
    assert "--eot-token-id 49407" in one_line_error(tokenizer_for, config)


# --------------------------------------------------------------------------- clip_benchmark

@pytest.fixture(scope="module")
def benchmarked_model():
    return TwoTowerModel(model_config("tiny"), "xclip").eval()


def shape_scenes(count=48):
    return scored_scenes("val", count, 0, 32, 4, two_object_fraction=0.0)


def scene_pixels(scenes):
    """What clip_benchmark's loaders yield: normalized float images, as eval.py sees them."""
    return normalize(torch.stack([scenes.transform(scenes.image(i)) for i in range(len(scenes))]))


def test_clip_benchmark_zero_shot_classification_equals_eval_py(benchmarked_model):
    """Through interop.clip_benchmark_metrics, which calls clip_benchmark's evaluate with
    its top-k accuracy mended for NumPy 2.4."""
    pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
    model, tokenizer, scenes = benchmarked_model, Tokenizer(24), shape_scenes()
    labels = object_labels(scenes, "shape", SHAPES)
    dataset = TensorDataset(scene_pixels(scenes), labels)
    dataset.classes = list(SHAPES)
    templates = [template.replace("{}", "{c}") for template in SHAPE_TEMPLATES]
    theirs = clip_benchmark_metrics(model, tokenizer, DataLoader(dataset, batch_size=16),
                                    "zeroshot_classification", "cpu", classnames=list(SHAPES),
                                    templates=templates)
    classifier = zero_shot_classifier(model, tokenizer, list(SHAPES), SHAPE_TEMPLATES, "cpu")
    ours = zero_shot_accuracy(encode_scenes(model, scenes, "cpu"), labels, classifier,
                              class_keys=list(SHAPES))
    class_recalls = [ours[f"class_top1/{shape}"] for shape in SHAPES]
    assert theirs["acc1"] == pytest.approx(ours["top1"], abs=1e-6)
    assert theirs["acc5"] == pytest.approx(ours["top5"], abs=1e-6)
    assert theirs["mean_per_class_recall"] == pytest.approx(sum(class_recalls) / 6, abs=1e-6)


class CaptionedScenes(Dataset):
    """(image, [two captions]): what clip_benchmark's retrieval datasets yield."""

    def __init__(self, scenes):
        self.pixels = scene_pixels(scenes)
        self.captions = [[describe(*scenes.scene(i), scenes.rng(i, stream))
                          for stream in (CAPTION, EXTRA_CAPTION)] for i in range(len(scenes))]

    def __len__(self):
        return len(self.pixels)

    def __getitem__(self, index):
        return self.pixels[index], self.captions[index]


def images_and_caption_lists(batch):  # clip_benchmark's image_captions_collate_fn
    return torch.stack([image for image, _ in batch]), [captions for _, captions in batch]


def test_clip_benchmark_retrieval_equals_eval_py(benchmarked_model):
    zeroshot_retrieval = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")
    model, tokenizer = benchmarked_model, Tokenizer(24)
    scenes = scored_scenes("val", 24, 0, 32, 4)
    dataset = CaptionedScenes(scenes)
    captions = [caption for pair in dataset.captions for caption in pair]
    assert len(set(captions)) == len(captions)  # no tied scores for the two to break apart
    loader = DataLoader(dataset, batch_size=8, collate_fn=images_and_caption_lists)
    theirs = zeroshot_retrieval.evaluate(model, loader, tokenizer, device="cpu", amp=False,
                                         recall_k_list=[1, 5, 10])
    caption_image = [i for i in range(len(scenes)) for _ in range(2)]
    ours = retrieval_recall(encode_scenes(model, scenes, "cpu"),
                            encode_texts(model, tokenizer, captions, "cpu"), caption_image)
    for k in (1, 5, 10):  # clip_benchmark's "image retrieval" is a caption finding its image
        assert theirs[f"image_retrieval_recall@{k}"] == pytest.approx(
            ours[f"text_to_image/R@{k}"], abs=1e-6)
        assert theirs[f"text_retrieval_recall@{k}"] == pytest.approx(
            ours[f"image_to_text/R@{k}"], abs=1e-6)


# --------------------------------------------------------------------------- the command line

def run_main(capsys, *argv):
    """interop.py ARGV in process -> (exit code, stdout, stderr)."""
    try:
        main(list(argv))
        code = 0
    except SystemExit as exit:
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_checkpoint(tmp_path, model):
    folder = tmp_path / "run"
    folder.mkdir(exist_ok=True)
    torch.save(make_checkpoint(model, 0, {"seed": 0}), folder / "ckpt.pt")
    return str(folder / "ckpt.pt")


def test_export_command_writes_what_its_printed_lines_open_in_open_clip(open_clip, tmp_path,
                                                                         capsys):
    config = model_config("tiny", conv_stem=False, conv_stem_norm=False, num_prototypes=16)
    ours = perturbed(TwoTowerModel(config, "xclip"))
    checkpoint = write_checkpoint(tmp_path, ours)
    code, out, err = run_main(capsys, "export", "--checkpoint", checkpoint, "--out",
                              str(tmp_path / "exported"))
    assert code == 0, err
    assert "left out: the nCLIP prototype heads" in out and "data.Tokenizer(24)" in out
    lines = out.splitlines()
    start = lines.index("open it with open_clip:") + 1
    namespace = {"open_clip": open_clip}
    exec("\n".join(line.strip() for line in lines[start:start + 2]), namespace)
    assert_same_embeddings(ours, namespace["model"].eval(), *inputs())


def test_export_command_refuses_a_conv_stem_in_one_line(tmp_path, capsys):
    checkpoint = write_checkpoint(tmp_path, TwoTowerModel(small_config(), "clip"))
    code, _, err = run_main(capsys, "export", "--checkpoint", checkpoint, "--out",
                            str(tmp_path / "exported"))
    assert code == 2 and "conv stem" in err and len(err.strip().splitlines()) == 1


def test_import_command_writes_a_checkpoint_eval_py_loads(open_clip, tmp_path, capsys):
    theirs = random_open_clip(open_clip, quick_gelu=True, vision_head_width=64, text_heads=2)
    wrapped = {"state_dict": {f"module.{k}": v for k, v in theirs.state_dict().items()}}
    torch.save(wrapped, tmp_path / "open_clip_pytorch_model.bin")
    checkpoint = str(tmp_path / "imported.pt")
    code, out, err = run_main(capsys, "import", "--state-dict",
                              str(tmp_path / "open_clip_pytorch_model.bin"), "--quick-gelu",
                              "--out", checkpoint)
    assert code == 0, err
    assert "QuickGELU" in out
    ours, saved = load_model(checkpoint, "cpu")
    assert set(saved) == {"model", "step", "args", "model_config", "objective", "skipped"}
    assert_same_embeddings(ours, theirs, *inputs())


def test_export_then_import_with_the_model_config_gives_the_same_model(tmp_path, capsys):
    """The exported JSON says what the weights do not: QuickGELU and the heads (here 32
    wide in the image tower, not CLIP's 64)."""
    config = model_config("tiny", conv_stem=False, conv_stem_norm=False, quick_gelu=True)
    ours = perturbed(TwoTowerModel(config, "clip"))
    exported = tmp_path / "exported"
    code, _, err = run_main(capsys, "export", "--checkpoint", write_checkpoint(tmp_path, ours),
                            "--out", str(exported), "--name", "tiny-clip")
    assert code == 0, err
    checkpoint = str(tmp_path / "back.pt")
    code, _, err = run_main(capsys, "import", "--state-dict", str(exported / WEIGHTS_FILE),
                            "--model-config", str(exported / "tiny-clip.json"), "--out",
                            checkpoint)
    assert code == 0, err
    back, _ = load_model(checkpoint, "cpu")
    heads = {name: getattr(ours.config, name)  # a clip model has no prototype heads
             for name in ("num_prototypes", "head_hidden_dim", "head_bottleneck_dim")}
    assert replace(back.config, **heads) == ours.config
    assert_same_embeddings(back, ours, *inputs())


def test_import_command_refuses_an_open_clip_setting_these_towers_lack(tmp_path, capsys):
    config = tmp_path / "ViT-S-16-ls.json"
    config.write_text(json.dumps({"embed_dim": 64, "vision_cfg": {"ls_init_value": 1e-5},
                                  "text_cfg": {}}))
    code, _, err = run_main(capsys, "import", "--state-dict", str(config), "--model-config",
                            str(config), "--out", str(tmp_path / "out.pt"))
    assert code == 2 and "vision_cfg.ls_init_value" in err and len(err.splitlines()) == 1


def test_import_command_refuses_a_torchscript_file_in_one_line(tmp_path, capsys):
    path = write_torchscript(str(tmp_path / "ViT-B-32.pt"))
    code, _, err = run_main(capsys, "import", "--state-dict", path, "--no-quick-gelu", "--out",
                            str(tmp_path / "out.pt"))
    assert code == 2 and "TorchScript" in err and len(err.strip().splitlines()) == 1


class PILScenes(Dataset):
    """A clip_benchmark classification dataset: PIL images through `transform`, labels,
    and the classes and templates build_dataset attaches."""

    def __init__(self, transform):
        self.scenes, self.transform = shape_scenes(12), transform
        self.labels = object_labels(self.scenes, "shape", SHAPES)
        self.classes = list(SHAPES)
        self.templates = ["a photo of a {c}."]

    def __len__(self):
        return len(self.scenes)

    def __getitem__(self, index):
        image = self.scenes.image(index)
        assert isinstance(image, Image.Image)
        return self.transform(image), self.labels[index]


def test_clip_benchmark_command_scores_what_clip_benchmark_builds(monkeypatch, tmp_path,
                                                                  capsys):
    """clip_benchmark's dataset builder needs the real torchvision: a stand-in builder
    gives the command a dataset as build_dataset would."""
    pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
    builder = types.ModuleType("clip_benchmark.datasets.builder")
    builder.get_dataset_default_task = lambda name: "zeroshot_classification"
    builder.build_dataset = lambda dataset_name, transform, **options: PILScenes(transform)
    builder.get_dataset_collate_fn = lambda name: None
    monkeypatch.setitem(sys.modules, "clip_benchmark.datasets.builder", builder)
    checkpoint = write_checkpoint(tmp_path, TwoTowerModel(model_config("tiny"), "xclip"))
    output = tmp_path / "metrics.json"
    code, out, err = run_main(capsys, "clip-benchmark", "--checkpoint", checkpoint, "--dataset",
                              "shapes", "--dataset-root", str(tmp_path), "--device", "cpu",
                              "--workers", "0", "--output", str(output))
    assert code == 0, err
    results = json.loads(output.read_text())
    assert results["task"] == "zeroshot_classification"
    assert 0 <= results["metrics"]["acc1"] <= 1 and "mean_per_class_recall" in results["metrics"]
