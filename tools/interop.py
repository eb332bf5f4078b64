r"""xclip models in the open_clip world: export a CLIP or xCLIP model to open_clip's CLIP,
import an open_clip or OpenAI ViT CLIP into these towers, score a checkpoint with
clip_benchmark. Export and import need torch alone (a model of CLIP's vocabulary needs
open_clip_torch for its tokenizer once used); clip-benchmark needs clip_benchmark.

    python tools/interop.py export --checkpoint runs/xclip/ckpt.pt --out exported/
    python tools/interop.py import --state-dict open_clip_pytorch_model.bin --quick-gelu \
        --out b32.pt
    python tools/interop.py import --state-dict exported/open_clip_pytorch_model.bin \
        --model-config exported/xclip.json --out back.pt
    python tools/interop.py clip-benchmark --checkpoint CKPT --dataset cifar10 --dataset-root data/

The two layouts hold the same tensors under other names (RENAMES), with the projections
transposed: open_clip computes x @ proj where these towers hold nn.Linear weights.
"""
import argparse
import json
import os
import sys
import zipfile
from unittest import mock

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the paper's code
from checkpoint import load, load_model, make_checkpoint, unreadable
from data import CLIP_MEAN, CLIP_STD
from distributed import default_device
from eval import RECALL_AT
from faults import (DataError, OneLineErrorParser, device_name, non_negative_int, positive_int,
                    reported_in_one_line, writing)
from model import ModelConfig, TwoTowerModel

# (our prefix, open_clip's), the first that matches; then BLOCK_RENAMES inside the blocks.
RENAMES = (
    ("visual.patch_projection.", "visual.conv1."),
    ("visual.position_embedding", "visual.positional_embedding"),
    ("visual.transformer.blocks.", "visual.transformer.resblocks."),
    ("text.transformer.blocks.", "transformer.resblocks."),
    ("text.position_embedding", "positional_embedding"),
    ("text.", ""),  # token_embedding, ln_final: open_clip's CLIP keeps its text tower at the top
    ("image_projection.weight", "visual.proj"),
    ("text_projection.weight", "text_projection"),
)
BLOCK_RENAMES = ((".attn.qkv.", ".attn.in_proj_"), (".attn.out.", ".attn.out_proj."),
                 (".mlp.fc.", ".mlp.c_fc."), (".mlp.proj.", ".mlp.c_proj."))
TRANSPOSED = {"visual.proj", "text_projection"}  # (width, embed_dim) there, (embed_dim, width) here
# What OpenAI's TorchScript files add to the weights (open_clip drops them too).
OPENAI_METADATA = {"input_resolution", "context_length", "vocab_size"}
# The vocabularies a tokenizer here reads: size -> (ModelConfig.tokenizer, end-of-text id).
VOCABULARIES = {49408: ("clip", 49407), 100277: ("cl100k", 100257)}
WEIGHTS_FILE = "open_clip_pytorch_model.bin"  # the name open_clip's hub folders use


def open_clip_name(name):
    """open_clip's name for one of our state-dict entries."""
    for ours, theirs in RENAMES:
        if name.startswith(ours):
            name = theirs + name[len(ours):]
            break
    for ours, theirs in BLOCK_RENAMES:
        name = name.replace(ours, theirs)
    return name


# ------------------------------------------------------------------------------------- export

def check_exportable(model):
    """A DataError saying why open_clip's CLIP cannot hold `model`, if it cannot."""
    if not model.has_clip:
        raise DataError("an nCLIP model has no CLIP projections, and open_clip's CLIP is "
                        "nothing without them: export a clip or xclip model")
    if model.config.conv_stem:
        raise DataError("the conv stem (--conv-stem, on in the tiny preset) has no place in "
                        "open_clip's ViT, which patchifies with one patch-sized convolution: "
                        "train with --no-conv-stem to export")


