"""Tests for embed2.data.packing: the batch contract and the packing policy."""

import numpy as np
import pytest

from embed2.data import packing
from embed2.data.packing import GroupShape, SideShape


def _lognormal_lengths(rng, n, median, sigma, max_len, min_len=3):
  x = np.exp(np.log(median) + sigma * rng.standard_normal(n))
  return np.clip(np.round(x), min_len, max_len).astype(int)


def _make_examples(rng, n, *, lq, lp, ln, k_max, q_median=18, p_median=140,
                   sigma=0.8):
  """Tuples with random token content (never 0) and realistic lengths."""
  ql = _lognormal_lengths(rng, n, q_median, 0.6, lq)
  pl = _lognormal_lengths(rng, n, p_median, sigma, lp)
  out = []
  for i in range(n):
    k_i = int(rng.integers(0, k_max + 1)) if k_max else 0
    nl = _lognormal_lengths(rng, k_i, p_median, sigma, ln) if k_i else []
    out.append({
        "query_tokens": rng.integers(3, 1000, ql[i]).astype(np.int32),
        "positive_tokens": rng.integers(3, 1000, pl[i]).astype(np.int32),
        "negative_tokens": [rng.integers(3, 1000, m).astype(np.int32)
                            for m in nl],
        "query_id": int(rng.integers(0, 2**31)),
        "positive_id": i,
        "task_index": int(rng.integers(0, 3)),
        "query_truncated": int(ql[i] == lq),
        "positive_truncated": int(pl[i] == lp),
        "negative_truncated": int(sum(m == ln for m in nl)),
    })
  return out


def _shape(b_g=16, s=4, k=2, rows=(6, 8, 12), lens=(48, 256, 256), mm=8, w=0):
  return GroupShape(
      examples=b_g, segments=s, num_negatives=k, max_misses=mm, lookahead=w,
      query=SideShape(length=lens[0], rows=rows[0]),
      positive=SideShape(length=lens[1], rows=rows[1]),
      negative=SideShape(length=lens[2], rows=rows[2]) if k else None)


def _extract(batch, side, slot, s_max):
  """Tokens and positions of the example at a per-group slot (group 0)."""
  r, seg = divmod(int(slot), s_max)
  m = batch[f"{side}_segment_ids"][r] == seg + 1
  return batch[f"{side}_tokens"][r][m], batch[f"{side}_positions"][r][m], m


def _check_batch(shape, batch, originals):
  """Checks one group batch against the contract; returns accepted originals."""
  s_max, k = shape.segments, shape.num_negatives
  valid = batch["example_valid"]
  n = int(valid.sum())
  assert valid[:n].all() and not valid[n:].any()  # valid first, padding last
  assert int(batch["num_examples"]) == n
  for side in shape.sides:
    ss = shape.side(side)
    toks, seg, pos = (batch[f"{side}_tokens"], batch[f"{side}_segment_ids"],
                      batch[f"{side}_positions"])
    assert toks.shape == seg.shape == pos.shape == (ss.rows, ss.length)
    assert toks.dtype == seg.dtype == pos.dtype == np.int32
    pad = seg == 0
    assert (toks[pad] == 0).all() and (pos[pad] == 0).all()
    assert (toks[~pad] != 0).all()
    assert seg.max() <= s_max
    for r in range(ss.rows):
      # Segments of a row are contiguous runs 1, 2, ... in order, padding last.
      ids = seg[r][seg[r] > 0]
      if ids.size:
        runs = ids[np.r_[True, ids[1:] != ids[:-1]]]
        np.testing.assert_array_equal(runs, np.arange(1, runs.size + 1))
        assert (seg[r][:ids.size] > 0).all()
    assert int(batch[f"{side}_num_tokens"]) == int((~pad).sum())
  covered = {side: np.zeros(batch[f"{side}_tokens"].shape, bool)
             for side in shape.sides}
  for b in range(shape.examples):
    if not valid[b]:
      assert batch["query_slot"][b] == 0 and batch["positive_slot"][b] == 0
      assert batch["query_ids"][b] == -1 and batch["example_task"][b] == -1
      if k:
        assert not batch["negative_valid"][b].any()
      continue
    ex = originals[b]
    assert batch["query_ids"][b] == ex["query_id"]
    assert batch["positive_ids"][b] == ex["positive_id"]
    assert batch["example_task"][b] == ex["task_index"]
    for side in ("query", "positive"):
      t, p, m = _extract(batch, side, batch[f"{side}_slot"][b], s_max)
      np.testing.assert_array_equal(t, ex[f"{side}_tokens"])
      np.testing.assert_array_equal(p, np.arange(t.size))
      r = int(batch[f"{side}_slot"][b]) // s_max
      assert not covered[side][r][m].any()  # no two examples share a slot
      covered[side][r][m] = True
    if k:
      negs = ex["negative_tokens"][:k]
      np.testing.assert_array_equal(batch["negative_valid"][b],
                                    np.arange(k) < len(negs))
      for j, want in enumerate(negs):
        t, p, m = _extract(batch, "negative", batch["negative_slot"][b, j],
                           s_max)
        np.testing.assert_array_equal(t, want)
        np.testing.assert_array_equal(p, np.arange(t.size))
        r = int(batch["negative_slot"][b, j]) // s_max
        assert not covered["negative"][r][m].any()
        covered["negative"][r][m] = True
      assert (batch["negative_slot"][b, len(negs):] == 0).all()
  for side in shape.sides:  # every non-pad token belongs to an accepted example
    np.testing.assert_array_equal(covered[side],
                                  batch[f"{side}_segment_ids"] > 0)


