"""Offline multimodal tasks, generated procedurally with a fixed seed: images, audio, video, edits.

The demo must train and evaluate every modality pair with no downloads, so its media come from small
generators. Five tasks (the keys of `MEDIA_TASKS`):

  shapes_caption    caption -> image of 1-3 shapes of one colour in one place
                    "two red circles at the top left"          (text->image; reversed: image->text)
  tone_description  audio of 2-5 tones -> their description
                    "four buzzy tones rising, low pitch, fast"  (audio->text)
  moving_shapes     video of one moving shape, some with a beep track -> its description
                    "a blue square moving up with a high beep"  (video->text)
  image_edit        [image, "make them green"] -> the edited image; hard negatives: the original and
                    another edit of it                          (interleaved->image)
  tone_spelling     audio of a word spelled in a tone alphabet (one pitch per letter) ->
                    "word: kabo", the offline analogue of native audio vs its transcript
                                                                (audio->text)

A builder `fn(split)` returns a `GeneratedTask`: a random-access sequence whose example i is made
on demand from (seed, task, split, i) alone, so a 20,000-example train split holds nothing in memory
and any worker can make any example. Examples are the dicts every task source gives:

  {"query": side, "positive": side, "negatives": [side, ...], "query_id": int, "positive_id": int,
   "group": str}

where a side is a str, an `embed2.data.segments` item made from arrays (Image(pixels=uint8
(H, W, 3)), Audio(samples=float32 (T,), sample_rate=8000), Video(frames=uint8 (T, H, W, 3), fps,
audio)), or a list of those (an interleaved input). Ids are content hashes (`content_id_of`): equal
content, equal id, so a caption shared by several images is one document when the eval deduplicates
by id. Text ids are `stdlib_tasks.content_id`, the same as the text tasks'.

Holding out: each task's content is an attribute tuple (`ShapeScene`, `ToneSequence`, `VideoScene`,
a word). The tuples are ranked by a fixed hash and the first `*_EVAL_FRACTION` of them are eval, the
rest train (independent of the seed), so no eval caption, description or word occurs in training;
train and eval instances (sizes, shades, jitter, onsets, noise) also come from different seeds.
`shapes_caption` and `image_edit` share one split of the shape scenes, and an edit is used only when
the original and the edited scene are on the same side, so no eval scene is ever seen in training by
either task. Each attribute value occurs on both sides; eval scenes are new combinations of them.

Sizes are chosen for the demo model (32x32 images in 8x8 patches, 32 mel bands at 8 kHz, 100 frames
per second): large shapes in saturated colours on a plain grey background; tones of >= 0.15 s, 4
semitones or more apart, with clean 8 ms ramps and faint noise; and attribute spaces small enough to
learn in a few hundred steps, yet with >= 100 distinct eval targets per task (`eval_targets`).

Usage:
  from data_pipelines import media_tasks
  train = media_tasks.MEDIA_TASKS["shapes_caption"]("train")   # GeneratedTask, len 20000
  train[7]["positive"].pixels                                  # uint8 (S, S, 3), S in 32..64
"""
from __future__ import annotations

import collections.abc
import functools
import hashlib
import itertools
import operator
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from data_pipelines import stdlib_tasks
from embed2.data import segments

SPLITS = ("train", "eval")
_SPLIT_CODE = {"train": 0, "eval": 1}
SAMPLE_RATE = 8000  # Hz, every generated waveform
TRAIN_SIZE = 20_000

# Shares of each attribute space held out for eval. The tone space is the smallest (216
# descriptions), so half of it is held out to keep >= 100 eval descriptions; its train half still
# holds every attribute value dozens of times.
SHAPES_EVAL_FRACTION = 0.25
VIDEO_EVAL_FRACTION = 0.25
TONES_EVAL_FRACTION = 0.5
WORDS_EVAL_FRACTION = 0.2

COUNT_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}


def _a(word: str) -> str:
  """`word` with its indefinite article: "a red", "an orange"."""
  return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"

# ------------------------------------------------------------------------------------------------
# Ids, splits and the random-access sequence.
# ------------------------------------------------------------------------------------------------


def _bytes_view(a: np.ndarray) -> memoryview:
  """The bytes of a C-contiguous array, as tobytes() gives them, without copying. `_feed` hashes a
  header, then these: the same stream as header + tobytes() (hashing is incremental), so the ids are
  unchanged and the array is not copied twice."""
  return memoryview(a.reshape(-1).view(np.uint8))


def _feed(h, side: Any) -> None:
  """Feeds one side (or part of one) into hash `h`, type-tagged so no two kinds collide."""
  if isinstance(side, (str, segments.Text)):
    data = (side if isinstance(side, str) else side.text).encode("utf-8")
    h.update(b"s%d:" % len(data) + data)
  elif isinstance(side, segments.Image) and side.pixels is not None:
    p = np.ascontiguousarray(side.pixels)
    h.update(f"i{p.shape}{p.dtype.str}:".encode())
    h.update(_bytes_view(p))
  elif isinstance(side, segments.Audio) and side.samples is not None:
    s = np.ascontiguousarray(side.samples)
    h.update(f"a{side.sample_rate}{s.shape}{s.dtype.str}:".encode())
    h.update(_bytes_view(s))
  elif isinstance(side, segments.Video) and side.frames is not None:
    f = np.ascontiguousarray(side.frames)
    h.update(f"v{float(side.fps)!r}{f.shape}{f.dtype.str}:".encode())
    h.update(_bytes_view(f))
    if side.audio is None:
      h.update(b"-")
    else:
      _feed(h, side.audio)
  elif isinstance(side, (list, tuple)):
    h.update(b"l%d:" % len(side))
    for part in side:
      _feed(h, part)
  else:
    raise TypeError(f"content_id_of takes str, Text, array-backed Image / Audio / Video items or a "
                    f"list of them; got {type(side).__name__} (file-backed items have no content "
                    "here to hash; load them first)")