def open_clip_config(config):
    """open_clip's model config (the JSON of open_clip.add_model_config) for a ModelConfig.
    The text tower pools at the first end-of-text token, as ours does ("eos"; open_clip's
    default "argmax" pools at the largest id, the same for CLIP's BPE and cl100k captions,
    whose end-of-text id is above every ordinary token's)."""
    return {
        "embed_dim": config.embed_dim,
        "quick_gelu": config.quick_gelu,
        "vision_cfg": {"image_size": config.image_size, "patch_size": config.patch_size,
                       "width": config.vision_width, "layers": config.vision_layers,
                       "head_width": config.vision_width // config.vision_heads,
                       "mlp_ratio": config.mlp_ratio},
        "text_cfg": {"context_length": config.context_length, "vocab_size": config.vocab_size,
                     "width": config.text_width, "heads": config.text_heads,
                     "layers": config.text_layers, "mlp_ratio": config.mlp_ratio,
                     "pool_type": "eos", "eos_id": config.eot_token_id},
    }


def to_open_clip_state_dict(model):
    """(state dict, model config) of open_clip's CLIP for a clip or xclip TwoTowerModel. An
    xclip model's prototype heads are left out: open_clip's CLIP has no place for them."""
    check_exportable(model)
    state_dict = {}
    for name, tensor in model.state_dict().items():
        if name.startswith(("image_head.", "text_head.")):
            continue
        key = open_clip_name(name)
        state_dict[key] = tensor.t().contiguous() if key in TRANSPOSED else tensor
    return state_dict, open_clip_config(model.config)


def export(checkpoint_path, out_dir, name=None):
    """Write OUT_DIR/<name>.json and OUT_DIR/open_clip_pytorch_model.bin; -> (config path,
    weights path, the model). `name` defaults to the checkpoint's folder name."""
    model, _ = load_model(checkpoint_path, "cpu")
    state_dict, config = to_open_clip_state_dict(model)
    name = name or os.path.basename(os.path.dirname(os.path.abspath(checkpoint_path)))
    if not name or os.sep in name:
        raise DataError(f"--name {name!r}: the name is also a file name, without {os.sep}")
    config_path = os.path.join(out_dir, f"{name}.json")
    weights_path = os.path.join(out_dir, WEIGHTS_FILE)
    with writing(out_dir):
        os.makedirs(out_dir, exist_ok=True)
    with writing(config_path), open(config_path, "w") as f:
        json.dump(config, f, indent=2)
    with writing(weights_path):
        torch.save(state_dict, weights_path)
    return config_path, weights_path, model


def print_how_to_open(config_path, weights_path, model):
    name = os.path.splitext(os.path.basename(config_path))[0]
    print(f"wrote {config_path} (open_clip model config) and {weights_path}")
    if model.has_prototypes:
        head_params = sum(p.numel() for head in (model.image_head, model.text_head)
                          for p in head.parameters())
        print(f"left out: the nCLIP prototype heads ({head_params:,} parameters), which "
              "open_clip's CLIP has no place for; the CLIP projections and logit scale are in")
    print("open it with open_clip:")
    print(f"    open_clip.add_model_config({config_path!r})")
    print(f"    model = open_clip.create_model({name!r}, pretrained={weights_path!r})")
    length = model.config.context_length
    if model.config.tokenizer == "cl100k":
        print(f"tokenize with this repository's data.Tokenizer({length}) (tiktoken's cl100k_base),"
              f" not open_clip.get_tokenizer({name!r}), which is CLIP's BPE: other token ids")
    else:
        print(f"tokenize with open_clip.get_tokenizer({name!r}) (CLIP's BPE, {length} tokens)")


# ------------------------------------------------------------------------------------- import

