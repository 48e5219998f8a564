"""cluster/*.yaml: validated offline with Ray's own cluster-config checks (no credentials)."""

from __future__ import annotations

import copy
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
