"""Tests for embed2.data.pipeline: transforms, stages, sampler, state, sharding."""

import json
import zlib

import grain
import dataclasses

import numpy as np
import pytest
from scipy import stats as scipy_stats

from embed2.data import packing
from embed2.data import pipeline as P
from embed2.data import transforms
from embed2.data.tokenizer import BOS_ID, EOS_ID


class ByteTokenizer:
  """Stand-in tokenizer: one id per UTF-8 byte, shifted past pad/eos/bos."""

  def encode(self, text, add_bos=False, add_eos=False, max_length=None):
    ids = [b + 3 for b in text.encode("utf-8")]
    return ([BOS_ID] if add_bos else []) + ids + ([EOS_ID] if add_eos else [])


class WordTokenizer:
  """Stand-in tokenizer: one id per whitespace-separated word (a hash)."""

  def encode(self, text, add_bos=False, add_eos=False, max_length=None):
    return [3 + zlib.crc32(w.encode()) % 30000 for w in text.split()]


def _examples(rng, n, tag, max_negs=3):
  words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]

  def text(lo, hi):
    return " ".join(rng.choice(words, int(rng.integers(lo, hi))))

  return [{"query": f"{tag}{i} " + text(1, 8),
           "positive": f"{tag}{i} " + text(3, 60),
           "negatives": [text(3, 60) for _ in
                         range(int(rng.integers(0, max_negs + 1)))],
           "query_id": i, "positive_id": 10_000 + i, "group": tag}
          for i in range(n)]


def _ft_tasks(rng, n_a=300, n_b=120, rates=(2.0, 1.0)):
  return [
      P.TaskSpec(name="retrieval", examples=_examples(rng, n_a, "r"),
                 rate=rates[0], task_string="task: search | query: ",
                 p_drop=0.25,
                 batch=P.BatchSpec(batch_size=16, query_len=48,
                                   positive_len=160, negative_len=160,
                                   num_negatives=2, segments=4)),
      P.TaskSpec(name="sts", examples=_examples(rng, n_b, "s", 0),
                 rate=rates[1], task_string="task: sts | query: ",
                 batch=P.BatchSpec(batch_size=8, query_len=40,
                                   positive_len=96, segments=4)),
  ]


def _pft_batch_spec():
  return P.BatchSpec(batch_size=16, query_len=64, positive_len=160,
                     negative_len=160, num_negatives=1, segments=4)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# -------------------------------------------------------------------- transforms


def test_tokenize_bos_eos_and_truncation():
  tok = transforms.Tokenize(tokenizer=ByteTokenizer(), in_key="query",
                   out_key="query_tokens", truncated_key="query_truncated",
                   max_length=8)
  out = tok.map({"query": "abc"})
  np.testing.assert_array_equal(out["query_tokens"],
                                [BOS_ID, 97 + 3, 98 + 3, 99 + 3, EOS_ID])
  assert out["query_tokens"].dtype == np.int32 and out["query_truncated"] == 0
  out = tok.map({"query": "abcdefghij"})
  np.testing.assert_array_equal(
      out["query_tokens"], [BOS_ID] + [c + 3 for c in b"abcdef"] + [EOS_ID])
  assert out["query_truncated"] == 1
  negs = transforms.Tokenize(tokenizer=ByteTokenizer(), in_key="negatives",
                    out_key="negative_tokens", truncated_key="neg_trunc",
                    max_length=4, max_items=2)
  out = negs.map({"negatives": ["a", "bcdef", "zzz"]})
  assert len(out["negative_tokens"]) == 2 and out["neg_trunc"] == 1
  assert negs.map({})["negative_tokens"] == []
  with pytest.raises(ValueError, match="set the side's length"):
    transforms.Tokenize(tokenizer=ByteTokenizer(), in_key="q", out_key="t",
               truncated_key="x", max_length=2)


