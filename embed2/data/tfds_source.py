"""TFDS / ArrayRecord datasets without TensorFlow: the records `embed2.prepare` writes, the TFDS builder
that makes them, and the random-access task sources that read them (and datasets prepared elsewhere).

A task's config picks a prepared dataset instead of a Python builder:

  config.tasks.t2i.source = "tfds:embed2/shapes_caption:1.0.0"   # tfds:NAME[/CONFIG][:VERSION]
  config.tasks.t2i.data_dir = "gs://bucket/tfds"                 # DATA_DIR/NAME/CONFIG/VERSION/

`embed2.prepare` writes every registered task as the TFDS dataset `embed2`, config = the task name, in
ArrayRecord files (random access, `gs://`), splits train / eval. An example is one record:

  query_id, positive_id   int64     the builder's content ids, as they were
  group                   Text
  side_is_list            bool (S,) S = 2 + number of negatives: query, positive, negative 0, ...; True
                                    where that side is a list of items (an interleaved input)
  items                   Sequence  one row per item, in order, sides one after the other:
    side                  int32     which side the item belongs to (index into side_is_list)
    kind                  Text      "str" (a plain str), "text" (segments.Text), "image", "audio",
                                    "video", "video_audio" (the audio track of the video before it)
    text                  Text      the text of "str" / "text" items
    format                Text      how `data` holds the media: "file" (the item's own encoded file:
                                    data= bytes, or the bytes of its path=), "png" (pixels; a video's
                                    frames as one film strip of `frames` frames stacked vertically),
                                    "wav" (float32 samples as a 32-bit float WAV), "npy" (any other
                                    array, numpy's .npy)
    data                  bytes
    rate                  Text      repr of an Audio's sample_rate / a Video's fps ("" if none): the
                                    exact value and type, which the content ids hash
    frames                int32     a film strip's frame count

Array-backed items (the generated tasks) are stored losslessly (each encoding is checked by decoding it
when written, else .npy is used) and read back as the same arrays: `Image(pixels=...)`,
`Audio(samples=..., sample_rate=...)`, `Video(frames=..., fps=..., audio=...)`, equal to the builder's
bit for bit, so ids, tokens and model inputs are the builder's. File-backed items (the real datasets)
come back as `Image(data=...)` / `Audio(data=...)` / `Video(data=...)` holding the file's bytes, which
`embed2.data.media` decodes as it decodes the file.

Every feature is `Text`, `Scalar`, `Tensor` or a `Sequence` of them: TFDS encodes and decodes those
without TensorFlow (`tfds.features.Image` / `Audio` / `Video` do not: see `read_foreign`).

Datasets prepared elsewhere (e.g. TFDS's `coco_captions` built with `--file_format=array_record`) are
read record by record from their tf.train.Example protos (TFDS's own bundled proto, no TensorFlow),
mapped to examples by `config.tasks.NAME.fields`, media decoded by `embed2.data.media`.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import hashlib
import io
import json
import re
import threading
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import soundfile
import tensorflow_datasets as tfds
from array_record.python import array_record_data_source
from etils import epath
from PIL import Image as PILImage
from tensorflow_datasets.core import dataset_info as tfds_dataset_info
from tensorflow_datasets.core import naming as tfds_naming
from tensorflow_datasets.core import splits as tfds_splits
from tensorflow_datasets.proto import tf_example_pb2

from embed2.data import segments

PREFIX = "tfds:"
NAME = "embed2"  # the TFDS dataset embed2.prepare writes; one config per task
VERSION = "1.0.0"
SCHEMA = 1  # the record layout above; in the dataset's metadata.json
EXAMPLE_KEYS = ("query", "positive", "negatives", "query_id", "positive_id", "group")
INFO_FILE = "dataset_info.json"  # TFDS writes it last: a version folder without it is incomplete
_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")
_MASK63 = (1 << 63) - 1


def features() -> tfds.features.FeaturesDict:
  """The TFDS features of one record (the module docstring's table)."""
  f = tfds.features
  return f.FeaturesDict({
      "query_id": f.Scalar(np.int64),
      "positive_id": f.Scalar(np.int64),
      "group": f.Text(),
      "side_is_list": f.Tensor(shape=(None,), dtype=np.bool_),
      "items": f.Sequence({
          "side": f.Scalar(np.int32),
          "kind": f.Text(),
          "text": f.Text(),
          "format": f.Text(),
          "data": f.Tensor(shape=(), dtype=np.object_),
          "rate": f.Text(),
          "frames": f.Scalar(np.int32),
      }),
  })


# ------------------------------------------------------------------------------------ encoding


def _png(a: np.ndarray) -> bytes:
  buf = io.BytesIO()
  PILImage.fromarray(a).save(buf, format="PNG")
  return buf.getvalue()


def _unpng(data: bytes) -> np.ndarray:
  with PILImage.open(io.BytesIO(data)) as im:
    return np.asarray(im)


def _wav(a: np.ndarray, rate: int) -> bytes:
  buf = io.BytesIO()
  soundfile.write(buf, a, int(rate), format="WAV", subtype="FLOAT")
  return buf.getvalue()


def _unwav(data: bytes) -> np.ndarray:
  a, _ = soundfile.read(io.BytesIO(data), dtype="float32")
  return a


def _npy(a: np.ndarray) -> bytes:
  buf = io.BytesIO()
  np.save(buf, a, allow_pickle=False)
  return buf.getvalue()


def _unnpy(data: bytes) -> np.ndarray:
  return np.load(io.BytesIO(data), allow_pickle=False)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
  return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _lossless(a: np.ndarray, encode: Callable[[np.ndarray], bytes],
              decode: Callable[[bytes], np.ndarray], fmt: str) -> tuple[str, bytes]:
  """(fmt, encode(a)) when decoding gives `a` back bit for bit, else ("npy", .npy bytes)."""
  try:
    data = encode(a)
    if _same(decode(data), a):
      return fmt, data
  except (ValueError, TypeError, OSError, RuntimeError):  # a shape / dtype the codec refuses
    pass
  return "npy", _npy(a)


def _rate(value) -> str:
  """repr of an int / float rate (numpy scalars as Python's); "" for None."""
  if value is None:
    return ""
  value = value.item() if isinstance(value, np.generic) else value
  if not isinstance(value, (int, float)) or isinstance(value, bool):
    raise TypeError(f"rate {value!r} is not an int or float")
  return repr(value)


def _unrate(text: str):
  """`_rate`'s inverse: "8000" -> 8000, "2.5" -> 2.5, "" -> None."""
  if not text:
    return None
  try:
    return int(text)
  except ValueError:
    return float(text)


def _row(side: int, kind: str, *, text: str = "", fmt: str = "", data: bytes = b"", rate: str = "",
         frames: int = 0) -> dict[str, Any]:
  return dict(side=side, kind=kind, text=text, format=fmt, data=data, rate=rate, frames=frames)


def _file_bytes(item, where: str) -> bytes:
  if item.data is not None:
    return bytes(item.data)
  path = epath.Path(item.path)
  if not path.exists():
    raise FileNotFoundError(f"{where}: media file {item.path} does not exist; the builder listed it, "
                            "so restore it or prepare with the dataset's files complete")
  return path.read_bytes()


def _item_rows(side: int, item, where: str) -> list[dict[str, Any]]:
  if isinstance(item, str):
    return [_row(side, "str", text=item)]
  if isinstance(item, segments.Text):
    return [_row(side, "text", text=item.text)]
  if isinstance(item, segments.Image):
    if item.pixels is None:
      return [_row(side, "image", fmt="file", data=_file_bytes(item, where))]
    fmt, data = _lossless(np.asarray(item.pixels), _png, _unpng, "png")
    return [_row(side, "image", fmt=fmt, data=data)]
  if isinstance(item, segments.Audio):
    return [_audio_row(side, "audio", item, where)]
  if isinstance(item, segments.Video):
    if item.frames is None:
      row = _row(side, "video", fmt="file", data=_file_bytes(item, where), rate=_rate(item.fps))
    else:
      f = np.asarray(item.frames)
      strip = lambda a: _png(a.reshape(-1, *a.shape[2:]))
      unstrip = lambda d: _unpng(d).reshape(f.shape)
      fmt, data = _lossless(f, strip, unstrip, "png") if f.ndim == 4 else ("npy", _npy(f))
      row = _row(side, "video", fmt=fmt, data=data, rate=_rate(item.fps), frames=len(f))
    rows = [row]
    if item.audio is not None:
      rows.append(_audio_row(side, "video_audio", item.audio, f"{where} audio"))
    return rows
  raise TypeError(f"{where}: item of type {type(item).__name__}; examples hold str, Text, Image, Audio, "
                  "Video or lists of them")


def _audio_row(side: int, kind: str, item: segments.Audio, where: str) -> dict[str, Any]:
  if item.samples is None:
    return _row(side, kind, fmt="file", data=_file_bytes(item, where), rate=_rate(item.sample_rate))
  s = np.asarray(item.samples)
  if s.dtype == np.float32 and s.ndim in (1, 2):
    fmt, data = _lossless(s, lambda a: _wav(a, item.sample_rate), _unwav, "wav")
  else:
    fmt, data = "npy", _npy(s)
  return _row(side, kind, fmt=fmt, data=data, rate=_rate(item.sample_rate))


def encode_example(ex: Mapping[str, Any], where: str) -> dict[str, Any]:
  """An example dict (the builders' {"query", "positive", "negatives", "query_id", "positive_id",
  "group"}) -> the record's feature values (`features()`); media encoded losslessly, files read.

  Raises:
    ValueError: keys other than EXAMPLE_KEYS (the message names them), a negatives field that is not
      a list.
    TypeError: an item of an unknown type.
    FileNotFoundError: an item's path= that does not exist.
  """
  if set(ex) != set(EXAMPLE_KEYS):
    raise ValueError(f"{where} has keys {sorted(ex)}; a prepared example holds exactly "
                     f"{list(EXAMPLE_KEYS)} (add a key to embed2/data/tfds_source.py's schema first)")
  if not isinstance(ex["negatives"], (list, tuple)):
    raise ValueError(f"{where}: negatives is a {type(ex['negatives']).__name__}; give a list of sides")
  sides = [ex["query"], ex["positive"], *ex["negatives"]]
  rows: list[dict[str, Any]] = []
  for s, side in enumerate(sides):
    parts = side if isinstance(side, (list, tuple)) else [side]
    for part in parts:
      rows.extend(_item_rows(s, part, f"{where} side {s}"))
  return {"query_id": int(ex["query_id"]), "positive_id": int(ex["positive_id"]),
          "group": str(ex["group"]),
          "side_is_list": np.array([isinstance(s, (list, tuple)) for s in sides], np.bool_),
          "items": rows}


def _item(kind: str, text: str, fmt: str, data: bytes, rate: str, frames: int):
  if kind == "str":
    return text
  if kind == "text":
    return segments.Text(text=text)
  if fmt == "file":
    cls = {"image": segments.Image, "audio": segments.Audio, "video_audio": segments.Audio,
           "video": segments.Video}[kind]
    extra = {"fps": _unrate(rate)} if kind == "video" and rate else {}
    if kind in ("audio", "video_audio") and rate:
      extra = {"sample_rate": _unrate(rate)}
    return cls(data=data, **extra)
  a = _unnpy(data) if fmt == "npy" else _unwav(data) if fmt == "wav" else _unpng(data)
  if kind == "image":
    return segments.Image(pixels=a)
  if kind in ("audio", "video_audio"):
    return segments.Audio(samples=a, sample_rate=_unrate(rate))
  if kind == "video":
    if fmt == "png":
      a = a.reshape(frames, a.shape[0] // frames, *a.shape[1:])
    return segments.Video(frames=a, fps=_unrate(rate))
  raise ValueError(f"item kind {kind!r} is not one embed2.prepare writes (schema {SCHEMA})")


def _feature_values(ex: tf_example_pb2.Example, key: str) -> list:
  f = ex.features.feature.get(key)
  kind = f.WhichOneof("kind") if f is not None else None
  return list(getattr(f, kind).value) if kind else []


_ITEM_KEYS = ("side", "kind", "text", "format", "data", "rate", "frames")


def parse_record(raw: bytes) -> dict[str, Any]:
  """A serialized record -> the dict `decode_example` takes, read straight from its tf.train.Example
  (TFDS's bundled proto): the same values `tfds.data_source` would decode, ~30x faster (TFDS's generic
  numpy deserializer takes ~0.4 ms a record)."""
  ex = tf_example_pb2.Example.FromString(raw)
  record = {k: _feature_values(ex, k) for k in ("query_id", "positive_id", "group", "side_is_list")}
  record["query_id"], record["positive_id"], record["group"] = (
      record["query_id"][0], record["positive_id"][0], record["group"][0])
  record["items"] = {k: _feature_values(ex, f"items/{k}") for k in _ITEM_KEYS}
  return record


def decode_example(record: Mapping[str, Any]) -> dict[str, Any]:
  """A record as `tfds.data_source` decodes it (numpy / bytes), or as `parse_record` reads it -> the
  example dict `encode_example` was given: the same sides (str, items, lists), arrays, rates, ids and
  group."""
  is_list = [bool(b) for b in np.asarray(record["side_is_list"]).reshape(-1)]
  parts: list[list[Any]] = [[] for _ in is_list]
  rows = record["items"]
  n = len(rows["side"])
  for j in range(n):
    kind = rows["kind"][j].decode()
    it = _item(kind, rows["text"][j].decode("utf-8"), rows["format"][j].decode(), bytes(rows["data"][j]),
               rows["rate"][j].decode(), int(rows["frames"][j]))
    side = parts[int(rows["side"][j])]
    if kind == "video_audio":
      side[-1] = dataclasses.replace(side[-1], audio=it)
    else:
      side.append(it)
  sides = [p if lst else p[0] for p, lst in zip(parts, is_list)]
  return {"query": sides[0], "positive": sides[1], "negatives": sides[2:],
          "query_id": int(record["query_id"]), "positive_id": int(record["positive_id"]),
          "group": record["group"].decode("utf-8")}


# ------------------------------------------------------------------------------------- builder


class Embed2(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """The TFDS builder of a registered task: dataset "embed2", config = the task (or a name given to a
  slice of it), ArrayRecord files, records in the builder's order (no shuffling: index i of a split is
  the builder's example i).

  `python -m embed2.prepare` writes it, shard by shard and resumably, from `_generate_examples`, with
  the builder's `info` (features, config, version, metadata). TFDS's own `download_and_prepare` is not
  used: it writes all splits in one go, and its shuffle buffer needs TensorFlow once a split passes 1 GB.

  Args:
    task: the registered task name (data_pipelines.tasks.TASKS).
    examples: split -> the task's examples (random access).
    splits: the splits to write.
    limit: write the first `limit` examples of each split (0: all).
    identity: what makes this dataset this dataset (task, limit, splits, a fingerprint of the first
      examples), saved in metadata.json; `embed2.prepare` refuses to write over another.
    config: the TFDS config name (default: the task); version: its version.
    data_dir: where DATA_DIR/embed2/CONFIG/VERSION goes.
  """

  VERSION = tfds.core.Version(VERSION)

  def __init__(self, *, task: str, examples: Callable[[str], Sequence[dict]], splits: Sequence[str] = ("train", "eval"),
               limit: int = 0, identity: Mapping[str, Any] | None = None, config: str = "",
               version: str = VERSION, data_dir: str | epath.Path, **kwargs):
    self.task, self._examples, self.splits, self.limit = task, examples, tuple(splits), int(limit)
    self.identity = dict(identity or {"task": task, "limit": self.limit, "splits": list(self.splits)})
    cfg = tfds.core.BuilderConfig(name=config or task, version=version,
                                  description=f"embed2 task {task!r} (data_pipelines.tasks.TASKS)"
                                  + (f", first {self.limit} examples of each split" if self.limit else ""))
    super().__init__(config=cfg, data_dir=str(data_dir), file_format="array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=self.builder_config.description, features=features(),
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(embed2=dict(schema=SCHEMA, **self.identity)))

  def examples(self, split: str) -> Sequence[dict]:
    """The split's examples, cut to `limit`."""
    ex = self._examples(split)
    return ex if not self.limit or len(ex) <= self.limit else _Head(ex, self.limit)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {s: self._generate_examples(s) for s in self.splits}

  def _generate_examples(self, split: str, start: int = 0, stop: int | None = None
                         ) -> Iterator[tuple[int, dict[str, Any]]]:
    """(i, record features) for examples [start, stop) of `split`, in order."""
    ex = self.examples(split)
    for i in range(start, len(ex) if stop is None else stop):
      yield i, encode_example(ex[i], f"task {self.task!r} {split} example {i}")


class _Head(collections.abc.Sequence):
  """The first n elements of a random-access sequence."""

  def __init__(self, seq: Sequence, n: int):
    self.seq, self.n = seq, n

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(self.n))]
    if not -self.n <= i < self.n:
      raise IndexError(f"index {i} out of range for {self.n} examples")
    return self.seq[i % self.n]


# ------------------------------------------------------------------------------------- locating


@dataclasses.dataclass(frozen=True)
class DatasetRef:
  """A parsed `tfds:NAME[/CONFIG][:VERSION]` source."""
  name: str
  config: str = ""
  version: str = ""

  @classmethod
  def parse(cls, source: str, where: str) -> DatasetRef:
    spec = source[len(PREFIX):] if source.startswith(PREFIX) else source
    rest, _, version = spec.partition(":")
    name, _, config = rest.partition("/")
    if not name or "/" in config or (version and not _VERSION_RE.match(version)):
      raise ValueError(f"{where}.source={source!r} is not tfds:NAME[/CONFIG][:VERSION] (e.g. "
                       f"'tfds:{NAME}/shapes_caption:{VERSION}'; VERSION is X.Y.Z)")
    return cls(name, config, version)

  def __str__(self) -> str:
    return (f"{PREFIX}{self.name}" + (f"/{self.config}" if self.config else "")
            + (f":{self.version}" if self.version else ""))


def is_tfds(source: str) -> bool:
  """Whether a task's `source` names a TFDS dataset (else: a registered builder)."""
  return isinstance(source, str) and source.startswith(PREFIX)


def _prepare_command(ref: DatasetRef, data_dir: str, version: str = "", splits: Sequence[str] = ()) -> str:
  """The `python -m embed2.prepare` command that writes `ref` (a dataset of embed2's)."""
  v = version or ref.version
  return (f"python -m embed2.prepare --task={ref.config or 'TASK'} --data_dir={data_dir}"
          + (f" --version={v}" if v and v != VERSION else "") + (f" --splits={','.join(splits)}" if splits else ""))


def _prepare_hint(ref: DatasetRef, data_dir: str, version: str = "") -> str:
  if ref.name != NAME:
    return (f"build it with TFDS into that folder (`tfds build {ref.name} --data_dir={data_dir} "
            "--file_format=array_record`, where TensorFlow is installed), or fix the source / data_dir")
  return f"prepare it: {_prepare_command(ref, data_dir, version)} (or fix the source / data_dir)"


def _version_key(v: str) -> tuple[int, ...]:
  return tuple(int(x) for x in v.split("."))


def locate(ref: DatasetRef, data_dir: str, where: str) -> epath.Path:
  """The complete version folder DATA_DIR/NAME[/CONFIG]/VERSION of `ref` (the newest complete one when
  ref has no version).

  Raises:
    FileNotFoundError: data_dir or the dataset's folder does not exist.
    ValueError: the version asked for is not there, or not complete (a prepare was interrupted); the
      message names `where` (the task), the versions found and the fix.
  """
  if not data_dir:
    raise ValueError(f"{where}.source={str(ref)!r} needs {where}.data_dir: the folder the dataset was "
                     "prepared into (a local path or gs://)")
  root = epath.Path(data_dir)
  base = root / ref.name / ref.config if ref.config else root / ref.name
  if not root.exists():
    raise FileNotFoundError(f"{where}: data_dir {data_dir} does not exist; {_prepare_hint(ref, data_dir)}")
  if not base.exists():
    raise FileNotFoundError(f"{where}: {ref} is not in {data_dir} (no folder {base}); "
                            f"{_prepare_hint(ref, data_dir)}")
  versions = sorted((d.name for d in base.iterdir() if _VERSION_RE.match(d.name)), key=_version_key)
  complete = [v for v in versions if (base / v / INFO_FILE).exists()]
  if ref.version and ref.version not in versions:
    raise ValueError(f"{where}: {ref} has no version {ref.version} in {base}; versions there: "
                     f"{complete or 'none complete'}. Set {where}.source to one of them, or "
                     f"{_prepare_hint(ref, data_dir)}")
  want = ref.version or (complete[-1] if complete else "")
  if not want or want not in complete:
    v = ref.version or (versions[-1] if versions else "")
    raise ValueError(f"{where}: {ref} in {base} is incomplete (version {v or '?'} has no {INFO_FILE}: "
                     f"its preparation was interrupted); rerun the same prepare command to finish it; "
                     f"{_prepare_hint(ref, data_dir, v)}")
  return base / want


def read_info(path: epath.Path) -> dict[str, Any]:
  """dataset_info.json of a version folder, as JSON."""
  return json.loads((path / INFO_FILE).read_text())


def split_names(info: Mapping[str, Any]) -> list[str]:
  return [s["name"] for s in info.get("splits", [])]


def _check_split(ref: DatasetRef, path: epath.Path, info: Mapping[str, Any], split: str, where: str,
                 data_dir: str) -> None:
  names = split_names(info)
  if split not in names:
    fix = (f"prepare it again with that split, after deleting {path} (or with another --version): "
           f"{_prepare_command(ref, data_dir, path.name, names + [split])}" if ref.name == NAME else
           "build that split with TFDS")
    raise ValueError(f"{where}: {ref} at {path} has splits {names}, no {split!r} split; {fix}")
  fmt = info.get("fileFormat", "tfrecord")
  if fmt != "array_record":
    raise ValueError(f"{where}: {ref} at {path} is stored as {fmt}, which TFDS reads only with "
                     "TensorFlow; rebuild it with --file_format=array_record (random access)")


def _embed2_meta(path: epath.Path) -> dict[str, Any] | None:
  meta = path / "metadata.json"
  if not meta.exists():
    return None
  return json.loads(meta.read_text()).get("embed2")


# -------------------------------------------------------------------------------------- reading


class _Records(collections.abc.Sequence):
  """A split's examples by index over records opened on first use: `len`, `[i]` (negative i and slices
  too). Safe to share between threads (ArrayRecord's readers are; the records are opened once, under a
  lock) and picklable (the open records are not pickled; a worker process reopens the files).

  Subclasses set `ref`, `split`, `_len` and define `_open()` (the records, random access) and
  `_example(record, i)`.
  """

  ref: DatasetRef
  split: str
  _len: int

  def _records(self):
    if self.__dict__.get("_source") is None:
      with self._lock:
        if self.__dict__.get("_source") is None:
          self._source = self._open()
    return self._source

  @property
  def _lock(self) -> threading.Lock:
    lock = self.__dict__.get("_lock_")
    if lock is None:  # created once per object (and per unpickled copy), before any thread reads
      lock = self.__dict__.setdefault("_lock_", threading.Lock())
    return lock

  def _open(self):
    raise NotImplementedError

  def _example(self, record, i: int) -> dict[str, Any]:
    raise NotImplementedError

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(self._len))]
    i = int(i)
    if not -self._len <= i < self._len:
      raise IndexError(f"{self.ref} {self.split}: index {i} out of range for {self._len} examples")
    i %= self._len
    return self._example(self._records()[i], i)

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k not in ("_source", "_lock_")}


