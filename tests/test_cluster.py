"""cluster/*.yaml: validated offline with Ray's own cluster-config checks (no credentials)."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


def _validated(config: dict) -> dict:
    """What `ray up` does with a config before touching any cloud: defaults, then schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


@pytest.mark.parametrize("name", ["aws.yaml", "local.yaml"])
def test_cluster_files_pass_rays_validation(name):
    import ray

    prepared = _validated(_load(name))
    image = prepared["docker"]["image"]
    assert image.startswith(f"rayproject/ray:{ray.__version__}-py311"), image
    commands = " ".join(prepared["head_setup_commands"] + prepared["head_start_ray_commands"])
    assert "--host 127.0.0.1" in commands and "--dashboard-host=127.0.0.1" in commands
    assert "0.0.0.0" not in commands  # nothing listens on every interface
    assert any("pip install" in c and "/home/ray/cabb_ray" in c for c in prepared["setup_commands"])
    assert {"data", ".venv", "runs"} <= set(prepared["rsync_exclude"])  # not shipped to nodes


def test_aws_keeps_trial_drivers_on_the_head_and_off_spot_nodes():
    from cabb_ray.training.ray_env import TRIAL_SLOT

    prepared = _validated(_load("aws.yaml"))
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"].get(TRIAL_SLOT, 0) > 0 and "GPU" not in head["resources"]
    spot = [t for t in types.values() if "InstanceMarketOptions" in t["node_config"]]
    assert spot, "no spot node type"
    assert all(TRIAL_SLOT not in t["resources"] for name, t in types.items() if t is not head)
    assert {t["node_config"]["InstanceType"] for t in types.values() if t is not head} == {
        "g5.48xlarge"
    }


def _bind_mounts(run_options: list[str]) -> dict[str, str]:
    """``-v HOST:CONTAINER[:MODE]`` docker options, as {container path: host path}."""
    mounts = {}
    for option in run_options:
        words = shlex.split(option)
        if words[:1] == ["-v"]:
            host, container = words[1].split(":")[:2]
            mounts[container] = host
    return mounts


def _option(command: str, flag: str) -> str:
    """The value of ``--flag VALUE`` or ``--flag=VALUE`` in a shell command line."""
    words = shlex.split(command.replace(f"{flag}=", f"{flag} "))
    return words[words.index(flag) + 1]


def test_aws_keeps_mlflow_and_the_search_folders_on_a_durable_mount():
    """`ray down` or a lost head must leave MLflow's database and every search's
    search.json/optuna.db/best/ behind, on EFS, for `--resume` on a new head."""
    prepared = _validated(_load("aws.yaml"))
    docker = prepared["docker"]
    mounts = _bind_mounts(docker["head_run_options"])
    assert not _bind_mounts(docker["run_options"])  # the GPU nodes mount nothing
    # the head's host mounts an NFS (EFS) file system before its container starts ...
    nfs = [c for c in prepared["initialization_commands"] if "mount -t nfs4" in c]
    assert len(nfs) == 1
    words = shlex.split(nfs[0].replace("(", " ").replace(")", " "))
    source, host_dir = words[words.index("mount") + 5 : words.index("mount") + 7]
    assert re.fullmatch(r"fs-[0-9a-f]+\.efs\.us-west-2\.amazonaws\.com:/", source), source
    assert f"mountpoint -q {host_dir}" in nfs[0]  # `ray up` again does not mount it twice
    # ... and that file system is the container's durable folder
    (durable,) = (c for c, h in mounts.items() if h == host_dir)
    for name in ("gpu_on_demand", "gpu_spot"):  # the mount is the head's alone
        assert prepared["available_node_types"][name]["initialization_commands"] == []

    setup = prepared["head_setup_commands"]
    (mlflow,) = (c for c in setup if "mlflow server" in c)
    backend = _option(mlflow, "--backend-store-uri")
    assert backend.startswith(f"sqlite:///{durable}/"), backend
    assert _option(mlflow, "--artifacts-destination").startswith("s3://")
    # the search folder: `cd ~/cabb_ray && python -m cabb_ray.tune` keeps it in ./runs
    repo = next(path for path, source in prepared["file_mounts"].items() if source == ".")
    (link,) = (c for c in setup if "ln -s" in c)
    target, name = shlex.split(link.split("&&")[-1])[-2:]
    assert name == f"{repo}/runs" and target.startswith(f"{durable}/"), link
    assert "runs" in prepared["rsync_exclude"]  # `ray up` again leaves the link alone
    assert any(f"stat -f -c %T {durable}" in c and "nfs" in c for c in setup)
    readme = (CLUSTER / "README.md").read_text()
    assert f"cd {repo.replace('/home/ray', '~')} && python -m cabb_ray.tune" in readme


