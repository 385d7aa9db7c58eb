"""The `vitkit` command: train, eval, predict, info, explain, certify, attack and demo.

Every command takes `--config FILE` (YAML or JSON, keys are the option names); flags given on the
command line override the file. User errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import sys
from dataclasses import MISSING
from pathlib import Path
from typing import Any, Callable

from vitkit.errors import VitkitError
from vitkit.train.config import RECIPES, config_fields, read_config_file

DEFAULT_DEMO_OUT = "runs/demo"
DISTRIBUTED_COMMANDS = ("train", "train-boxes", "eval", "certify", "attack")  # the ones that share their work among torchrun's processes


# -- value parsers ---------------------------------------------------------------------------


def parse_number(text: str) -> float:
    """A float, also written as a fraction such as 8/255."""
    try:
        if "/" in text:
            num, den = text.split("/")
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (examples: 0.1, 8/255)") from None


def list_of(kind: Callable[[str], Any]) -> Callable[[str], list]:
    def parse(text: str) -> list:
        values = [kind(part) for part in text.split(",") if part.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"{text!r} holds no value: give one or more, separated by commas")
        return values

    parse.takes_list = True  # a config file may give these as a YAML/JSON list
    return parse


def apgd_loss(text: str) -> str:
    if text not in ("ce", "dlr"):
        raise argparse.ArgumentTypeError(f"unknown loss {text!r}: use ce, dlr or ce,dlr")
    return text


def int_at_least(low: int) -> Callable[[str], int]:
    """An integer ≥ low (1: a count of things; 0: a count where 0 means none or all)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be at least {low}")
        return value

    return parse


positive_int = int_at_least(1)
count_or_all = int_at_least(0)