def content_id_of(side: Any) -> int:
  """Stable 31-bit id of a side's content: equal content (pixels, samples, frames, text), equal id.

  A plain str (or Text) gets `stdlib_tasks.content_id(text)`, the text tasks' id; media and lists
  hash their arrays with their shapes, dtypes and rates (blake2b, never Python's salted `hash`).
  """
  if isinstance(side, str):
    return stdlib_tasks.content_id(side)
  if isinstance(side, segments.Text):
    return stdlib_tasks.content_id(side.text)
  h = hashlib.blake2b(digest_size=8, person=b"embed2media")
  _feed(h, side)
  return int.from_bytes(h.digest(), "little") & 0x7FFFFFFF


def _stable_u32(text: str) -> int:
  return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "little")


def _holdout(items: Sequence[Any], fraction: float, salt: str) -> tuple[tuple, tuple]:
  """(train items, eval items), each in the original order: the eval side is the
  round(fraction * n) items that rank first by a keyed hash of repr(item), so the split is fixed
  and exact in size."""
  digest = lambda x: hashlib.blake2b(repr(x).encode(), digest_size=8, key=salt.encode()).digest()
  held = set(sorted(items, key=digest)[:round(fraction * len(items))])
  return tuple(x for x in items if x not in held), tuple(x for x in items if x in held)


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"split={split!r} is unknown; pick one of {SPLITS}")


class GeneratedTask(collections.abc.Sequence):
  """Random-access examples made on demand: example i depends only on (seed, name, split, i).

  `len()` and `task[i]` (negative i and slices too) are all a `grain.MapDataset.source` needs;
  indexing the same i twice gives equal arrays. Picklable when `make` is (module functions and
  `functools.partial`s of them are), so grain worker processes can make examples themselves.

  Attributes:
    name, split, size, seed: what the task is.
    key: the int words every random stream of this task and split starts from.
  """

  def __init__(self, *, name: str, split: str, size: int, seed: int,
               make: Callable[[GeneratedTask, int], dict[str, Any]]):
    _check_split(split)
    if size < 0:
      raise ValueError(f"{name}: size={size} must be >= 0")
    self.name, self.split, self.size, self.seed = name, split, size, seed
    self.key = (int(seed), _stable_u32(name), _SPLIT_CODE[split])
    self._make = make

  def rng(self, stream: int, index: int) -> np.random.Generator:
    """The generator of `index` in `stream` (0: per example; 1: per eval base instance)."""
    return np.random.default_rng([*self.key, stream, index])

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(self.size))]
    i = operator.index(i)
    j = i + self.size if i < 0 else i
    if not 0 <= j < self.size:
      raise IndexError(f"{self.name} {self.split}: index {i} out of range for {self.size} examples")
    return self._make(self, j)

  def __repr__(self) -> str:
    return (f"GeneratedTask(name={self.name!r}, split={self.split!r}, size={self.size}, "
            f"seed={self.seed})")


def _example(query, positive, negatives, group: str) -> dict[str, Any]:
  return {"query": query, "positive": positive, "negatives": list(negatives),
          "query_id": content_id_of(query), "positive_id": content_id_of(positive), "group": group}


@functools.lru_cache(maxsize=4096)
def _neighbours(x: NamedTuple, allowed: frozenset, values: tuple[tuple[str, tuple], ...]) -> tuple:
  """The tuples of `allowed` one field away from `x`, fields in order, values in order (cached: the
  attribute spaces are small and the same few `allowed` sets come back every example)."""
  options = (x._replace(**{f: v}) for f, vs in values for v in vs if v != getattr(x, f))
  return tuple(o for o in options if o in allowed)


def _neighbour(x: NamedTuple, allowed: frozenset, values: dict[str, tuple], rng) -> Any | None:
  """A random tuple of `allowed` that differs from `x` in exactly one field (a hard negative's
  content), or None if there is none."""
  options = _neighbours(x, allowed, tuple((f, tuple(values[f])) for f in x._fields))
  return options[rng.integers(len(options))] if options else None


# ------------------------------------------------------------------------------------------------
# Images: shapes, colours, positions, counts.
# ------------------------------------------------------------------------------------------------

COLOURS = {  # saturated, far apart in RGB, all clear of the grey backgrounds (shade 20..110)
    "red": (230, 30, 30), "green": (30, 200, 50), "blue": (40, 80, 255), "yellow": (245, 225, 30),
    "purple": (165, 50, 225), "orange": (255, 140, 0), "white": (250, 250, 250)}
SHAPES = ("circle", "square", "triangle", "cross")
_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "centre")
_POSITION_PHRASE = {"top left": "at the top left", "top right": "at the top right",
                    "bottom left": "at the bottom left", "bottom right": "at the bottom right",
                    "centre": "in the centre"}
