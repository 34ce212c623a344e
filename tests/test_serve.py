"""`edgecds serve` for real, on loopback: a GGUF and an ONNX bundle of the default model.

Each promise of the server is tried against the running process: the token on every route,
loopback by default, the bundle checked at start, malformed requests answered 4xx without an
echo, a time limit that really stops generation (the next request is answered), stalled clients
that cannot hold the server, nothing of a prompt in its output or on disk, and a load of more
clients than slots answered only 200, 503 or the stated 4xx, with the server alive after.
Requests are bounded in count and time; nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from click.testing import CliRunner

from edgecds.cli import cli
from edgecds.hwbench.bench.bench_serve import free_port, peak_rss, start_server
from edgecds.quant.quantize import QuantizeResult

pytestmark = pytest.mark.slow  # every test here serves the real default model

ROOT = Path(__file__).resolve().parents[1]
SECRET = "Patient Jane Roe, 44, chest pain since 0300"
ESSAY = "Write a long essay on the history of medicine, with every detail you know, in numbered sections."


def _three_cases(folder: Path) -> Path:
    cases = folder / "cases.jsonl"
    cases.write_text("\n".join((ROOT / "toolkit" / "clinical" / "cases-v1.jsonl").read_text().splitlines()[:3]) + "\n")
    return cases


@pytest.fixture(scope="module")
def bundle(default_variants: QuantizeResult, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("serve") / "variants"
    shutil.copytree(default_variants.output_dir, folder)
    runner = CliRunner()
    out = runner.invoke(cli, ["profile", str(folder), "--types", "Q4_K_M", "--ctx", "1024", "-p", "32", "-n", "8", "-r", "1",
                              "--cases", str(_three_cases(folder.parent)), "--drift-chunks", "1", "-q"])
    assert out.exit_code == 0, out.output
    target = folder.parent / "bundle"
    out = runner.invoke(cli, ["bundle", str(folder / "results.json"), "-o", str(target)])
    assert out.exit_code == 0, out.output
    yield target
    shutil.rmtree(folder.parent, ignore_errors=True)  # a 1 GB copy: free it when the module is done


@pytest.fixture(scope="module")
def onnx_folder(onnx_variants: QuantizeResult) -> Path:
    """The session's ONNX variants of the default model (conftest): this module bundles its ONNX_INT8."""
    return Path(onnx_variants.output_dir)


