"""Packs (query, positive, hard negatives) tuples into fixed-shape rows.

This module is the batch contract between the data pipeline and the model/loss.

A train-step batch is split into G *pack groups* (one per data shard: the devices
along the batch mesh axes). Each group is packed on its own, so every example of a
group lives entirely in that group's rows and a device never needs another device's
rows to pool its examples. Per side `s` in ("query", "positive", "negative") (the
negative side only when K > 0) a batch holds, with R = G * R_g rows and
B = G * B_g examples:

  {s}_tokens       int32 (R, L)  token ids, 0 = padding. Rows [g*R_g, (g+1)*R_g)
                                 belong to group g.
  {s}_segment_ids  int32 (R, L)  0 on padding, 1..S = the example's index within
                                 its row.
  {s}_positions    int32 (R, L)  position of the token inside its own example
                                 (0-based), 0 on padding.
  query_slot       int32 (B,)    example b (group g = b // B_g) sits at slot
  positive_slot    int32 (B,)    `row_in_group * S + (segment_id - 1)`, an index into
  negative_slot    int32 (B, K)  group g's flattened (R_g * S) slots. The model pools
                                 (R, S, d) -> (G, R_g * S, d) and gathers per group.
  example_valid    bool  (B,)    False for example slots the group could not fill;
                                 their slots are 0 and the loss masks them.
  negative_valid   bool  (B, K)  False where the example had fewer than K negatives
                                 (or is itself invalid); slot 0, masked by the loss.
  query_ids        int32 (B,)    content ids for the duplicate mask (-1 on padding).
  positive_ids     int32 (B,)
  example_task     int32 (B,)    index of the example's task in the stage's task list
                                 (-1 on padding); lets PFT log per-task losses.

Media (sides whose SideShape has image or audio slots): the sequence's soft-token
placeholders (see `embed2.data.interleave`) are filled by the frontends from the
group's media slots:

  {s}_images       uint8 (G * N_g, P, P, 3)  N_g image slots per group (P =
                                             image_size); unused
                                             slots are 0.
  {s}_audio        float32 (G * A_g, F, M)   A_g audio-chunk slots per group;
                                             unused slots hold silence.
  {s}_soft_index   int32 (R, L)  -1 on ordinary tokens; at a placeholder, the
                                 index of its soft token in group g's flattened
                                 soft tokens: image slot j's token t is
                                 j * T_img + t, audio slot a's token t is
                                 N_g * T_img + a * T_aud + t.

0-d entries of the batch are logging stats, never model inputs (see `batch_stats`):
`num_tokens`, `num_truncated`, `num_examples`, `example_fill`, `num_read`, `num_skipped`,
and per side `{s}_num_tokens`, `{s}_nonpad_fraction`, `{s}_num_truncated`, and for media
sides `{s}_num_images`, `{s}_num_audio`. `num_read` counts the records pulled from the
stream while this batch was filled, good or bad; `num_skipped` counts those of them that
were dropped (the pipeline could not decode them, or they hold more media than a side
has slots). Both are counted at the same moment, when a record is pulled, so over any
run of batches num_skipped / num_read is exactly the bad fraction of the records read.
(`num_examples` is not a count of good records read: the lookahead window reads up to
W + max_misses good tuples ahead of what it packs, so skipped / (skipped + examples)
overstates the bad fraction of the first batches.)

Packing policy (per group, online, best-fit rows, a lookahead window of tuples): the
candidates are the tuples held over from the previous batch (oldest first), then fresh
ones from the stream. The first tuple of every batch is the oldest candidate (it always
fits an empty batch). Each later pick chooses, among the first W candidates not yet
tried in this batch (W = `lookahead`), the one that keeps the batch on course to be
full when it holds B_g tuples: the one minimising

    sum_c  w_c * ((used_c + need_c) / cap_c - (n + 1) / B_g)^2

over the batch's capacities c (each side's row tokens, weighted by its share of all
row tokens, and each side's image and audio slots, weighted 1 / number of sides),
where n tuples are accepted so far. A side's token totals vary from tuple to tuple
independently of the other sides', so taking tuples strictly in order fills one side
while the others fall short; steering the choice keeps every side near its share.
A tuple is accepted only if every side fits: each sequence goes into the row with the
least free space that still has room for it and fewer than S segments. Only
candidates that can fit by their totals and longest sequences are scored. A chosen
tuple that does not fit is set aside until the next batch (never dropped) and counts
as a miss; so does the oldest candidate when none of the window can fit, to make room
for a fresh one. A batch closes when it holds B_g tuples, when `max_misses` tuples
were set aside during it, or when some side cannot take even a one-token sequence.
The candidates not accepted are held over in arrival order, so the oldest starts the
next batch: at most W + max_misses tuples are ever held, and a tuple waits at most
that many batches. W = 0 (or 1) is the strict order: tuples are tried one by one as
they come.

Sizing: with R_g from `suggest_rows` (slack 1.0) on a query/passage length mix
(`embed2.bench.common.token_tuples`), strict order packs ~95% of all row tokens at
B_g = 256, ~93% at 64 and ~91% at 32: the side that closes the batch is ~98% full, the
others lower. A window of 64 packs ~97% at 256, ~97% at 64 and ~94% at 32, with more
example slots filled (`python -m embed2.bench.packing`; tests/test_packing.py pins the
gain). Choosing costs host time: ~22 ms instead of ~12 ms per group of 256 on one core.

Negatives: the first K of an example's negatives are carried (put the hardest
first); an example with fewer than K has the missing ones marked False in
`negative_valid` and takes no tokens for them (no repetition: a repeated negative
would count twice in the NCE denominator).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Hashable, Sequence

import numpy as np
from absl import logging

from embed2.data import media as media_lib

SIDES = ("query", "positive", "negative")

# A tuple in flight: (key, tokenized example). The key is opaque to the packer; the
# pipeline uses the example's index in its stream so held-over tuples can be re-read
# after a restore.
Item = tuple[Hashable, dict[str, Any]]

# Key of a stream record the pipeline could not decode (value: the reason). The
# packer counts it in `num_skipped` and moves on.
SKIPPED = "skipped"


@dataclasses.dataclass(frozen=True, kw_only=True)
class SideShape:
  """Static shape of one side of one pack group.

  Attributes:
    length: L, tokens per row.
    rows: R_g, rows per group.
    images: N_g, image slots per group (video frames are images).
    audio: A_g, audio-chunk slots per group.
  """

  length: int
  rows: int
  images: int = 0
  audio: int = 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class GroupShape:
  """Static shape of one pack group's batch (all groups of a task share it).

  Attributes:
    examples: B_g, example slots per group.
    segments: S, at most this many examples per row (every side).
    num_negatives: K, hard negatives per example (0: no negative side).
    query: the query side's shape.
    positive: the positive side's shape.
    negative: the negative side's shape; required iff num_negatives > 0.
    max_misses: a batch closes once this many tuples were set aside during it.
    lookahead: W, candidates the packer chooses from at each pick (see the module
      docstring); 0 or 1 takes tuples strictly in order.
    image_shape: (S, S, 3) of an image slot; needed when a side has image slots.
    image_tokens: T_img, soft tokens per image.
    audio_shape: (F, M) of an audio-chunk slot; needed when a side has audio slots.
    audio_tokens: T_aud, soft tokens of a full chunk.
    audio_pad: the value unused audio slots are filled with (silence).
  """

  examples: int
  segments: int
  num_negatives: int
  query: SideShape
  positive: SideShape
  negative: SideShape | None = None
  max_misses: int = 64
  lookahead: int = 0
  image_shape: tuple[int, ...] = ()
  image_tokens: int = 0
  audio_shape: tuple[int, ...] = ()
  audio_tokens: int = 0
  audio_pad: float = 0.0

  def __post_init__(self):
    if self.examples < 1:
      raise ValueError(f"examples={self.examples} (B_g) must be >= 1.")
    if self.segments < 1:
      raise ValueError(f"segments={self.segments} (S) must be >= 1.")
    if self.num_negatives < 0:
      raise ValueError(f"num_negatives={self.num_negatives} (K) must be >= 0.")
    if self.max_misses < 1:
      raise ValueError(f"max_misses={self.max_misses} must be >= 1.")
    if self.lookahead < 0:
      raise ValueError(f"lookahead={self.lookahead} must be >= 0 (0: tuples in order).")
    if (self.num_negatives > 0) != (self.negative is not None):
      raise ValueError(
          f"num_negatives={self.num_negatives} but negative side is "
          f"{self.negative}; give a negative SideShape iff num_negatives > 0.")
    for side in self.sides:
      ss = self.side(side)
      if ss.length < 1 or ss.rows < 1:
        raise ValueError(f"{side}: length={ss.length} and rows={ss.rows} must "
                         "be >= 1.")
      # Without enough slots the batch could never hold B_g tuples and every batch
      # would close on misses with padding. (Not checked for negatives: examples
      # may carry fewer than K, and rows are sized for the mean count.)
      need = self.examples
      if side != "negative" and ss.rows * self.segments < need:
        raise ValueError(
            f"{side}: rows={ss.rows} * segments={self.segments} < {need} "
            f"sequences per group; raise the {side} rows to >= "
            f"{math.ceil(need / self.segments)} or segments.")
    for side in self.sides:
      ss = self.side(side)
      if ss.images < 0 or ss.audio < 0:
        raise ValueError(f"{side}: images={ss.images} and audio={ss.audio} slots must be >= 0.")
    if any(self.side(s).images for s in self.sides) and (
        len(self.image_shape) != 3 or self.image_tokens < 1):
      raise ValueError(f"image slots need image_shape (S, S, 3) and image_tokens >= 1; got "
                       f"{self.image_shape} and {self.image_tokens}.")
    if any(self.side(s).audio for s in self.sides) and (
        len(self.audio_shape) != 2 or self.audio_tokens < 1):
      raise ValueError(f"audio slots need audio_shape (F, M) and audio_tokens >= 1; got "
                       f"{self.audio_shape} and {self.audio_tokens}.")
    if self.negative is not None and self.negative.rows < self.num_negatives:
      # With one row per negative any tuple fits an empty batch; fewer rows could
      # leave a tuple of K long negatives that fits nowhere, ever.
      raise ValueError(
          f"negative rows={self.negative.rows} < num_negatives="
          f"{self.num_negatives}; raise the negative rows to >= K so any tuple "
          "fits an empty batch.")

  @property
  def sides(self) -> tuple[str, ...]:
    return SIDES if self.num_negatives > 0 else SIDES[:2]

  def side(self, name: str) -> SideShape:
    return getattr(self, name)


def suggest_rows(lengths: Sequence[int] | np.ndarray, *, sequences: float,
                 length: int, segments: int, slack: float = 1.0) -> int:
  """Suggests R_g for one side from a sample of that side's sequence lengths.

  Args:
    lengths: sample of tokenized lengths (after truncation to `length`), any size.
    sequences: expected sequences per group on this side: B_g for query and
      positive, B_g * (mean negatives per example) for negatives.
    length: L, tokens per row.
    segments: S.
    slack: capacity over the expected token count. 1.0 fills rows to ~97-99% and
      leaves a few example slots empty; larger values fill more example slots and
      fewer tokens (1.02 is the classic choice).

  Returns:
    ceil(sequences * mean(lengths) / length * slack), at least enough rows for the
    segment limit (ceil(sequences / segments)) and at least 1.
  """
  lengths = np.asarray(lengths, np.float64)
  if lengths.size == 0:
    raise ValueError("suggest_rows needs a non-empty sample of lengths.")
  mean = float(np.minimum(lengths, length).mean())
  by_tokens = math.ceil(sequences * mean / length * slack)
  by_segments = math.ceil(sequences / segments)
  return max(1, by_tokens, by_segments)


class _Rows:
  """Free space of one side's rows (and media slots) while a group batch fills."""

  __slots__ = ("free", "used", "segments", "length", "side", "images_used",
               "audio_used", "free_total")

  def __init__(self, side: SideShape, segments: int):
    self.free = np.full(side.rows, side.length, np.int64)
    self.free_total = side.rows * side.length
    self.used = np.zeros(side.rows, np.int64)
    self.segments = segments
    self.length = side.length
    self.side = side
    self.images_used = 0  # media slots fill in order
    self.audio_used = 0

  def place(self, n: int, images: int = 0, audio: int = 0
            ) -> tuple[int, int, int, int, int] | None:
    """Best-fit: (row, start, segment, first image slot, first audio slot) for a
    length-n sequence with that many media items, or None.

    The row with the least free space that still fits (ties: the first such row);
    it packs a little tighter than first-fit at the same cost.
    """
    if (self.images_used + images > self.side.images or
        self.audio_used + audio > self.side.audio):
      return None
    ok = (self.free >= n) & (self.used < self.segments)
    if not ok.any():
      return None
    r = int(np.where(ok, self.free, np.iinfo(np.int64).max).argmin())
    start = self.length - int(self.free[r])
    seg = int(self.used[r])
    self.free[r] -= n
    self.free_total -= n
    self.used[r] += 1
    img0, aud0 = self.images_used, self.audio_used
    self.images_used += images
    self.audio_used += audio
    return r, start, seg, img0, aud0

  def undo(self, r: int, n: int, images: int = 0, audio: int = 0):
    self.free[r] += n
    self.free_total += n
    self.used[r] -= 1
    self.images_used -= images
    self.audio_used -= audio

  def full(self) -> bool:
    return not bool(((self.free >= 1) & (self.used < self.segments)).any())


