"""Task builders for real image / video / audio caption datasets that the user has on disk.

Nothing here downloads. Each builder reads a dataset's annotation files in their published format
(or the generic JSONL manifest below) and returns a `MediaCaptions`: a random-access sequence of
example dicts, one per (caption, media file),

  {"query": caption (str), "positive": Image(path=...) | Video(path=...) | Audio(path=...),
   "negatives": [], "query_id": int, "positive_id": int, "group": str (the media file's key)}

which `grain.MapDataset.source(...)` and `embed2.data.pipeline.TaskSpec(examples=...)` take as is.
Builders only read annotations and check that the media files exist; decoding happens later in
the input pipeline (`embed2.data.media`). Retrieval the other way (media -> caption) is the same
examples with the roles swapped, which `embed2.eval` does.

Ids are content ids for the NCE duplicate mask and for merging in `metrics.retrieval_problem`:
`text_id(caption)` (63-bit blake2b of the whitespace-normalised text; equal captions, equal ids)
and `media_id(path)` (63-bit blake2b of the absolute file path; every caption of one file has the
same positive_id). Neither uses Python's salted `hash`, so ids agree across processes and hosts.

Datasets (`DATASETS`, each `fn(split, *, root=None, ...)`; root defaults to
`$EMBED2_DATA_DIR/<dir>`, or `~/embed2_data/<dir>` when the variable is unset). `split` is "train"
or "eval" (mapped per dataset as below) or a dataset-native split name. With `layout="auto"` the
generic manifest wins when present, then the layouts in the order listed.

  coco_captions  <dir> = mscoco (the folder of the `mscoco` eval suite).
                 karpathy: <root>/dataset_coco.json (Karpathy split), images in
                   <root>/<filepath>/<filename> (train2014/, val2014/). train = train + restval,
                   eval = test (5k), val, test, restval.
                 official: <root>/annotations/captions_<s>.json, images in <root>/<s>/;
                   train = train2017, eval = val2017, or a year split such as "val2014".
                 Karpathy wins over official: Karpathy's test images are in train2017, so mixing
                   the two layouts across splits would leak eval images into training.
  flickr30k      <dir> = flickr30k. karpathy: <root>/dataset_flickr30k.json, images in
                   <root>/flickr30k-images/ or <root>/images/. train, eval = test (1k), val.
  msrvtt         <dir> = msrvtt. official: <root>/videodatainfo.json or <root>/MSRVTT_data.json
                   (all splits), or <root>/train_val_videodatainfo.json (train, val) and
                   <root>/test_videodatainfo.json (test), with
                   {"videos": [{"video_id", "split"}], "sentences": [{"video_id", "caption"}]};
                   train = "train", eval = "test" (2,990 videos), val = "validate".
                 jsfusion: split "test1k", the 1k-A test set <root>/MSRVTT_JSFUSION_test.csv
                   (key, vid_key, video_id, sentence).
                 Videos: <root>/{videos, videos/all, TrainValVideo, TestVideo}/<video_id>.<ext>.
  vatex          <dir> = vatex. official: <root>/vatex_training_v1.0.json (train),
                   vatex_validation_v1.0.json (eval, val), vatex_public_test_english_v1.1.json
                   (test): [{"videoID", "enCap": [...]}]; videos <root>/videos/<videoID>.<ext>.
  audiocaps      <dir> = audiocaps. official: <root>/<s>.csv or <root>/dataset/<s>.csv
                   (audiocap_id, youtube_id, start_time, caption); s = train, val, test
                   (eval = test). Audio in <root>/audio/<s>/ or <root>/<s>/, named (first found
                   wins, per clip) <youtube_id>_<start_time>.<ext>, Y<youtube_id>_<start_time>.<ext>
                   or <audiocap_id>.<ext> for any of the clip's rows; ext wav or flac. Rows of one
                   clip (youtube_id, start_time) share one file, so its captions share a
                   positive_id.
  clotho         <dir> = clotho. official: <root>/clotho_captions_<d>.csv (file_name,
                   caption_1..caption_5), audio in <root>/<d>/ or <root>/audio/<d>/;
                   d = development (train), evaluation (eval), validation (val).

  Generic manifest (every dataset): <root>/<split>.jsonl (for "eval" also <root>/test.jsonl, the
  eval suites' file), one media file per line: {"image" | "video" | "audio": path,
  "captions": [...]}, paths relative to the manifest's folder or absolute.

Video and audio files named <stem>.<ext> are found with any of the extensions VIDEO_EXTS /
AUDIO_EXTS (downloaders keep the source container).

Missing media files: rows whose file is absent are skipped and counted (`.skipped`, logged); more
than `max_missing_fraction` (default 0.01) of the split's examples missing, or all of them, raises
FileNotFoundError with the count and the first missing path. In training, `embed2.main` passes
`config.max_skipped_fraction` here: one limit governs the records skipped for any cause. `check_files=False` keeps every row
unchecked (for a filesystem where listing is slow; the pipeline then skips undecodable records
itself) and assumes the first naming listed above for each file.

Usage:
  from data_pipelines import media_datasets
  train = media_datasets.DATASETS["coco_captions"]("train", root="/data/mscoco")
  train[0]   # {"query": "A man riding a wave ...", "positive": Image(path=...), ...}
  train.skipped, train.source
"""
from __future__ import annotations

