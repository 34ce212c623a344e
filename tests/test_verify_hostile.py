"""`verify`, `run` and `serve` against hostile bundles, fast: no engine is needed to refuse them.

Each case was reproduced on the landed code (issue 22): archives that wrote gigabytes before
being refused, a signature.json that was a link to /dev/zero or a FIFO, a runtime.json naming a
model outside the bundle, a manifest listing nothing, an unsigned bundle run where a signature
was required. Every refusal here happens before anything is written or loaded.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgecds.bundle.layout import VerifyError
from edgecds.bundle.verify import MAX_MEMBERS, safe_extract, verify_bundle
from edgecds.cli import cli


def _entry(data: bytes) -> dict[str, object]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def fake_bundle(folder: Path, runtime: dict[str, object] | None = None, files: dict[str, bytes] | None = None,
                listed: list[str] | None = None) -> Path:
    """A bundle that verifies byte for byte (a tiny stand-in model file), to be damaged by a test."""
    folder.mkdir(parents=True)
    runtime = runtime or {"format": "gguf", "model": "model/m.gguf", "n_ctx": 512, "threads": 1}
    contents = {"model/m.gguf": b"GGUF" + b"\0" * 60, "runtime.json": json.dumps(runtime).encode(), **(files or {})}
    for name, data in contents.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    names = listed if listed is not None else list(contents)
    manifest = {"schema_version": 1, "files": {n: _entry(contents[n]) for n in names}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_the_stand_in_bundle_verifies(tmp_path: Path) -> None:
    assert verify_bundle(fake_bundle(tmp_path / "b")).files == 2


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _manifest_member(top: str, sizes: dict[str, int]) -> tuple[tarfile.TarInfo, bytes]:
    return _file(f"{top}/manifest.json", json.dumps({"schema_version": 1, "files": {k: {"sha256": "0" * 64, "size": v}
                                                                                    for k, v in sizes.items()}}).encode())


@pytest.fixture
def into(tmp_path: Path) -> Path:
    folder = tmp_path / "into"
    folder.mkdir()
    return folder


def test_a_sparse_member_is_refused_before_anything_is_written(tmp_path: Path, into: Path) -> None:
    src = tmp_path / "src" / "b"
    src.mkdir(parents=True)
    (src / "manifest.json").write_text(json.dumps({"schema_version": 1, "files": {"model.bin": {"sha256": "0" * 64, "size": 8 << 30}}}))
    with open(src / "model.bin", "wb") as fh:
        fh.truncate(8 << 30)  # 8 GiB of holes: GNU tar stores it sparse, in a few hundred bytes
    archive = tmp_path / "sparse.tar.gz"
    subprocess.run(["tar", "-czSf", str(archive), "-C", str(src.parent), "b"], check=True)
    assert archive.stat().st_size < 100_000
    with pytest.raises(VerifyError, match="sparse file .*refused, nothing extracted"):
        safe_extract(archive, into)
    assert list(into.iterdir()) == []


def test_a_member_larger_than_the_manifest_says_is_refused_unwritten(tmp_path: Path, into: Path) -> None:
    bomb = b"\0" * (64 << 20)  # 64 MiB of zeros: 64 KiB compressed
    archive = _tar(tmp_path / "bomb.tar.gz", [_manifest_member("b", {"model.bin": 10}), _file("b/model.bin", bomb)])
    assert archive.stat().st_size < 1 << 20
    with pytest.raises(VerifyError, match=r"'b/model.bin' is 67108864 bytes, the manifest says 10; refused, nothing extracted"):
        safe_extract(archive, into)
    assert list(into.iterdir()) == []


def test_more_than_the_free_disk_is_refused_unwritten(tmp_path: Path, into: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = b"\0" * (1 << 20)
    archive = _tar(tmp_path / "big.tar.gz", [_manifest_member("b", {"model.bin": len(data)}), _file("b/model.bin", data)])
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=(1 << 20)))  # a disk with 1 MiB free
    with pytest.raises(VerifyError, match="MiB free; .*nothing extracted"):
        safe_extract(archive, into)
    assert list(into.iterdir()) == []


def test_too_many_members_are_refused_unwritten(tmp_path: Path, into: Path) -> None:
    members = [_manifest_member("b", {})] + [_file(f"b/f{i}", b"") for i in range(MAX_MEMBERS + 10)]
    with pytest.raises(VerifyError, match=f"more than {MAX_MEMBERS} members"):
        safe_extract(_tar(tmp_path / "many.tar.gz", members), into)
    assert list(into.iterdir()) == []


def test_a_file_and_a_folder_of_one_name_are_refused(tmp_path: Path, into: Path) -> None:
    folder = tarfile.TarInfo("b/model")
    folder.type = tarfile.DIRTYPE
    members = [_manifest_member("b", {"model": 1, "model/x": 1}), _file("b/model", b"x"), (folder, None), _file("b/model/x", b"x")]
    code = CliRunner().invoke(cli, ["verify", str(_tar(tmp_path / "clash.tar.gz", members))])
    assert code.exit_code == 1 and "appears twice" in code.output and "Traceback" not in code.output


def test_a_truncated_archive_is_named_not_aborted(tmp_path: Path) -> None:
    bundle = fake_bundle(tmp_path / "b")
    archive = tmp_path / "b.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(bundle, arcname="b")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    result = CliRunner().invoke(cli, ["verify", str(archive)])
    assert result.exit_code == 1 and "not a complete, readable bundle archive" in result.output and "fetch it again" in result.output


@pytest.mark.parametrize("kind", ["link to /dev/zero", "fifo", "folder", "huge"])
def test_signature_json_is_never_opened_unless_a_plain_bounded_file(tmp_path: Path, kind: str) -> None:
    bundle = fake_bundle(tmp_path / "b")
    sig = bundle / "signature.json"
    if kind == "link to /dev/zero":
        sig.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(sig)  # opening it for reading would block forever
    elif kind == "folder":
        sig.mkdir()
    else:
        sig.write_bytes(b" " * (1 << 20))
    with pytest.raises(VerifyError, match="signature.json: (not a plain file|1048576 bytes)"):
        verify_bundle(bundle)


def test_a_model_outside_the_bundle_is_refused_even_when_the_manifest_agrees(tmp_path: Path) -> None:
    bundle = fake_bundle(tmp_path / "b", runtime={"format": "gguf", "model": "/etc/hostname", "n_ctx": 512, "threads": 1})
    with pytest.raises(VerifyError, match=r"model '/etc/hostname' is not a path inside the bundle"):
        verify_bundle(bundle)
    escape = fake_bundle(tmp_path / "c", runtime={"format": "gguf", "model": "../c-model.gguf", "n_ctx": 512, "threads": 1})
    with pytest.raises(VerifyError, match="not a path inside the bundle"):
        verify_bundle(escape)


def test_a_manifest_that_lists_nothing_or_not_the_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(VerifyError, match="does not list runtime.json"):
        verify_bundle(fake_bundle(tmp_path / "a", listed=[]))
    unlisted = fake_bundle(tmp_path / "b", listed=["runtime.json"])
    (unlisted / "model" / "m.gguf").unlink()
    with pytest.raises(VerifyError, match="its model 'model/m.gguf' is not listed in the manifest"):
        verify_bundle(unlisted)


def _drafted(model: object, n: object = 8, p_min: object = 0.75) -> dict[str, object]:
    return {"format": "gguf", "model": "model/m.gguf", "n_ctx": 512, "threads": 1, "draft": {"model": model, "max_tokens": n, "p_min": p_min}}


def test_a_draft_model_must_be_inside_the_bundle_listed_and_well_formed(tmp_path: Path) -> None:
    """runtime.json's speculative draft (bundle --draft) is checked as its model is; the archive too."""
    assert verify_bundle(fake_bundle(tmp_path / "ngram", runtime=_drafted("ngram"))).files == 2
    assert verify_bundle(fake_bundle(tmp_path / "model", runtime=_drafted("model/d.gguf"), files={"model/d.gguf": b"GGUF"})).files == 3
    with pytest.raises(VerifyError, match="draft model '/etc/hostname' is not a path inside the bundle"):
        verify_bundle(fake_bundle(tmp_path / "outside", runtime=_drafted("/etc/hostname")))
    unlisted = fake_bundle(tmp_path / "unlisted", runtime=_drafted("model/d.gguf"))
    with pytest.raises(VerifyError, match="its draft model .*d.gguf' is not listed in the manifest"):
        verify_bundle(unlisted)
    for bad in (_drafted(5), _drafted("ngram", n="8"), _drafted("ngram", p_min=True), _drafted("ngram", n=0)):
        with pytest.raises(VerifyError, match="draft"):
            verify_bundle(fake_bundle(tmp_path / f"bad-{len(list(tmp_path.iterdir()))}", runtime=bad))


