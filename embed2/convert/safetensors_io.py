"""A small reader / writer of the safetensors format, and the weight files of a Hugging Face folder.

The format: an 8-byte little-endian header size, a JSON header of {name: {dtype, shape, data_offsets}},
then the raw row-major little-endian bytes. Written here because the `safetensors` numpy API cannot read
bfloat16, the dtype Gemma ships in, and because memory-mapping lets a shard be cut out of a tensor
without reading the rest of it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import ml_dtypes
import numpy as np

_ST_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "F64": np.dtype(np.float64),
              "BF16": np.dtype(ml_dtypes.bfloat16),
              # Integer buffers saved beside the weights (BERT's embeddings.position_ids): read, then ignored.
              "I64": np.dtype(np.int64), "I32": np.dtype(np.int32)}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """Where one tensor lives: file, dtype name, shape, absolute byte range."""
  file: str
  dtype: str
  shape: tuple[int, ...]
  start: int
  end: int


def read_safetensors_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
  """Tensor name -> TensorInfo from a .safetensors file's header (reads no tensor data)."""
  path = Path(path)
  size = path.stat().st_size
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise ValueError(f"{path} is not a safetensors file (shorter than 8 bytes)")
    n = int.from_bytes(head, "little")
    if n > size - 8:
      raise ValueError(f"{path} is not a safetensors file or is truncated (header of {n} bytes, file of "
                       f"{size})")
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{path} has a corrupt safetensors header ({e})") from None
  base, out = 8 + n, {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    dtype, shape = info.get("dtype"), tuple(int(s) for s in info.get("shape", ()))
    if dtype not in _ST_DTYPES:
      raise ValueError(f"tensor {name!r} in {path} has dtype {dtype}; embed2.convert reads "
                       f"{sorted(_ST_DTYPES)} (convert the checkpoint's floats first)")
    b, e = (int(x) for x in info["data_offsets"])
    if e - b != math.prod(shape) * _ST_DTYPES[dtype].itemsize or base + e > size:
      raise ValueError(f"tensor {name!r} in {path}: data_offsets {[b, e]} do not fit its shape {shape} "
                       f"{dtype} or the file size {size} (truncated or corrupt file)")
    out[name] = TensorInfo(str(path), dtype, shape, base + b, base + e)
  return out


def load_tensor(info: TensorInfo) -> np.ndarray:
  """A read-only memory-mapped view of one tensor (nothing is read until it is indexed)."""
  dtype = _ST_DTYPES[info.dtype]
  if info.end == info.start:
    return np.zeros(info.shape, dtype)
  mm = np.memmap(info.file, dtype=np.uint8, mode="r", offset=info.start, shape=(info.end - info.start,))
  return mm.view(dtype).reshape(info.shape)


def write_safetensors(path: str | os.PathLike, specs: Sequence[tuple[str, tuple[int, ...], Any]],
                      arrays: Iterable[np.ndarray], metadata: dict[str, str] | None = None) -> None:
  """Writes tensors one at a time: `specs` (name, shape, dtype) first, then each array as it comes.

  `arrays` yields the tensors in the order of `specs` (a generator, so only one is in memory).
  """
  header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
  offset = 0
  for name, shape, dtype in specs:
    dt = np.dtype(dtype)
    nbytes = math.prod(shape) * dt.itemsize
    header[name] = {"dtype": _ST_NAMES[dt], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as the reference writer does
  with open(path, "wb") as f:
    f.write(len(blob).to_bytes(8, "little"))
    f.write(blob)
    count = 0
    for (name, shape, dtype), arr in zip(specs, arrays):
      arr = np.ascontiguousarray(arr)
      if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
        raise ValueError(f"tensor {name!r}: got {arr.shape} {arr.dtype}, declared {shape} {np.dtype(dtype)}")
      f.write(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
      count += 1
    if count != len(specs):
      raise ValueError(f"{path}: {len(specs)} tensors declared, {count} written")


def safetensors_files(model_dir: Path) -> list[Path]:
  """The weight files of a Hugging Face folder: those its model.safetensors.index.json lists, else every
  *.safetensors file in it."""
  index = model_dir / "model.safetensors.index.json"
  if index.exists():
    weight_map = json.loads(index.read_text())["weight_map"]
    files = [model_dir / f for f in sorted(set(weight_map.values()))]
  else:
    files = sorted(model_dir.glob("*.safetensors"))
  if not files:
    bins = sorted(p.name for p in model_dir.glob("*.bin"))
    hint = (f" (found {bins}: re-save it with safe_serialization=True)" if bins else "")
    raise FileNotFoundError(f"no *.safetensors weights in {model_dir}{hint}")
  return files


def read_headers(files: Sequence[Path], rename: Callable[[str], str] = lambda n: n) -> dict[str, TensorInfo]:
  """`rename(name)` -> TensorInfo over several files; a name in two files is refused."""
  out: dict[str, TensorInfo] = {}
  for path in files:
    for name, info in read_safetensors_header(path).items():
      key = rename(name)
      if key in out:
        raise ValueError(f"tensor {key!r} appears in both {out[key].file} and {path}")
      out[key] = info
  return out
