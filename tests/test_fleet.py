"""The fleet on a real local Ray cluster: several nodes on this machine (Ray's own multi-node test
utility, loopback only), labelled as device kinds, running the real engines on the default model.

Every node has its own EDGECDS_HOME (its own store of received files and its workspaces), as a
separate device would. The conftest's network guard covers every Ray process started here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from edgecds.cli import cli
from edgecds.digest import sha256_file
from edgecds.errors import EdgecdsError, InvalidInputError, NotEnoughDiskError, UsageError
from edgecds.fleet.cluster import (
    TOKEN_ENV,
    check_admitted,
    checked_token,
    connect,
    device_resource,
    head_environment,
    join_plan,
    make_token,
    ray_environment,
    split_address,
    token_file,
)
from edgecds.fleet.run import FleetConfig, FleetResult, JobOptions, run_fleet
from edgecds.fleet.transfer import STORE_ENV, Eviction, FileServer, FileSpec, fetch, in_use, place
from edgecds.results import load_results
from edgecds.target import resolve_target

ROOT = Path(__file__).resolve().parents[1]
OTHER = "jetson-orin-nano-8gb"  # a kind this machine is not: its records say so (on_target false)
QUICK = JobOptions(n_ctx=512, prompt_tokens=32, decode_tokens=8, repeats=1)
TYPES = ("Q8_0", "Q4_K_M")


@dataclass
class Fleet:
    cluster: Any
    address: str
    here: str  # the kind this machine is detected as
    nodes: dict[str, list[tuple[Any, Path]]] = field(default_factory=dict)  # kind -> (Ray node, its EDGECDS_HOME)

    def add(self, kind: str, home: Path) -> Any:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("EDGECDS_HOME", str(home))  # the node's processes, and so its tasks, inherit it
            mp.setenv("HOME", str(home))  # a device's own home, not the head's
            # what `fleet join` offers: the device's resource, no CPU or GPU for other Ray work
            node = self.cluster.add_node(num_cpus=0, num_gpus=0, resources={device_resource(kind): 1}, node_ip_address="127.0.0.1")
        self.nodes.setdefault(kind, []).append((node, home))
        return node


@pytest.fixture(scope="session")
def cluster_token(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One token for every cluster of the session: Ray reads a process's token once, and this
    process is the driver of each test's cluster."""
    return make_token(tmp_path_factory.mktemp("fleet-token") / "auth_token")


@pytest.fixture
def fleet(tmp_path: Path, cluster_token: Path) -> Iterator[Fleet]:
    """A head (the build machine: schedules only) and three device nodes: two of this machine's
    kind, one of another kind."""
    with pytest.MonkeyPatch.context() as mp:
        # what `fleet head` does: the head makes the token; every node and the driver hold a copy
        mp.setenv(TOKEN_ENV, str(cluster_token))
        env = head_environment("127.0.0.1:6379", make_token(token_file()))
        for name, value in env.items():
            if name != "HOME":
                mp.setenv(name, value)
        import ray
        from ray.cluster_utils import Cluster

        home = os.environ["HOME"]
        mp.setenv("HOME", env["HOME"])
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False, "node_ip_address": "127.0.0.1"})
        mp.setenv("HOME", home)
        connect(cluster.address)  # the driver attaches to the head (the build machine) before any device joins
        made = Fleet(cluster, cluster.address, resolve_target("auto").id)
        made.add(made.here, tmp_path / "node-a1")
        made.add(made.here, tmp_path / "node-a2")
        made.add(OTHER, tmp_path / "node-b")
        cluster.wait_for_nodes()
        try:
            yield made
        finally:
            ray.shutdown()
            cluster.shutdown()


@pytest.fixture
def variants(small_variants: Path) -> Path:
    return small_variants


def blobs(home: Path) -> list[Path]:
    folder = home / "fleet" / "blobs"
    return [p for p in folder.iterdir() if not p.name.startswith(".")] if folder.exists() else []