def _accepted_keys(shape, examples, num_batches, held_before=None):
  """Packs and checks; returns the keys of accepted examples per batch (and, into
  `held_before`, the held keys each batch started from)."""
  stream = iter(enumerate(examples))
  pulled, held, out = [], [], []

  def pull():
    item = next(stream)
    pulled.append(item[0])
    return item

  # Reconstruct which key is at which example slot: pack_group accepts in try
  # order, so re-derive it from the query ids (unique per example here).
  by_qid = {ex["query_id"]: key for key, ex in enumerate(examples)}
  for _ in range(num_batches):
    if held_before is not None:
      held_before.append([key for key, _ in held])
    batch, held = packing.pack_group(shape, held, pull)
    n = int(batch["example_valid"].sum())
    keys = [by_qid[int(q)] for q in batch["query_ids"][:n]]
    _check_batch(shape, batch, [examples[i] for i in keys])
    out.append(keys)
  return out, pulled, [key for key, _ in held]


@pytest.mark.parametrize("k,w", [(0, 0), (2, 0), (0, 12), (2, 12)])
def test_pack_group_contract_and_no_loss(k, w):
  rng = np.random.default_rng(1234 + k + w)
  shape = _shape(k=k, w=w)
  examples = _make_examples(rng, 600, lq=48, lp=256, ln=256, k_max=3)
  # Unique query ids so tests can map slots back to examples.
  for i, ex in enumerate(examples):
    ex["query_id"] = i * 7 + 11
  starts = []
  batches, pulled, held = _accepted_keys(shape, examples, 25, starts)
  flat = [key for keys in batches for key in keys]
  # Every pulled tuple is accepted exactly once or still held; never dropped.
  assert len(flat) == len(set(flat))
  assert sorted(flat + held) == sorted(pulled)
  assert pulled == list(range(len(pulled)))  # the stream is read in order
  # At most W + max_misses tuples are held; the oldest starts every batch, so none
  # waits longer than that many batches.
  assert all(len(h) <= w + shape.max_misses for h in starts + [held])
  for keys, before in zip(batches, starts):
    if before:
      assert keys[0] == min(before) == before[0]
  read_in = {}  # key -> first batch whose held list or acceptance shows it
  for i, (keys, before) in enumerate(zip(batches, starts)):
    for key in before + keys:
      read_in.setdefault(key, i)
  for i, keys in enumerate(batches):
    for key in keys:
      assert i - read_in[key] <= w + shape.max_misses
  if w:  # the window changes the order tuples are accepted in
    assert flat != sorted(flat)


def _window_examples(rng, n):
  """Queries and positives of independent lengths: strict order fills one side first."""
  out = []
  for i in range(n):
    out.append({"query_tokens": rng.integers(3, 99, int(rng.integers(4, 60))).astype(np.int32),
                "positive_tokens": rng.integers(3, 99, int(rng.integers(4, 60))).astype(np.int32),
                "query_id": i, "positive_id": i, "task_index": 0})
  return out