# Cluster centre (x, y) as a fraction of the side: corners at the quadrant centres.
_POSITION_XY = {"top left": (0.255, 0.255), "top right": (0.745, 0.255),
                "bottom left": (0.255, 0.745), "bottom right": (0.745, 0.745), "centre": (0.5, 0.5)}
# Per count: shape diameter and shape centres relative to the cluster centre (fractions of the
# side). A cluster reaches <= 0.225 from its centre (+ 0.01 jitter), so it stays in its quadrant.
_LAYOUT = {1: (0.34, ((0.0, 0.0),)),
           2: (0.21, ((-0.12, 0.0), (0.12, 0.0))),
           3: (0.20, ((-0.115, -0.105), (0.115, -0.105), (0.0, 0.105)))}
IMAGE_SIDES = (32, 40, 48, 56, 64)


class ShapeScene(NamedTuple):
  """What an image shows: `count` shapes of one kind and colour at one position."""
  count: int
  colour: str
  shape: str
  position: str

  def caption(self) -> str:
    if self.count == 1:
      return f"{_a(self.colour)} {self.shape} {_POSITION_PHRASE[self.position]}"
    return (f"{COUNT_WORDS[self.count]} {self.colour} {_PLURAL[self.shape]} "
            f"{_POSITION_PHRASE[self.position]}")


_SCENE_VALUES = {"count": (1, 2, 3), "colour": tuple(COLOURS), "shape": SHAPES,
                 "position": POSITIONS}
ALL_SCENES = tuple(ShapeScene(*v) for v in itertools.product(*_SCENE_VALUES.values()))  # 420


@functools.cache
def scene_split() -> dict[str, tuple[ShapeScene, ...]]:
  """{"train": scenes, "eval": scenes}: 315 / 105 of the 420, shared by shapes_caption and
  image_edit."""
  train, held = _holdout(ALL_SCENES, SHAPES_EVAL_FRACTION, "shapes")
  return {"train": train, "eval": held}


class ImageInstance(NamedTuple):
  """How a scene is drawn, apart from what it shows: one per example (per base in image_edit)."""
  side: int  # native image side, pixels
  background: int  # grey shade, 0..255
  scale: float  # shape size factor
  jitter: tuple[float, float]  # cluster offset (x, y), fraction of the side


def _image_instance(rng: np.random.Generator) -> ImageInstance:
  return ImageInstance(side=int(rng.choice(IMAGE_SIDES)), background=int(rng.integers(20, 111)),
                       scale=float(rng.uniform(0.9, 1.0)),
                       jitter=(float(rng.uniform(-0.01, 0.01)), float(rng.uniform(-0.01, 0.01))))