@pytest.fixture(scope="module")
def onnx_bundle(onnx_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ONNX_INT8 bundle, its results written apart from the variants (as when they come back from
    the device on a stick) and the variants named with --variants."""
    runner = CliRunner()
    work = tmp_path_factory.mktemp("serve-onnx")
    results = work / "elsewhere" / "results.json"
    out = runner.invoke(cli, ["profile", str(onnx_folder), "--types", "ONNX_INT8", "--ctx", "1024", "-p", "32", "-n", "8", "-r", "1",
                              "--no-accuracy", "-o", str(results), "-q"])
    assert out.exit_code == 0, out.output
    target = work / "bundle"
    out = runner.invoke(cli, ["bundle", str(results), "--formats", "onnx", "-o", str(target)])
    assert out.exit_code != 0 and "--variants" in out.output  # the variants are not beside these results
    out = runner.invoke(cli, ["bundle", str(results), "--formats", "onnx", "--variants", str(onnx_folder), "-o", str(target)])
    assert out.exit_code == 0, out.output
    files = json.loads((target / "manifest.json").read_text())["files"]
    assert any(name.startswith("model/") and name.endswith("model.onnx") for name in files)  # the variant's folder, file by file
    return target


def _call(port: int, token: str | None, body: Any = None, path: str = "/v1/chat/completions", method: str = "POST",
          timeout: float = 120) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token is not None else {})}
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], **extra}


def _stop(proc: subprocess.Popen[bytes]) -> bytes:
    proc.terminate()
    out, err = proc.communicate(timeout=30)
    return out + err


def _files_holding(folder: Path, needle: bytes) -> list[Path]:
    found = []
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_size < (64 << 20) and needle in path.read_bytes():
            found.append(path)
    return found


@pytest.mark.parametrize("which", ["gguf", "onnx"])
def test_token_on_every_route_and_nothing_of_a_prompt_is_kept(which: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    folder: Path = request.getfixturevalue("bundle" if which == "gguf" else "onnx_bundle")
    home, scratch = tmp_path / "home", tmp_path / "tmp"
    scratch.mkdir()
    proc, port, token = start_server(folder, 1, 1, 8, env={"HOME": str(home), "EDGECDS_HOME": str(home / ".edgecds"), "TMPDIR": str(scratch)})
    try:
        for path, method in (("/v1/chat/completions", "POST"), ("/v1/models", "GET"), ("/nowhere", "GET")):
            assert _call(port, None, _chat("hello") if method == "POST" else None, path, method)[0] == 401  # no header
            assert _call(port, "wrong-token", _chat("hello") if method == "POST" else None, path, method)[0] == 401
        code, models = _call(port, token, None, "/v1/models", "GET")
        assert code == 200 and models["data"][0]["id"] == folder.name and "/" not in json.dumps(models["data"])  # no path exposed
        code, body = _call(port, token, _chat(SECRET, max_tokens=500))
        assert code == 200 and body["usage"]["completion_tokens"] <= 8 and body["choices"][0]["message"]["content"]
        assert body["model"] == folder.name
        assert _call(port, token, _chat("x" * 300_000))[0] == 413
    finally:
        output = _stop(proc)
    assert b"Jane Roe" not in output and b"chest pain" not in output  # not on stdout or stderr
    for where in (home, folder, scratch):  # its home, the bundle, and its temporary folder
        assert _files_holding(where, b"Jane Roe") == [], where


def _line_with(stream: Any, needle: bytes, seconds: float) -> bytes:
    """The first line of `stream` (a pipe) holding `needle`, read without blocking past `seconds`."""
    import selectors

    selector, buffered, deadline = selectors.DefaultSelector(), b"", time.monotonic() + seconds
    selector.register(stream, selectors.EVENT_READ)
    while time.monotonic() < deadline:
        if selector.select(timeout=max(0.0, deadline - time.monotonic())):
            chunk = os.read(stream.fileno(), 4096)
            if not chunk:
                break
            buffered += chunk
            for line in buffered.splitlines():
                if needle in line:
                    return line
    raise AssertionError(f"no line with {needle!r} within {seconds} s: {buffered[-2000:]!r}")


def test_serve_says_where_it_listens_on_a_pipe_answers_health_unauthenticated_and_stops_cleanly_on_sigterm(bundle: Path) -> None:
    """A supervisor's view (systemd, docker): the address on stderr though it is a pipe, a health
    route a probe can call without the token, and exit 0 on SIGTERM (not 143, a crash to systemd)."""
    token = "a-token-for-the-test"
    proc = subprocess.Popen([sys.executable, "-m", "edgecds", "serve", str(bundle), "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "EDGECDS_SERVE_TOKEN": token})
    try:
        line = _line_with(proc.stderr, b"listening on http://127.0.0.1:", 120).decode()
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        assert _call(port, None, None, "/health", "GET") == (200, {"status": "ok"})  # no token needed, nothing named
        assert _call(port, None, None, "/v1/models", "GET")[0] == 401  # every other route still needs it
        assert _call(port, token, None, "/v1/models", "GET")[0] == 200
        proc.send_signal(15)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and b"stopped (SIGTERM)" in err and b"Traceback" not in err, err[-2000:]


def test_serve_on_a_port_in_use_says_so(bundle: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(cli, ["serve", str(bundle), "--port", str(port), "--no-verify"], env={"EDGECDS_SERVE_TOKEN": "a-token-for-the-test"})
    assert result.exit_code == 1 and f"cannot listen on 127.0.0.1:{port}" in result.output and "--port" in result.output, result.output


def test_malformed_requests_get_4xx_that_echo_nothing(bundle: Path) -> None:
    proc, port, token = start_server(bundle, 1, 1, 8)
    marker = "Zebra-Quasar-9"
    try:
        cases = [
            (b"{not json " + marker.encode(), 400),
            (json.dumps({"messages": marker}).encode(), 422),
            (json.dumps({"messages": [{"role": "developer", "content": marker}]}).encode(), 422),
            (json.dumps({"messages": [{"role": "wizard", "content": marker}]}).encode(), 422),
            (json.dumps({"messages": [{"role": "user", "content": [marker]}]}).encode(), 422),
            (json.dumps({"messages": [{"role": "user", "content": marker}], "max_tokens": "lots"}).encode(), 422),
            (json.dumps([marker]).encode(), 400),
            (b"[" * 100_000 + marker.encode() + b"]" * 100_000, 400),  # RecursionError in json: was a 500 with a traceback
            (b'{"messages": [{"role": "user", "content": "\\ud800 ' + marker.encode() + b'"}]}', 422),  # a lone surrogate
        ]
        for raw, expected in cases:
            code, body = _call(port, token, raw)
            assert code == expected, (raw, code, body)
            assert marker not in json.dumps(body)
        assert _call(port, token, _chat("Hi", max_tokens=4))[0] == 200  # still serving
    finally:
        output = _stop(proc)
    assert marker.encode() not in output and b"Traceback" not in output


def test_a_timed_out_request_really_stops_and_the_next_is_answered(bundle: Path) -> None:
    """The landed server kept generating after its 504, and the next request crashed it
    (GGML_ASSERT, exit 134): here the essay stops at the limit and "hi" is answered."""
    proc, port, token = start_server(bundle, 1, 1, 300, "--timeout", "1.5")
    try:
        start = time.monotonic()
        code, body = _call(port, token, _chat(ESSAY, max_tokens=300))
        took = time.monotonic() - start
        assert code == 504 and "within 1.5 s" in body["error"]["message"], body
        assert took < 10, took
        code, body = _call(port, token, _chat("hi", max_tokens=4))
        assert code == 200 and proc.poll() is None, body
    finally:
        _stop(proc)


def test_loopback_by_default_and_the_bundle_is_checked_at_start(bundle: Path, tmp_path: Path) -> None:
    proc, port, _ = start_server(bundle, 1, 1, 8)
    try:
        listening = [c.laddr for c in psutil.Process(proc.pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        assert listening and all(addr.ip in ("127.0.0.1", "::1") for addr in listening), listening
    finally:
        _stop(proc)
    tampered = tmp_path / "tampered"
    shutil.copytree(bundle, tampered)
    card = tampered / "MODEL_CARD.md"
    card.write_text(card.read_text() + "\nedited\n")
    run = subprocess.run([sys.executable, "-m", "edgecds", "serve", str(tampered), "--port", "1"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "EDGECDS_SERVE_TOKEN": "a-token-for-the-test"})
    assert run.returncode == 1 and "MODEL_CARD.md: does not match the manifest" in run.stderr, run.stderr


def _stall(port: int, token: str, results: list[str]) -> None:
    """An authenticated client that sends its headers, promises a 1000-byte body, and sends none."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: 1000\r\n\r\n".encode())
        try:
            results.append(s.recv(200).decode(errors="replace").split("\r\n")[0])
        except OSError as exc:
            results.append(type(exc).__name__)