@pytest.mark.parametrize("tokenizer", [ByteTokenizer(), WordTokenizer()])
def test_tokenize_long_text_cut_matches_full(tokenizer):
  rng = np.random.default_rng(0)
  words = ["a", "bb", "ccc", "dddd", " ", "   "]
  long_text = "".join(rng.choice(words, 5000))
  spaces = " " * 3000 + "x y"  # whitespace collapses: the cut falls back
  tok = transforms.Tokenize(tokenizer=tokenizer, in_key="t", out_key="o",
                   truncated_key="tr", max_length=16)
  for text in (long_text, spaces):
    full = tokenizer.encode(text)
    out = tok.map({"t": text})
    want = [BOS_ID] + full[:14] + [EOS_ID]
    np.testing.assert_array_equal(out["o"], want)
    assert out["tr"] == int(len(full) > 14)


def test_task_string_drop_rate_and_determinism():
  rng = np.random.default_rng(1)
  exs = _examples(rng, 50, "q")
  t = transforms.PrependTaskString(task_string="task: x | query: ", p_drop=0.3)
  ds = grain.MapDataset.source(exs).repeat().random_map(t, seed=7)
  out = [ds[i] for i in range(4000)]
  kept = np.array([o["task_string_kept"] for o in out])
  # Binomial(4000, 0.7): 5 sigma is ~0.036.
  assert abs(kept.mean() - 0.7) < 0.036
  for o, i in zip(out, range(4000)):
    src = exs[i % 50]["query"]
    assert o["query"] == ("task: x | query: " + src if o["task_string_kept"]
                          else src)
  again = grain.MapDataset.source(exs).repeat().random_map(t, seed=7)
  assert [again[i]["task_string_kept"] for i in range(200)] == list(kept[:200])
  # Epochs draw afresh: the same example is not always kept or always dropped.
  per_example = kept.reshape(80, 50).mean(0)
  assert ((per_example > 0) & (per_example < 1)).mean() > 0.9


# --------------------------------------------------------------------- contract


def _decode(batch, side, b, s_max, r_g, b_g, j=None):
  g = b // b_g
  slot = batch[f"{side}_slot"][b] if j is None else batch[f"{side}_slot"][b, j]
  r, seg = divmod(int(slot), s_max)
  row = g * r_g + r
  m = batch[f"{side}_segment_ids"][row] == seg + 1
  np.testing.assert_array_equal(batch[f"{side}_positions"][row][m],
                                np.arange(m.sum()))
  return batch[f"{side}_tokens"][row][m]


def test_ft_batch_matches_examples():
  rng = np.random.default_rng(2)
  tasks = _ft_tasks(rng)
  tasks[0] = P.TaskSpec(name=tasks[0].name, examples=tasks[0].examples,
                        task_string="task: search | query: ", p_drop=1.0,
                        batch=tasks[0].batch)
  tok = ByteTokenizer()
  it = P.build_ft_iterator(tasks, tokenizer=tok, num_groups=4, seed=3)

  def enc(text, length):
    ids = tok.encode(text)
    return [BOS_ID] + ids[:length - 2] + [EOS_ID]

  seen = 0
  for step in range(12):
    batch = next(it)
    ti = int(batch["task_index"])
    assert ti == it.task_at(step)
    task = tasks[ti]
    shape = it.group_shapes[task.name]
    spec = task.batch
    b_total = batch["example_valid"].shape[0]
    assert b_total == spec.batch_size
    for b in range(b_total):
      if not batch["example_valid"][b]:
        continue
      qid = int(batch["query_ids"][b])
      ex = task.examples[qid]
      assert batch["positive_ids"][b] == ex["positive_id"]
      assert batch["example_task"][b] == ti
      q_text = ex["query"] if ti == 0 else task.task_string + ex["query"]
      np.testing.assert_array_equal(
          _decode(batch, "query", b, shape.segments, shape.query.rows,
                  shape.examples), enc(q_text, spec.query_len))
      np.testing.assert_array_equal(
          _decode(batch, "positive", b, shape.segments, shape.positive.rows,
                  shape.examples), enc(ex["positive"], spec.positive_len))
      if spec.num_negatives:
        negs = ex["negatives"][:spec.num_negatives]
        np.testing.assert_array_equal(
            batch["negative_valid"][b],
            np.arange(spec.num_negatives) < len(negs))
        for j, n in enumerate(negs):
          np.testing.assert_array_equal(
              _decode(batch, "negative", b, shape.segments,
                      shape.negative.rows, shape.examples, j),
              enc(n, spec.negative_len))
      seen += 1
  assert seen > 100