def _check_tokens(side: str, toks: np.ndarray, length: int):
  if toks.ndim != 1 or toks.size == 0 or toks.size > length:
    raise ValueError(
        f"{side} sequence of shape {toks.shape} does not fit length={length}; "
        "tokenize with truncation to the side's length (transforms.Tokenize) and "
        "never emit empty sequences.")


def soft_index_base(kind: str, slot: int, *, images: int, image_tokens: int,
                    audio_tokens: int) -> int:
  """Index of the first soft token of media slot `slot` in a group's flattened soft
  tokens: the `images` image slots' tokens first, then the audio chunks' (see the
  module docstring)."""
  if kind == "image":
    return slot * image_tokens
  return images * image_tokens + slot * audio_tokens


class RowWriter:
  """The batch contract of one side, written once: examples into rows and their media into slots.

  An example written at (row r, start, segment seg) fills `tokens[r, start:start + n]`, segment id
  seg + 1 and positions 0..n-1 (restarting per example); each of its media goes into the next free
  image / audio slot of its pack group, and `soft_index` points each of the medium's placeholder
  tokens at that slot's soft tokens (`soft_index_base`: group-local, images first). The packer writes
  every pack group through one; `Embedder` writes each row as a group of its own.

  Args:
    rows, length: R, L of the side.
    groups: G; the media slot arrays hold G * images and G * audio slots.
    images, audio: N_g and A_g, slots per group (0: the side has none).
    media: GroupShape's media fields (image_shape, image_tokens, audio_shape, audio_tokens,
      audio_pad), needed when there are slots; `media_shapes(model_cfg)` gives them.
  """

  def __init__(self, rows: int, length: int, *, groups: int = 1, images: int = 0, audio: int = 0,
               image_shape: tuple[int, ...] = (), image_tokens: int = 0,
               audio_shape: tuple[int, ...] = (), audio_tokens: int = 0, audio_pad: float = 0.0):
    self.tokens = np.zeros((rows, length), np.int32)
    self.segment_ids = np.zeros((rows, length), np.int32)
    self.positions = np.zeros((rows, length), np.int32)
    self.has_media = images > 0 or audio > 0
    self.n_images = self.n_audio = 0
    if self.has_media:
      self.soft_index = np.full((rows, length), -1, np.int32)
      self.images = np.zeros((groups * images,) + tuple(image_shape), np.uint8) if images else None
      self.audio = (np.full((groups * audio,) + tuple(audio_shape), audio_pad, np.float32)
                    if audio else None)
      self._slots = (images, audio)
      self._base = functools.partial(soft_index_base, images=images, image_tokens=image_tokens,
                                     audio_tokens=audio_tokens)

  def write(self, r: int, start: int, seg: int, toks: np.ndarray, media: Sequence[Any] = (), *,
            group: int = 0, image_slot: int = 0, audio_slot: int = 0) -> None:
    """Writes one example; its media take the group's slots from image_slot / audio_slot on."""
    n = toks.size
    self.tokens[r, start:start + n] = toks
    self.segment_ids[r, start:start + n] = seg + 1
    self.positions[r, start:start + n] = np.arange(n, dtype=np.int32)
    for m in media:
      at = start + m.offset
      if m.kind == "image":
        self.images[group * self._slots[0] + image_slot] = m.array
        first = self._base("image", image_slot)
        image_slot += 1
        self.n_images += 1
      else:
        self.audio[group * self._slots[1] + audio_slot] = m.array
        first = self._base("audio", audio_slot)
        audio_slot += 1
        self.n_audio += 1
      self.soft_index[r, at:at + m.tokens] = first + np.arange(m.tokens, dtype=np.int32)

  def arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
    """`{prefix}tokens / segment_ids / positions`, and for a side with slots `{prefix}soft_index` and
    the `{prefix}images` / `{prefix}audio` slots it has."""
    out = {f"{prefix}tokens": self.tokens, f"{prefix}segment_ids": self.segment_ids,
           f"{prefix}positions": self.positions}
    if self.has_media:
      out[f"{prefix}soft_index"] = self.soft_index
      if self.images is not None:
        out[f"{prefix}images"] = self.images
      if self.audio is not None:
        out[f"{prefix}audio"] = self.audio
    return out


