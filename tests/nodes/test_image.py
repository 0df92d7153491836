"""Image Nodes: image.decode (jpeg, png, raw) and image.preprocess (resize, normalise)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from streamd import synth
from streamd.config import Settings
from streamd.exceptions import BadInput, TopologyError
from streamd.nodes.base import SOURCE, NodeEnv, Origin, RunContext, resolve
from streamd.nodes.image import DecodeImage, Preprocess, decode_frame, to_gray

ROOT = Path(__file__).resolve().parents[2]
RUN = RunContext(topology="unit", run_id="r1", origin=Origin("cameras.frames", 0, 3), kind="frame",
                 source="line3-cam07", seq=1)


@pytest.fixture
def env() -> NodeEnv:
    return NodeEnv(settings=Settings(), topology_name="unit", base_dir=ROOT / "topologies")


def encode(img: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img[:, :, 0] if img.ndim == 3 and img.shape[2] == 1 else img).save(buf, format=fmt, **kw)
    return buf.getvalue()


def frame(data: bytes, codec: str, **extra) -> dict:
    msg = {"tp": 1, "kind": "frame", "source": "line3-cam07", "seq": 1, "ts": 1795618807.471, "codec": codec,
           "data": data}
    msg.update(extra)
    return msg


def image(h: int, w: int, c: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(h, w, c), dtype=np.uint8)


def smooth(h: int, w: int, c: int) -> np.ndarray:
    """A gradient image: survives JPEG with small errors."""
    y, x = np.mgrid[0:h, 0:w]
    planes = [((x * 255) // max(w - 1, 1)), ((y * 255) // max(h - 1, 1)), ((x + y) * 255 // max(h + w - 2, 1))]
    return np.stack(planes[:c], axis=-1).astype(np.uint8)


def test_registered():
    assert resolve("image.decode") is DecodeImage
    assert resolve("image.preprocess") is Preprocess


# -- image.decode ----------------------------------------------------------------------------


@pytest.mark.parametrize("c", [1, 3])
def test_decode_png_is_lossless(env, c):
    img = image(24, 40, c)
    out = DecodeImage("decode", {}, env).process(RUN, {SOURCE: frame(encode(img, "PNG"), "png")})
    assert out.dtype == np.uint8
    assert out.shape == (24, 40, c)
    np.testing.assert_array_equal(out, img)


def test_decode_png_rgba_drops_alpha(env):
    img = image(10, 12, 4)
    out = decode_frame(frame(encode(img, "PNG"), "png"))
    assert out.shape == (10, 12, 3)
    np.testing.assert_array_equal(out, img[:, :, :3])


@pytest.mark.parametrize("c", [1, 3])
def test_decode_jpeg(env, c):
    img = smooth(48, 64, c)
    out = DecodeImage("decode", {}, env).process(RUN, {SOURCE: frame(encode(img, "JPEG", quality=95), "jpeg")})
    assert out.dtype == np.uint8
    assert out.shape == (48, 64, c)
    assert np.abs(out.astype(int) - img.astype(int)).mean() < 4


@pytest.mark.parametrize("c", [1, 3, 4])
def test_decode_raw(env, c):
    img = image(6, 9, c)
    out = DecodeImage("decode", {}, env).process(
        RUN, {SOURCE: frame(img.tobytes(), "raw", shape=[6, 9, c], dtype="uint8")})
    assert out.dtype == np.uint8
    assert out.shape == (6, 9, 3 if c == 4 else c)
    np.testing.assert_array_equal(out, img[:, :, :3])


def test_decode_synthetic_camera_frame(env):
    img, _ = synth.camera_frame(np.random.default_rng(1), size=(96, 160), channels=3)
    out = decode_frame(frame(encode(img, "PNG"), "png"))
    np.testing.assert_array_equal(out, img)


def test_raw_with_wrong_byte_count(env):
    with pytest.raises(BadInput) as info:
        decode_frame(frame(b"\x00" * 10, "raw", shape=[2, 2, 3], dtype="uint8"), node="decode")
    assert info.value.reason == "bad_image"
    assert info.value.node == "decode"
    assert "12" in str(info.value)


def test_corrupt_jpeg_is_bad_image(env):
    with pytest.raises(BadInput) as info:
        DecodeImage("decode", {}, env).process(RUN, {SOURCE: frame(b"\xff\xd8\xff\xe0garbage" * 20, "jpeg")})
    assert info.value.reason == "bad_image"
    assert "decode" in str(info.value)
    assert "jpeg" in str(info.value)


def test_truncated_jpeg_is_bad_image(env):
    data = encode(smooth(64, 64, 3), "JPEG")
    with pytest.raises(BadInput) as info:
        decode_frame(frame(data[: len(data) // 2], "jpeg"))
    assert info.value.reason == "bad_image"


def test_random_bytes_as_png_is_bad_image():
    with pytest.raises(BadInput) as info:
        decode_frame(frame(bytes(range(256)) * 4, "png"))
    assert info.value.reason == "bad_image"


@pytest.mark.parametrize(("codec", "fmt"), [("jpeg", "PNG"), ("png", "JPEG")])
def test_codec_format_mismatch(codec, fmt):
    data = encode(smooth(16, 16, 3), fmt)
    with pytest.raises(BadInput) as info:
        decode_frame(frame(data, codec), node="decode")
    assert info.value.reason == "bad_image"
    assert f"codec says {codec}" in str(info.value)


def test_unknown_codec():
    with pytest.raises(BadInput) as info:
        decode_frame(frame(b"1234", "webp"))
    assert info.value.reason == "unsupported_codec"


def test_missing_data():
    msg = frame(b"", "png")
    msg["data"] = "not bytes"
    with pytest.raises(BadInput) as info:
        decode_frame(msg)
    assert info.value.reason == "bad_image"


def test_non_frame_kind(env):
    reading = {"tp": 1, "kind": "reading", "source": "s", "seq": 1, "ts": 1.0, "rate_hz": 100.0, "unit": "g",
               "values": b"\x00\x00\x00\x00"}
    with pytest.raises(BadInput) as info:
        DecodeImage("decode", {}, env).process(RUN, {SOURCE: reading})
    assert info.value.reason == "unsupported_kind"
    assert "'reading'" in str(info.value)


def test_16_bit_png_is_scaled_not_clipped():
    arr16 = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr16).save(buf, format="PNG")
    out = decode_frame(frame(buf.getvalue(), "png"))
    assert out.shape == (64, 64, 1)
    assert np.abs(out[:, :, 0].astype(int) - (arr16 >> 8).astype(int)).max() <= 1


# -- image.preprocess ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(128, 128), (240, 320), (96, 160), (31, 17)])
@pytest.mark.parametrize("c", [1, 3])
def test_preprocess_grayscale(env, size, c):
    img = image(size[0], size[1], c, seed=size[0] + c)
    out = Preprocess("preprocess", {"size": [128, 128]}, env).process(RUN, {"decode": img})
    tensor = out["tensor"]
    assert tensor.shape == (1, 128, 128)
    assert tensor.dtype == np.float32
    assert tensor.flags.c_contiguous
    assert 0.0 <= tensor.min() and tensor.max() <= 1.0 + 1e-6
    assert out["orig_size"] == [size[0], size[1]]
    assert all(type(v) is int for v in out["orig_size"])


@pytest.mark.parametrize("c", [1, 3])
def test_preprocess_rgb(env, c):
    img = image(60, 80, c)
    out = Preprocess("preprocess", {"size": [32, 48], "grayscale": False}, env).process(RUN, {"decode": img})
    assert out["tensor"].shape == (3, 32, 48)
    assert out["tensor"].dtype == np.float32
    assert out["orig_size"] == [60, 80]
    if c == 1:  # a grey image fills all three planes
        np.testing.assert_array_equal(out["tensor"][0], out["tensor"][2])


def test_preprocess_same_size_is_exact(env):
    img = image(128, 128, 1)
    out = Preprocess("preprocess", {}, env).process(RUN, {"decode": img})
    np.testing.assert_allclose(out["tensor"][0], img[:, :, 0] / 255.0, atol=1e-6)


def test_preprocess_gray_uses_luma(env):
    img = image(16, 16, 3)
    out = Preprocess("preprocess", {"size": [16, 16]}, env).process(RUN, {"decode": img})
    np.testing.assert_allclose(out["tensor"][0], to_gray(img) / 255.0, atol=1e-6)


def test_preprocess_range_extremes(env):
    node = Preprocess("preprocess", {"size": [64, 64]}, env)
    black = node.process(RUN, {"decode": np.zeros((100, 50, 3), np.uint8)})["tensor"]
    white = node.process(RUN, {"decode": np.full((100, 50, 3), 255, np.uint8)})["tensor"]
    assert black.max() == 0.0
    np.testing.assert_allclose(white, 1.0, atol=1e-5)


def test_preprocess_resize_keeps_a_constant_image(env):
    img = np.full((240, 320, 1), 100, np.uint8)
    out = Preprocess("preprocess", {}, env).process(RUN, {"decode": img})
    np.testing.assert_allclose(out["tensor"], 100 / 255.0, atol=1e-5)


def test_preprocess_scale_param(env):
    out = Preprocess("preprocess", {"size": [8, 8], "scale": 1}, env).process(
        RUN, {"decode": np.full((8, 8, 1), 200, np.uint8)})
    np.testing.assert_allclose(out["tensor"], 200.0)


def test_preprocess_rejects_non_image(env):
    node = Preprocess("preprocess", {}, env)
    with pytest.raises(BadInput):
        node.process(RUN, {"decode": np.zeros((8, 8), np.uint8)})
    with pytest.raises(BadInput):
        node.process(RUN, {"decode": "pixels"})


@pytest.mark.parametrize(
    ("params", "path"),
    [
        ({"size": [1]}, "nodes.pre.params.size"),
        ({"size": [0, 5]}, "nodes.pre.params.size"),
        ({"size": "128x128"}, "nodes.pre.params.size"),
        ({"grayscale": 1}, "nodes.pre.params.grayscale"),
        ({"scale": "1/255"}, "nodes.pre.params.scale"),
    ],
)
def test_preprocess_bad_params(env, params, path):
    with pytest.raises(TopologyError) as info:
        Preprocess("pre", params, env)
    assert info.value.path == path


def test_preprocess_float16_tensor_holds_the_float32_values_to_half_precision(env):
    img = image(96, 160, 3, seed=4)
    f32 = Preprocess("preprocess", {}, env).process(RUN, {"decode": img})["tensor"]
    f16 = Preprocess("preprocess", {"dtype": "float16"}, env).process(RUN, {"decode": img})["tensor"]
    assert f32.dtype == np.float32 and f16.dtype == np.float16 and f16.shape == f32.shape
    np.testing.assert_allclose(f16.astype(np.float32), f32, atol=5e-4)  # float16 spacing near 1.0 is 2**-11


def test_preprocess_unknown_dtype_names_the_param(env):
    with pytest.raises(TopologyError) as info:
        Preprocess("preprocess", {"dtype": "uint8"}, env)
    assert info.value.path == "nodes.preprocess.params.dtype"
    assert "float32, float16" in str(info.value)
