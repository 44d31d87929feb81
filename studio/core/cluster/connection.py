"""Where long jobs run: this process, a Ray instance started on this machine, or a Ray cluster.

``--ray ADDRESS`` on the CLI and the GUI's compute setting name one of:

- ``local``: start a Ray instance on this machine, listening on loopback only (127.0.0.1),
  with Ray's token authentication on (Ray makes and uses a token for its own processes);
- ``auto``: connect to the cluster this machine already belongs to (``ray start`` ran here);
- ``ray://HOST:PORT`` (Ray client) or ``HOST:PORT`` (the head node's GCS): connect to that
  cluster. With token authentication on the cluster, the token comes from ``RAY_AUTH_TOKEN``,
  ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token`` (``ray get-auth-token`` on the head prints it).

Ray is an optional extra: without it :func:`require_ray` names the command that installs it.
The studio's own code travels to a remote cluster's workers in the job's runtime environment;
the cluster needs the same Python packages (torch, torch-pruning, ...) installed.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from studio.core.errors import StudioError, first_line

INSTALL_HINT = "bash packaging/install.sh --ray  (or: pip install 'pruning-studio[ray]')"
LOCAL = "local"
_LOCK = threading.Lock()


def require_ray() -> ModuleType:
    """The ``ray`` module, or a clear error naming the command that installs it."""
    # Ray's C++ core logs warnings (lost sockets, retries) to this process's stderr; our
    # one-line errors say what happened. The user's own setting wins.
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "error")
    try:
        import ray
    except ImportError as exc:
        raise StudioError(
            f"Ray is not installed ({exc}); install it with: {INSTALL_HINT}"
        ) from None
    return ray


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def check_address(address: str) -> str:
    """``address`` stripped, or a clear error when it cannot name a Ray cluster."""
    address = (address or "").strip()
    if not address:
        raise StudioError("no Ray address given: use local, auto, ray://HOST:PORT or HOST:PORT")
    if address in (LOCAL, "auto"):
        return address
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise StudioError(
            f"'{address}' is not a Ray address: use local, auto, ray://HOST:PORT or HOST:PORT"
        )
    return address


@dataclass(frozen=True)
class Compute:
    """Where scans and fine-tuning run: this process (no address) or Ray at ``address`` with
    ``workers`` workers (None: as many as the cluster has CPUs, for scans)."""

    address: str | None = None
    workers: int | None = None

    @property
    def on_ray(self) -> bool:
        return self.address is not None

    def describe(self) -> str:
        if self.address is None:
            return f"this machine ({os.cpu_count() or 1} cores)"
        workers = f", {self.workers} workers" if self.workers else ""
        return f"Ray: {self.address}{workers}"


@dataclass
class NodeInfo:
    host: str
    cpus: float
    gpus: float
    alive: bool
    head: bool = False


@dataclass
class ClusterInfo:
    """What a connection check shows: where the work runs and what the cluster has."""

    address: str  # as the user gave it
    gcs_address: str  # where Ray's control plane listens
    started_here: bool  # a local instance this process started
    nodes: list[NodeInfo] = field(default_factory=list)

    @property
    def cpus(self) -> float:
        return sum(n.cpus for n in self.nodes if n.alive)

    @property
    def gpus(self) -> float:
        return sum(n.gpus for n in self.nodes if n.alive)

    @property
    def alive_nodes(self) -> int:
        return sum(1 for n in self.nodes if n.alive)

    def where(self) -> str:
        """One line for a job's status: where it runs."""
        if self.started_here:
            place = f"local Ray at {self.gcs_address}"
        else:
            place = f"Ray cluster at {self.address}"
        return (
            f"{place}: {self.alive_nodes} node{'s' if self.alive_nodes != 1 else ''}, "
            f"{self.cpus:g} CPUs, {self.gpus:g} GPUs"
        )


class Cluster:
    """A connection to Ray, made once per process and shared by the jobs that use it.

    ``connect()`` starts or joins Ray; a second ``connect()`` with the same address reuses the
    connection, one with another address ends the first (when this process started it).
    ``shutdown()`` stops a local instance started here and disconnects from a remote one.
    """

    _current: Cluster | None = None

    def __init__(self, address: str, cpus: int | None = None) -> None:
        self.address = check_address(address)
        self.cpus = cpus
        self.info: ClusterInfo | None = None

    @classmethod
    def connect(cls, address: str, cpus: int | None = None) -> Cluster:
        """The process's connection to ``address``, made now if needed."""
        ray = require_ray()
        address = check_address(address)
        with _LOCK:
            current = cls._current
            if current is not None and current.address == address and ray.is_initialized():
                return current
            if address != LOCAL:  # before ending the connection there is: it may be the only one
                _reachable(ray, address)
            if current is not None:
                _OWNER.call(current._disconnect, ray)
            cluster = cls(address, cpus)
            _OWNER.call(cluster._connect, ray)
            cls._current = cluster
            return cluster

    @classmethod
    def shutdown(cls) -> None:
        with _LOCK:
            if cls._current is not None and ray_available():
                import ray

                _OWNER.call(cls._current._disconnect, ray)
            cls._current = None

    def _connect(self, ray: ModuleType) -> None:
        if self.address == LOCAL:
            _loopback_only(ray)  # refuses first: nothing that runs is ended for nothing
        if ray.is_initialized():  # made elsewhere in this process: replaced by ours
            ray.shutdown()
        try:
            if self.address == LOCAL:
                context = ray.init(
                    num_cpus=self.cpus or os.cpu_count() or 1,
                    include_dashboard=False,
                    log_to_driver=False,
                    configure_logging=True,
                    logging_level="ERROR",
                )
            else:
                context = ray.init(
                    address=self.address,
                    log_to_driver=False,
                    logging_level="ERROR",
                    runtime_env={"py_modules": [_package_dir()]},
                )
        except StudioError:
            raise
        except Exception as exc:  # ConnectionError, RuntimeError, auth failures, ...
            _shutdown_quietly(ray)
            if os.environ.get("STUDIO_DEBUG"):
                raise
            raise StudioError(_connect_message(self.address, exc)) from None
        gcs = _gcs_address(context)
        self.info = ClusterInfo(self.address, gcs, self.address == LOCAL, _nodes(ray))

    def _disconnect(self, ray: ModuleType) -> None:
        _shutdown_quietly(ray)

    def refresh(self) -> ClusterInfo:
        """The cluster's nodes, CPUs and GPUs as they are now."""
        ray = require_ray()
        assert self.info is not None
        try:
            self.info.nodes = _nodes(ray)
        except Exception as exc:
            raise StudioError(
                f"lost the connection to Ray at {self.address}: {first_line(exc)}"
            ) from None
        return self.info