@pytest.mark.parametrize("entry", [[], "x", {"size": "1"}, {"sha256": 5, "size": 1}])
def test_a_manifest_entry_of_the_wrong_shape_is_named(tmp_path: Path, entry: object) -> None:
    bundle = fake_bundle(tmp_path / "b")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["runtime.json"] = entry
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(cli, ["verify", str(bundle)])
    assert result.exit_code == 1 and "the entry for 'runtime.json' is not" in result.output and "Traceback" not in result.output


def test_a_required_signature_is_required_by_run_and_serve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = fake_bundle(tmp_path / "b")  # verifies, but is not signed
    key = "ab" * 32
    for args in (["run", str(bundle), "-p", "hello", "--key", key], ["serve", str(bundle), "--key", key, "--token-file", str(tmp_path / "t")]):
        (tmp_path / "t").write_text("a-long-enough-token")
        (tmp_path / "t").chmod(0o600)  # a token file others can read is refused (test_serve)
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1 and "the bundle is not signed" in result.output, result.output
    monkeypatch.setenv("EDGECDS_TRUSTED_KEY", key)  # the device's policy, without a flag
    result = CliRunner().invoke(cli, ["run", str(bundle), "-p", "hello"])
    assert result.exit_code == 1 and "the bundle is not signed" in result.output
    result = CliRunner().invoke(cli, ["verify", str(bundle)])
    assert result.exit_code == 1 and "the bundle is not signed" in result.output


