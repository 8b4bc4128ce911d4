"""Tests for data_pipelines.media_tasks: determinism, types and ranges, honest hold-out, ids vs
content, and that what is drawn / played is what the text says (checked from the pixels and samples
with float64 numpy, not by re-running the generators)."""
import pickle
import time

import numpy as np
import pytest
from scipy import ndimage

from data_pipelines import media_tasks as mt
from data_pipelines import stdlib_tasks
from embed2.data import segments
from embed2.eval import metrics

NAMES = tuple(mt.MEDIA_TASKS)
SR = mt.SAMPLE_RATE
SCENE_OF_CAPTION = {s.caption(): s for s in mt.ALL_SCENES}
TONES_OF_DESCRIPTION = {t.description(): t for t in mt.ALL_TONE_SEQUENCES}
VIDEO_OF_DESCRIPTION = {v.description(): v for v in mt.ALL_VIDEO_SCENES}


def _sides(ex):
  return [ex["query"], ex["positive"], *ex["negatives"]]


def _fingerprint(side):
  """Content of a side as hashable bytes/str, independent of content_id_of."""
  if isinstance(side, str):
    return ("s", side)
  if isinstance(side, segments.Image):
    return ("i", side.pixels.shape, side.pixels.tobytes())
  if isinstance(side, segments.Audio):
    return ("a", side.sample_rate, side.samples.tobytes())
  if isinstance(side, segments.Video):
    return ("v", side.fps, side.frames.shape, side.frames.tobytes(),
            None if side.audio is None else _fingerprint(side.audio))
  return ("l", tuple(_fingerprint(p) for p in side))


def _checked_examples(build, train_limit: int, *, every: int = 1):
  """The examples a content check reads: the whole eval split (what models are scored on) and the
  first `train_limit` train examples; every `every`-th of each."""
  for split in mt.SPLITS:
    task = build(split)
    yield from (task[i] for i in range(0, len(task) if split == "eval" else train_limit, every))


def _assert_same_side(a, b):
  assert _fingerprint(a) == _fingerprint(b)


# ------------------------------------------------------------------------------------------------
# The sequence: sizes, splits, determinism.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_split_sizes_and_bad_split(name):
  build = mt.MEDIA_TASKS[name]
  assert len(build("train")) == mt.TRAIN_SIZE
  assert 200 <= len(build("eval")) <= 400
  with pytest.raises(ValueError, match=r"split='test'.*'train', 'eval'"):
    build("test")


def test_indexing_slices_negative_and_out_of_range():
  task = mt.shapes_caption("eval")
  _assert_same_side(task[-1]["positive"], task[len(task) - 1]["positive"])
  _assert_same_side(task[np.int64(4)]["positive"], task[4]["positive"])
  assert [ex["query"] for ex in task[2:8:3]] == [task[2]["query"], task[5]["query"]]
  with pytest.raises(IndexError, match="out of range"):
    task[len(task)]
  with pytest.raises(IndexError):
    task[-len(task) - 1]


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_and_picklable(name):
  build = mt.MEDIA_TASKS[name]
  for split, i in (("train", 12_345), ("eval", 7)):
    a, b = build(split)[i], build(split)[i]
    for x, y in zip(_sides(a), _sides(b)):
      _assert_same_side(x, y)
    keys = ("query_id", "positive_id", "group")
    assert [a[k] for k in keys] == [b[k] for k in keys]
    c = pickle.loads(pickle.dumps(build(split)))[i]  # grain workers rebuild the source
    _assert_same_side(a["query"], c["query"])
  # Other indices, seeds and splits give other instances.
  t0, t1 = build("train"), build("train", seed=1)
  assert _fingerprint(t0[3]["query"]) != _fingerprint(t0[4]["query"]) or \
      _fingerprint(t0[3]["positive"]) != _fingerprint(t0[4]["positive"])
  media = lambda ex: [_fingerprint(s) for s in _sides(ex) if not isinstance(s, str)]
  assert media(t0[3]) != media(t1[3])


# ------------------------------------------------------------------------------------------------
# Types, shapes, dtypes, ranges; ids.
# ------------------------------------------------------------------------------------------------


def _check_image(x):
  assert isinstance(x, segments.Image) and x.pixels.dtype == np.uint8
  h, w, c = x.pixels.shape
  assert h == w and h in mt.IMAGE_SIDES and c == 3


