"""Evaluators over embeddings: retrieval, kNN / logistic-regression classification, clustering, STS.

Every evaluator takes full-dim unit-norm embeddings and a list of Matryoshka `dims`, and scores each
dim from the same embeddings (the prefix re-normalised, `truncate`): one embedding pass sweeps all
MRL dims. Results are flat dicts keyed `"<metric>/dim_<d>"`, ready to prefix with a task name and
log.

  retrieval_sweep      recall / precision / nDCG / MRR / MAP at k (conventions: eval.metrics) from an
                       exact top-k (chunked, or sharded over a mesh)
  knn_classification   majority vote of the k nearest training examples (cosine); accuracy, macro F1
  logistic_probe       multinomial logistic regression (L2, L-BFGS) on the embeddings; accuracy, F1
  clustering_v_measure k-means with as many clusters as labels, then v-measure
  sts_spearman         Spearman correlation between cosine similarity and gold scores

Everything here is numpy / jax only (no scikit-learn or scipy at run time); tests check against
them where they are installed.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from embed2.eval import metrics

RETRIEVAL_METRICS = ("recall@1", "recall@10", "ndcg@10", "mrr@10")


def truncate(e_nd: np.ndarray, dim: int) -> np.ndarray:
  """Matryoshka prefix, re-normalised: (N, d) -> float32 (N, dim) (x / max(|x|, 1e-12))."""
  e_nd = np.asarray(e_nd)
  if not 1 <= dim <= e_nd.shape[-1]:
    raise ValueError(f"dim={dim} must be in [1, {e_nd.shape[-1]}] (the embedding dim)")
  x = e_nd[..., :dim].astype(np.float64)
  return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


def _dims(dims: Sequence[int] | None, e_nd: np.ndarray) -> tuple[int, ...]:
  full = np.asarray(e_nd).shape[-1]
  dims = (full,) if dims is None else tuple(int(d) for d in dims)
  if not dims:
    raise ValueError("dims is empty; give at least one embedding dim (or None for the full dim)")
  bad = [d for d in dims if not 1 <= d <= full]
  if bad:
    raise ValueError(f"dims {bad} are outside [1, {full}] (the embedding dim)")
  return dims


def exact_topk(q_qd: np.ndarray, corpus_nd: np.ndarray, k: int, *, mesh=None,
               chunk: int = 4096) -> np.ndarray:
  """Indices (Q, min(k, N)) int64 of the highest dot products, ties to the higher index."""
  q = jnp.asarray(q_qd, jnp.float32)
  c = np.asarray(corpus_nd, np.float32)
  if mesh is not None:
    _, idx = metrics.sharded_topk(q, c, k, mesh=mesh, chunk=chunk)
  else:
    _, idx = metrics.chunked_topk(q, jnp.asarray(c), k=k, chunk=min(chunk, c.shape[0]))
  return np.asarray(idx).astype(np.int64)


# ------------------------------------------------------------------------------------ retrieval


def retrieval_sweep(q_qd: np.ndarray, corpus_nd: np.ndarray, relevance: metrics.Relevance, *,
                    dims: Sequence[int] | None = None, ks: Sequence[int] = (1, 10),
                    names: Sequence[str] | None = RETRIEVAL_METRICS, mesh=None,
                    chunk: int = 4096) -> dict[str, float]:
  """Retrieval metrics of queries against a corpus at each MRL dim.

  Args:
    q_qd: (Q, d) query embeddings (full dim).
    corpus_nd: (N, d) corpus embeddings.
    relevance: per query {corpus index: grade} (or a dense (Q, N) grade matrix).
    dims: MRL dims to score; None = the full dim only.
    ks: cut-offs (the ranking retrieves min(max(ks), N)).
    names: which of `metrics.retrieval_metrics`' keys to return (None = all of them).
    mesh: rank with the corpus sharded over this mesh (`metrics.sharded_topk`).
    chunk: corpus rows scored at a time.

  Returns:
    {"<name>/dim_<d>": float}; queries with no relevant document are left out of the means.
  """
  q_qd, corpus_nd = np.asarray(q_qd), np.asarray(corpus_nd)
  if q_qd.shape[0] == 0 or corpus_nd.shape[0] == 0:
    raise ValueError(f"retrieval needs queries and a corpus; got {q_qd.shape[0]} queries and "
                     f"{corpus_nd.shape[0]} documents")
  out = {}
  for dim in _dims(dims, q_qd):
    ranked = exact_topk(truncate(q_qd, dim), truncate(corpus_nd, dim), max(ks), mesh=mesh,
                        chunk=chunk)
    m = metrics.retrieval_metrics(ranked, relevance, ks, num_docs=corpus_nd.shape[0])
    for key in (names if names is not None else [k for k in m if not k.startswith("num_")]):
      out[f"{key}/dim_{dim}"] = float(m[key])
  return out


# ------------------------------------------------------------------------------- classification


def _labels(y) -> tuple[np.ndarray, np.ndarray]:
  """Any hashable labels -> (classes (C,), int index (N,))."""
  classes, idx = np.unique(np.asarray(y), return_inverse=True)
  return classes, idx.reshape(-1)


def _accuracy_f1(true_n: np.ndarray, pred_n: np.ndarray, num_classes: int) -> dict[str, float]:
  """Accuracy and macro F1 over the classes present in truth or prediction (sklearn's default)."""
  acc = float(np.mean(true_n == pred_n))
  f1s = []
  for c in range(num_classes):
    tp = np.sum((pred_n == c) & (true_n == c))
    fp = np.sum((pred_n == c) & (true_n != c))
    fn = np.sum((pred_n != c) & (true_n == c))
    if tp + fp + fn == 0:
      continue
    f1s.append(2 * tp / (2 * tp + fp + fn))
  return {"accuracy": acc, "f1_macro": float(np.mean(f1s))}


def knn_predict(train_nd: np.ndarray, train_y: np.ndarray, test_qd: np.ndarray, *, k: int,
                mesh=None) -> np.ndarray:
  """Majority vote of the k most cosine-similar training examples: int (Q,) label indices.

  Vote ties go to the class with the larger summed similarity, then to the lower class index.
  `train_y` is int class indices (N,).
  """
  k = min(k, train_nd.shape[0])
  q = jnp.asarray(test_qd, jnp.float32)
  c = np.asarray(train_nd, np.float32)
  if mesh is not None:
    s_qk, i_qk = metrics.sharded_topk(q, c, k, mesh=mesh)
  else:
    s_qk, i_qk = metrics.chunked_topk(q, jnp.asarray(c), k=k, chunk=min(4096, c.shape[0]))
  s_qk, i_qk = np.asarray(s_qk, np.float64), np.asarray(i_qk)
  num_classes = int(train_y.max()) + 1
  votes_qc = np.zeros((q.shape[0], num_classes))
  sims_qc = np.zeros((q.shape[0], num_classes))
  rows = np.arange(q.shape[0])[:, None]
  np.add.at(votes_qc, (rows, train_y[i_qk]), 1.0)
  np.add.at(sims_qc, (rows, train_y[i_qk]), s_qk)
  # Lexicographic (votes, summed similarity): votes differ by >= 1, similarity sums are < k + 1.
  score_qc = votes_qc * (2.0 * k + 2.0) + sims_qc
  return np.argmax(score_qc, axis=1)


def knn_classification(train_nd: np.ndarray, train_y, test_qd: np.ndarray, test_y, *,
                       k: int = 10, dims: Sequence[int] | None = None, mesh=None
                       ) -> dict[str, float]:
  """kNN classification at each dim: {"knn_accuracy/dim_<d>", "knn_f1_macro/dim_<d>"}.

  Args:
    train_nd: (N, d) embeddings with labels `train_y` (N,) (any hashable values).
    test_qd: (Q, d) embeddings with labels `test_y` (Q,).
    k: neighbours voting.
  """
  classes, ytr = _labels(train_y)
  lookup = {c: i for i, c in enumerate(classes.tolist())}
  yte = np.asarray([lookup.get(c, -1) for c in np.asarray(test_y).tolist()])
  out = {}
  for dim in _dims(dims, train_nd):
    pred = knn_predict(truncate(train_nd, dim), ytr, truncate(test_qd, dim), k=k, mesh=mesh)
    for key, v in _accuracy_f1(yte, pred, len(classes)).items():
      out[f"knn_{key}/dim_{dim}"] = v
  return out


def _lbfgs(f_and_grad, x0: np.ndarray, *, max_iter: int, tol: float, history: int = 10
           ) -> np.ndarray:
  """Minimises a smooth convex function with L-BFGS (two-loop recursion, Armijo backtracking)."""
  x = x0
  f, g = f_and_grad(x)
  s_list, y_list = [], []
  for _ in range(max_iter):
    if np.linalg.norm(g) <= tol:
      break
    q = g.copy()
    alphas = []
    for s, y in zip(reversed(s_list), reversed(y_list)):
      rho = 1.0 / (y @ s)
      a = rho * (s @ q)
      q -= a * y
      alphas.append((rho, a))
    gamma = (s_list[-1] @ y_list[-1]) / (y_list[-1] @ y_list[-1]) if s_list else 1.0
    r = gamma * q
    for (s, y), (rho, a) in zip(zip(s_list, y_list), reversed(alphas)):
      r += s * (a - rho * (y @ r))
    p = -r
    slope = g @ p
    if slope >= 0:  # not a descent direction (round-off): restart from steepest descent
      p, slope, s_list, y_list = -g, -(g @ g), [], []
    t = 1.0
    while True:
      x_new = x + t * p
      f_new, g_new = f_and_grad(x_new)
      if f_new <= f + 1e-4 * t * slope or t < 1e-12:
        break
      t *= 0.5
    s, y = x_new - x, g_new - g
    if s @ y > 1e-12:  # keeps the inverse-Hessian estimate positive definite
      s_list.append(s)
      y_list.append(y)
      if len(s_list) > history:
        s_list.pop(0)
        y_list.pop(0)
    x, f, g = x_new, f_new, g_new
  return x


def fit_logistic_regression(x_nd: np.ndarray, y_n: np.ndarray, *, num_classes: int,
                            l2: float = 1e-3, max_iter: int = 1000, tol: float = 1e-6
                            ) -> tuple[np.ndarray, np.ndarray]:
  """Multinomial logistic regression in float64 numpy: weights (d, C) and bias (C,).

  Objective: mean over examples of the cross-entropy of softmax(x W + b), plus l2 / 2 * |W|^2 (the
  bias is not penalised). Same optimum as scikit-learn's LogisticRegression(C = 1 / (l2 * N)).
  Solved with L-BFGS until the gradient norm is below `tol` (numpy: no compilation per shape).
  """
  if l2 <= 0:
    raise ValueError(f"l2={l2} must be > 0 (an unpenalised fit diverges on separable data)")
  x = np.asarray(x_nd, np.float64)
  n, d = x.shape
  onehot = np.zeros((n, num_classes))
  onehot[np.arange(n), np.asarray(y_n)] = 1.0

  def f_and_grad(theta):
    w, b = theta[:d * num_classes].reshape(d, num_classes), theta[d * num_classes:]
    logits = x @ w + b
    logits -= logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.sum(np.exp(logits), axis=1, keepdims=True))
    f = -np.sum(onehot * logp) / n + 0.5 * l2 * np.sum(w * w)
    err = (np.exp(logp) - onehot) / n  # d(mean CE)/d(logits)
    return f, np.concatenate([(x.T @ err + l2 * w).ravel(), err.sum(axis=0)])

  theta = _lbfgs(f_and_grad, np.zeros(d * num_classes + num_classes), max_iter=max_iter, tol=tol)
  return theta[:d * num_classes].reshape(d, num_classes), theta[d * num_classes:]


