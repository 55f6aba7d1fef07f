"""Tests for quantize.fetch: manifest loading, name resolution and verified downloads.

Downloads are served by a local http.server on 127.0.0.1 (ephemeral port), so the tests need no
internet and run in well under a second. Every network call carries a short timeout.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from calibration.errors import RqInputError
from quantize.fetch import (
    DEFAULT_MANIFEST_PATH,
    FetchError,
    ManifestError,
    ModelEntry,
    fetch,
    fetch_with_progress,
    is_verified,
    load_manifest,
    resolve,
    sha256_file,
)

PAYLOAD = os.urandom(300 * 1024)
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
TIMEOUT = 2.0

SHARED_MODEL = DEFAULT_MANIFEST_PATH.parents[2] / "shared" / "models" / "resnet50-v1-keras-opset7.onnx"


@dataclass
class Server:
    base: str
    hits: Counter = field(default_factory=Counter)
    release: threading.Event = field(default_factory=threading.Event)


class _Handler(BaseHTTPRequestHandler):
    server: ThreadingHTTPServer  # carries .state (a Server)

    def log_message(self, format, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        state: Server = self.server.state  # type: ignore[attr-defined]
        state.hits[self.path] += 1
        if self.path == "/file.onnx":
            self._send(PAYLOAD)
        elif self.path == "/nolength.onnx":
            self._send(PAYLOAD, length=False)
        elif self.path == "/truncated.onnx":
            # Announce the full length, send half, then drop the connection.
            self._send(PAYLOAD[: len(PAYLOAD) // 2], length=len(PAYLOAD))
            self.close_connection = True
        elif self.path == "/truncated-nolength.onnx":
            self._send(PAYLOAD[: len(PAYLOAD) // 2], length=False)
        elif self.path == "/longer.onnx":
            self._send(PAYLOAD + b"extra", length=False)
        elif self.path == "/stall.onnx":
            # Headers, then nothing: the client's read timeout must fire.
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.flush()
            state.release.wait(5)
        else:
            self.send_error(404, "Not Found")

    def _send(self, body: bytes, length: int | bool = True) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if length is True:
            self.send_header("Content-Length", str(len(body)))
        elif length is not False:
            self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.block_on_close = False  # never wait on a stalled handler at teardown
    state = Server(base=f"http://127.0.0.1:{httpd.server_address[1]}")
    httpd.state = state  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _entry_dict(url: str | None, /, **overrides) -> dict:
    data = {
        "aliases": ["tiny-alias"],
        "url": url,
        "filename": "tiny.onnx",
        "size": len(PAYLOAD),
        "sha256": PAYLOAD_SHA,
        "opset": 13,
        "input_name": "data",
        "input_shape": ["N", 3, 224, 224],
        "output_name": "logits",
        "output_shape": ["N", 1000],
        "preprocessing": "resnet50-v2",
        "published_top1": 50.0,
        "published_top5": None,
        "source": "test",
        "notes": "random bytes",
        "local_hint": None,
    }
    data.update(overrides)
    return data


def _write_manifest(path: Path, models: dict, version: int = 1) -> Path:
    path.write_text(json.dumps({"version": version, "models": models}), encoding="utf-8")
    return path


def _entry(server: Server, tmp_path: Path, route: str = "/file.onnx", **overrides) -> ModelEntry:
    """An entry loaded through a real manifest file, as the CLI would do it."""
    manifest = _write_manifest(
        tmp_path / "manifest.json", {"tiny": _entry_dict(server.base + route, **overrides)}
    )
    return resolve("tiny", load_manifest(manifest))


def _leftovers(dest: Path, keep: str | None = None) -> list[str]:
    return sorted(p.name for p in dest.iterdir() if p.name != keep) if dest.exists() else []


def _assert_one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and message.strip() == message and message
    return message


# ------------------------------------------------------------------------------------------------
# Downloads
# ------------------------------------------------------------------------------------------------


def test_download_writes_verified_file_and_reports_progress(server: Server, tmp_path: Path) -> None:
    entry = _entry(server, tmp_path)
    dest = tmp_path / "models" / "nested"  # created on demand
    calls: list[tuple[int, int | None]] = []

    path = fetch(entry, dest, progress=lambda done, total: calls.append((done, total)), timeout=TIMEOUT)

    assert path == dest / "tiny.onnx"
    assert path.read_bytes() == PAYLOAD
    assert sha256_file(path) == PAYLOAD_SHA
    assert _leftovers(dest, keep="tiny.onnx") == []
    assert len(calls) >= 2
    done = [d for d, _ in calls]
    assert done == sorted(done) and len(set(done)) == len(done)  # strictly increasing
    assert done[-1] == len(PAYLOAD)
    assert {t for _, t in calls} == {len(PAYLOAD)}
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)


def test_second_fetch_is_a_noop(server: Server, tmp_path: Path) -> None:
    entry = _entry(server, tmp_path)
    dest = tmp_path / "dest"
    fetch(entry, dest, timeout=TIMEOUT)
    hits = server.hits["/file.onnx"]
    calls: list[tuple[int, int | None]] = []

    path = fetch(entry, dest, progress=lambda d, t: calls.append((d, t)), timeout=TIMEOUT)

    assert path.read_bytes() == PAYLOAD
    assert server.hits["/file.onnx"] == hits
    assert calls == []


def test_force_downloads_again(server: Server, tmp_path: Path) -> None:
    entry = _entry(server, tmp_path)
    dest = tmp_path / "dest"
    fetch(entry, dest, timeout=TIMEOUT)
    hits = server.hits["/file.onnx"]
    fetch(entry, dest, force=True, timeout=TIMEOUT)
    assert server.hits["/file.onnx"] == hits + 1
    assert (dest / "tiny.onnx").read_bytes() == PAYLOAD


def test_corrupt_existing_file_is_replaced(server: Server, tmp_path: Path) -> None:
    entry = _entry(server, tmp_path)
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "tiny.onnx").write_bytes(b"x" * len(PAYLOAD))  # right size, wrong content
    assert not is_verified(entry, dest / "tiny.onnx")
    fetch(entry, dest, timeout=TIMEOUT)
    assert (dest / "tiny.onnx").read_bytes() == PAYLOAD
    assert is_verified(entry, dest / "tiny.onnx")


def test_download_without_content_length(server: Server, tmp_path: Path) -> None:
    entry = _entry(server, tmp_path, route="/nolength.onnx")
    path = fetch(entry, tmp_path / "dest", timeout=TIMEOUT)
    assert path.read_bytes() == PAYLOAD


def test_wrong_sha256_leaves_nothing(server: Server, tmp_path: Path) -> None:
    entry = _entry(server, tmp_path, sha256="0" * 64)
    dest = tmp_path / "dest"
    with pytest.raises(FetchError) as exc:
        fetch(entry, dest, timeout=TIMEOUT)
    message = _assert_one_line(exc)
    assert "sha256" in message and "0" * 64 in message and PAYLOAD_SHA in message
    assert _leftovers(dest) == []


def test_wrong_sha256_keeps_previous_file_untouched(server: Server, tmp_path: Path) -> None:
    entry = _entry(server, tmp_path, sha256="0" * 64)
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "tiny.onnx").write_bytes(b"old")
    with pytest.raises(FetchError):
        fetch(entry, dest, timeout=TIMEOUT)
    assert (dest / "tiny.onnx").read_bytes() == b"old"
    assert _leftovers(dest, keep="tiny.onnx") == []


def test_wrong_size_is_an_error(server: Server, tmp_path: Path) -> None:
    entry = _entry(server, tmp_path, size=len(PAYLOAD) + 1)
    dest = tmp_path / "dest"
    with pytest.raises(FetchError) as exc:
        fetch(entry, dest, timeout=TIMEOUT)
    message = _assert_one_line(exc)
    assert str(len(PAYLOAD)) in message and str(len(PAYLOAD) + 1) in message
    assert _leftovers(dest) == []


def test_oversized_download_without_length_is_an_error(server: Server, tmp_path: Path) -> None:
    entry = _entry(server, tmp_path, route="/longer.onnx")
    dest = tmp_path / "dest"
    with pytest.raises(FetchError, match="more than the expected"):
        fetch(entry, dest, timeout=TIMEOUT)
    assert _leftovers(dest) == []


def test_http_404_is_one_line_error(server: Server, tmp_path: Path) -> None:
    entry = _entry(server, tmp_path, route="/missing.onnx")
    dest = tmp_path / "dest"
    with pytest.raises(FetchError) as exc:
        fetch(entry, dest, timeout=TIMEOUT)
    message = _assert_one_line(exc)
    assert message.startswith(f"could not download tiny from {server.base}/missing.onnx: ")
    assert "404" in message
    assert _leftovers(dest) == []


def test_unreachable_port_is_an_error(tmp_path: Path) -> None:
    # Bind then close a socket: nothing listens on that port for the rest of the test.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manifest = _write_manifest(
        tmp_path / "m.json", {"tiny": _entry_dict(f"http://127.0.0.1:{port}/file.onnx")}
    )
    entry = load_manifest(manifest)["tiny"]
    dest = tmp_path / "dest"
    with pytest.raises(FetchError) as exc:
        fetch(entry, dest, timeout=TIMEOUT)
    message = _assert_one_line(exc)
    assert message.startswith("could not download tiny from ")
    assert _leftovers(dest) == []
    # the folders the fetch created for the file are gone again; one that was there stays
    assert not dest.exists()
    nested = tmp_path / "made" / "for" / "it"
    with pytest.raises(FetchError):
        fetch(entry, nested, timeout=TIMEOUT)
    assert not (tmp_path / "made").exists() and tmp_path.is_dir()


@pytest.mark.parametrize("route", ["/truncated.onnx", "/truncated-nolength.onnx"])
def test_interrupted_download_leaves_nothing(server: Server, tmp_path: Path, route: str) -> None:
    entry = _entry(server, tmp_path, route=route)
    dest = tmp_path / "dest"
    with pytest.raises(FetchError) as exc:
        fetch(entry, dest, timeout=TIMEOUT)
    message = _assert_one_line(exc)
    assert "could not download tiny" in message
    assert f"of {len(PAYLOAD)} bytes" in message
    assert _leftovers(dest) == []


def test_stalled_server_times_out(server: Server, tmp_path: Path) -> None:
    entry = _entry(server, tmp_path, route="/stall.onnx")
    dest = tmp_path / "dest"
    with pytest.raises(FetchError) as exc:
        fetch(entry, dest, timeout=0.3)
    assert "no response within 0.3 s" in _assert_one_line(exc)
    assert _leftovers(dest) == []


def test_keyboard_interrupt_removes_partial_file(server: Server, tmp_path: Path) -> None:
    entry = _entry(server, tmp_path)
    dest = tmp_path / "dest"

    def interrupt(done: int, total: int | None) -> None:
        # A .part file exists while the download runs...
        assert any(p.name.startswith(".tiny.onnx.") and p.name.endswith(".part") for p in dest.iterdir())
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fetch(entry, dest, progress=interrupt, timeout=TIMEOUT)
    assert _leftovers(dest) == []  # ...and is gone afterwards


def test_null_url_mentions_local_hint(tmp_path: Path) -> None:
    manifest = _write_manifest(
        tmp_path / "m.json",
        {"local": _entry_dict(None, local_hint="../elsewhere/local.onnx", aliases=[])},
    )
    entry = load_manifest(manifest)["local"]
    with pytest.raises(FetchError) as exc:
        fetch(entry, tmp_path / "dest", timeout=TIMEOUT)
    message = _assert_one_line(exc)
    assert "no download URL" in message and "../elsewhere/local.onnx" in message
    assert not (tmp_path / "dest").exists()


def test_null_url_accepts_verified_copy_in_dest(tmp_path: Path) -> None:
    manifest = _write_manifest(tmp_path / "m.json", {"local": _entry_dict(None, aliases=[])})
    entry = load_manifest(manifest)["local"]
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "tiny.onnx").write_bytes(PAYLOAD)
    assert fetch(entry, dest) == dest / "tiny.onnx"


def test_dest_that_is_a_file_is_an_error(server: Server, tmp_path: Path) -> None:
    entry = _entry(server, tmp_path)
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    with pytest.raises(FetchError) as exc:
        fetch(entry, blocker, timeout=TIMEOUT)
    assert "not a folder" in _assert_one_line(exc)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores folder permissions")
def test_unwritable_dest_is_an_error(server: Server, tmp_path: Path) -> None:
    entry = _entry(server, tmp_path)
    dest = tmp_path / "readonly"
    dest.mkdir()
    dest.chmod(0o555)
    try:
        with pytest.raises(FetchError) as exc:
            fetch(entry, dest, timeout=TIMEOUT)
        assert "not writable" in _assert_one_line(exc)
    finally:
        dest.chmod(0o755)


def test_fetch_with_progress_downloads_then_reports_present(server: Server, tmp_path: Path) -> None:
    from rich.console import Console

    entry = _entry(server, tmp_path)
    dest = tmp_path / "dest"
    console = Console(file=open(os.devnull, "w"), force_terminal=False)  # noqa: SIM115
    try:
        hits = server.hits["/file.onnx"]
        path = fetch_with_progress(entry, dest, console=console, timeout=TIMEOUT)
        assert path.read_bytes() == PAYLOAD
        assert fetch_with_progress(entry, dest, console=console, timeout=TIMEOUT) == path
        assert server.hits["/file.onnx"] == hits + 1
    finally:
        console.file.close()


def test_errors_are_rq_input_errors() -> None:
    assert issubclass(FetchError, RqInputError)
    assert issubclass(ManifestError, FetchError)


# ------------------------------------------------------------------------------------------------
# Manifest and resolution
# ------------------------------------------------------------------------------------------------


def test_resolve_by_alias_and_case(server: Server, tmp_path: Path) -> None:
    manifest = load_manifest(
        _write_manifest(tmp_path / "m.json", {"tiny": _entry_dict(server.base + "/file.onnx")})
    )
    assert resolve("tiny-alias", manifest).name == "tiny"
    assert resolve("TINY", manifest).name == "tiny"


def test_unknown_model_lists_known_names(tmp_path: Path) -> None:
    manifest = load_manifest(
        _write_manifest(tmp_path / "m.json", {"tiny": _entry_dict("http://127.0.0.1:9/x.onnx")})
    )
    with pytest.raises(FetchError) as exc:
        resolve("resnet18", manifest)
    message = _assert_one_line(exc)
    assert "'resnet18'" in message and "tiny" in message and "tiny-alias" in message


@pytest.mark.parametrize(
    ("overrides", "field_name"),
    [
        ({"sha256": "abc"}, "sha256"),
        ({"size": -1}, "size"),
        ({"size": "12"}, "size"),
        ({"url": "ftp://example.com/x.onnx"}, "url"),
        ({"filename": "../evil.onnx"}, "filename"),
        ({"filename": ".hidden.onnx"}, "filename"),
        ({"input_shape": []}, "input_shape"),
        ({"output_shape": [0, 1000]}, "output_shape"),
        ({"published_top1": 175.0}, "published_top1"),
        ({"aliases": "tiny-alias"}, "aliases"),
        ({"input_name": ""}, "input_name"),
        ({"opset": True}, "opset"),
        ({"sha265": PAYLOAD_SHA}, "sha265"),
    ],
)
def test_bad_entry_names_entry_and_field(tmp_path: Path, overrides: dict, field_name: str) -> None:
    manifest = _write_manifest(tmp_path / "m.json", {"tiny": _entry_dict("http://h/x.onnx", **overrides)})
    with pytest.raises(ManifestError) as exc:
        load_manifest(manifest)
    message = _assert_one_line(exc)
    assert "'tiny'" in message and f"'{field_name}'" in message and str(manifest) in message


def test_missing_field_is_named(tmp_path: Path) -> None:
    data = _entry_dict("http://h/x.onnx")
    del data["output_name"]
    with pytest.raises(ManifestError, match=r"missing field.*'output_name'"):
        load_manifest(_write_manifest(tmp_path / "m.json", {"tiny": data}))


def test_duplicate_alias_is_rejected(tmp_path: Path) -> None:
    models = {
        "tiny": _entry_dict("http://h/x.onnx"),
        "other": _entry_dict("http://h/y.onnx", aliases=["Tiny"]),
    }
    with pytest.raises(ManifestError, match=r"'Tiny'.*'other'.*already used by model 'tiny'"):
        load_manifest(_write_manifest(tmp_path / "m.json", models))


def test_bad_manifest_files(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(tmp_path / "absent.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"version": 1, "models": {', encoding="utf-8")
    with pytest.raises(ManifestError) as exc:
        load_manifest(broken)
    assert "not valid JSON" in _assert_one_line(exc)
    with pytest.raises(ManifestError, match="unsupported version 2"):
        load_manifest(_write_manifest(tmp_path / "v2.json", {}, version=2))
    no_models = tmp_path / "nomodels.json"
    no_models.write_text('{"version": 1}', encoding="utf-8")
    with pytest.raises(ManifestError, match="'models'"):
        load_manifest(no_models)


def test_repository_manifest() -> None:
    manifest = load_manifest()  # models/manifest.json in the repository
    v2 = resolve("resnet50-v2-7", manifest)
    assert v2.name == "resnet50-v2"
    assert v2.size == 102442452
    assert v2.sha256 == "79102261eb6e5fd7af5d27f41316293e388c5cb691e5d25bfb035c4f64fefe31"
    assert v2.published_top1 == 75.81 and v2.published_top5 == 92.82
    assert v2.url is not None and v2.url.endswith("/resnet50-v2-7.onnx")
    assert (v2.input_name, v2.input_shape) == ("data", ("N", 3, 224, 224))
    assert (v2.output_name, v2.output_shape) == ("resnetv24_dense0_fwd", ("N", 1000))
    assert v2.opset == 7 and v2.preprocessing == "resnet50-v2"

    keras = resolve("resnet50-v1-keras-opset7", manifest)
    assert keras.url is None and keras.local_hint == "../shared/models/resnet50-v1-keras-opset7.onnx"
    assert (keras.input_name, keras.output_name) == ("data", "logits")
    assert keras.published_top1 == 74.9
    assert keras.local_hint_path() == SHARED_MODEL.resolve()


@pytest.mark.skipif(not SHARED_MODEL.is_file(), reason="../shared/models is not present")
def test_repository_manifest_matches_shared_model(tmp_path: Path) -> None:
    keras = load_manifest()["resnet50-v1-keras-opset7"]
    assert SHARED_MODEL.stat().st_size == keras.size
    assert is_verified(keras, SHARED_MODEL)
    # fetch() accepts a verified copy (here a symlink) at the destination without a URL.
    dest = tmp_path / "models"
    dest.mkdir()
    (dest / keras.filename).symlink_to(SHARED_MODEL)
    assert fetch(keras, dest) == dest / keras.filename


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"size": "12"}, "field 'size' must be a positive integer (bytes), got '12'"),
        ({"input_shape": ["N", 0]}, "field 'input_shape' must be a non-empty list of positive ints"),
        ({"published_top5": float("inf")}, "field 'published_top5' must be a number in [0, 100] or null"),
        ({"colour": "red"}, "unknown field(s) 'colour'"),
    ],
)
def test_cli_bad_manifest_exits_2_with_one_line_naming_the_field(tmp_path, overrides, fragment):
    from typer.testing import CliRunner

    from quantize.cli import app

    manifest = tmp_path / "m.json"
    data = _entry_dict("http://127.0.0.1:9/x.onnx", **overrides)
    manifest.write_text(json.dumps({"version": 1, "models": {"tiny": data}}), encoding="utf-8")
    result = CliRunner().invoke(
        app, ["fetch", "tiny", "--manifest", str(manifest), "--dest", str(tmp_path / "d")]
    )
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0] and "'tiny'" in lines[0], result.output
    assert not (tmp_path / "d").exists()


def test_manifest_entries_are_frozen_and_typed(tmp_path: Path) -> None:
    import dataclasses

    entry = load_manifest(
        _write_manifest(tmp_path / "m.json", {"tiny": _entry_dict(None, sha256=PAYLOAD_SHA.upper())})
    )["tiny"]
    assert entry.sha256 == PAYLOAD_SHA  # stored lower-case
    assert entry.aliases == ("tiny-alias",) and entry.input_shape == ("N", 3, 224, 224)
    assert entry.published_top1 == 50.0 and isinstance(entry.published_top1, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry.size = 1  # type: ignore[misc]
    assert {entry: 1}[load_manifest(tmp_path / "m.json")["tiny"]] == 1