# ------------------------------------------------------------------ determinism


@pytest.mark.parametrize("mode", ["ft", "pft"])
def test_deterministic_and_seed_dependent(mode):
  def build(seed):
    tasks = _ft_tasks(np.random.default_rng(4))
    if mode == "ft":
      return P.build_ft_iterator(tasks, tokenizer=ByteTokenizer(),
                                 num_groups=2, seed=seed)
    return P.build_pft_iterator(tasks, _pft_batch_spec(),
                                tokenizer=ByteTokenizer(), num_groups=2,
                                seed=seed)

  a, b, c = _take(build(5), 6), _take(build(5), 6), _take(build(6), 6)
  _assert_same(a, b)
  assert any(not np.array_equal(x["query_ids"], y["query_ids"])
             for x, y in zip(a, c))


@pytest.mark.parametrize("mode", ["ft", "pft"])
@pytest.mark.parametrize("prefetch", [0, 2])
def test_state_restore_gives_identical_batches(mode, prefetch):
  def build():
    tasks = _ft_tasks(np.random.default_rng(8), n_a=60, n_b=30)
    if mode == "ft":
      it = P.build_ft_iterator(tasks, tokenizer=ByteTokenizer(), num_groups=2,
                               seed=9)
    else:
      it = P.build_pft_iterator(tasks, _pft_batch_spec(),
                                tokenizer=ByteTokenizer(), num_groups=2,
                                seed=9)
    if prefetch:
      it = grain.experimental.ThreadPrefetchDatasetIterator(it, prefetch)
    return it

  it = build()
  _take(it, 7)  # several epochs of the small tasks, held-over tuples in flight
  state = json.loads(json.dumps(it.get_state()))
  if mode == "ft":  # the restore must bring back held tuples, not just positions
    inner = state["streams"]
    assert any(g["held"] for s in inner.values() for g in s.values())
  after = _take(it, 6)
  fresh = build()
  fresh.set_state(state)
  _assert_same(after, _take(fresh, 6))


def test_set_state_rejects_other_setups():
  tasks = _ft_tasks(np.random.default_rng(8), n_a=40, n_b=20)
  it = P.build_ft_iterator(tasks, tokenizer=ByteTokenizer(), num_groups=2,
                           seed=1)
  next(it)
  state = it.get_state()
  other = P.build_ft_iterator(tasks, tokenizer=ByteTokenizer(), num_groups=2,
                              seed=2)
  with pytest.raises(ValueError, match="seed=1"):
    other.set_state(state)
  it.set_state(dict(state, num_workers=4))  # informational (tests/test_pipeline_workers.py)
  split = P.build_ft_iterator(tasks, tokenizer=ByteTokenizer(), num_groups=2,
                              seed=1, process_index=1, process_count=2)
  only_g0 = json.loads(json.dumps(state))
  for s in only_g0["streams"].values():
    s.pop("1")
  with pytest.raises(ValueError, match="lacks group 1.*merge_states"):
    split.set_state(only_g0)


# --------------------------------------------------------------------- sharding