def logistic_probe(train_nd: np.ndarray, train_y, test_qd: np.ndarray, test_y, *,
                   l2: float = 1e-3, dims: Sequence[int] | None = None, max_iter: int = 1000
                   ) -> dict[str, float]:
  """Linear probe at each dim: {"logreg_accuracy/dim_<d>", "logreg_f1_macro/dim_<d>"}."""
  classes, ytr = _labels(train_y)
  lookup = {c: i for i, c in enumerate(classes.tolist())}
  yte = np.asarray([lookup.get(c, -1) for c in np.asarray(test_y).tolist()])
  out = {}
  for dim in _dims(dims, train_nd):
    w, b = fit_logistic_regression(truncate(train_nd, dim), ytr, num_classes=len(classes), l2=l2,
                                   max_iter=max_iter)
    pred = np.argmax(truncate(test_qd, dim) @ w + b, axis=1)
    for key, v in _accuracy_f1(yte, pred, len(classes)).items():
      out[f"logreg_{key}/dim_{dim}"] = v
  return out


# ----------------------------------------------------------------------------------- clustering


def kmeans(x_nd: np.ndarray, num_clusters: int, *, seed: int = 0, restarts: int = 4,
           max_iter: int = 100) -> np.ndarray:
  """Lloyd's k-means with k-means++ seeding; the restart with the lowest inertia wins.

  Returns:
    int (N,) cluster index per row.
  """
  x = np.asarray(x_nd, np.float64)
  n = x.shape[0]
  if not 1 <= num_clusters <= n:
    raise ValueError(f"num_clusters={num_clusters} must be in [1, N={n}]")
  rng = np.random.default_rng(seed)
  sq_n = np.sum(x * x, axis=1)
  best, best_inertia = None, np.inf
  for _ in range(restarts):
    centers = [x[rng.integers(n)]]
    d2_n = np.sum((x - centers[0]) ** 2, axis=1)
    for _ in range(1, num_clusters):
      p = d2_n / d2_n.sum() if d2_n.sum() > 0 else np.full(n, 1.0 / n)
      centers.append(x[rng.choice(n, p=p)])
      d2_n = np.minimum(d2_n, np.sum((x - centers[-1]) ** 2, axis=1))
    c_kd = np.stack(centers)
    assign = np.full(n, -1)
    for _ in range(max_iter):
      d2_nk = sq_n[:, None] - 2 * x @ c_kd.T + np.sum(c_kd * c_kd, axis=1)[None, :]
      new = np.argmin(d2_nk, axis=1)
      if np.array_equal(new, assign):
        break
      assign = new
      for j in range(num_clusters):
        members = x[assign == j]
        # An emptied cluster restarts at the point farthest from its centre.
        c_kd[j] = members.mean(axis=0) if len(members) else x[np.argmax(d2_nk.min(axis=1))]
    inertia = float(np.sum((x - c_kd[assign]) ** 2))
    if inertia < best_inertia:
      best, best_inertia = assign.copy(), inertia
  return best


