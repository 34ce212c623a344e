"""`edgecds serve` for real: the bundled default model behind llama-cpp-python's server, guarded."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgecds.cli import cli
from edgecds.hwbench.bench.bench_serve import run_load, start_server
from edgecds.quantize import QuantizeResult

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle(default_variants: QuantizeResult, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("serve") / "variants"
    shutil.copytree(default_variants.output_dir, folder)
    cases = folder.parent / "cases.jsonl"
    cases.write_text("\n".join((ROOT / "toolkit" / "clinical" / "cases-v1.jsonl").read_text().splitlines()[:3]) + "\n")
    runner = CliRunner()
    out = runner.invoke(cli, ["profile", str(folder), "--types", "Q4_K_M", "--ctx", "1024", "-p", "32", "-n", "8", "-r", "1",
                              "--cases", str(cases), "-q"])
    assert out.exit_code == 0, out.output
    target = folder.parent / "bundle"
    out = runner.invoke(cli, ["bundle", str(folder / "results.json"), "-o", str(target)])
    assert out.exit_code == 0, out.output
    yield target
    shutil.rmtree(folder.parent, ignore_errors=True)  # a 1 GB copy: free it when the module is done


def _post(port: int, token: str, body: dict[str, object]) -> tuple[int, dict[str, object]]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_serve_answers_with_a_token_caps_tokens_and_logs_nothing(bundle: Path) -> None:
    proc, port, token = start_server(bundle, slots=1, queue=1, max_tokens=8)
    try:
        code, _ = _post(port, "wrong", {"messages": [{"role": "user", "content": "hello"}]})
        assert code == 401
        secret = "Patient Jane Roe, 44, chest pain since 0300"
        code, body = _post(port, token, {"messages": [{"role": "user", "content": secret}], "max_tokens": 500})
        assert code == 200
        assert body["usage"]["completion_tokens"] <= 8  # capped  # type: ignore[index]
        assert body["choices"][0]["message"]["content"]  # type: ignore[index]
        code, _ = _post(port, token, {"messages": [{"role": "user", "content": "x" * 300_000}]})
        assert code == 413
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert b"Jane Roe" not in err and b"chest pain" not in err  # prompts never reach the log


def test_more_clients_than_slots_get_200_or_503_and_the_server_survives(bundle: Path) -> None:
    report = run_load(bundle, clients=6, requests=12, seconds=180, slots=1, queue=1, max_tokens=16)
    assert report["only_200_or_503"] and report["requests"] == 12
    assert report["served"] >= 2 and report["refused_503"] >= 1
    assert report["server_alive_after"] and report["within_budget"]
