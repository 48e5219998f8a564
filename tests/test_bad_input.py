"""A catalogue of bad inputs over every command line: each gives exit status 2, one ``error:``
line on stderr that names the file, key or value (no traceback), and writes nothing.

Each command runs in a subprocess, the way a user runs it. Torch and Ray make one start-up
cost seconds, so the cases of one command share one process: a small runner executes the
module as ``python -m`` does (``runpy``, as ``__main__``) once per case, each in a fresh
folder, with stdout and stderr redirected at the file-descriptor level (so that whatever a
library prints counts too). One case per slow command also runs as a real ``python -m``.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

RUNNER = r"""
import json, os, runpy, signal, sys, traceback, warnings

def too_long(signum, frame):  # a case that got past validation is running for real
    raise TimeoutError("still running after 120 s: the input was not refused")

signal.signal(signal.SIGALRM, too_long)
warnings.filterwarnings("ignore", category=RuntimeWarning, module="runpy")
cases_file, codes_file = sys.argv[1:3]
cases = json.loads(open(cases_file).read())
codes = []
for case in cases:
    os.chdir(case["cwd"])
    os.environ.update(case["env"])
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(case["stdout"], "w") as out, open(case["stderr"], "w") as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.argv = [case["module"], *case["argv"]]
        signal.alarm(120)
        try:
            runpy.run_module(case["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exit:  # what the interpreter does with it
            code = exit.code
            if code is None:
                code = 0
            elif not isinstance(code, int):
                print(code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        signal.alarm(0)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
    codes.append(code)
open(codes_file, "w").write(json.dumps(codes))
"""

NOT_UTF8 = b"optim:\n  lr: caf\xe9\n"  # Latin-1, as an editor on another system may save it


def _space(**changes) -> str:
    """A valid space file (what fails is what ``changes`` put in)."""
    data = {
        "base": "cpu_quickstart",
        "num_samples": 2,
        "resources": {"workers": 1, "cpus_per_worker": 1},
        "space": {"optim.lr": {"loguniform": [0.001, 0.1]}},
    }
    data.update(changes)
    return yaml.safe_dump(data, sort_keys=False)


def _dataset(**changes) -> str:
    """A structurally valid one-image dataset JSON with ``changes`` at the top level, or at
    ``segment`` (the one segment's keys)."""
    segment = {"id": 1, "category_id": 1, "iscrowd": 0, "area": 16, "bbox": [0, 0, 4, 4]}
    segment.update(changes.pop("segment", {}))
    data = {
        "images": [{"id": 1, "file_name": "a.jpg", "height": 4, "width": 4}],
        "annotations": [{"image_id": 1, "file_name": "a.png", "segments_info": [segment]}],
        "categories": [{"id": 1, "name": "road", "isthing": 0}],
    }
    data.update(changes)
    return json.dumps(data)


def _evaluate(gt_json: str, gt_folder: str, pred_json: str, pred_folder: str, *extra: str):
    return [
        *("--gt-json", gt_json, "--gt-folder", gt_folder),
        *("--pred-json", pred_json, "--pred-folder", pred_folder, *extra),
    ]


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Case:
    argv: list[str]
    expect: list[str]  # substrings of the one error line (the file, key or value named)
    files: dict[str, str | bytes] = field(default_factory=dict)  # written into the cwd first
    argparse: bool = False  # argparse's own error, one line: 'prog: error: ... (see --help)'
    xfail: str | None = None  # the reason, while a fix outside this test is pending


# a dataset JSON under ds/ with a split name: index, stats and data.root read it
CORRUPT_INDEX = {
    "ds/train.json": _dataset(),
    "ds/val.json": _dataset(),
    "ds/train.segments.parquet": b"PAR1 not really parquet",
    "ds/val.segments.parquet": b"",
}
IMAGES = {"imgs/a.png": _png()}
TUNE_OK = {"space.yaml": _space()}

CASES: dict[str, list[Case]] = {
    "cabb_ray.data": [
        Case(["index", "--root", "absent"], ["absent: dataset folder not found"]),
        Case(
            ["index", "--root", "ds", "--split", "train"],
            ["ds/train.json: 'images' must be a list, got 5"],
            {"ds/train.json": _dataset(images=5)},
        ),
        Case(
            ["index", "--root", "ds", "--split", "train"],
            ["ds/train.json", 'segments_info[0].category_id: expected an integer, got "car"'],
            {"ds/train.json": _dataset(segment={"category_id": "car"})},
        ),
        Case(
            ["index", "--root", "ds", "--split", "train"],
            ["ds/train.json: not UTF-8 text"],
            {"ds/train.json": NOT_UTF8},
        ),
        Case(
            ["stats", "--root", "ds", "--split", "train"],
            ["ds/train.segments.parquet: cannot read the segment index"],
            CORRUPT_INDEX,
        ),
        Case(
            ["synth", "--out", "taken"],
            ["--out taken: exists and is not a folder"],
            {"taken": "a file"},
        ),
        Case(
            ["preview", "--root", "ds", "--sampler", "isus", "--out", "p", "--config", "b.yaml"],
            ["b.yaml: invalid YAML at line 3"],
            {"b.yaml": "optim:\n  lr: [1,\n"},
        ),
        Case(
            ["levels", "--root", "ds", "--set", "optim.momentum=-5"],
            ["optim.momentum: expected 0 <= m < 1, got -5"],
        ),
        Case(
            ["cityscapes", "--cityscapes-root", "nowhere", "--out", "cs"],
            ["nowhere/gtFine: folder not found"],
        ),
        Case(["synth", "--out", "s", "--height", "0"], ["--height", "got 0"], argparse=True),
    ],
    "cabb_ray.train": [
        Case(["--config", "b.yaml"], ["b.yaml: invalid YAML at line 2"], {"b.yaml": "a: [\n"}),
        Case(["--config", "l1.yaml"], ["l1.yaml: not UTF-8 text"], {"l1.yaml": NOT_UTF8}),
        Case(["--config", "missing.yaml"], ["missing.yaml: file not found"]),
        Case(["--set", "optim.lrr=1"], ["optim.lrr", "closest valid keys: optim.lr"]),
        Case(["--set", "optim.lr=.inf"], ["--set optim.lr: got inf, expected a finite number"]),
        Case(["--set", "optim.weight_decay=.nan"], ["optim.weight_decay: got nan"]),
        Case(["--set", "optim.momentum=-5"], ["optim.momentum: expected 0 <= m < 1"]),
        Case(["--set", "optim.grad_clip_norm=-1"], ["optim.grad_clip_norm", "got -1.0"]),
        Case(["--set", "optim.grad_clip_norm=0"], ["optim.grad_clip_norm", "null for no"]),
        Case(["--set", "model.canonical_scale=.nan"], ["model.canonical_scale: got nan"]),
        Case(["--set", "loss.rpn_beta=.inf"], ["loss.rpn_beta: got inf"]),
        Case(["--set", "data.loader_workers=-1"], ["data.loader_workers: expected >= 0"]),
        Case(["--set", "eval.max_images=-3"], ["eval.max_images: expected >= 0, got -3"]),
        Case(["--set", "data.r_th=[0.25, .inf]"], ["--set data.r_th[1]: got inf"]),
        Case(["--name", "a'b"], ['--name "a\'b"']),
        Case(["--resume", "none.pt"], ["--resume none.pt: no checkpoint.pt there"]),
        Case(
            ["--set", "data.root=ds"],
            ["ds/train.segments.parquet: cannot read the segment index"],
            CORRUPT_INDEX,
        ),
        Case(["--workers", "two"], ["--workers", "'two'"], argparse=True),
    ],
    "cabb_ray.tune": [
        Case(["--space", "missing.yaml"], ["missing.yaml: file not found"]),
        Case(["--space", "b.yaml"], ["b.yaml: invalid YAML at line"], {"b.yaml": "space: [\n"}),
        Case(["--space", "l1.yaml"], ["l1.yaml: not UTF-8 text"], {"l1.yaml": NOT_UTF8}),
        Case(
            ["--space", "nan.yaml"],
            ["nan.yaml: space.optim.lr.uniform: expected a finite number, got nan"],
            {"nan.yaml": _space(space={"optim.lr": {"uniform": [1e-3, float("nan")]}})},
        ),
        Case(
            ["--space", "s.yaml"],
            ["s.yaml: unknown key 'schedular' (closest valid: scheduler)"],
            {"s.yaml": _space(schedular={"type": "asha"})},
        ),
        Case(["--space", "space.yaml", "--set", "optim.lr=.inf"], ["optim.lr: got inf"], TUNE_OK),
        Case(["--space", "space.yaml", "--name", "a'b"], ['--name "a\'b"'], TUNE_OK),
        Case(["--space", "space.yaml", "--num-samples", "0"], ["--num-samples", "got 0"], TUNE_OK),
    ],
    "cabb_ray.pretrain": [
        Case(["--steps", "1"], ["--steps: expected >= 2, got 1"]),
        Case(["--steps", "10", "--eval-every", "3"], ["--eval-every 3"]),
        Case(["--config", "b.yaml"], ["b.yaml: invalid YAML at line"], {"b.yaml": "a: [\n"}),
        Case(["--set", "optim.momentum=-5"], ["optim.momentum: expected 0 <= m < 1"]),
        Case(["--lr", "nan"], ["optim.lr", "got nan, expected a finite number"]),
    ],
    "cabb_ray.predict": [
        Case(
            ["--checkpoint", "none.pt", "--images", "imgs", "--out", "o"],
            ["none.pt: checkpoint not found"],
            IMAGES,
        ),
        Case(
            ["--checkpoint", "bad.pt", "--images", "imgs", "--out", "o"],
            ["bad.pt: "],
            {**IMAGES, "bad.pt": b"not a zip"},
        ),
        Case(
            ["--checkpoint", "c.pt", "--images", "nowhere", "--out", "o"],
            ["nowhere: images folder not found"],
        ),
        Case(
            ["--checkpoint", "c.pt", "--images", "imgs", "--out", "o", "--device", "tpu"],
            ["--device 'tpu'"],
            IMAGES,
        ),
        Case(
            ["--checkpoint", "c.pt", "--images", "imgs", "--out", "o", "--categories", "l1.json"],
            ["l1.json: expected a dataset JSON"],
            {**IMAGES, "l1.json": NOT_UTF8},
        ),
        Case(
            ["--checkpoint", "c.pt", "--images", "imgs", "--out", "o", "--categories", "c.json"],
            ['c.json: categories[0].isthing: expected 0 or 1, got "yes"'],
            {**IMAGES, "c.json": '{"categories": [{"id": 1, "name": "road", "isthing": "yes"}]}'},
        ),
        Case(
            ["--checkpoint", "c.pt", "--images", "imgs", "--out", "taken"],
            ["--out taken: exists and is not a folder"],
            {**IMAGES, "taken": "a file"},
        ),
    ],
    "cabb_ray.evaluate": [
        Case(
            _evaluate("gt.json", "g", "p.json", "p"),
            ["--gt-json gt.json: file not found"],
        ),
        Case(
            _evaluate("gt.json", "g", "gt.json", "p"),
            ["--gt-folder g: folder not found"],
            {"gt.json": _dataset()},
        ),
        Case(
            _evaluate("gt.json", "g", "gt.json", "g", "--out", "g"),
            ["--out g: is a folder"],
            {"gt.json": _dataset(), "g/x.png": _png()},
        ),
        Case(
            _evaluate("l1.json", "g", "l1.json", "g"),
            ["l1.json"],
            {"l1.json": NOT_UTF8, "g/x.png": _png()},
        ),
        Case(
            _evaluate("gt.json", "g", "p.json", "g"),
            ["p.json", "annotations"],
            {"gt.json": _dataset(), "p.json": _dataset(annotations=5), "g/x.png": _png()},
        ),
    ],
    "cabb_ray.report": [
        Case(["--experiment", "x", "--search", "a'b"], ['--search "a\'b"']),
        Case(["--experiment", "x", "--tau", "nan"], ["--tau nan: expected a value in -1..1"]),
        Case(
            ["--experiment", "x", "--mlflow-uri", "sqlite:///none.db"],
            ["--mlflow-uri", "none.db: no such database file"],
        ),
        Case(
            ["--experiment", "x"],
            ["mlflow.db: cannot read the tracking store", "file is not a database"],
            {"mlflow.db": b"not a database"},
        ),
    ],
}


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CABB_RAY_", "RAY_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    return env


def _listing(folder: Path) -> dict[str, int]:
    """Every path under ``folder`` (hidden ones too) with its size (-1 for folders)."""
    return {
        str(p.relative_to(folder)): (-1 if p.is_dir() else p.stat().st_size)
        for p in sorted(folder.rglob("*"))
    }


def _problems(case: Case, code: int, err: str, before: dict, after: dict) -> list[str]:
    lines = [line for line in err.splitlines() if line.strip()]
    found = []
    if code != 2:
        found.append(f"exit status {code}, expected 2")
    if "Traceback" in err:
        found.append("a traceback")
    if case.argparse:
        last = lines[-1] if lines else ""
        if len(lines) != 1 or ": error: " not in last:
            found.append(f"{len(lines)} stderr lines, expected one 'prog: error:' line")
    elif len(lines) != 1 or not lines[0].startswith("error: "):
        found.append(f"{len(lines)} stderr lines, expected one 'error:' line")
        last = "\n".join(lines)
    else:
        last = lines[0]
    found += [f"{text!r} not named" for text in case.expect if text not in last]
    if after != before:
        new = sorted(set(after) - set(before)) or "changed sizes"
        found.append(f"wrote {new}")
    return [f"{' '.join(case.argv)}: {p} (stderr: {err.strip()[-600:]!r})" for p in found]


@pytest.mark.parametrize("module", list(CASES))
def test_bad_input_fails_in_one_line_and_writes_nothing(module, tmp_path):
    cases = CASES[module]
    batch, listings = [], []
    for i, case in enumerate(cases):
        cwd = tmp_path / f"case{i}"
        cwd.mkdir()
        for name, content in case.files.items():
            path = cwd / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content)
        listings.append(_listing(cwd))
        batch.append(
            {
                "module": module,
                "argv": case.argv,
                "cwd": str(cwd),
                "env": {"MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"},
                "stdout": str(tmp_path / f"case{i}.out"),
                "stderr": str(tmp_path / f"case{i}.err"),
            }
        )
    (tmp_path / "cases.json").write_text(json.dumps(batch))
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, str(tmp_path / "cases.json"), str(tmp_path / "codes")],
        capture_output=True,
        text=True,
        env=_env(tmp_path),
        cwd=tmp_path,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    codes = json.loads((tmp_path / "codes").read_text())
    failures, fixed = [], []
    for i, (case, code) in enumerate(zip(cases, codes, strict=True)):
        err = (tmp_path / f"case{i}.err").read_text()
        problems = _problems(case, code, err, listings[i], _listing(tmp_path / f"case{i}"))
        if case.xfail and not problems:
            fixed.append(f"{' '.join(case.argv)}: passes now; drop its xfail ({case.xfail})")
        elif not case.xfail:
            failures += problems
    assert not failures, "\n".join(failures)
    assert not fixed, "\n".join(fixed)
    pending = [c.xfail for c in cases if c.xfail]
    if pending:
        pytest.xfail("; ".join(pending))


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (  # issue 22's reproduction
            ["cabb_ray.train", "--set", "optim.lr=.nan"],
            "error: --set optim.lr: got nan, expected a finite number",
        ),
        (
            ["cabb_ray.report", "--experiment", "x", "--search", "a'b"],
            "error: --search \"a'b\": expected letters, digits, '.', '_' or '-'",
        ),
    ],
)
def test_real_python_dash_m_prints_one_line(argv, line, tmp_path):
    """The runner above against the real thing: the interpreter's own ``-m``."""
    proc = subprocess.run(
        [sys.executable, "-m", *argv],
        capture_output=True,
        text=True,
        env=_env(tmp_path),
        cwd=tmp_path,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(line)
    assert list(tmp_path.iterdir()) == []
