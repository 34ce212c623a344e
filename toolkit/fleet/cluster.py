"""Ray for edgecds: the one place its settings, its address, its token and the device labels are defined.

Ray is configured through its own means (the address, `ray start` options, environment variables)
so that nothing leaves for anywhere but the cluster the user names: usage statistics off and their
"disabled" notice sent nowhere, no dashboard, no cloud-metadata probing, loopback kept loopback.
Ray's token authentication is always on: a Ray cluster runs whatever code a connected process
sends it, so only machines holding the head's token file may join or submit work.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgecds.atomic import atomic_path
from edgecds.errors import EdgecdsError, UsageError
from edgecds.fleet.transfer import STORE_ENV, valid_gib
from edgecds.home import HOME_ENV, edgecds_home
from edgecds.secret_file import read_secret

RESOURCE_PREFIX = "edgecds-device:"  # a node's custom resource naming the device profile it is
DEFAULT_PORT = 6379  # Ray's own default head port
RAY_WORKER_PORTS = range(10002, 20000)  # Ray's default --min-worker-port..--max-worker-port: a head port there clashes
INSTALL_HINT = "the fleet needs Ray: pip install 'edgecds[fleet]'"
# The head reads its cluster description from ~/ray_bootstrap_config.yaml (as a head Ray's
# launcher started would); without one it asks cloud metadata servers which cloud it is on.
# edgecds gives the head a home holding one that says what the cluster is: on-premises.
BOOTSTRAP_CONFIG = "ray_bootstrap_config.yaml"
BOOTSTRAP_TEXT = "cluster_name: edgecds-fleet\nprovider:\n  type: local\n"
TOKEN_ENV = "EDGECDS_FLEET_TOKEN_FILE"  # where the cluster's token file is, when not the default
TOKEN_VALUE_ENV = "RAY_AUTH_TOKEN"  # Ray's own: a token in the environment, which would win over the checked file
TOKEN_PATTERN = re.compile(r"[0-9A-Za-z_-]{32,512}")  # what Ray's own generator writes is 64 hex digits


def token_file(explicit: Path | None = None) -> Path:
    """The cluster's token file: --token-file, else $EDGECDS_FLEET_TOKEN_FILE, else the home's fleet/auth_token."""
    if explicit is not None:
        return explicit.expanduser()
    named = os.environ.get(TOKEN_ENV)
    return Path(named).expanduser() if named else edgecds_home() / "fleet" / "auth_token"


def make_token(path: Path) -> Path:
    """The head's token: made once (256 random bits, readable by this user only) and kept, so that
    a restarted head accepts the nodes that hold it."""
    if not path.exists():
        with atomic_path(path) as temp:
            temp.chmod(0o600)  # before the token is in it
            temp.write_text(secrets.token_hex(32), encoding="ascii")
    return checked_token(path)


def checked_token(path: Path) -> Path:
    """A token file fit to hand to Ray: a regular file only its owner can read, holding one token.
    The token itself is never printed, logged or recorded; only its path travels (RAY_AUTH_TOKEN_PATH)."""
    copy_hint = (f"copy the head's token file (its {Path('$EDGECDS_HOME') / 'fleet' / 'auth_token'}, made by `edgecds fleet head`) "
                 f"to this machine as {path} (chmod 600), or name it with --token-file or ${TOKEN_ENV}")
    read_secret(path, "the cluster token", copy_hint, TOKEN_PATTERN.fullmatch, "one line of 32 or more letters and digits")
    return path


def device_resource(device_id: str) -> str:
    return RESOURCE_PREFIX + device_id


def devices_of(resources: dict[str, Any]) -> list[str]:
    return sorted(k[len(RESOURCE_PREFIX):] for k in resources if k.startswith(RESOURCE_PREFIX))


def split_address(address: str) -> tuple[str, int]:
    """HOST:PORT ([IPv6]:PORT, or HOST for Ray's default port); anything else is a usage error."""
    text = address.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else (str(DEFAULT_PORT) if not rest else "x")
    elif text.count(":") > 1:
        raise UsageError(f"cluster address {address!r}: write an IPv6 address in brackets, e.g. [fd00::5]:{DEFAULT_PORT}")
    else:
        host, _, port = text.partition(":") if ":" in text else (text, "", str(DEFAULT_PORT))
    if not host or host in ("auto", "local") or "/" in host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"cluster address {address!r}: expected HOST:PORT of the head, e.g. 10.0.0.5:{DEFAULT_PORT}")
    return host, int(port)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def node_ip_toward(address: str) -> str:
    """This machine's address as the cluster at `address` sees it: the interface a packet to the
    cluster would leave by (a UDP socket's connect sends nothing). Ray would otherwise ask the
    route to a public DNS server."""
    host, port = split_address(address)
    if is_loopback(host):
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((host, port))  # a UDP connect: chooses the route, sends nothing
            return str(probe.getsockname()[0])
    except OSError as exc:
        raise EdgecdsError(f"cannot reach the cluster at {address}: {exc.strerror or exc}; check the address and the network") from None