def by_status(result: FleetResult) -> dict[str, int]:
    counts: dict[str, int] = {}
    for task in result.tasks:
        counts[task.status] = counts.get(task.status, 0) + 1
    return counts


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def test_profile_and_eval_across_kinds_merge_into_results_bundle_and_report_accept(fleet: Fleet, variants: Path, tmp_path: Path) -> None:
    code, out = invoke("fleet", "status", "--address", fleet.address, "--json")
    assert code == 0, out
    kinds = sorted(d for n in json.loads(out)["nodes"] for d in n["devices"])
    assert kinds == sorted([fleet.here, fleet.here, OTHER])  # the head offers no device: it only schedules
    config = FleetConfig("profile", variants, (fleet.here, OTHER), fleet.address, TYPES, QUICK)
    result = run_fleet(config)
    assert by_status(result) == {"done": 4}, result.tasks
    results = load_results(variants / "results.json")
    assert results is not None
    measured = {(r.device, r.variant.type): r for r in results.records}
    assert sorted(measured) == sorted((d, t) for d in (fleet.here, OTHER) for t in TYPES)  # each (kind, variant) once
    assert len(results.records) == 4 and all(r.status == "measured" for r in results.records)
    assert all(r.on_target for (d, _), r in measured.items() if d == fleet.here)  # the node's own detection says so
    assert not any(r.on_target for (d, _), r in measured.items() if d == OTHER)
    assert all(r.host in results.hosts for r in results.records)
    other_nodes = {t.node for t in result.tasks if t.device == OTHER}
    assert other_nodes == {fleet.nodes[OTHER][0][0].node_id}  # scheduled only where the kind's resource is
    assert {t.node for t in result.tasks if t.device == fleet.here} <= {n.node_id for n, _ in fleet.nodes[fleet.here]}
    assert all(t.received_bytes > 0 for t in result.tasks)  # every file travelled by content to a node that lacked it

    cases = tmp_path / "cases.jsonl"
    cases.write_text("\n".join((ROOT / "toolkit" / "clinical" / "cases-v1.jsonl").read_text().splitlines()[:4]) + "\n")
    code, out = invoke("fleet", "eval", str(variants), "--devices", fleet.here, "--address", fleet.address, "--types", ",".join(TYPES),
                       "--cases", str(cases), "--no-drift", "--json", "-q")
    assert code == 0, out
    evaluated = json.loads(out)
    assert [t["status"] for t in evaluated["tasks"]] == ["done", "done"]
    results = load_results(variants / "results.json")
    assert results is not None
    assert {e.variant.type for e in results.evaluations} == {"F16", *TYPES}
    assert all(e.paired is not None for e in results.evaluations if e.variant.type in TYPES)
    assert len(results.records) == 4  # the measurements are still there

    code, out = invoke("bundle", str(variants / "results.json"), "--device", fleet.here, "-o", str(tmp_path / "bundle"), "--json")
    assert code == 0, out
    assert json.loads(out[out.index("{"):])["choice"]["chosen"]["variant"] in TYPES
    code, out = invoke("report", str(variants / "results.json"), "-o", str(tmp_path / "report.html"))
    assert code == 0, out
    assert (tmp_path / "report.html").stat().st_size > 0

    again = run_fleet(config)  # a re-run measures nothing twice
    assert by_status(again) == {"reused": 4}
    after = load_results(variants / "results.json")
    assert after is not None and sorted(r.key for r in after.records) == sorted(r.key for r in results.records)

    # the cluster's token is in no result, task log or Ray log: only its file's path travels
    token = token_file().read_text()
    session = Path(fleet.cluster.head_node.get_session_dir_path())
    written = [variants / "results.json", variants / "fleet.json", *(p for p in session.rglob("*") if p.is_file())]
    assert len(written) > 10 and not [p for p in written if token.encode() in p.read_bytes()]