class PreparedExamples(_Records):
  """The examples of one split of a dataset `embed2.prepare` wrote, read with `tfds.data_source`;
  example i is the builder's example i."""

  def __init__(self, *, ref: DatasetRef, data_dir: str, path: epath.Path, split: str, length: int):
    self.ref, self.data_dir, self.path, self.split, self._len = ref, data_dir, path, split, length

  def _open(self):
    v = self.path.name
    name = f"{self.ref.name}/{self.path.parent.name}:{v}" if self.ref.config else f"{self.ref.name}:{v}"
    return tfds.data_source(name, data_dir=self.data_dir, split=self.split,
                            deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)

  def _example(self, record, i: int) -> dict[str, Any]:
    return decode_example(parse_record(record))

  def __repr__(self) -> str:
    return f"PreparedExamples({str(self.ref)!r}, split={self.split!r}, examples={self._len}, path={str(self.path)!r})"


def load(source: str, split: str, *, data_dir: str, where: str,
         fields: Mapping[str, Any] | None = None) -> collections.abc.Sequence:
  """The examples of `split` of the TFDS dataset `source` ("tfds:NAME[/CONFIG][:VERSION]") in
  `data_dir`: a dataset `embed2.prepare` wrote (PreparedExamples), or one prepared elsewhere, read with
  `fields` (ForeignExamples).

  Args:
    where: the config path of the task ("config.tasks.t2i"), named by every error.

  Raises:
    FileNotFoundError / ValueError: no such folder, version or split, an incomplete dataset, or a
      foreign dataset without `fields`; each message names `where` and the fix.
  """
  ref = DatasetRef.parse(source, where)
  path = locate(ref, data_dir, where)
  info = read_info(path)
  _check_split(ref, path, info, split, where, data_dir)
  meta = _embed2_meta(path)
  if meta is not None:
    if meta.get("schema") != SCHEMA:
      raise ValueError(f"{where}: {ref} at {path} has record schema {meta.get('schema')}, this embed2 "
                       f"reads schema {SCHEMA}; prepare it again with this version of embed2.prepare")
    if fields:
      raise ValueError(f"{where}.fields is for datasets prepared elsewhere; {ref} was written by "
                       "embed2.prepare, whose records are examples already: drop fields")
    length = sum(int(n) for s in info["splits"] if s["name"] == split for n in s.get("shardLengths", []))
    return PreparedExamples(ref=ref, data_dir=data_dir, path=path, split=split, length=length)
  return ForeignExamples(ref=ref, path=path, split=split, fields=fields, where=where)


