"""The items an input is made of: text, image, audio, video; an input is one item or a list of them.

  "a red circle"                                        one text
  Image(path="cat.jpg")                                 one image
  [Image(pixels=p_hw3), Text(text="make it green")]     one interleaved input: one sequence, one vector

Every media item takes its content from exactly one source: an array (`pixels`, `samples`, `frames`),
encoded file bytes (`data`), or a file `path`. Decoding, resizing and feature extraction happen in
`embed2.data.media`; `embed2.data.interleave` turns an input into one token sequence plus the media
the frontends read. Training examples use the same items in their "query" / "positive" / "negatives"
fields, so a training input and an `Embedder` input go through the same code.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Union

import numpy as np


class MediaError(ValueError):
  """A media item that cannot be read (corrupt, unsupported, empty, too large); the message names the
  input and the fix. Raised by `embed2.data.media`; the training pipeline counts and skips such
  records, `Embedder` raises it."""


class MissingFrontendError(ValueError):
  """The model cannot read this modality (it has no frontend for it)."""


def missing_frontend(modality: str) -> MissingFrontendError:
  """The error for an input of `modality` given to a model without its frontend."""
  return MissingFrontendError(
      f"this model has no {modality} frontend (set config.model.media.image_frontend / audio_frontend when "
      "training one); pass inputs of the modalities it reads (Embedder.modalities)")


def _check_source(item, sources: tuple[str, ...]) -> None:
  given = [s for s in sources if getattr(item, s) is not None]
  if len(given) != 1:
    name = type(item).__name__
    raise ValueError(f"{name} needs exactly one of {', '.join(sources)}; got "
                     f"{given or 'none'}. E.g. {name}({sources[0]}=...)")


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Text:
  """A piece of text."""
  text: str

  def __post_init__(self):
    if not isinstance(self.text, str):
      raise TypeError(f"Text.text must be str, got {type(self.text).__name__}")


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Image:
  """An image: `pixels` uint8 (H, W, 3) / (H, W, 4) / (H, W) array, encoded file `data`
  (PNG, JPEG, WebP, ...), or a file `path`."""
  pixels: np.ndarray | None = None
  data: bytes | None = None
  path: str | None = None

  def __post_init__(self):
    _check_source(self, ("pixels", "data", "path"))


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Audio:
  """A waveform: `samples` float (T,) or (T, C) at `sample_rate` Hz, encoded file `data` (WAV, FLAC,
  ...), or a file `path`."""
  samples: np.ndarray | None = None
  sample_rate: int | None = None
  data: bytes | None = None
  path: str | None = None

  def __post_init__(self):
    _check_source(self, ("samples", "data", "path"))
    if self.samples is not None and not self.sample_rate:
      raise ValueError("Audio(samples=...) needs sample_rate= (Hz)")


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Video:
  """A video: `frames` uint8 (T, H, W, 3) at `fps` frames per second (with an optional `audio`
  track), encoded file `data`, or a file `path` (decoded with PyAV: `pip install embed2[video]`; a
  file's own audio track is read too)."""
  frames: np.ndarray | None = None
  fps: float | None = None
  audio: Audio | None = None
  data: bytes | None = None
  path: str | None = None

  def __post_init__(self):
    _check_source(self, ("frames", "data", "path"))
    if self.frames is not None and not self.fps:
      raise ValueError("Video(frames=...) needs fps= (frames per second)")


Item = Union[Text, Image, Audio, Video]
MEDIA_TYPES = (Image, Audio, Video)
MODALITY = {Text: "text", Image: "image", Audio: "audio", Video: "video"}


def items_of(x: Any, where: str) -> list[Item | str]:
  """One input -> its flat list of items (str stays str). Raises TypeError / ValueError naming `where`."""
  if isinstance(x, (str, Text, Image, Audio, Video)):
    return [x]
  if isinstance(x, (list, tuple)):
    if not x:
      raise ValueError(f"{where} is an empty interleaved input; give it at least one item")
    for j, part in enumerate(x):
      if isinstance(part, (list, tuple)):
        raise TypeError(f"{where}[{j}] is a list inside an interleaved input; an interleaved input "
                        "is a flat list of items")
      if not isinstance(part, (str, Text, Image, Audio, Video)):
        raise TypeError(f"{where}[{j}] has unsupported type {type(part).__name__}; items are str, "
                        "Text, Image, Audio, Video")
    return list(x)
  raise TypeError(f"{where} has unsupported type {type(x).__name__}; inputs are str, Text, Image, "
                  "Audio, Video, or a list of those items for one interleaved input")


def modalities_of(x: Any, where: str = "input") -> set[str]:
  """The modalities an input needs the model to read ({"text"} for plain text)."""
  return {"text" if isinstance(i, str) else MODALITY[type(i)] for i in items_of(x, where)}


def as_text(x: Any, where: str = "input") -> str | None:
  """The one text a text-only input stands for (`Text` items and text-only lists joined, the way a
  text example is one string); None for an input holding media."""
  items = items_of(x, where)
  if not all(isinstance(i, (str, Text)) for i in items):
    return None
  return "".join(i if isinstance(i, str) else i.text for i in items)
