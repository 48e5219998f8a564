"""MLflow for training workers that cannot reach the tracking server themselves.

On a cluster the MLflow server listens on the head node's 127.0.0.1 only (``cluster/*.yaml``:
never open to the network), and the trial drivers that create the runs live on the head too.
Ray Train workers on GPU nodes cannot reach 127.0.0.1 of the head, so their MLflow calls go
through a Ray actor pinned to the head (the node that starts the training run): the worker's
tracking URI becomes ``relay://<actor name>``, and ``RunLogger`` sends each call there, files
as bytes. The same holds for a sqlite file on the head. Local runs and tracking servers every
node reaches (``http://host:5000``, databricks) are used directly.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from cabb_ray.errors import CabbRayError

RELAY_SCHEME = "relay://"
RELAY_VERSION = 2
NAMESPACE = "cabb_ray"
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


def needs_relay(uri: str) -> bool:
    """A store only this machine reaches: a server on its loopback, or a local sqlite file
    (another node would open a new, empty database of the same name)."""
    if uri.startswith("sqlite:"):
        return True
    return uri.startswith(("http://", "https://")) and urlparse(uri).hostname in LOOPBACK_HOSTS


def worker_tracking_uri(uri: str, cluster: bool) -> str:
    """The tracking URI to hand to Ray Train workers: ``uri`` itself, or on a ``cluster`` with
    a store only this node reaches, a relay actor pinned to this node (started once, shared by
    every run)."""
    if not (cluster and needs_relay(uri)):
        return uri
    return start_relay(uri)


def start_relay(uri: str) -> str:
    """Start (or find) the relay actor for ``uri`` on this node; returns its ``relay://`` URI."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # versioned: a detached relay started by an older version (without the allow-list) is
    # not reused
    name = f"mlflow_relay_v{RELAY_VERSION}_" + hashlib.sha1(uri.encode()).hexdigest()[:12]
    here = ray.get_runtime_context().get_node_id()
    relay = (
        ray.remote(MlflowRelay)
        .options(
            name=name,
            namespace=NAMESPACE,
            get_if_exists=True,
            lifetime="detached",  # outlives the run that started it: others share it
            max_restarts=-1,  # it holds no state: if its process dies, Ray starts another
            max_task_retries=3,  # and the calls in flight go to the new one
            num_cpus=0,
            max_concurrency=4,  # one trial's artifact upload does not hold up the others
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
        )
        .remote(uri)
    )
    ray.get(relay.ping.remote())
    return RELAY_SCHEME + name


# What RunLogger asks of a client: nothing that deletes runs or experiments, reads other
# files or writes outside a run's artifacts (anyone on the cluster can call the actor).
RELAYED_METHODS = frozenset(
    {
        "log_batch",
        "log_text",
        "set_tag",
        "set_terminated",
        "get_run",
        "update_run",
        "delete_tag",
        "get_metric_history",
    }
)


def check_artifact_path(path: str | None, what: str) -> None:
    """A relative path inside a run's artifacts: no absolute path, no ``..``."""
    if path is None:
        return
    parts = Path(path).parts
    if Path(path).is_absolute() or ".." in parts or "\\" in path:
        raise CabbRayError(f"MLflow relay: {what} {path!r}: expected a path inside the run")


class MlflowRelay:
    """The Ray actor: an MlflowClient on the node that reaches the server, serving only
    ``RELAYED_METHODS``."""

    def __init__(self, uri: str):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(uri)

    def ping(self) -> bool:
        return True

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if method not in RELAYED_METHODS:
            raise CabbRayError(
                f"MLflow relay: {method!r} is not relayed (allowed: "
                f"{', '.join(sorted(RELAYED_METHODS))})"
            )
        if method == "log_text":
            check_artifact_path(
                kwargs.get("artifact_file", args[2] if len(args) > 2 else None), "artifact"
            )
        return getattr(self.client, method)(*args, **kwargs)

    def log_artifact_bytes(
        self, run_id: str, name: str, data: bytes, artifact_path: str | None
    ) -> None:
        if not name or Path(name).name != name or name in (".", ".."):
            raise CabbRayError(f"MLflow relay: artifact name {name!r}: expected a file name")
        check_artifact_path(artifact_path, "artifact folder")
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / name
            path.write_bytes(data)
            self.client.log_artifact(run_id, str(path), artifact_path)


class RelayedClient:
    """What ``RunLogger`` uses instead of an MlflowClient for a ``relay://`` URI: the same
    methods, carried out by the relay actor."""

    def __init__(self, uri: str):
        self.name = uri[len(RELAY_SCHEME) :]
        self._actor = None

    def _relay(self):
        """Looked up on first use, so that a missing relay fails a logging call (retried,
        then dropped with a warning), not the worker."""
        import ray

        if self._actor is None:
            self._actor = ray.get_actor(self.name, namespace=NAMESPACE)
        return self._actor

    def _get(self, ref) -> Any:
        """The call's result; a failed call forgets the handle, so that the next call looks
        the relay up again (it may have been restarted or started anew)."""
        import ray

        try:
            return ray.get(ref)
        except Exception:
            self._actor = None
            raise

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None):
        path = Path(local_path)
        data = path.read_bytes()
        self._get(self._relay().log_artifact_bytes.remote(run_id, path.name, data, artifact_path))

    def __getattr__(self, method: str):
        if method.startswith("_"):
            raise AttributeError(method)

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._get(self._relay().call.remote(method, *args, **kwargs))

        return call