def _check_audio(x, lo_s, hi_s):
  assert isinstance(x, segments.Audio) and x.sample_rate == SR
  s = x.samples
  assert s.dtype == np.float32 and s.ndim == 1 and lo_s * SR <= s.size <= hi_s * SR
  assert np.isfinite(s).all() and np.abs(s).max() <= 1.0 and np.abs(s).max() > 0.2


def _check_video(x):
  assert isinstance(x, segments.Video)
  t, h, w, c = x.frames.shape
  assert x.frames.dtype == np.uint8 and 4 <= t <= 8 and (h, w, c) == (32, 32, 3)
  assert 2.0 <= x.fps <= 4.0 and t / x.fps == pytest.approx(2.0)
  if x.audio is not None:
    _check_audio(x.audio, mt.VIDEO_AUDIO_SECONDS, mt.VIDEO_AUDIO_SECONDS)


def _check_text(x):
  assert isinstance(x, str) and x


def _check_example(name, ex):
  if name == "shapes_caption":
    _check_text(ex["query"]), _check_image(ex["positive"])
    for n in ex["negatives"]:
      _check_image(n)
  elif name in ("tone_description", "tone_spelling"):
    _check_audio(ex["query"], 0.6, mt.MAX_CLIP_SECONDS), _check_text(ex["positive"])
    for n in ex["negatives"]:
      _check_text(n)
  elif name == "moving_shapes":
    _check_video(ex["query"]), _check_text(ex["positive"])
    for n in ex["negatives"]:
      _check_text(n)
  else:
    assert isinstance(ex["query"], list) and len(ex["query"]) == 2
    _check_image(ex["query"][0]), _check_text(ex["query"][1]), _check_image(ex["positive"])
    assert ex["query"][0].pixels.shape == ex["positive"].pixels.shape
    assert 1 <= len(ex["negatives"]) <= 2
    for n in ex["negatives"]:
      _check_image(n)


@pytest.mark.parametrize("name", NAMES)
def test_types_shapes_ranges(name):
  for ex in _checked_examples(mt.MEDIA_TASKS[name], 300, every=3):
    assert set(ex) == {"query", "positive", "negatives", "query_id", "positive_id", "group"}
    _check_example(name, ex)
    assert 0 <= ex["query_id"] < 2 ** 31 and 0 <= ex["positive_id"] < 2 ** 31
    assert all(mt.content_id_of(n) != ex["positive_id"] for n in ex["negatives"])
    if isinstance(ex["positive"], str):
      assert ex["positive_id"] == stdlib_tasks.content_id(ex["positive"])


@pytest.mark.parametrize("name", NAMES)
def test_ids_match_content(name):
  """Equal ids <=> equal content, over the whole eval split and both roles."""
  id_of, content_of = {}, {}
  for ex in mt.MEDIA_TASKS[name]("eval"):
    for side, i in ((ex["query"], ex["query_id"]), (ex["positive"], ex["positive_id"])):
      assert i == mt.content_id_of(side)
      fp = _fingerprint(side)
      assert id_of.setdefault(fp, i) == i
      assert content_of.setdefault(i, fp) == fp
  # Text ids are the text tasks' ids; a copy of an array has the same id, an edit another.
  pixels = mt.shapes_caption("eval")[0]["positive"].pixels
  assert mt.content_id_of(segments.Image(pixels=pixels.copy())) == mt.content_id_of(
      segments.Image(pixels=pixels))
  edited = pixels.copy()
  edited[0, 0, 0] ^= 1
  assert (mt.content_id_of(segments.Image(pixels=edited))
          != mt.content_id_of(segments.Image(pixels=pixels)))
  assert mt.content_id_of("a red circle") == stdlib_tasks.content_id("a red circle")
  with pytest.raises(TypeError, match="file-backed"):
    mt.content_id_of(segments.Image(path="x.png"))


# ------------------------------------------------------------------------------------------------
# Hold-out.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split_fn, values, n_eval", [
    (mt.scene_split, mt._SCENE_VALUES, 105),
    (mt.video_split, mt._VIDEO_VALUES, 105),
    (mt.tone_split, mt._TONE_VALUES, 108),
])
def test_attribute_split_disjoint_and_covering(split_fn, values, n_eval):
  train, held = split_fn()["train"], split_fn()["eval"]
  assert len(held) == n_eval and not set(train) & set(held)
  for field, options in values.items():  # every value is learnable and tested
    for side in (train, held):
      assert {getattr(x, field) for x in side} == set(options), field