# ---------------------------------------------------------------------- datasets prepared elsewhere

# What a TFDS feature class stores in a tf.train.Example, as embed2 reads it without TensorFlow.
_TEXT, _IMAGE, _AUDIO, _VIDEO, _TENSOR = "Text", "Image", "Audio", "Video", "Tensor"
_SIDE_FIELDS = ("query", "positive")
_FIELD_KEYS = _SIDE_FIELDS + ("group", "query_id", "positive_id", "fps")


def feature_kinds(features_json: Mapping[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
  """features.json -> {flat key as in the tf.train.Example ("captions/text"): (class name, its JSON
  content)} for every leaf feature (FeaturesDict / Sequence unnested)."""
  out: dict[str, tuple[str, dict[str, Any]]] = {}

  def walk(node: Mapping[str, Any], prefix: str):
    if "featuresDict" in node:
      for k, v in node["featuresDict"].get("features", {}).items():
        walk(v, f"{prefix}/{k}" if prefix else k)
    elif "sequence" in node:
      walk(node["sequence"]["feature"], prefix)
    else:
      cls = node.get("pythonClassName", "").rsplit(".", 1)[-1]
      content = next((v for k, v in node.items() if k not in ("pythonClassName", "description")), {})
      out[prefix] = (cls, content if isinstance(content, dict) else {})

  walk(features_json, "")
  return out


def _first(values: Sequence[Any], key: str, where: str):
  if not len(values):
    raise segments.MediaError(f"{where}: feature {key!r} is empty in this record")
  return values[0]


class ForeignExamples(_Records):
  """The examples of one split of a TFDS ArrayRecord dataset prepared elsewhere (e.g. with TensorFlow),
  read without TensorFlow: each record is parsed as the tf.train.Example TFDS wrote (TFDS's bundled
  proto) and mapped to an example by `fields`, e.g. for coco_captions

    fields = {"query": "captions/text", "positive": "image"}

  `query` / `positive` name a flat feature key (features.json); optional `group`, `query_id`,
  `positive_id` (int features; default: content ids, a 63-bit blake2b of the text / encoded bytes) and
  `fps` (a number, for Video features, which do not store it). What a key's feature becomes:

    Text                      str (a Sequence of texts: the record's first, e.g. COCO's first caption)
    Image                     Image(data=encoded bytes), decoded by embed2.data.media (PIL)
    Audio, lazy_decode=True   Audio(data=encoded file bytes)
    Audio (the default)       Audio(samples=int16 PCM, sample_rate=the feature's sample_rate)
    Video                     Video(frames=the decoded frames, fps=fields["fps"])

  Random access, thread-safe and picklable (`_Records`).
  """

  def __init__(self, *, ref: DatasetRef, path: epath.Path, split: str, fields: Mapping[str, Any] | None,
               where: str):
    self.ref, self.path, self.split, self.where = ref, path, split, where
    kinds = feature_kinds(json.loads((path / "features.json").read_text()))
    listing = ", ".join(f"{k} ({c})" for k, (c, _) in sorted(kinds.items()))
    example = "{'query': 'captions/text', 'positive': 'image'}"
    if not fields or any(k not in fields for k in _SIDE_FIELDS):
      raise ValueError(f"{where}: {ref} was not written by embed2.prepare, so {where}.fields must say "
                       f"which features are the query and the positive, e.g. fields={example}; its "
                       f"features: {listing}")
    unknown = sorted(set(fields) - set(_FIELD_KEYS))
    if unknown:
      raise ValueError(f"{where}.fields has unknown keys {unknown}; known: {list(_FIELD_KEYS)}")
    self.fields = dict(fields)
    self.kinds = {}
    for role in _FIELD_KEYS[:-1]:
      key = self.fields.get(role)
      if key is None:
        continue
      if key not in kinds:
        raise ValueError(f"{where}.fields[{role!r}]={key!r} is not a feature of {ref}; its features: {listing}")
      cls = kinds[key][0]
      ok = (_TEXT, _IMAGE, _AUDIO, _VIDEO) if role in _SIDE_FIELDS else (_TEXT, _TENSOR, "Scalar", "ClassLabel")
      if cls not in ok:
        raise ValueError(f"{where}.fields[{role!r}]={key!r} is a {cls}; embed2 reads {', '.join(ok)} there")
      if cls == _VIDEO and not self.fields.get("fps"):
        raise ValueError(f"{where}.fields[{role!r}]={key!r} is a Video, whose frame rate TFDS does not "
                         f"store; give {where}.fields['fps'] (frames per second)")
      self.kinds[role] = kinds[key]
    proto = tfds_dataset_info.read_from_json(path / INFO_FILE)
    template = tfds_naming.ShardedFileTemplate(data_dir=path, dataset_name=proto.name,
                                               filetype_suffix="array_record")
    split_info = tfds_splits.SplitDict.from_proto(proto.splits, filename_template=template)[split]
    self._instructions = split_info.file_instructions
    self._len = int(split_info.num_examples)

  def _open(self):
    return array_record_data_source.ArrayRecordDataSource(self._instructions)

  def _values(self, ex, role: str):
    return _feature_values(ex, self.fields[role])

  def _side(self, ex, role: str, where: str):
    cls, content = self.kinds[role]
    key = self.fields[role]
    values = self._values(ex, role)
    if cls == _TEXT:
      return _first(values, key, where).decode("utf-8")
    if cls == _IMAGE:
      return segments.Image(data=_first(values, key, where))
    if cls == _AUDIO:
      if content.get("lazyDecode"):
        return segments.Audio(data=_first(values, key, where))
      samples = np.asarray(values, np.int64)
      if samples.size and (samples.min() < -32768 or samples.max() > 32767):
        raise segments.MediaError(f"{where}: audio feature {key!r} holds samples outside 16-bit PCM")
      return segments.Audio(samples=samples.astype(np.int16), sample_rate=int(content.get("sampleRate") or 0))
    frames = np.stack([_unpng(v) for v in values]) if values else np.zeros((0, 1, 1, 3), np.uint8)
    return segments.Video(frames=frames, fps=float(self.fields["fps"]))

  def _example(self, record, i: int) -> dict[str, Any]:
    ex = tf_example_pb2.Example.FromString(record)
    where = f"{self.where} ({self.ref} {self.split} record {i})"
    sides = {r: self._side(ex, r, where) for r in _SIDE_FIELDS}
    ids = {}
    for role, side in (("query_id", "query"), ("positive_id", "positive")):
      ids[role] = (int(_first(self._values(ex, role), self.fields[role], where)) if role in self.kinds
                   else content_id(sides[side]))
    group = ""
    if "group" in self.kinds:
      g = _first(self._values(ex, "group"), self.fields["group"], where)
      group = g.decode("utf-8") if isinstance(g, bytes) else str(g)
    return {"query": sides["query"], "positive": sides["positive"], "negatives": [], **ids, "group": group}

  def __repr__(self) -> str:
    return f"ForeignExamples({str(self.ref)!r}, split={self.split!r}, examples={self._len}, fields={self.fields})"


def content_id(side) -> int:
  """63-bit blake2b of a foreign side's content (text as UTF-8, media as their encoded bytes or
  arrays): equal content, equal id, in every process."""
  h = hashlib.blake2b(digest_size=8, person=b"embed2.tfds")
  if isinstance(side, str):
    h.update(b"s" + side.encode("utf-8"))
  elif getattr(side, "data", None) is not None:
    h.update(type(side).__name__.encode() + side.data)
  else:
    a = np.ascontiguousarray(side.samples if isinstance(side, segments.Audio) else side.frames)
    h.update(f"{type(side).__name__}{a.shape}{a.dtype.str}".encode() + a.tobytes())
  return int.from_bytes(h.digest(), "little") & _MASK63