def test_an_archive_error_names_the_archive_not_a_deleted_temporary_folder(tmp_path: Path) -> None:
    bundle = fake_bundle(tmp_path / "b")
    (bundle / "runtime.json").write_text((bundle / "runtime.json").read_text() + " ")  # one byte more than the manifest says
    archive = tmp_path / "b.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(bundle, arcname="b")
    result = CliRunner().invoke(cli, ["verify", str(archive)])
    assert result.exit_code == 1 and str(archive) in result.output and "edgecds-verify-" not in result.output, result.output


def test_a_chat_template_the_sandbox_refuses_is_a_message() -> None:
    from edgecds.engine.chat_template import render_chat
    from edgecds.errors import EngineError

    hostile = "{{ ''.__class__.__mro__[1].__subclasses__() }}"  # CVE-2024-34359's way out of the template
    with pytest.raises(EngineError, match="chat template could not be rendered .*SecurityError"):
        render_chat(hostile, [], "", "")


def test_a_token_on_the_command_line_is_warned_about_and_a_token_file_is_read(tmp_path: Path) -> None:
    bundle = fake_bundle(tmp_path / "b")
    (bundle / "MODEL_CARD.md").write_text("edited")  # not in the manifest: serve stops at its check, after reading the options
    result = CliRunner().invoke(cli, ["serve", str(bundle), "--token", "s3cret-on-the-command-line"])
    assert result.exit_code == 1 and "visible to other users in the process list" in result.output
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-in-a-file\n")
    token_file.chmod(0o600)  # a token file other users can read is refused (test_serve)
    result = CliRunner().invoke(cli, ["serve", str(bundle), "--token-file", str(token_file)])
    assert result.exit_code == 1 and "process list" not in result.output and "not listed in the manifest" in result.output


