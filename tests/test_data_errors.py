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