def test_choose_minimises_the_documented_score():
  """`_Window.choose` against the module docstring's formula, computed here in float64 from the
  batch's state after a few random placements."""
  rng = np.random.default_rng(21)
  for trial in range(20):
    shape = GroupShape(examples=16, segments=4, num_negatives=0, lookahead=10,
                       query=SideShape(length=64, rows=6),
                       positive=SideShape(length=96, rows=5))
    rows = {s: packing._Rows(shape.side(s), shape.segments) for s in shape.sides}
    examples = _window_examples(rng, 40)
    n = int(rng.integers(1, 8))
    for ex in examples[:n]:
      for s in shape.sides:
        rows[s].place(ex[f"{s}_tokens"].size)
    window = packing._Window(shape, 10)
    cands = [packing._Candidate((i, ex), shape) for i, ex in enumerate(examples[n:n + 10])]
    for c in cands:
      window.add(c)
    window.set_aside(cands[3])  # set-aside candidates are not offered again
    got = window.choose(rows, n)
    cands.pop(3)
    caps = {s: shape.side(s).rows * shape.side(s).length for s in shape.sides}
    total = sum(caps.values())
    best, best_score = None, np.inf
    for c in cands:
      ex = c.item[1]
      fits = True
      score = 0.0
      for s in shape.sides:
        m = ex[f"{s}_tokens"].size
        open_rows = rows[s].used < shape.segments
        if not (open_rows & (rows[s].free >= m)).any():
          fits = False
        used = caps[s] - float(rows[s].free.sum())
        score += caps[s] / total * ((used + m) / caps[s] - (n + 1) / shape.examples) ** 2
      if fits and score < best_score:
        best, best_score = c, score
    assert got is best, trial


def test_lookahead_fills_both_sides_where_strict_order_fills_one():
  rng = np.random.default_rng(8)
  examples = _window_examples(rng, 4000)
  fill = {}
  for w in (0, 32):
    shape = GroupShape(examples=32, segments=8, num_negatives=0, lookahead=w,
                       query=SideShape(length=256, rows=4),
                       positive=SideShape(length=256, rows=4))
    stream = iter(enumerate(examples))
    held, groups = [], []
    for _ in range(40):
      gb, held = packing.pack_group(shape, held, lambda: next(stream))
      _check_batch(shape, gb, [examples[int(q)] for q in gb["query_ids"][gb["example_valid"]]]
                   + [None] * int((~gb["example_valid"]).sum()))
      groups.append(gb)
    batch = packing.concat_groups(shape, groups)
    fill[w] = {s: float(batch[f"{s}_nonpad_fraction"]) for s in shape.sides}
    fill[w]["examples"] = float(batch["example_fill"])
  # 32 tuples of mean 2 x 32 tokens fill 2 x 1024 row tokens on average; in order,
  # each batch ends when its fuller side is full and the other lags (~94%).
  assert min(fill[32]["query"], fill[32]["positive"]) >= 0.95, fill
  assert (fill[32]["query"] + fill[32]["positive"]
          >= fill[0]["query"] + fill[0]["positive"] + 0.025), fill
  assert fill[32]["examples"] >= fill[0]["examples"] + 0.02, fill


def test_held_over_tuple_starts_next_batch():
  shape = GroupShape(examples=4, segments=2, num_negatives=0, max_misses=1,
                     query=SideShape(length=8, rows=2),
                     positive=SideShape(length=8, rows=2))

  def ex(i, q, p):
    return {"query_tokens": np.full(q, 5 + i, np.int32),
            "positive_tokens": np.full(p, 5 + i, np.int32),
            "query_id": i, "positive_id": i}

  # Positives of 6, 6 fill both rows to 6/8; the third (6 long) fits nowhere.
  examples = [ex(0, 2, 6), ex(1, 2, 6), ex(2, 2, 6), ex(3, 2, 2)]
  examples += [ex(i, 1, 1) for i in range(4, 20)]
  stream = iter(enumerate(examples))
  b1, held = packing.pack_group(shape, [], lambda: next(stream))
  assert [k for k, _ in held] == [2]
  np.testing.assert_array_equal(b1["query_ids"], [0, 1, -1, -1])
  np.testing.assert_array_equal(b1["example_valid"], [1, 1, 0, 0])
  b2, held = packing.pack_group(shape, held, lambda: next(stream))
  assert b2["query_ids"][0] == 2  # the held tuple is the first of the next batch
  assert b2["query_ids"][1] == 3
  # Its positive went into an empty row of the new batch.
  t, p, _ = _extract(b2, "positive", b2["positive_slot"][0], 2)
  np.testing.assert_array_equal(t, np.full(6, 7))


