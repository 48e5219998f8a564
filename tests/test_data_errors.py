"""Bad datasets and arguments fail with one line naming the file or key, and exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cabb_ray.data.__main__ import main
from cabb_ray.errors import run_cli

REPO = Path(__file__).resolve().parents[1]


def _run(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    err = capsys.readouterr().err.strip()
    return exit_info.value.code, err


def test_missing_folder(tmp_path, capsys):
    code, err = _run(["index", "--root", str(tmp_path / "absent")], capsys)
    assert code == 2
    assert err == f"error: {tmp_path / 'absent'}: dataset folder not found"


def test_json_without_required_key(synthetic_copy, capsys):
    path = synthetic_copy / "train.json"
    data = json.loads(path.read_text())
    del data["annotations"][1]["segments_info"]
    path.write_text(json.dumps(data))
    code, err = _run(["index", "--root", str(synthetic_copy), "--split", "train"], capsys)
    assert code == 2
    assert err == f"error: {path}: annotations[1] lacks required key 'segments_info'"


def test_png_id_missing_from_json(synthetic_copy, capsys):
    path = synthetic_copy / "train.json"
    data = json.loads(path.read_text())
    removed = data["annotations"][0]["segments_info"].pop()
    path.write_text(json.dumps(data))
    code, err = _run(["index", "--root", str(synthetic_copy), "--split", "train"], capsys)
    png = synthetic_copy / "train" / data["annotations"][0]["file_name"]
    assert code == 2
    assert err.startswith(f"error: {png}: segment id {removed['id']} in the PNG is missing")
    assert "\n" not in err


def test_unknown_category_and_invalid_json(synthetic_copy, capsys):
    path = synthetic_copy / "val.json"
    data = json.loads(path.read_text())
    data["annotations"][0]["segments_info"][0]["category_id"] = 99
    path.write_text(json.dumps(data))
    code, err = _run(["index", "--root", str(synthetic_copy), "--split", "val"], capsys)
    assert code == 2 and "category_id 99 not listed in categories" in err
    path.write_text("{not json")
    code, err = _run(["index", "--root", str(synthetic_copy), "--split", "val"], capsys)
    assert code == 2 and err == f"error: {path}: invalid JSON at line 1"


def test_png_size_mismatch(synthetic_copy, capsys):
    path = synthetic_copy / "val.json"
    data = json.loads(path.read_text())
    data["images"][0]["width"] += 1
    path.write_text(json.dumps(data))
    code, err = _run(["index", "--root", str(synthetic_copy), "--split", "val"], capsys)
    assert code == 2 and "differs from the JSON's" in err


def test_existing_index_survives_a_failed_rebuild(synthetic_copy, capsys):
    index = synthetic_copy / "train.segments.parquet"
    before = index.read_bytes()
    path = synthetic_copy / "train.json"
    data = json.loads(path.read_text())
    data["annotations"][0]["segments_info"].pop()
    path.write_text(json.dumps(data))
    code, _ = _run(["index", "--root", str(synthetic_copy), "--split", "train"], capsys)
    assert code == 2
    assert index.read_bytes() == before


def test_module_entry_point_prints_one_line(tmp_path):
    """The real ``python -m`` path: one stderr line, exit code 2, no traceback."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "cabb_ray.data", "stats", "--root", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'none' / 'train.segments.parquet'}: segment index not found; "
        f"build it with `python -m cabb_ray.data index --root {tmp_path / 'none'} --split train`"
    ]


def test_bad_numbers_are_rejected_by_argparse(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["synth", "--out", str(tmp_path), "--height", "0"])
    assert exit_info.value.code == 2
    assert "expected a positive integer, got 0" in capsys.readouterr().err


def test_a_relative_data_root_resolves_to_an_absolute_path(synthetic_root, monkeypatch):
    """Tune trials and Ray workers run in other working directories: the root they get must
    not depend on the directory the command was started in."""
    from cabb_ray.config import load_config
    from cabb_ray.data.resolve import resolve_dataset_root

    monkeypatch.chdir(synthetic_root.parent)
    cfg = load_config("cpu_quickstart", [f"data.root={synthetic_root.name}"])
    root = resolve_dataset_root(cfg.data)
    assert root.is_absolute() and root == synthetic_root.resolve()