def is_torchscript(path):
    """OpenAI's clip .pt files are TorchScript archives: a zip with a code/ folder."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/")[1:2] == ["code"] for name in archive.namelist())


def read_state_dict(path):
    """The tensors of an open_clip or OpenAI CLIP weights file, read as open_clip reads
    them: a bare state dict or {"state_dict": ...}, DDP's "module." prefix stripped;
    .safetensors too. Code in the file never runs (weights_only)."""
    if not os.path.isfile(path):
        raise DataError(f"state dict not found: {path}")
    if is_torchscript(path):
        raise DataError(f"{path} is a TorchScript archive (as OpenAI's clip .pt files are), "
                        "which holds code: pass open_clip's state dict (open_clip.create_model"
                        "(name, pretrained='openai').state_dict(), saved with torch.save)")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            loaded = load_file(path)
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, text, a pickle with code
        raise DataError(unreadable(path, error, "state dict")) from None
    if isinstance(loaded, dict) and "model_config" in loaded:
        raise DataError(f"{path} is a checkpoint of train.py already: eval.py reads it as it is")
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not (isinstance(loaded, dict) and loaded
            and all(isinstance(tensor, torch.Tensor) for tensor in loaded.values())):
        raise DataError(f"{path} holds no state dict (a dict of tensors, or "
                        "{'state_dict': a dict of tensors})")
    return {name.removeprefix("module."): tensor for name, tensor in loaded.items()}


def block_count(state_dict, prefix):
    return len({name[len(prefix):].split(".")[0] for name in state_dict if name.startswith(prefix)})


def heads_for(width, heads, tower):
    heads = heads or width // 64  # CLIP's heads are 64 wide
    if heads <= 0 or width % heads:
        raise DataError(f"the {tower} tower's width {width} does not split into {heads} heads")
    return heads


def config_from_state_dict(state_dict, *, quick_gelu, vision_heads=None, text_heads=None):
    """The ModelConfig of an open_clip / OpenAI ViT CLIP state dict, read from its shapes
    as OpenAI's clip/model.py build_model reads them; heads are width // 64 unless given.
    The tokenizer follows from the vocabulary size (VOCABULARIES)."""
    if "visual.proj" not in state_dict:
        kind = "a ResNet" if any(".attnpool." in name for name in state_dict) else "no ViT"
        raise DataError(f"{kind} image tower (no visual.proj): this reads open_clip's and "
                        "OpenAI's ViT CLIP layout only")
    needed = ("visual.conv1.weight", "visual.positional_embedding", "positional_embedding",
              "token_embedding.weight", "ln_final.weight", "text_projection",
              "visual.transformer.resblocks.0.mlp.c_fc.weight")
    missing = [name for name in needed if name not in state_dict]
    if missing:
        raise DataError(f"not open_clip's ViT CLIP layout: no {', '.join(missing)}")
    vision_width, _, patch_size, _ = state_dict["visual.conv1.weight"].shape
    grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    mlp_width = state_dict["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    if mlp_width % vision_width:
        raise DataError(f"an MLP width {mlp_width} that is not a multiple of the width "
                        f"{vision_width}: ModelConfig.mlp_ratio is an integer")
    vocab_size, text_width = state_dict["token_embedding.weight"].shape
    if vocab_size not in VOCABULARIES:
        raise DataError(f"a vocabulary of {vocab_size} tokens, neither CLIP's BPE (49408) nor "
                        "cl100k_base (100277): no tokenizer here reads it")
    tokenizer, eot_token_id = VOCABULARIES[vocab_size]
    return ModelConfig(
        image_size=patch_size * grid, patch_size=patch_size, conv_stem=False,
        vision_width=vision_width,
        vision_layers=block_count(state_dict, "visual.transformer.resblocks."),
        vision_heads=heads_for(vision_width, vision_heads, "image"),
        context_length=state_dict["positional_embedding"].shape[0], vocab_size=vocab_size,
        text_width=text_width, text_layers=block_count(state_dict, "transformer.resblocks."),
        text_heads=heads_for(text_width, text_heads, "text"),
        embed_dim=state_dict["text_projection"].shape[1], mlp_ratio=mlp_width // vision_width,
        quick_gelu=quick_gelu, eot_token_id=eot_token_id, tokenizer=tokenizer)


def to_ours(name, tensor):
    """open_clip's tensor in our layout: projections transposed, the logit scale a scalar
    (some open_clip models keep a 1-vector), float32 (OpenAI's weights are float16)."""
    if name in TRANSPOSED:
        tensor = tensor.t()
    if name == "logit_scale" and tensor.numel() == 1:
        tensor = tensor.reshape(())
    return tensor.float()


def from_open_clip_state_dict(state_dict, *, quick_gelu, vision_heads=None, text_heads=None):
    """A clip TwoTowerModel (eval mode) with the weights of an open_clip or OpenAI ViT CLIP
    state dict. `quick_gelu`: the weights cannot say whether they were trained with
    QuickGELU (OpenAI's, open_clip's *-quickgelu models) or GELU (open_clip's others)."""
    config = config_from_state_dict(state_dict, quick_gelu=quick_gelu,
                                    vision_heads=vision_heads, text_heads=text_heads)
    model = TwoTowerModel(config, "clip")
    names = {open_clip_name(ours): ours for ours in model.state_dict()}
    given = set(state_dict) - OPENAI_METADATA
    if given != set(names):
        unexpected, missing = sorted(given - set(names)), sorted(set(names) - given)
        raise DataError(f"not open_clip's plain ViT CLIP: unexpected {unexpected[:3] or 'none'}, "
                        f"missing {missing[:3] or 'none'}")
    ours = {names[name]: to_ours(name, state_dict[name]) for name in names}
    expected = model.state_dict()
    for name, tensor in ours.items():
        if tensor.shape != expected[name].shape:
            raise DataError(f"{open_clip_name(name)} has shape {tuple(tensor.shape)}, where the "
                            f"shapes of the rest give {tuple(expected[name].shape)}")
    model.load_state_dict(ours)
    return model.eval()


# The open_clip model-config settings these towers have; any other changes the computation.
OPEN_CLIP_SETTINGS = {
    "model": {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg"},
    "vision_cfg": {"image_size", "layers", "width", "head_width", "mlp_ratio", "patch_size"},
    "text_cfg": {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio",
                 "pool_type", "eos_id"},
}


def read_open_clip_config(path):
    """What a state dict does not say, from an open_clip model config (a JSON of open_clip's
    model_configs/, one export writes, or a hub folder's open_clip_config.json): -> quick_gelu,
    vision_heads, text_heads, with open_clip's defaults. DataError for a setting these towers
    do not have, or images normalized otherwise than with CLIP's mean and std."""
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as error:
        reason = getattr(error, "strerror", None) or error
        raise DataError(f"--model-config {path}: {reason}") from None
    if not isinstance(saved, dict):
        raise DataError(f"--model-config {path}: not an open_clip model config (a JSON object)")
    config = saved.get("model_cfg", saved)
    vision, text = config.get("vision_cfg", {}), config.get("text_cfg", {})
    unknown = sorted(set(config) - OPEN_CLIP_SETTINGS["model"])
    for part, settings in (("vision_cfg", vision), ("text_cfg", text)):
        unknown += [f"{part}.{key}" for key in sorted(set(settings) - OPEN_CLIP_SETTINGS[part])]
    end_of_text = VOCABULARIES.get(text.get("vocab_size", 49408), (None, None))[1]
    if text.get("pool_type", "argmax") not in ("argmax", "eos") or \
            text.get("pool_type") == "eos" and text.get("eos_id") != end_of_text:
        unknown.append(f"text_cfg.pool_type {text['pool_type']} (eos_id {text.get('eos_id')})")
    if unknown:
        raise DataError(f"{path}: open_clip settings these towers do not have: "
                        f"{', '.join(unknown[:4])}")
    preprocess = saved.get("preprocess_cfg", {})
    for key, clip_value in (("mean", CLIP_MEAN), ("std", CLIP_STD)):
        if key in preprocess and not torch.allclose(torch.tensor(preprocess[key]),
                                                    clip_value.flatten()):
            raise DataError(f"{path}: images normalized with {key} {preprocess[key]}, where "
                            f"eval.py uses CLIP's {clip_value.flatten().tolist()}")
    return {"quick_gelu": bool(config.get("quick_gelu", False)),
            "vision_heads": vision.get("width", 768) // vision.get("head_width", 64),
            "text_heads": text.get("heads", 8)}



def architecture_summary(config):
    gelu = "QuickGELU" if config.quick_gelu else "GELU"
    return (f"ViT {config.image_size} px / patch {config.patch_size}, image tower "
            f"{config.vision_width} x {config.vision_layers} ({config.vision_heads} heads), text "
            f"tower {config.text_width} x {config.text_layers} ({config.text_heads} heads), "
            f"context {config.context_length}, {config.tokenizer} tokenizer, embed "
            f"{config.embed_dim}, {gelu}")


# ----------------------------------------------------------------------------- clip_benchmark

def top_k_accuracy(logits, labels, topk=(1,)):
    """clip_benchmark's zeroshot_classification.accuracy, the fraction of rows whose label
    is among their k best logits, without its float() of a 1-element array, which NumPy
    2.4 refuses (LAION-AI/CLIP_benchmark#147, open in clip_benchmark 1.6.2)."""
    hits = logits.topk(max(topk), dim=1).indices == labels.view(-1, 1)
    return [hits[:, :k].any(dim=1).float().mean().item() for k in topk]


def clip_benchmark_metrics(model, tokenizer, loader, task, device, *, classnames=None,
                           templates=None, recall_at=RECALL_AT):
    """clip_benchmark's metrics of `model` on the batches of `loader`: (images, labels) for
    zeroshot_classification, with the dataset's class names and templates ({c} for the
    name); (images, list of captions per image) for zeroshot_retrieval. Mixed precision
    (float16) on a GPU, as clip_benchmark runs by default; float32 on the CPU."""
    from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval
    device_type = torch.device(device).type  # what clip_benchmark's torch.autocast takes
    amp = device_type == "cuda"
    if task == "zeroshot_classification":
        with mock.patch.object(zeroshot_classification, "accuracy", top_k_accuracy):
            return zeroshot_classification.evaluate(model, loader, tokenizer, classnames,
                                                    templates, device=device_type, amp=amp)
    return zeroshot_retrieval.evaluate(model, loader, tokenizer, device=device_type, amp=amp,
                                       recall_k_list=list(recall_at))


def clip_benchmark(args):
    """What clip_benchmark's cli.py `run` does for the two zero-shot tasks, with our model,
    preprocessing and tokenizer in place of an open_clip model's. -> (metrics, task)"""
    try:
        from clip_benchmark.datasets import builder
    except ImportError as error:
        raise DataError(f"clip-benchmark needs clip_benchmark and torchvision: pip install "
                        f"clip_benchmark ({error})") from None
    if torch.device(args.device).index is not None:
        torch.cuda.set_device(args.device)  # clip_benchmark moves batches to "cuda"
    dataset_name = args.dataset.removeprefix("wds/")
    task = args.task or builder.get_dataset_default_task(dataset_name)
    if task not in ("zeroshot_classification", "zeroshot_retrieval"):
        raise DataError(f"{dataset_name} is a {task} dataset; this runs zeroshot_classification "
                        "and zeroshot_retrieval")
    model, preprocess, tokenizer = load(args.checkpoint, args.device)
    dataset = builder.build_dataset(dataset_name=args.dataset, root=args.dataset_root,
                                    transform=preprocess, split=args.split, download=True,
                                    annotation_file=args.annotation_file, task=task)
    if args.dataset.startswith("wds/"):
        loader = DataLoader(dataset.batched(args.batch_size), batch_size=None,
                            num_workers=args.workers)
    else:
        loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers,
                            collate_fn=builder.get_dataset_collate_fn(args.dataset))
    metrics = clip_benchmark_metrics(model, tokenizer, loader, task, args.device,
                                     classnames=getattr(dataset, "classes", None),
                                     templates=getattr(dataset, "templates", None),
                                     recall_at=args.recall_k)
    return metrics, task


# ------------------------------------------------------------------------------- command line

def build_parser():
    parser = OneLineErrorParser(description="xclip models in the open_clip world.")
    commands = parser.add_subparsers(dest="command", required=True)
    exporter = commands.add_parser("export", help="write a clip or xclip checkpoint as "
                                                  "open_clip's CLIP (model config + weights)")
    exporter.add_argument("--checkpoint", required=True, help="checkpoint written by train.py")
    exporter.add_argument("--out", required=True, help="folder for <name>.json and " + WEIGHTS_FILE)
    exporter.add_argument("--name", default=None,
                          help="the model's name in open_clip's registry (default: the "
                               "checkpoint's folder name); pick one no built-in model has")
    importer = commands.add_parser("import", help="write an open_clip / OpenAI ViT CLIP state "
                                                  "dict as a checkpoint eval.py reads")
    importer.add_argument("--state-dict", required=True,
                          help="open_clip's weights (.bin, .pt, .safetensors: a state dict or "
                               "{'state_dict': ...}), not OpenAI's TorchScript .pt")
    importer.add_argument("--model-config", default=None,
                          help="the model's open_clip config (open_clip's model_configs/<name>"
                               ".json, the JSON export writes, or a hub's open_clip_config.json):"
                               " QuickGELU and the heads, which the weights do not say")
    importer.add_argument("--quick-gelu", action=argparse.BooleanOptionalAction, default=None,
                          help="--quick-gelu for OpenAI's weights and open_clip's *-quickgelu "
                               "models, --no-quick-gelu for the others (default: --model-config's;"
                               " one of them is needed)")
    importer.add_argument("--vision-heads", type=positive_int, default=None,
                          help="image tower attention heads (default: --model-config's, else "
                               "width / 64 as in CLIP)")
    importer.add_argument("--text-heads", type=positive_int, default=None,
                          help="text tower attention heads (default: --model-config's, else "
                               "width / 64 as in CLIP)")
    importer.add_argument("--out", required=True, help="the checkpoint file to write")
    bench = commands.add_parser("clip-benchmark", help="clip_benchmark's zero-shot classification "
                                                       "or retrieval of a checkpoint")
    bench.add_argument("--checkpoint", required=True, help="checkpoint written by train.py")
    bench.add_argument("--dataset", required=True,
                       help="a clip_benchmark dataset name: cifar10, imagenet1k, mscoco_captions, "
                            "flickr30k, wds/vtab/cifar10, ...")
    bench.add_argument("--dataset-root", required=True,
                       help="where the dataset is, or is downloaded to (clip_benchmark's "
                            "--dataset_root)")
    bench.add_argument("--task", choices=("zeroshot_classification", "zeroshot_retrieval"),
                       default=None, help="default: the dataset's, as clip_benchmark picks it")
    bench.add_argument("--split", default="test", help="dataset split")
    bench.add_argument("--annotation-file", default=None,
                       help="captions file of a retrieval dataset, where clip_benchmark needs one")
    bench.add_argument("--recall-k", type=positive_int, nargs="+", default=RECALL_AT,
                       help="the K of retrieval's Recall@K")
    bench.add_argument("--batch-size", type=positive_int, default=64, help="images per batch")
    bench.add_argument("--workers", type=non_negative_int, default=2,
                       help="image-loading processes")
    bench.add_argument("--device", type=device_name, default=default_device(),
                       help="where to run the model: cpu, cuda or cuda:N")
    bench.add_argument("--output", default=None,
                       help="metrics JSON (default: clip_benchmark_<dataset>_<task>.json beside "
                            "the checkpoint)")
    return parser


def import_state_dict(args):
    settings = read_open_clip_config(args.model_config) if args.model_config else {}
    flags = {"quick_gelu": args.quick_gelu, "vision_heads": args.vision_heads,
             "text_heads": args.text_heads}
    settings.update({name: value for name, value in flags.items() if value is not None})
    if "quick_gelu" not in settings:
        raise DataError("pass --quick-gelu (OpenAI's weights, open_clip's *-quickgelu) or "
                        "--no-quick-gelu, or --model-config: the weights do not say which")
    model = from_open_clip_state_dict(read_state_dict(args.state_dict), **settings)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise DataError(f"--out {args.out}: no folder {out_dir}")
    # what checkpoint.load_model reads, as train.py would write it at step 0, no optimizer
    with writing(args.out):
        torch.save(make_checkpoint(model, 0, {"seed": 0}), args.out)
    print(f"read {args.state_dict}: {architecture_summary(model.config)}")
    print(f"wrote {args.out} (objective clip): python eval.py zeroshot --checkpoint {args.out} ...")


def write_benchmark_results(args, metrics, task):
    slug = args.dataset.replace("/", "_")
    output = args.output or os.path.join(os.path.dirname(args.checkpoint),
                                         f"clip_benchmark_{slug}_{task}.json")
    # clip_benchmark's own layout, so that its `build` command tabulates this file too
    results = {"dataset": args.dataset, "model": "xclip", "pretrained": args.checkpoint,
               "task": task, "metrics": metrics, "language": "en"}
    with writing(output), open(output, "w") as f:
        json.dump(results, f, indent=1)
    for key, value in metrics.items():
        print(f"{key:<28}  {value:.4f}")
    print(f"wrote {output}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    with reported_in_one_line("interop.py"):
        if args.command == "export":
            print_how_to_open(*export(args.checkpoint, args.out, args.name))
        elif args.command == "import":
            import_state_dict(args)
        else:
            if args.output and not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
                raise DataError(f"--output {args.output}: no such folder")
            write_benchmark_results(args, *clip_benchmark(args))


if __name__ == "__main__":
    main()