def test_a_machine_without_the_head_s_token_is_refused(fleet: Fleet, tmp_path: Path) -> None:
    """Ray's token authentication is on: a driver holding another token gets a message saying so."""
    other = make_token(tmp_path / "other-token")
    assert other.read_text() != token_file().read_text()
    status = [sys.executable, "-m", "edgecds", "fleet", "status", "--address", fleet.address, "--json", "--token-file"]
    run = subprocess.run([*status, str(other)], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "refused this machine" in run.stderr and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert other.read_text() not in run.stderr + run.stdout
    run = subprocess.run([*status, str(token_file())], capture_output=True, text=True, timeout=300)  # the head's own token
    assert run.returncode == 0 and len(json.loads(run.stdout)["nodes"]) == 4, run.stderr[-2000:]
    # `fleet join` asks first: Ray's own join would wait forever on a refused token
    with pytest.raises(EdgecdsError, match="refused this machine: the token in .*other-token"):
        check_admitted(fleet.address, ray_environment(fleet.address, other))
    check_admitted(fleet.address, ray_environment(fleet.address, token_file()))


def test_token_files_are_made_private_and_checked(tmp_path: Path) -> None:
    made = make_token(tmp_path / "fleet" / "auth_token")
    token = made.read_text()
    assert len(token) == 64 and int(token, 16) >= 0 and made.stat().st_mode & 0o777 == 0o600
    assert make_token(made).read_text() == token  # kept: a restarted head accepts the nodes holding it
    with pytest.raises(UsageError, match="no cluster token at .*copy the head's token file"):
        checked_token(tmp_path / "missing")
    made.chmod(0o644)
    with pytest.raises(UsageError, match="chmod 600"):
        checked_token(made)
    made.chmod(0o600)
    for bad in (b"", b"short", b"\xff" * 40, b"two words " * 8, b"\n" + token.encode()):  # Ray reads the first line
        garbage = tmp_path / "garbage"
        garbage.write_bytes(bad)
        garbage.chmod(0o600)
        with pytest.raises(UsageError, match="does not hold a cluster token"):
            checked_token(garbage)
    with pytest.raises(UsageError, match="not a file"):
        checked_token(tmp_path / "fleet")
    code, out = invoke("fleet", "join", "10.0.0.5:6379", "--token-file", str(tmp_path / "missing"), "--json")
    assert code != 0 and "no cluster token" in out


def test_a_node_that_holds_a_file_by_hash_is_not_sent_it_again(fleet: Fleet, variants: Path) -> None:
    config = FleetConfig("profile", variants, (OTHER,), fleet.address, ("Q4_K_M",), QUICK)
    first = run_fleet(config)
    assert [t.status for t in first.tasks] == ["done"] and first.tasks[0].received_bytes > 0
    second = run_fleet(FleetConfig("profile", variants, (OTHER,), fleet.address, ("Q4_K_M",), JobOptions(**{**QUICK.__dict__, "force": True}),
                                   again=True))
    assert [t.status for t in second.tasks] == ["done"]
    assert second.tasks[0].received_bytes == 0 and second.tasks[0].reused_files == 1


def test_a_changed_file_never_leaves_the_build_machine_and_a_kind_without_nodes_is_reported(fleet: Fleet, variants: Path) -> None:
    target = next(variants.glob("*Q4_K_M.gguf"))
    with open(target, "r+b") as handle:  # same size, one byte changed after quantize recorded its hash
        handle.seek(target.stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))
    code, out = invoke("fleet", "profile", str(variants), "--devices", f"{OTHER},rtx-3060-12gb", "--address", fleet.address,
                       "--types", "Q4_K_M", "-r", "1", "-p", "32", "-n", "8", "--ctx", "512", "--json", "-q")
    assert code == 1, out
    tasks = {t["device"]: t for t in json.loads(out)["tasks"]}
    assert tasks[OTHER]["status"] == "failed" and "changed since" in tasks[OTHER]["reason"]
    assert tasks["rtx-3060-12gb"]["status"] == "no-node" and "fleet join" in tasks["rtx-3060-12gb"]["reason"]
    assert blobs(fleet.nodes[OTHER][0][1]) == []  # nothing sent
    results = load_results(variants / "results.json")
    assert results is None or not results.records
    log = json.loads((variants / "fleet.json").read_text())
    assert {t["status"] for t in log["tasks"].values()} == {"failed", "no-node"}