def v_measure(labels_true, labels_pred, *, beta: float = 1.0) -> float:
  """V-measure (Rosenberg & Hirschberg 2007): weighted harmonic mean of homogeneity and completeness.

    h = 1 - H(C|K) / H(C),  c = 1 - H(K|C) / H(K),  v = (1 + beta) h c / (beta h + c)

  C the true classes, K the clusters; h = 1 when H(C) = 0 and c = 1 when H(K) = 0 (natural log).
  """
  _, t = _labels(labels_true)
  _, p = _labels(labels_pred)
  if t.shape != p.shape:
    raise ValueError(f"labels_true has {t.shape[0]} entries but labels_pred {p.shape[0]}")
  n = float(t.shape[0])
  joint = np.zeros((t.max() + 1, p.max() + 1))
  np.add.at(joint, (t, p), 1.0)
  pj = joint / n
  pc, pk = pj.sum(axis=1), pj.sum(axis=0)

  def entropy(q):
    q = q[q > 0]
    return float(-np.sum(q * np.log(q)))

  nz = pj > 0
  h_c, h_k = entropy(pc), entropy(pk)
  h_c_given_k = float(-np.sum(pj[nz] * np.log(pj[nz] / np.broadcast_to(pk, pj.shape)[nz])))
  h_k_given_c = float(-np.sum(pj[nz] * np.log(pj[nz] / np.broadcast_to(pc[:, None], pj.shape)[nz])))
  h = 1.0 if h_c == 0 else 1.0 - h_c_given_k / h_c
  c = 1.0 if h_k == 0 else 1.0 - h_k_given_c / h_k
  return 0.0 if h + c == 0 else float((1 + beta) * h * c / (beta * h + c))