def positive_number(text: str) -> float:
    value = parse_number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def unit_fraction(text: str) -> float:
    """A share in [0, 1)."""
    value = parse_number(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must lie in [0, 1)")
    return value


def _parser_for(annotation: str) -> Callable[[str], Any] | None:
    """argparse type for a TrainConfig field annotation (a string, as the module uses postponed annotations)."""
    base = annotation.replace(" | None", "")
    return {
        "int": int,
        "float": parse_number,
        "str": str,
        "list[int]": list_of(int),
        "list[float]": list_of(parse_number),
    }.get(base)


# -- commands --------------------------------------------------------------------------------


def add_train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", choices=sorted(RECIPES), help="a named recipe: preset, optimiser, schedule, augmentation")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR where it stopped")
    p.add_argument("--out", default=None, help="run folder (default runs/<recipe>, else runs/<data>-<model or weights>; "
                                               "-2, -3, ... appended while that holds a run)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_flags(p, config_fields())


def add_config_flags(p: argparse.ArgumentParser, config_fields: list) -> None:
    """One flag per field of a config dataclass (TrainConfig, BoxTrainConfig), default None: "not given"."""
    for f in config_fields:
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        if f.type == "bool":
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            p.add_argument(flag, dest=f.name, type=_parser_for(f.type), default=None, help=help_text)


def config_from_flags(args: argparse.Namespace, config_class: type, new: Callable[[dict], Any]) -> tuple[Any, Path | None]:
    """The configuration of `train` or `train-boxes` and, for --resume, the run folder: a resumed run keeps its
    saved configuration (only where it runs, --device, may change); a new one is `new(flags)`."""
    from dataclasses import fields

    names = {f.name for f in fields(config_class)}
    flags = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if not args.resume:
        return new(flags), None
    run = Path(args.resume)
    if not (run / "config.json").is_file():
        raise VitkitError(f"{run} is not a vitkit run folder (no config.json): pass the --out folder of a run")
    for flag, value in (("--out", args.out), ("--recipe", getattr(args, "recipe", None))):
        if value and not (flag == "--out" and Path(value).resolve() == run.resolve()):
            raise VitkitError(f"--resume continues {run} with its saved configuration, in place: drop {flag} "
                              "(from the command line or the --config file)")
    saved = read_config_file(run / "config.json")
    foreign = sorted(set(saved) - names)
    if foreign:
        raise VitkitError(f"{run} is not a `vitkit {args.command}` run (its config has {', '.join(foreign[:3])}): "
                          "resume it with the command that made it")
    changed = {k for k, v in flags.items() if k != "device" and v != saved.get(k)}
    if changed:
        raise VitkitError(f"--resume continues the saved configuration; drop the option(s) {sorted(changed)}")
    return config_class(**{**saved, **{k: v for k, v in flags.items() if k == "device"}}), run


def cmd_train(args: argparse.Namespace) -> int:
    from vitkit.train import TrainConfig, build_config, train

    cfg, out = config_from_flags(args, TrainConfig, lambda flags: build_config(args.recipe, None, flags))
    model = Path(cfg.pretrained).name.split(".")[0] if cfg.pretrained else cfg.model
    return run_training(args, train, cfg, out, args.recipe or f"{stem(cfg.data)}-{model}")


def cmd_train_boxes(args: argparse.Namespace) -> int:
    """Seed 001: a class and a bounding box per image, on a ViT or ResNet-18 backbone."""
    from vitkit.train.boxes import BoxTrainConfig, class_stage_config, train_boxes

    def new(flags: dict) -> BoxTrainConfig:  # a class stage starts from its run's options
        return class_stage_config(flags) if flags.get("class_from") else BoxTrainConfig(**flags)

    cfg, out = config_from_flags(args, BoxTrainConfig, new)
    return run_training(args, train_boxes, cfg, out, f"{stem(cfg.data)}-boxes-{cfg.backbone}")


def stem(source: str) -> str:
    """A data source's name without folders and suffixes: path/to/asl-letters.tar.gz → asl-letters."""
    return Path(source).resolve().name.split(".")[0] or "data"


def new_run_folder(parent: Path, name: str, claim: bool) -> Path:
    """The first of parent/name, name-2, name-3, ... that does not exist. With `claim` it is created at once
    (mkdir fails if another process got there first), so runs started side by side each get their own. Under
    torchrun nothing is created: every rank must arrive at the same folder, and none writes before all of them
    have met in the process group's rendezvous."""
    for copies in itertools.count(1):
        folder = parent / (name if copies == 1 else f"{name}-{copies}")
        if claim:
            try:
                folder.mkdir(parents=True)
                return folder
            except FileExistsError:
                continue
        elif not folder.exists():
            return folder


def run_training(args: argparse.Namespace, train, cfg, resumed: Path | None, default_name: str) -> int:
    """Trains into --out (refused if it holds a run), or into a new runs/<default_name>[-2, -3, ...], or resumes
    the run folder `resumed`; rank 0 prints the summary."""
    from vitkit import distributed

    if resumed:
        out = resumed
    elif args.out:
        out = Path(args.out)
        if (out / "config.json").exists():
            raise VitkitError(f"{out} already holds a run: continue it with --resume {out}, or train into another "
                              "--out (or delete the folder)")
    else:
        out = new_run_folder(Path("runs"), default_name, claim=not distributed.launched())
        if os.environ.get("RANK", "0") == "0":  # torchrun's rank: the process group does not exist yet
            print(f"training into {out}/")
    try:
        summary = train(cfg, out, resume=bool(args.resume), progress=not args.quiet)
    except BaseException:
        if out.is_dir() and not any(out.iterdir()):  # a run refused before it wrote anything leaves no folder
            out.rmdir()
        raise
    if distributed.is_main():
        print_summary(summary, out)
    return 0


def cmd_eval_boxes(args: argparse.Namespace) -> int:
    """`vitkit eval` on a box checkpoint: accuracy (also per class), IoU figures, the confusion matrix and a picture of
    true and predicted boxes."""
    from vitkit import distributed
    from vitkit.data.boxes import load_box_dataset
    from vitkit.train import select_device
    from vitkit.train.boxes import IOU_NOTE, evaluate_box_model, load_box_model
    from vitkit.train.checkpoint import write_json

    device = distributed.setup(select_device(args.device))
    model, info = load_box_model(args.checkpoint, device)
    source = args.data or info["data"]
    data = load_box_dataset(source, args.split, info["image_size"])
    out = Path(args.out or Path(args.checkpoint).with_suffix("").as_posix() + f"-eval-{args.split}")
    metrics = evaluate_box_model(model, info, data, args.split, device, args.batch_size, info.get("eval_bf16", False),
                                 picture=out / "boxes.png", samples=args.samples, per_class=True)
    if not distributed.is_main():  # rank 0 has every image's prediction and writes the report
        return 0
    summary = {"checkpoint": str(args.checkpoint), "data": source, "split": args.split, "images": len(data),
               **metrics, "iou_measured_on": IOU_NOTE}
    write_json(out / "summary.json", summary)
    print_summary({k: v for k, v in summary.items() if "accuracy_" not in k}, out)
    return 0


def load_checkpoint_and_data(args: argparse.Namespace, device) -> tuple[Any, dict[str, Any], Any]:
    """The checkpoint's model (eval mode) and metadata, and `args.split` of `args.data` (default: the data
    the model was trained on), resized to the model's input; the classes must match the checkpoint's."""
    from vitkit.data import load_dataset
    from vitkit.data.datasets import class_difference
    from vitkit.train import load_model

    model, info = load_model(args.checkpoint, device)
    source = args.data or info["data"]
    data = load_dataset(source, args.split, image_size=info["model"]["image_size"], root=args.data_root)
    if data.classes != info["classes"]:
        raise VitkitError("the data's classes differ from the checkpoint's "
                          f"({class_difference(data.classes, info['classes'])}): use the data set the model was trained on")
    return model, info, data


def require_vit(info: dict[str, Any], checkpoint: str, what: str) -> dict[str, Any]:
    """A checkpoint's metadata, if it holds a ViT; else the one-line error that `what` needs one."""
    arch = info.get("arch", "vit")  # checkpoints from before "arch" are ViTs
    if arch != "vit":
        raise VitkitError(f"{what}, but {checkpoint} holds a {arch} model: pass a ViT checkpoint")
    return info


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from vitkit import distributed
    from vitkit.plots import confusion_matrix, plot_confusion_matrix, plot_prediction_grid
    from vitkit.train import select_device
    from vitkit.train.checkpoint import write_json
    from vitkit.train.evaluate import classification_metrics, predict_dataset

    from vitkit.train import read_info

    if read_info(args.checkpoint).get("task") == "boxes":
        return cmd_eval_boxes(args)
    device = distributed.setup(select_device(args.device))
    model, info, data = load_checkpoint_and_data(args, device)
    source = args.data or info["data"]
    logits, labels = predict_dataset(model, data, info["mean"], info["std"], device, args.batch_size)
    if not distributed.is_main():  # rank 0 has every image's logits and writes the report
        return 0
    metrics = classification_metrics(logits, labels, data.classes, prefix=f"{args.split}_")
    out = Path(args.out or Path(args.checkpoint).with_suffix("").as_posix() + f"-eval-{args.split}")
    out.mkdir(parents=True, exist_ok=True)
    probs = logits.softmax(1)
    pred = probs.argmax(1)
    plot_confusion_matrix(confusion_matrix(labels, pred, len(data.classes)), data.classes, out / "confusion.png")
    # The sample grid shows the first images and as many mistakes, so both kinds can be checked by eye.
    wrong = (pred != labels).nonzero().flatten()[: args.samples // 2]
    right = (pred == labels).nonzero().flatten()[: args.samples - len(wrong)]
    shown = torch.cat([right, wrong])
    plot_prediction_grid(
        data.images[shown], labels[shown].tolist(), pred[shown].tolist(), data.classes, out / "predictions.png",
        probs=probs[shown, pred[shown]].tolist(),
    )
    summary = {"checkpoint": str(args.checkpoint), "data": source, "split": args.split, "images": len(data), **metrics}
    write_json(out / "summary.json", summary)
    print_summary({k: v for k, v in summary.items() if "accuracy_" not in k}, out)
    return 0


class Normaliser:
    """A checkpoint's pixel normalisation on `device`: uint8 images → the model's input, and back to [0, 1]."""

    def __init__(self, info: dict[str, Any], device: Any):
        import torch

        self.device = device
        self.mean = torch.tensor(info["mean"], device=device)[:, None, None]
        self.std = torch.tensor(info["std"], device=device)[:, None, None]

    def __call__(self, images: Any) -> Any:
        return (images.to(self.device).float() / 255 - self.mean) / self.std

    def pixels(self, x: Any) -> Any:
        """Normalised images back to pixels in [0, 1], for pictures."""
        return (x * self.std + self.mean).clamp(0, 1)


def ranked_classes(probs: Any, k: int, classes: list[str]) -> list[list[dict[str, Any]]]:
    """Per image, its `k` most probable classes (at most all) as {"class", "probability"}, most probable first."""
    top_p, top_i = probs.topk(min(k, probs.shape[1]), dim=1)
    return [[{"class": classes[i], "probability": p} for p, i in zip(ps, idx)]
            for ps, idx in zip(top_p.tolist(), top_i.tolist())]


def describe_ranked(ranked: list[dict[str, Any]]) -> str:
    return ", ".join(f"{r['class']} {r['probability']:.1%}" for r in ranked)


def cmd_predict_boxes(args: argparse.Namespace) -> int:
    """`vitkit predict` on a box checkpoint: each image's top-k classes and its box, in pixels of the file as given;
    with --out, the boxes drawn on the images the model saw (boxes.png)."""
    import torch
    from PIL import Image

    from vitkit.data import load_images
    from vitkit.data.boxes import BoxDataset, cxcywh_to_xyxy
    from vitkit.plots import plot_box_predictions
    from vitkit.train import select_device
    from vitkit.train.boxes import load_box_model, predict_boxes
    from vitkit.train.checkpoint import write_json

    device = select_device(args.device)
    model, info = load_box_model(args.checkpoint, device)
    images = load_images(args.images, info["image_size"], info["in_channels"])
    # The images are stretched to the model's square input, so a box's fractions hold for the file's own size.
    unknown = BoxDataset(images, torch.zeros(len(images), dtype=torch.long), info["classes"], "predict",
                         torch.zeros(len(images), 4))
    logits, boxes = predict_boxes(model, unknown, info["mean"], info["std"], device, bf16=info.get("eval_bf16", False))
    probs = logits.softmax(1)
    results = []
    for path, ranked, box in zip(args.images, ranked_classes(probs, args.top_k, info["classes"]), boxes):
        with Image.open(path) as img:  # the header only: the file's own size
            width, height = img.size
        corners = (cxcywh_to_xyxy(box) * torch.tensor([width, height, width, height])).tolist()
        results.append({"image": str(path), "top": ranked, "box_cxcywh": box.tolist(), "box_xyxy_pixels": corners,
                        "image_size": [width, height]})
        print(f"{path}: {describe_ranked(ranked)}; box x1, y1, x2, y2 = " + ", ".join(f"{c:.0f}" for c in corners)
              + " px")
    if args.out:
        out = Path(args.out)
        best_p, best_i = probs.max(1)
        plot_box_predictions(images, None, boxes, None, best_i.tolist(), info["classes"], out / "boxes.png",
                             probs=best_p.tolist())
        write_json(out / "summary.json", {"checkpoint": str(args.checkpoint), "predictions": results})
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import torch

    from vitkit.data import load_images
    from vitkit.train import load_model, read_info, select_device
    from vitkit.train.checkpoint import write_json

    if read_info(args.checkpoint).get("task") == "boxes":
        return cmd_predict_boxes(args)
    device = select_device(args.device)
    model, info = load_model(args.checkpoint, device)
    images = load_images(args.images, info["model"]["image_size"], info["model"]["in_channels"])
    with torch.inference_mode():
        probs = model(Normaliser(info, device)(images)).softmax(1).cpu()
    results = []
    for path, ranked in zip(args.images, ranked_classes(probs, args.top_k, info["classes"])):
        results.append({"image": str(path), "top": ranked})
        print(f"{path}: {describe_ranked(ranked)}")
    if args.out:
        write_json(Path(args.out) / "summary.json", {"checkpoint": str(args.checkpoint), "predictions": results})
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from vitkit.models import PRESETS, ViTConfig, preset_config
    from vitkit.models.summary import format_summary, summarize
    from vitkit.train.checkpoint import write_json

    if args.presets or args.target is None:
        for name, shape in PRESETS.items():
            cfg = preset_config(name)
            print(f"{name:14s} {cfg.image_size}/{cfg.patch_size}  depth {cfg.depth:2d}  width {cfg.dim:4d}  "
                  f"heads {cfg.heads:2d}  mlp {cfg.mlp_dim}")
        return 0
    overrides = {"image_size": args.image_size, "patch_size": args.patch_size, "num_classes": args.num_classes}
    if args.target in PRESETS:
        cfg = preset_config(args.target, **overrides)
    else:
        from vitkit.train import read_info

        if not Path(args.target).exists():
            raise VitkitError(f"{args.target} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint file or run "
                              "folder: check the name or path")
        info = require_vit(read_info(args.target), args.target, "`vitkit info` counts a ViT's parameters and MACs")
        cfg = ViTConfig.from_dict({**info["model"], **{k: v for k, v in overrides.items() if v is not None}})
    summary = summarize(cfg, batch_size=args.batch_size)
    print(format_summary(summary))
    if args.out:
        write_json(Path(args.out) / "summary.json", {
            "parameters": summary.parameters, "tokens": summary.tokens, "macs_per_image": summary.macs_per_image,
            "activation_bytes_per_image": summary.activation_bytes_per_image, **cfg.to_dict(),
        })
    return 0


def relevance_options(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """The options of `vitkit explain` that `method` takes, as `patch_relevance` takes them."""
    if method == "rollout":
        return dict(head_fusion=args.head_fusion, discard_ratio=args.discard_ratio, start_layer=args.start_layer,
                    residual=args.residual)
    if method == "attention":
        return dict(layer=args.layer, head_fusion=args.head_fusion)
    return {}


def cmd_explain_boxes(args: argparse.Namespace) -> int:
    """`vitkit explain` on a box checkpoint (ViT backbone): maps of where the backbone looks on each image, with the
    predicted box drawn (METHOD.png); with --zoom, also on the crop around the box that the class is read from
    (METHOD-zoom.png)."""
    import torch

    from vitkit.data import load_images
    from vitkit.data.boxes import box_iou, load_box_dataset
    from vitkit.explain import explain_box_model, relevance_to_image
    from vitkit.plots import plot_explanations
    from vitkit.train import select_device
    from vitkit.train.boxes import load_box_model
    from vitkit.train.checkpoint import write_json

    if args.evaluate:
        raise VitkitError("--evaluate (deletion and insertion) scores a classifier's maps; it is not built for box "
                          "checkpoints: drop --evaluate")
    device = select_device(args.device)
    model, info = load_box_model(args.checkpoint, device)
    if args.images:
        images, labels, true_boxes = load_images(args.images, info["image_size"], info["in_channels"]), None, None
    else:
        source = args.data or info["data"]
        data = load_box_dataset(source, args.split, info["image_size"])
        # Data sets are often stored class by class: a seeded random sample shows every class.
        data = data.subset(torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))[:args.n])
        images, labels, true_boxes = data.images, data.labels, data.boxes
    images = images[:args.n]
    normalise = Normaliser(info, device)
    explained = explain_box_model(model, normalise(images), args.method, **relevance_options(args, args.method))
    probs = explained.logits.softmax(1).cpu()
    pred, boxes = probs.argmax(1), explained.boxes.cpu()
    titles, correct = [], []
    for i, p in enumerate(pred.tolist()):
        title = f"pred {info['classes'][p]} ({probs[i, p]:.0%})"
        if labels is not None:
            title += f" / true {info['classes'][labels[i]]}, IoU {box_iou(boxes[i], true_boxes[i]):.2f}"
        titles.append(title)
        correct.append(labels is None or p == labels[i])
    grid = model.backbone.cfg.grid_size
    out = Path(args.out)
    size = images.shape[-1]
    plot_explanations(images, relevance_to_image(explained.relevance, (grid, grid), (size, size)), titles, correct,
                      out / f"{args.method}.png", boxes=boxes)
    figures = [f"{args.method}.png"]
    if explained.crops is not None:
        crop_pixels = normalise.pixels(explained.crops)
        crop_size = crop_pixels.shape[-1]
        plot_explanations(crop_pixels, relevance_to_image(explained.crop_relevance, (grid, grid), (crop_size,) * 2),
                          titles, correct, out / f"{args.method}-zoom.png")
        figures.append(f"{args.method}-zoom.png")
    summary = {"checkpoint": str(args.checkpoint), "method": args.method, "images_shown": len(images),
               "figures": figures}
    write_json(out / "summary.json", summary)
    print_summary(summary, out)
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    """Relevance maps for images or a data set, and with --evaluate the deletion/insertion check."""
    import torch

    from vitkit.data import ImageDataset, load_images
    from vitkit.explain import patch_relevance, relevance_to_image
    from vitkit.explain.evaluate import evaluate_explanations
    from vitkit.plots import plot_deletion_insertion, plot_explanations
    from vitkit.train import load_model, read_info, select_device
    from vitkit.train.checkpoint import write_json

    if read_info(args.checkpoint).get("task") == "boxes":
        return cmd_explain_boxes(args)
    require_vit(read_info(args.checkpoint), args.checkpoint, "`vitkit explain` reads a ViT's attention maps")
    device = select_device(args.device)
    if args.images:
        model, info = load_model(args.checkpoint, device)
        images = load_images(args.images, info["model"]["image_size"], info["model"]["in_channels"])
        data = ImageDataset(images, torch.full((len(images),), -1), info["classes"], "files")
    else:
        model, info, data = load_checkpoint_and_data(args, device)
    cfg = model.cfg
    normalise = Normaliser(info, device)

    def relevance(x: torch.Tensor, method: str) -> torch.Tensor:
        if method == "random":
            return torch.rand(x.shape[0], cfg.num_patches, device=device)
        return patch_relevance(model, x, method, **relevance_options(args, method))

    if not args.images:
        # Data sets are often stored class by class: a seeded random sample shows (and scores) every class.
        data = data.subset(torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed)))
    out = Path(args.out)
    shown = min(args.n, len(data))
    x = normalise(data.images[:shown])
    with torch.no_grad():
        probs = model(x).softmax(1)
    pred = probs.argmax(1).cpu()
    maps = relevance_to_image(relevance(x, args.method), (cfg.grid_size,) * 2, (cfg.image_size,) * 2)
    labels = data.labels[:shown]
    titles = [
        f"pred {info['classes'][p]} ({probs[i, p]:.0%})" + (f" / true {info['classes'][t]}" if t >= 0 else "")
        for i, (p, t) in enumerate(zip(pred.tolist(), labels.tolist()))
    ]
    plot_explanations(data.images[:shown], maps, titles, [t < 0 or p == t for p, t in zip(pred, labels)],
                      out / f"{args.method}.png")
    summary: dict[str, Any] = {"checkpoint": str(args.checkpoint), "method": args.method, "images_shown": shown}
    if args.evaluate:
        torch.manual_seed(args.seed)  # the random baseline's order
        n_eval = min(args.n_eval, len(data))

        def batches():
            for start in range(0, n_eval, args.batch_size):
                stop = min(start + args.batch_size, n_eval)
                labels = data.labels[start:stop].to(device) if not args.images else None
                yield normalise(data.images[start:stop]), labels

        figures, curves = evaluate_explanations(model, batches, relevance, steps=args.steps)
        summary.update(figures, images_evaluated=n_eval)
        plot_deletion_insertion(curves, out / "deletion_insertion.png")
    write_json(out / "summary.json", summary)
    print_summary(summary, out)
    return 0


