"""Model files: safe round trip, and clear refusals of corrupt, tampered and foreign files."""

import json
import struct

import numpy as np
import pytest
import torch
from NoduleDetectionLib.errors import ModelError
from NoduleDetectionLib.models import FORMAT_VERSION, ModelConfig, NoduleModel, Stage1Config, UNet3D


@pytest.fixture
def small_model():
    return NoduleModel.build(ModelConfig(stage1=Stage1Config(channels=(4, 8)), card={"x": 1}), seed=3)


def test_round_trip_gives_identical_outputs(small_model, tmp_path):
    path = small_model.save(tmp_path / "m.safetensors")
    loaded = NoduleModel.load(path)
    assert loaded.config == small_model.config
    small_model.stage1.eval()
    small_model.stage2.eval()
    x = torch.rand(1, 1, 16, 16, 16)
    p = torch.rand(2, 2, 24, 24, 24)
    with torch.no_grad():
        assert torch.equal(loaded.stage1(x), small_model.stage1(x))
        assert torch.equal(loaded.stage2(p), small_model.stage2(p))


def test_save_refuses_to_overwrite(small_model, tmp_path):
    path = small_model.save(tmp_path / "m.safetensors")
    with pytest.raises(ModelError.__mro__[1], match="already exists"):
        small_model.save(path)
    small_model.save(path, overwrite=True)


def _header(path):
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return data, n, json.loads(data[8 : 8 + n])


def _rewrite(path, header, body):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def test_tampered_weight_fails_checksum(small_model, tmp_path):
    path = small_model.save(tmp_path / "m.safetensors")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="checksum"):
        NoduleModel.load(path)


def test_truncated_file_is_refused(small_model, tmp_path):
    path = small_model.save(tmp_path / "m.safetensors")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ModelError, match="not a readable model file"):
        NoduleModel.load(path)


def test_other_format_version_says_so(small_model, tmp_path):
    path = small_model.save(tmp_path / "m.safetensors")
    data, n, header = _header(path)
    header["__metadata__"]["format_version"] = str(FORMAT_VERSION + 1)
    _rewrite(path, header, data[8 + n :])
    with pytest.raises(ModelError, match=f"format version {FORMAT_VERSION + 1}"):
        NoduleModel.load(path)


def test_foreign_files_are_refused(tmp_path):
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(3)}, str(other))
    with pytest.raises(ModelError, match="not a NoduleDetection model"):
        NoduleModel.load(other)
    pickle_file = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(3)}, pickle_file)
    with pytest.raises(ModelError):
        NoduleModel.load(pickle_file)
    with pytest.raises(ModelError, match="not found"):
        NoduleModel.load(tmp_path / "missing.safetensors")


def test_unet_shapes():
    net = UNet3D((4, 8, 16)).eval()
    with torch.no_grad():
        out = net(torch.zeros(1, 1, 24, 32, 16))
    assert out.shape == (1, 1, 24, 32, 16)
    assert np.isfinite(out.numpy()).all()