def clustering_v_measure(e_nd: np.ndarray, labels, *, dims: Sequence[int] | None = None,
                         seed: int = 0, restarts: int = 4) -> dict[str, float]:
  """k-means (k = number of distinct labels) at each dim: {"v_measure/dim_<d>"}."""
  _, y = _labels(labels)
  k = int(y.max()) + 1
  return {f"v_measure/dim_{dim}": v_measure(y, kmeans(truncate(e_nd, dim), k, seed=seed,
                                                      restarts=restarts))
          for dim in _dims(dims, e_nd)}


# ------------------------------------------------------------------------------------------ STS


def average_ranks(x_n: np.ndarray) -> np.ndarray:
  """1-based ranks, ties sharing the mean of their ranks (float64 (N,))."""
  _, inv, counts = np.unique(np.asarray(x_n, np.float64), return_inverse=True, return_counts=True)
  starts = np.cumsum(counts) - counts  # ranks before each distinct value
  return (starts + (counts + 1) / 2.0)[inv.reshape(-1)]


def spearman(a_n: np.ndarray, b_n: np.ndarray) -> float:
  """Spearman's rho: Pearson correlation of the average ranks. NaN if either side is constant."""
  a, b = np.asarray(a_n), np.asarray(b_n)
  if a.shape != b.shape or a.ndim != 1 or a.size < 2:
    raise ValueError(f"spearman needs two 1-D arrays of the same length >= 2; got {a.shape}, "
                     f"{b.shape}")
  ra, rb = average_ranks(a), average_ranks(b)
  ra, rb = ra - ra.mean(), rb - rb.mean()
  denom = np.sqrt(np.sum(ra * ra) * np.sum(rb * rb))
  return float(np.sum(ra * rb) / denom) if denom > 0 else float("nan")


