"""Retrieval metrics against hand-computed values and an independent float64 reference."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embed2.eval import metrics


# ------------------------------------------------------------------------------------------------
# Independent reference: one query at a time, straight from the definitions.
# ------------------------------------------------------------------------------------------------

def _reference(ranking, judged, k):
  """(recall, precision, ndcg, mrr, ap) @k for one query, as trec_eval computes them (P_k, ndcg_cut_k,
  recall_k, map_cut_k; recip_rank cut at k); ranking: list of doc ids, best first, possibly shorter
  than k (the missing ranks are non-relevant)."""
  top = list(ranking)[:k]
  relevant = {d for d, g in judged.items() if g > 0}
  hits = sum(1 for d in top if d in relevant)
  recall = hits / len(relevant)
  precision = hits / k  # trec_eval divides by the cut-off, however many documents were retrieved
  dcg = sum(max(judged.get(d, 0.0), 0.0) / math.log2(r + 2) for r, d in enumerate(top))
  ideal = sorted((g for g in judged.values() if g > 0), reverse=True)[:k]
  idcg = sum(g / math.log2(r + 2) for r, g in enumerate(ideal))
  ndcg = dcg / idcg
  mrr = 0.0
  for r, d in enumerate(top):
    if d in relevant:
      mrr = 1.0 / (r + 1)
      break
  ap, seen = 0.0, 0
  for r, d in enumerate(top):
    if d in relevant:
      seen += 1
      ap += seen / (r + 1)
  return recall, precision, ndcg, mrr, ap / len(relevant)


def _trec_order(scores_n):
  """trec_eval's order of a run: score descending, ties by document id descending."""
  return sorted(range(len(scores_n)), key=lambda d: (-scores_n[d], -d))


def test_hand_computed_graded():
  # Ranking 3, 1, 0, 2; judged grades: doc 1 -> 2, doc 2 -> 1, doc 5 -> 3 (never retrieved),
  # doc 0 -> 0 (judged non-relevant). Gains by rank: 0, 2, 0, 1; 3 relevant documents.
  ranked = np.array([[3, 1, 0, 2]])
  rel = [{1: 2, 2: 1, 5: 3, 0: 0}]
  m = metrics.retrieval_metrics(ranked, rel, ks=(1, 2, 4))
  l3, l5 = math.log2(3), math.log2(5)
  expected = {
      "recall@1": 0.0, "recall@2": 1 / 3, "recall@4": 2 / 3,
      "precision@1": 0.0, "precision@2": 0.5, "precision@4": 0.5,
      # DCG@2 = 2/log2(3); IDCG@2 = 3/1 + 2/log2(3).
      "ndcg@1": 0.0, "ndcg@2": (2 / l3) / (3 + 2 / l3),
      # DCG@4 = 2/log2(3) + 1/log2(5); IDCG@4 = 3 + 2/log2(3) + 1/log2(4).
      "ndcg@4": (2 / l3 + 1 / l5) / (3 + 2 / l3 + 1 / 2),
      "mrr@1": 0.0, "mrr@2": 0.5, "mrr@4": 0.5,
      # precision at the relevant ranks 2 and 4: 1/2 and 2/4, over 3 relevant.
      "map@1": 0.0, "map@2": 0.5 / 3, "map@4": 1.0 / 3, "map": 1.0 / 3,
  }
  for key, value in expected.items():
    assert m[key] == pytest.approx(value, abs=1e-12), key
  assert m["num_queries"] == 1 and m["num_queries_no_relevant"] == 0


def test_rank_topk_ties_and_nan():
  # Equal scores go to the higher index, as trec_eval orders a run (score, then docno descending).
  scores = np.array([[1.0, 3.0, 3.0, 2.0, 3.0], [np.nan, 0.0, 0.0, -1.0, 5.0]])
  np.testing.assert_array_equal(metrics.rank_topk(scores, 3), [[4, 2, 1], [4, 2, 1]])
  np.testing.assert_array_equal(metrics.rank_topk(scores, 10)[1], [4, 2, 1, 3, 0])  # clip, NaN last
  np.testing.assert_array_equal(metrics.rank_topk(np.array([[np.nan, 1.0, np.nan]]), 3),
                                [[1, 2, 0]])  # NaNs last, among themselves by index descending


def test_no_relevant_queries_excluded_and_counted():
  ranked = np.array([[0, 1, 2], [1, 0, 2], [2, 1, 0]])
  rel = [{0: 1}, {}, {1: 0}]  # query 1: no judgments; query 2: only a grade-0 judgment
  m = metrics.retrieval_metrics(ranked, rel, ks=(1,), per_query=True)
  assert m["num_queries"] == 3 and m["num_queries_no_relevant"] == 2
  assert m["recall@1"] == 1.0 and m["ndcg@1"] == 1.0  # mean over query 0 only
  assert np.isnan(m["recall@1/per_query"][1:]).all()
  m = metrics.retrieval_metrics(ranked[1:], rel[1:], ks=(1,))
  assert math.isnan(m["ndcg@1"]) and m["num_queries_no_relevant"] == 2


