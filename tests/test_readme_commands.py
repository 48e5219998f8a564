"""Every non-cluster command of the README, run as a new user would, in a fresh folder.

Each entry pairs the command as the README writes it (the test fails if the README no longer
says so) with what runs here. Long ones are shortened, and the shortening is stated:

- `make quickstart` is `python -m cabb_ray.tune --space search_spaces/quickstart.yaml`: run
  with 1 trial (`--num-samples 1`), 2 steps an epoch and 2 validation images, on a 4-image
  dataset instead of the 256-image default.
- `make test` is the suite this file belongs to (CI runs it through `.ci/run`).
- Training runs 1 epoch of 2 steps of batch 2; the synthetic dataset has 4 + 2 small images
  (128 x 256) instead of 200 + 20; preview draws 4 crops, levels 200.
- Placeholders (DIR, best.pt, pred.json, pred/) become the files the earlier commands made.
- The ablation runs 2 of its 18 grid points, the fidelity search 3 trials, both with the tiny
  training above (ablation 1 epoch, fidelity 4); the reports then read those searches.
- `mlflow ui` is started on a free port and asked for the experiment, then stopped.
- Benchmarks are not run (minutes each, and timing targets stay out of tests); the analysis
  notebook has its own test (tests/test_notebook.py), the cluster files theirs
  (tests/test_cluster.py).
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_TRAINING = (
    "--set data.root=data/synthetic --set optim.steps_per_epoch=2 --set optim.warmup_steps=1 "
    "--set data.batch_size=2 --set eval.max_images=2 --set data.loader_workers=0"
)

# (as the README writes it, what runs here)
COMMANDS = [
    (
        "python -m cabb_ray.data synth --out data/synthetic --num-train 200 --num-val 20 --seed 0",
        "python -m cabb_ray.data synth --out data/synthetic --num-train 4 --num-val 2 --seed 0 "
        "--height 128 --width 256",
    ),
    (
        "python -m cabb_ray.data index --root DIR",
        "python -m cabb_ray.data index --root data/synthetic",
    ),
    (
        "python -m cabb_ray.data stats --root DIR --split train",
        "python -m cabb_ray.data stats --root data/synthetic --split train --crop 64 "
        "--plot sizes.png",
    ),
    (
        "python -m cabb_ray.data preview --root data/synthetic --sampler isus --num 16 "
        "--out preview/",
        "python -m cabb_ray.data preview --root data/synthetic --sampler isus --num 4 "
        "--out preview/",
    ),
    (
        "python -m cabb_ray.data levels --root data/synthetic --num 5000",
        "python -m cabb_ray.data levels --root data/synthetic --num 200",
    ),
    (
        "python -m cabb_ray.train --config cpu_quickstart",
        f"python -m cabb_ray.train --config cpu_quickstart {TINY_TRAINING} --set optim.epochs=1 "
        "--name readme",
    ),
    (
        "python -m cabb_ray.predict --checkpoint best.pt --images DIR --out DIR",
        "python -m cabb_ray.predict --checkpoint {checkpoint} --images data/synthetic/images/val "
        "--out pred --categories data/synthetic/val.json",
    ),
    (
        "python -m cabb_ray.evaluate --gt-json data/synthetic/val.json --gt-folder "
        "data/synthetic/val --pred-json pred.json --pred-folder pred/",
        "python -m cabb_ray.evaluate --gt-json data/synthetic/val.json --gt-folder "
        "data/synthetic/val --pred-json pred/predictions.json --pred-folder pred/panoptic "
        "--out results.json",
    ),
    (
        "python -m cabb_ray.tune --space search_spaces/quickstart.yaml",
        f"python -m cabb_ray.tune --space search_spaces/quickstart.yaml --num-samples 1 "
        f"{TINY_TRAINING} --name readme-search",
    ),
    (
        "python -m cabb_ray.data stats --crop",  # the quickstart's scenes, in ~/.cache/cabb_ray
        "python -m cabb_ray.data stats --crop",
    ),
    (
        "python -m cabb_ray.tune --space search_spaces/ablation.yaml",
        f"python -m cabb_ray.tune --space search_spaces/ablation.yaml --num-samples 2 "
        f"{TINY_TRAINING} --set optim.epochs=1 --set eval.every=1 --name readme-ablation",
    ),
    (
        "python -m cabb_ray.report --experiment ablation",
        "python -m cabb_ray.report --experiment ablation",
    ),
    (
        "python -m cabb_ray.tune --space search_spaces/quickstart.yaml --no-early-stopping "
        "--set eval.every=1",
        "python -m cabb_ray.tune --space search_spaces/quickstart.yaml --no-early-stopping "
        f"--set eval.every=1 --num-samples 3 {TINY_TRAINING} --name readme-fidelity",
    ),
    (
        "python -m cabb_ray.report --fidelity --experiment quickstart",
        "python -m cabb_ray.report --fidelity --experiment quickstart",
    ),
]


def _readme_commands() -> str:
    """The README's code with continued lines joined and spaces normalised."""
    text = (ROOT / "README.md").read_text()
    return re.sub(r"\s+", " ", text.replace("\\\n", " "))