def shape_mask(shape: str, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float
               ) -> np.ndarray:
  """bool mask of `shape` with centre (cx, cy) and half-size r (pixels) on pixel-centre grids."""
  dx, dy = np.abs(xx - cx), yy - cy
  if shape == "circle":
    return dx ** 2 + dy ** 2 <= r ** 2
  if shape == "square":  # side 1.7 r: about the circle's area
    return (dx <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
  if shape == "triangle":  # apex up, base 2r at the bottom
    return (dy >= -r) & (dy <= r) & (dx <= (dy + r) / 2)
  if shape == "cross":  # a plus sign, arms r / 3 half-wide
    ady, arm = np.abs(dy), r / 3
    return ((dx <= r) & (ady <= arm)) | ((ady <= r) & (dx <= arm))
  raise ValueError(f"shape={shape!r} is unknown; pick one of {SHAPES}")


def draw_scene(scene: ShapeScene, inst: ImageInstance) -> np.ndarray:
  """The image of `scene`: uint8 (side, side, 3), shapes in COLOURS[scene.colour] on grey."""
  s = inst.side
  yy, xx = np.mgrid[0:s, 0:s] + 0.5
  diameter, offsets = _LAYOUT[scene.count]
  r = diameter * inst.scale * s / 2
  px, py = _POSITION_XY[scene.position]
  mask = np.zeros((s, s), bool)
  for ox, oy in offsets:
    cx, cy = (px + ox + inst.jitter[0]) * s, (py + oy + inst.jitter[1]) * s
    mask |= shape_mask(scene.shape, xx, yy, cx, cy, r)
  img = np.full((s, s, 3), inst.background, np.uint8)
  img[mask] = COLOURS[scene.colour]
  return img


def _make_shapes_caption(task: GeneratedTask, i: int) -> dict[str, Any]:
  scenes = scene_split()[task.split]
  rng = task.rng(0, i)
  # Eval cycles through its scenes so every held-out caption is a query; train samples them.
  scene = scenes[i % len(scenes)] if task.split == "eval" else scenes[rng.integers(len(scenes))]
  inst = _image_instance(rng)
  # Hard negative: the same drawing with one attribute changed (a scene of the same split).
  other = _neighbour(scene, frozenset(scenes), _SCENE_VALUES, rng)
  negatives = [] if other is None else [segments.Image(pixels=draw_scene(other, inst))]
  return _example(scene.caption(), segments.Image(pixels=draw_scene(scene, inst)), negatives,
                  group=scene.caption())


def shapes_caption(split: str, *, seed: int = 0, train_size: int = TRAIN_SIZE,
                   eval_per_caption: int = 3) -> GeneratedTask:
  """Caption (str) -> Image of the scene; negatives: [the same drawing with one attribute changed].

  Args:
    split: "train" (`train_size` examples, scenes sampled) or "eval" (`eval_per_caption` x 105
      examples: every held-out caption with that many different drawings).
    seed: instance seed (sizes, shades, jitter); the scene split does not depend on it.
  """
  _check_split(split)
  size = train_size if split == "train" else eval_per_caption * len(scene_split()["eval"])
  return GeneratedTask(name="shapes_caption", split=split, size=size, seed=seed,
                       make=_make_shapes_caption)


# ------------------------------------------------------------------------------------------------
# image_edit: [image, instruction] -> the edited image.
# ------------------------------------------------------------------------------------------------


class Edit(NamedTuple):
  """One edit of a scene: set `field` (colour / position / shape / count) to `value`."""
  field: str
  value: Any

  def apply(self, scene: ShapeScene) -> ShapeScene:
    return scene._replace(**{self.field: self.value})

  def instruction(self, scene: ShapeScene) -> str:
    """The text instruction that turns `scene` into `self.apply(scene)`."""
    it = "it" if scene.count == 1 else "them"
    if self.field == "colour":
      return f"make {it} {self.value}"
    if self.field == "position":
      return f"move {it} to the {self.value}"
    if self.field == "shape":
      noun = f"a {self.value}" if scene.count == 1 else _PLURAL[self.value]
      return f"turn {it} into {noun}"
    return "add one more" if self.value > scene.count else "remove one"


def edits_of(scene: ShapeScene) -> tuple[Edit, ...]:
  """Every edit of `scene`: 6 colours, 4 positions, 3 shapes, and one more / one fewer."""
  out = [Edit(f, v) for f in ("colour", "position", "shape") for v in _SCENE_VALUES[f]
         if v != getattr(scene, f)]
  out += [Edit("count", n) for n in (scene.count + 1, scene.count - 1) if n in _LAYOUT]
  return tuple(out)


@functools.cache
def edit_pairs(split: str) -> tuple[tuple[int, Edit], ...]:
  """(index of the base scene in scene_split()[split], edit) for every edit whose result is a
  scene of the same split, so neither image of an eval pair is a train scene."""
  scenes = scene_split()[split]
  allowed = frozenset(scenes)
  return tuple((b, e) for b, scene in enumerate(scenes) for e in edits_of(scene)
               if e.apply(scene) in allowed)


def _make_image_edit(task: GeneratedTask, i: int) -> dict[str, Any]:
  scenes = scene_split()[task.split]
  allowed = frozenset(scenes)
  rng = task.rng(0, i)
  if task.split == "eval":
    # All edits of one base scene share one drawing, so the corpus holds several edits of each
    # original and only the instruction tells them apart.
    b, edit = edit_pairs("eval")[i]
    inst = _image_instance(task.rng(1, b))
  else:
    while True:  # a base with no same-split edit is (vanishingly) rare; draw again
      b = int(rng.integers(len(scenes)))
      options = [e for e in edits_of(scenes[b]) if e.apply(scenes[b]) in allowed]
      if options:
        break
    edit = options[rng.integers(len(options))]
    inst = _image_instance(rng)
  base = scenes[b]
  original = segments.Image(pixels=draw_scene(base, inst))
  negatives = [original]
  others = [e for e in edits_of(base) if e != edit and e.apply(base) in allowed]
  if others:
    other = others[rng.integers(len(others))]
    negatives.append(segments.Image(pixels=draw_scene(other.apply(base), inst)))
  target = segments.Image(pixels=draw_scene(edit.apply(base), inst))
  return _example([original, edit.instruction(base)], target, negatives, group=base.caption())


def image_edit(split: str, *, seed: int = 0, train_size: int = TRAIN_SIZE) -> GeneratedTask:
  """[Image(original), instruction str] -> Image(edited); negatives: [original, another edit].

  Instructions: "make it green" / "make them green", "move it to the top left", "turn them into
  crosses", "add one more", "remove one". The edited image is the same drawing (size, shade,
  jitter) of the edited scene.

  Args:
    split: "train" (`train_size` examples) or "eval" (every same-split edit of every eval scene,
      `len(edit_pairs("eval"))` examples).
    seed: instance seed; the scene split does not depend on it.
  """
  _check_split(split)
  size = train_size if split == "train" else len(edit_pairs("eval"))
  return GeneratedTask(name="image_edit", split=split, size=size, seed=seed, make=_make_image_edit)


# ------------------------------------------------------------------------------------------------
# Audio: tones.
# ------------------------------------------------------------------------------------------------

_RAMP_S = 0.008  # attack / release: no clicks, so the spectrum of a tone is its pitch
_MAX_HARMONIC_HZ = 3800.0  # below Nyquist (4 kHz), so buzzy tones do not alias


# Samples per row of the phase table in `_phasors`; the index tables are built once.
_PHASE_BLOCK = 64
_FINE_R = np.arange(_PHASE_BLOCK, dtype=np.float64)
_COARSE_Q = _PHASE_BLOCK * np.arange(4096, dtype=np.float64)  # tones up to 262144 samples share it


def _phasors(freqs_hz: np.ndarray, n: int, sample_rate: int) -> np.ndarray:
  """complex128 (N, n): exp(2 pi i f_j k / sample_rate) for each of the N frequencies and k < n.

  exp(i w k) = exp(i w B q) exp(i w r) with k = B q + r (B = _PHASE_BLOCK): N (n / B + B) complex
  exponentials and N n complex products instead of N n exponentials (an exponential costs ~30 ns a
  sample here, a product ~1 ns; the generators are on the data pipeline's hot path). The error stays
  at the ~1e-12 rad of rounding the phase w k itself, as with one exponential per sample.
  """
  w_n1 = (2.0 * np.pi / sample_rate) * freqs_hz[:, None]  # radians per sample
  q = -(-n // _PHASE_BLOCK)
  coarse = _COARSE_Q[:q] if q <= _COARSE_Q.size else _PHASE_BLOCK * np.arange(q, dtype=np.float64)
  fine_nb = np.exp(1j * (w_n1 * _FINE_R))
  coarse_nq = np.exp(1j * (w_n1 * coarse))
  z_nqb = coarse_nq[:, :, None] * fine_nb[:, None, :]
  return z_nqb.reshape(len(freqs_hz), q * _PHASE_BLOCK)[:, :n]


@functools.lru_cache(maxsize=8)
def _ramp_up(ramp: int) -> np.ndarray:
  env = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp) / ramp)
  env.setflags(write=False)
  return env


