"""Evaluators: sharded top-k == single device, MRL sweeps, perfect = 1, random = chance, and agreement
with independent implementations (float64 numpy written here; pytrec_eval / scikit-learn / scipy
where installed)."""

import collections
import math

import numpy as np
import pytest

from embed2 import sharding
from embed2.eval import metrics
from embed2.eval import retrieval as R

def unit(x):
  x = np.asarray(x, np.float64)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


# ------------------------------------------------------------------------------- sharded top-k


@pytest.mark.parametrize("mesh_shape", [{"data": 8}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_sharded_topk_equals_single_device_with_ties(mesh_shape, rng):
  mesh = sharding.make_mesh(mesh_shape)
  # Small integers: exact float32 dot products and many ties, which must go to the higher index
  # (trec_eval's order: score, then document id, descending).
  for num_docs, k, chunk in ((37, 5, 3), (61, 20, 64), (5, 9, 2), (203, 13, 16)):
    q = rng.integers(-2, 3, (11, 6)).astype(np.float32)
    c = rng.integers(-2, 3, (num_docs, 6)).astype(np.float32)
    s, i = metrics.sharded_topk(q, c, k, mesh=mesh, chunk=chunk)
    s_qn = q.astype(np.float64) @ c.T.astype(np.float64)
    ref = metrics.rank_topk(s_qn, k)
    np.testing.assert_array_equal(
        ref, [sorted(range(num_docs), key=lambda d: (-row[d], -d))[:k] for row in s_qn])
    np.testing.assert_array_equal(np.asarray(i), ref)
    s1, i1 = metrics.chunked_topk(q, c, k=k, chunk=min(chunk, num_docs))
    np.testing.assert_array_equal(np.asarray(i), np.asarray(i1))
    np.testing.assert_array_equal(np.asarray(s), np.asarray(s1))
    assert (np.asarray(i) < num_docs).all()  # padding rows never rank


def test_sharded_topk_float_and_errors(rng):
  mesh = sharding.make_mesh({"data": 8})
  q, c = unit(rng.normal(size=(7, 16))), unit(rng.normal(size=(100, 16)))
  s, i = metrics.sharded_topk(q, c, 10, mesh=mesh, axes=("data",), chunk=5)
  ref = metrics.rank_topk(q.astype(np.float64) @ c.T.astype(np.float64), 10)
  np.testing.assert_array_equal(np.asarray(i), ref)
  np.testing.assert_allclose(np.asarray(s), np.take_along_axis(q @ c.T, ref, 1), atol=1e-6)
  with pytest.raises(ValueError, match="not axes of the mesh"):
    metrics.sharded_topk(q, c, 3, mesh=mesh, axes=("batch",))
  with pytest.raises(ValueError, match="d=16"):
    metrics.sharded_topk(q, c[:, :8], 3, mesh=mesh)


# ---------------------------------------------------------------------------------- retrieval


def _single_relevant_reference(q, c, rel_col, k):
  """recall@k, mrr@k, ndcg@k for one relevant document per query, from its rank (ties: higher
  index first, as trec_eval)."""
  s = q.astype(np.float64) @ c.T.astype(np.float64)
  rows = np.arange(len(q))
  target = s[rows, rel_col][:, None]
  cols = np.arange(c.shape[0])[None, :]
  rank = 1 + np.sum((s > target) | ((s == target) & (cols > rel_col[:, None])), axis=1)
  hit = rank <= k
  return {f"recall@{k}": hit.mean(), f"mrr@{k}": np.where(hit, 1.0 / rank, 0).mean(),
          f"ndcg@{k}": np.where(hit, 1.0 / np.log2(rank + 1), 0).mean()}


def test_retrieval_sweep_matches_reference_at_each_dim(rng):
  q_full = unit(rng.normal(size=(40, 32)))
  c_full = unit(rng.normal(size=(90, 32)))
  rel_col = rng.integers(0, 90, 40)
  relevance = [{int(j): 1.0} for j in rel_col]
  got = R.retrieval_sweep(q_full, c_full, relevance, dims=(8, 32), ks=(1, 10),
                          names=("recall@1", "recall@10", "mrr@10", "ndcg@10"))
  for dim in (8, 32):
    q, c = unit(q_full[:, :dim]), unit(c_full[:, :dim])
    for k in (1, 10):
      for name, value in _single_relevant_reference(q, c, rel_col, k).items():
        if f"{name}/dim_{dim}" in got:
          assert got[f"{name}/dim_{dim}"] == pytest.approx(value, abs=1e-9), (name, dim)
  mesh = sharding.make_mesh({"data": 8})
  assert R.retrieval_sweep(q_full, c_full, relevance, dims=(8, 32), mesh=mesh) == pytest.approx(
      R.retrieval_sweep(q_full, c_full, relevance, dims=(8, 32)))


def _trec_reference(s_qn, relevance, k):
  """{name: per-query float64 values} @k from trec_eval's definitions: the run is every document
  ordered by score, then by document id descending (trec_eval's sort), cut at k; missing ranks are
  non-relevant (P divides by k, the ideal DCG runs to rank k); gain = grade."""
  out = {name: [] for name in ("recall", "precision", "ndcg", "mrr", "map")}
  for row, rel in zip(s_qn, relevance):
    top = sorted(range(len(row)), key=lambda d: (-row[d], -d))[:k]
    gains = [max(rel.get(d, 0.0), 0.0) for d in top]
    num_rel = sum(1 for g in rel.values() if g > 0)
    hits = np.cumsum([g > 0 for g in gains])
    ideal = sorted((g for g in rel.values() if g > 0), reverse=True)[:k]
    out["recall"].append(hits[-1] / num_rel)
    out["precision"].append(hits[-1] / k)
    out["ndcg"].append(sum(g / math.log2(r + 2) for r, g in enumerate(gains))
                       / sum(g / math.log2(r + 2) for r, g in enumerate(ideal)))
    first = next((r for r, g in enumerate(gains) if g > 0), None)
    out["mrr"].append(0.0 if first is None else 1.0 / (first + 1))
    out["map"].append(sum(hits[r] / (r + 1) for r, g in enumerate(gains) if g > 0) / num_rel)
  return {name: np.asarray(v) for name, v in out.items()}


def _tied_problem(rng, nq, nd):
  """Queries, corpus and graded judgments whose scores tie often and are exact in float32: every
  document is a unit basis vector (many repeat) and a query's components are a few distinct
  values, so a score is one component of the unit query, the same in float32 and float64."""
  q = R.truncate(rng.integers(1, 5, (nq, 8)).astype(np.float32), 8)
  c = np.eye(8, dtype=np.float32)[rng.integers(0, 8, nd)]
  relevance = []
  for _ in range(nq):
    docs = rng.choice(nd, int(rng.integers(1, 6)), replace=False)
    relevance.append({int(d): float(rng.integers(1, 4)) for d in docs})
  return q, c, relevance


@pytest.mark.parametrize("nd", [60, 7])
def test_retrieval_sweep_matches_trec_eval_definitions(nd, rng):
  """Graded judgments, many tied scores, and (nd = 7) a corpus smaller than k = 10: the sweep
  equals trec_eval's definitions written out in float64 (`_trec_reference`)."""
  nq = 30
  q, c, relevance = _tied_problem(rng, nq, nd)
  got = R.retrieval_sweep(q, c, relevance, ks=(1, 5, 10), names=None)
  s_qn = q.astype(np.float64) @ c.T.astype(np.float64)
  assert all(len(set(row)) < len(row) for row in s_qn)  # ties in every query's scores
  for k in (1, 5, 10):
    for name, per_q in _trec_reference(s_qn, relevance, k).items():
      assert got[f"{name}@{k}/dim_8"] == pytest.approx(per_q.mean(), abs=1e-12), (name, k)


@pytest.mark.parametrize("nd", [60, 7])
def test_retrieval_sweep_agrees_with_pytrec_eval_graded(nd, rng):
  pytrec_eval = pytest.importorskip("pytrec_eval")
  nq = 30
  q, c, relevance = _tied_problem(rng, nq, nd)
  got = R.retrieval_sweep(q, c, relevance, ks=(5, 10), names=None)
  # The run holds every document with its (exact) score. Docnos are zero-padded so that trec_eval's
  # tie order (docno descending, compared as strings) is the index order.
  s_qn = q.astype(np.float64) @ c.T.astype(np.float64)
  qrels = {f"q{i}": {f"d{d:04d}": int(g) for d, g in rel.items()} for i, rel in enumerate(relevance)}
  run = {f"q{i}": {f"d{d:04d}": float(s_qn[i, d]) for d in range(nd)} for i in range(nq)}
  ev = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.5,10", "recall.5,10", "P.5,10",
                                              "map_cut.5,10"})
  per_q = ev.evaluate(run)
  mean = lambda key: np.mean([per_q[f"q{i}"][key] for i in range(nq)])
  for k in (5, 10):
    assert got[f"ndcg@{k}/dim_8"] == pytest.approx(mean(f"ndcg_cut_{k}"), abs=1e-6)
    assert got[f"recall@{k}/dim_8"] == pytest.approx(mean(f"recall_{k}"), abs=1e-6)
    assert got[f"precision@{k}/dim_8"] == pytest.approx(mean(f"P_{k}"), abs=1e-6)
    assert got[f"map@{k}/dim_8"] == pytest.approx(mean(f"map_cut_{k}"), abs=1e-6)
  top10 = {f"q{i}": {f"d{d:04d}": float(s_qn[i, d]) for d in metrics.rank_topk(s_qn, 10)[i]}
           for i in range(nq)}
  rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)
  assert got["mrr@10/dim_8"] == pytest.approx(
      np.mean([rr[f"q{i}"]["recip_rank"] for i in range(nq)]), abs=1e-6)  # run holds the top 10