import collections
import collections.abc
import csv
import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Any, Callable, Iterable, NamedTuple, Sequence

from absl import logging
import numpy as np

from embed2.data.segments import Audio, Image, Video
from embed2.data.tokenizer import check_text

DATA_DIR_ENV = "EMBED2_DATA_DIR"  # the same variable embed2.eval.suites reads
_DEFAULT_DATA_DIR = "~/embed2_data"
_MASK63 = (1 << 63) - 1
VIDEO_EXTS = (".mp4", ".webm", ".mkv", ".avi")
AUDIO_EXTS = (".wav", ".flac")


# ------------------------------------------------------------------------------------------- ids


def normalize_caption(text: str) -> str:
  """Whitespace collapsed and stripped: annotation files carry trailing spaces and newlines."""
  return " ".join(text.split())


def text_id(text: str) -> int:
  """Stable 63-bit content id of a text (blake2b, not Python's salted `hash`)."""
  digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
  return int.from_bytes(digest, "little") & _MASK63


def media_id(path: str | os.PathLike) -> int:
  """Stable 63-bit content id of a media file, from its absolute path (own hash domain, so a path
  and a caption with the same characters get different ids)."""
  key = os.path.abspath(os.fspath(path)).encode("utf-8", "surrogateescape")
  digest = hashlib.blake2b(key, digest_size=8, person=b"embed2.media").digest()
  return int.from_bytes(digest, "little") & _MASK63


# --------------------------------------------------------------------------------------- source


class MediaCaptions(collections.abc.Sequence):
  """The examples of one dataset split, stored by column (COCO train has ~590k captions).

  Item i is a fresh dict {"query", "positive", "negatives", "query_id", "positive_id", "group"}
  (see the module docstring). Picklable, so grain worker processes can hold it.

  Attributes:
    name: "<dataset>/<split>".
    source: the annotation file read (str).
    skipped: examples dropped because their media file is missing.
    num_media: distinct media files among the examples.
  """

  def __init__(self, *, name: str, kind: type, source: str, skipped: int, captions: list[str],
               caption_ids: np.ndarray, example_media: np.ndarray, media_paths: list[str],
               media_ids: np.ndarray, media_groups: list[str]):
    self.name = name
    self.kind = kind
    self.source = source
    self.skipped = skipped
    self._captions = captions            # (N,) str
    self._caption_ids = caption_ids      # int64 (N,)
    self._example_media = example_media  # int32 (N,) index into the media columns
    self._media_paths = media_paths      # (M,) absolute paths
    self._media_ids = media_ids          # int64 (M,)
    self._media_groups = media_groups    # (M,) keys, e.g. "val2014/COCO_val2014_000000391895.jpg"

  @property
  def num_media(self) -> int:
    return len(self._media_paths)

  def __len__(self) -> int:
    return len(self._captions)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    n = len(self)
    i = int(index)  # numpy integers from samplers
    if i < 0:
      i += n
    if not 0 <= i < n:
      raise IndexError(f"{self.name} example index {index} out of range (size {n})")
    m = int(self._example_media[i])
    return {"query": self._captions[i], "positive": self.kind(path=self._media_paths[m]),
            "negatives": [], "query_id": int(self._caption_ids[i]),
            "positive_id": int(self._media_ids[m]), "group": self._media_groups[m]}

  def __repr__(self) -> str:
    return (f"MediaCaptions(name={self.name!r}, examples={len(self)}, media={self.num_media}, "
            f"skipped={self.skipped}, source={self.source!r})")