def test_stalled_clients_do_not_hold_the_server(bundle: Path) -> None:
    """Six authenticated clients promise a body and stall (on the landed server everyone else got
    503 for 132 s): a request meanwhile is served, and each staller gets 408 after --body-timeout."""
    proc, port, token = start_server(bundle, 1, 1, 8, "--body-timeout", "2")
    stalled: list[str] = []
    try:
        threads = [threading.Thread(target=_stall, args=(port, token, stalled)) for _ in range(6)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        start = time.monotonic()
        code, _ = _call(port, token, _chat("Hi", max_tokens=4))
        assert code == 200 and time.monotonic() - start < 30
        for t in threads:
            t.join(60)
    finally:
        _stop(proc)
    assert stalled == ["HTTP/1.1 408 Request Timeout"] * 6, stalled


def test_slow_unauthenticated_clients_do_not_take_every_connection(bundle: Path) -> None:
    """40 sockets with no token, one header byte a second: on the landed server every request got
    503 until they gave up (uvicorn has no deadline on headers). Here each is closed after
    --body-timeout, and a request that comes after that is answered."""
    proc, port, token = start_server(bundle, 1, 1, 8, "--body-timeout", "2")
    sockets = []
    closed = []
    try:
        for _ in range(40):
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            s.sendall(b"P")
            sockets.append(s)
        for _ in range(4):
            time.sleep(1)
            for s in sockets:
                try:
                    s.sendall(b"O")  # one more byte of the request line, never a whole header
                except OSError:
                    pass
        time.sleep(1)
        code, _ = _call(port, token, _chat("Hi", max_tokens=4), timeout=30)
        assert code == 200
        for s in sockets:
            s.settimeout(5)
            try:
                closed.append(s.recv(100) == b"")  # the server closed it: end of stream
            except OSError:
                closed.append(True)  # reset by the server
    finally:
        for s in sockets:
            s.close()
        _stop(proc)
    assert all(closed) and len(closed) == 40


def test_a_client_that_leaves_mid_answer_frees_its_slot(bundle: Path) -> None:
    """The landed server went on generating for a client who had gone (12-21 s of a slot)."""
    proc, port, token = start_server(bundle, 1, 1, 2000)
    try:
        body = json.dumps(_chat(ESSAY, max_tokens=2000)).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                      f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            time.sleep(1.0)  # generating by now; then the client leaves
        start = time.monotonic()
        code, answer = _call(port, token, _chat("Hi", max_tokens=4), timeout=60)
        waited = time.monotonic() - start
        assert code == 200
        # the essay (about 1,000 tokens at this context) would hold the only slot for far longer
        assert waited < 6, waited
    finally:
        _stop(proc)


def test_streaming_answers_in_pieces_for_both_formats(bundle: Path, onnx_bundle: Path) -> None:
    for folder in (bundle, onnx_bundle):
        proc, port, token = start_server(folder, 1, 1, 12)
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(_chat("Name a cause of fever.",
                                         stream=True)).encode(), method="POST", headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(req, timeout=120) as resp:
                assert resp.headers["content-type"].startswith("text/event-stream")
                events = [line[6:] for line in resp.read().decode().splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
            assert text.strip() and chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
            _, whole = _call(port, token, _chat("Name a cause of fever."))
            assert whole["choices"][0]["message"]["content"] == text.strip()  # greedy: the same answer either way
        finally:
            _stop(proc)


@pytest.mark.parametrize("which", ["gguf", "gguf-draft", "onnx"])
def test_more_clients_than_slots_get_only_stated_answers_and_the_server_survives(which: str, request: pytest.FixtureRequest) -> None:
    """6 clients on 1 slot and 1 queue place, 2 of them asking for long essays that pass the time
    limit, while 4 stalled clients hold connections: every one of the 18 answers is 200, 503 or
    504, some are served, the server answers afterwards, and its peak memory stays inside the
    device's budget; also with a speculative draft (the Q2_K variant) decoding for the slot."""
    folder: Path = request.getfixturevalue("onnx_bundle" if which == "onnx" else "bundle")
    budget = int(json.loads((folder / "manifest.json").read_text())["device"]["budget_gib"] * 2**30)
    draft: list[str] = []
    if which == "gguf-draft":
        variants: QuantizeResult = request.getfixturevalue("default_variants")
        draft = ["--draft", str(Path(variants.output_dir) / next(o.record.path for o in variants.outcomes if o.record.type == "Q2_K"))]
    proc, port, token = start_server(folder, 1, 1, 300, "--timeout", "1.5", "--body-timeout", "2", *draft)
    codes: list[int] = []
    stalled: list[str] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        essay = n < 2  # two essays, started first, fill the slot and the queue place and pass the time limit;
        # four short questions then try 4 times each, backing off 1 s on 503
        for _ in range(1 if essay else 4):
            body = _chat(ESSAY, max_tokens=300) if essay else _chat("Name one cause of chest pain.", max_tokens=8)
            try:
                code, _ = _call(port, token, body, timeout=60)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                code = 0  # no answer at all fails the check below
            with lock:
                codes.append(code)
            if code == 503:
                time.sleep(1.0)

    try:
        threads = [threading.Thread(target=_stall, args=(port, token, stalled)) for _ in range(4)]
        threads += [threading.Thread(target=client, args=(n,)) for n in range(6)]
        for t in threads[:6]:  # the stallers and the essays
            t.start()
        time.sleep(0.5)
        for t in threads[6:]:
            t.start()
        for t in threads:
            t.join(300)
        alive = proc.poll() is None and _call(port, token, _chat("Hi", max_tokens=4))[0] == 200
        peak = peak_rss(proc.pid)
    finally:
        _stop(proc)
    assert len(codes) == 18 and set(codes) <= {200, 503, 504}, codes
    assert codes.count(504) == 2 and codes.count(503) >= 1 and codes.count(200) >= 2, codes
    assert alive and stalled == ["HTTP/1.1 408 Request Timeout"] * 4, stalled
    assert 0 < peak <= budget


NETWORK_CALLS = "connect,sendto,sendmsg,sendmmsg"


def _network_attempts(log: Path) -> list[str]:
    """Every attempt an strace log shows to reach an address over IPv4 or IPv6 (loopback included:
    a DNS look-up goes to a local resolver first)."""
    return [line for line in log.read_text().splitlines() if "AF_INET" in line]


def _offline(cmd: list[str], tmp_path: Path, name: str) -> tuple[subprocess.CompletedProcess[str], list[str], Path]:
    """`cmd` under strace, following every child, with a fresh HOME; its network attempts."""
    if shutil.which("strace") is None:
        pytest.fail("strace is needed to watch every process's network calls: `make test` installs it")
    home, log = tmp_path / f"home-{name}", tmp_path / f"{name}.strace"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "EDGECDS_HOME": str(home / ".edgecds"), "EDGECDS_SERVE_TOKEN": "a-token-for-the-test"}
    env.pop("ORT_DISABLE_TELEMETRY", None)  # edgecds itself must turn onnxruntime's telemetry off
    run = subprocess.run(["strace", "-f", "-qq", "-e", f"trace={NETWORK_CALLS}", "-o", str(log), *cmd], capture_output=True, text=True,
                         env=env, timeout=900)
    return run, _network_attempts(log), home


@pytest.mark.parametrize("which", ["gguf", "onnx"])
def test_profile_eval_and_run_make_no_network_attempt(which: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Under strace, which sees every process and the engines' own C++ code: not one connect or
    send to an IP address, and no telemetry database under HOME (onnxruntime 1.32 writes one, and
    looks up its vendor's events host, unless told not to)."""
    folder: Path = request.getfixturevalue("bundle" if which == "gguf" else "onnx_bundle")
    variants = (folder.parent / "variants") if which == "gguf" else request.getfixturevalue("onnx_folder")
    kind = "Q4_K_M" if which == "gguf" else "ONNX_INT8"
    cases = _three_cases(tmp_path)
    for name, cmd in (
        ("profile", ["profile", str(variants), "--types", kind, "--ctx", "1024", "-p", "16", "-n", "4", "-r", "1", "--cases", str(cases),
                     "--drift-chunks", "1", "-o", str(tmp_path / "results.json"), "-q"]),
        ("run", ["run", str(folder), "-p", SECRET, "-n", "4"]),
    ):
        run, attempts, home = _offline([sys.executable, "-m", "edgecds", *cmd], tmp_path, name)
        assert run.returncode == 0, run.stderr[-2000:]
        assert attempts == [], attempts[:5]
        assert not (home / ".cache" / "Microsoft").exists()


@pytest.mark.parametrize("which", ["gguf", "onnx"])
def test_serve_makes_no_network_attempt(which: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    folder: Path = request.getfixturevalue("bundle" if which == "gguf" else "onnx_bundle")
    port = free_port()
    home, log = tmp_path / "home", tmp_path / "serve.strace"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "EDGECDS_HOME": str(home / ".edgecds"), "EDGECDS_SERVE_TOKEN": "a-token-for-the-test"}
    env.pop("ORT_DISABLE_TELEMETRY", None)
    proc = subprocess.Popen(["strace", "-f", "-qq", "-e", f"trace={NETWORK_CALLS}", "-o", str(log), sys.executable, "-m", "edgecds",
                             "serve", str(folder), "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                code, _ = _call(port, "a-token-for-the-test", _chat(SECRET, max_tokens=4), timeout=60)
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline and proc.poll() is None, "the server did not start"
                time.sleep(0.5)
        assert code == 200
    finally:
        children = psutil.Process(proc.pid).children(recursive=True)  # the server, below strace
        for child in children:
            child.terminate()
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            for child in children:
                child.kill()
            proc.kill()
            proc.communicate()
    assert _network_attempts(log) == []
    assert not (home / ".cache" / "Microsoft").exists()


def test_an_onnx_bundle_runs_and_serves_without_the_build_side(onnx_bundle: Path, tmp_path: Path) -> None:
    """The ONNX runtime on a device install: onnxruntime, tokenizers and numpy, no torch,
    transformers or Optimum in any process (the fused-graph compile child included)."""
    from tests.test_install_split import device_side_env

    env = device_side_env(tmp_path)
    env["EDGECDS_HOME"] = str(tmp_path / "fresh-home")  # compile the fused graph afresh, on the device side
    run = subprocess.run([sys.executable, "-m", "edgecds", "run", str(onnx_bundle), "-p", "Name a cause of fever.", "-n", "4"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0 and run.stdout.strip(), run.stderr[-2000:]
    proc, port, token = start_server(onnx_bundle, 1, 1, 4, env=env)
    try:
        code, body = _call(port, token, _chat("Name a cause of fever."))
        assert code == 200 and body["choices"][0]["message"]["content"]
    finally:
        _stop(proc)


def test_a_bundle_whose_chat_template_the_sandbox_refuses_is_a_message(onnx_bundle: Path, tmp_path: Path) -> None:
    """The template is model metadata from elsewhere (CVE-2024-34359): one that reaches for Python
    internals is refused by the sandbox, and `run` and `serve` say so instead of a traceback."""
    import hashlib

    hostile = tmp_path / "hostile"
    shutil.copytree(onnx_bundle, hostile)
    config_path = next(hostile.glob("model/*/tokenizer_config.json"))
    config = json.loads(config_path.read_text())
    config["chat_template"] = "{{ ''.__class__.__mro__[1].__subclasses__() }}{{ messages[0]['content'] }}"
    config_path.write_text(json.dumps(config))
    manifest = json.loads((hostile / "manifest.json").read_text())  # re-hashed, as an attacker would (unsigned bundle)
    data = config_path.read_bytes()
    manifest["files"][config_path.relative_to(hostile).as_posix()] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (hostile / "manifest.json").write_text(json.dumps(manifest))
    for args in (["run", str(hostile), "-p", "hello"], ["serve", str(hostile), "--port", str(free_port())]):
        result = subprocess.run([sys.executable, "-m", "edgecds", *args], capture_output=True, text=True, timeout=300,
                                env={**os.environ, "EDGECDS_SERVE_TOKEN": "a-token-for-the-test"})
        assert result.returncode == 1 and "chat template could not be rendered" in result.stderr, result.stderr[-1500:]
        assert "Traceback" not in result.stderr


def test_a_token_file_must_be_a_private_file_holding_a_token(tmp_path: Path) -> None:
    """A FIFO hung start-up, a mode-644 file was accepted and an empty one started a server nobody could use."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()

    def serve_with(token_file: Path) -> tuple[int, str]:
        result = CliRunner().invoke(cli, ["serve", str(bundle), "--token-file", str(token_file)])
        return result.exit_code, result.output

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    fifo.chmod(0o600)
    code, out = serve_with(fifo)  # returns at once: the FIFO is refused unopened
    assert code == 2 and "is not a file" in out
    shared = tmp_path / "shared"
    shared.write_text("a-long-enough-token\n")
    shared.chmod(0o644)
    code, out = serve_with(shared)
    assert code == 2 and "chmod 600" in out
    for text in ("", "\n", "short\n"):
        empty = tmp_path / "empty"
        empty.write_text(text)
        empty.chmod(0o600)
        code, out = serve_with(empty)
        assert code == 2 and "does not hold a serve token (one line of 8 or more characters)" in out, out