def cmd_certify(args: argparse.Namespace) -> int:
    """Smoothed and certified accuracy against m×m patches; or, with --votes, the same report re-derived
    from a saved votes file without the model."""
    import time

    from vitkit import distributed
    from vitkit.plots import plot_certified_accuracy
    from vitkit.smoothing import (
        Ablation, SmoothedClassifier, Votes, certification_report, collect_votes, largest_certified_patch,
        parse_patch_sizes,
    )
    from vitkit.train import select_device
    from vitkit.train.checkpoint import write_json

    if (args.checkpoint is None) == (args.votes is None):
        raise VitkitError("pass a checkpoint to certify, or --votes FILE to re-derive a report (one of the two)")
    if args.votes and args.attack_n:
        raise VitkitError("--attack-n needs the model: pass the checkpoint instead of --votes")
    out = Path(args.out)
    sizes = parse_patch_sizes(args.patch_sizes)
    summary: dict[str, Any] = {}
    if args.votes:
        votes = Votes.load(args.votes)
    else:
        device = distributed.setup(select_device(args.device))
        model, info, data = load_checkpoint_and_data(args, device)
        trained = info.get("ablation") or {}
        ablation = Ablation(  # the flags are names and positive numbers: `or` falls back only where not given
            args.ablation or trained.get("kind", "column"),
            args.ablation_size or trained.get("size", 4),
            tuple(data.image_size),
            args.ablation_stride or trained.get("stride", 1),
        )
        check_patch_size(args.patch_size, ablation.image_size)  # before the votes: they take minutes
        if trained and (ablation.kind, ablation.size) != (trained["kind"], trained["size"]):
            print(f"note: the model was trained on {trained['kind']} ablations of width {trained['size']}, "
                  f"certifying with {ablation.kind} ablations of width {ablation.size}", file=sys.stderr)
        data = data.sample(args.n, args.seed)
        smoothed = SmoothedClassifier(
            model, ablation, mean=info["mean"], std=info["std"], rule=args.rule, threshold=args.threshold,
            drop_tokens=not args.no_token_dropping, max_batch=args.max_batch,
        )
        start = time.perf_counter()
        progress = not args.quiet and distributed.is_main()
        votes = collect_votes(smoothed, data, device, args.batch_size, progress=progress, bf16=args.bf16,
                              info={"checkpoint": str(args.checkpoint), "data": args.data or info["data"],
                                    "split": args.split, "bf16": args.bf16})
        seconds = time.perf_counter() - start
        if not distributed.is_main():  # rank 0 has every image's votes, and attacks and writes the report
            return 0
        summary.update(seconds=round(seconds, 2), images_per_second=len(data) / seconds, device=str(device),
                       bf16=args.bf16, processes=distributed.world()[1], token_dropping=smoothed.patch_size is not None)
        votes.save(out / "votes.safetensors")
    side = check_patch_size(args.patch_size, votes.ablation.image_size)
    sizes = sorted({m for m in sizes if m <= side} | {args.patch_size})  # larger patches cannot be placed
    report = certification_report(votes, sizes, args.patch_size, args.tie_rule)
    if args.attack_n and not args.votes:
        summary.update(_attack_smoothed(smoothed, data, votes, args, report["delta"], device))
    summary = {
        **{k: votes.info.get(k) for k in ("checkpoint", "data", "split", "rule", "threshold", "bf16")},
        "ablation": votes.ablation.kind, "ablation_size": votes.ablation.size, "ablation_stride": votes.ablation.stride,
        **report, **summary,
    }
    write_json(out / "summary.json", summary)
    _write_per_image(votes, largest_certified_patch(votes, side, args.tie_rule), out / "per_image.csv")
    per_size = [report[f"certified_accuracy_{m}x{m}"] for m in sizes]
    plot_certified_accuracy(sizes, per_size, report["smoothed_accuracy"], report["standard_accuracy"],
                            f"{votes.ablation.kind} ablation, b={votes.ablation.size}", out / "certified_accuracy.png")
    print(f"{'patch':>7s}  {'delta':>5s}  certified accuracy")
    for m, acc in zip(sizes, per_size):
        print(f"{m:>3d}x{m:<3d}  {votes.ablation.delta(m):>5d}  {acc:.4f}")
    print_summary({k: v for k, v in summary.items() if not re.fullmatch(r"certified_accuracy_\d+x\d+", k)}, out)
    return 0