def media_shapes(model_cfg) -> dict[str, Any]:
  """The media fields of a GroupShape / RowWriter for a model config: slot shapes, soft tokens per
  slot, and the silence unused audio slots hold."""
  c = model_cfg.media
  return dict(image_shape=(c.image_size, c.image_size, 3), image_tokens=c.image_tokens,
              audio_shape=(c.audio_chunk_frames, c.n_mels), audio_tokens=c.audio_chunk_tokens,
              audio_pad=float(media_lib.log_mel_pad_value(c)))


def slot_bucket(count: int) -> int:
  """Media slots for `count` items, rounded up to a power of two (few shapes to
  compile; `Embedder` rows)."""
  return 0 if count == 0 else 1 << (count - 1).bit_length()


def _media_counts(media: tuple) -> tuple[int, int]:
  if not media:
    return 0, 0
  n_img = sum(m.kind == "image" for m in media)
  return n_img, len(media) - n_img


def _fold_id(x: int) -> int:
  """Content ids are int32 in the batch; wider ids (hashes) are folded."""
  x = int(x)
  if 0 <= x < 2**31:
    return x
  x &= 2**64 - 1
  return (x ^ (x >> 31) ^ (x >> 62)) & (2**31 - 1)


def pack_group(shape: GroupShape, held: Sequence[Item],
               pull: Callable[[], Item]) -> tuple[dict[str, np.ndarray], list[Item]]:
  """Fills one group's batch.

  Args:
    shape: the group's static shape.
    held: tuples held over from this group's previous batch; read first, in order.
    pull: returns the next fresh (key, example) of this group's stream, or raises
      StopIteration at the end of a finite one (the batch then packs what was read;
      the pipeline's streams never end). An example
      is a dict with `query_tokens`, `positive_tokens` (1-D int arrays, 1..L long),
      `negative_tokens` (list of such, only the first K are used), `query_id`,
      `positive_id` (ints), optional `task_index` (int), optional truncation
      counts `query_truncated`, `positive_truncated`, `negative_truncated`, and
      for media `query_media` / `positive_media` (tuples of `interleave.Media`)
      and `negative_media` (a list of such tuples, aligned with
      `negative_tokens`). An example holding `SKIPPED` (a record the pipeline
      could not decode), or one with more media than a side has slots, is
      counted in `num_skipped` and dropped.

  Returns:
    (group batch, tuples held over for the next batch). The group batch has the
    contract's arrays with R = R_g and B = B_g, plus per-group count stats
    (0-d int64): `{s}_num_tokens`, `{s}_num_truncated`, `num_examples`,
    `num_read` (calls of `pull` that returned a record; `held` tuples are not
    counted again), `num_skipped` (of those, the ones dropped), and for media
    sides `{s}_num_images`, `{s}_num_audio`.
  """
  k = shape.num_negatives
  sides = shape.sides
  rows = {s: _Rows(shape.side(s), shape.segments) for s in sides}
  queue = list(held)
  queue.reverse()  # pop() from the end == take in original order
  width = max(shape.lookahead, 1)
  window = _Window(shape, width)  # read, not accepted, in arrival order
  accepted: list[tuple[dict[str, Any], dict[str, list]]] = []
  misses = 0
  # Both counted when a record is pulled from the stream (never when it is packed),
  # so skipped / read is the bad fraction of exactly the records read so far.
  read = 0
  skipped = 0
  # Skipped records close a batch too (after B_g + max_misses of them), so a
  # stream of nothing but bad records still yields batches whose counts the
  # trainer can judge instead of reading forever.
  max_skipped = shape.examples + shape.max_misses
  exhausted = False
  while (len(accepted) < shape.examples and misses < shape.max_misses and
         skipped < max_skipped):
    if any(rows[s].full() for s in sides):
      break
    while window.num_open < width and skipped < max_skipped and (queue or not exhausted):
      if queue:
        item = queue.pop()
      else:
        try:
          item = pull()
        except StopIteration:  # a finite stream ran out: pack what was read
          exhausted = True
          break
        read += 1
      if SKIPPED in item[1]:  # a record the pipeline could not decode: counted, never held
        skipped += 1
        continue
      cand = _Candidate(item, shape)
      reason = cand.oversize(shape)
      if reason is not None:  # would never fit: counted like an undecodable record
        logging.log_every_n(logging.WARNING, "skipping a tuple: %s", 100, reason)
        skipped += 1
        continue
      window.add(cand)
    if not window.num_open:
      break
    if accepted and width > 1:
      cand = window.choose(rows, len(accepted))
      if cand is None:  # nothing in the window can fit: make room for a fresh tuple
        window.set_aside(window.oldest_open())
        misses += 1
        continue
    else:  # the first pick of a batch, or strict order: the oldest
      cand = window.oldest_open()
    placed = _place(rows, cand.seqs)
    if placed is None:
      if not accepted and all(int(r.used.sum()) == 0 for r in rows.values()):
        raise AssertionError(
            "a tuple did not fit an empty group batch; GroupShape validation "
            "should have made this impossible.")
      window.set_aside(cand)
      misses += 1
      continue
    window.remove(cand)
    accepted.append((cand.item[1], placed))
  queue.reverse()
  # Untried held-over tuples keep their turn after everything read in this batch.
  new_held = [c.item for c in window.cands] + queue
  out = _assemble(shape, accepted)
  out["num_read"] = np.asarray(read, np.int64)
  out["num_skipped"] = np.asarray(skipped, np.int64)
  return out, new_held


