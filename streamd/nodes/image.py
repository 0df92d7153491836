"""Image Nodes: decode TP frames, and resize/normalise them for a model."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..exceptions import BadInput, TopologyError
from .base import SOURCE, Node, NodeEnv, RunContext, register

__all__ = ["DecodeImage", "Preprocess", "decode_frame", "to_gray"]

#: The tensor types ``image.preprocess`` can give.
TENSOR_DTYPES = ("float32", "float16")
#: Refuse images whose decoded size would exceed this many pixels (decompression bombs).
MAX_PIXELS = 64_000_000


def decode_frame(msg: Mapping[str, Any], *, node: str = "") -> np.ndarray:
    """A TP ``frame`` message's pixels as uint8 HxWxC (C = 1 or 3)."""
    codec = msg.get("codec")
    data = msg.get("data")
    if not isinstance(data, (bytes, bytearray)):
        raise BadInput("frame has no binary 'data'", node=node, reason="bad_image")
    if codec == "raw":
        h, w, c = (int(v) for v in msg["shape"])
        arr = np.frombuffer(data, dtype=np.uint8)
        if arr.size != h * w * c:
            raise BadInput(f"raw frame holds {arr.size} bytes, shape {[h, w, c]} needs {h * w * c}", node=node,
                           reason="bad_image")
        arr = arr.reshape(h, w, c)
        return arr[:, :, :3] if c == 4 else arr
    if codec not in ("jpeg", "png"):
        raise BadInput(f"codec {codec!r} is not jpeg, png or raw", node=node, reason="unsupported_codec")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_PIXELS:
                raise BadInput(f"image of {img.width}x{img.height} exceeds {MAX_PIXELS} pixels", node=node,
                               reason="oversized_frame")
            expected = "JPEG" if codec == "jpeg" else "PNG"
            if img.format != expected:
                raise BadInput(f"codec says {codec} but the bytes are {img.format}", node=node, reason="bad_image")
            if img.mode.startswith("I"):  # 16-bit mono PNG (I;16 or I): scale to 8 bits, do not clip
                arr = np.clip(np.asarray(img).astype(np.int64) >> 8, 0, 255).astype(np.uint8)
            else:
                arr = np.asarray(img.convert("L" if img.mode in ("L", "1") else "RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BadInput(f"cannot decode {codec} image: {exc}", node=node, reason="bad_image") from None
    return arr[:, :, None] if arr.ndim == 2 else arr


def to_gray(arr: np.ndarray) -> np.ndarray:
    """uint8 HxWxC to float32 HxW grayscale in [0, 255] (ITU-R 601 luma)."""
    if arr.shape[2] == 1:
        return arr[:, :, 0].astype(np.float32)
    rgb = arr[:, :, :3].astype(np.float32)
    return rgb[:, :, 0] * 0.299 + rgb[:, :, 1] * 0.587 + rgb[:, :, 2] * 0.114


@register("image.decode")
class DecodeImage(Node):
    """Root Node for ``frame`` sources: decodes JPEG, PNG or raw into a uint8 HxWxC array."""

    def process(self, run: RunContext, inputs: Mapping[str, Any]) -> Any:
        msg = inputs[SOURCE]
        if msg.get("kind") != "frame":
            raise BadInput(f"expects a 'frame' message, got {msg.get('kind')!r}", node=self.node_id,
                           reason="unsupported_kind")
        return decode_frame(msg, node=self.node_id)


@register("image.preprocess")
class Preprocess(Node):
    """Resize (bilinear) and normalise an image for a model.

    params: ``size`` [h, w] (default [128, 128]); ``grayscale`` (default true);
    ``scale`` (default 1/255); ``dtype`` of the tensor, ``float32`` (default) or ``float16``
    (half the bytes where the tensor crosses Redis to a Node in another stage; an
    ``onnx.model`` Node casts it to its model's input type). Output:
    ``{"tensor": CxHxW array of that dtype, "orig_size": [h, w]}``.
    """

    def __init__(self, node_id: str, params: Mapping[str, Any], env: NodeEnv) -> None:
        super().__init__(node_id, params, env)
        size = self.param("size", [128, 128], kind=list)
        if len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
            raise TopologyError(f"size must be [h, w] positive integers, got {size!r}",
                                path=f"nodes.{node_id}.params.size")
        self.size = (int(size[0]), int(size[1]))
        self.grayscale = bool(self.param("grayscale", True, kind=bool))
        self.scale = float(self.param("scale", 1.0 / 255.0, kind=(int, float)))
        dtype = self.param("dtype", "float32", kind=str)
        if dtype not in TENSOR_DTYPES:
            raise TopologyError(f"dtype must be one of {', '.join(TENSOR_DTYPES)}, got {dtype!r}",
                                path=f"nodes.{node_id}.params.dtype")
        self.dtype = np.dtype(dtype)

    def process(self, run: RunContext, inputs: Mapping[str, Any]) -> Any:
        (arr,) = inputs.values()
        if not isinstance(arr, np.ndarray) or arr.ndim != 3:
            raise BadInput("expects an HxWxC image from its parent", node=self.node_id)
        h, w = arr.shape[:2]
        planes = [to_gray(arr)] if self.grayscale else [
            arr[:, :, min(i, arr.shape[2] - 1)].astype(np.float32) for i in range(3)
        ]
        if (h, w) != self.size:
            planes = [
                np.asarray(Image.fromarray(p, mode="F").resize((self.size[1], self.size[0]), Image.Resampling.BILINEAR))
                for p in planes
            ]
        tensor = np.stack(planes) * np.float32(self.scale)
        return {"tensor": np.ascontiguousarray(tensor, dtype=self.dtype), "orig_size": [int(h), int(w)]}