def test_retrieval_perfect_is_one_and_random_is_chance(rng):
  n = 200
  docs = unit(rng.normal(size=(n, 64)))
  relevance = [{i: 1.0} for i in range(n)]
  perfect = R.retrieval_sweep(docs, docs, relevance, dims=(16, 64))
  assert all(v == pytest.approx(1.0) for v in perfect.values()), perfect
  nq = 3000
  q = unit(rng.normal(size=(nq, 64)))
  rel = [{int(j): 1.0} for j in rng.integers(0, n, nq)]
  rand = R.retrieval_sweep(q, docs, rel, dims=(64,))
  # The relevant document's rank is uniform on 1..N.
  chance = {"recall@1": 1 / n, "recall@10": 10 / n,
            "mrr@10": sum(1 / r for r in range(1, 11)) / n,
            "ndcg@10": sum(1 / math.log2(r + 1) for r in range(1, 11)) / n}
  for name, p in chance.items():
    tol = 5 * math.sqrt(p / nq) + 1e-3
    assert rand[f"{name}/dim_64"] == pytest.approx(p, abs=tol), name


def test_dims_are_checked(rng):
  e = unit(rng.normal(size=(4, 8)))
  with pytest.raises(ValueError, match=r"outside \[1, 8\]"):
    R.retrieval_sweep(e, e, [{0: 1}] * 4, dims=(16,))
  with pytest.raises(ValueError, match="dims is empty"):
    R.clustering_v_measure(e, [0, 0, 1, 1], dims=())