def test_an_archive_in_another_compression_is_refused_unopened(tmp_path: Path) -> None:
    """Only the uncompressed tar (and the gzip one earlier versions wrote) is read: xz or bz2 can ask
    for decoder memory without bound."""
    bundle = fake_bundle(tmp_path / "b")
    for mode in ("w:xz", "w:bz2"):
        archive = tmp_path / f"{mode[2:]}.tar"
        with tarfile.open(archive, mode) as tar:  # type: ignore[call-overload]
            tar.add(bundle, arcname="b")
        result = CliRunner().invoke(cli, ["verify", str(archive)])
        assert result.exit_code == 1 and "not a complete, readable bundle archive" in result.output, result.output


def test_the_gzip_archives_earlier_versions_wrote_still_verify(tmp_path: Path) -> None:
    bundle = fake_bundle(tmp_path / "b")
    archive = tmp_path / "b.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(bundle, arcname="b")
    result = CliRunner().invoke(cli, ["verify", str(archive)])
    assert result.exit_code == 0 and "OK: 2 files" in result.output, result.output


@pytest.mark.parametrize("size", [10**400, -1, True, 2**63])
def test_a_manifest_size_no_file_can_have_is_a_message(tmp_path: Path, size: object) -> None:
    bundle = fake_bundle(tmp_path / "b")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["model/m.gguf"]["size"] = size
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(cli, ["verify", str(bundle)])
    assert result.exit_code == 1 and "a size a file can have" in result.output, result.output


def test_unpacking_a_damaged_archive_leaves_nothing(tmp_path: Path) -> None:
    """`verify --into`: a member whose bytes differ from the manifest is found as the archive is read,
    before anything is written."""
    bundle = fake_bundle(tmp_path / "b")
    (bundle / "model" / "m.gguf").write_bytes(b"GGUF" + b"\1" * 60)  # same size, other bytes
    archive = tmp_path / "b.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(bundle, arcname="b")
    into = tmp_path / "into"
    result = CliRunner().invoke(cli, ["verify", str(archive), "--into", str(into)])
    assert result.exit_code == 1 and "does not match the manifest" in result.output, result.output
    assert f"{archive}:b/model/m.gguf" in result.output and not into.exists()


def test_deeply_nested_json_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    for name in ("manifest.json", "signature.json"):
        bundle = fake_bundle(tmp_path / name)
        (bundle / name).write_text("[" * 200_000)
        result = CliRunner().invoke(cli, ["verify", str(bundle)])
        assert result.exit_code == 1 and name in result.output, result.output
        assert not isinstance(result.exception, RecursionError)


@pytest.mark.parametrize("case", ["hidden top folder", "signature.json as a folder"])
def test_names_an_archive_must_not_use_are_refused(tmp_path: Path, case: str) -> None:
    bundle = fake_bundle(tmp_path / "b")
    archive = tmp_path / "b.tar"
    with tarfile.open(archive, "w") as tar:
        if case == "hidden top folder":
            tar.add(bundle, arcname=".b.edgecds-tmp")  # would pass for a temporary the next run deletes
        else:
            tar.add(bundle, arcname="b")
            info = tarfile.TarInfo("b/signature.json")
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
    result = CliRunner().invoke(cli, ["verify", str(archive)])
    assert result.exit_code == 1 and "refused" in result.output, result.output


def test_members_in_any_order_are_read_in_one_pass(tmp_path: Path) -> None:
    """Hashed in the archive's own order (a gzip archive read backwards costs a decompression per member)."""
    bundle = fake_bundle(tmp_path / "b")
    archive = tmp_path / "b.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(bundle, arcname="b", recursive=False)
        for path in sorted(bundle.rglob("*"), reverse=True):
            tar.add(path, arcname=f"b/{path.relative_to(bundle).as_posix()}", recursive=False)
    result = CliRunner().invoke(cli, ["verify", str(archive)])
    assert result.exit_code == 0 and "OK: 2 files" in result.output, result.output


