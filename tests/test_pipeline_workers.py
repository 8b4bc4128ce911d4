"""Parallel decoding (`workers=N` in the pipeline builders, `config.data_workers` in the trainer): the
batches and the iterator states do not depend on the worker count, a state saved with N workers restores
with M, worker errors and undecodable records come through as without workers, and the threads stop.

A run killed with workers on resumes to the bits of an uninterrupted one (through `python -m
embed2.main`): tests/test_crash_safety.py, whose runs all decode with 2 workers.
"""

import dataclasses
import io
import json
import os
import subprocess
import sys
import textwrap
import threading
import zlib

import numpy as np
import pytest
import soundfile
from ml_collections import config_dict
from PIL import Image as PILImage

from configs import demo
from data_pipelines import media_tasks
from embed2.data import interleave
from embed2.data import pipeline as P
from embed2.data import readahead
from embed2.data.segments import Audio, Image
from embed2.data.tokenizer import Tokenizer
from embed2.model import ModelConfig
from embed2.model.presets import MediaConfig
from embed2.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKERS = (0, 1, 2)


class WordTokenizer:
  """Stand-in tokenizer: one id per whitespace-separated word (a hash)."""

  def encode(self, text, add_bos=False, add_eos=False, max_length=None):
    return [3 + zlib.crc32(w.encode()) % 30000 for w in text.split()]


def _text_examples(rng, n, tag):
  words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]

  def text(lo, hi):
    return " ".join(rng.choice(words, int(rng.integers(lo, hi))))

  return [{"query": f"{tag}{i} " + text(1, 8), "positive": f"{tag}{i} " + text(3, 40),
           "negatives": [text(3, 40) for _ in range(int(rng.integers(0, 3)))],
           "query_id": i, "positive_id": 10_000 + i} for i in range(n)]


def _text_tasks(rng):
  return [
      P.TaskSpec(name="retrieval", examples=_text_examples(rng, 50, "r"), rate=2.0,
                 task_string="task: search | query: ", p_drop=0.25,
                 batch=P.BatchSpec(batch_size=8, query_len=24, positive_len=48, negative_len=48,
                                   num_negatives=1, segments=4)),
      P.TaskSpec(name="sts", examples=_text_examples(rng, 30, "s"), rate=1.0,
                 batch=P.BatchSpec(batch_size=4, query_len=16, positive_len=48, segments=4)),
  ]


def _encoded_examples(rng, n):
  """Captions -> encoded JPEG / PNG / FLAC bytes (the decoders the workers run), every fifth record
  cut short (undecodable: skipped and counted)."""
  out = []
  for i in range(n):
    if i % 3 == 2:
      buf = io.BytesIO()
      soundfile.write(buf, rng.uniform(-0.5, 0.5, int(rng.integers(800, 4000))).astype(np.float32),
                      16_000, format="FLAC")
      item = Audio
    else:
      buf = io.BytesIO()
      pixels = rng.integers(0, 256, (int(rng.integers(20, 60)), int(rng.integers(20, 60)), 3), dtype=np.uint8)
      PILImage.fromarray(pixels).save(buf, format="JPEG" if i % 2 else "PNG")
      item = Image
    data = buf.getvalue()
    if i % 5 == 4:
      data = data[:len(data) // 3]
    out.append({"query": f"file {i}", "positive": item(data=data), "query_id": i, "positive_id": 1000 + i})
  return out


@pytest.fixture(scope="module")
def media_setup(fixture_rng, request):
  """(tokenizer, encoder, media tasks): the generated media tasks (demo model's media settings; small
  train splits, so batches cross epochs) and a task of encoded files with undecodable records."""
  tok = Tokenizer.default()
  cfg = ModelConfig.from_name("tiny", vocab_size=tok.vocab_size, max_length=128, max_segments=4,
                              media=MediaConfig(**demo.MEDIA))
  spec = P.BatchSpec(batch_size=4, query_len=128, positive_len=128, negative_len=128, num_negatives=1,
                     segments=4)
  tasks = [P.TaskSpec(name=name, examples=build("train", train_size=24), task_string=f"{name}: ",
                      p_drop=0.2, batch=spec)
           for name, build in ((n, media_tasks.MEDIA_TASKS[n]) for n in
                               ("shapes_caption", "tone_description", "moving_shapes", "image_edit"))]
  tasks.append(P.TaskSpec(name="files", examples=_encoded_examples(fixture_rng(request), 30), rate=2.0,
                          batch=dataclasses.replace(spec, num_negatives=0)))
  return tok, interleave.InputEncoder(tok, cfg), tasks


def _build(kind, setup, workers, seed=5):
  """One stage iterator: kind in text_ft, text_pft, media_ft, media_pft."""
  if kind.startswith("text"):
    tasks, kw = setup, dict(tokenizer=WordTokenizer())
  else:
    tok, enc, tasks = setup
    kw = dict(tokenizer=tok, encoder=enc)
  kw.update(num_groups=2, seed=seed, workers=workers)
  if kind.endswith("ft") and not kind.endswith("pft"):
    return P.build_ft_iterator(tasks, **kw)
  # Media: every count set (no row sample to encode at build time; the mixture would take 1024).
  spec = (P.BatchSpec(batch_size=8, query_len=24, positive_len=48, segments=4) if kind.startswith("text")
          else P.BatchSpec(batch_size=8, query_len=128, positive_len=128, segments=4, query_rows=8,
                           positive_rows=8, query_images=16, positive_images=8, query_audio=8,
                           positive_audio=8))
  return P.build_pft_iterator(tasks, spec, **kw)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(got, want):
  assert len(got) == len(want)
  for step, (a, b) in enumerate(zip(got, want)):
    assert a.keys() == b.keys(), step
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=f"step {step} {k}")