def test_words_disjoint():
  words = mt.word_split()
  assert len(words["eval"]) == 120 and len(words["train"]) == 480
  assert not set(words["train"]) & set(words["eval"])
  assert all(3 <= len(w) <= 5 and set(w) <= set(mt.ALPHABET) for w in mt.vocabulary())
  assert set("".join(words["train"])) == set(mt.ALPHABET)  # every letter is heard in training


@pytest.mark.parametrize("name", ["shapes_caption", "tone_description", "moving_shapes",
                                  "tone_spelling", "image_edit"])
def test_eval_texts_never_in_train(name):
  """The texts of every eval example (captions, descriptions, words, instructions' scenes) are not
  texts of the train split; train examples only use train content."""
  text_of = {"shapes_caption": lambda ex: ex["query"], "image_edit": lambda ex: ex["group"]}
  get = text_of.get(name, lambda ex: ex["positive"])
  allowed = {
      "shapes_caption": {s.caption() for s in mt.scene_split()["train"]},
      "image_edit": {s.caption() for s in mt.scene_split()["train"]},
      "tone_description": {t.description() for t in mt.tone_split()["train"]},
      "moving_shapes": {v.description() for v in mt.video_split()["train"]},
      "tone_spelling": {f"word: {w}" for w in mt.word_split()["train"]},
  }[name]
  train = mt.MEDIA_TASKS[name]("train")
  for i in range(0, 20_000, 97):
    ex = train[i]
    assert get(ex) in allowed
    assert all(n in allowed for n in ex["negatives"] if isinstance(n, str))
  eval_texts = {get(ex) for ex in mt.MEDIA_TASKS[name]("eval")}
  assert eval_texts and not eval_texts & allowed


def test_image_edit_pairs_stay_in_their_split():
  for split in mt.SPLITS:
    scenes = mt.scene_split()[split]
    allowed = set(scenes)
    for b, edit in mt.edit_pairs(split):
      target = edit.apply(scenes[b])
      assert scenes[b] in allowed and target in allowed and target != scenes[b]
  assert {e.field for _, e in mt.edit_pairs("eval")} == {"colour", "position", "shape", "count"}


# ------------------------------------------------------------------------------------------------
# What is drawn / played is what the text says.
# ------------------------------------------------------------------------------------------------


def _background(p):
  values, counts = np.unique(p.reshape(-1, 3), axis=0, return_counts=True)
  return values[np.argmax(counts)]


