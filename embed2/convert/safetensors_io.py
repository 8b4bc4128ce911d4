"""A small reader / writer of the safetensors format, and the weight files of a Hugging Face folder.

The format: an 8-byte little-endian header size, a JSON header of {name: {dtype, shape, data_offsets}},
then the raw row-major little-endian bytes. Written here because the `safetensors` numpy API cannot read
bfloat16, the dtype Gemma ships in, and because memory-mapping lets a shard be cut out of a tensor
without reading the rest of it.

Files go through etils.epath, so a folder may be local or on an object store (`gs://`, `s3://`). A local
tensor is memory-mapped; a remote one is read whole (its byte range only) when it is loaded. A write
streams tensor after tensor into the file (on an object store gcsfs / s3fs upload it in blocks as it
grows): the file is never in memory as a whole.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Iterable, Sequence

import ml_dtypes
import numpy as np
from etils import epath

from embed2.checkpoint import is_remote

_ST_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "F64": np.dtype(np.float64),
              "BF16": np.dtype(ml_dtypes.bfloat16),
              # Integer buffers saved beside the weights (BERT's embeddings.position_ids): read, then ignored.
              "I64": np.dtype(np.int64), "I32": np.dtype(np.int32)}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_WRITE_BYTES = 8 << 20  # a tensor is written in slices of this size (see write_safetensors)


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
  path = epath.Path(path)
  size = path.stat().length
  with path.open("rb") as f:
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
  """One tensor, read-only: a memory-mapped view of a local file (nothing is read until it is indexed);
  from an object store, its bytes read in one ranged request (no memory map there)."""
  dtype = _ST_DTYPES[info.dtype]
  if info.end == info.start:
    return np.zeros(info.shape, dtype)
  if is_remote(info.file):
    with epath.Path(info.file).open("rb") as f:
      f.seek(info.start)
      data = f.read(info.end - info.start)
    if len(data) != info.end - info.start:
      raise ValueError(f"{info.file} is truncated: {len(data)} of the {info.end - info.start} bytes of a tensor")
    return np.frombuffer(data, dtype=dtype).reshape(info.shape)
  mm = np.memmap(info.file, dtype=np.uint8, mode="r", offset=info.start, shape=(info.end - info.start,))
  return mm.view(dtype).reshape(info.shape)


def write_safetensors(path: str | os.PathLike, specs: Sequence[tuple[str, tuple[int, ...], Any]],
                      arrays: Iterable[np.ndarray], metadata: dict[str, str] | None = None) -> None:
  """Writes tensors one at a time: `specs` (name, shape, dtype) first, then each array as it comes.

  `arrays` yields the tensors in the order of `specs` (a generator, so only one is in memory). The file
  (local or remote, through epath) is written as the tensors come: beyond the tensor at hand, memory holds
  at most a slice of it and, for a remote file, the upload block of gcsfs / s3fs.
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
  with epath.Path(path).open("wb") as f:
    f.write(len(blob).to_bytes(8, "little"))
    f.write(blob)
    count, arrays = 0, iter(arrays)
    for name, shape, dtype in specs:  # not zip(): its reused result tuple would keep the last tensor alive
      arr = next(arrays, None)
      if arr is None:
        break
      arr = np.ascontiguousarray(arr)
      if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
        raise ValueError(f"tensor {name!r}: got {arr.shape} {arr.dtype}, declared {shape} {np.dtype(dtype)}")
      # The array's own buffer in slices (uint8: numpy gives no buffer for bfloat16), not a bytes copy of
      # a tensor that may be gigabytes; an object-store file buffers what it is given until it uploads.
      data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).reshape(-1).view(np.uint8).data
      for i in range(0, len(data), _WRITE_BYTES):
        f.write(data[i:i + _WRITE_BYTES])
      del arr, data  # before the next tensor is made
      count += 1
    if count != len(specs):
      raise ValueError(f"{path}: {len(specs)} tensors declared, {count} written")


def safetensors_files(model_dir: epath.Path) -> list[epath.Path]:
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


def read_headers(files: Sequence[epath.Path], rename: Callable[[str], str] = lambda n: n) -> dict[str, TensorInfo]:
  """`rename(name)` -> TensorInfo over several files; a name in two files is refused."""
  out: dict[str, TensorInfo] = {}
  for path in files:
    for name, info in read_safetensors_header(path).items():
      key = rename(name)
      if key in out:
        raise ValueError(f"tensor {key!r} appears in both {out[key].file} and {path}")
      out[key] = info
  return out