def _gnu_long_name_header(declared: int) -> bytes:
    """A GNU long-name header ('L') that declares `declared` bytes of name to follow."""
    info = tarfile.TarInfo("././@LongLink")
    info.type = tarfile.GNUTYPE_LONGNAME
    info.size = declared
    return info.tobuf(format=tarfile.GNU_FORMAT)


def test_a_long_name_header_declaring_a_gigabyte_is_refused_before_it_is_read(tmp_path: Path) -> None:
    import gzip
    import sys

    archive = tmp_path / "bomb.tar"
    # the header, then 8 MiB of the "name" (zeros: a tiny gzip), far short of the 1 GiB it declares
    archive.write_bytes(gzip.compress(_gnu_long_name_header(1 << 30) + b"\0" * (8 << 20)))
    assert archive.stat().st_size < 64 << 10
    result = CliRunner().invoke(cli, ["verify", str(archive)], catch_exceptions=False)
    assert result.exit_code == 1 and "extended header declares 1073741824 bytes" in result.output, result.output
    # in a process of its own, whose peak is its own: nowhere near the declared GiB (it was 1,085,488 KB)
    # VmHWM, not ru_maxrss: Linux carries a parent's peak through fork and exec into the child's ru_maxrss
    code = ("import sys\nfrom edgecds.cli import main\nsys.argv = ['edgecds', 'verify', sys.argv[1]]\n"
            "try:\n    main()\nexcept SystemExit:\n"
            "    print(next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:')))")
    run = subprocess.run([sys.executable, "-c", code, str(archive)], capture_output=True, text=True, timeout=120)
    assert int(run.stdout.split()[-1]) < 200 << 10, run.stdout  # KiB


def test_a_long_hostile_member_name_is_cut_in_the_error(tmp_path: Path) -> None:
    name = "b/" + "../" * 1300 + "etc/passwd"  # 3.9 KB: under the header bound, refused for its '..'
    archive = _tar(tmp_path / "long.tar.gz", [_file(name, b"x")])
    result = CliRunner().invoke(cli, ["verify", str(archive)], catch_exceptions=False)
    assert result.exit_code == 1 and "points outside the bundle" in result.output and f"({len(name)} characters)" in result.output
    assert len(result.output) < 1000


