"""Checkpoint discovery, strict loading with clear errors, verify, and resumable verified download.

Loader tests use small files in the official layout (only the sections a test needs, synthetic weights); download
tests use a real HTTP server on 127.0.0.1 (port 0) serving small files, with Range support and injected faults.
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
import torch
from safetensors.numpy import save_file

from sadtalker import checkpoints as ck
from core.errors import CheckpointError
from sadtalker.synthetic import file_spec, synthetic_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ST_256 = "SadTalker_V0.0.2_256.safetensors"


def _section_state(prefix: str, file_name: str = ST_256) -> dict[str, np.ndarray]:
    return synthetic_state([(k, s) for k, s, _ in file_spec(file_name) if k.startswith(prefix)])


@pytest.fixture(scope="module")
def audio2exp_state() -> dict[str, np.ndarray]:
    return _section_state("audio2exp.")


def _write_safetensors(directory, state: dict[str, np.ndarray], name: str = ST_256) -> str:
    path = os.path.join(directory, name)
    save_file(state, path)
    return path


# ---- loading ---------------------------------------------------------------------------------------------------

def test_loads_a_section_strictly_from_the_official_layout(tmp_path, audio2exp_state):
    _write_safetensors(tmp_path, audio2exp_state)
    nets = ck.load_networks(str(tmp_path), parts=["audio2exp"])
    assert nets.audio2exp is not None and not nets.audio2exp.training
    assert nets.generator is None and nets.files["audio2exp"].endswith(ST_256)
    loaded = nets.audio2exp.state_dict()["mapping1.weight"].numpy()
    np.testing.assert_array_equal(loaded, audio2exp_state["audio2exp.mapping1.weight"])
    assert not any(p.requires_grad for p in nets.audio2exp.parameters())


def test_audio2pose_accepts_only_the_listed_unused_tensors(tmp_path):
    state = _section_state("audio2pose.")
    assert any(k.startswith("audio2pose.netG.encoder.") for k in state)  # stored, not built
    assert any(k.startswith("audio2pose.netD_motion.") for k in state)
    _write_safetensors(tmp_path, state)
    nets = ck.load_networks(str(tmp_path), parts=["audio2pose"])
    assert not any(k.startswith(("netG.encoder", "netD_motion")) for k in nets.audio2pose.state_dict())


def test_truncated_safetensors_names_the_file(tmp_path, audio2exp_state):
    path = _write_safetensors(tmp_path, audio2exp_state)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(CheckpointError, match=rf"{ST_256} is truncated: it has {size - 1000:,} bytes"):
        ck.load_networks(str(tmp_path), parts=["audio2exp"])


def test_random_file_renamed_to_safetensors(tmp_path):
    (tmp_path / ST_256).write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    with pytest.raises(CheckpointError, match=rf"{ST_256} is not a safetensors file"):
        ck.load_networks(str(tmp_path), parts=["audio2exp"])


def test_empty_file(tmp_path):
    (tmp_path / ST_256).write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty or truncated"):
        ck.load_networks(str(tmp_path), parts=["audio2exp"])


def test_missing_key_is_reported(tmp_path, audio2exp_state):
    state = dict(audio2exp_state)
    del state["audio2exp.mapping1.bias"]
    _write_safetensors(tmp_path, state)
    with pytest.raises(CheckpointError, match=r"section 'audio2exp\.'.*1 tensor\(s\) missing \(e\.g\. mapping1\.bias\)"):
        ck.load_networks(str(tmp_path), parts=["audio2exp"])


def test_wrong_shape_is_reported(tmp_path, audio2exp_state):
    state = dict(audio2exp_state)
    state["audio2exp.mapping1.weight"] = np.zeros((64, 576), np.float32)
    _write_safetensors(tmp_path, state)
    with pytest.raises(CheckpointError, match=r"wrong shape \(e\.g\. mapping1\.weight: \(64, 576\) in the file, "
                                              r"\(64, 577\) expected\)"):
        ck.load_networks(str(tmp_path), parts=["audio2exp"])


def test_unexpected_tensor_in_a_section_is_reported(tmp_path, audio2exp_state):
    state = dict(audio2exp_state, **{"audio2exp.mapping2.weight": np.zeros((64, 30), np.float32)})
    _write_safetensors(tmp_path, state)
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) \(e\.g\. mapping2\.weight\)"):
        ck.load_networks(str(tmp_path), parts=["audio2exp"])


def test_tensor_outside_the_official_sections_is_rejected(tmp_path, audio2exp_state):
    state = dict(audio2exp_state, **{"he_estimator.fc_yaw.weight": np.zeros((66, 2048), np.float32)})
    _write_safetensors(tmp_path, state)
    with pytest.raises(CheckpointError, match="outside the official sections"):
        ck.load_networks(str(tmp_path), parts=["audio2exp"])


def test_missing_section_is_reported(tmp_path, audio2exp_state):
    _write_safetensors(tmp_path, audio2exp_state)
    with pytest.raises(CheckpointError, match=r"has no section 'face_3drecon\.'"):
        ck.load_networks(str(tmp_path), parts=["face_recon"])


def test_wrong_dtype_is_reported(tmp_path, audio2exp_state):
    state = dict(audio2exp_state)
    state["audio2exp.mapping1.bias"] = np.zeros(64, np.int32)
    _write_safetensors(tmp_path, state)
    with pytest.raises(CheckpointError, match="wrong data type"):
        ck.load_networks(str(tmp_path), parts=["audio2exp"])


def test_missing_folder_and_empty_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist.*sadtalker.checkpoints download"):
        ck.load_networks(str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match=rf"No SadTalker checkpoints in .*expected {ST_256}"):
        ck.load_networks(str(tmp_path))


def test_other_size_only(tmp_path, audio2exp_state):
    _write_safetensors(tmp_path, audio2exp_state)
    with pytest.raises(CheckpointError, match=r"SadTalker_V0\.0\.2_512\.safetensors is missing .*found "
                                              rf"{ST_256}"):
        ck.load_networks(str(tmp_path), size=512, parts=["audio2exp"])


def _mapping_payload(name: str) -> dict:
    state = synthetic_state([(k, s) for k, s, _ in file_spec(name)])
    return {"mapping": {k: torch.from_numpy(v) for k, v in state.items()}, "epoch": 229,
            "optimizer_mapping": {"state": {}, "param_groups": [{"lr": 2e-4, "betas": (0.5, 0.999), "params": [0]}]}}


def test_mapping_files_load_and_missing_one_is_named(tmp_path, audio2exp_state):
    pytest.importorskip("sadtalker.models.mapping", reason="MappingNet lands with the renderer branch")
    _write_safetensors(tmp_path, audio2exp_state)
    torch.save(_mapping_payload(ck.MAPPING_CROP_FILE), tmp_path / ck.MAPPING_CROP_FILE)
    with pytest.raises(CheckpointError, match=rf"missing from .*{ck.MAPPING_STILL_FILE}"):
        ck.load_networks(str(tmp_path), parts=["mapping_crop", "mapping_still"])
    nets = ck.load_networks(str(tmp_path), parts=["mapping_crop"])
    assert nets.mapping_for("crop") is nets.mapping_crop
    with pytest.raises(CheckpointError, match="not loaded"):
        nets.mapping_for("full")


def test_damaged_torch_files_give_clear_errors(tmp_path, audio2exp_state):
    _write_safetensors(tmp_path, audio2exp_state)
    path = tmp_path / ck.MAPPING_CROP_FILE
    torch.save({"mapping": {"first.0.weight": torch.zeros(3)}, "epoch": 1}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(CheckpointError, match=rf"{ck.MAPPING_CROP_FILE} is not a readable PyTorch checkpoint"):
        ck.load_networks(str(tmp_path), parts=["mapping_crop"])
    path.write_bytes(os.urandom(4096))  # some other file renamed
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        ck.load_networks(str(tmp_path), parts=["mapping_crop"])
    torch.save({"generator": {"x": torch.zeros(1)}, "epoch": 1}, path)  # wrong file: no 'mapping' entry
    with pytest.raises(CheckpointError, match=r"has no entry 'mapping' \(it has: generator\)"):
        ck.load_networks(str(tmp_path), parts=["mapping_crop"])
    torch.save({"mapping": io.StringIO("code")}, path)  # arbitrary Python objects are refused, never unpickled
    with pytest.raises(CheckpointError, match="refusing to run code"):
        ck.load_networks(str(tmp_path), parts=["mapping_crop"])


def test_legacy_files_are_used_without_safetensors(tmp_path, audio2exp_state):
    bare = {k[len("audio2exp."):]: torch.from_numpy(v) for k, v in audio2exp_state.items()}
    torch.save({"model": bare, "epoch": 300}, tmp_path / ck.LEGACY_AUDIO2EXP_FILE)
    nets = ck.load_networks(str(tmp_path), parts=["audio2exp"])
    assert nets.files["audio2exp"].endswith(ck.LEGACY_AUDIO2EXP_FILE)
    np.testing.assert_array_equal(nets.audio2exp.mapping1.bias.numpy(), audio2exp_state["audio2exp.mapping1.bias"])
    with pytest.raises(CheckpointError, match=rf"missing from .*{ck.LEGACY_RECON_FILE}"):
        ck.load_networks(str(tmp_path), parts=["audio2exp", "face_recon"])


def test_dtype_and_device_are_applied(tmp_path, audio2exp_state):
    _write_safetensors(tmp_path, audio2exp_state)
    nets = ck.load_networks(str(tmp_path), parts=["audio2exp"], dtype=torch.float64)
    assert nets.audio2exp.mapping1.weight.dtype == torch.float64


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
    return subprocess.run([sys.executable, "-m", "sadtalker.checkpoints", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_verify_command_reports_each_file(tmp_path):
    (tmp_path / ST_256).write_bytes(b"x" * 1000)  # a truncated download
    (tmp_path / "mapping_00229-model.pth.tar").write_bytes(b"not the mapping file")  # size unknown: hashed
    result = _cli("verify", "--dir", str(tmp_path))
    assert result.returncode == 1, result.stdout + result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    assert "WRONG SIZE: 1,000 bytes, expected 725,066,984" in lines[ST_256]
    assert "BAD CHECKSUM" in lines["mapping_00229-model.pth.tar"]
    assert "missing (needed" in lines["mapping_00109-model.pth.tar"]
    assert "missing (optional" in lines["GFPGANv1.4.pth"]
    assert "download --dir" in result.stdout


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
        result = _cli("download", "--dir", str(tmp_path), "--base-url", server.url,
                      "--files", "mapping_00229-model.pth.tar")
        assert server.requests[0][0] == "/releases/mapping_00229-model.pth.tar"
    assert result.returncode == 1
    assert "error: The downloaded mapping_00229-model.pth.tar is not the official file: BAD CHECKSUM" in result.stderr
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = _cli("download", "--dir", str(tmp_path), "--base-url", f"http://127.0.0.1:{port}", "--files", ST_256)
    assert result.returncode == 1 and "offline" in result.stderr and "Traceback" not in result.stderr
    result = _cli("download", "--dir", str(tmp_path), "--files", "nonsense.bin")
    assert result.returncode == 1 and "Unknown checkpoint file(s): nonsense.bin" in result.stderr


def test_synthetic_official_file_holds_the_recipe_values():
    """The cached synthetic safetensors (what the golden test loads) stores exactly the recipe's tensors,
    including the derived ones (anti-alias kernel, spectral-norm v) that are easy to write with a wrong layout."""
    from safetensors import safe_open

    from sadtalker.synthetic import synthetic_tensor
    from synthetic_checkpoints import synthetic_checkpoint_dir

    spec = {k: s for k, s, _ in file_spec(ST_256)}
    keys = [k for k in spec if k.endswith(("down.weight", "weight_v"))]
    keys += ["audio2exp.mapping1.weight", "generator.first.conv.weight", "face_3drecon.final_layers.6.bias"]
    with safe_open(os.path.join(synthetic_checkpoint_dir(legacy=False), ST_256), framework="numpy") as f:
        for key in keys:
            np.testing.assert_array_equal(f.get_tensor(key), synthetic_tensor(key, spec[key], spec), err_msg=key)