def sts_spearman(a_nd: np.ndarray, b_nd: np.ndarray, gold_n, *,
                 dims: Sequence[int] | None = None) -> dict[str, float]:
  """Spearman between cos(a_i, b_i) and gold similarity at each dim: {"spearman/dim_<d>"}."""
  a_nd, b_nd = np.asarray(a_nd), np.asarray(b_nd)
  if a_nd.shape != b_nd.shape:
    raise ValueError(f"STS pairs need equal shapes; got {a_nd.shape} and {b_nd.shape}")
  return {f"spearman/dim_{dim}": spearman(
              np.sum(truncate(a_nd, dim).astype(np.float64) * truncate(b_nd, dim), axis=1), gold_n)
          for dim in _dims(dims, a_nd)}


def mean_over_tasks(results: Mapping[str, float], tasks: Sequence[str]) -> dict[str, float]:
  """{"mean/<metric>/<dim>": mean over tasks} for every "<task>/<metric>/<dim>" key all tasks share."""
  per_suffix: dict[str, list[float]] = {}
  for task in tasks:
    for key, v in results.items():
      if key.startswith(task + "/"):
        per_suffix.setdefault(key[len(task) + 1:], []).append(v)
  return {f"mean/{s}": float(np.mean(v)) for s, v in per_suffix.items() if len(v) == len(tasks)}