# ----------------------------------------------------------------------------- classification


def _knn_reference(train, ytr, test, k):
  preds = []
  s = test.astype(np.float64) @ train.T.astype(np.float64)
  for row in s:
    order = sorted(range(len(row)), key=lambda j: (-row[j], -j))[:k]
    votes = collections.Counter(int(ytr[j]) for j in order)
    sims = collections.defaultdict(float)
    for j in order:
      sims[int(ytr[j])] += row[j]
    preds.append(min(votes, key=lambda c: (-votes[c], -sims[c], c)))
  return np.asarray(preds)


def test_knn_matches_reference_and_mesh(rng):
  train, test = unit(rng.normal(size=(120, 12))), unit(rng.normal(size=(50, 12)))
  ytr = rng.integers(0, 4, 120)
  for k in (1, 4, 10):
    np.testing.assert_array_equal(R.knn_predict(train, ytr, test, k=k),
                                  _knn_reference(train, ytr, test, k))
  mesh = sharding.make_mesh({"data": 8})
  np.testing.assert_array_equal(R.knn_predict(train, ytr, test, k=5, mesh=mesh),
                                _knn_reference(train, ytr, test, 5))


def _clusters(num_classes, n, d, noise, rng):
  centers = unit(rng.normal(size=(num_classes, d)))
  y = rng.integers(0, num_classes, n)
  return unit(centers[y] + noise * rng.normal(size=(n, d))), y


def test_classification_perfect_and_random(rng):
  labels = np.array(["cat", "dog", "eel", "fox"])
  x, y = _clusters(4, 400, 32, 0.01, rng)
  perfect = R.knn_classification(x[:300], labels[y[:300]], x[300:], labels[y[300:]], dims=(8, 32))
  perfect.update(R.logistic_probe(x[:300], labels[y[:300]], x[300:], labels[y[300:]], dims=(32,)))
  assert perfect["knn_accuracy/dim_32"] == 1.0 and perfect["logreg_accuracy/dim_32"] == 1.0
  assert perfect["knn_f1_macro/dim_32"] == 1.0 and perfect["logreg_f1_macro/dim_32"] == 1.0
  x = unit(rng.normal(size=(3000, 32)))
  y = rng.integers(0, 4, 3000)
  rand = R.knn_classification(x[:2000], y[:2000], x[2000:], y[2000:])
  rand.update(R.logistic_probe(x[:2000], y[:2000], x[2000:], y[2000:]))
  tol = 5 * math.sqrt(0.25 * 0.75 / 1000)
  assert rand["knn_accuracy/dim_32"] == pytest.approx(0.25, abs=tol)
  assert rand["logreg_accuracy/dim_32"] == pytest.approx(0.25, abs=tol)