def ray_environment(address: str, token: Path) -> dict[str, str]:
    """The environment every Ray process edgecds starts or connects from runs with. `token`: a
    checked token file (the variable names its path; the token never enters an environment)."""
    # (Ray prefers $RAY_AUTH_TOKEN to the file: StartPlan.run and connect drop an inherited one)
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token.resolve()),
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_USAGE_STATS_PROMPT_ENABLED": "0",
           # Ray posts a "usage stats are disabled" notice to its server even when they are; to nowhere
           "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:9/",
           "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           # a Ray worker that imported onnxruntime before edgecds would otherwise start its telemetry
           "ORT_DISABLE_TELEMETRY": "1",
           # Ray refuses to create any object once the disk is 95% used, even the 16 MiB chunks that
           # only pass through memory; edgecds checks the free space a received file needs itself
           # (transfer.fetch), so a nearly full build machine still serves its files
           "RAY_local_fs_capacity_threshold": "1.0"}
    if is_loopback(split_address(address)[0]):
        # Ray turns a loopback address into the machine's network address unless told that this
        # machine is the whole cluster (the variable's name is Ray's, from its macOS/Windows default)
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return env


def head_home(home: Path | None = None) -> Path:
    """The home folder the head runs with: it holds only Ray's cluster description."""
    folder = (home or edgecds_home()) / "fleet" / "head-home"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / BOOTSTRAP_CONFIG).write_text(BOOTSTRAP_TEXT, encoding="utf-8")
    return folder


def head_environment(address: str, token: Path) -> dict[str, str]:
    return {**ray_environment(address, token), "HOME": str(head_home()), HOME_ENV: str(edgecds_home())}


def require_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UsageError(INSTALL_HINT) from None
    return ray


def ray_command() -> str:
    found = Path(sys.executable).with_name("ray")
    if found.exists():
        return str(found)
    which = shutil.which("ray")
    if which is None:
        raise UsageError(INSTALL_HINT)
    return which


@dataclass(frozen=True)
class StartPlan:
    """A `ray start` command line and its environment: what `fleet head` and `fleet join` run."""

    argv: list[str]
    env: dict[str, str]
    device: str | None
    notes: list[str] = field(default_factory=list)

    def run(self) -> int:
        env = {k: v for k, v in os.environ.items() if k != TOKEN_VALUE_ENV} | self.env
        try:
            return subprocess.run(self.argv, env=env, check=False).returncode
        except KeyboardInterrupt:  # --block: Ctrl-C leaves the cluster
            return 0