class _Record(NamedTuple):
  """One media file and its captions, as an annotation file describes it."""
  candidates: tuple[str, ...]  # where the file may be; the first that exists is used
  group: str
  captions: tuple[str, ...]


class _Exists:
  """File existence by directory listing: one `listdir` per folder, not one `stat` per file."""

  def __init__(self):
    self._listed: dict[str, frozenset[str]] = {}

  def __call__(self, path: str) -> bool:
    folder, name = os.path.split(path)
    names = self._listed.get(folder)
    if names is None:
      try:
        names = frozenset(os.listdir(folder))
      except OSError:  # missing folder or not a folder
        names = frozenset()
      self._listed[folder] = names
    return name in names


def _collect(name: str, kind: type, source: pathlib.Path, records: Iterable[_Record], *,
             check_files: bool, max_missing_fraction: float) -> MediaCaptions:
  """Annotation records -> MediaCaptions; checks media files and the missing fraction."""
  exists = _Exists()
  captions: list[str] = []
  example_media: list[int] = []
  media_paths: list[str] = []
  media_groups: list[str] = []
  media_index: dict[str, int] = {}
  total = skipped = missing_media = empty = 0
  first_missing = None
  for rec in records:
    texts = []
    for c in rec.captions:
      if not isinstance(c, str):
        raise ValueError(f"{name}: {source} gives {rec.group} the caption {c!r:.80}, which is "
                         "not a string; is this the dataset's caption annotation?")
      check_text(c, f"{name}: {source}, the caption of {rec.group}")  # a JSON \ud800 escape
      c = normalize_caption(c)
      if c:
        texts.append(c)
      else:
        empty += 1
    if not texts:
      continue
    total += len(texts)
    path = rec.candidates[0]
    if check_files:
      path = next((p for p in rec.candidates if exists(p)), None)
      if path is None:
        skipped += len(texts)
        missing_media += 1
        first_missing = first_missing or rec.candidates[0]
        continue
    m = media_index.get(path)
    if m is None:
      m = media_index[path] = len(media_paths)
      media_paths.append(path)
      media_groups.append(rec.group)
    captions.extend(texts)
    example_media.extend([m] * len(texts))

  if empty:
    logging.warning("%s: %d empty captions in %s left out", name, empty, source)
  if total == 0:
    raise ValueError(f"{name}: {source} holds no captions for this split; check the split name and "
                     "that the file is the dataset's caption annotation")
  if skipped:
    logging.warning("%s: %d of %d examples skipped: %d media files missing (first: %s)", name,
                    skipped, total, missing_media, first_missing)
    if skipped > max_missing_fraction * total or skipped == total:
      raise FileNotFoundError(
          f"{name}: {skipped} of {total} examples ({skipped / total:.1%}) have no media file on "
          f"disk ({missing_media} files missing, first: {first_missing}); at most "
          f"max_missing_fraction={max_missing_fraction} may be missing, and not all. Put the files "
          f"where {source} expects them (see data_pipelines/media_datasets.py for the layout) or "
          "raise max_missing_fraction (in a training config: config.max_skipped_fraction, the one "
          "limit on skipped records, missing or undecodable).")
  logging.info("%s: %d examples, %d media files from %s", name, len(captions), len(media_paths),
               source)
  return MediaCaptions(
      name=name, kind=kind, source=str(source), skipped=skipped, captions=captions,
      caption_ids=np.array([text_id(c) for c in captions], np.int64),
      example_media=np.array(example_media, np.int32), media_paths=media_paths,
      media_ids=np.array([media_id(p) for p in media_paths], np.int64), media_groups=media_groups)