class _Candidate:
  """A tuple the packer has read: its sequences and what it needs of each capacity."""

  __slots__ = ("item", "seqs", "req", "slot")

  def __init__(self, item: Item, shape: GroupShape):
    ex = item[1]
    self.item = item
    self.slot = -1  # its row in the window's matrix
    raw = {s: [(ex[f"{s}_tokens"], ex.get(f"{s}_media", ()))] for s in ("query", "positive")}
    if shape.num_negatives > 0:
      toks = list(ex.get("negative_tokens", ()))[:shape.num_negatives]
      media = list(ex.get("negative_media", ()))[:len(toks)]
      raw["negative"] = list(zip(toks, media + [()] * (len(toks) - len(media))))
    self.seqs = {}  # side -> [(tokens, media, images, audio chunks)]
    tokens, media, longest = [], [], []
    for s in shape.sides:
      ln = shape.side(s).length
      seqs = []
      tot = top = n_img = n_aud = 0
      for toks, m in raw[s]:
        toks = np.asarray(toks)
        _check_tokens(s, toks, ln)
        m = tuple(m)
        i, a = _media_counts(m)
        seqs.append((toks, m, i, a))
        tot += toks.size
        top = max(top, toks.size)
        n_img += i
        n_aud += a
      self.seqs[s] = seqs
      tokens.append(tot)
      longest.append(top)
      media += [n_img, n_aud]
    # What `_Window.choose` compares with the batch's room: tokens per side, (images,
    # audio) per side, then the longest sequence per side.
    self.req = (*tokens, *media, *longest)

  def oversize(self, shape: GroupShape) -> str | None:
    """Why the tuple can never fit an empty group batch (more media than a side has
    slots), or None."""
    n = len(shape.sides)
    for j, s in enumerate(shape.sides):
      ss = shape.side(s)
      n_img, n_aud = self.req[n + 2 * j], self.req[n + 2 * j + 1]
      if n_img > ss.images or n_aud > ss.audio:
        return (f"a tuple's {s} side holds {n_img} images and {n_aud} audio chunks "
                f"but has {ss.images} image and {ss.audio} audio slots per group; "
                f"raise the batch spec's {s}_images / {s}_audio (or leave them None "
                "to be suggested from a sample), or lower the per-input budgets "
                "(video_max_frames, max_audio_chunks)")
    return None


