"""Verify and resumable verified download of the official files, and the ``app.py weights`` command.

Download tests use a real HTTP server on 127.0.0.1 (port 0) serving small files, with Range support and injected
faults.
"""
from __future__ import annotations

import hashlib
import http.server
import io
import os
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest

from core.errors import CheckpointError
from sadtalker import weights as ck
from support.paths import ROOT

ST_256 = "SadTalker_V0.0.2_256.safetensors"


# ---- verify ----------------------------------------------------------------------------------------------------

def _facts(name: str, data: bytes, *, size: bool = True, sha: bool = True) -> ck.FileFacts:
    return ck.FileFacts(name=name, url=f"https://example.invalid/{name}", size=len(data) if size else None,
                        sha256=hashlib.sha256(data).hexdigest() if sha else None, required=True, purpose="test")


def test_verify_file_states(tmp_path):
    data = os.urandom(10_000)
    path = tmp_path / "a.bin"
    facts = _facts("a.bin", data)
    assert ck.verify_file(str(path), facts).status == "missing"
    path.write_bytes(data)
    assert ck.verify_file(str(path), facts).status == "ok"
    assert ck.verify_file(str(path), _facts("a.bin", data, sha=False)).status == "unverified"
    path.write_bytes(data[:5000])
    status = ck.verify_file(str(path), facts)
    assert status.status == "wrong-size" and status.bad and "truncated" in status.message
    path.write_bytes(bytes(10_000))
    status = ck.verify_file(str(path), facts)
    assert status.status == "bad-checksum" and "BAD CHECKSUM" in status.message


def test_official_checksums_are_the_reference_facts():
    files = ck.official_files()
    assert files[ST_256].size == 725066984
    assert files[ST_256].sha256 == "c211f5d6de003516bf1bbda9f47049a4c9c99133b1ab565c6961e5af16477bff"
    assert files["mapping_00229-model.pth.tar"].size is None
    assert files[ST_256].url == "https://github.com/OpenTalker/SadTalker/releases/download/v0.0.2-rc/" + ST_256
    assert files["GFPGANv1.4.pth"].url.startswith("https://github.com/TencentARC/GFPGAN/releases/download/v1.3.0/")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "app.py", "weights", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_verify_command_reports_each_file(tmp_path):
    (tmp_path / ST_256).write_bytes(b"x" * 1000)  # a truncated download
    (tmp_path / "mapping_00229-model.pth.tar").write_bytes(b"not the mapping file")  # size unknown: hashed
    result = _cli("verify", "--checkpoints", str(tmp_path))
    assert result.returncode == 1, result.stdout + result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    assert "WRONG SIZE: 1,000 bytes, expected 725,066,984" in lines[ST_256]
    assert "BAD CHECKSUM" in lines["mapping_00229-model.pth.tar"]
    assert "missing (needed" in lines["mapping_00109-model.pth.tar"]
    assert "missing (optional" in lines["GFPGANv1.4.pth"]
    assert "app.py weights download --checkpoints" in result.stdout


# ---- download --------------------------------------------------------------------------------------------------