# ------------------------------------------------------------------------------------ file reading


def _load_json(path: pathlib.Path) -> Any:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e})") from None


def _field(row: Any, key: str, where: str) -> Any:
  if not isinstance(row, dict) or key not in row:
    got = sorted(row) if isinstance(row, dict) else type(row).__name__
    raise ValueError(f"{where} needs the field {key!r}; got {got}. Is this the right annotation "
                     "file?")
  return row[key]


def _captions_of(value: Any, where: str) -> tuple[str, ...]:
  if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(
      isinstance(c, str) for c in value):
    raise ValueError(f"{where} must be a list of caption strings; got {value!r:.80}")
  for k, c in enumerate(value):
    check_text(c, f"{where}[{k}]")
  return tuple(value)


def _read_csv(path: pathlib.Path, columns: Sequence[str]) -> list[dict[str, str]]:
  """Rows of a CSV with a header naming at least `columns` (a UTF-8 BOM is accepted)."""
  with open(path, encoding="utf-8-sig", newline="") as f:
    reader = csv.DictReader(f)
    missing = [c for c in columns if c not in (reader.fieldnames or ())]
    if missing:
      raise ValueError(f"{path} needs the columns {list(columns)} in its header line; missing "
                       f"{missing}, got {reader.fieldnames}")
    return list(reader)


def _under(root: pathlib.Path, folders: Sequence[str], stems: Sequence[str],
           exts: Sequence[str]) -> tuple[str, ...]:
  """Candidate paths root/folder/stem+ext, in priority order (folder, then stem, then ext)."""
  return tuple(str(root / d / f"{s}{e}") for d in folders for s in stems for e in exts)


def _manifest(path: pathlib.Path, key: str) -> list[_Record]:
  """`<split>.jsonl` of {key: path, "captions": [...]} (the eval suites' layout)."""
  records = []
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{line_no}"
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not valid JSON ({e})") from None
      rel = _field(row, key, where)
      if not isinstance(rel, str) or not rel:
        raise ValueError(f"{where}: {key!r} must be a file path string; got {rel!r}")
      check_text(rel, f"{where} {key!r}")
      file = pathlib.Path(rel)
      full = file if file.is_absolute() else path.parent / file
      records.append(_Record((os.path.normpath(full),), rel,
                             _captions_of(_field(row, "captions", where), f"{where} 'captions'")))
  return records


# ------------------------------------------------------------------------------------- layouts


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Layout:
  """One on-disk format of a dataset.

  Attributes:
    name: what `layout=` selects it by.
    files: (root, split) -> annotation files to try in order; () when the split does not exist in
      this layout.
    read: (root, annotation file, split) -> records.
    describe: the layout in words, for the error when nothing is found.
  """
  name: str
  files: Callable[[pathlib.Path, str], tuple[pathlib.Path, ...]]
  read: Callable[[pathlib.Path, pathlib.Path, str], list[_Record]]
  describe: str


def _manifest_layout(key: str) -> _Layout:
  def files(root, split):
    return (root / f"{split}.jsonl",) + ((root / "test.jsonl",) if split == "eval" else ())
  return _Layout(name="manifest", files=files, read=lambda root, path, split: _manifest(path, key),
                 describe=f'<root>/<split>.jsonl of {{"{key}": path, "captions": [...]}}')