def _harmonic_sums(z_nt: np.ndarray, num_k: np.ndarray) -> np.ndarray:
  """float64 (N, n): sum_{k=1..num_k[j]} sin(k x) / k for z_nt[j] = e^{ix}.

  Clenshaw's recurrence on sin(k x) = 2 cos(x) sin((k-1) x) - sin((k-2) x): b_k = 1 / k + 2 cos(x)
  b_{k+1} - b_{k+2} (b = 0 above a row's own K), the sum is b_1 sin(x); three real array ops a harmonic
  instead of one sine a harmonic and sample (rounding ~1e-14). Rows are taken in descending K, so
  step k works on the prefix of rows that have harmonic k and adds a scalar.
  """
  order = np.argsort(-num_k, kind="stable")
  k_sorted = num_k[order]
  z_sorted = z_nt[order]
  c2_nt = 2.0 * z_sorted.real
  top = int(k_sorted[0])
  # rows[k] = rows with K >= k: a prefix, growing as k falls.
  rows = np.searchsorted(-k_sorted, -np.arange(top + 1), side="right").tolist()
  b1, b2, tmp = np.zeros_like(c2_nt), np.zeros_like(c2_nt), np.zeros_like(c2_nt)
  b1[:rows[top]] = 1.0 / top
  for k in range(top - 1, 0, -1):
    m = rows[k]
    np.multiply(c2_nt[:m], b1[:m], out=tmp[:m])
    tmp[:m] -= b2[:m]
    tmp[:m] += 1.0 / k
    b1, b2, tmp = tmp, b1, b2
  out_nt = np.empty_like(b1)
  out_nt[order] = b1 * z_sorted.imag
  return out_nt