def _check_scene_drawn(p, scene):
  """Pixels of the scene's colour: `count` components of the right shape inside the right region,
  and nothing but background and that colour."""
  s = p.shape[0]
  mask = np.all(p == mt.COLOURS[scene.colour], axis=-1)
  other = ~mask & ~np.all(p == _background(p), axis=-1)
  assert not other.any(), "only the background shade and the scene's colour are drawn"
  labels, n = ndimage.label(mask)
  assert n == scene.count, (scene, n)
  yy, xx = np.nonzero(mask)
  x, y = (xx + 0.5) / s, (yy + 0.5) / s
  if scene.position == "centre":
    assert abs(x.mean() - 0.5) < 0.06 and abs(y.mean() - 0.5) < 0.08
  else:
    top, left = scene.position.split()
    assert ((y < 0.5) if top == "top" else (y > 0.5)).all()
    assert ((x < 0.5) if left == "left" else (x > 0.5)).all()
  for k in range(1, n + 1):
    ys, xs = np.nonzero(labels == k)
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = ys.size / (h * w)
    rows = np.bincount(ys - ys.min())  # width of each row, top to bottom
    if scene.shape == "square":
      assert fill == 1.0 and abs(h - w) <= 1
    elif scene.shape == "circle":
      assert 0.55 < fill < 0.96 and rows[0] < w and rows[-1] < w  # 6 px circles are near-square
      assert rows.max() in (rows[(h - 1) // 2], rows[h // 2])  # widest in the middle
    elif scene.shape == "triangle":
      assert rows[-1] == rows.max() and rows[0] <= 0.5 * rows.max() and np.all(np.diff(rows) >= 0)
    else:  # cross: widest in the middle, narrow arms at the top and bottom
      assert rows[len(rows) // 2] == w and rows[0] < 0.6 * w and rows[-1] < 0.6 * w and fill < 0.75


def test_shapes_caption_image_matches_caption():
  for ex in _checked_examples(mt.shapes_caption, 400):
    scene = SCENE_OF_CAPTION[ex["query"]]
    _check_scene_drawn(ex["positive"].pixels, scene)
    for neg in ex["negatives"]:  # a hard negative: the same drawing, one attribute changed
      assert neg.pixels.shape == ex["positive"].pixels.shape
      assert (_background(neg.pixels) == _background(ex["positive"].pixels)).all()


def test_image_edit_target_applies_instruction():
  for ex in _checked_examples(mt.image_edit, 300):
    base = SCENE_OF_CAPTION[ex["group"]]
    image, instruction = ex["query"]
    _check_scene_drawn(image.pixels, base)
    targets = [e.apply(base) for e in mt.edits_of(base) if e.instruction(base) == instruction]
    assert len(targets) == 1, instruction
    _check_scene_drawn(ex["positive"].pixels, targets[0])
    _assert_same_side(ex["negatives"][0], image)  # the original is the first hard negative
    assert (_background(ex["positive"].pixels) == _background(image.pixels)).all()
  # Eval: all edits of one original share its drawing, so only the instruction tells them apart.
  task = mt.image_edit("eval")
  originals, edits = {}, {}
  for ex in task:
    originals.setdefault(ex["group"], set()).add(_fingerprint(ex["query"][0]))
    edits[ex["group"]] = edits.get(ex["group"], 0) + 1
  assert all(len(v) == 1 for v in originals.values())
  assert np.mean(list(edits.values())) > 3


def _peak_hz(x, sr=SR):
  """Frequency of the largest |rfft| bin (Hann window, zero-padded to 1/8 Hz... 0.5 Hz bins)."""
  x = np.asarray(x, np.float64)
  n = 16 * sr
  spec = np.abs(np.fft.rfft(x * np.hanning(x.size), n))
  return np.argmax(spec) * sr / n


def _runs(wave, threshold):
  """[(start, end)) sample ranges where |wave| (5 ms max envelope) exceeds threshold."""
  env = ndimage.maximum_filter1d(np.abs(wave.astype(np.float64)), 40)
  on = np.concatenate([[0], (env > threshold).astype(np.int8), [0]])
  edges = np.flatnonzero(np.diff(on))
  return list(zip(edges[::2], edges[1::2]))


@pytest.mark.parametrize("freq", [250.0, 397.0, 1000.0, 1587.0, 2520.0])
@pytest.mark.parametrize("buzzy", [False, True])
def test_tone_peaks_at_its_frequency(freq, buzzy):
  x = mt.tone(freq, 0.15, buzzy=buzzy)
  assert x.shape == (1200,) and np.abs(x).max() == pytest.approx(1.0, abs=1e-6)
  assert abs(_peak_hz(x) - freq) < 2.0
  spec = np.abs(np.fft.rfft(x * np.hanning(x.size), 16 * SR))
  f_k = np.arange(spec.size) / 16
  assert spec[f_k > 3850].max() / spec.max() < 1e-3  # band-limited: nothing aliases
  if 2 * freq < 3800:
    second = spec[np.abs(f_k - 2 * freq) < 10].max() / spec.max()
    assert second > 0.3 if buzzy else second < 0.01  # harmonics, or one line


def _ref_tone(freq, duration_s, buzzy, sr=SR):
  """float64 reference: sum_{k <= K} sin(2 pi k f t) / k (one np.sin per harmonic and sample), peak
  1, raised-cosine ramps of 8 ms."""
  n = int(round(duration_s * sr))
  t = np.arange(n) / sr
  num_k = max(1, int(3800.0 // freq)) if buzzy else 1
  wave = sum(np.sin(2 * np.pi * k * freq * t) / k for k in range(1, num_k + 1))
  wave = wave / np.abs(wave).max()
  ramp = min(int(0.008 * sr), n // 2)
  env = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp) / ramp)
  wave[:ramp] *= env
  wave[n - ramp:] *= env[::-1]
  return wave


@pytest.mark.parametrize("buzzy", [False, True])
def test_tones_match_float64_reference(buzzy, rng):
  for _ in range(6):
    # Mixed registers in one call: rows with different harmonic counts K (buzzy: 1..21).
    freqs = rng.uniform(170.0, 3000.0, int(rng.integers(1, 6)))
    duration = float(rng.choice([0.15, 0.21, 0.6])) + float(rng.uniform(0, 0.01))
    rows = mt.tones(freqs, duration, buzzy=buzzy)
    assert rows.shape == (len(freqs), int(round(duration * SR))) and rows.dtype == np.float64
    for f, row in zip(freqs, rows):
      # The phase of a 0.6 s tone is ~1e4 rad: 1e-12 rad of it is rounding either way.
      np.testing.assert_allclose(row, _ref_tone(f, duration, buzzy), rtol=0, atol=1e-10)
      np.testing.assert_array_equal(row, mt.tone(f, duration, buzzy=buzzy))  # rows are independent


def test_mix_noise_is_rng_normal(rng):
  """The noise is exactly rng.normal(0, noise, n) (the same draws), the notes are added at their
  onsets, and the clip is clipped to [-1, 1] and float32."""
  seed = int(rng.integers(2**32))
  waves = mt.tones([300.0, 900.0], 0.15)
  notes = [(0.01, waves[0]), (0.4, waves[1])]
  noise = float(np.random.default_rng(seed).uniform(0.001, 0.004))
  got = mt._mix(notes, 0.6, 1.3, noise, np.random.default_rng(seed))
  want = np.random.default_rng(seed).normal(0.0, noise, 4800)
  want[80:1280] += 1.3 * waves[0]
  want[3200:4400] += 1.3 * waves[1]
  assert got.dtype == np.float32 and (got.max(), got.min()) == (1.0, -1.0)  # 1.3 x peak 1: clipped
  np.testing.assert_array_equal(got, np.clip(want, -1.0, 1.0).astype(np.float32))


def test_content_ids_are_blake2b_of_header_and_bytes(rng):
  """Ids are stable across versions: blake2b (person "embed2media") of a type-tagged header and the
  array's bytes, as first defined (so eval corpora and logs keep their ids)."""
  import hashlib  # pylint: disable=g-import-not-at-top

  def ref(header, arr):
    h = hashlib.blake2b(digest_size=8, person=b"embed2media")
    h.update(header.encode() + np.ascontiguousarray(arr).tobytes())
    return int.from_bytes(h.digest(), "little") & 0x7FFFFFFF

  pixels = rng.integers(0, 256, (5, 7, 3)).astype(np.uint8)
  samples = rng.standard_normal(301).astype(np.float32)
  assert mt.content_id_of(segments.Image(pixels=pixels)) == ref(f"i{pixels.shape}|u1:", pixels)
  assert mt.content_id_of(segments.Image(pixels=pixels[:, ::2])) == ref(
      f"i{pixels[:, ::2].shape}|u1:", pixels[:, ::2])  # a strided view hashes as its copy
  assert mt.content_id_of(segments.Audio(samples=samples, sample_rate=8000)) == ref(
      f"a8000{samples.shape}<f4:", samples)


def test_neighbours_are_the_one_field_changes_in_order():
  for split in mt.SPLITS:
    seqs = mt.tone_split()[split]
    allowed = frozenset(seqs)
    for seq in seqs[:40]:
      want = [seq._replace(**{f: v}) for f in seq._fields for v in mt._TONE_VALUES[f]
              if v != getattr(seq, f)]
      want = [o for o in want if o in allowed]
      got = mt._neighbours(seq, allowed, tuple((f, mt._TONE_VALUES[f]) for f in seq._fields))
      assert list(got) == want


def test_tone_spelling_audio_spells_the_word():
  letters = np.array(list(mt.LETTER_HZ.values()))
  names = list(mt.LETTER_HZ)
  for ex in _checked_examples(mt.tone_spelling, 200, every=2):
    word = ex["positive"].removeprefix("word: ")
    wave = ex["query"].samples
    runs = _runs(wave, 0.15 * np.abs(wave).max())
    assert len(runs) == len(word), (word, runs)
    heard = ""
    for a, b in runs:
      assert abs((b - a) / SR - mt.LETTER_S) < 0.02
      f = _peak_hz(wave[a:b])
      cents = 1200 * np.abs(np.log2(f / letters))
      assert cents.min() < 30  # within the +-20-cent detune (4 semitones = 400 cents apart)
      heard += names[int(np.argmin(cents))]
    assert heard == word


def test_tone_description_audio_matches_description():
  for ex in _checked_examples(mt.tone_description, 200, every=2):
    seq = TONES_OF_DESCRIPTION[ex["positive"]]
    wave = ex["query"].samples
    runs = _runs(wave, 0.15 * np.abs(wave).max())
    assert len(runs) == seq.count, (seq, runs)
    tone_s, gap_s = mt.TEMPOS[seq.tempo]
    for (a, b), nxt in zip(runs, runs[1:] + [None]):
      assert abs((b - a) / SR - tone_s) < 0.02
      if nxt is not None:
        assert abs((nxt[0] - b) / SR - gap_s) < 0.02
    freqs = np.array([_peak_hz(wave[a:b]) for a, b in runs])
    semis = 12 * np.log2(freqs / mt.REGISTERS[seq.register])
    centre = (semis.max() + semis.min()) / 2
    assert abs(centre) < 0.35  # detune is at most 0.3 semitone
    np.testing.assert_allclose(semis - centre, seq.semitones(), atol=0.1)
    # Buzzy: the second harmonic carries energy; pure: it does not.
    a, b = runs[0]
    spec = np.abs(np.fft.rfft(wave[a:b] * np.hanning(b - a), 16 * SR))
    f_k = np.arange(spec.size) / 16
    ratio = spec[np.abs(f_k - 2 * freqs[0]) < 10].max() / spec.max()
    assert (ratio > 0.3) if seq.timbre == "buzzy" else (ratio < 0.02)


def test_moving_shapes_video_matches_description():
  for ex in _checked_examples(mt.moving_shapes, 300):
    scene = VIDEO_OF_DESCRIPTION[ex["positive"]]
    frames = ex["query"].frames
    xy = []
    for f in frames:
      mask = np.all(f == mt.COLOURS[scene.colour], axis=-1)
      assert ndimage.label(mask)[1] == 1 and mask.sum() > 40
      ys, xs = np.nonzero(mask)
      xy.append((xs.mean(), ys.mean()))
    dx, dy = np.diff(np.array(xy), axis=0).T
    expect_x, expect_y = mt._MOTION_XY[scene.motion]
    for d, e in ((dx, expect_x), (dy, expect_y)):
      # Along the motion: > 1 px a frame; across it: only rasterisation wobble.
      assert np.all(d > 1.0) if e > 0 else np.all(d < -1.0) if e < 0 else np.all(np.abs(d) < 0.5)
    if scene.motion == "standing still":
      assert (frames == frames[:1]).all()
    audio = ex["query"].audio
    assert (audio is None) == (scene.sound == "")
    if audio is not None:
      beep_hz = mt.SOUNDS[scene.sound]
      assert abs(_peak_hz(audio.samples) - beep_hz) < 3.0


# ------------------------------------------------------------------------------------------------
# The eval suite's view.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, reverse, n_queries, n_corpus", [
    ("shapes_caption", False, 105, 315),
    ("shapes_caption", True, 315, 105),
    ("tone_description", False, 324, 108),
    ("moving_shapes", False, 315, 105),
    ("image_edit", False, None, None),
    ("tone_spelling", False, 240, 120),
])
def test_retrieval_problem_on_eval(name, reverse, n_queries, n_corpus):
  examples = mt.MEDIA_TASKS[name]("eval")
  if reverse:
    examples = mt.swap_sides(examples)
  queries, corpus, relevance = metrics.retrieval_problem(list(examples))
  if n_queries is None:  # image_edit: one query and one distinct target per example
    n_queries = n_corpus = len(mt.edit_pairs("eval"))
  assert (len(queries), len(corpus)) == (n_queries, n_corpus)
  assert len(corpus) >= 100
  assert all(len(rel) >= 1 for rel in relevance)
  if name == "shapes_caption" and not reverse:
    assert all(len(rel) == 3 for rel in relevance)  # each caption has its 3 drawings
  else:
    assert all(len(rel) == 1 for rel in relevance)
  expected = mt.eval_targets()[f"{name}_reversed" if reverse else name]
  assert len(corpus) == expected


def test_swap_sides_swaps_ids():
  ex, sw = mt.shapes_caption("eval")[5], mt.swap_sides(mt.shapes_caption("eval"))[5]
  assert sw["query_id"] == ex["positive_id"] and sw["positive_id"] == ex["query_id"]
  assert sw["positive"] == ex["query"] and sw["negatives"] == []
  _assert_same_side(sw["query"], ex["positive"])


def test_every_eval_split_generates_quickly():
  """The suite regenerates eval splits at every evaluation; all five together take well under a
  second on one core (bound generous for a loaded machine)."""
  start = time.perf_counter()
  n = sum(len(list(build("eval"))) for build in mt.MEDIA_TASKS.values())
  assert n > 1000 and time.perf_counter() - start < 15.0