def _build(dataset: str, dirname: str, kind: type, layouts: Sequence[_Layout], splits: str,
           split: str, *, root: str | os.PathLike | None, layout: str, check_files: bool,
           max_missing_fraction: float) -> MediaCaptions:
  """Finds the split's annotation file in the first matching layout and reads it."""
  if not 0.0 <= max_missing_fraction <= 1.0:
    raise ValueError(f"max_missing_fraction={max_missing_fraction} must be in [0, 1]")
  names = [lay.name for lay in layouts]
  if layout != "auto" and layout not in names:
    raise ValueError(f"{dataset}: layout={layout!r} is unknown; choose 'auto' or one of {names}")
  if root is None:
    data_dir = os.environ.get(DATA_DIR_ENV) or _DEFAULT_DATA_DIR
    root_dir = pathlib.Path(data_dir).expanduser() / dirname
  else:
    root_dir = pathlib.Path(root).expanduser()
  # Absolute, so the examples' paths still resolve from another working directory (grain workers).
  root_dir = pathlib.Path(os.path.abspath(root_dir))
  tried: list[str] = []
  applicable = False
  for lay in layouts:
    if layout not in ("auto", lay.name):
      continue
    candidates = lay.files(root_dir, split)
    # The manifest layout takes any split name; only the dataset's own layouts define the splits.
    applicable |= bool(candidates) and lay.name != "manifest"
    for path in candidates:
      if path.is_file():
        return _collect(f"{dataset}/{split}", kind, path, lay.read(root_dir, path, split),
                        check_files=check_files, max_missing_fraction=max_missing_fraction)
    if candidates:
      tried.append(f"  {lay.name}: {' or '.join(str(p) for p in candidates)}  ({lay.describe})")
  if not applicable and layout != "manifest":
    in_layout = f" in layout={layout!r}" if layout != "auto" else ""
    raise ValueError(f"{dataset}: split={split!r} is unknown{in_layout}; choose {splits} (or any "
                     "name with a <root>/<split>.jsonl manifest)")
  env = os.environ.get(DATA_DIR_ENV)
  env_now = f"now {env}" if env else f"unset, so {_DEFAULT_DATA_DIR}"
  raise FileNotFoundError(
      f"{dataset}: no annotations for split {split!r} under {root_dir}; expected one of\n"
      + "\n".join(tried)
      + f"\nPut the data there, pass root=<folder>, or set ${DATA_DIR_ENV} (root = "
      f"${DATA_DIR_ENV}/{dirname}; {env_now}). "
      "Layouts: data_pipelines/media_datasets.py.")


# --------------------------------------------------------------------------- images: COCO, Flickr

_KARPATHY_SPLITS = {"train": ("train", "restval"), "eval": ("test",), "test": ("test",),
                    "val": ("val",), "restval": ("restval",)}


def _karpathy(image_dirs: Sequence[str]
              ) -> Callable[[pathlib.Path, pathlib.Path, str], list[_Record]]:
  """Reader of a Karpathy-split JSON
  {"images": [{"filepath"?, "filename", "split", "sentences": [{"raw"}]}]}; images without a
  filepath are looked for in `image_dirs`."""

  def read(root: pathlib.Path, path: pathlib.Path, split: str) -> list[_Record]:
    wanted = _KARPATHY_SPLITS[split]
    records = []
    for i, im in enumerate(_field(_load_json(path), "images", str(path))):
      where = f"{path} images[{i}]"
      if _field(im, "split", where) not in wanted:
        continue
      filename = _field(im, "filename", where)
      folders = [im["filepath"]] if im.get("filepath") else list(image_dirs)
      sentences = _field(im, "sentences", where)
      caps = tuple(_field(s, "raw", f"{where} sentences") for s in sentences)
      group = f"{im['filepath']}/{filename}" if im.get("filepath") else filename
      records.append(_Record(_under(root, folders, [filename], [""]), group, caps))
    return records

  return read


def _coco_native(split: str) -> str | None:
  if split in ("train", "eval"):
    return {"train": "train2017", "eval": "val2017"}[split]
  if split.startswith(("train20", "val20")) and split[-4:].isdigit():
    return split
  return None


def _coco_official(root: pathlib.Path, path: pathlib.Path, split: str) -> list[_Record]:
  """annotations/captions_<native>.json {"images": [{"id", "file_name"}],
  "annotations": [{"image_id", "caption"}]}; images in <root>/<native>/."""
  native = _coco_native(split)
  data = _load_json(path)
  file_of = {}
  for i, im in enumerate(_field(data, "images", str(path))):
    where = f"{path} images[{i}]"
    file_of[_field(im, "id", where)] = _field(im, "file_name", where)
  caps: dict[Any, list[str]] = collections.defaultdict(list)
  for i, ann in enumerate(_field(data, "annotations", str(path))):
    where = f"{path} annotations[{i}]"
    image_id = _field(ann, "image_id", where)
    if image_id not in file_of:
      raise ValueError(f"{where} names image_id={image_id!r}, which is not in 'images'")
    caps[image_id].append(_field(ann, "caption", where))
  return [_Record((str(root / native / name),), f"{native}/{name}", tuple(caps[image_id]))
          for image_id, name in file_of.items() if caps[image_id]]