def _corrupt(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _set(key, value):
    def edit(data):
        *parents, last = key
        node = data
        for k in parents:
            node = node[k]
        node[last] = value

    return edit


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (("images",), 5, "'images' must be a list, got 5"),
        (("categories",), {"id": 1}, "'categories' must be a list, got dict"),
        (("images", 0), "x", "images[0] must be an object, got str"),
        (("images", 0, "height"), True, "images[0].height: expected a positive integer, got true"),
        (("images", 0, "width"), "256", 'images[0].width: expected a positive integer, got "256"'),
        (("images", 0, "id"), [1], "images[0].id: expected a string or an integer, got list"),
        (("categories", 0, "id"), "road", 'categories[0].id: expected an integer, got "road"'),
        (("categories", 0, "isthing"), 2, "categories[0].isthing: expected 0 or 1, got 2"),
        (
            ("annotations", 0, "segments_info"),
            3,
            "annotations[0].segments_info must be a list, got 3",
        ),
        (
            ("annotations", 0, "segments_info", 0, "category_id"),
            "car",
            'annotations[0].segments_info[0].category_id: expected an integer, got "car"',
        ),
        (
            ("annotations", 0, "segments_info", 0, "area"),
            -4,
            "annotations[0].segments_info[0].area: expected an integer >= 0, got -4",
        ),
        (
            ("annotations", 0, "segments_info", 0, "bbox"),
            [1, 2, 3],
            "annotations[0].segments_info[0].bbox: expected [x, y, width, height], got list",
        ),
    ],
)
def test_values_of_the_wrong_kind_are_one_line(synthetic_copy, capsys, key, value, message):
    """Each was a traceback (TypeError, ValueError) in the index build or a loader worker."""
    path = synthetic_copy / "val.json"
    _corrupt(path, _set(key, value))
    code, err = _run(["index", "--root", str(synthetic_copy), "--split", "val"], capsys)
    assert code == 2 and err == f"error: {path}: {message}"


def test_whole_numbers_written_as_floats_still_load(synthetic_copy):
    from cabb_ray.data.panoptic_format import load_split

    path = synthetic_copy / "val.json"
    _corrupt(path, _set(("annotations", 0, "segments_info", 0, "area"), 12.0))
    _corrupt(path, _set(("images", 0, "height"), 128.0))
    assert load_split(synthetic_copy, "val").images[0]["height"] == 128.0


def test_a_json_file_that_is_not_utf8_is_one_line(synthetic_copy, capsys):
    path = synthetic_copy / "train.json"
    path.write_bytes(b'{"images": "caf\xe9"}')
    code, err = _run(["index", "--root", str(synthetic_copy), "--split", "train"], capsys)
    assert code == 2
    assert err == (
        f"error: {path}: not UTF-8 text (byte 0xe9 at offset 15); expected a COCO-panoptic "
        "JSON file"
    )


@pytest.mark.parametrize("content", [b"", b"PAR1", b"not parquet at all, just bytes"])
def test_a_corrupt_index_is_one_line(synthetic_copy, capsys, content):
    index = synthetic_copy / "train.segments.parquet"
    index.write_bytes(content)
    code, err = _run(["stats", "--root", str(synthetic_copy), "--split", "train"], capsys)
    assert code == 2 and "\n" not in err
    assert err.startswith(f"error: {index}: cannot read the segment index (")
    assert err.endswith(
        f"rebuild it with `python -m cabb_ray.data index --root {synthetic_copy} --split train`"
    )


def test_a_corrupt_index_fails_before_a_run_is_recorded(synthetic_copy):
    """``data.root`` is read whole in the driver (train, tune, pretrain), not in the workers."""
    from cabb_ray.config import load_config
    from cabb_ray.data.resolve import resolve_dataset_root
    from cabb_ray.errors import CabbRayError

    (synthetic_copy / "val.segments.parquet").write_bytes(b"garbage")
    cfg = load_config("cpu_quickstart", [f"data.root={synthetic_copy}"])
    with pytest.raises(CabbRayError, match=r"val\.segments\.parquet: cannot read the segment"):
        resolve_dataset_root(cfg.data)
    _corrupt(synthetic_copy / "train.json", _set(("images",), 5))
    with pytest.raises(CabbRayError, match=r"train\.json: 'images' must be a list, got 5"):
        resolve_dataset_root(cfg.data)


def test_an_index_build_that_fails_while_writing_keeps_the_old_index(synthetic_copy, monkeypatch):
    """The index is written beside its place and renamed over the old one: a build that dies
    in the middle of writing leaves the previous index whole, and no temporary file."""
    import pyarrow.parquet as pq

    from cabb_ray.data import index as index_module

    path = synthetic_copy / "train.segments.parquet"
    before = path.read_bytes()
    real_write = pq.write_table

    def half_then_fail(table, where, **kwargs):
        real_write(table.slice(0, 3), where, **kwargs)
        with open(where, "r+b") as f:
            f.truncate(100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(index_module.pq, "write_table", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        index_module.build_segment_index(synthetic_copy, "train", verify=False)
    assert path.read_bytes() == before
    assert index_module.read_segment_index(synthetic_copy, "train").num_rows > 3
    assert sorted(p.name for p in synthetic_copy.iterdir() if p.name.startswith(".")) == []