class _OwnerThread:
    """The one thread that starts and stops Ray in this process.

    Ray ties its connection to the thread that called ``ray.init``: once that thread ends,
    calls from any other thread hang (seen with Ray 2.60). The GUI connects from short-lived
    worker threads, so every init and shutdown runs here, on a daemon thread that lives as
    long as the process; other threads then use the connection freely.
    """

    def __init__(self) -> None:
        self._calls: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if threading.current_thread() is self._thread:
            return fn(*args)
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, name="ray-owner", daemon=True)
                self._thread.start()
        done: queue.Queue = queue.Queue(maxsize=1)
        self._calls.put((fn, args, done))
        ok, value = done.get()
        if not ok:
            raise value
        return value

    def _serve(self) -> None:
        while True:
            fn, args, done = self._calls.get()
            try:
                done.put((True, fn(*args)))
            except BaseException as exc:  # handed back to the caller's thread
                done.put((False, exc))


_OWNER = _OwnerThread()


def check_connection(address: str) -> ClusterInfo:
    """Connect (or reuse the connection) and return what the cluster has: the GUI's check."""
    return Cluster.connect(address).refresh()


def _loopback_only(ray: ModuleType) -> None:
    """Make a local instance bind and advertise 127.0.0.1 only, with token auth on."""
    from ray._private import ray_constants

    # Ray uses the loopback address as the node's address when "clusters" are disabled (its
    # setting for laptops); every server of a local instance then listens on 127.0.0.1.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    # token authentication is Ray's default for local instances from 2.59; never opt out
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        raise StudioError(
            "RAY_AUTH_MODE=disabled is set: the studio starts Ray only with its token "
            "authentication on; unset RAY_AUTH_MODE"
        )


def _reachable(ray: ModuleType, address: str, timeout: float = 5.0) -> None:
    """A quick TCP check of the head's address: Ray itself retries for minutes."""
    target = address
    if address == "auto":
        from ray._private import services

        try:
            target = services.canonicalize_bootstrap_address(address) or ""
        except Exception:
            target = ""
        if not target:
            raise StudioError(
                "no Ray cluster is running on this machine (auto): start one with "
                "`ray start --head` or give its address"
            )
    host, _, port = target.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        raise StudioError(f"could not connect to Ray at {address}: {first_line(exc)}") from None


def _package_dir() -> str:
    return str(Path(__file__).resolve().parents[1])


def _gcs_address(context: Any) -> str:
    info = getattr(context, "address_info", None) or {}
    return str(info.get("gcs_address") or info.get("address") or "")


def _nodes(ray: ModuleType) -> list[NodeInfo]:
    nodes = []
    for node in ray.nodes():
        resources = node.get("Resources") or {}
        nodes.append(
            NodeInfo(
                host=str(node.get("NodeManagerAddress") or node.get("NodeManagerHostname") or "?"),
                cpus=float(resources.get("CPU", 0)),
                gpus=float(resources.get("GPU", 0)),
                alive=bool(node.get("Alive")),
                head="node:__internal_head__" in resources,
            )
        )
    return nodes


def _connect_message(address: str, exc: BaseException) -> str:
    text = str(exc)
    if "auth" in text.lower() or "token" in text.lower() or "UNAUTHENTICATED" in text:
        return (
            f"Ray at {address} refused the connection: its token authentication needs the "
            "cluster's token (set RAY_AUTH_TOKEN or copy ~/.ray/auth_token from the head node; "
            "`ray get-auth-token` there prints it)"
        )
    if address == LOCAL:
        return f"could not start a local Ray instance: {first_line(exc)}"
    return (
        f"could not connect to Ray at {address}: {first_line(exc)} (a cluster with token "
        "authentication needs its token in RAY_AUTH_TOKEN or ~/.ray/auth_token)"
    )


def _shutdown_quietly(ray: ModuleType) -> None:
    try:
        if ray.is_initialized():
            ray.shutdown()
    except Exception:
        pass
