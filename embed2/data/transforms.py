"""The grain transforms of one task's stream: the task string, then tokenization of each side.

  .random_map(PrependTaskString)   task string kept with prob 1 - p_drop
  .map(Tokenize) x 3 sides         [bos] + ids + [eos] (the tokenizer's frame), truncated to the side's
                                   L; media / interleaved sides through an `interleave.InputEncoder`;
                                   an undecodable record is marked skipped (`packing.SKIPPED`), counted
                                   by the packer
  .map(SetTaskIndex)               the task's position in the stage

`embed2.data.pipeline` chains them per task; `Embedder` tokenizes its inputs with the same `Tokenize`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np
from absl import logging

from embed2.data import packing
from embed2.data import segments
from embed2.data import tokenizer as tok_lib

# A text longer than this many characters per allowed token is cut before
# tokenizing, so a 1 MB document costs no more than a long passage. Sentencepiece
# pieces are at most 16 characters (its default max_piece_length), so the cut text
# still overflows the side's length; only its last word can tokenize differently
# from the full text, so the cut is used only when it yields `_CUT_MARGIN` tokens
# more than are kept (else, e.g. long runs of collapsed whitespace, the full text
# is tokenized).
_CHARS_PER_TOKEN_CUT = 16
_CUT_MARGIN = 8


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrependTaskString(grain.transforms.RandomMap):
  """Prepends the task string to the query, dropped with probability p_drop.

  Reads `key` (an input); writes `key` (task_string + text, or the text unchanged;
  a text-only list of items becomes its one joined text) and `kept_key` (bool).
  For an input with media the task string is written to `{key}_task_string`,
  which `Tokenize` puts in front of the encoded input, so errors about the input
  keep naming its own items. Deterministic per stream position given the
  random_map seed.
  """

  task_string: str
  p_drop: float = 0.0
  key: str = "query"
  kept_key: str = "task_string_kept"

  def random_map(self, element, rng: np.random.Generator):
    # Always draw, so the rng stream does not depend on task_string being empty.
    keep = bool(rng.random() >= self.p_drop) and bool(self.task_string)
    out = dict(element)
    if keep:
      x = element[self.key]
      text = x if isinstance(x, str) else segments.as_text(x)
      if text is not None:
        out[self.key] = self.task_string + text
      else:  # media: the encoder puts the task string in front (`{key}_task_string`)
        out[f"{self.key}_task_string"] = self.task_string
    out[self.kept_key] = keep
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class Tokenize(grain.transforms.Map):
  """Tokenizes one side: [bos] + ids + [eos], truncated to max_length.

  bos / eos are the tokenizer's frame (`tokenizer.framing`: Gemma's bos and eos for a
  sentencepiece model, what a tokenizer.json's post-processor puts around a text).
  A truncated sequence keeps its frame and loses ids from the end.

  Reads `in_key`: an input (a str; with an `encoder`, also an item or a list of
  items, see `embed2.data.interleave`), or a list of inputs when `max_items` is set
  (negatives; the first max_items are kept). Writes `out_key`: int32 (n,) with
  1 <= n <= max_length, or a list of them, `truncated_key`: int, how many of them
  were truncated (for media inputs also audio cut to max_audio_chunks), and for
  media inputs `media_key` (out_key with "_tokens" -> "_media"): the
  `interleave.Media` of each sequence (a tuple, or a list of tuples). A text-only
  input (a str, `Text`, or a list of them) is one text; a media input's task
  string comes from `{in_key}_task_string` (see PrependTaskString).

  A media input that cannot be decoded (`media.MediaError`), or text that is
  not valid Unicode (`tokenizer.InvalidTextError`: a lone surrogate), does not
  stop the pipeline: the element is marked `packing.SKIPPED` (with the reason)
  and the packer counts and drops it; later transforms pass a marked element
  through.
  """

  tokenizer: Any
  in_key: str
  out_key: str
  truncated_key: str
  max_length: int
  max_items: int | None = None
  add_bos: bool = True
  add_eos: bool = True
  encoder: Any = None  # interleave.InputEncoder; needed for non-text inputs
  where: str = ""  # names the task in skip reasons

  def __post_init__(self):
    if self.max_length < 1 + self.add_bos + self.add_eos:
      raise ValueError(
          f"{self.in_key}: max_length={self.max_length} leaves no room for text "
          f"after bos/eos; set the side's length to >= "
          f"{1 + self.add_bos + self.add_eos}.")

  def _one(self, text: str) -> tuple[np.ndarray, bool]:
    head, tail = tok_lib.framing(self.tokenizer, add_bos=self.add_bos, add_eos=self.add_eos)
    room = self.max_length - len(head) - len(tail)
    if room < 1:
      raise ValueError(f"{self.in_key}: max_length={self.max_length} leaves no room for text after "
                       f"the tokenizer's frame {head} ... {tail}")
    cut = (room + 1) * _CHARS_PER_TOKEN_CUT
    ids = None
    if len(text) > cut:
      ids = self.tokenizer.encode(text[:cut])
      if len(ids) <= room + _CUT_MARGIN:
        ids = None
    if ids is None:
      ids = self.tokenizer.encode(text)
    truncated = len(ids) > room
    toks = np.asarray(list(head) + list(ids[:room]) + list(tail), np.int32)
    if toks.size == 0:
      raise ValueError(f"{self.in_key}: empty text tokenized to no tokens; keep "
                       "add_bos or add_eos on.")
    return toks, truncated

  def encode_input(self, x, where: str, task_string: str = ""
                   ) -> tuple[np.ndarray, bool, tuple, bool]:
    """One input -> (tokens, truncated, media, cut); text-only inputs (str, Text, lists of them) are
    one text. `task_string` goes in front of a media input (text carries its own already).

    Raises:
      segments.MediaError: bad media (the message names `where`).
      tokenizer.InvalidTextError: text that is not valid Unicode (names `where` and the position).
    """
    text = x if isinstance(x, str) else segments.as_text(x, where)
    if text is not None:
      text = task_string + text
      tok_lib.check_text(text, where)
      toks, trunc = self._one(text)
      return toks, trunc, (), False
    if self.encoder is None:
      raise TypeError(f"{where} holds media, not only text; multimodal tasks need an input encoder "
                      "(a model with image / audio frontends; build the iterator with "
                      "encoder=interleave.InputEncoder(...))")
    e = self.encoder.encode(x, max_length=self.max_length, task_string=task_string, where=where,
                            add_bos=self.add_bos, add_eos=self.add_eos)
    return e.tokens, e.truncated, e.media, e.cut

  def map(self, element):
    if packing.SKIPPED in element:
      return element
    out = dict(element)
    media_key = self.out_key.replace("_tokens", "_media")
    where = (f"{self.where} " if self.where else "") + (
        f"example query_id={element.get('query_id', '?')} {self.in_key}")
    task_string = element.get(f"{self.in_key}_task_string", "")
    try:
      if self.max_items is None:
        toks, trunc, media, cut = self.encode_input(element[self.in_key], where, task_string)
        out[self.out_key] = toks
        out[self.truncated_key] = int(trunc or cut)
        if media:
          out[media_key] = media
      else:
        xs = list(element.get(self.in_key, ()))[:self.max_items]
        encoded = [self.encode_input(x, f"{where}[{j}]") for j, x in enumerate(xs)]
        out[self.out_key] = [e[0] for e in encoded]
        out[self.truncated_key] = sum(int(e[1] or e[3]) for e in encoded)
        if any(e[2] for e in encoded):
          out[media_key] = [e[2] for e in encoded]
    except (segments.MediaError, tok_lib.InvalidTextError) as e:
      _log_skip(e)
      return {packing.SKIPPED: str(e), "query_id": element.get("query_id", -1)}
    return out


_skips_logged = [0]


def _log_skip(err) -> None:
  """Names the first 20 skipped records in the log, then one in a hundred (the packer counts all)."""
  n = _skips_logged[0]
  _skips_logged[0] += 1
  if n < 20 or n % 100 == 0:
    logging.warning("skipping an unreadable record (%d so far in this process): %s", n + 1, err)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SetTaskIndex(grain.transforms.Map):
  """Writes `task_index` (int): the task's position in the stage's task list."""

  task_index: int

  def map(self, element):
    out = dict(element)
    out["task_index"] = self.task_index
    return out
