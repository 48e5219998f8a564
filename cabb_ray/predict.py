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

from cabb_ray.errors import CabbRayError, run_cli
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
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

    from cabb_ray.data.panoptic_format import id2rgb, read_rgb
    from cabb_ray.model.checkpoint import model_from_checkpoint
    from cabb_ray.structures.classes import ClassMapping
    from cabb_ray.training.engine import predict_image

    files = _images(args.images)
    wanted, ids_by_file = None, {}
    if args.categories:
        try:
            dataset = json.loads(args.categories.read_text())
            wanted = dataset["categories"]
        except (OSError, ValueError, KeyError):
            raise CabbRayError(
                f"{args.categories}: expected a dataset JSON with 'categories'"
            ) from None
        # the dataset's own image ids, so that cabb_ray.evaluate matches predictions to it
        ids_by_file = {Path(i["file_name"]).name: i["id"] for i in dataset.get("images", [])}
    model, cfg, categories = model_from_checkpoint(args.checkpoint, wanted)
    device = torch.device(args.device)
    model.to(device).eval()
    classes = ClassMapping.from_categories(categories)
    colors = category_colors(categories)
    (args.out / "panoptic").mkdir(parents=True, exist_ok=True)
    (args.out / "overlays").mkdir(parents=True, exist_ok=True)
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
    (args.out / "predictions.json").write_text(json.dumps(result))
    print(f"wrote {len(files)} predictions to {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    run_cli(main)