def check_patch_size(m: int, image_size: tuple[int, int]) -> int:
    """The shorter image side, once the patch side m is known to fit in it."""
    side = min(image_size)
    if not 1 <= m <= side:
        raise VitkitError(f"--patch-size {m} does not fit {side}-pixel images: pass 1 to {side}")
    return side


def _attack_smoothed(smoothed, data, votes, args: argparse.Namespace, delta: int, device) -> dict[str, Any]:
    """Patch-attack the smoothed model on a sample: its empirical accuracy bounds the certified one from
    above, and no image certified at this size may fall to it."""
    import torch

    from vitkit.smoothing import certify, empirical_patch_robustness

    sample = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))[: args.attack_n]
    images = data.images[sample].to(device).float() / 255
    labels = data.labels[sample].to(device)
    robust = empirical_patch_robustness(smoothed, images, labels, args.patch_size, num_positions=args.attack_positions,
                                        steps=args.attack_steps, seed=args.seed).cpu()
    pred, certified = certify(votes.counts[sample], delta, args.tie_rule)
    certified_right = certified & (pred == votes.labels[sample])
    broken = int((certified_right & ~robust).sum())
    if broken:
        why = ("the votes were counted in bfloat16 and the attack scored in float32: near-ties may differ; certify "
               "without --bf16 to check" if args.bf16 else "please report this as a bug")
        print(f"warning: {broken} certified images fell to the patch attack: {why}", file=sys.stderr)
    m = args.patch_size
    return {
        "attacked_images": len(sample),
        f"empirical_accuracy_{m}x{m}": robust.float().mean().item(),
        f"certified_accuracy_{m}x{m}_on_attacked_images": certified_right.float().mean().item(),
        "certified_images_broken_by_attack": broken,
    }