def _setup(kind, rng, media_setup):
  return _text_tasks(rng) if kind.startswith("text") else media_setup


def _threads_of(before):
  return [t for t in threading.enumerate() if t not in before]


# ------------------------------------------------------------------------- batches and states


@pytest.mark.parametrize("kind", ["text_ft", "text_pft", "media_ft", "media_pft"])
def test_batches_do_not_depend_on_the_worker_count(kind, rng, media_setup):
  """Every array of every batch (tokens, pixels, log-mels, ids, counts of read / skipped records)
  is the same with 0, 1 and 2 workers."""
  setup = _setup(kind, rng, media_setup)
  runs = {}
  for w in WORKERS:
    it = _build(kind, setup, w)
    # FT: enough steps for every task to come up.
    n = max(8, next(k for k in range(1, 100) if len({it.task_at(s) for s in range(k)}) == len(
        setup[2] if kind.startswith("media") else setup))) if kind.endswith("_ft") else 8
    runs[w] = _take(it, n)
    assert it.get_state()["num_workers"] == w
    it.close()
  for w in WORKERS[1:]:
    _assert_same(runs[w], runs[0])
  if kind.startswith("media"):  # the comparison covered images, audio, and skipped, counted records
    batches = runs[0]
    for what in ("_num_images", "_num_audio", "num_skipped"):
      assert sum(int(b[k]) for b in batches for k in b if k.endswith(what)) > 0, what


@pytest.mark.parametrize("kind", ["text_ft", "media_ft"])
def test_state_saved_with_2_workers_restores_with_1_and_0(kind, rng, media_setup):
  """The state after k batches with 2 workers (whose prefetch thread is a batch further) is the state
  of a 0-worker iterator after the same k batches; restored with 1 or 0 workers, or on the 2-worker
  iterator itself after it ran ahead, the stream continues exactly."""
  setup = _setup(kind, rng, media_setup)
  it = _build(kind, setup, 2)
  _take(it, 5)
  state = json.loads(json.dumps(it.get_state()))
  assert state["num_workers"] == 2 and state["step"] == 5 and it.step == 5
  if kind == "text_ft":  # held-over tuples are in flight: the restore must re-read them
    assert any(g["held"] for s in state["streams"].values() for g in s.values())
  after = _take(it, 4)
  serial = _build(kind, setup, 0)
  _take(serial, 5)
  assert {**serial.get_state(), "num_workers": 2} == state
  for w in (1, 0):
    fresh = _build(kind, setup, w)
    fresh.set_state(state)
    _assert_same(_take(fresh, 4), after)
    fresh.close()
  _take(it, 2)  # ran ahead; back to step 5
  it.set_state(state)
  _assert_same(_take(it, 4), after)
  it.close()
  serial.close()


# -------------------------------------------------------------------------------------- errors


class Exploding:
  """Examples whose index `bad` raises the error a broken source would (a config mistake)."""

  def __init__(self, examples, bad):
    self.examples, self.bad = examples, bad

  def __len__(self):
    return len(self.examples)

  def __getitem__(self, i):
    if i == self.bad:
      raise ValueError(f"config.tasks.boom.source: example {i} points at a missing shard; fix the manifest")
    return self.examples[i]