@pytest.mark.parametrize("mode", ["ft", "pft"])
def test_global_batch_independent_of_process_layout(mode):
  def build(pid, count):
    tasks = _ft_tasks(np.random.default_rng(10), n_a=150, n_b=60)
    kw = dict(tokenizer=ByteTokenizer(), num_groups=4, seed=11,
              process_index=pid, process_count=count)
    if mode == "ft":
      return P.build_ft_iterator(tasks, **kw)
    return P.build_pft_iterator(tasks, _pft_batch_spec(), **kw)

  one = _take(build(0, 1), 5)
  halves = [_take(build(p, 2), 5) for p in range(2)]
  quarters = [_take(build(p, 4), 5) for p in range(4)]
  for parts in (halves, quarters):
    for step, full in enumerate(one):
      for key, value in packing.model_inputs(full).items():
        joined = np.concatenate([part[step][key] for part in parts], axis=0)
        np.testing.assert_array_equal(joined, value, err_msg=key)
      assert sum(int(part[step]["num_tokens"]) for part in parts) == int(
          full["num_tokens"])
  # Any group order: local_groups=(3, 0) concatenates group 3 then group 0.
  tasks = _ft_tasks(np.random.default_rng(10), n_a=150, n_b=60)
  kw = dict(tokenizer=ByteTokenizer(), num_groups=4, seed=11,
            local_groups=(3, 0))
  it = (P.build_ft_iterator(tasks, **kw) if mode == "ft" else
        P.build_pft_iterator(tasks, _pft_batch_spec(), **kw))
  for step, got in enumerate(_take(it, 3)):
    full = one[step]
    for key, value in packing.model_inputs(got).items():
      per = full[key].shape[0] // 4
      want = np.concatenate([full[key][3 * per:], full[key][:per]])
      np.testing.assert_array_equal(value, want, err_msg=key)
  # Restoring a 2-process run's merged state on 1 process continues it exactly.
  its = [build(p, 2) for p in range(2)]
  for it in its:
    _take(it, 3)
  merged = P.merge_states([it.get_state() for it in its])
  solo = build(0, 1)
  solo.set_state(merged)
  _assert_same(_take(solo, 2), one[3:5])


class RecordingSource:
  """A random-access source that records which indices were read."""

  def __init__(self, items):
    self._items = items
    self.reads = set()

  def __len__(self):
    return len(self._items)

  def __getitem__(self, i):
    self.reads.add(int(i))
    return self._items[i]


def test_each_process_reads_only_its_shard():
  reads = []
  for pid in range(2):
    src = RecordingSource(_examples(np.random.default_rng(12), 2000, "x"))
    spec = P.BatchSpec(batch_size=8, query_len=48, positive_len=160,
                       segments=4, query_rows=8, positive_rows=8)
    task = P.TaskSpec(name="t", examples=src, batch=spec)
    it = P.build_ft_iterator([task], tokenizer=ByteTokenizer(), num_groups=4,
                             seed=0, process_index=pid, process_count=2)
    _take(it, 20)  # well within one epoch
    reads.append(src.reads)
  assert reads[0] and reads[1]
  assert not reads[0] & reads[1]


# ---------------------------------------------------------------------- sampler


def test_sampler_frequencies_match_rates():
  rates = (5.0, 3.0, 1.5, 0.0, 0.5)
  sampler = P.TaskSampler(rates=rates, seed=123)
  n = 20_000
  picks = np.array([sampler.task_at(s) for s in range(n)])
  counts = np.bincount(picks, minlength=len(rates))
  assert counts[3] == 0
  p = np.asarray(rates) / sum(rates)
  live = p > 0
  chi2 = (((counts - n * p)[live]) ** 2 / (n * p[live])).sum()
  # Under the null chi2 ~ chi-square(df=3); sf < 1e-4 would mean wrong rates.
  assert scipy_stats.chi2.sf(chi2, df=live.sum() - 1) > 1e-4, (counts, chi2)
  # A wrong distribution is caught by the same statistic.
  q = np.array([0.25, 0.25, 0.25, 0.0, 0.25])
  chi2_q = (((counts - n * q)[live]) ** 2 / (n * q[live])).sum()
  assert scipy_stats.chi2.sf(chi2_q, df=live.sum() - 1) < 1e-4


