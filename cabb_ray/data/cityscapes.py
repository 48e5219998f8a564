"""Import Cityscapes gtFine into cabb_ray's COCO-panoptic layout.

The conversion itself is cityscapesscripts' ``convert2panoptic`` with train ids, the same code
the official panoptic evaluation expects; this module only checks the input first (that
function exits the interpreter on a missing folder), moves its outputs into our layout, links
or copies the leftImg8bit images and builds the segment index.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from cityscapesscripts.preparation.createPanopticImgs import convert2panoptic

from cabb_ray.data.index import build_segment_index
from cabb_ray.data.panoptic_format import images_dir, panoptic_dir, write_split_json
from cabb_ray.errors import CabbRayError

INSTANCE_SUFFIX = "_gtFine_instanceIds.png"
IMAGE_SUFFIX = "_leftImg8bit.png"


def _annotation_files(gt_fine: Path, split: str) -> dict[str, Path]:
    """Image id (city_seq_frame) to instanceIds PNG, for one split."""
    files = sorted((gt_fine / split).glob(f"*/*{INSTANCE_SUFFIX}"))
    return {f.name[: -len(INSTANCE_SUFFIX)]: f for f in files}


def import_cityscapes(
    cityscapes_root: str | Path,
    out: str | Path,
    splits: tuple[str, ...] = ("train", "val"),
    copy: bool = False,
) -> list[Path]:
    """Convert the given splits; returns the written ``<split>.json`` paths."""
    root, out = Path(cityscapes_root), Path(out)
    gt_fine = root / "gtFine"
    if not gt_fine.is_dir():
        raise CabbRayError(f"{gt_fine}: folder not found (expected ROOT/gtFine/<split>/<city>/)")
    found = {split: _annotation_files(gt_fine, split) for split in splits}
    for split, files in found.items():
        if not files:
            raise CabbRayError(f"{gt_fine / split}: no *{INSTANCE_SUFFIX} files found")
    for split, files in found.items():
        for image_id, ann in files.items():
            image = root / "leftImg8bit" / split / ann.parent.name / f"{image_id}{IMAGE_SUFFIX}"
            if not image.is_file():
                raise CabbRayError(f"{image}: image for {ann.name} not found")

    out.mkdir(parents=True, exist_ok=True)
    work = out / ".convert"
    work.mkdir(exist_ok=True)
    written = []
    for split, files in found.items():
        convert2panoptic(str(gt_fine), str(work), useTrainId=True, setNames=[split])
        print()
        base = f"cityscapes_panoptic_{split}_trainId"
        converted = json.loads((work / f"{base}.json").read_text())
        target = panoptic_dir(out, split)
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(work / base), str(target))
        image_target = images_dir(out, split)
        image_target.mkdir(parents=True, exist_ok=True)
        for entry in converted["images"]:
            # convert2panoptic names images '<id>_gtFine_leftImg8bit.png'; the real file
            # has no '_gtFine'.
            entry["file_name"] = f"{entry['id']}{IMAGE_SUFFIX}"
            city = files[entry["id"]].parent.name
            source = (root / "leftImg8bit" / split / city / entry["file_name"]).resolve()
            dest = image_target / entry["file_name"]
            if dest.exists() or dest.is_symlink():
                dest.unlink()
            if copy:
                shutil.copy2(source, dest)
            else:
                dest.symlink_to(source)
        path = write_split_json(
            out, split, converted["images"], converted["annotations"], converted["categories"]
        )
        build_segment_index(out, split, verify=True)
        written.append(path)
    shutil.rmtree(work)
    return written