def _write_per_image(votes, largest_certified, path: Path) -> None:
    """One row per image: true label, base and smoothed predictions, votes, the largest certified patch."""
    import csv

    counts = votes.counts
    pred = counts.argmax(1)
    top2 = counts.topk(min(2, counts.shape[1]), dim=1).values
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "label", "base_prediction", "smoothed_prediction", "votes_prediction", "votes_label",
                    "votes_runner_up", "largest_certified_patch"])
        for i in range(len(counts)):
            w.writerow([i, int(votes.labels[i]), int(votes.base_predictions[i]), int(pred[i]), int(top2[i, 0]),
                        int(counts[i, votes.labels[i]]), int(top2[i, -1]), int(largest_certified[i])])


GRADIENT_STEPS = ("pgd", "apgd", "auto", "patch")  # the attacks --steps and --random-start apply to
RESTARTS = ("pgd", "apgd", "auto")  # the attacks --restarts applies to
BLACK_BOX = ("square", "rays", "auto")  # the attacks that count --queries


def check_attack_options(args: argparse.Namespace) -> None:
    """Options that do not belong to the chosen --attack, each refused with the fix."""
    attack, patch = args.attack, args.attack == "patch"
    if patch and args.eps is not None:
        raise VitkitError("--eps is the budget of the ε attacks; a patch attack's is --patch-size: drop --eps")
    given = [flag for flag, value in (("--patch-size", args.patch_size), ("--positions", args.positions)) if value]
    if not patch and given:
        raise VitkitError(f"{' and '.join(given)} belong to --attack patch: drop them, or attack with patches")
    if args.step_size is not None and attack not in ("pgd", "patch"):
        own = {"fgsm": "FGSM takes one step of size ε", "apgd": "APGD sets its own step sizes (2ε, halved as it goes)",
               "auto": "APGD sets its own step sizes"}.get(attack, f"{attack} takes no gradient steps")
        raise VitkitError(f"{own}: drop --step-size, or use --attack pgd")
    if args.loss is not None and attack != "apgd":
        raise VitkitError("--loss chooses the loss of --attack apgd (auto runs both): drop it, or attack with apgd")
    if args.loss and len(set(args.loss)) < len(args.loss):
        raise VitkitError(f"--loss {','.join(args.loss)} names a loss twice: for more runs use --restarts")
    wrong = [flag for flag, given, applies in (("--steps", args.steps is not None, GRADIENT_STEPS),
                                               ("--restarts", args.restarts > 1, RESTARTS),
                                               ("--no-random-start", not args.random_start, GRADIENT_STEPS))
             if given and attack not in applies]
    if wrong:
        fix = "set their budget with --queries" if attack in BLACK_BOX else \
            "try more patch positions with --positions" if patch else "use --attack pgd for iterations"
        raise VitkitError(f"{' and '.join(wrong)} do not apply to --attack {attack}: drop them ({fix})")
    if args.queries is not None and attack not in BLACK_BOX:
        raise VitkitError(f"--queries is the budget of the black-box attacks (square, rays, auto): drop it, or "
                          f"attack with one of them instead of {attack}")
    if attack == "rays" and args.norm != "linf":
        raise VitkitError("RayS searches the ℓ∞ ball only: use --norm linf, or --attack square for ℓ2")
    if attack in ("square", "rays") and args.surrogate:
        raise VitkitError(f"{attack} queries the attacked model itself, it needs no surrogate: drop --surrogate "
                          "(a transfer attack crafts its examples on the surrogate: pgd, apgd, auto or fgsm)")