class _Window:
  """The candidates of one batch in arrival order, the open ones (not yet tried in
  this batch) with their needs in one matrix so that choosing is a few array ops."""

  def __init__(self, shape: GroupShape, width: int):
    self.shape = shape
    self.cands: list[_Candidate] = []  # arrival order, open and set aside
    self.num_open = 0
    cap = width + shape.max_misses + 1
    self.req = np.zeros((cap, 4 * len(shape.sides)), np.float64)
    self.order = np.zeros(cap, np.int64)  # arrival number of the slot's candidate
    self.is_open = np.zeros(cap, bool)
    self.by_slot: list[_Candidate | None] = [None] * cap
    self.free_slots = list(range(cap - 1, -1, -1))
    self.arrivals = 0
    # The score's capacities: row tokens per side, then (image, audio) slots per side.
    sides = shape.sides
    total = sum(shape.side(s).rows * shape.side(s).length for s in sides)
    tok_cap = [shape.side(s).rows * shape.side(s).length for s in sides]
    media_cap = [c for s in sides for c in (shape.side(s).images, shape.side(s).audio)]
    self.cap = np.array(tok_cap + [max(c, 1) for c in media_cap], np.float64)
    self.weight = np.array([c / total for c in tok_cap] +
                           [1.0 / len(sides) if c else 0.0 for c in media_cap])
    self.used = np.zeros(3 * len(sides), np.float64)  # scratch of `choose`
    self.room = np.zeros(4 * len(sides), np.float64)

  def add(self, cand: _Candidate):
    # At most W open and max_misses set aside at once, so a slot is always free.
    cand.slot = self.free_slots.pop()
    self.req[cand.slot] = cand.req
    self.order[cand.slot] = self.arrivals
    self.arrivals += 1
    self.is_open[cand.slot] = True
    self.by_slot[cand.slot] = cand
    self.cands.append(cand)
    self.num_open += 1

  def set_aside(self, cand: _Candidate):
    """Tried and did not fit: held over, not offered again in this batch."""
    self.is_open[cand.slot] = False
    self.num_open -= 1

  def remove(self, cand: _Candidate):
    """Accepted."""
    self.set_aside(cand)
    self.by_slot[cand.slot] = None
    self.free_slots.append(cand.slot)
    self.cands.remove(cand)

  def oldest_open(self) -> _Candidate:
    slots = np.flatnonzero(self.is_open)
    return self.by_slot[int(slots[self.order[slots].argmin()])]

  def choose(self, rows: dict[str, "_Rows"], n: int) -> _Candidate | None:
    """The open candidate that keeps the batch closest to full at B_g tuples (the
    module docstring's score; ties: the oldest), among those that can fit; None if
    none can."""
    sides = self.shape.sides
    ns = len(sides)
    used, room = self.used, self.room
    for j, s in enumerate(sides):
      r = rows[s]
      free = np.where(r.used < r.segments, r.free, 0)
      used[j] = self.cap[j] - r.free_total
      room[j] = free.sum()
      room[3 * ns + j] = free.max()  # the longest sequence that fits
      used[ns + 2 * j] = r.images_used
      used[ns + 2 * j + 1] = r.audio_used
      room[ns + 2 * j] = r.side.images - r.images_used
      room[ns + 2 * j + 1] = r.side.audio - r.audio_used
    slots = np.flatnonzero(self.is_open)
    slots = slots[np.argsort(self.order[slots], kind="stable")]
    req = self.req[slots]  # (open, 4 * sides)
    fits = (req <= room).all(1)
    if not fits.any():
      return None
    after = (used + req[:, :3 * ns]) / self.cap
    score = ((after - (n + 1) / self.shape.examples) ** 2) @ self.weight
    score[~fits] = np.inf
    return self.by_slot[int(slots[int(score.argmin())])]