def test_sparse_members_are_refused_before_their_maps_are_read(tmp_path: Path) -> None:
    """An old GNU sparse header's chain of map blocks, and pax's GNU.sparse 1.0 map in the data,
    are read by tarfile before a member could be refused: 70 KB of gzip took 69 MiB."""
    old = tarfile.TarInfo("b/x")
    old.type = tarfile.GNUTYPE_SPARSE
    with tarfile.open(tmp_path / "old.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        tar.addfile(old)
    pax = tarfile.TarInfo("b/y")
    pax.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "b/y", "GNU.sparse.realsize": "100"}
    with tarfile.open(tmp_path / "pax.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(pax)
    for name in ("old.tar", "pax.tar"):
        result = CliRunner().invoke(cli, ["verify", str(tmp_path / name)])
        assert result.exit_code == 1 and "a sparse file member (a size bomb" in result.output and "Traceback" not in result.output, result.output


def _signed(bundle: Path, private: Path) -> Path:
    from edgecds.bundle.sign import sign_manifest

    (bundle / "signature.json").write_text(json.dumps(sign_manifest((bundle / "manifest.json").read_bytes(), private)))
    return bundle


def test_verify_takes_the_key_or_its_file_and_says_when_the_key_argument_is_not_a_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cryptography.hazmat.primitives import serialization

    from edgecds.bundle.sign import generate_key

    public = generate_key(tmp_path / "signing.pem")
    other = generate_key(tmp_path / "other.pem")
    bundle = _signed(fake_bundle(tmp_path / "b"), tmp_path / "signing.pem")
    pem = serialization.load_pem_private_key((tmp_path / "signing.pem").read_bytes(), None).public_key()
    (tmp_path / "public.pem").write_bytes(pem.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    for key in (str(public), public.read_text().strip(), public.read_text().strip().upper(), str(tmp_path / "public.pem")):
        result = CliRunner().invoke(cli, ["verify", str(bundle), "--key", key])
        assert result.exit_code == 0 and "(the trusted key)" in result.output, (key, result.output)
    result = CliRunner().invoke(cli, ["verify", str(bundle), "--key", str(other)])
    assert result.exit_code == 1 and "not by the trusted key" in result.output
    for key, said in (("nonsense", "neither a public key"), (str(tmp_path / "signing.pem"), "this is a private key"),
                      (str(tmp_path), "not a plain file"), (str(tmp_path / "b" / "runtime.json"), "holds no public key")):
        result = CliRunner().invoke(cli, ["verify", str(bundle), "--key", key])
        assert result.exit_code == 2 and said in result.output and "signed by" not in result.output, (key, result.output)
    monkeypatch.setenv("EDGECDS_TRUSTED_KEY", "not-a-key")  # the device's policy, mistyped: said, not read as another signer
    result = CliRunner().invoke(cli, ["verify", str(bundle)])
    assert result.exit_code == 2 and "EDGECDS_TRUSTED_KEY" in result.output and "signed by" not in result.output


def test_an_unsigned_bundle_is_said_loudly_and_refused_when_a_signature_is_required(tmp_path: Path) -> None:
    from edgecds.bundle.sign import generate_key

    bundle = fake_bundle(tmp_path / "b")
    result = CliRunner().invoke(cli, ["verify", str(bundle)])
    assert result.exit_code == 0 and "NOT SIGNED" in result.stdout and "WARNING: nothing shows who made this bundle" in result.stderr
    result = CliRunner().invoke(cli, ["verify", str(bundle), "--require-signature"])
    assert result.exit_code == 1 and "the bundle is not signed, and a signature was required" in result.output
    generate_key(tmp_path / "k.pem")
    result = CliRunner().invoke(cli, ["verify", str(_signed(bundle, tmp_path / "k.pem")), "--require-signature"])
    assert result.exit_code == 0 and "signed by" in result.output and "WARNING" not in result.output


def test_a_damaged_or_altered_openssf_signature_is_named(tmp_path: Path) -> None:
    """model.sig (OpenSSF model signing, an EC key) read by edgecds's own verifier: whole, it
    verifies; unreadable, re-encoded with another file's digest, or outlived by a changed manifest,
    it is refused naming what."""
    import base64
    import shutil as sh

    from edgecds.bundle.sign import generate_key, sign_oms

    public = generate_key(tmp_path / "ec.pem", "ec")
    bundle = fake_bundle(tmp_path / "b")
    sign_oms(bundle, tmp_path / "ec.pem")
    result = verify_bundle(bundle, str(public))
    assert result.signature_format == "openssf-model-signing" and result.trusted_signer

    def copy(name: str) -> Path:
        return Path(sh.copytree(bundle, tmp_path / name))

    broken = copy("broken")
    (broken / "model.sig").write_bytes(b"{")
    with pytest.raises(VerifyError, match="model.sig: not an OpenSSF model signature"):
        verify_bundle(broken, str(public))

    altered = copy("altered")  # the statement edited to another model file's digest, the signature left as it was
    sig = json.loads((altered / "model.sig").read_text())
    statement = json.loads(base64.b64decode(sig["dsseEnvelope"]["payload"]))
    statement["predicate"]["resources"][0]["digest"] = "00" * 32
    sig["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    (altered / "model.sig").write_text(json.dumps(sig))
    with pytest.raises(VerifyError, match="not signed by the trusted key"):
        verify_bundle(altered, str(public))
    with pytest.raises(VerifyError, match="subject's digest"):  # without the key, the statement still contradicts itself
        verify_bundle(altered)

    later = copy("later")  # a file added and listed in a rewritten manifest after signing
    (later / "extra.txt").write_bytes(b"added")
    manifest = json.loads((later / "manifest.json").read_text())
    manifest["files"]["extra.txt"] = {"sha256": hashlib.sha256(b"added").hexdigest(), "size": 5}
    (later / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(VerifyError, match="manifest.json: does not match model.sig|does not cover extra.txt"):
        verify_bundle(later, str(public))
