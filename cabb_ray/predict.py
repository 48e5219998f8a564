"""``python -m cabb_ray.predict``: panoptic predictions for a folder of images.

    python -m cabb_ray.predict --checkpoint best.pt --images DIR --out DIR [--categories val.json]

Writes ``panoptic/<name>.png`` (ids = R + 256 G + 256^2 B), ``predictions.json`` (COCO-panoptic
annotations with per-segment scores, ready for ``python -m cabb_ray.evaluate``) and
``overlays/<name>.jpg`` (Cityscapes colours over the image, segment borders in white) for people
to look at. ``--categories`` (a dataset JSON) makes sure the checkpoint knows the same classes.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from cabb_ray.errors import ArgumentParser, CabbRayError, run_cli
from cabb_ray.progress import progress_printer
from cabb_ray.viz import category_colors, overlay

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise CabbRayError(f"{folder}: images folder not found")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CabbRayError(f"{folder}: no .png/.jpg images found")
    return files


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise CabbRayError(f"--device {text!r}: expected cpu, cuda or cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise CabbRayError(f"--device {text}: no CUDA device is visible")
        if device.index is not None and device.index >= count:
            raise CabbRayError(f"--device {text}: only {count} CUDA device(s) visible")
    return device


def _dataset_classes(path: Path) -> tuple[list[dict], dict[str, object]]:
    """``--categories``: the dataset JSON's categories, and its image ids by file name."""
    from cabb_ray.data.panoptic_format import check_categories, check_images

    try:
        dataset = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CabbRayError(f"--categories {path}: file not found") from None
    except (OSError, ValueError):  # a folder, unreadable, not UTF-8, not JSON
        raise CabbRayError(f"{path}: expected a dataset JSON with 'categories'") from None
    categories = check_categories(dataset, path)
    images = check_images(dataset, path) if isinstance(dataset.get("images"), list) else []
    # the dataset's own image ids, so that cabb_ray.evaluate matches predictions to it
    return categories, {Path(i["file_name"]).name: i["id"] for i in images}


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m cabb_ray.predict",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--images", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--categories", type=Path, help="dataset JSON whose classes must match")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    # every argument is checked before the network loads and before anything is written
    device = _device(args.device)
    files = _images(args.images)
    if args.out.exists() and not args.out.is_dir():
        raise CabbRayError(f"--out {args.out}: exists and is not a folder")
    wanted, ids_by_file = _dataset_classes(args.categories) if args.categories else (None, {})

    from cabb_ray.data.panoptic_format import id2rgb, read_rgb
    from cabb_ray.model.checkpoint import model_from_checkpoint
    from cabb_ray.structures.classes import ClassMapping
    from cabb_ray.training.engine import predict_image

    model, cfg, categories = model_from_checkpoint(args.checkpoint, wanted)
    model.to(device).eval()
    classes = ClassMapping.from_categories(categories)
    colors = category_colors(categories)
    try:
        (args.out / "panoptic").mkdir(parents=True, exist_ok=True)
        (args.out / "overlays").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CabbRayError(f"--out {args.out}: cannot create it ({err.strerror})") from None
    annotations, images = [], []
    start = time.perf_counter()
    report = progress_printer("predicted images", steps=len(files))
    for n, path in enumerate(files, start=1):
        rgb = read_rgb(path)
        prediction = predict_image(model, rgb, cfg, classes, device)
        png = f"{path.stem}.png"
        Image.fromarray(id2rgb(prediction.ids)).save(args.out / "panoptic" / png)
        Image.fromarray(overlay(rgb, prediction.ids, prediction.segments, colors)).save(
            args.out / "overlays" / f"{path.stem}.jpg", quality=90
        )
        image_id = ids_by_file.get(path.name, path.stem)
        images.append(
            {"id": image_id, "file_name": path.name, "height": rgb.shape[0], "width": rgb.shape[1]}
        )
        annotations.append(
            {"image_id": image_id, "file_name": png, "segments_info": prediction.segments}
        )
        report(n, len(files))
    result = {"images": images, "annotations": annotations, "categories": categories}
    target = args.out / "predictions.json"
    tmp = target.with_name(f".{target.name}.tmp")  # written whole, then renamed over the old
    tmp.write_text(json.dumps(result))
    tmp.replace(target)
    print(f"wrote {len(files)} predictions to {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    run_cli(main)