def test_ft_task_choice_same_on_every_process():
  tasks = _ft_tasks(np.random.default_rng(13), n_a=60, n_b=30)
  its = [P.build_ft_iterator(tasks, tokenizer=ByteTokenizer(), num_groups=4,
                             seed=3, process_index=p, process_count=2)
         for p in range(2)]
  seqs = [[int(b["task_index"]) for b in _take(it, 30)] for it in its]
  assert seqs[0] == seqs[1]
  assert set(seqs[0]) == {0, 1}


def test_pft_mixes_tasks_at_rates():
  tasks = _ft_tasks(np.random.default_rng(14), rates=(3.0, 1.0))
  it = P.build_pft_iterator(tasks, _pft_batch_spec(), tokenizer=ByteTokenizer(),
                            num_groups=2, seed=0)
  assert list(it.group_shapes) == ["mixture"]
  task_of = np.concatenate([b["example_task"][b["example_valid"]]
                            for b in _take(it, 20)])
  frac = (task_of == 0).mean()
  assert abs(frac - 0.75) < 0.05, frac
  b = next(it)
  assert int(b["task_index"]) == -1
  assert b["negative_tokens"].shape[1] == 160  # one shape for every task


# ----------------------------------------------------------------------- errors


def test_errors_name_the_problem():
  rng = np.random.default_rng(15)
  tasks = _ft_tasks(rng, n_a=20, n_b=10)
  kw = dict(tokenizer=ByteTokenizer(), num_groups=2, seed=0)
  empty = P.TaskSpec(name="empty_task", examples=[], batch=tasks[0].batch)
  with pytest.raises(ValueError, match="'empty_task' has no examples"):
    P.build_ft_iterator([tasks[0], empty], **kw)
  with pytest.raises(ValueError, match="'empty_task' has no examples"):
    P.build_pft_iterator([tasks[0], empty], _pft_batch_spec(), **kw)
  neg = P.TaskSpec(name="bad_rate", examples=tasks[0].examples, rate=-1.0,
                   batch=tasks[0].batch)
  with pytest.raises(ValueError, match="'bad_rate': rate=-1.0"):
    P.build_ft_iterator([tasks[1], neg], **kw)
  zeros = [P.TaskSpec(name=t.name, examples=t.examples, rate=0.0,
                      batch=t.batch) for t in tasks]
  with pytest.raises(ValueError, match="all task rates are zero"):
    P.build_ft_iterator(zeros, **kw)
  with pytest.raises(ValueError, match="all task rates are zero"):
    P.TaskSampler(rates=(0.0, 0.0), seed=0)
  with pytest.raises(ValueError,
                     match=r"batch_size=16 is not divisible by num_groups=3"
                     r".*multiple of 3, e.g. 18"):
    P.build_ft_iterator(tasks, tokenizer=ByteTokenizer(), num_groups=3, seed=0)
  rows = P.BatchSpec(batch_size=8, query_len=32, positive_len=64, query_rows=5,
                     positive_rows=4)
  with pytest.raises(ValueError, match="query_rows=5 is not divisible"):
    P.build_pft_iterator(tasks, rows, **kw)
  with pytest.raises(ValueError, match="no batch spec"):
    P.build_ft_iterator([P.TaskSpec(name="x", examples=tasks[0].examples)],
                        **kw)
  with pytest.raises(ValueError, match="multiple of process_count"):
    P.build_ft_iterator(tasks, tokenizer=ByteTokenizer(), num_groups=2, seed=0,
                        process_count=4)
  with pytest.raises(ValueError, match="local_groups=\\[0, 0\\] must be distinct"):
    P.build_ft_iterator(tasks, local_groups=(0, 0), **kw)
  with pytest.raises(ValueError, match="names must be unique"):
    P.build_ft_iterator([tasks[0], tasks[0]], **kw)
  with pytest.raises(ValueError, match="p_drop=1.5"):
    P.build_ft_iterator([P.TaskSpec(name="p", examples=tasks[0].examples,
                                    p_drop=1.5, batch=tasks[0].batch)], **kw)
  for field in ("rows_slack", "media_slack"):
    spec = dataclasses.replace(tasks[0].batch, **{field: 0.0})
    with pytest.raises(ValueError, match=f"task 's': {field}=0.0 must be > 0"):
      P.build_ft_iterator([P.TaskSpec(name="s", examples=tasks[0].examples, batch=spec)], **kw)
  with pytest.raises(ValueError, match="lookahead=-1 must be >= 0"):
    P.build_ft_iterator([P.TaskSpec(name="s", examples=tasks[0].examples,
                                    batch=dataclasses.replace(tasks[0].batch, lookahead=-1))], **kw)