def test_batch_closes_on_example_count_and_keeps_untried_held():
  shape = _shape(b_g=2, k=0, rows=(4, 4))
  rng = np.random.default_rng(5)
  examples = _make_examples(rng, 10, lq=48, lp=256, ln=256, k_max=0,
                            p_median=20)
  held = [(100 + i, examples[i]) for i in range(5)]
  batch, new_held = packing.pack_group(shape, held, lambda: pytest.fail("read"))
  assert int(batch["num_examples"]) == 2
  assert [k for k, _ in new_held] == [102, 103, 104]


def test_padding_examples_are_masked_and_slots_in_range():
  rng = np.random.default_rng(7)
  shape = _shape(b_g=32, s=3, k=1, rows=(12, 11, 11), mm=4)
  examples = _make_examples(rng, 400, lq=48, lp=256, ln=256, k_max=2)
  stream = iter(enumerate(examples))
  saw_padding = False
  for _ in range(10):
    batch, _ = packing.pack_group(shape, [], lambda: next(stream))
    for side in shape.sides:
      n_slots = shape.side(side).rows * shape.segments
      assert (batch[f"{side}_slot"] >= 0).all()
      assert (batch[f"{side}_slot"] < n_slots).all()
    saw_padding |= not batch["example_valid"].all()
  assert saw_padding  # rows are tight, so some batches close early


def test_concat_groups_layout_and_stats():
  rng = np.random.default_rng(3)
  shape = _shape(b_g=8, k=2)
  examples = _make_examples(rng, 200, lq=48, lp=256, ln=256, k_max=3)
  stream = iter(enumerate(examples))
  groups = [packing.pack_group(shape, [], lambda: next(stream))[0]
            for _ in range(3)]
  batch = packing.concat_groups(shape, groups)
  for side in shape.sides:
    ss = shape.side(side)
    assert batch[f"{side}_tokens"].shape == (3 * ss.rows, ss.length)
    for g in range(3):  # rows [g*R_g, (g+1)*R_g) are group g's
      np.testing.assert_array_equal(
          batch[f"{side}_tokens"][g * ss.rows:(g + 1) * ss.rows],
          groups[g][f"{side}_tokens"])
    want = sum(int((gb[f"{side}_segment_ids"] > 0).sum()) for gb in groups)
    assert int(batch[f"{side}_num_tokens"]) == want
    np.testing.assert_allclose(float(batch[f"{side}_nonpad_fraction"]),
                               want / (3 * ss.rows * ss.length))
  assert batch["negative_slot"].shape == (24, 2)
  np.testing.assert_array_equal(batch["query_slot"][8:16],
                                groups[1]["query_slot"])
  stats = packing.batch_stats(batch)
  assert stats["num_tokens"] == sum(stats[f"{s}_num_tokens"]
                                    for s in shape.sides)
  assert stats["num_truncated"] == sum(stats[f"{s}_num_truncated"]
                                       for s in shape.sides)
  assert all(np.ndim(v) > 0 for v in packing.model_inputs(batch).values())
  assert "num_tokens" not in packing.model_inputs(batch)


def test_one_group_batch_is_the_group_batch_never_reused(rng):
  """With one group, concat_groups hands the group batch's arrays on without a copy (media slots are
  most of a batch's bytes), which is safe because pack_group makes new arrays for every batch: no
  batch shares memory with another or changes while later ones are packed."""
  shape = _shape(b_g=8, k=2)
  examples = _make_examples(rng, 200, lq=48, lp=256, ln=256, k_max=3)
  stream, held, batches, copies = iter(enumerate(examples)), [], [], []
  for _ in range(3):
    gb, held = packing.pack_group(shape, held, lambda: next(stream))
    batch = packing.concat_groups(shape, [gb])
    assert all(batch[k] is v for k, v in gb.items() if v.ndim)
    batches.append(batch)
    copies.append({k: v.copy() for k, v in batch.items()})
  for batch, copy in zip(batches, copies):
    for k, v in copy.items():
      np.testing.assert_array_equal(batch[k], v)
  for i, a in enumerate(batches):
    for b in batches[i + 1:]:
      assert not any(np.shares_memory(a[k], b[k]) for k in packing.model_inputs(a))


