"""One input (text, image, audio, video, or any list of them) -> one token sequence plus its media.

  enc = InputEncoder(tokenizer, model_cfg)
  e = enc.encode([Image(pixels=p_hw3), "make it green"], max_length=64)
  e.tokens   int32 (n,): [bos] <start_of_image> <soft_token> x T <end_of_image> ids("make it green") [eos]
  e.media    (Media(kind="image", array=uint8 (S, S, 3), offset=2, tokens=T),)

Layout of each item inside the sequence (T = config.model.image_tokens, A(f) = audio_tokens(f)):

  text     its token ids (the tokenizer's, see `embed2.data.tokenizer`)
  image    <start_of_image> <soft_token> x T <end_of_image>
  audio    <start_of_audio> (<soft_token> x A(valid frames of chunk c)) for each chunk c <end_of_audio>
  video    <start_of_video> (<timestamp> ids("1.5s") <start_of_image> <soft_token> x T <end_of_image>)
           for each sampled frame, then the clip's audio track as an audio item, <end_of_video>

A `<soft_token>` position is a placeholder: the model replaces its embedding with the next soft token
that the item's frontend makes (image and video frames through the image frontend, audio chunks
through the audio frontend), in order. Boundary tokens are ordinary learned embeddings. Every item,
alone or inside an interleaved input, goes through the same decoder and the same frontend call on its
own media array, so its soft tokens do not depend on what surrounds it.

Truncation: text is cut at the token; a media item is kept whole or dropped (a video keeps the frames
that fit, an audio item the chunks that fit, each still closed by its end token); everything after
the first item that did not fit is dropped, and `truncated` says so. Audio longer than
`max_audio_chunks` chunks is cut to them (a budget, like video frame sampling: `cut`, not
`truncated`), and the items after it still follow. A plain string encodes exactly as
`transforms.Tokenize` does ([bos] + ids + [eos], or the tokenizer's own frame), so text-only training
is unchanged.

The boundary tokens are the tokenizer's (`special_id`). A Hugging Face tokenizer.json may lack some
(Gemma 3's has image tokens, no audio ones): text still encodes, and an item whose tokens are missing
raises `MissingFrontendError` naming the input. Text items must be valid Unicode
(`tokenizer.check_text`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from embed2.data import media as media_lib
from embed2.data import segments
from embed2.data import tokenizer as tok_lib
from embed2.model.presets import ModelConfig

IMAGE = "image"
AUDIO = "audio"
_BOUNDARY_TOKENS = (tok_lib.START_OF_IMAGE, tok_lib.END_OF_IMAGE, tok_lib.START_OF_AUDIO,
                    tok_lib.END_OF_AUDIO, tok_lib.START_OF_VIDEO, tok_lib.END_OF_VIDEO,
                    tok_lib.TIMESTAMP)
# The tokens each item kind puts in a sequence.
_NEEDS = {
    segments.Image: (IMAGE, (tok_lib.SOFT_TOKEN, tok_lib.START_OF_IMAGE, tok_lib.END_OF_IMAGE)),
    segments.Audio: (AUDIO, (tok_lib.SOFT_TOKEN, tok_lib.START_OF_AUDIO, tok_lib.END_OF_AUDIO)),
    # A video's audio track also needs the audio tokens (checked when it has one).
    segments.Video: ("video", (tok_lib.SOFT_TOKEN, tok_lib.START_OF_VIDEO, tok_lib.END_OF_VIDEO,
                               tok_lib.TIMESTAMP, tok_lib.START_OF_IMAGE, tok_lib.END_OF_IMAGE)),
}


@dataclasses.dataclass(frozen=True, eq=False)
class Media:
  """One frontend call's input inside a sequence.

  Attributes:
    kind: "image" (array uint8 (S, S, 3)) or "audio" (array float32 (audio_chunk_frames, n_mels), one
      chunk, padded with silence).
    array: the frontend's input.
    offset: position in the sequence of the first of its soft tokens.
    tokens: how many soft tokens it fills (image_tokens, or audio_tokens(valid frames)).
  """
  kind: str
  array: np.ndarray
  offset: int
  tokens: int


@dataclasses.dataclass(frozen=True, eq=False)
class Encoded:
  """An encoded input: token ids, the media in sequence order, whether something did not fit
  max_length (`truncated`), and whether an audio item was cut to max_audio_chunks (`cut`)."""
  tokens: np.ndarray
  media: tuple[Media, ...]
  truncated: bool
  cut: bool = False

  def count(self, kind: str) -> int:
    return sum(m.kind == kind for m in self.media)


class _Builder:
  """Appends pieces to a sequence with a fixed room; remembers whether anything did not fit."""

  def __init__(self, room: int, soft_id: int):
    self.soft_id = soft_id
    self.ids: list[int] = []
    self.media: list[Media] = []
    self.room = room
    self.truncated = False  # something did not fit the room: everything after it is dropped
    self.cut = False  # an item was cut to its own budget (max_audio_chunks): the rest goes on

  @property
  def free(self) -> int:
    return self.room - len(self.ids)

  def text(self, ids: Sequence[int]) -> None:
    if len(ids) > self.free:
      self.truncated = True
      ids = ids[:self.free]
    self.ids.extend(ids)

  def soft(self, kind: str, array: np.ndarray, n: int) -> None:
    self.media.append(Media(kind=kind, array=array, offset=len(self.ids), tokens=n))
    self.ids.extend([self.soft_id] * n)


class InputEncoder:
  """Encodes inputs for one model: its tokenizer and its media settings (`ModelConfig`).

  Args:
    tokenizer: `embed2.data.tokenizer.Tokenizer` (its special token ids mark the modalities).
    cfg: the model's config; its frontends decide which modalities are accepted, its media fields
      how images are resized, audio featurised and video sampled.
  """

  def __init__(self, tokenizer, cfg: ModelConfig):
    self.tokenizer = tokenizer
    self.cfg = cfg
    sid = getattr(tokenizer, "special_id", None)
    if sid is None and len(cfg.media.modalities) > 1:
      raise ValueError("the tokenizer has no special tokens (special_id); multimodal inputs need "
                       "embed2.data.tokenizer.Tokenizer")
    self.prefix_ids, self.suffix_ids = tok_lib.framing(tokenizer)
    # The ids the tokenizer has; a missing one is an error only when an item needs it.
    self.ids: dict[str, int] = {}
    for name in (tok_lib.SOFT_TOKEN,) + _BOUNDARY_TOKENS:
      try:
        self.ids[name] = sid(name) if sid is not None else -1
      except KeyError:
        pass
    self.soft_id = self.ids.get(tok_lib.SOFT_TOKEN, -1)

  def _need(self, kind: str, names: Sequence[str], where: str) -> None:
    """Raises `MissingFrontendError` when the tokenizer lacks a token that marks `kind`."""
    missing = [n for n in names if n not in self.ids]
    if missing:
      raise segments.MissingFrontendError(
          f"{where}: the tokenizer ({getattr(self.tokenizer, 'source', type(self.tokenizer).__name__)}) "
          f"has no {', '.join(missing)} token, which marks {kind} in a sequence; this model embeds "
          "text and the modalities its tokenizer can mark")

  # ------------------------------------------------------------------------------------ checks

  def check_modalities(self, x: Any, where: str) -> None:
    """Raises `segments.MissingFrontendError` when `x` needs a frontend this model lacks."""
    need = segments.modalities_of(x, where)
    missing = sorted(need - set(self.cfg.media.modalities))
    if missing:
      raise segments.MissingFrontendError(
          f"{where}: this model has no {'/'.join(missing)} frontend (it reads "
          f"{', '.join(self.cfg.media.modalities)}); set config.model.media.image_frontend / "
          "audio_frontend, or pass only what it reads")

  # ------------------------------------------------------------------------------------ encode

  def encode(self, x: Any, *, max_length: int, task_string: str = "", where: str = "input",
             add_bos: bool = True, add_eos: bool = True) -> Encoded:
    """Encodes one input (see the module docstring for the layout).

    Args:
      x: str, an item, or a list of items / str.
      max_length: tokens at most, bos and eos included.
      task_string: text put in front of the input (queries' task strings).
      where: names the input in errors.
      add_bos, add_eos: frame the sequence with bos / eos.

    Raises:
      segments.MediaError: an item cannot be decoded (names `where`).
      segments.MissingFrontendError: the model has no frontend for one of the items, or its
        tokenizer no tokens to mark it.
      tokenizer.InvalidTextError: a text item is not valid Unicode (names `where` and the position).
      TypeError / ValueError: not an input.
    """
    items = segments.items_of(x, where)
    self.check_modalities(items, where)
    head, tail = tok_lib.framing(self.tokenizer, add_bos=add_bos, add_eos=add_eos)
    room = max_length - len(head) - len(tail)
    if room < 1:
      raise ValueError(f"{where}: max_length={max_length} leaves no room after bos/eos")
    for j, item in enumerate(items):
      here = where if len(items) == 1 else f"{where}[{j}]"
      if isinstance(item, (str, segments.Text)):
        tok_lib.check_text(item if isinstance(item, str) else item.text, here)
      else:
        self._need(*_NEEDS[type(item)], here)
    tok_lib.check_text(task_string, f"{where} (its task string)")
    b = _Builder(room, self.soft_id)
    if task_string:
      b.text(self.tokenizer.encode(task_string))
    for j, item in enumerate(items):
      if b.truncated:
        break
      here = where if len(items) == 1 else f"{where}[{j}]"
      if isinstance(item, (str, segments.Text)):
        b.text(self.tokenizer.encode(item if isinstance(item, str) else item.text))
      elif isinstance(item, segments.Image):
        self._image(b, media_lib.load_image(item, self.cfg.media, here))
      elif isinstance(item, segments.Audio):
        self._audio(b, media_lib.load_audio(item, self.cfg.media, here))
      elif isinstance(item, segments.Video):
        self._video(b, media_lib.load_video(item, self.cfg.media, here), here)
    if b.truncated and not b.media and not any(
        isinstance(i, (str, segments.Text)) for i in items[:1]):
      kind = segments.MODALITY[type(items[0])]
      raise ValueError(
          f"{where}: max_length={max_length} cannot hold even its first {kind} ({self.min_tokens(kind)} "
          f"tokens with bos / eos and boundary tokens{', after the task string' if task_string else ''}); "
          "raise the side's length (query_len / positive_len / negative_len) or lower image_tokens")
    toks = np.asarray(list(head) + b.ids + list(tail), np.int32)
    if toks.size == 0:
      raise ValueError(f"{where}: the input encoded to no tokens; keep add_bos or add_eos on")
    shift = len(head)
    media = tuple(dataclasses.replace(m, offset=m.offset + shift) for m in b.media)
    return Encoded(tokens=toks, media=media, truncated=b.truncated, cut=b.cut)

  def _image(self, b: _Builder, pixels: np.ndarray) -> bool:
    t = self.cfg.media.image_tokens
    if b.free < t + 2:
      b.truncated = True
      return False
    b.ids.append(self.ids[tok_lib.START_OF_IMAGE])
    b.soft(IMAGE, pixels, t)
    b.ids.append(self.ids[tok_lib.END_OF_IMAGE])
    return True

  def _audio(self, b: _Builder, wave: np.ndarray) -> None:
    chunks, valid, cut = media_lib.audio_chunks(wave, self.cfg.media)
    first = self.cfg.media.audio_tokens(valid[0]) if valid else 1
    if b.free < first + 2:
      b.truncated = True
      return
    b.ids.append(self.ids[tok_lib.START_OF_AUDIO])
    for chunk, frames in zip(chunks, valid):
      n = self.cfg.media.audio_tokens(frames)
      if b.free < n + 1:  # keep room for <end_of_audio>
        b.truncated = True
        break
      b.soft(AUDIO, chunk, n)
    b.ids.append(self.ids[tok_lib.END_OF_AUDIO])
    b.cut |= cut

  def min_tokens(self, kind: str) -> int:
    """Tokens the smallest input of one item of `kind` takes, bos and eos included."""
    stamp = 1 + len(self.tokenizer.encode("0.0s"))
    frame = len(self.prefix_ids) + len(self.suffix_ids)
    return frame + {"image": self.cfg.media.image_tokens + 2, "audio": 3,
                    "video": stamp + self.cfg.media.image_tokens + 4}[kind]

  def _video(self, b: _Builder, clip, where: str) -> None:
    if clip.audio is not None:
      self._need(AUDIO, _NEEDS[segments.Audio][1], f"{where} (its audio track)")
    if b.free < self.min_tokens("video") - len(self.prefix_ids) - len(self.suffix_ids):
      b.truncated = True
      return
    b.ids.append(self.ids[tok_lib.START_OF_VIDEO])
    b.room -= 1  # <end_of_video> always fits
    for t_s, frame in zip(clip.timestamps, clip.frames):
      stamp = [self.ids[tok_lib.TIMESTAMP]] + list(self.tokenizer.encode(f"{t_s:.1f}s"))
      if b.free < len(stamp) + self.cfg.media.image_tokens + 2:
        b.truncated = True
        break
      b.ids.extend(stamp)
      self._image(b, frame)
    if clip.audio is not None and not b.truncated:
      self._audio(b, clip.audio)
    b.room += 1
    b.ids.append(self.ids[tok_lib.END_OF_VIDEO])