def test_readme_says_how_to_resume_on_a_new_head():
    readme = (CLUSTER / "README.md").read_text()
    section = readme.split("## When the head is lost")[1].split("\n## ")[0]
    assert "ray up cluster/aws.yaml" in section
    assert "--name NAME --resume" in section and "python -m cabb_ray.tune" in section
    for kept in ("search.json", "optuna.db", "best/", "mlflow.db", "EFS", "S3"):
        assert kept in section, kept
    assert "fs-0123456789abcdef0" in readme  # the placeholder to replace, as in aws.yaml
    assert "fs-0123456789abcdef0" in (CLUSTER / "aws.yaml").read_text()


def test_local_ray_ports_are_fixed_and_named_in_the_readme_firewall_section():
    """Ray's ports take unauthenticated connections from any host: `local.yaml` pins them
    and the README names each one to firewall."""
    prepared = _validated(_load("local.yaml"))
    head = " ".join(prepared["head_start_ray_commands"])
    worker = " ".join(prepared["worker_start_ray_commands"])
    ports = {"--port": _option(head, "--port")}
    for flag in (
        "--object-manager-port",
        "--node-manager-port",
        "--min-worker-port",
        "--max-worker-port",
    ):
        ports[flag] = _option(head, flag)
        assert _option(worker, flag) == ports[flag], flag  # the same on every machine
    assert _option(worker, "--address").endswith(f":{ports['--port']}")
    assert _option(head, "--dashboard-host") == "127.0.0.1"

    readme = (CLUSTER / "README.md").read_text()
    section = readme.split("### Firewall on a LAN")[1].split("\n## ")[0]
    assert f"{ports['--min-worker-port']}-{ports['--max-worker-port']}" in section
    for port in (ports["--port"], ports["--object-manager-port"], ports["--node-manager-port"]):
        assert port in section, port
    for port in ("10001", "52365", "8265", "5000"):  # Ray Client, agent; loopback-only ones
        assert port in section, port
    assert "ufw default deny incoming" in section and "ufw allow from" in section


def test_local_head_declares_the_trial_slot():
    prepared = _validated(_load("local.yaml"))
    assert '"trial_slot"' in " ".join(prepared["head_start_ray_commands"])


def _misspelt_key(config: dict) -> None:
    config["max_worker"] = config.pop("max_workers")


def _fractional_gpu(config: dict) -> None:
    config["available_node_types"]["gpu_spot"]["resources"] = {"GPU": 0.5}


def _unknown_head_type(config: dict) -> None:
    config["head_node_type"] = "head_node"


@pytest.mark.parametrize(
    ("breaks", "message"),
    [
        (_misspelt_key, "'max_worker' was unexpected"),
        (_fractional_gpu, "0.5 is not of type 'integer'"),
        (_unknown_head_type, "`head_node_type` must be one of `available_node_types`"),
    ],
)
def test_broken_copies_of_the_aws_file_are_rejected(breaks, message):
    import jsonschema

    config = _load("aws.yaml")
    breaks(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)) as error:
        _validated(config)
    assert message in str(error.value)


def test_a_misspelt_key_in_the_local_file_is_rejected():
    import jsonschema

    config = _load("local.yaml")
    config["setup_command"] = config.pop("setup_commands")
    with pytest.raises(jsonschema.ValidationError, match="setup_command"):
        _validated(config)