def head_plan(address: str, device: str | None, num_cpus: int | None, block: bool, token: Path | None = None,
              make: bool = True) -> StartPlan:
    """`token`: the token file (default: the home's); made here when there is none yet (unless
    `make` is false: a plan only shown)."""
    host, port = split_address(address)
    if port in RAY_WORKER_PORTS:
        raise UsageError(f"cluster address {address!r}: Ray gives its workers ports {RAY_WORKER_PORTS.start}-{RAY_WORKER_PORTS.stop - 1}; "
                         f"give the head a port outside them, e.g. {host}:{DEFAULT_PORT}")
    token = make_token(token_file(token)) if make else token_file(token)
    argv = [ray_command(), "start", "--head", f"--port={port}", f"--node-ip-address={host}", "--include-dashboard=false",
            "--disable-usage-stats"]
    notes = [f"the cluster's token file is {token}: copy it to each device and build machine that joins (`--token-file`, chmod 600)"]
    return StartPlan(_with_node_options(argv, device, num_cpus, block), head_environment(address, token), device, notes)


def join_plan(address: str, device: str, num_cpus: int | None, block: bool, token: Path | None = None,
              store_gib: float | None = None) -> StartPlan:
    """`store_gib`: the most the node keeps of received files (its tasks inherit the setting)."""
    host, port = split_address(address)
    if is_loopback(host):
        raise UsageError(f"{address} is this machine's loopback: a head listening there accepts no other machine. Start the head "
                         "with `edgecds fleet head --address HOST:PORT` on its network address, and join that")
    checked = checked_token(token_file(token))
    argv = [ray_command(), "start", f"--address={host}:{port}", f"--node-ip-address={node_ip_toward(address)}", "--disable-usage-stats"]
    env = ray_environment(address, checked)
    if store_gib is not None:
        if not valid_gib(store_gib):
            raise UsageError(f"--store-gib {store_gib}: expected the store's size limit in GiB, e.g. 20")
        env[STORE_ENV] = repr(store_gib)
    return StartPlan(_with_node_options(argv, device, num_cpus, block), env, device)


REFUSED_TOKEN = 3  # _probe_head's exit status when the head refuses the token


HEAD_ANSWER_SECONDS = 5.0


def require_listening_head(host: str, port: int) -> None:
    """A TCP connect to the head's port first: where nothing listens, Ray's own clients retry for
    minutes with only warnings, so "no head" is said here, within seconds."""
    try:
        socket.create_connection((host, port), timeout=HEAD_ANSWER_SECONDS).close()
    except OSError as exc:
        why = "nothing listens on that port" if isinstance(exc, ConnectionRefusedError) else (exc.strerror or str(exc) or "no answer")
        raise EdgecdsError(f"no head at {host}:{port} ({why}): start one there with `edgecds fleet head`, or name the right "
                           "--address") from None


def check_admitted(address: str, env: dict[str, str]) -> None:
    """Ask the head whether it admits a node with the token `env` names, before `ray start` joins:
    Ray's own join waits forever on a refused token. In a child process, since Ray reads a
    process's token once."""
    host, port = split_address(address)
    require_listening_head(host, port)
    code = "import sys; from edgecds.fleet.cluster import _probe_head; sys.exit(_probe_head(sys.argv[1]))"
    child_env = {k: v for k, v in os.environ.items() if k != TOKEN_VALUE_ENV} | env
    try:
        run = subprocess.run([sys.executable, "-P", "-c", code, f"{host}:{port}"], env=child_env, capture_output=True, text=True,
                             timeout=120)
    except subprocess.TimeoutExpired:
        raise EdgecdsError(f"the head at {host}:{port} did not answer in 120 s: is `edgecds fleet head` running there, and its port "
                           "open to this machine?") from None
    if run.returncode == REFUSED_TOKEN:
        raise _refused(host, port, env.get("RAY_AUTH_TOKEN_PATH"))
    if run.returncode != 0:
        lines = [line.strip() for line in (run.stdout or run.stderr).splitlines() if line.strip() and not line.startswith("[")]
        said = lines[-1] if lines else f"exit status {run.returncode}"  # the child's message, else the last line it wrote
        raise EdgecdsError(f"cannot reach the head at {host}:{port}: {said[:300].rstrip('.')}. Is `edgecds fleet head` running there, and its "
                           "port open to this machine?")