def cmd_attack(args: argparse.Namespace) -> int:
    """Clean and robust accuracy under a white-box (FGSM, PGD, Auto-PGD, patch), black-box (Square, RayS) or
    ensemble attack at each strength, or transferred from --surrogate; the accuracy curve and example images."""
    import time

    import torch

    from vitkit import distributed
    from vitkit.attacks import (PixelModel, Robustness, apgd, attack_outcomes, fgsm, load_pixel_model, patch_attack,
                                pgd, rays, square, worst_case)
    from vitkit.attacks.pgd import check_budget
    from vitkit.plots import plot_adversarial_examples, plot_robustness
    from vitkit.train import select_device
    from vitkit.train.checkpoint import write_json

    check_attack_options(args)
    patch = args.attack == "patch"
    steps = args.steps or (100 if args.attack in ("apgd", "auto") else 20)
    queries = args.queries or 5000
    strengths = (args.patch_size or [4]) if patch else (args.eps or [2 / 255, 4 / 255, 8 / 255])
    for eps in [] if patch else strengths:
        check_budget(eps, args.norm)
    positions = args.positions or 4
    device = distributed.setup(select_device(args.device))
    base, info, data = load_checkpoint_and_data(args, device)
    model = PixelModel(base, info["mean"], info["std"])
    if ("dlr" in (args.loss or []) or args.attack == "auto") and len(info["classes"]) < 3:
        raise VitkitError(f"the DLR loss needs at least 3 classes, {args.checkpoint} has {len(info['classes'])}: "
                          "use --attack apgd --loss ce")
    surrogate = None
    if args.surrogate:
        surrogate, surrogate_info = load_pixel_model(args.surrogate, device)
        if surrogate_info["classes"] != info["classes"]:
            raise VitkitError(f"the surrogate {args.surrogate} has other classes than {args.checkpoint}: "
                              "use a surrogate trained on the same data set")
    step = {} if args.step_size is None else {"step_size": args.step_size}  # else each attack's own default

    def apgd_with(loss: str):
        return lambda m, x, y, eps, g: apgd(m, x, y, eps, norm=args.norm, steps=steps, loss=loss,
                                            random_start=args.random_start, restarts=args.restarts, generator=g)

    def square_attack(m, x, y, eps, g):
        return square(m, x, y, eps, norm=args.norm, queries=queries, generator=g)

    # An image counts as robust only if it survives every attack of the list (AutoAttack's counting).
    ensemble = worst_case(*[apgd_with(loss) for loss in ("ce", "dlr")], square_attack) if args.attack == "auto" \
        else worst_case(*[apgd_with(loss) for loss in args.loss or ["ce"]])

    def attack(m: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, strength: float, g: torch.Generator):
        if patch:
            return patch_attack(m, x, y, strength, num_positions=positions, steps=steps,
                                random_start=args.random_start, generator=g, **step)[0]
        if args.attack == "fgsm":
            return fgsm(m, x, y, strength, norm=args.norm)
        if args.attack in ("apgd", "auto"):
            return ensemble(m, x, y, strength, g)
        if args.attack == "square":
            return square_attack(m, x, y, strength, g)
        if args.attack == "rays":
            return rays(m, x, y, strength, queries=queries)
        return pgd(m, x, y, strength, norm=args.norm, steps=steps, random_start=args.random_start,
                   restarts=args.restarts, generator=g, **step)

    def label(strength: float) -> str:
        return f"{strength}x{strength} patch" if patch else f"ε={strength:.4f} ({strength * 255:.3g}/255)"

    data = data.sample(args.n, args.seed)
    start = time.perf_counter()
    share = distributed.shard(len(data))  # under torchrun each process attacks its share; all of them otherwise
    outcomes = attack_outcomes(model, data.images[share], data.labels[share], attack, strengths,
                               surrogate=surrogate, batch_size=args.batch_size, seed=args.seed)
    outcomes = distributed.gather_cat(outcomes)
    seconds = time.perf_counter() - start
    if not distributed.is_main():  # rank 0 has every image's outcome and writes the report
        return 0
    result = Robustness.from_outcomes(strengths, outcomes)

    out = Path(args.out)
    kind = f"{args.attack} ({args.norm})" if not patch else "patch"
    access = {"square": "black-box, scores", "rays": "black-box, decisions", "auto": "white- and black-box"}
    title = f"{kind}, transferred from {Path(args.surrogate).name}" if args.surrogate \
        else f"{kind}, {access.get(args.attack, 'white-box')}"
    curve = dict(zip(strengths, result.robust_accuracy))
    curve.setdefault(0, result.clean_accuracy)  # the clean point, unless strength 0 was asked for anyway
    plot_robustness(sorted(curve), [curve[s] for s in sorted(curve)], out / "robustness.png",
                    xlabel="patch side m (pixels)" if patch else f"ε ({args.norm}, pixels in [0, 1])", title=title)
    # The examples are attacked with the same seed as in the evaluation, and an image's attack does not
    # depend on its batch: they are the very adversarial images scored above.
    shown = min(args.examples, len(data))
    if shown:
        x = data.images[:shown].to(device).float() / 255
        y = data.labels[:shown].to(device)
        adversarial = attack(surrogate or model, x, y, max(strengths), torch.Generator().manual_seed(args.seed))
        with torch.no_grad():
            p_clean, p_adv = model(x).softmax(1), model(adversarial).softmax(1)
        classes = info["classes"]
        titles = []
        for i, (c, a) in enumerate(zip(p_clean.argmax(1).tolist(), p_adv.argmax(1).tolist())):
            titles.append((f"{classes[c]} ({p_clean[i, c]:.0%})\ntrue {classes[y[i]]}",
                           f"perturbation\n{label(max(strengths))}", f"{classes[a]} ({p_adv[i, a]:.0%})\nadversarial"))
        plot_adversarial_examples(x, adversarial, titles, (p_adv.argmax(1) != y).tolist(), out / "examples.png")

    summary = {
        "checkpoint": str(args.checkpoint), "surrogate": args.surrogate, "data": args.data or info["data"],
        "split": args.split, "attack": args.attack, "norm": None if patch else args.norm,
        "steps": steps if args.attack in GRADIENT_STEPS else None, "step_size": args.step_size,
        "restarts": args.restarts if args.attack in RESTARTS else None,
        "loss": {"apgd": ",".join(args.loss or ["ce"]), "auto": "ce,dlr"}.get(args.attack),
        "queries": queries if args.attack in BLACK_BOX else None,
        "random_start": args.random_start if args.attack in GRADIENT_STEPS else None, "seed": args.seed,
        **result.summary("patch" if patch else "eps"), "seconds": round(seconds, 2), "device": str(device),
        "processes": distributed.world()[1],
    }
    write_json(out / "summary.json", summary)
    columns = [f"robust_patch_{s}" if patch else f"robust_eps_{s:.4f}" for s in strengths]
    write_attack_outcomes(out / "per_image.csv", data.labels, outcomes, columns)
    print(f"{'':>26s}  accuracy  success")
    print(f"{'clean':>26s}  {result.clean_accuracy:8.4f}")
    for s, robust, success in zip(strengths, result.robust_accuracy, result.success_rate):
        print(f"{label(s):>26s}  {robust:8.4f}  {success:7.4f}")
    print(f"{result.images} images, {title}; results in {out}/ (summary.json, per_image.csv, robustness.png"
          f"{', examples.png' if shown else ''})")
    return 0