_COCO_LAYOUTS = (
    _manifest_layout("image"),
    _Layout(name="karpathy",
            files=lambda root, s: (root / "dataset_coco.json",) if s in _KARPATHY_SPLITS else (),
            read=_karpathy(("train2014", "val2014")),
            describe="Karpathy split, images in <root>/<filepath>/<filename>"),
    _Layout(name="official",
            files=lambda root, s: ((root / "annotations" / f"captions_{_coco_native(s)}.json",)
                                   if _coco_native(s) else ()),
            read=_coco_official,
            describe="COCO captions annotations, images in <root>/<train2017|val2017>/"),
)

_FLICKR_LAYOUTS = (
    _manifest_layout("image"),
    _Layout(name="karpathy",
            files=lambda root, s: ((root / "dataset_flickr30k.json",)
                                   if s in _KARPATHY_SPLITS and s != "restval" else ()),
            read=_karpathy(("flickr30k-images", "images")),
            describe="Karpathy split, images in <root>/flickr30k-images/ or <root>/images/"),
)


def coco_captions(split: str, *, root: str | os.PathLike | None = None, layout: str = "auto",
                  check_files: bool = True, max_missing_fraction: float = 0.01) -> MediaCaptions:
  """COCO captions: caption -> Image. Splits: train, eval; Karpathy val/test/restval; official
  train2017/val2017/train2014/val2014. Layouts: manifest, karpathy, official (module docstring)."""
  return _build("coco_captions", "mscoco", Image, _COCO_LAYOUTS,
                "train, eval, val, test, restval (karpathy) or train2017, val2017, ... (official)",
                split, root=root, layout=layout, check_files=check_files,
                max_missing_fraction=max_missing_fraction)


def flickr30k(split: str, *, root: str | os.PathLike | None = None, layout: str = "auto",
              check_files: bool = True, max_missing_fraction: float = 0.01) -> MediaCaptions:
  """Flickr30k (Karpathy split): caption -> Image. Splits: train, eval (= test), val, test."""
  return _build("flickr30k", "flickr30k", Image, _FLICKR_LAYOUTS, "train, eval, val, test", split,
                root=root, layout=layout, check_files=check_files,
                max_missing_fraction=max_missing_fraction)


# ---------------------------------------------------------------------------- video: MSR-VTT, VATEX

_MSRVTT_SPLITS = {"train": "train", "eval": "test", "test": "test", "val": "validate",
                  "validate": "validate"}
_MSRVTT_VIDEO_DIRS = ("videos", "videos/all", "TrainValVideo", "TestVideo")


def _msrvtt_files(root: pathlib.Path, split: str) -> tuple[pathlib.Path, ...]:
  if split not in _MSRVTT_SPLITS:
    return ()
  part = "test" if _MSRVTT_SPLITS[split] == "test" else "train_val"
  # MSRVTT_data.json: the same format with all 10k videos, as CLIP4Clip distributes it.
  return (root / "videodatainfo.json", root / "MSRVTT_data.json",
          root / f"{part}_videodatainfo.json")


def _msrvtt_official(root: pathlib.Path, path: pathlib.Path, split: str) -> list[_Record]:
  """{"videos": [{"video_id", "split"}], "sentences": [{"video_id", "caption"}]}."""
  data = _load_json(path)
  wanted = _MSRVTT_SPLITS[split]
  videos = [_field(v, "video_id", f"{path} videos[{i}]")
            for i, v in enumerate(_field(data, "videos", str(path)))
            if _field(v, "split", f"{path} videos[{i}]") == wanted]
  caps: dict[str, list[str]] = {v: [] for v in videos}
  for i, s in enumerate(_field(data, "sentences", str(path))):
    vid = _field(s, "video_id", f"{path} sentences[{i}]")
    if vid in caps:
      caps[vid].append(_field(s, "caption", f"{path} sentences[{i}]"))
  return [_Record(_under(root, _MSRVTT_VIDEO_DIRS, [v], VIDEO_EXTS), v, tuple(caps[v]))
          for v in videos]