def _probe_head(address: str) -> int:
    """check_admitted's child: one request to the head's control service with this process's token."""
    ray = require_ray()
    from ray._raylet import GcsClient  # type: ignore[attr-defined]  # Ray's own client of the head, as `ray start` uses

    try:
        GcsClient(address=address).internal_kv_get(b"edgecds-probe", None, timeout=30)
    except Exception as exc:  # whatever Ray raises is the child's message to its parent
        if _refused_token(exc, ray):
            return REFUSED_TOKEN
        print(next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__))
        return 1
    return 0


def _with_node_options(argv: list[str], device: str | None, num_cpus: int | None, block: bool) -> list[str]:
    # one unit of the device's resource: a node measures one variant at a time, as a person would.
    # No CPU or GPU is offered to Ray's scheduler (fleet tasks ask for none), so no other Ray work
    # lands on a clinic's device, or beside a measurement.
    resources = {device_resource(device): 1} if device else {}
    return [*argv, f"--resources={json.dumps(resources)}", f"--num-cpus={num_cpus or 0}", "--num-gpus=0", *(["--block"] if block else [])]


def connect(address: str | None, token: Path | None = None) -> Any:
    """Connect this process to the cluster as a driver (it must run on one of its nodes, as Ray's
    drivers do); RAY_ADDRESS when no address is given; `token`: the token file (default: the home's)."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UsageError("name the cluster: --address HOST:PORT (or set RAY_ADDRESS); start one with `edgecds fleet head`")
    host, port = split_address(address)
    checked = checked_token(token_file(token))
    os.environ.pop(TOKEN_VALUE_ENV, None)
    os.environ.update(ray_environment(address, checked))  # before Ray reads its settings
    ray = require_ray()
    if ray.is_initialized():
        return ray
    require_listening_head(host, port)
    try:
        ray.init(address=f"{host}:{port}", _node_ip_address=node_ip_toward(address), include_dashboard=False,
                 log_to_driver=False, configure_logging=True, logging_level="WARNING")
    except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as exc:
        if _refused_token(exc, ray):  # Ray's last error says only "ConnectionError"; the one it replaced says why
            raise _refused(host, port, checked) from None
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise EdgecdsError(f"cannot join the Ray cluster at {host}:{port} as a driver: {first[:300]}. Is the head running "
                           "(`edgecds fleet head`)? Run fleet commands on a node of the cluster (the build machine)") from None
    return ray


def _refused(host: str, port: int, token: object) -> EdgecdsError:
    return EdgecdsError(f"the head at {host}:{port} refused this machine: the token in {token} is not the head's. Copy the head's "
                        "token file here (chmod 600), or name it with --token-file")


def _refused_token(exc: BaseException | None, ray: Any) -> bool:
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, ray.exceptions.AuthenticationError) or "authentication token" in str(exc).lower():
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    address: str
    alive: bool
    devices: list[str]
    cpus: float
    gpus: float
    memory_gib: float

    @classmethod
    def of(cls, raw: dict[str, Any]) -> NodeInfo:
        resources = raw.get("Resources") or {}
        return cls(str(raw.get("NodeID")), str(raw.get("NodeManagerAddress")), bool(raw.get("Alive")), devices_of(resources),
                   float(resources.get("CPU", 0)), float(resources.get("GPU", 0)), round(float(resources.get("memory", 0)) / 2**30, 1))


def list_nodes(ray: Any) -> list[NodeInfo]:
    return [NodeInfo.of(n) for n in ray.nodes()]


def live_kinds(ray: Any) -> dict[str, int]:
    """How many live nodes hold each device kind."""
    counts: dict[str, int] = {}
    for node in list_nodes(ray):
        if node.alive:
            for device in node.devices:
                counts[device] = counts.get(device, 0) + 1
    return counts
