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
  """(recall, precision, ndcg, mrr, ap) @k for one query; ranking: list of doc ids."""
  top = list(ranking)[:k]
  kk = len(top)
  relevant = {d for d, g in judged.items() if g > 0}
  hits = sum(1 for d in top if d in relevant)
  recall = hits / len(relevant)
  precision = hits / kk
  dcg = sum(max(judged.get(d, 0.0), 0.0) / math.log2(r + 2) for r, d in enumerate(top))
  ideal = sorted((g for g in judged.values() if g > 0), reverse=True)[:kk]
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
  scores = np.array([[1.0, 3.0, 3.0, 2.0, 3.0], [np.nan, 0.0, 0.0, -1.0, 5.0]])
  np.testing.assert_array_equal(metrics.rank_topk(scores, 3), [[1, 2, 4], [4, 1, 2]])
  np.testing.assert_array_equal(metrics.rank_topk(scores, 10)[1], [4, 1, 2, 3, 0])  # clip, NaN last


def test_no_relevant_queries_excluded_and_counted():
  ranked = np.array([[0, 1, 2], [1, 0, 2], [2, 1, 0]])
  rel = [{0: 1}, {}, {1: 0}]  # query 1: no judgments; query 2: only a grade-0 judgment
  m = metrics.retrieval_metrics(ranked, rel, ks=(1,), per_query=True)
  assert m["num_queries"] == 3 and m["num_queries_no_relevant"] == 2
  assert m["recall@1"] == 1.0 and m["ndcg@1"] == 1.0  # mean over query 0 only
  assert np.isnan(m["recall@1/per_query"][1:]).all()
  m = metrics.retrieval_metrics(ranked[1:], rel[1:], ks=(1,))
  assert math.isnan(m["ndcg@1"]) and m["num_queries_no_relevant"] == 2


def test_k_larger_than_corpus_is_clipped():
  ranked = np.array([[2, 0, 1]])  # the whole corpus, N = 3
  m = metrics.retrieval_metrics(ranked, [{0: 1}], ks=(1, 10), num_docs=3)
  assert m["precision@10"] == pytest.approx(1 / 3)  # divided by min(k, N) = 3
  assert m["recall@10"] == 1.0 and m["mrr@10"] == 0.5
  assert m["ndcg@10"] == pytest.approx(1 / math.log2(3))
  with pytest.raises(ValueError, match="retrieve more"):
    metrics.retrieval_metrics(ranked[:, :2], [{0: 1}], ks=(10,), num_docs=3)
  with pytest.raises(ValueError, match="twice"):
    metrics.retrieval_metrics(np.array([[1, 1, 0]]), [{0: 1}], ks=(1,))


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
