"""`rq quantize --calib DIR` with no model (the user's card): the manifest's default model from models/,
downloaded and verified when absent, written as `<name>-int8.onnx`; MODEL may also be a manifest name.

Downloads come from a local http.server on 127.0.0.1 (ephemeral port), as in test_fetch.py, serving a tiny
real classifier under the manifest's file name; the manifest is a test copy of the repository's format.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

import quantize.manifest as manifest_module
from quantize.cli import app
from quantize.fetch import DEFAULT_MANIFEST_PATH, default_model_name, load_manifest
from tests.helpers.cli import ENV, all_output, assert_one_line_error

SMALL = ["--resize", "36", "--crop", "32", "--samples", "8", "--workers", "1"]


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, format, *args):
        pass

    def do_GET(self):
        routes: dict[str, bytes] = self.server.routes  # type: ignore[attr-defined]
        self.server.hits[self.path] += 1  # type: ignore[attr-defined]
        body = routes.get(self.path)
        if body is None:
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def zoo(tiny_model) -> Iterator[dict]:
    """A local "model zoo" serving the tiny classifier as /resnet50-v2-7.onnx."""
    payload = tiny_model.read_bytes()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.routes = {"/resnet50-v2-7.onnx": payload}  # type: ignore[attr-defined]
    httpd.hits = Counter()  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield {"base": f"http://127.0.0.1:{httpd.server_address[1]}", "payload": payload, "hits": httpd.hits}
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _manifest(path: Path, url: str | None, payload: bytes) -> Path:
    """The repository's manifest with the default model's URL, size and sha256 replaced."""
    doc = json.loads(DEFAULT_MANIFEST_PATH.read_text())
    entry = doc["models"][doc["default"]]
    entry.update(url=url, size=len(payload), sha256=hashlib.sha256(payload).hexdigest())
    path.write_text(json.dumps(doc))
    return path


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def _serve(monkeypatch, workdir: Path, url: str | None, payload: bytes) -> None:
    monkeypatch.setattr(
        manifest_module, "DEFAULT_MANIFEST_PATH", _manifest(workdir.parent / "m.json", url, payload)
    )


def invoke(*args):
    return CliRunner().invoke(app, ["quantize", *[str(a) for a in args]], env=ENV)


def test_repository_manifest_names_resnet50_v2_as_default():
    assert default_model_name() == "resnet50-v2"
    assert load_manifest()["resnet50-v2"].filename == "resnet50-v2-7.onnx"


def test_no_model_fetches_the_default_and_writes_resnet50_v2_int8(zoo, calib_dir, workdir, monkeypatch):
    _serve(monkeypatch, workdir, zoo["base"] + "/resnet50-v2-7.onnx", zoo["payload"])
    before = zoo["hits"]["/resnet50-v2-7.onnx"]
    result = invoke("--calib", calib_dir, *SMALL)
    assert result.exit_code == 0, all_output(result)
    fetched = workdir / "models" / "resnet50-v2-7.onnx"
    assert fetched.read_bytes() == zoo["payload"]  # verified copy in models/
    assert (workdir / "resnet50-v2-int8.onnx").is_file()
    assert zoo["hits"]["/resnet50-v2-7.onnx"] == before + 1
    # again, by alias: the verified copy is used, nothing is downloaded
    (workdir / "resnet50-v2-int8.onnx").unlink()
    result = invoke("resnet50-v2-7", "--calib", calib_dir, *SMALL)
    assert result.exit_code == 0, all_output(result)
    assert (workdir / "resnet50-v2-int8.onnx").is_file()
    assert zoo["hits"]["/resnet50-v2-7.onnx"] == before + 1


def test_a_damaged_copy_in_models_is_replaced_by_a_verified_one(zoo, calib_dir, workdir, monkeypatch):
    _serve(monkeypatch, workdir, zoo["base"] + "/resnet50-v2-7.onnx", zoo["payload"])
    (workdir / "models").mkdir()
    (workdir / "models" / "resnet50-v2-7.onnx").write_bytes(zoo["payload"][:-10])
    result = invoke("resnet50-v2", "--calib", calib_dir, *SMALL)
    assert result.exit_code == 0, all_output(result)
    assert (workdir / "models" / "resnet50-v2-7.onnx").read_bytes() == zoo["payload"]


def test_offline_is_one_line_naming_the_file_and_writes_nothing(zoo, calib_dir, workdir, monkeypatch):
    _serve(monkeypatch, workdir, f"http://127.0.0.1:{_closed_port()}/resnet50-v2-7.onnx", zoo["payload"])
    result = invoke("--calib", calib_dir, *SMALL)
    line = assert_one_line_error(result, "put resnet50-v2-7.onnx")
    assert "at models/resnet50-v2-7.onnx" in line
    assert list(workdir.iterdir()) == []  # no models/, no reports/, no output


def test_unknown_name_is_one_line_listing_the_models(calib_dir, workdir):
    result = invoke("resnet51", "--calib", calib_dir, *SMALL)
    line = assert_one_line_error(result, "'resnet51' is neither a file nor a model of the manifest")
    assert "resnet50-v2-7" in line
    assert list(workdir.iterdir()) == []


def test_a_missing_path_is_still_a_missing_file(calib_dir, workdir):
    result = invoke("nothere.onnx", "--calib", calib_dir, *SMALL)
    assert result.exit_code == 2, all_output(result)
    assert "nothere.onnx" in all_output(result)
    assert list(workdir.iterdir()) == []
