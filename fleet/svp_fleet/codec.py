"""Weight updates as the arrays that travel, and back, with checks.

A client sends `new - global` for every tensor of the model, named as
`svp.Model.weight_names()` names them: as float32, as float16, or as int8
with one float32 scale per row under `NAME:scale` (svp's own quantizers, the
encodings of its model files). Sending the difference, not the weights, keeps
the quantization error proportional to what a round changed.
"""

from __future__ import annotations

import numpy as np

import svp

DTYPES = ("f32", "f16", "int8")
SCALE_SUFFIX = ":scale"


class UpdateRejected(ValueError):
    """An update that does not fit the model; the message says why."""


def encode(names: list[str], deltas: list[np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """The arrays that carry `deltas` (float32, one per name) as `dtype`."""
    if dtype not in DTYPES:
        raise ValueError(f"update dtype {dtype!r}: give one of {', '.join(DTYPES)}")
    out: dict[str, np.ndarray] = {}
    for name, delta in zip(names, deltas, strict=True):
        delta = np.ascontiguousarray(delta, dtype=np.float32)
        if dtype == "f32":
            out[name] = delta
            continue
        values, scales = svp.quantize(delta, dtype)
        out[name] = values
        if scales is not None:
            out[name + SCALE_SUFFIX] = scales
    return out


def decode(arrays: dict[str, np.ndarray], names: list[str], shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    """The float32 deltas `arrays` carry, checked against the model's tensor
    names and shapes; raises UpdateRejected naming what does not fit."""
    expected = set(names)
    expected |= {n + SCALE_SUFFIX for n in names if arrays.get(n) is not None and arrays[n].dtype == np.int8}
    missing = sorted(expected - arrays.keys())
    extra = sorted(arrays.keys() - expected)
    if missing:
        raise UpdateRejected(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    if extra:
        raise UpdateRejected(f"unexpected {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}")
    deltas = []
    for name, shape in zip(names, shapes, strict=True):
        values = arrays[name]
        if tuple(values.shape) != tuple(shape):
            raise UpdateRejected(f"{name} has shape {list(values.shape)}, the model's is {list(shape)}")
        if values.dtype == np.float32:
            delta = values
        elif values.dtype in (np.float16, np.int8):
            try:
                delta = svp.dequantize(values, arrays.get(name + SCALE_SUFFIX))
            except ValueError as e:
                raise UpdateRejected(f"{name}: {e}") from None
        else:
            raise UpdateRejected(f"{name} is {values.dtype}; give float32, float16 or int8")
        if not np.isfinite(delta).all():
            raise UpdateRejected(f"{name} holds a value that is not finite")
        deltas.append(delta)
    return deltas


def payload_bytes(arrays: dict[str, np.ndarray]) -> int:
    """Bytes of array data in an update (what dominates the message)."""
    return sum(a.nbytes for a in arrays.values())