class _Server:
    """Serves ``files`` (name -> bytes) with Range support; faults are injected per file name."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.cut_after: dict[str, list[int]] = {}  # name -> byte counts at which the next responses stop
        self.ignore_range: set[str] = set()
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                range_header = self.headers.get("Range")
                server.requests.append((self.path, range_header))
                data = server.files.get(name)
                if data is None:
                    self.send_error(404, "Not Found")
                    return
                start = 0
                if range_header and name not in server.ignore_range:
                    start = int(range_header.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                cuts = server.cut_after.get(name)
                if cuts:
                    self.wfile.write(body[: cuts.pop(0)])  # the connection drops mid-transfer
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/releases"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def payload() -> bytes:
    return np.random.default_rng(7).integers(0, 256, 3_000_000, dtype=np.uint8).tobytes()


def test_download_verifies_and_shows_progress(tmp_path, payload):
    facts = {"model.bin": _facts("model.bin", payload)}
    out = io.StringIO()
    with _Server({"model.bin": payload}) as server:
        paths = ck.download(str(tmp_path), base_url=server.url, files=facts, out=out)
    assert paths == [str(tmp_path / "model.bin")]
    assert (tmp_path / "model.bin").read_bytes() == payload
    assert not (tmp_path / "model.bin.partial").exists()
    assert "100.0%" in out.getvalue() and "3.0 MB" in out.getvalue() and "sha256 verified" in out.getvalue()


def test_interrupted_transfer_resumes_automatically(tmp_path, payload):
    facts = {"model.bin": _facts("model.bin", payload)}
    with _Server({"model.bin": payload}) as server:
        server.cut_after["model.bin"] = [1_200_000]
        ck.download(str(tmp_path), base_url=server.url, files=facts, retries=2, out=io.StringIO())
        ranges = [r for _, r in server.requests]
    assert (tmp_path / "model.bin").read_bytes() == payload
    assert ranges == [None, "bytes=1200000-"]


def test_interrupted_download_is_resumed_by_the_next_run(tmp_path, payload):
    facts = {"model.bin": _facts("model.bin", payload)}
    with _Server({"model.bin": payload}) as server:
        server.cut_after["model.bin"] = [1_000_000]
        with pytest.raises(CheckpointError, match=r"interrupted .*1,000,000 bytes are kept .*Run the same command"):
            ck.download(str(tmp_path), base_url=server.url, files=facts, retries=0)
        assert (tmp_path / "model.bin.partial").stat().st_size == 1_000_000
        assert not (tmp_path / "model.bin").exists()
        server.cut_after["model.bin"] = [700_000]  # interrupted again, then completed
        with pytest.raises(CheckpointError, match="1,700,000 bytes are kept"):
            ck.download(str(tmp_path), base_url=server.url, files=facts, retries=0)
        ck.download(str(tmp_path), base_url=server.url, files=facts, retries=0)
        ranges = [r for _, r in server.requests]
    assert ranges == [None, "bytes=1000000-", "bytes=1700000-"]
    assert (tmp_path / "model.bin").read_bytes() == payload


def test_server_without_range_support_restarts_cleanly(tmp_path, payload):
    facts = {"model.bin": _facts("model.bin", payload)}
    (tmp_path / "model.bin.partial").write_bytes(payload[:500_000])
    with _Server({"model.bin": payload}) as server:
        server.ignore_range.add("model.bin")
        ck.download(str(tmp_path), base_url=server.url, files=facts)
    assert (tmp_path / "model.bin").read_bytes() == payload


def test_complete_partial_file_is_finished_without_data(tmp_path, payload):
    facts = {"model.bin": _facts("model.bin", payload, size=False)}  # size unknown: the server must say 416
    (tmp_path / "model.bin.partial").write_bytes(payload)
    with _Server({"model.bin": payload}) as server:
        ck.download(str(tmp_path), base_url=server.url, files=facts)
        assert [r for _, r in server.requests] == [f"bytes={len(payload)}-"]
    assert (tmp_path / "model.bin").read_bytes() == payload


def test_checksum_mismatch_deletes_the_bad_download(tmp_path, payload):
    facts = {"model.bin": _facts("model.bin", payload)}
    corrupted = bytearray(payload)
    corrupted[123_456] ^= 0xFF
    with _Server({"model.bin": bytes(corrupted)}) as server:
        with pytest.raises(CheckpointError, match="model.bin is not the official file: BAD CHECKSUM"):
            ck.download(str(tmp_path), base_url=server.url, files=facts)
    assert not (tmp_path / "model.bin").exists() and not (tmp_path / "model.bin.partial").exists()


def test_wrong_size_on_the_server_is_refused_before_downloading(tmp_path, payload):
    facts = {"model.bin": _facts("model.bin", payload)}
    with _Server({"model.bin": payload[:1000]}) as server:
        with pytest.raises(CheckpointError, match=r"server offers 1,000 bytes but the official file has 3,000,000"):
            ck.download(str(tmp_path), base_url=server.url, files=facts)


def test_verified_file_is_not_downloaded_again_and_a_bad_one_is_replaced(tmp_path, payload):
    facts = {"model.bin": _facts("model.bin", payload)}
    (tmp_path / "model.bin").write_bytes(payload)
    with _Server({"model.bin": payload}) as server:
        out = io.StringIO()
        ck.download(str(tmp_path), base_url=server.url, files=facts, out=out)
        assert server.requests == [] and "already present" in out.getvalue()
        (tmp_path / "model.bin").write_bytes(payload[:10])
        ck.download(str(tmp_path), base_url=server.url, files=facts, out=out)
        assert len(server.requests) == 1 and "downloading it again" in out.getvalue()
    assert (tmp_path / "model.bin").read_bytes() == payload


def test_http_error_and_offline_errors(tmp_path, payload):
    facts = {"model.bin": _facts("model.bin", payload)}
    with _Server({}) as server:
        with pytest.raises(CheckpointError, match="HTTP 404"):
            ck.download(str(tmp_path), base_url=server.url, files=facts)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(CheckpointError, match="Could not download model.bin .*offline"):
        ck.download(str(tmp_path), base_url=f"http://127.0.0.1:{port}", files=facts, timeout=5)


def test_download_command_against_a_local_server(tmp_path):
    fake = b"this is not the official mapping file" * 1000
    with _Server({"mapping_00229-model.pth.tar": fake}) as server:
        result = _cli("download", "--checkpoints", str(tmp_path), "--base-url", server.url,
                      "--files", "mapping_00229-model.pth.tar")
        assert server.requests[0][0] == "/releases/mapping_00229-model.pth.tar"
    assert result.returncode == 2
    assert "error: The downloaded mapping_00229-model.pth.tar is not the official file: BAD CHECKSUM" in result.stderr
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = _cli("download", "--checkpoints", str(tmp_path), "--base-url", f"http://127.0.0.1:{port}", "--files", ST_256)
    assert result.returncode == 2 and "offline" in result.stderr and "Traceback" not in result.stderr
    result = _cli("download", "--checkpoints", str(tmp_path), "--files", "nonsense.bin")
    assert result.returncode == 2 and "Unknown checkpoint file(s): nonsense.bin" in result.stderr