def _place(rows: dict[str, "_Rows"], seqs: dict[str, list]) -> dict[str, list] | None:
  """Places every sequence of a tuple (all sides), or places nothing and returns None."""
  placed: dict[str, list] = {}
  for s, items in seqs.items():
    placed[s] = []
    for toks, media, n_img, n_aud in items:
      spot = rows[s].place(toks.size, n_img, n_aud)
      if spot is None:
        for s2, plist in placed.items():
          for r, _, _, _, _, t2, _, i2, a2 in plist:
            rows[s2].undo(r, t2.size, i2, a2)
        return None
      placed[s].append((*spot, toks, media, n_img, n_aud))
  return placed


def _assemble(shape: GroupShape, accepted) -> dict[str, np.ndarray]:
  b_g, s_max, k = shape.examples, shape.segments, shape.num_negatives
  media_fields = dict(image_shape=shape.image_shape, image_tokens=shape.image_tokens,
                      audio_shape=shape.audio_shape, audio_tokens=shape.audio_tokens,
                      audio_pad=shape.audio_pad)
  out: dict[str, np.ndarray] = {}
  for s in shape.sides:
    ss = shape.side(s)
    rows = RowWriter(ss.rows, ss.length, images=ss.images, audio=ss.audio, **media_fields)
    slot = np.zeros((b_g, k) if s == "negative" else (b_g,), np.int32)
    n_tok = 0
    for b, (_, placed) in enumerate(accepted):
      for j, (r, start, seg, img0, aud0, toks, media, _, _) in enumerate(placed[s]):
        rows.write(r, start, seg, toks, media, image_slot=img0, audio_slot=aud0)
        if s == "negative":
          slot[b, j] = r * s_max + seg
        else:
          slot[b] = r * s_max + seg
        n_tok += toks.size
    out.update(rows.arrays(f"{s}_"))
    if rows.has_media:
      out[f"{s}_num_images"] = np.asarray(rows.n_images, np.int64)
      out[f"{s}_num_audio"] = np.asarray(rows.n_audio, np.int64)
    out[f"{s}_slot"] = slot
    out[f"{s}_num_tokens"] = np.asarray(n_tok, np.int64)
    out[f"{s}_num_truncated"] = np.asarray(
        sum(int(ex.get(f"{s}_truncated", 0)) for ex, _ in accepted), np.int64)
  n = len(accepted)
  valid = np.zeros((b_g,), bool)
  valid[:n] = True
  out["example_valid"] = valid
  if k > 0:
    neg_valid = np.zeros((b_g, k), bool)
    for b, (_, placed) in enumerate(accepted):
      neg_valid[b, :len(placed["negative"])] = True
    out["negative_valid"] = neg_valid
  qid = np.full((b_g,), -1, np.int32)
  pid = np.full((b_g,), -1, np.int32)
  task = np.full((b_g,), -1, np.int32)
  for b, (ex, _) in enumerate(accepted):
    qid[b] = _fold_id(ex["query_id"])
    pid[b] = _fold_id(ex["positive_id"])
    task[b] = int(ex.get("task_index", 0))
  out["query_ids"] = qid
  out["positive_ids"] = pid
  out["example_task"] = task
  out["num_examples"] = np.asarray(n, np.int64)
  return out


