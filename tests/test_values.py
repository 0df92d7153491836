"""streamd.values: Node outputs packed for Redis (msgpack + numpy arrays) and back."""

from __future__ import annotations

import numpy as np
import pytest

from streamd.values import pack_value, unpack_value


def roundtrip(value):
    data = pack_value(value)
    assert isinstance(data, bytes)
    return unpack_value(data)


@pytest.mark.parametrize(
    ("dtype", "shape"),
    [
        ("uint8", (4, 5, 3)),
        ("uint8", (0,)),
        ("float32", (1, 128, 128)),
        ("float64", (7,)),
        ("float16", (2, 3)),
        ("int64", (3, 2, 2, 2)),
        ("int32", (10,)),
        ("uint16", (6, 1)),
        ("bool", (3, 3)),
        (">i4", (3, 4)),  # big-endian keeps its byte order
        ("<f8", (2,)),
    ],
)
def test_arrays_round_trip(dtype, shape):
    rng = np.random.default_rng(0)
    arr = (rng.random(shape) * 100).astype(dtype)
    out = roundtrip(arr)
    assert isinstance(out, np.ndarray)
    assert out.dtype == np.dtype(dtype)
    assert out.shape == shape
    np.testing.assert_array_equal(out, arr)


def test_non_contiguous_arrays_round_trip():
    base = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    for view in (base.T, base[:, ::2, 1:], base[..., 0]):
        assert not view.flags.c_contiguous
        out = roundtrip(view)
        assert out.shape == view.shape
        np.testing.assert_array_equal(out, view)


def test_zero_d_array_keeps_its_shape():
    out = roundtrip(np.array(3.5, dtype=np.float32))
    assert out.shape == ()
    assert out == np.float32(3.5)


def test_nested_containers_round_trip():
    value = {
        "tensor": np.ones((1, 4, 4), dtype=np.float32),
        "orig_size": [240, 320],
        "outputs": {"score": np.float32(0.25), "anomaly_map": np.zeros((1, 2, 2), dtype=np.float32)},
        "regions": [[1, 2, 3, 4], [5, 6, 7, 8]],
        "label": "scratch",
        "anomaly": True,
        "none": None,
        "deep": [{"a": [np.arange(3, dtype=np.int64), {"b": b"\x00\xff"}]}],
    }
    out = roundtrip(value)
    assert set(out) == set(value)
    np.testing.assert_array_equal(out["tensor"], value["tensor"])
    assert out["tensor"].dtype == np.float32
    assert out["orig_size"] == [240, 320]
    assert out["outputs"]["score"] == pytest.approx(0.25)
    assert out["outputs"]["anomaly_map"].shape == (1, 2, 2)
    assert out["regions"] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert out["label"] == "scratch"
    assert out["anomaly"] is True
    assert out["none"] is None
    np.testing.assert_array_equal(out["deep"][0]["a"][0], [0, 1, 2])
    assert out["deep"][0]["a"][1] == {"b": b"\x00\xff"}


def test_tuples_come_back_as_lists():
    assert roundtrip({"size": (128, 96)}) == {"size": [128, 96]}


def test_int_keys_are_allowed():
    """A map run_id -> output is string-keyed, but Node outputs may use int keys too."""
    assert roundtrip({1: "a", 2: [3]}) == {1: "a", 2: [3]}


@pytest.mark.parametrize(
    ("scalar", "expected", "kind"),
    [
        (np.float32(0.5), 0.5, float),
        (np.float64(1.25), 1.25, float),
        (np.int64(-7), -7, int),
        (np.uint8(255), 255, int),
        (np.int32(42), 42, int),
        (np.bool_(True), True, bool),
    ],
)
def test_numpy_scalars_become_python_values(scalar, expected, kind):
    out = roundtrip(scalar)
    assert type(out) is kind
    assert out == expected


def test_bytes_and_strings_stay_distinct():
    out = roundtrip([b"\x89PNG\r\n", "text", b"", ""])
    assert out == [b"\x89PNG\r\n", "text", b"", ""]
    assert isinstance(out[0], bytes) and isinstance(out[1], str)


@pytest.mark.parametrize("bad", [{1, 2}, object(), complex(1, 2), {"nested": [frozenset()]}])
def test_rejected_type_gives_clear_type_error(bad):
    with pytest.raises(TypeError, match="a Node output cannot hold .*; use numbers, strings, bytes, lists"):
        pack_value(bad)


def test_rejected_type_names_the_type():
    class Widget:
        pass

    with pytest.raises(TypeError, match="Widget"):
        pack_value({"w": Widget()})


def test_object_dtype_array_is_rejected_when_packed():
    with pytest.raises(TypeError, match="object"):
        pack_value(np.array([1, "a"], dtype=object))