def test_zero_rate_task_never_sampled():
  tasks = _ft_tasks(np.random.default_rng(16), n_a=40, n_b=20, rates=(1.0, 0.0))
  it = P.build_ft_iterator(tasks, tokenizer=ByteTokenizer(), num_groups=2,
                           seed=0)
  assert list(it.group_shapes) == ["retrieval"]
  assert all(int(b["task_index"]) == 0 for b in _take(it, 10))


@pytest.mark.parametrize("cached", [True, False])
def test_epoch_shuffle_permutes_each_epoch(monkeypatch, cached):
  if not cached:  # the large-dataset branch (grain's index_shuffle)
    monkeypatch.setattr(P.EpochShuffleMapDataset, "_PERM_CACHE_MAX", 10)
  n = 37
  ds = P.EpochShuffleMapDataset(grain.MapDataset.source(list(range(n))), seed=4)
  epochs = [[ds[e * n + i] for i in range(n)] for e in range(4)]
  for ep in epochs:
    assert sorted(ep) == list(range(n))
  assert len({tuple(ep) for ep in epochs}) == 4
  again = P.EpochShuffleMapDataset(grain.MapDataset.source(list(range(n))),
                                   seed=4)
  # Random access in any order gives the same stream (old epochs re-derived).
  assert [again[i] for i in reversed(range(4 * n))] == [
      x for ep in epochs for x in ep][::-1]
  sliced = ds[1::4]
  assert [sliced[k] for k in range(30)] == [ds[1 + 4 * k] for k in range(30)]


def test_with_package_tokenizer():
  """The real sentencepiece tokenizer: same ids as its own bos/eos/truncation."""
  from embed2.data.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  tok = Tokenizer.default()
  rng = np.random.default_rng(17)
  exs = _examples(rng, 80, "t")
  spec = P.BatchSpec(batch_size=8, query_len=12, positive_len=24,
                     negative_len=24, num_negatives=1, segments=4)
  task = P.TaskSpec(name="t", examples=exs, task_string="task: t | query: ",
                    p_drop=0.0, batch=spec)
  it = P.build_ft_iterator([task], tokenizer=tok, num_groups=2, seed=0)
  shape = it.group_shapes["t"]
  batch = next(it)
  truncated = 0
  for b in np.flatnonzero(batch["example_valid"]):
    ex = exs[int(batch["query_ids"][b])]
    want = tok.encode(task.task_string + ex["query"], add_bos=True,
                      add_eos=True, max_length=12)
    got = _decode(batch, "query", b, shape.segments, shape.query.rows,
                  shape.examples)
    np.testing.assert_array_equal(got, want)
    truncated += len(tok.encode(task.task_string + ex["query"])) > 10
    want = tok.encode(ex["positive"], add_bos=True, add_eos=True,
                      max_length=24)
    got = _decode(batch, "positive", b, shape.segments, shape.positive.rows,
                  shape.examples)
    np.testing.assert_array_equal(got, want)
  assert int(batch["query_num_truncated"]) == truncated > 0