def test_every_command_here_is_what_the_readme_says():
    readme = _readme_commands()
    for written, _ in COMMANDS:
        assert written in readme, f"the README no longer says: {written}"
    assert "make quickstart" in readme and "make test" in readme
    assert ".venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db" in readme


def _run(command: str, cwd: Path) -> str:
    args = command.split()
    args[0] = sys.executable
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{command}\n{done.stdout[-1500:]}\n{done.stderr[-2500:]}"
    return done.stdout


FIRST_PART = 9  # the data, training, prediction, evaluation and quickstart commands


@pytest.mark.integration
@pytest.mark.timeout(1200)
def test_readme_commands_work_as_written_in_a_fresh_folder(tmp_path):
    shutil.copytree(ROOT / "search_spaces", tmp_path / "search_spaces")
    outputs = {}
    for written, command in COMMANDS[:FIRST_PART]:
        if "{checkpoint}" in command:  # where the training command said it left it
            found = re.search(r"^last checkpoint: (\S+)$", outputs[COMMANDS[5][0]], re.M)
            assert found, "the training command printed no checkpoint"
            command = command.format(checkpoint=found.group(1))
        outputs[written] = _run(command, tmp_path)
    assert (tmp_path / "sizes.png").is_file() and (tmp_path / "preview" / "crops.png").is_file()
    assert "finished: epoch 1, step 2" in outputs[COMMANDS[5][0]]
    assert (tmp_path / "pred" / "predictions.json").is_file()
    assert (tmp_path / "results.json").is_file()
    assert "leaderboard of search readme-search" in outputs[COMMANDS[8][0]]
    assert (tmp_path / "runs" / "readme-search" / "best" / "checkpoint.pt").is_file()
    _check_mlflow_ui(tmp_path)


@pytest.mark.integration
@pytest.mark.timeout(1200)
def test_readme_ablation_and_fidelity_commands_in_a_fresh_folder(tmp_path):
    """The ablation, its report and the early-stopping fidelity check (own timeout: each
    tiny trial still starts Ray Train and evaluates)."""
    shutil.copytree(ROOT / "search_spaces", tmp_path / "search_spaces")
    for _, command in COMMANDS[:2]:  # the small synthetic dataset and its index
        _run(command, tmp_path)
    outputs = {written: _run(command, tmp_path) for written, command in COMMANDS[FIRST_PART:]}
    assert "wider or taller than 128 px" in outputs[COMMANDS[9][0]]
    assert "| variant | n | PQ |" in outputs[COMMANDS[11][0]]
    assert (tmp_path / "runs" / "readme-ablation" / "report" / "size_bins.png").is_file()
    assert "search readme-fidelity: 3 finished trial(s)" in outputs[COMMANDS[13][0]]
    assert (tmp_path / "runs" / "readme-fidelity" / "report" / "fidelity.png").is_file()


def _check_mlflow_ui(folder: Path) -> None:
    """`mlflow ui --backend-store-uri sqlite:///mlflow.db` serves the UI and the runs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", "sqlite:///mlflow.db"]
    server = subprocess.Popen(
        [*command, "--port", str(port)],
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(base + "/", timeout=5) as page:
                    assert page.status == 200
                    break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(1)
        url = base + "/api/2.0/mlflow/experiments/get-by-name?experiment_name=quickstart"
        with urllib.request.urlopen(url, timeout=10) as answer:
            body = answer.read().decode()
        assert '"name": "quickstart"' in body or '"name":"quickstart"' in body
        assert "custom_model_development" in body  # opens on the runs table, not GenAI
    finally:
        server.terminate()
        server.wait(timeout=30)