def test_nonpad_fraction_on_realistic_mix():
  """>= 95% non-pad tokens with suggested rows on a query/passage length mix."""
  rng = np.random.default_rng(11)
  lq, lp, ln, k, b_g, s = 128, 512, 512, 1, 256, 16
  examples = _make_examples(rng, 12000, lq=lq, lp=lp, ln=ln, k_max=0)
  for ex in examples:  # one hard negative each, same length law as passages
    ex["negative_tokens"] = [np.ones(m, np.int32) for m in
                             _lognormal_lengths(rng, 1, 140, 0.8, ln)]
  sample = examples[:1000]
  rows = {
      "query": packing.suggest_rows([e["query_tokens"].size for e in sample],
                                    sequences=b_g, length=lq, segments=s),
      "positive": packing.suggest_rows(
          [e["positive_tokens"].size for e in sample], sequences=b_g,
          length=lp, segments=s),
      "negative": packing.suggest_rows(
          [e["negative_tokens"][0].size for e in sample], sequences=b_g,
          length=ln, segments=s),
  }
  shape = GroupShape(examples=b_g, segments=s, num_negatives=k,
                     query=SideShape(length=lq, rows=rows["query"]),
                     positive=SideShape(length=lp, rows=rows["positive"]),
                     negative=SideShape(length=ln, rows=rows["negative"]))
  stream = iter(enumerate(examples[1000:]))
  held, groups = [], []
  for _ in range(30):
    gb, held = packing.pack_group(shape, held, lambda: next(stream))
    groups.append(gb)
  batch = packing.concat_groups(shape, groups)
  capacity = sum(30 * shape.side(x).rows * shape.side(x).length
                 for x in shape.sides)
  overall = int(batch["num_tokens"]) / capacity
  assert overall >= 0.95, (overall, packing.batch_stats(batch))
  for side in shape.sides:
    assert float(batch[f"{side}_nonpad_fraction"]) >= 0.92
  assert float(batch["example_fill"]) >= 0.93
  # One example per row (no packing) wastes most of the rows on this mix.
  padded = GroupShape(examples=b_g, segments=1, num_negatives=k,
                      query=SideShape(length=lq, rows=b_g),
                      positive=SideShape(length=lp, rows=b_g),
                      negative=SideShape(length=ln, rows=b_g))
  stream = iter(enumerate(examples[1000:]))
  pb, _ = packing.pack_group(padded, [], lambda: next(stream))
  pb = packing.concat_groups(padded, [pb])
  assert float(pb["positive_nonpad_fraction"]) < 0.5
  assert bool(pb["example_valid"].all())


def test_suggest_rows_formula():
  lengths = np.array([10, 20, 30, 600])  # 600 is clipped to L=100
  assert packing.suggest_rows(lengths, sequences=50, length=100,
                              segments=16) == int(np.ceil(50 * 40 / 100))
  assert packing.suggest_rows(lengths, sequences=50, length=100, segments=16,
                              slack=1.02) == int(np.ceil(50 * 40 / 100 * 1.02))
  # Segment-limited: 64 one-token sequences with S=4 need 16 rows.
  assert packing.suggest_rows([1], sequences=64, length=100, segments=4) == 16
  with pytest.raises(ValueError, match="non-empty"):
    packing.suggest_rows([], sequences=1, length=8, segments=1)


def test_fold_wide_ids():
  rng = np.random.default_rng(0)
  shape = _shape(b_g=2, k=0, rows=(2, 2))
  ex = _make_examples(rng, 2, lq=48, lp=256, ln=256, k_max=0, p_median=20)
  ex[0]["query_id"] = 2**63 + 12345
  ex[1]["query_id"] = -5
  stream = iter(enumerate(ex))
  batch, _ = packing.pack_group(shape, [], lambda: next(stream))
  assert batch["query_ids"].dtype == np.int32
  assert (batch["query_ids"] >= 0).all()