def _msrvtt_jsfusion(root: pathlib.Path, path: pathlib.Path, split: str) -> list[_Record]:
  """The 1k-A test set: one row per (video, sentence), columns key, vid_key, video_id, sentence."""
  del split
  caps: dict[str, list[str]] = {}
  for row in _read_csv(path, ("video_id", "sentence")):
    caps.setdefault(row["video_id"], []).append(row["sentence"])
  return [_Record(_under(root, _MSRVTT_VIDEO_DIRS, [v], VIDEO_EXTS), v, tuple(c))
          for v, c in caps.items()]


_MSRVTT_LAYOUTS = (
    _manifest_layout("video"),
    _Layout(name="official", files=_msrvtt_files, read=_msrvtt_official,
            describe="MSR-VTT videodatainfo, videos in <root>/videos/<video_id>.mp4"),
    _Layout(name="jsfusion",
            files=lambda root, s: (root / "MSRVTT_JSFUSION_test.csv",) if s == "test1k" else (),
            read=_msrvtt_jsfusion,
            describe="MSR-VTT 1k-A test csv, videos in <root>/videos/<video_id>.mp4"),
)

_VATEX_FILES = {"train": "vatex_training_v1.0.json", "eval": "vatex_validation_v1.0.json",
                "val": "vatex_validation_v1.0.json", "test": "vatex_public_test_english_v1.1.json"}


def _vatex_official(root: pathlib.Path, path: pathlib.Path, split: str) -> list[_Record]:
  """[{"videoID", "enCap": [...], "chCap": [...]}]; only the English captions are used."""
  del split
  data = _load_json(path)
  if not isinstance(data, list):
    raise ValueError(f"{path} must be a JSON list of {{'videoID', 'enCap'}}; got "
                     f"{type(data).__name__}")
  records = []
  for i, row in enumerate(data):
    where = f"{path}[{i}]"
    vid = _field(row, "videoID", where)
    caps = _captions_of(_field(row, "enCap", where), f"{where} 'enCap'")
    records.append(_Record(_under(root, ["videos"], [vid], VIDEO_EXTS), vid, caps))
  return records


_VATEX_LAYOUTS = (
    _manifest_layout("video"),
    _Layout(name="official",
            files=lambda root, s: (root / _VATEX_FILES[s],) if s in _VATEX_FILES else (),
            read=_vatex_official, describe="VATEX json, videos in <root>/videos/<videoID>.mp4"),
)


def msrvtt(split: str, *, root: str | os.PathLike | None = None, layout: str = "auto",
           check_files: bool = True, max_missing_fraction: float = 0.01) -> MediaCaptions:
  """MSR-VTT: caption -> Video. Splits: train, eval (= test: the full 2,990 videos), val,
  test1k (the 1k-A test set)."""
  return _build("msrvtt", "msrvtt", Video, _MSRVTT_LAYOUTS, "train, eval, test, val, test1k", split,
                root=root, layout=layout, check_files=check_files,
                max_missing_fraction=max_missing_fraction)


def vatex(split: str, *, root: str | os.PathLike | None = None, layout: str = "auto",
          check_files: bool = True, max_missing_fraction: float = 0.01) -> MediaCaptions:
  """VATEX (English captions): caption -> Video. Splits: train, eval (= validation), val, test."""
  return _build("vatex", "vatex", Video, _VATEX_LAYOUTS, "train, eval, val, test", split, root=root,
                layout=layout, check_files=check_files, max_missing_fraction=max_missing_fraction)


# ---------------------------------------------------------------------- audio: AudioCaps, Clotho

_AUDIOCAPS_SPLITS = {"train": "train", "eval": "test", "test": "test", "val": "val"}


def _start_names(start: str) -> list[str]:
  """"30" and "30.0" both name the clip starting at 30 s; downloaders write either."""
  names = [start]
  try:
    value = float(start)
  except ValueError:
    return names
  if value.is_integer() and str(int(value)) != start:
    names.append(str(int(value)))
  return names