def test_logistic_regression_is_at_the_optimum(rng):
  x, y = _clusters(3, 300, 10, 1.0, rng)
  n, c = len(y), 3
  for l2 in (1e-1, 1e-3):
    w, b = R.fit_logistic_regression(x, y, num_classes=c, l2=l2, tol=1e-9)
    logits = x.astype(np.float64) @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    onehot = np.eye(c)[y]
    grad_w = x.T.astype(np.float64) @ (p - onehot) / n + l2 * w
    grad_b = (p - onehot).mean(0)
    assert np.abs(grad_w).max() < 1e-8 and np.abs(grad_b).max() < 1e-8
    sk = pytest.importorskip("sklearn.linear_model")
    x64 = x.astype(np.float64)  # float32 input would make scikit-learn solve in float32
    ref = sk.LogisticRegression(C=1.0 / (l2 * n), tol=1e-12, max_iter=10_000).fit(x64, y)
    np.testing.assert_allclose(p, ref.predict_proba(x64), atol=1e-5)


def test_accuracy_f1_hand_computed():
  # Class 0: tp 1, fp 1, fn 1 -> F1 1/2; class 1: tp 1, fp 0, fn 1 -> 2/3; class 2: tp 1, fp 1 -> 2/3.
  m = R._accuracy_f1(np.array([0, 0, 1, 1, 2]), np.array([0, 2, 1, 0, 2]), 3)
  assert m["accuracy"] == pytest.approx(3 / 5)
  assert m["f1_macro"] == pytest.approx((1 / 2 + 2 / 3 + 2 / 3) / 3)


# -------------------------------------------------------------------------------- clustering


def test_v_measure_hand_computed_and_sklearn(rng):
  assert R.v_measure([0, 0, 1, 1], [5, 5, 9, 9]) == pytest.approx(1.0)  # relabelled is perfect
  assert R.v_measure([0, 0, 1, 1], [0, 0, 0, 0]) == pytest.approx(0.0)  # h = 0, c = 1
  # h = 1; c = 1 - H(K|C)/H(K) = 1 - ln2/ln4 = 1/2; v = 2 * 1/2 / (3/2) = 2/3.
  assert R.v_measure([0, 0, 1, 1], [0, 1, 2, 3]) == pytest.approx(2 / 3)
  skm = pytest.importorskip("sklearn.metrics")
  for _ in range(5):
    a, b = rng.integers(0, 5, 200), rng.integers(0, 7, 200)
    for beta in (0.5, 1.0, 2.0):
      assert R.v_measure(a, b, beta=beta) == pytest.approx(skm.v_measure_score(a, b, beta=beta),
                                                           abs=1e-10)


def test_clustering_perfect_and_random(rng):
  x, y = _clusters(5, 300, 32, 0.02, rng)
  assert R.clustering_v_measure(x, y, dims=(16, 32)) == {"v_measure/dim_16": pytest.approx(1.0),
                                                         "v_measure/dim_32": pytest.approx(1.0)}
  rand = R.clustering_v_measure(unit(rng.normal(size=(600, 32))), rng.integers(0, 5, 600))
  assert rand["v_measure/dim_32"] < 0.05


# --------------------------------------------------------------------------------------- STS


def test_spearman_hand_computed_ties_and_scipy(rng):
  assert R.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(1 - 6 * 2 / (4 * 15))
  np.testing.assert_allclose(R.average_ranks([10, 20, 20, 5]), [2, 3.5, 3.5, 1])
  assert math.isnan(R.spearman([1, 1, 1], [1, 2, 3]))
  stats = pytest.importorskip("scipy.stats")
  for _ in range(5):
    a, b = rng.integers(0, 6, 80).astype(float), rng.normal(size=80)
    assert R.spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)


def test_sts_perfect_and_random(rng):
  a, b = unit(rng.normal(size=(500, 16))), unit(rng.normal(size=(500, 16)))
  gold = np.sum(a.astype(np.float64) * b, axis=1) * 5 + 5  # a monotone map of the cosine
  assert R.sts_spearman(a, b, gold)["spearman/dim_16"] == pytest.approx(1.0)
  rand = R.sts_spearman(a, b, rng.normal(size=500))["spearman/dim_16"]
  assert abs(rand) < 5 / math.sqrt(500)
