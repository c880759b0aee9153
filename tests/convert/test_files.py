"""Reading checkpoint files: the streaming safetensors reader and torch state dicts.

The safetensors package (its own reader and writer) is the outside judge of
the format; our reader must agree with it without torch and without mmap.
"""

import json
import sys

import numpy as np
import pytest

safetensors_numpy = pytest.importorskip("safetensors.numpy")

from keras_vitscale.config import ViTConfig  # noqa: E402
from keras_vitscale.convert import common, files  # noqa: E402


def saved(tmp_path, arrays, name="model.safetensors"):
    path = tmp_path / name
    safetensors_numpy.save_file(arrays, str(path), metadata={"format": "pt"})
    return path


@pytest.fixture
def arrays(rng):
    return {"a.weight": rng.standard_normal((4, 3)).astype("float32"),
            "a.bias": rng.standard_normal(4).astype("float16"),
            "scalar": np.array(2.5, "float64"),
            "empty": np.zeros((0, 3), "float32")}


def test_reader_agrees_with_safetensors(tmp_path, arrays):
    path = saved(tmp_path, arrays)
    reader = files.SafetensorsReader(path)
    assert sorted(reader) == sorted(arrays) and len(reader) == 4 and "a.bias" in reader
    assert reader.shapes == {k: v.shape for k, v in arrays.items()}
    assert reader.dtypes == {"a.weight": "F32", "a.bias": "F16", "scalar": "F64",
                             "empty": "F32"}
    assert reader.metadata == {"format": "pt"}
    for key, want in safetensors_numpy.load_file(str(path)).items():
        got = reader[key]
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    assert files.load_state_dict(path).shapes == reader.shapes


def test_bfloat16_is_widened_exactly_without_torch(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    values = torch.randn(5, 7, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    save_file({"w": values}, str(tmp_path / "bf16.safetensors"))
    monkeypatch.setitem(sys.modules, "torch", None)  # any torch import now fails
    reader = files.SafetensorsReader(tmp_path / "bf16.safetensors")
    assert reader.dtypes == {"w": "BF16"}
    got = reader["w"]
    assert got.dtype == np.float32
    monkeypatch.undo()
    np.testing.assert_array_equal(got, values.float().numpy())
    np.testing.assert_array_equal(common.as_float32(values), got)


def test_shapes_never_read_data(tmp_path, arrays, monkeypatch):
    path = saved(tmp_path, {"w": arrays["a.weight"]})
    reader = files.SafetensorsReader(path)

    def no_read(self, key):
        raise AssertionError(f"{key} was read")

    monkeypatch.setattr(files.SafetensorsReader, "__getitem__", no_read)
    assert common.shapes_of(reader) == {"w": (4, 3)}
    config = ViTConfig(width=8, depth=1, mlp_dim=8, num_heads=1, patch_size=2,
                       image_size=2, num_classes=0, posemb="none", pooling="gap")
    # Every variable asks for "w" in the shape it needs; the (4, 3) in the
    # file fits none, which is found from the header alone.
    recipe = lambda path, shape: common.Source(("w",), (shape,), lambda w: w)  # noqa: E731
    with pytest.raises(ValueError, match=r"w \(4, 3\), needs \(2, 2, 3, 8\)"):
        common.gather_weights(config, reader, recipe, source_name="test")
    weights = common.gather_weights(
        config, reader, lambda path, shape: common.Source(("w",), ((4, 3),), None),
        source_name="test")  # a fitting plan: checked, nothing read yet
    assert weights.shapes == config.parameter_shapes()


def header_bytes(header):
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw


@pytest.mark.parametrize("damage, why", [
    (lambda data: data[: len(data) - 7], "ends at byte"),             # cut short
    (lambda data: data[:5], "shorter than the header length"),
    (lambda data: (10**9).to_bytes(8, "little") + data[8:], "header length"),
    (lambda data: data[:8] + b"[" + data[9:], "not JSON"),
    (lambda data: header_bytes({"w": {"dtype": "F32", "shape": [4, 3],
                                      "data_offsets": [0, 40]}}) + bytes(48),
     "not the 48"),
    (lambda data: header_bytes({"w": {"dtype": "Q7", "shape": [1],
                                      "data_offsets": [0, 4]}}) + bytes(4),
     "malformed header entry"),
    (lambda data: header_bytes([1, 2]), "not a JSON object"),
])
def test_a_damaged_file_is_refused_before_any_tensor_is_read(tmp_path, arrays, damage, why):
    path = saved(tmp_path, {"w": arrays["a.weight"]})
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=why) as info:
        files.SafetensorsReader(path)
    message = str(info.value)
    assert str(path) in message and "truncated or corrupt" in message
    assert "download or save it again" in message


def test_a_file_cut_after_opening_is_named_on_read(tmp_path, arrays):
    path = saved(tmp_path, {"w": arrays["a.weight"]})
    reader = files.SafetensorsReader(path)
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(ValueError, match=r"'w' ends past the end of the file.*download"):
        reader["w"]


def test_shards_are_one_mapping_and_a_duplicate_is_refused(tmp_path, arrays):
    first = saved(tmp_path, {"x": arrays["a.weight"]}, "one.safetensors")
    second = saved(tmp_path, {"y": arrays["a.bias"]}, "two.safetensors")
    reader = files.SafetensorsReader([first, second])
    assert reader.shapes == {"x": (4, 3), "y": (4,)}
    np.testing.assert_array_equal(reader["y"], arrays["a.bias"])
    with pytest.raises(ValueError, match="'x' is in both"):
        files.SafetensorsReader([first, first])


def test_pytorch_bin_is_read_with_torch_and_refused_clearly_without(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    path = tmp_path / "pytorch_model.bin"
    torch.save({"model": {"patch_embed.proj.weight": torch.ones(2, 3)}}, path)
    state = files.load_state_dict(path)
    assert list(state) == ["patch_embed.proj.weight"]  # unwrapped from {"model": ...}
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match="truncated or corrupt.*download or save it again"):
        files.load_state_dict(path)
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match="pip install torch.*model.safetensors"):
        files.load_state_dict(path)