def test_a_file_altered_on_the_way_is_refused_on_arrival_before_anything_loads(fleet: Fleet, variants: Path, tmp_path: Path) -> None:
    """The node's own check: the build machine offers bytes that are not the recorded ones."""
    import ray
    from ray.exceptions import RayTaskError

    from edgecds.adopt import open_variants
    from edgecds.fleet.node import TaskSpec, run_task
    from edgecds.fleet.transfer import FileSpec, start_server

    folder, record = open_variants(variants)
    variant = record.by_type()["Q4_K_M"]
    altered = tmp_path / "altered.gguf"
    data = bytearray((variants / variant.path).read_bytes())
    data[len(data) // 2] ^= 0xFF
    altered.write_bytes(bytes(data))
    server = start_server(ray, {variant.sha256: str(altered)})
    spec = TaskSpec("profile", OTHER, "Q4_K_M", dict(record.source.__dict__), [dict(variant.__dict__)],
                    [FileSpec(variant.path, variant.sha256, variant.file_size)], dict(QUICK.__dict__))
    ref = ray.remote(run_task).options(resources={device_resource(OTHER): 1}, num_cpus=0).remote(spec, server)
    with pytest.raises(RayTaskError, match="refused before loading"):
        ray.get(ref, timeout=120)
    home = fleet.nodes[OTHER][0][1]
    assert blobs(home) == [] and not list((home / "fleet" / "blobs").glob(".*.part"))  # nothing kept
    assert not list((home / "fleet").glob("work/*/*.gguf"))  # nothing placed where it could load


def _kill_when_received(fleet: Fleet, kind: str, removed: list[str], stop: threading.Event) -> None:
    """Remove the node of `kind` that has received its file (so it runs the task), once."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not stop.is_set():
        for node, home in fleet.nodes[kind]:
            if blobs(home):
                fleet.cluster.remove_node(node, allow_graceful=False)
                removed.append(node.node_id)
                return
        time.sleep(0.05)


def test_a_killed_node_s_task_is_retried_on_another_of_its_kind_or_recorded_as_failed(fleet: Fleet, variants: Path) -> None:
    removed: list[str] = []
    stop = threading.Event()
    killers = [threading.Thread(target=_kill_when_received, args=(fleet, kind, removed, stop)) for kind in (fleet.here, OTHER)]
    for killer in killers:
        killer.start()
    # three fresh processes of pp64/tg32 after the file arrives: seconds in which the node dies
    slow = JobOptions(n_ctx=512, prompt_tokens=64, decode_tokens=32, repeats=3)
    try:
        result = run_fleet(FleetConfig("profile", variants, (fleet.here, OTHER), fleet.address, ("Q8_0",), slow, poll_seconds=0.5))
    finally:
        stop.set()
        for killer in killers:
            killer.join()
    assert len(removed) == 2
    tasks = {t.device: t for t in result.tasks}
    assert tasks[fleet.here].status == "done" and tasks[fleet.here].node not in removed  # retried on the other node of the kind
    assert tasks[OTHER].status == "failed"  # its only node died: recorded, not waited on
    assert "died" in tasks[OTHER].reason or "left" in tasks[OTHER].reason
    results = load_results(variants / "results.json")
    assert results is not None and [(r.device, r.status) for r in results.records] == [(fleet.here, "measured")]


def test_cluster_settings_keep_traffic_to_the_named_cluster() -> None:
    env = head_environment("127.0.0.1:6379", make_token(token_file()))
    assert env["RAY_USAGE_STATS_ENABLED"] == "0" and env["RAY_USAGE_STATS_REPORT_URL"].startswith("http://127.0.0.1:")
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"] == str(token_file().resolve())
    assert token_file().read_text() not in json.dumps(env)
    assert (Path(env["HOME"]) / "ray_bootstrap_config.yaml").read_text().count("type: local") == 1
    code, out = invoke("fleet", "head", "--json")
    assert code == 0, out
    plan = json.loads(out[out.index("{"):])
    argv = plan["argv"]
    assert "--include-dashboard=false" in argv and "--disable-usage-stats" in argv
    assert plan["env"]["RAY_AUTH_MODE"] == "token" and token_file().read_text() not in out
    with pytest.raises(UsageError, match="loopback"):
        join_plan("127.0.0.1:6379", OTHER, None, True)
    for bad in ("10.0.0.5:notaport", "auto", "fd00::5", "10.0.0.5:0"):
        with pytest.raises(UsageError):
            split_address(bad)
    assert split_address("[fd00::5]:7000") == ("fd00::5", 7000) and split_address("10.0.0.5") == ("10.0.0.5", 6379)
    code, out = invoke("fleet", "head", "--address", "127.0.0.1:18060", "--json")  # was Ray's ValueError, a traceback
    assert code == 2 and "ports 10002-19999" in out and "Traceback" not in out
    code, out = invoke("fleet", "profile", str(ROOT), "--devices", "no-such-device", "--address", "127.0.0.1:1")
    assert code != 0 and "no-such-device" in out


def test_join_offers_the_detected_device_and_nothing_else(monkeypatch: pytest.MonkeyPatch) -> None:
    import edgecds.fleet.cluster as cluster

    # the route toward a real head is asked of the kernel with a UDP socket; here it is given
    monkeypatch.setattr(cluster, "node_ip_toward", lambda address: "10.0.0.9")
    make_token(token_file())  # the head's token, copied here
    code, out = invoke("fleet", "join", "10.0.0.5:6379", "--json")
    assert code == 0, out
    plan = json.loads(out)
    detected = resolve_target("auto").id
    assert plan["device"] == detected
    argv = plan["argv"]
    assert argv[1:3] == ["start", "--address=10.0.0.5:6379"] and "--node-ip-address=10.0.0.9" in argv
    assert json.loads(next(a for a in argv if a.startswith("--resources="))[len("--resources="):]) == {device_resource(detected): 1}
    assert "--num-cpus=0" in argv and "--num-gpus=0" in argv and "--disable-usage-stats" in argv and "--block" in argv
    assert plan["env"]["RAY_USAGE_STATS_ENABLED"] == "0" and "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in plan["env"]
    assert plan["env"]["RAY_AUTH_MODE"] == "token" and plan["env"]["RAY_AUTH_TOKEN_PATH"] == str(token_file().resolve())
    code, out = invoke("fleet", "join", "10.0.0.5:6379", "--device", OTHER, "--json")
    assert code == 0 and json.loads(out[out.index("{"):])["device"] == OTHER and "on_target false" in out


class _Direct:
    """The build machine's file server called in this process, as Ray would call it on the node."""

    def __init__(self, files: dict[str, str]) -> None:
        server = FileServer(files)
        self.read = type("Remote", (), {"remote": staticmethod(server.read)})

    @staticmethod
    def get(value: Any) -> Any:  # stands for ray.get: the value is already here
        return value


def test_a_node_s_store_stays_within_its_limit_by_deleting_the_least_recently_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGECDS_HOME", str(tmp_path / "node"))
    build = tmp_path / "build"
    build.mkdir()
    specs, files = [], {}
    for n in range(4):
        path = build / f"model-{n}.gguf"
        path.write_bytes(bytes([n]) * (1 << 20))
        specs.append(FileSpec(path.name, sha256_file(path), 1 << 20))
        files[specs[-1].sha256] = str(path)
    a, b, c, d = specs
    server = _Direct(files)
    store = tmp_path / "node" / "fleet" / "blobs"
    work = tmp_path / "node" / "fleet" / "work" / "profile-x-jetson"
    monkeypatch.setenv(STORE_ENV, str(2.5 / 1024))  # 2.5 MiB: two of the files
    held = {}
    for spec, used in ((a, 1_000_000), (b, 2_000_000)):  # a arrived first, then b, long ago
        with in_use([spec.sha256]):
            held[spec.sha256], arrival = fetch(server, server, spec)
        assert arrival.received_bytes == 1 << 20 and arrival.evicted == Eviction(0, 0)
        place(held[spec.sha256], work, spec.relpath)
        os.utime(held[spec.sha256], ns=(used * 10**9, used * 10**9))
    assert fetch(server, server, a)[1].reused  # a used again: now b is the least recently used
    assert held[a.sha256].stat().st_mtime_ns == 1_000_000 * 10**9  # only the access time says so: engines key caches on mtime
    with in_use([c.sha256]):
        blob, arrival = fetch(server, server, c)
    assert arrival.evicted == Eviction(1, 1 << 20) and arrival.received_bytes == 1 << 20
    assert not held[b.sha256].exists() and not (work / b.relpath).exists()  # its workspace link too, or no space comes back
    assert held[a.sha256].exists() and (work / a.relpath).exists() and blob.exists()
    # files a running task uses (this node's, or another's sharing the home) are never deleted for
    # another: the limit is then an error that says so, and nothing is deleted
    with in_use([a.sha256, c.sha256]), in_use([d.sha256]):
        with pytest.raises(NotEnoughDiskError, match="over its limit.*nothing was deleted"):
            fetch(server, server, d)
    assert held[a.sha256].exists() and blob.exists() and not list(store.glob(".*.part")) and not list(store.glob(".in-use.*"))
    monkeypatch.setenv(STORE_ENV, str(0.5 / 1024))
    with pytest.raises(NotEnoughDiskError, match="over its limit"):
        fetch(server, server, d)
    assert held[a.sha256].exists() and blob.exists()  # nothing deleted for a file that could never fit
    (store / ".in-use.999999999.x").write_text(a.sha256)  # a marker whose task's process is gone counts for nothing
    monkeypatch.setenv(STORE_ENV, str(2.5 / 1024))
    with in_use([d.sha256]):
        assert fetch(server, server, d)[1].evicted == Eviction(1, 1 << 20)
    assert not held[a.sha256].exists() and not list(store.glob(".in-use.*"))
    monkeypatch.setenv(STORE_ENV, "lots")
    with pytest.raises(InvalidInputError, match="GiB"):
        fetch(server, server, b)
    monkeypatch.delenv(STORE_ENV)
    assert fetch(server, server, b)[1].evicted == Eviction(0, 0)  # no limit but the disk's: nothing deleted
    import edgecds.fleet.cluster as cluster

    monkeypatch.setattr(cluster, "node_ip_toward", lambda address: "10.0.0.9")  # asked of the kernel for a real head
    token = str(make_token(tmp_path / "t"))
    code, out = invoke("fleet", "join", "10.0.0.5:6379", "--store-gib", "20", "--json", "--token-file", token)
    assert code == 0 and float(json.loads(out[out.index("{"):])["env"][STORE_ENV]) == 20
    code, out = invoke("fleet", "join", "10.0.0.5:6379", "--store-gib", "nan", "--json", "--token-file", token)
    assert code == 2 and "--store-gib" in out


def test_fleet_status_with_no_head_says_so_within_seconds() -> None:
    """It retried past 420 s with only Ray's warnings."""
    import socket
    import time

    make_token(token_file())
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start = time.monotonic()
    code, out = invoke("fleet", "status", "--address", f"127.0.0.1:{port}")
    assert code == 1 and f"no head at 127.0.0.1:{port} (nothing listens on that port)" in out, out
    assert time.monotonic() - start < 30
