"""Checkpoint discovery and strict loading with clear errors (small files in the official layout, synthetic weights)."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from sadtalker import checkpoints as ck
from core.errors import CheckpointError
from sadtalker.synthetic import file_spec, synthetic_state

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
    with pytest.raises(CheckpointError, match="does not exist.*app.py weights download"):
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
    assert nets.mapping_crop is not None and nets.mapping_still is None


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


def test_synthetic_official_file_holds_the_recipe_values():
    """The cached synthetic safetensors (what the golden test loads) stores exactly the recipe's tensors,
    including the derived ones (anti-alias kernel, spectral-norm v) that are easy to write with a wrong layout."""
    from safetensors import safe_open

    from sadtalker.synthetic import synthetic_tensor
    from sadtalker.synthetic import cached_official_layout as synthetic_checkpoint_dir

    spec = {k: s for k, s, _ in file_spec(ST_256)}
    keys = [k for k in spec if k.endswith(("down.weight", "weight_v"))]
    keys += ["audio2exp.mapping1.weight", "generator.first.conv.weight", "face_3drecon.final_layers.6.bias"]
    with safe_open(os.path.join(synthetic_checkpoint_dir(legacy=False), ST_256), framework="numpy") as f:
        for key in keys:
            np.testing.assert_array_equal(f.get_tensor(key), synthetic_tensor(key, spec[key], spec), err_msg=key)