def test_with_suggested_rows_fills_unset_rows():
  rng = np.random.default_rng(18)
  exs = _examples(rng, 500, "w")
  spec = P.BatchSpec(batch_size=32, query_len=48, positive_len=160,
                     negative_len=160, num_negatives=2, segments=8,
                     query_rows=40)
  task = P.TaskSpec(name="w", examples=exs)
  got = P.with_suggested_rows(task, spec, tokenizer=ByteTokenizer(),
                              num_groups=4, sample_size=10_000)
  assert got.query_rows == 40  # set rows are kept
  # Whole-epoch sample: the exact mean length of the data.
  tok = ByteTokenizer()
  mean_p = np.mean([min(len(tok.encode(e["positive"])), 158) + 2 for e in exs])
  assert got.positive_rows == 4 * int(np.ceil(8 * mean_p / 160))
  negs = [min(len(tok.encode(n)), 158) + 2 for e in exs
          for n in e["negatives"][:2]]
  want = int(np.ceil(8 * len(negs) / len(exs) * np.mean(negs) / 160))
  assert got.negative_rows == 4 * max(want, 2)
  it = P.build_ft_iterator([P.TaskSpec(name="w", examples=exs, batch=got)],
                           tokenizer=tok, num_groups=4, seed=0)
  assert it.group_shapes["w"].positive.rows == got.positive_rows // 4


class ReadLog:
  """A random-access source that logs every read, in order (repeats included)."""

  def __init__(self, items):
    self._items = items
    self.reads = []

  def __len__(self):
    return len(self._items)

  def __getitem__(self, i):
    self.reads.append(int(i))
    return self._items[i]


def test_skipped_over_read_is_the_bad_fraction_of_the_records_read(rng):
  """A task with undecodable records (corrupt image bytes): each host batch's `num_read` is the
  records read from the source for it and `num_skipped` the undecodable ones among them, so over
  the first batches skipped / read is exactly the bad fraction of the records read. The old
  reading, skipped / (skipped + num_examples), is higher while the lookahead window holds good
  tuples read ahead of what it packed, and could stop a run whose bad fraction is under the limit."""
  from embed2.data import interleave  # pylint: disable=g-import-not-at-top
  from embed2.data.segments import Image  # pylint: disable=g-import-not-at-top
  from embed2.data.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  from embed2.model import ModelConfig  # pylint: disable=g-import-not-at-top
  tok = Tokenizer.default()
  cfg = ModelConfig.from_dict(dict(preset="tiny", vocab_size=tok.vocab_size, media=dict(
      image_frontend="patch", image_size=16, patch_size=8, image_tokens=4)))
  corrupt = Image(data=b"\x89PNG\r\n\x1a\n" + bytes(40))  # a PNG signature, then no valid chunk
  n = 400
  bad = rng.random(n) < 0.2
  items = [{"query": corrupt if bad[i] else
                     [Image(pixels=rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)), f"shape {i}"],
            "positive": f"caption {i} " + "word " * int(rng.integers(1, 12)),
            "query_id": i, "positive_id": i} for i in range(n)]
  src = ReadLog(items)
  task = P.TaskSpec(name="img", examples=src, batch=P.BatchSpec(
      batch_size=16, query_len=32, positive_len=24, segments=4))
  it = P.build_ft_iterator([task], tokenizer=tok, num_groups=2, seed=0,
                           encoder=interleave.InputEncoder(tok, cfg))
  src.reads.clear()  # the rows / media-slot suggestion read a sample; the batches start now
  read = skipped = examples = 0
  for _ in range(4):
    before = len(src.reads)
    b = next(it)
    now = src.reads[before:]
    assert int(b["num_read"]) == len(now)
    assert int(b["num_skipped"]) == int(bad[now].sum())
    read += int(b["num_read"])
    skipped += int(b["num_skipped"])
    examples += int(b["num_examples"])
    assert skipped / read == bad[src.reads].mean()
    # Each group's window still holds good tuples it read and did not pack yet.
    assert skipped / (skipped + examples) > skipped / read
  assert skipped > 0