def write_attack_outcomes(path: Path, labels, outcomes, columns: list[str]) -> None:
    """One row per attacked image: its place in the sample, label, and 1/0 for right on the clean image and
    right under the attack at each strength."""
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "label", "clean_right", *columns])
        for i, row in enumerate(outcomes.int().tolist()):
            w.writerow([i, int(labels[i]), *row])


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job on the embedded default: train on digits, evaluate on its test split, report."""
    from vitkit.train import build_config, train

    out = Path(args.out)
    cfg = build_config("digits", None, {"device": args.device, "seed": args.seed})
    summary = train(cfg, out, progress=not args.quiet)
    eval_args = argparse.Namespace(
        checkpoint=str(out / "best.safetensors"), data=None, data_root=None, split="test", device=args.device,
        batch_size=512, samples=32, out=str(out / "eval"),
    )
    cmd_eval(eval_args)
    print_summary(summary, out)
    return 0


def print_summary(summary: dict[str, Any], out: Path) -> None:
    width = max(len(k) for k in summary)
    for k, v in summary.items():
        print(f"  {k:{width}s}  {v:.4f}" if isinstance(v, float) else f"  {k:{width}s}  {v}")
    print(f"results in {out}/ (summary.json)")


# -- the parser ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitkit", description="Train, explain, attack and certify Vision Transformers.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, func: Callable, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--config", metavar="FILE", help="YAML or JSON file of options; flags override it")
        p.set_defaults(func=func)
        return p

    add_train_options(command("train", cmd_train, "train a ViT or a ResNet-18 (from scratch, a recipe, or resume a run)"))

    p = command("train-boxes", cmd_train_boxes,
                "train a class and a bounding-box head on a ViT or ResNet-18 (seed 001), or resume a run")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR where it stopped")
    p.add_argument("--out", default=None, help="run folder (default runs/<data>-boxes-<backbone>; -2, -3, ... appended "
                                               "while that holds a run)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    from dataclasses import fields

    from vitkit.train.boxes import BoxTrainConfig

    add_config_flags(p, list(fields(BoxTrainConfig)))

    p = command("eval", cmd_eval, "accuracy, per-class accuracy, confusion matrix and sample predictions "
                                  "(box checkpoints: accuracy, IoU figures and the boxes drawn)")
    p.add_argument("checkpoint", help="a .safetensors checkpoint or a run folder")
    p.add_argument("--data", help="data source (default: the one the model was trained on)")
    p.add_argument("--data-root", help="where CIFAR archives live")
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--batch-size", type=positive_int, default=512)
    p.add_argument("--samples", type=positive_int, default=32, help="images in the prediction grid")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="output folder (default: beside the checkpoint)")

    p = command("predict", cmd_predict, "top-k classes with probabilities for image files (box checkpoints: and "
                                        "each image's box)")
    p.add_argument("checkpoint", help="a .safetensors checkpoint or a run folder")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--top-k", type=positive_int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="also write the predictions to OUT/summary.json (box checkpoints: and the boxes "
                                 "drawn, OUT/boxes.png)")

    p = command("info", cmd_info, "parameters, MACs, tokens and activation memory of a preset or checkpoint")
    p.add_argument("target", nargs="?", help="a preset name or a checkpoint (none: list the presets)")
    p.add_argument("--presets", action="store_true", help="list the presets")
    p.add_argument("--image-size", type=positive_int)
    p.add_argument("--patch-size", type=positive_int)
    p.add_argument("--num-classes", type=count_or_all, help="classes of the head (0: none, a backbone)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="batch size for the memory estimate")
    p.add_argument("--out", help="also write the figures to OUT/summary.json")

    p = command("explain", cmd_explain, "attention-rollout maps, and a deletion/insertion check of their quality "
                                        "(box checkpoints: maps of the image with the box, and of the zoom's crop)")
    p.add_argument("checkpoint", help="a .safetensors checkpoint or a run folder")
    p.add_argument("images", nargs="*", help="image files (default: the first --n images of --data)")
    p.add_argument("--data", help="data source (default: the one the model was trained on)")
    p.add_argument("--data-root", help="where CIFAR archives live")
    p.add_argument("--split", default="test")
    p.add_argument("--n", type=positive_int, default=16, help="images in the figure")
    p.add_argument("--method", default="rollout", choices=["rollout", "grad_rollout", "attention"],
                   help="attention: one layer's raw attention (see --layer)")
    p.add_argument("--layer", type=int, default=-1, help="layer for --method attention (default: the last)")
    p.add_argument("--head-fusion", default="mean", choices=["mean", "max", "min"])
    p.add_argument("--discard-ratio", type=unit_fraction, default=0.0, help="share of lowest attentions zeroed per image")
    p.add_argument("--start-layer", type=int, default=0)
    p.add_argument("--residual", default="normalized", choices=["normalized", "seed"],
                   help="normalized: rows of A+I sum to 1 (Abnar & Zuidema); seed: seed 003's raw product")
    p.add_argument("--evaluate", action="store_true", help="deletion and insertion AUC against a random order")
    p.add_argument("--n-eval", type=positive_int, default=1000, help="images for --evaluate")
    p.add_argument("--steps", type=int_at_least(2), default=16, help="points on each deletion/insertion curve")
    p.add_argument("--batch-size", type=positive_int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/explain")

    p = command("certify", cmd_certify, "smoothed ViT: certified accuracy against adversarial patches of every size")
    p.add_argument("checkpoint", nargs="?", help="a .safetensors checkpoint or a run folder")
    p.add_argument("--votes", help="re-derive the report from a votes.safetensors written earlier (no model needed; "
                                   "only --patch-size, --patch-sizes, --tie-rule and --out apply)")
    p.add_argument("--ablation", choices=["column", "row", "block"],
                   help="ablation family (default: the one the model was trained on, else column)")
    p.add_argument("--ablation-size", type=positive_int, help="band width b (default: as trained, else 4)")
    p.add_argument("--ablation-stride", type=positive_int,
                   help="start positions every s pixels (default: as trained, else 1)")
    p.add_argument("--patch-size", type=positive_int, default=5, help="patch side m of the headline certified accuracy")
    p.add_argument("--patch-sizes", default="1-10", help="patch sides of the table and plot, e.g. 1-10 or 2,5,8")
    p.add_argument("--rule", default="top", choices=["top", "threshold"],
                   help="top: one vote per ablation (Salman et al.); threshold: every class with softmax ≥ θ (Levine & Feizi)")
    p.add_argument("--threshold", type=parse_number, default=0.2, help="θ of the threshold rule")
    p.add_argument("--tie-rule", default="salman", choices=["salman", "levine_feizi"],
                   help="salman: n_c > n_c' + 2Δ; levine_feizi: equality also certifies when c has the smaller index")
    p.add_argument("--no-token-dropping", action="store_true",
                   help="feed full-length masked images instead of dropping masked tokens (slower; for comparison; "
                        "a ResNet always sees whole masked images)")
    p.add_argument("--attack-n", type=count_or_all, default=0,
                   help="also patch-attack the smoothed model on N images (empirical accuracy, an upper bound)")
    p.add_argument("--attack-positions", type=positive_int, default=16, help="random patch positions tried per image")
    p.add_argument("--attack-steps", type=positive_int, default=20, help="PGD steps on the patch pixels per position")
    p.add_argument("--data", help="data source (default: the one the model was trained on)")
    p.add_argument("--data-root", help="where CIFAR archives live")
    p.add_argument("--split", default="test")
    p.add_argument("--n", "--num-images", dest="n", type=count_or_all, default=0,
                   help="certify a seeded random sample of N images (default: all; under torchrun write --num-images, "
                        "as torchrun reads --n as an abbreviation of its own options)")
    p.add_argument("--batch-size", type=positive_int, default=256, help="images per step")
    p.add_argument("--max-batch", type=positive_int, default=4096, help="ablated images per forward")
    p.add_argument("--bf16", action="store_true",
                   help="bfloat16 autocast on CUDA or the CPU (faster, on a CPU with native bfloat16 such as "
                        "AVX512-BF16 or AMX; votes of near-ties may differ)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--out", default="runs/certify")

    p = command("attack", cmd_attack, "clean and robust accuracy under white-box, black-box, transfer or patch attacks")
    p.add_argument("checkpoint", help="a .safetensors checkpoint or a run folder")
    p.add_argument("--attack", default="pgd", choices=["fgsm", "pgd", "apgd", "square", "rays", "auto", "patch"],
                   help="apgd: Auto-PGD (Croce & Hein 2020), no step size to tune; square: score-based black box "
                        "(Andriushchenko et al. 2020); rays: decision-based black box, ℓ∞ (Chen & Gu 2020); auto: "
                        "the worst case of APGD-CE, APGD-DLR and Square, AutoAttack's untargeted ensemble")
    p.add_argument("--norm", default="linf", choices=["linf", "l2"], help="budget norm of the ε attacks (rays: linf)")
    p.add_argument("--loss", type=list_of(apgd_loss),
                   help="apgd: ce (cross-entropy), dlr (difference of logits ratio, scale-free) or ce,dlr: both "
                        "in turn, an image counting as robust only if it survives both (default ce)")
    p.add_argument("--eps", type=list_of(parse_number),
                   help="budgets for pixels in [0, 1], e.g. 2/255,4/255,8/255 (all but patch; default: those three)")
    p.add_argument("--patch-size", type=list_of(positive_int), help="patch sides in pixels, e.g. 2,4 (patch; default 4)")
    p.add_argument("--positions", type=positive_int, help="random patch positions tried per image (patch; default 4)")
    p.add_argument("--steps", type=positive_int, help="gradient steps (pgd and patch: default 20; apgd, auto: 100)")
    p.add_argument("--queries", type=positive_int,
                   help="model outputs each image may cost (square, rays, and auto's Square; default 5000)")
    p.add_argument("--step-size", type=positive_number, help="step size (default pgd: 2.5·ε/steps; patch: 0.05)")
    p.add_argument("--restarts", type=positive_int, default=1,
                   help="runs from random starts; each image keeps its worst (pgd, apgd, auto)")
    p.add_argument("--random-start", action=argparse.BooleanOptionalAction, default=True,
                   help="start from a random point of the budget (pgd, apgd, auto, patch; default: on)")
    p.add_argument("--surrogate", help="craft the attack on this checkpoint and score it on CHECKPOINT (transfer)")
    p.add_argument("--n", "--num-images", dest="n", type=count_or_all, default=1000,
                   help="attack a seeded random sample of N images (0: all; under torchrun write --num-images)")
    p.add_argument("--examples", type=count_or_all, default=4, help="images in examples.png (0: no picture)")
    p.add_argument("--data", help="data source (default: the one the model was trained on)")
    p.add_argument("--data-root", help="where CIFAR archives live")
    p.add_argument("--split", default="test")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/attack")

    p = command("demo", cmd_demo, "train and evaluate on the embedded digits data (no download)")
    p.add_argument("--out", default=DEFAULT_DEMO_OUT)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The command line, with a --config file's options read as if written before the flags (which win). The
    file's values meet the same types, ranges and choices as flags; an error names the file and the key."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(parser, argv)
    if getattr(args, "config", None):
        values = read_config_file(args.config)
        sub = parser._subparsers._group_actions[0].choices[args.command]  # the chosen command's parser
        actions = _options_by_key(sub)
        unknown = sorted(set(values) - set(actions))
        if unknown:
            raise VitkitError(f"unknown option(s) {unknown} in {args.config}: see `vitkit {args.command} --help`")
        tokens = [token for key, value in values.items() for token in _as_flags(actions[key], key, value, args.config)]
        at = argv.index(args.command) + 1
        args = _parse(parser, argv[:at] + tokens + argv[at:])
    return args


def _options_by_key(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """A command's actions by the keys a config file may use: the dest and each long name (`n`, `num_images`)."""
    keys = {}
    for action in parser._actions:
        if action.dest in ("help", "config"):
            continue
        names = [o for o in action.option_strings if o.startswith("--")]
        if isinstance(action, argparse.BooleanOptionalAction):
            names = names[:1]  # not --no-x: `no_x: true` would read as x
        for key in [action.dest, *(o[2:].replace("-", "_") for o in names)]:
            keys[key] = action
    return keys


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    args, extras = parser.parse_known_args(argv)
    # An `images` list (nargs="*") is matched, empty, as soon as options follow the checkpoint: files written
    # after the options come back unrecognised and belong to it.
    if extras and isinstance(getattr(args, "images", None), list) and not any(e.startswith("-") for e in extras):
        args.images += extras
    elif extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    return args