def concat_groups(shape: GroupShape,
                  group_batches: Sequence[dict[str, np.ndarray]]
                  ) -> dict[str, np.ndarray]:
  """Joins group batches (in group order) into one batch and adds the stats.

  Arrays are concatenated along axis 0 (rows for `{s}_tokens/segment_ids/positions`,
  examples for the rest); slots stay per-group indices. Count stats are summed and
  the fractions computed over the joined batch. One group's arrays are the batch's
  as they are, not copied (a batch of 8 videos holds 64 frames, ~150 MB at 896 px):
  `pack_group` makes new arrays for every group batch, and the batch is their
  only user.

  Args:
    shape: the groups' shared shape.
    group_batches: outputs of `pack_group`, group g at position g.

  Returns:
    The batch dict of the module docstring (arrays plus 0-d stats).
  """
  out: dict[str, np.ndarray] = {}
  for key in group_batches[0]:
    vals = [gb[key] for gb in group_batches]
    if vals[0].ndim == 0:
      out[key] = np.asarray(sum(int(v) for v in vals), np.int64)
    elif len(vals) == 1:
      out[key] = vals[0]
    else:
      out[key] = np.concatenate(vals, axis=0)
  total_tok, total_trunc = 0, 0
  for s in shape.sides:
    ss = shape.side(s)
    cap = len(group_batches) * ss.rows * ss.length
    out[f"{s}_nonpad_fraction"] = np.asarray(
        int(out[f"{s}_num_tokens"]) / cap, np.float64)
    total_tok += int(out[f"{s}_num_tokens"])
    total_trunc += int(out[f"{s}_num_truncated"])
  out["num_tokens"] = np.asarray(total_tok, np.int64)
  out["num_truncated"] = np.asarray(total_trunc, np.int64)
  out["example_fill"] = np.asarray(
      int(out["num_examples"]) / (len(group_batches) * shape.examples),
      np.float64)
  return out


def batch_stats(batch: dict[str, np.ndarray]) -> dict[str, float]:
  """The batch's logging stats (its 0-d entries) as Python numbers."""
  return {k: v.item() for k, v in batch.items() if np.ndim(v) == 0}


def model_inputs(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The batch without its logging stats (the arrays the train step takes)."""
  return {k: v for k, v in batch.items() if np.ndim(v) > 0}