def test_k_larger_than_ranking_counts_missing_ranks_non_relevant():
  """A ranking of K < k documents is scored as trec_eval scores a run that retrieved K: the ranks
  past K are non-relevant, so P@k divides by k and nDCG@k's ideal runs to rank k."""
  # 5 documents ranked, 6 judged relevant (doc 5, grade 3, and docs 8, 11 never retrieved).
  ranked = np.array([[7, 2, 9, 4, 0]])
  rel = [{7: 1, 9: 2, 0: 1, 5: 3, 8: 1, 11: 1, 2: 0}]
  m = metrics.retrieval_metrics(ranked, rel, ks=(5, 10))
  log2 = math.log2
  dcg = 1 / log2(2) + 2 / log2(4) + 1 / log2(6)
  idcg10 = 3 / log2(2) + 2 / log2(3) + sum(1 / log2(r + 1) for r in range(3, 7))  # 6 relevant
  idcg5 = 3 / log2(2) + 2 / log2(3) + sum(1 / log2(r + 1) for r in range(3, 6))
  expected = {
      "precision@5": 3 / 5, "precision@10": 3 / 10, "ndcg@5": dcg / idcg5, "ndcg@10": dcg / idcg10,
      "recall@5": 3 / 6, "recall@10": 3 / 6, "mrr@10": 1.0,
      "map@5": (1 / 1 + 2 / 3 + 3 / 5) / 6, "map@10": (1 / 1 + 2 / 3 + 3 / 5) / 6,
      "map": (1 / 1 + 2 / 3 + 3 / 5) / 6,
  }
  for key, value in expected.items():
    assert m[key] == pytest.approx(value, abs=1e-12), key
  # The whole corpus ranked (N = 3 < k = 10) is scored the same way.
  m = metrics.retrieval_metrics(np.array([[2, 0, 1]]), [{0: 1, 1: 2}], ks=(1, 10), num_docs=3)
  assert m["precision@10"] == pytest.approx(2 / 10)
  assert m["recall@10"] == 1.0 and m["mrr@10"] == 0.5
  assert m["ndcg@10"] == pytest.approx((1 / log2(3) + 2 / log2(4)) / (2 + 1 / log2(3)))
  # A ranking cut short of a corpus known to be larger is refused.
  with pytest.raises(ValueError, match="retrieve more"):
    metrics.retrieval_metrics(np.array([[2, 0]]), [{0: 1}], ks=(10,), num_docs=3)
  with pytest.raises(ValueError, match="twice"):
    metrics.retrieval_metrics(np.array([[1, 1, 0]]), [{0: 1}], ks=(1,))


def test_short_rankings_match_trec_reference(rng):
  """Random runs of every width 1..12 asked at k up to 20, with graded judgments that include
  documents never retrieved, against the trec_eval formulas (float64, one query at a time)."""
  num_q, num_docs, ks = 60, 40, (1, 3, 5, 10, 20)
  for width in range(1, 13):
    scores_qn = rng.integers(0, 5, (num_q, num_docs)).astype(np.float64)  # many ties
    ranked_qk = metrics.rank_topk(scores_qn, width)
    rel = []
    for _ in range(num_q):
      docs = rng.choice(num_docs, int(rng.integers(1, 15)), replace=False)
      rel.append({int(d): float(rng.integers(0, 4)) for d in docs})
    rel[0][int(ranked_qk[0, 0])] = 2.0  # at least one query with a relevant document
    got = metrics.retrieval_metrics(ranked_qk, rel, ks, per_query=True)
    for q in range(num_q):
      order = _trec_order(scores_qn[q])[:width]
      assert list(ranked_qk[q]) == order, q
      if not any(g > 0 for g in rel[q].values()):
        continue
      for k in ks:
        ref = _reference(order, rel[q], k)
        for i, name in enumerate(("recall", "precision", "ndcg", "mrr", "map")):
          assert got[f"{name}@{k}/per_query"][q] == pytest.approx(ref[i], abs=1e-12), (
              width, q, name, k)