def _audiocaps(root: pathlib.Path, path: pathlib.Path, split: str) -> list[_Record]:
  """audiocap_id, youtube_id, start_time, caption; one row per caption, rows grouped by clip."""
  s = _AUDIOCAPS_SPLITS[split]
  clips: dict[tuple[str, str], tuple[list[str], list[str]]] = {}  # clip -> (audiocap ids, captions)
  for row in _read_csv(path, ("audiocap_id", "youtube_id", "start_time", "caption")):
    ids, caps = clips.setdefault((row["youtube_id"], row["start_time"]), ([], []))
    ids.append(row["audiocap_id"])
    caps.append(row["caption"])
  records = []
  for (ytid, start), (ids, caps) in clips.items():
    starts = _start_names(start)
    stems = [f"{ytid}_{t}" for t in starts] + [f"Y{ytid}_{t}" for t in starts] + ids
    records.append(_Record(_under(root, [f"audio/{s}", s], stems, AUDIO_EXTS), f"{ytid}_{start}",
                           tuple(caps)))
  return records


_AUDIOCAPS_LAYOUTS = (
    _manifest_layout("audio"),
    _Layout(name="official",
            files=lambda root, s: ((root / f"{_AUDIOCAPS_SPLITS[s]}.csv",
                                    root / "dataset" / f"{_AUDIOCAPS_SPLITS[s]}.csv")
                                   if s in _AUDIOCAPS_SPLITS else ()),
            read=_audiocaps,
            describe="AudioCaps csv, audio in <root>/audio/<split>/<youtube_id>_<start_time>.wav "
                     "or <audiocap_id>.wav"),
)

_CLOTHO_DIRS = {"train": "development", "development": "development", "eval": "evaluation",
                "evaluation": "evaluation", "val": "validation", "validation": "validation"}
_CLOTHO_CAPTIONS = tuple(f"caption_{i}" for i in range(1, 6))


def _clotho(root: pathlib.Path, path: pathlib.Path, split: str) -> list[_Record]:
  """file_name, caption_1 .. caption_5; audio in <root>/<d>/ or <root>/audio/<d>/."""
  d = _CLOTHO_DIRS[split]
  return [_Record(_under(root, [d, f"audio/{d}"], [row["file_name"]], [""]), row["file_name"],
                  tuple(row[c] for c in _CLOTHO_CAPTIONS))
          for row in _read_csv(path, ("file_name",) + _CLOTHO_CAPTIONS)]


_CLOTHO_LAYOUTS = (
    _manifest_layout("audio"),
    _Layout(name="official",
            files=lambda root, s: ((root / f"clotho_captions_{_CLOTHO_DIRS[s]}.csv",)
                                   if s in _CLOTHO_DIRS else ()),
            read=_clotho,
            describe="Clotho csv, audio in <root>/<development|evaluation|validation>/<file_name>"),
)


def audiocaps(split: str, *, root: str | os.PathLike | None = None, layout: str = "auto",
              check_files: bool = True, max_missing_fraction: float = 0.01) -> MediaCaptions:
  """AudioCaps: caption -> Audio. Splits: train, eval (= test), val, test."""
  return _build("audiocaps", "audiocaps", Audio, _AUDIOCAPS_LAYOUTS, "train, eval, val, test",
                split, root=root, layout=layout, check_files=check_files,
                max_missing_fraction=max_missing_fraction)


def clotho(split: str, *, root: str | os.PathLike | None = None, layout: str = "auto",
           check_files: bool = True, max_missing_fraction: float = 0.01) -> MediaCaptions:
  """Clotho: caption -> Audio. Splits: train (= development), eval (= evaluation),
  val (= validation)."""
  return _build("clotho", "clotho", Audio, _CLOTHO_LAYOUTS,
                "train, eval, val (or development, evaluation, validation)", split, root=root,
                layout=layout, check_files=check_files, max_missing_fraction=max_missing_fraction)


DATASETS: dict[str, Callable[..., MediaCaptions]] = {
    "coco_captions": coco_captions,
    "flickr30k": flickr30k,
    "msrvtt": msrvtt,
    "vatex": vatex,
    "audiocaps": audiocaps,
    "clotho": clotho,
}
