"""Import Cityscapes gtFine into cabb_ray's COCO-panoptic layout.

The conversion itself is cityscapesscripts' ``convert2panoptic`` with train ids, the same code
the official panoptic evaluation expects; this module only checks the input first (that
function exits the interpreter on a missing folder), moves its outputs into our layout, links
or copies the leftImg8bit images and builds the segment index, all in a temporary folder that
replaces the previous output only once complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from cityscapesscripts.preparation.createPanopticImgs import convert2panoptic

from cabb_ray.data.index import build_segment_index, index_path
from cabb_ray.data.panoptic_format import (
    images_dir,
    panoptic_dir,
    split_json_path,
    write_split_json,
)
from cabb_ray.errors import CabbRayError

INSTANCE_SUFFIX = "_gtFine_instanceIds.png"
IMAGE_SUFFIX = "_leftImg8bit.png"
_rename = os.rename  # the swap's one step (a test makes it fail halfway)


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
    """Convert the given splits; returns the written ``<split>.json`` paths.

    Everything is built in a temporary folder beside ``out`` and moved into ``out`` only
    when every split converted and indexed: a failed or interrupted import leaves the
    previous output as it was."""
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

    if out.exists() and not out.is_dir():
        raise CabbRayError(f"--out {out}: exists and is not a folder")
    beside = out.resolve()  # the build folder's place: the entries move into out by rename
    try:
        beside.parent.mkdir(parents=True, exist_ok=True)
        build = Path(tempfile.mkdtemp(prefix=f".{beside.name}.import-", dir=beside.parent))
    except OSError as err:
        raise CabbRayError(
            f"--out {out}: cannot write in {beside.parent} ({err.strerror})"
        ) from None
    try:
        for split, files in found.items():
            _convert_split(root, gt_fine, build, split, files, copy)
        out.mkdir(exist_ok=True)
        _swap_in(build, out, list(found))
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return [split_json_path(out, split) for split in found]


def _convert_split(
    root: Path, gt_fine: Path, build: Path, split: str, files: dict[str, Path], copy: bool
) -> None:
    """Convert one split into the (new, empty) folder ``build`` in our layout, with its index."""
    work = build / ".convert"
    work.mkdir()
    convert2panoptic(str(gt_fine), str(work), useTrainId=True, setNames=[split])
    print()
    base = f"cityscapes_panoptic_{split}_trainId"
    converted = json.loads((work / f"{base}.json").read_text())
    shutil.move(str(work / base), str(panoptic_dir(build, split)))
    image_target = images_dir(build, split)
    image_target.mkdir(parents=True, exist_ok=True)
    for entry in converted["images"]:
        # convert2panoptic names images '<id>_gtFine_leftImg8bit.png'; the real file
        # has no '_gtFine'.
        entry["file_name"] = f"{entry['id']}{IMAGE_SUFFIX}"
        city = files[entry["id"]].parent.name
        source = (root / "leftImg8bit" / split / city / entry["file_name"]).resolve()
        dest = image_target / entry["file_name"]
        if copy:
            shutil.copy2(source, dest)
        else:
            dest.symlink_to(source)
    write_split_json(
        build, split, converted["images"], converted["annotations"], converted["categories"]
    )
    build_segment_index(build, split, verify=True)
    shutil.rmtree(work)


def _entries(folder: Path, split: str) -> list[Path]:
    """What an import writes for one split, in the order it is moved into place (the JSON
    that readers look for first comes last)."""
    return [
        images_dir(folder, split),
        panoptic_dir(folder, split),
        index_path(folder, split),
        split_json_path(folder, split),
    ]


def _swap_in(build: Path, out: Path, splits: list[str]) -> None:
    """Move the built entries into ``out``, each replacing its old version by one rename.
    The old versions wait in ``build`` until every new one is in place, and go back if a
    rename fails; files of ``out`` that the import does not write are left alone."""
    old = build / ".old"
    old.mkdir()
    moved: list[tuple[Path, Path | None]] = []
    try:
        for split in splits:
            for new, target in zip(_entries(build, split), _entries(out, split), strict=True):
                target.parent.mkdir(parents=True, exist_ok=True)
                kept = None
                if target.exists() or target.is_symlink():
                    kept = old / str(len(moved))
                    _rename(target, kept)
                moved.append((target, kept))
                _rename(new, target)
    except BaseException:
        for target, kept in reversed(moved):
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target, ignore_errors=True)
            elif target.exists() or target.is_symlink():
                target.unlink()
            if kept is not None:
                _rename(kept, target)
        raise