def test_padding_minus_one_is_not_relevant():
  m = metrics.retrieval_metrics(np.array([[-1, -1, 3]]), [{3: 2}], ks=(1, 3))
  assert m["recall@1"] == 0.0 and m["mrr@3"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_runs_match_reference_dict_and_dense(seed):
  rng = np.random.default_rng(seed)
  num_q, num_docs, ks = 40, 30, (1, 3, 5, 10, 50)
  grades_qn = rng.integers(0, 4, (num_q, num_docs)) * (rng.random((num_q, num_docs)) < 0.2)
  grades_qn[0] = 0  # a query with no relevant document
  scores_qn = rng.integers(0, 6, (num_q, num_docs)).astype(np.float64)  # many ties
  ranked_qk = metrics.rank_topk(scores_qn, 50)
  rel = [{int(d): float(g) for d, g in enumerate(row) if g > 0 or rng.random() < 0.1}
         for row in grades_qn]
  dense = metrics.retrieval_metrics(ranked_qk, grades_qn.astype(np.float64), ks)
  sparse = metrics.retrieval_metrics(ranked_qk, rel, ks)
  valid = [q for q in range(num_q) if grades_qn[q].any()]
  for q in range(num_q):
    assert list(ranked_qk[q]) == _trec_order(scores_qn[q]), q
  assert dense["num_queries_no_relevant"] == num_q - len(valid)
  for k in ks:
    ref = np.array([_reference(ranked_qk[q], rel[q], k) for q in valid]).mean(axis=0)
    for i, name in enumerate(("recall", "precision", "ndcg", "mrr", "map")):
      assert dense[f"{name}@{k}"] == pytest.approx(ref[i], abs=1e-12), (name, k)
      assert sparse[f"{name}@{k}"] == pytest.approx(ref[i], abs=1e-12), (name, k)
  assert dense["map"] == pytest.approx(dense["map@50"], abs=1e-12)


def test_perfect_and_random_rankings():
  rng = np.random.default_rng(3)
  num_q, num_docs = 2000, 50
  grades_qn = np.zeros((num_q, num_docs))
  target_q = rng.integers(0, num_docs, num_q)
  grades_qn[np.arange(num_q), target_q] = 1 + rng.integers(0, 3, num_q)
  perfect = metrics.retrieval_metrics(metrics.rank_topk(grades_qn, num_docs), grades_qn,
                                      ks=(1, 10))
  for key in ("recall@1", "ndcg@1", "mrr@1", "map", "ndcg@10", "recall@10"):
    assert perfect[key] == 1.0, key
  shuffled_qk = np.argsort(rng.random((num_q, num_docs)), axis=1)
  chance = metrics.retrieval_metrics(shuffled_qk, grades_qn, ks=(1, 10))
  # One relevant of N=50: recall@1 ~ 1/50 (sd ~ 0.003 over 2000 queries), recall@10 ~ 10/50.
  assert chance["recall@1"] == pytest.approx(1 / 50, abs=0.012)
  assert chance["recall@10"] == pytest.approx(10 / 50, abs=0.03)


@pytest.mark.parametrize("num_docs,k,chunk", [(37, 5, 8), (37, 5, 37), (37, 5, 100),
                                              (37, 12, 4), (6, 10, 4), (64, 1, 16)])
def test_chunked_topk_matches_rank_topk(num_docs, k, chunk):
  rng = np.random.default_rng(num_docs + k + chunk)
  # Small integer vectors make dot products exact in float32 and give many ties.
  q_qd = rng.integers(-1, 2, (9, 4)).astype(np.float32)
  corpus_nd = rng.integers(-1, 2, (num_docs, 4)).astype(np.float32)
  scores, idx = metrics.chunked_topk(jnp.asarray(q_qd), jnp.asarray(corpus_nd), k=k, chunk=chunk)
  ref_scores_qn = q_qd.astype(np.float64) @ corpus_nd.T.astype(np.float64)
  ref_idx = metrics.rank_topk(ref_scores_qn, k)
  np.testing.assert_array_equal(np.asarray(idx), ref_idx)
  np.testing.assert_array_equal(ref_idx, [_trec_order(row)[:k] for row in ref_scores_qn])
  np.testing.assert_allclose(np.asarray(scores), np.take_along_axis(ref_scores_qn, ref_idx, 1))


def test_chunked_topk_float_inputs():
  rng = np.random.default_rng(7)
  q_qd = rng.normal(size=(5, 16)).astype(np.float32)
  corpus_nd = rng.normal(size=(203, 16)).astype(np.float32)
  scores, idx = jax.jit(lambda q, c: metrics.chunked_topk(q, c, k=10, chunk=32))(q_qd, corpus_nd)
  ref_qn = q_qd.astype(np.float64) @ corpus_nd.T.astype(np.float64)
  np.testing.assert_array_equal(np.asarray(idx), metrics.rank_topk(ref_qn, 10))
  np.testing.assert_allclose(np.asarray(scores), -np.sort(-ref_qn, axis=1)[:, :10], rtol=1e-5)


def test_retrieval_problem_merges_ids():
  examples = [
      {"query": "a", "positive": "X", "negatives": ["Y"], "query_id": 1, "positive_id": 10},
      {"query": "b", "positive": "X", "negatives": [], "query_id": 2, "positive_id": 10},
      {"query": "a", "positive": "Z", "negatives": ["X"], "query_id": 1, "positive_id": 30},
  ]
  queries, corpus, rel = metrics.retrieval_problem(examples, include_negatives=True)
  assert queries == ["a", "b"] and corpus == ["X", "Z", "Y"]
  assert rel == [{0: 1.0, 1: 1.0}, {0: 1.0}]