def test_a_worker_error_surfaces_in_the_caller_with_its_message(rng):
  """A ValueError raised while a worker computes an element is raised by the next() that needs it, at
  the same step as without workers, with the same type and message; at build time (the row sample)
  too."""
  examples = _text_examples(rng, 40, "e")
  fixed = P.BatchSpec(batch_size=4, query_len=16, positive_len=48, segments=4, query_rows=4,
                      positive_rows=4)
  task = P.TaskSpec(name="boom", examples=Exploding(examples, 17), batch=fixed)
  steps = {}
  for w in WORKERS:
    it = P.build_ft_iterator([task], tokenizer=WordTokenizer(), num_groups=2, seed=1, workers=w)
    with pytest.raises(ValueError, match=r"config\.tasks\.boom\.source: example 17 points at a missing "
                       "shard; fix the manifest"):
      for _ in range(100):
        next(it)
    steps[w] = it.step
    it.close()
  assert steps[1] == steps[2] == steps[0] < 100
  suggested = P.TaskSpec(name="boom", examples=Exploding(examples, 3),
                         batch=P.BatchSpec(batch_size=4, query_len=16, positive_len=48, segments=4))
  with pytest.raises(ValueError, match=r"example 3 points at a missing shard"):
    P.build_ft_iterator([suggested], tokenizer=WordTokenizer(), num_groups=2, seed=1, workers=2)


def test_bad_worker_counts_name_the_field():
  tasks = [P.TaskSpec(name="t", examples=[{"query": "a", "positive": "b", "query_id": 0, "positive_id": 1}],
                      batch=P.BatchSpec(batch_size=2, query_len=8, positive_len=8, segments=4))]
  for bad in (-1, 1.5, True, "2"):
    with pytest.raises(ValueError, match=r"workers=.* must be an int >= 0"):
      P.build_ft_iterator(tasks, tokenizer=WordTokenizer(), num_groups=1, seed=0, workers=bad)
    with pytest.raises(ValueError, match=r"config\.data_workers=.* must be an int >= 0"):
      trainer.data_workers(config_dict.ConfigDict({"data_workers": bad}))
  assert trainer.data_workers(config_dict.ConfigDict({"data_workers": 3})) == 3
  assert trainer.data_workers(config_dict.ConfigDict({})) == 0


# ------------------------------------------------------------------------------------ shutdown


def test_close_stops_every_thread_and_a_closed_pool_refuses_work(rng):
  before = set(threading.enumerate())
  it = _build("text_ft", _text_tasks(rng), 2)
  _take(it, 3)
  assert {t.name for t in _threads_of(before)} >= {"embed2-decode-0", "embed2-decode-1",
                                                    "embed2-batch-prefetch"}
  it.close()
  it.close()  # idempotent
  assert not _threads_of(before)
  with pytest.raises(ValueError, match="closed"):
    next(it)
  pool = readahead.DecodePool(1)
  assert pool.submit(int, "7").result() == 7
  pool.close()
  with pytest.raises(RuntimeError, match="closed"):
    pool.submit(int, "7")


def test_an_unclosed_iterator_does_not_hold_the_interpreter_at_exit(tmp_path):
  """A process that ends with a 2-worker iterator unclosed exits without decoding what was read ahead:
  the queued elements are cancelled, the ones in flight finish, nothing hangs."""
  script = tmp_path / "exit.py"
  script.write_text(textwrap.dedent("""
      import sys, time
      from embed2.data import pipeline as P

      class Slow:
        def __len__(self):
          return 1000
        def __getitem__(self, i):
          time.sleep(0.1)
          print("element", flush=True)
          return {"query": f"q {i}", "positive": f"p {i}", "query_id": i, "positive_id": 10_000 + i}

      class Tok:
        def encode(self, text, add_bos=False, add_eos=False, max_length=None):
          return [3 + len(w) for w in text.split()]

      spec = P.BatchSpec(batch_size=16, query_len=8, positive_len=8, segments=4, query_rows=16,
                         positive_rows=16, lookahead=0)
      it = P.build_ft_iterator([P.TaskSpec(name="slow", examples=Slow(), batch=spec)], tokenizer=Tok(),
                               num_groups=1, seed=0, workers=2)
      next(it)
      print("exiting", flush=True)
      """))
  proc = subprocess.run([sys.executable, str(script)], cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.split()
  after = lines[lines.index("exiting") + 1:]
  # Without the cancel, the 16 elements read ahead for the next batch would all be made first.
  assert len(after) <= 6, proc.stdout