def _as_flags(action: argparse.Action, key: str, value: Any, source: str) -> list[str]:
    """Command-line tokens that give a config file's `value` to `action`, once it is known to be valid."""
    if not action.option_strings:
        raise VitkitError(f"{key} in {source} is given on the command line, not in a config file (e.g. the checkpoint "
                          "after the command name)")
    if value is None:
        return []
    if action.nargs == 0:  # on/off flags: --x (store_true) or --x / --no-x (BooleanOptionalAction)
        if not isinstance(value, bool):
            raise VitkitError(f"{key} in {source} is an on/off option: write true or false, not {value!r}")
        if isinstance(action, argparse.BooleanOptionalAction):
            return [action.option_strings[0 if value else 1]]
        return [action.option_strings[0]] if value else []
    if isinstance(value, (list, tuple)):
        if not getattr(action.type, "takes_list", False):
            raise VitkitError(f"{key} in {source} takes one value, not a list: {value!r}")
        value = ",".join(str(v) for v in value)
    text = str(value)
    try:
        parsed = action.type(text) if action.type else text
    except (argparse.ArgumentTypeError, ValueError) as e:
        kind = {"int": "a whole number", "float": "a number"}.get(getattr(action.type, "__name__", ""), "valid")
        reason = e if isinstance(e, argparse.ArgumentTypeError) else f"{text!r} is not {kind}"
        raise VitkitError(f"{key} in {source}: {reason}") from None
    if action.choices is not None and parsed not in action.choices:
        raise VitkitError(f"{key} in {source} is {parsed!r}: choose one of {', '.join(map(str, action.choices))}")
    return [f"{action.option_strings[-1]}={text}"]


def _version() -> str:
    from vitkit import __version__

    return f"vitkit {__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parse_args(parser, argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 0
        from vitkit import distributed

        if distributed.launched() and args.command not in DISTRIBUTED_COMMANDS:
            raise VitkitError(f"`vitkit {args.command}` runs in one process: launch it without torchrun "
                              f"(torchrun runs {', '.join(DISTRIBUTED_COMMANDS)})")
        out = getattr(args, "out", None)
        if out and Path(out).exists() and not Path(out).is_dir():
            raise VitkitError(f"--out {out} is a file; the results go into a folder: pass a folder path")
        status = args.func(args)
        distributed.shutdown()  # not after an error: the other ranks may be inside a collective
        return status
    except VitkitError as e:
        print(f"vitkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nvitkit: interrupted; a training run continues with `vitkit train --resume RUN_DIR`", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