def test_shape_validation_errors():
  with pytest.raises(ValueError, match="negative rows=1 < num_negatives=2"):
    _shape(k=2, rows=(6, 8, 1))
  with pytest.raises(ValueError, match="raise the query rows"):
    _shape(b_g=16, s=2, rows=(4, 8, 12))
  with pytest.raises(ValueError, match="negative SideShape iff"):
    GroupShape(examples=2, segments=2, num_negatives=1,
               query=SideShape(length=8, rows=2),
               positive=SideShape(length=8, rows=2))
  shape = _shape(b_g=2, k=0, rows=(2, 2), lens=(4, 8, 8))
  too_long = {"query_tokens": np.ones(5, np.int32),
              "positive_tokens": np.ones(3, np.int32),
              "query_id": 0, "positive_id": 0}
  with pytest.raises(ValueError, match="does not fit length=4"):
    packing.pack_group(shape, [], lambda: (0, too_long))


@pytest.mark.parametrize("w", [0, 8])
def test_finite_stream_packs_what_was_read(w):
  rng = np.random.default_rng(17)
  examples = _window_examples(rng, 5)
  shape = GroupShape(examples=8, segments=4, num_negatives=0, lookahead=w,
                     query=SideShape(length=128, rows=4), positive=SideShape(length=128, rows=4))
  stream = iter(enumerate(examples))
  batch, held = packing.pack_group(shape, [], lambda: next(stream))
  assert not held and int(batch["num_examples"]) == 5
  _check_batch(shape, batch, [examples[int(q)] for q in batch["query_ids"][:5]] + [None] * 3)
  batch, held = packing.pack_group(shape, [], lambda: next(stream))
  assert not held and int(batch["num_examples"]) == 0


@pytest.mark.parametrize("w", [0, 16])
def test_read_and_skipped_are_counted_when_a_record_is_pulled(rng, w):
  """`num_read` counts the records pulled from the stream (good or bad), `num_skipped` the ones
  dropped among them, both at the pull: over any first batches skipped / read is exactly the bad
  fraction of what was pulled. Every pulled record is skipped, packed or held, once. Counting the
  packed examples instead overstates the bad fraction while the window holds tuples read ahead."""
  from embed2.data.interleave import Media  # pylint: disable=g-import-not-at-top
  shape = _shape(k=2, w=w)
  examples = _make_examples(rng, 400, lq=48, lp=256, ln=256, k_max=3)
  for i, ex in enumerate(examples):
    ex["query_id"] = i
  kinds = rng.choice(["good", "bad", "oversize"], size=len(examples), p=[0.7, 0.25, 0.05])
  for i in np.flatnonzero(kinds == "bad"):  # what transforms.Tokenize makes of an undecodable record
    examples[i] = {packing.SKIPPED: f"record {i}: corrupt image", "query_id": i}
  for i in np.flatnonzero(kinds == "oversize"):  # more images than the side has slots (none)
    examples[i]["query_media"] = (Media(kind="image", array=np.zeros((2, 2, 3), np.uint8),
                                        offset=0, tokens=1),)
  stream = iter(enumerate(examples))
  pulled = []

  def pull():
    item = next(stream)
    pulled.append(item[0])
    return item

  held, packed = [], []
  tot_read = tot_skipped = tot_examples = 0
  for _ in range(6):
    before = len(pulled)
    batch, held = packing.pack_group(shape, held, pull)
    now = pulled[before:]
    assert int(batch["num_read"]) == len(now)
    assert int(batch["num_skipped"]) == int(np.sum(kinds[now] != "good"))
    n = int(batch["num_examples"])
    packed += [int(q) for q in batch["query_ids"][:n]]
    tot_read += int(batch["num_read"])
    tot_skipped += int(batch["num_skipped"])
    tot_examples += n
    bad_fraction = np.mean(kinds[pulled] != "good")
    assert tot_skipped / tot_read == bad_fraction
    good = [i for i in pulled if kinds[i] == "good"]
    assert sorted(packed + [key for key, _ in held]) == good  # nothing lost, nothing twice
    if held:  # the old reading (skipped + examples as "read") sees a higher bad fraction
      assert tot_skipped / (tot_skipped + tot_examples) > bad_fraction
  assert tot_skipped > 0 and tot_read == len(pulled)
  if w:
    assert held  # the window did read ahead of what it packed