def tones(freqs_hz: Sequence[float] | np.ndarray, duration_s: float, *, buzzy: bool = False,
          sample_rate: int = SAMPLE_RATE) -> np.ndarray:
  """Tones of one length, one per frequency: float64 (N, round(duration_s * sample_rate)), row j
  `tone(freqs_hz[j], duration_s, buzzy=buzzy)`, all rows made at once."""
  f_n = np.asarray(freqs_hz, np.float64).reshape(-1)
  n = int(round(duration_s * sample_rate))
  z_nt = _phasors(f_n, n, sample_rate)
  num_k = np.maximum(1, (_MAX_HARMONIC_HZ // f_n).astype(np.int64)) if buzzy else np.ones(1, np.int64)
  top = int(num_k.max())
  wave_nt = np.ascontiguousarray(z_nt.imag) if top == 1 else _harmonic_sums(z_nt, num_k)
  wave_nt /= np.maximum(np.abs(wave_nt).max(axis=1, keepdims=True), 1e-9)
  ramp = min(int(_RAMP_S * sample_rate), n // 2)
  if ramp:
    env = _ramp_up(ramp)
    wave_nt[:, :ramp] *= env
    wave_nt[:, n - ramp:] *= env[::-1]
  return wave_nt


def tone(freq_hz: float, duration_s: float, *, buzzy: bool = False,
         sample_rate: int = SAMPLE_RATE) -> np.ndarray:
  """One tone: float64 (round(duration_s * sample_rate),), peak 1, raised-cosine ramps.

  Pure: a sine at `freq_hz`. Buzzy: harmonics k * freq_hz below 3.8 kHz with amplitude 1 / k (a
  band-limited sawtooth), so its strongest peak is still the pitch.
  """
  return tones([freq_hz], duration_s, buzzy=buzzy, sample_rate=sample_rate)[0]


def _mix(notes: Sequence[tuple[float, np.ndarray]], total_s: float, amplitude: float, noise: float,
         rng: np.random.Generator) -> np.ndarray:
  """Waveform float32 (round(total_s * SAMPLE_RATE),) in [-1, 1]: `notes` (start s, wave) scaled by
  `amplitude`, plus white noise of std `noise`."""
  # Exactly rng.normal(0.0, noise, size) (numpy computes it as 0.0 + noise * z from the same draws),
  # without its slower per-element broadcasting path.
  out = rng.standard_normal(int(round(total_s * SAMPLE_RATE)))
  out *= noise
  for start_s, wave in notes:
    a = int(round(start_s * SAMPLE_RATE))
    out[a:a + len(wave)] += amplitude * wave[:len(out) - a]
  np.clip(out, -1.0, 1.0, out=out)
  return out.astype(np.float32)


def _audio(samples: np.ndarray) -> segments.Audio:
  return segments.Audio(samples=samples, sample_rate=SAMPLE_RATE)


# tone_description's attributes.
CONTOURS = ("rising", "falling", "at one pitch", "rising then falling", "falling then rising")
REGISTERS = {"low": 280.0, "middle": 560.0, "high": 1120.0}  # centre pitch, Hz: octaves apart
TEMPOS = {"fast": (0.15, 0.035), "slow": (0.21, 0.09)}  # (tone s, gap s)
# Clips stay under 1.5 s (151 mel frames at a 10 ms hop, 2 chunks of 100) with the last tone whole.
MAX_CLIP_SECONDS = 1.48
TIMBRES = ("pure", "buzzy")
CONTOUR_STEP_SEMITONES = 4.0  # between neighbouring tones: >= 1 mel band even in the low register


class ToneSequence(NamedTuple):
  """What a tone clip is: `count` tones of one timbre following a contour around a register."""
  count: int
  timbre: str
  contour: str
  register: str
  tempo: str

  def description(self) -> str:
    return (f"{COUNT_WORDS[self.count]} {self.timbre} tones {self.contour}, {self.register} pitch, "
            f"{self.tempo}")

  def semitones(self) -> np.ndarray:
    """float64 (count,) pitch offsets from the register centre, centred on it."""
    k = np.arange(self.count, dtype=np.float64)
    peak = np.minimum(k, 2 * (self.count // 2) - k)  # 0 1 0 / 0 1 2 1 / 0 1 2 1 0
    offsets = {"rising": k, "falling": k[::-1], "at one pitch": 0 * k,
               "rising then falling": peak, "falling then rising": -peak}[self.contour]
    offsets = offsets * CONTOUR_STEP_SEMITONES
    return offsets - (offsets.max() + offsets.min()) / 2

  def frequencies(self) -> np.ndarray:
    """float64 (count,) tone pitches, Hz (before an instance's detune)."""
    return REGISTERS[self.register] * 2.0 ** (self.semitones() / 12)


_TONE_VALUES = {"count": (2, 3, 4, 5), "timbre": TIMBRES, "contour": CONTOURS,
                "register": tuple(REGISTERS), "tempo": tuple(TEMPOS)}
# Up-then-down needs three tones; 18 (count, contour) pairs x 2 x 3 x 2 = 216 descriptions.
ALL_TONE_SEQUENCES = tuple(
    t for t in (ToneSequence(*v) for v in itertools.product(*_TONE_VALUES.values()))
    if t.count >= 3 or t.contour in ("rising", "falling", "at one pitch"))


@functools.cache
def tone_split() -> dict[str, tuple[ToneSequence, ...]]:
  """{"train": sequences, "eval": sequences}: 108 / 108 of the 216."""
  train, held = _holdout(ALL_TONE_SEQUENCES, TONES_EVAL_FRACTION, "tones")
  return {"train": train, "eval": held}


@functools.cache
def _tone_set(split: str) -> frozenset:
  return frozenset(tone_split()[split])


def render_tones(seq: ToneSequence, rng: np.random.Generator) -> np.ndarray:
  """A clip of `seq`: float32 (T,) at SAMPLE_RATE, 0.6-1.48 s; random lead-in, detune (+-0.3
  semitone), loudness and faint noise."""
  tone_s, gap_s = TEMPOS[seq.tempo]
  lead_s = rng.uniform(0.02, 0.05)
  detune = 2.0 ** (rng.uniform(-0.3, 0.3) / 12)
  waves = tones(seq.frequencies() * detune, tone_s, buzzy=seq.timbre == "buzzy")
  notes = [(lead_s + j * (tone_s + gap_s), wave) for j, wave in enumerate(waves)]
  end_s = notes[-1][0] + tone_s
  total_s = min(MAX_CLIP_SECONDS, max(0.6, end_s + rng.uniform(0.02, 0.05)))
  return _mix(notes, total_s, rng.uniform(0.35, 0.8), rng.uniform(0.0, 0.004), rng)


def _make_tone_description(task: GeneratedTask, i: int) -> dict[str, Any]:
  seqs = tone_split()[task.split]
  rng = task.rng(0, i)
  seq = seqs[i % len(seqs)] if task.split == "eval" else seqs[rng.integers(len(seqs))]
  wave = render_tones(seq, rng)
  other = _neighbour(seq, _tone_set(task.split), _TONE_VALUES, rng)
  negatives = [] if other is None else [other.description()]
  return _example(_audio(wave), seq.description(), negatives, group=seq.description())


def tone_description(split: str, *, seed: int = 0, train_size: int = TRAIN_SIZE,
                     eval_per_description: int = 3) -> GeneratedTask:
  """Audio of 2-5 tones -> its description (str); negatives: [a description one attribute off].

  Args:
    split: "train" (`train_size` examples) or "eval" (`eval_per_description` x 108 examples).
    seed: instance seed (lead-in, detune, loudness, noise).
  """
  _check_split(split)
  size = train_size if split == "train" else eval_per_description * len(tone_split()["eval"])
  return GeneratedTask(name="tone_description", split=split, size=size, seed=seed,
                       make=_make_tone_description)


# tone_spelling: a tone alphabet, one pitch per letter, 4 semitones apart (250 Hz .. 2.5 kHz).
ALPHABET = "abdeiklmost"
LETTER_HZ = {c: 250.0 * 2.0 ** (4 * k / 12) for k, c in enumerate(ALPHABET)}
LETTER_S, LETTER_GAP_S = 0.15, 0.05
_CONSONANTS, _VOWELS = "bdklmst", "aeio"
_WORD_PATTERNS = (("cvc", 150), ("cvcv", 120), ("vcvc", 105), ("cvcvc", 225))


@functools.cache
def vocabulary() -> tuple[str, ...]:
  """600 pronounceable words of 3-5 letters over ALPHABET (consonant-vowel patterns, so no letter
  repeats back to back), sorted; fixed, not seeded."""
  rng = np.random.default_rng(_stable_u32("tone_spelling vocabulary"))
  words = []
  for pattern, n in _WORD_PATTERNS:
    letters = [_CONSONANTS if p == "c" else _VOWELS for p in pattern]
    every = sorted("".join(w) for w in itertools.product(*letters))
    words += [every[j] for j in rng.choice(len(every), n, replace=False)]
  return tuple(sorted(words))


@functools.cache
def word_split() -> dict[str, tuple[str, ...]]:
  """{"train": words, "eval": words}: 480 / 120 of the vocabulary."""
  train, held = _holdout(vocabulary(), WORDS_EVAL_FRACTION, "words")
  return {"train": train, "eval": held}


@functools.cache
def _words_by_length(split: str) -> dict[int, tuple[str, ...]]:
  """Word length -> the split's words of that length, in split order."""
  out: dict[int, list[str]] = {}
  for w in word_split()[split]:
    out.setdefault(len(w), []).append(w)
  return {n: tuple(ws) for n, ws in out.items()}


def spell(word: str, rng: np.random.Generator) -> np.ndarray:
  """`word` in the tone alphabet: float32 (T,) at SAMPLE_RATE, one LETTER_S sine per letter at
  LETTER_HZ (detuned by +-0.2 semitone), LETTER_GAP_S apart after a random lead-in; >= 0.6 s."""
  lead_s = rng.uniform(0.03, 0.12)
  detune = 2.0 ** (rng.uniform(-0.2, 0.2) / 12)
  waves = tones(np.array([LETTER_HZ[c] for c in word]) * detune, LETTER_S)
  notes = [(lead_s + j * (LETTER_S + LETTER_GAP_S), wave) for j, wave in enumerate(waves)]
  total_s = max(0.6, notes[-1][0] + LETTER_S + rng.uniform(0.02, 0.06))
  return _mix(notes, total_s, rng.uniform(0.35, 0.8), rng.uniform(0.0, 0.004), rng)


def _word_text(word: str) -> str:
  return f"word: {word}"


def _make_tone_spelling(task: GeneratedTask, i: int) -> dict[str, Any]:
  words = word_split()[task.split]
  rng = task.rng(0, i)
  word = words[i % len(words)] if task.split == "eval" else words[rng.integers(len(words))]
  same_len = [w for w in _words_by_length(task.split)[len(word)] if w != word]
  negative = same_len[rng.integers(len(same_len))]
  return _example(_audio(spell(word, rng)), _word_text(word), [_word_text(negative)], group=word)


def tone_spelling(split: str, *, seed: int = 0, train_size: int = TRAIN_SIZE,
                  eval_per_word: int = 2) -> GeneratedTask:
  """Audio of a spelled word -> "word: <word>"; negatives: [another word of the same length].

  Args:
    split: "train" (`train_size` examples over 480 words) or "eval" (`eval_per_word` x 120 examples
      over the 120 held-out words).
    seed: instance seed (lead-in, detune, loudness, noise).
  """
  _check_split(split)
  size = train_size if split == "train" else eval_per_word * len(word_split()["eval"])
  return GeneratedTask(name="tone_spelling", split=split, size=size, seed=seed,
                       make=_make_tone_spelling)


# ------------------------------------------------------------------------------------------------
# Video: one moving shape, maybe with a beep.
# ------------------------------------------------------------------------------------------------

VIDEO_SIDE = 32
VIDEO_SECONDS = 2.0  # every clip; 4-8 frames at 2-4 fps
# The beep track is a little shorter than the frames, so it makes 199 mel frames at a 10 ms hop
# (2 chunks of 100), not 201 (a third chunk of one frame).
VIDEO_AUDIO_SECONDS = 1.98
MOTIONS = ("moving left", "moving right", "moving up", "moving down", "standing still")
_MOTION_XY = {"moving left": (-1, 0), "moving right": (1, 0), "moving up": (0, -1),
              "moving down": (0, 1), "standing still": (0, 0)}
SOUNDS = {"": None, "low beep": 400.0, "high beep": 1600.0}  # "": no audio track


class VideoScene(NamedTuple):
  """What a clip shows (and plays): one shape of one colour in one motion, maybe a beep."""
  colour: str
  shape: str
  motion: str
  sound: str

  def description(self) -> str:
    text = f"{_a(self.colour)} {self.shape} {self.motion}"
    return f"{text} with a {self.sound}" if self.sound else text


_VIDEO_VALUES = {"colour": tuple(COLOURS), "shape": SHAPES, "motion": MOTIONS,
                 "sound": tuple(SOUNDS)}
ALL_VIDEO_SCENES = tuple(VideoScene(*v) for v in itertools.product(*_VIDEO_VALUES.values()))  # 420


@functools.cache
def video_split() -> dict[str, tuple[VideoScene, ...]]:
  """{"train": scenes, "eval": scenes}: 315 / 105 of the 420."""
  train, held = _holdout(ALL_VIDEO_SCENES, VIDEO_EVAL_FRACTION, "video")
  return {"train": train, "eval": held}


def render_video(scene: VideoScene, rng: np.random.Generator) -> segments.Video:
  """A clip of `scene`: Video(frames uint8 (T, 32, 32, 3), fps = T / 2, audio = Audio of 1.98 s
  or None). The shape (diameter ~12 px) crosses the frame edge to edge along its motion, in a random
  lane; a beep is a 0.3-0.6 s sine at SOUNDS[scene.sound] at a random onset."""
  n_frames = int(rng.integers(4, 9))
  s = VIDEO_SIDE
  r = s * 0.38 * rng.uniform(0.92, 1.05) / 2
  lo, hi = r + 1, s - r - 1
  background = int(rng.integers(20, 111))
  dx, dy = _MOTION_XY[scene.motion]
  lane = rng.uniform(lo, hi, 2)  # the coordinates that do not move
  progress = np.linspace(0.0, 1.0, n_frames)
  xs = lo + (hi - lo) * (progress if dx > 0 else 1 - progress) if dx else np.full(n_frames, lane[0])
  ys = lo + (hi - lo) * (progress if dy > 0 else 1 - progress) if dy else np.full(n_frames, lane[1])
  yy, xx = np.mgrid[0:s, 0:s] + 0.5
  frames = np.full((n_frames, s, s, 3), background, np.uint8)
  for t in range(n_frames):
    frames[t][shape_mask(scene.shape, xx, yy, xs[t], ys[t], r)] = COLOURS[scene.colour]
  audio = None
  if SOUNDS[scene.sound] is not None:
    beep_s = rng.uniform(0.3, 0.6)
    onset_s = rng.uniform(0.1, VIDEO_AUDIO_SECONDS - beep_s - 0.1)
    wave = _mix([(onset_s, tone(SOUNDS[scene.sound], beep_s))], VIDEO_AUDIO_SECONDS,
                rng.uniform(0.4, 0.8), rng.uniform(0.0, 0.004), rng)
    audio = _audio(wave)
  return segments.Video(frames=frames, fps=n_frames / VIDEO_SECONDS, audio=audio)


def _make_moving_shapes(task: GeneratedTask, i: int) -> dict[str, Any]:
  scenes = video_split()[task.split]
  rng = task.rng(0, i)
  scene = scenes[i % len(scenes)] if task.split == "eval" else scenes[rng.integers(len(scenes))]
  video = render_video(scene, rng)
  other = _neighbour(scene, frozenset(scenes), _VIDEO_VALUES, rng)
  negatives = [] if other is None else [other.description()]
  return _example(video, scene.description(), negatives, group=scene.description())


def moving_shapes(split: str, *, seed: int = 0, train_size: int = TRAIN_SIZE,
                  eval_per_description: int = 3) -> GeneratedTask:
  """Video of a moving shape -> its description (str); negatives: [a description one attribute off].

  Two thirds of the scenes have a beep (an audio track, named in the description); the rest have no
  audio track.

  Args:
    split: "train" (`train_size` examples) or "eval" (`eval_per_description` x 105 examples).
    seed: instance seed (frame count, size, lane, shade, beep onset).
  """
  _check_split(split)
  size = train_size if split == "train" else eval_per_description * len(video_split()["eval"])
  return GeneratedTask(name="moving_shapes", split=split, size=size, seed=seed,
                       make=_make_moving_shapes)


# ------------------------------------------------------------------------------------------------
# The tasks, and helpers for the eval suite.
# ------------------------------------------------------------------------------------------------

MEDIA_TASKS: dict[str, Callable[..., GeneratedTask]] = {
    "shapes_caption": shapes_caption,  # text -> image (reverse with `swap_sides` for image -> text)
    "tone_description": tone_description,  # audio -> text
    "moving_shapes": moving_shapes,  # video -> text
    "image_edit": image_edit,  # [image, text] -> image
    "tone_spelling": tone_spelling,  # audio -> text
}


def eval_targets() -> dict[str, int]:
  """Distinct eval targets (the eval corpus size after deduplication by id) per task; chance
  recall@1 is about 1 / that. shapes_caption counts images (text->image) and, reversed, 105
  captions."""
  return {"shapes_caption": len(shapes_caption("eval")),
          "shapes_caption_reversed": len(scene_split()["eval"]),
          "tone_description": len(tone_split()["eval"]),
          "moving_shapes": len(video_split()["eval"]),
          "image_edit": len(edit_pairs("eval")),
          "tone_spelling": len(word_split()["eval"])}


class SwappedTask(collections.abc.Sequence):
  """A task with query and positive swapped (e.g. shapes_caption as image -> caption).

  Negatives are dropped: they are of the old positive's modality, so they are not candidates for
  the new query.
  """

  def __init__(self, source: Sequence[dict[str, Any]]):
    self.source = source

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    ex = self.source[i]
    return {"query": ex["positive"], "positive": ex["query"], "negatives": [],
            "query_id": ex["positive_id"], "positive_id": ex["query_id"], "group": ex["group"]}


def swap_sides(source: Sequence[dict[str, Any]]) -> SwappedTask:
  """`source` with every example's query and positive (and their ids) swapped, negatives dropped."""
  return SwappedTask(source)
