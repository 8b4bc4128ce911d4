"""Retrieval metrics with graded relevance, and top-k ranking (numpy, and chunked jax).

Conventions (those of trec_eval / pytrec_eval unless stated):
  * A document is relevant when its grade is > 0. Grades <= 0 and unjudged documents count as
    non-relevant with gain 0.
  * Ranks past the end of the ranking count as non-relevant (trec_eval: a run that retrieved
    fewer than k documents is scored as if the rest of its top k were non-relevant). So a ranking
    of K < k documents gives precision@k = hits / k (not hits / K) and nDCG@k's ideal DCG takes
    the judged grades up to rank k (not K); recall, MRR and MAP are unchanged by it.
  * recall@k    = (# relevant in the top k) / (# relevant judged for the query).
  * precision@k = (# relevant in the top k) / k.
  * nDCG@k      = DCG@k / IDCG@k with gain = grade (trec_eval's linear gain, not 2^grade - 1) and
                  discount 1 / log2(rank + 1), rank starting at 1. IDCG@k is the DCG of the judged
                  grades sorted in decreasing order, cut at k.
  * MRR@k       = 1 / (rank of the first relevant document) if it is in the top k, else 0.
  * MAP@k       = sum over relevant documents at ranks r <= k of precision@r, divided by the
                  number of relevant documents judged (trec_eval's map_cut; not by min(k, #rel)).
  * map         = the same over the whole ranking supplied (MAP@K for K = ranked columns); equal
                  to full MAP when the ranking covers the corpus.
  * A ranking shorter than k is refused when the corpus is known to hold more documents
    (`num_docs` given, or a dense relevance matrix): the metric would then score a retrieval cut
    short by the caller, not the model; retrieve at least min(max(ks), N) documents. A ranking of
    the whole corpus (N < k) is scored as above.
  * Queries with no relevant document (no grade > 0) are EXCLUDED from every mean (as BEIR does by
    only evaluating queries with positive qrels; pytrec_eval would score them 0). They are counted
    in "num_queries_no_relevant"; a mean over zero queries is NaN.
  * A ranking may hold -1 for "no document" (padding); it occupies its rank and is never
    relevant. A document appearing twice in one ranking is an error (it would be counted twice).

Tie order: every ranking function here (`rank_topk`, `chunked_topk`, `sharded_topk`, and so BM25,
`inference.search` and the evaluators) orders equal scores by document index DESCENDING, as
trec_eval does (it sorts a run by score, then by docno descending). trec_eval compares docnos as
strings (strcmp), so the two orders agree when the docnos written for a run sort like the indices
(e.g. zero-padded to one width); with plain decimal strings "9" sorts above "10".
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

Relevance = Sequence[Mapping[int, float]] | np.ndarray


def rank_topk(scores_qn: np.ndarray, k: int) -> np.ndarray:
  """Indices of the k highest scores per row, best first; ties go to the higher index (trec_eval).

  Args:
    scores_qn: (Q, N) scores (any real dtype). NaN is ranked below every number.
    k: how many to return; clipped to N.

  Returns:
    (Q, min(k, N)) int64 column indices.
  """
  scores_qn = np.asarray(scores_qn, np.float64)
  if scores_qn.ndim != 2:
    raise ValueError(f"scores_qn must be (Q, N); got shape {scores_qn.shape}.")
  if k < 1:
    raise ValueError(f"k={k} must be >= 1.")
  k = min(k, scores_qn.shape[1])
  num_docs = scores_qn.shape[1]
  neg_qn = -np.where(np.isnan(scores_qn), -np.inf, scores_qn)
  # A stable sort of the negated scores with the columns reversed keeps equal scores in reversed
  # index order: the tie-break.
  order_qn = np.argsort(neg_qn[:, ::-1], axis=1, kind="stable")[:, :k]
  return (num_docs - 1 - order_qn).astype(np.int64)


@functools.partial(jax.jit, static_argnames=("k", "chunk", "precision"))
def chunked_topk(q_qd: jax.Array, corpus_nd: jax.Array, k: int, chunk: int,
                 precision: jax.lax.Precision = jax.lax.Precision.HIGHEST
                 ) -> tuple[jax.Array, jax.Array]:
  """Top-k dot-product scores of queries against a corpus read in chunks of `chunk` rows.

  A running top-k is merged with each chunk's scores, so only (Q, k + chunk) scores exist at a
  time and a large corpus never makes one (Q, N) matrix. Ties go to the higher corpus index, as in
  `rank_topk`: the chunk, reversed, is placed before the running top-k (all of lower indices), and
  `lax.top_k` keeps equal values in positional order (documented). Scores are assumed finite (no
  NaN handling, unlike `rank_topk`).

  Args:
    q_qd: (Q, d) queries.
    corpus_nd: (N, d) corpus.
    k: results per query (static); clipped to N.
    chunk: corpus rows per step (static); clipped to N. The last chunk is aligned to the end of
      the corpus and the rows it re-reads are masked, so N need not divide by `chunk` and no padded
      copy of the corpus is made.
    precision: matmul precision; HIGHEST by default so TPU rankings are not decided by bf16
      rounding.

  Returns:
    scores (Q, k') float32 (or the inputs' wider dtype), indices (Q, k') int32, k' = min(k, N),
    best first.
  """
  num_docs = corpus_nd.shape[0]
  if corpus_nd.shape[1] != q_qd.shape[1]:
    raise ValueError(f"q_qd has d={q_qd.shape[1]} but corpus_nd has d={corpus_nd.shape[1]}.")
  if k < 1 or chunk < 1:
    raise ValueError(f"k={k} and chunk={chunk} must be >= 1.")
  return _scan_topk(q_qd, corpus_nd, min(k, num_docs), min(chunk, num_docs), precision)


def _scan_topk(q_qd: jax.Array, corpus_nd: jax.Array, k: int, chunk: int,
               precision: jax.lax.Precision, *, offset: jax.Array | int = 0,
               num_valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """The running top-k of `chunked_topk` (k <= N, chunk <= N), traceable inside shard_map.

  Rows at local index >= `num_valid` (padding) score -inf; returned indices are `offset` + the
  local row index.
  """
  num_q = q_qd.shape[0]
  num_docs = corpus_nd.shape[0]
  num_chunks = -(-num_docs // chunk)
  dtype = jnp.result_type(q_qd.dtype, corpus_nd.dtype, jnp.float32)

  def body(i, carry):
    best_qk, best_idx_qk = carry
    start = i * chunk
    aligned = jnp.minimum(start, num_docs - chunk)  # last chunk ends at N (re-reads some rows)
    c_cd = jax.lax.dynamic_slice_in_dim(corpus_nd, aligned, chunk, axis=0)
    s_qc = jnp.einsum("qd,cd->qc", q_qd, c_cd, precision=precision,
                      preferred_element_type=dtype).astype(dtype)
    idx_c = aligned + jnp.arange(chunk, dtype=jnp.int32)
    keep_c = idx_c >= start  # rows of the previous chunk are masked
    if num_valid is not None:
      keep_c &= idx_c < num_valid
    s_qc = jnp.where(keep_c[None, :], s_qc, -jnp.inf)
    glob_c = (offset + idx_c).astype(jnp.int32)
    # Positional order = descending index, for lax.top_k's tie rule: the chunk reversed, then the
    # running top-k (lower indices, already in descending order among equal scores).
    both_s = jnp.concatenate([s_qc[:, ::-1], best_qk], axis=1)
    both_idx = jnp.concatenate([jnp.broadcast_to(glob_c[::-1], (num_q, chunk)), best_idx_qk],
                               axis=1)
    top_s, pos = jax.lax.top_k(both_s, k)
    return top_s, jnp.take_along_axis(both_idx, pos, axis=1)

  init = (jnp.full((num_q, k), -jnp.inf, dtype), jnp.full((num_q, k), -1, jnp.int32))
  return jax.lax.fori_loop(0, num_chunks, body, init)


def sharded_topk(q_qd: jax.Array | np.ndarray, corpus_nd: jax.Array | np.ndarray, k: int, *,
                 mesh: jax.sharding.Mesh, axes: Sequence[str] | None = None, chunk: int = 4096,
                 precision: jax.lax.Precision = jax.lax.Precision.HIGHEST
                 ) -> tuple[jax.Array, jax.Array]:
  """Top-k dot-product scores with the corpus split across the devices of a mesh.

  The corpus rows are split over `axes` (default: every mesh axis, so every device holds N / D
  rows; N is padded up to a multiple of D with rows that never rank). Each device runs the chunked
  scan of `chunked_topk` over its own rows, the D local top-k lists are all-gathered (Q * D * k
  scores, never a (Q, N) matrix) and merged with one more top-k. Queries are replicated.

  Ties go to the higher corpus index, as in `rank_topk` / `chunked_topk`: the gathered lists are
  concatenated in reversed device order (device order is corpus order), each list holds its ties
  in descending index order, and `lax.top_k` keeps equal values in positional order.

  Args:
    q_qd: (Q, d) queries.
    corpus_nd: (N, d) corpus; a host array, or a jax.Array (re-laid out if sharded otherwise).
    k: results per query; clipped to N.
    mesh: the device mesh.
    axes: mesh axes to split the corpus over; default all of them.
    chunk: corpus rows per scan step on each device (clipped to the local shard).
    precision: matmul precision (HIGHEST by default, as in `chunked_topk`).

  Returns:
    scores (Q, k') float32, indices (Q, k') int32, k' = min(k, N), best first; replicated.
  """
  axes = tuple(mesh.axis_names if axes is None else axes)
  unknown = [a for a in axes if a not in mesh.axis_names]
  if unknown:
    raise ValueError(f"axes={axes}: {unknown} are not axes of the mesh {mesh.axis_names}.")
  num_q, dim = q_qd.shape
  num_docs = corpus_nd.shape[0]
  if corpus_nd.shape[1] != dim:
    raise ValueError(f"q_qd has d={dim} but corpus_nd has d={corpus_nd.shape[1]}.")
  if k < 1 or chunk < 1:
    raise ValueError(f"k={k} and chunk={chunk} must be >= 1.")
  if num_docs == 0:
    raise ValueError("corpus_nd is empty (N=0); there is nothing to rank.")
  num_dev = int(np.prod([mesh.shape[a] for a in axes]))
  local_n = -(-num_docs // num_dev)
  k = min(k, num_docs)
  k_local = min(k, local_n)  # D * k_local >= k: the merge always has k candidates
  pad = local_n * num_dev - num_docs
  if pad:  # on the host when the corpus is there, so no device ever holds it whole
    xp = np if isinstance(corpus_nd, np.ndarray) else jnp
    corpus_nd = xp.concatenate([corpus_nd, xp.zeros((pad, dim), corpus_nd.dtype)])
  corpus_spec = P(axes if len(axes) > 1 else axes[0], None)
  corpus_nd = jax.device_put(corpus_nd, NamedSharding(mesh, corpus_spec))
  q_qd = jax.device_put(q_qd, NamedSharding(mesh, P()))
  return _sharded_topk_fn(mesh, axes, corpus_spec, num_docs, local_n, k, k_local,
                          min(chunk, local_n), precision)(q_qd, corpus_nd)


@functools.lru_cache(maxsize=64)
def _sharded_topk_fn(mesh, axes, corpus_spec, num_docs, local_n, k, k_local, chunk, precision):
  """The jitted shard_map of `sharded_topk`, one per static configuration."""

  def local(q_qd, c_nd):
    shard = jax.lax.axis_index(axes)
    offset = shard * local_n
    num_valid = jnp.clip(num_docs - offset, 0, local_n)
    s_qk, i_qk = _scan_topk(q_qd, c_nd, k_local, chunk, precision, offset=offset,
                            num_valid=num_valid)
    # (Q, D, k_local) in device order, flipped to put higher corpus indices first (tie order).
    all_s = jax.lax.all_gather(s_qk, axes, axis=1)[:, ::-1].reshape(s_qk.shape[0], -1)
    all_i = jax.lax.all_gather(i_qk, axes, axis=1)[:, ::-1].reshape(i_qk.shape[0], -1)
    top_s, pos = jax.lax.top_k(all_s, k)
    return top_s, jnp.take_along_axis(all_i, pos, axis=1)

  fn = jax.shard_map(local, mesh=mesh, in_specs=(P(), corpus_spec), out_specs=(P(), P()),
                     check_vma=False)
  return jax.jit(fn)


def _check_ranking(ranked_qk: np.ndarray) -> None:
  sorted_qk = np.sort(ranked_qk, axis=1)
  dup = (sorted_qk[:, 1:] == sorted_qk[:, :-1]) & (sorted_qk[:, 1:] >= 0)
  if dup.any():
    q = int(np.argwhere(dup)[0, 0])
    raise ValueError(f"ranked_ids row {q} lists a document twice; rankings must be duplicate-free.")


def _gains_and_ideal(ranked_qk: np.ndarray, relevance: Relevance
                     ) -> tuple[np.ndarray, list[np.ndarray], int | None]:
  """Grades of the ranked documents (Q, K) and each query's judged grades > 0, sorted down."""
  num_q, num_k = ranked_qk.shape
  if isinstance(relevance, np.ndarray):
    grades_qn = np.asarray(relevance, np.float64)
    if grades_qn.ndim != 2 or grades_qn.shape[0] != num_q:
      raise ValueError(f"dense relevance must be (Q={num_q}, N); got shape {grades_qn.shape}.")
    num_docs = grades_qn.shape[1]
    if ranked_qk.size and ranked_qk.max() >= num_docs:
      raise ValueError(f"ranked_ids holds index {ranked_qk.max()} >= N={num_docs} columns of the "
                       "relevance matrix.")
    safe_qk = np.where(ranked_qk >= 0, ranked_qk, 0)
    gains_qk = np.where(ranked_qk >= 0, np.take_along_axis(grades_qn, safe_qk, axis=1), 0.0)
    ideal = [-np.sort(-row[row > 0]) for row in grades_qn]
  else:
    if len(relevance) != num_q:
      raise ValueError(f"relevance has {len(relevance)} queries but ranked_ids has {num_q} rows.")
    num_docs = None
    gains_qk = np.zeros((num_q, num_k), np.float64)
    ideal = []
    for q, judged in enumerate(relevance):
      row = ranked_qk[q]
      gains_qk[q] = [judged.get(int(d), 0.0) if d >= 0 else 0.0 for d in row]
      grades = np.asarray([g for g in judged.values() if g > 0], np.float64)
      ideal.append(-np.sort(-grades))
  return np.maximum(gains_qk, 0.0), ideal, num_docs


def retrieval_metrics(ranked_ids: np.ndarray, relevance: Relevance,
                      ks: Sequence[int] = (1, 5, 10), *, num_docs: int | None = None,
                      per_query: bool = False) -> dict[str, float | int | np.ndarray]:
  """Recall, precision, nDCG, MRR and MAP at each k, plus full MAP (conventions: module doc).

  Args:
    ranked_ids: (Q, K) int document ids, best first (e.g. from `rank_topk` / `chunked_topk`); -1
      marks an empty slot.
    relevance: per query either a dict {doc id: grade}, or a dense (Q, N) grade matrix whose
      column j is document id j.
    ks: cut-offs.
    num_docs: corpus size N, if known (implied by a dense relevance matrix); used only to reject a
      ranking shorter than min(max(ks), N).
    per_query: also return each metric per query as a (Q,) float64 array under "<name>/per_query"
      (NaN for queries without a relevant document).

  Returns:
    {"recall@k", "precision@k", "ndcg@k", "mrr@k", "map@k" for k in ks, "map": float means over
     the queries with a relevant document; "num_queries", "num_queries_no_relevant": int}.
  """
  ranked_qk = np.asarray(ranked_ids)
  if (ranked_qk.ndim != 2 or not np.issubdtype(ranked_qk.dtype, np.integer)
      or ranked_qk.shape[1] == 0):
    raise ValueError(f"ranked_ids must be a (Q, K >= 1) int array; got {ranked_qk.dtype} "
                     f"{ranked_qk.shape}.")
  if not ks or min(ks) < 1:
    raise ValueError(f"ks={tuple(ks)} must be non-empty positive cut-offs.")
  ranked_qk = ranked_qk.astype(np.int64)
  _check_ranking(ranked_qk)
  gains_qk, ideal, dense_docs = _gains_and_ideal(ranked_qk, relevance)
  num_docs = dense_docs if dense_docs is not None else num_docs
  num_q, num_k = ranked_qk.shape
  if num_docs is not None and num_k < min(max(ks), num_docs):
    raise ValueError(f"ranked_ids has K={num_k} columns but ks={tuple(ks)} needs "
                     f"min(max(ks), N={num_docs}) = {min(max(ks), num_docs)}; retrieve more.")

  # Ranks past the ranking's end are non-relevant (trec_eval): pad the gains with zeros to the
  # widest cut-off, so every metric @k is read at rank k itself (precision divides by k, the ideal
  # DCG runs to rank k) whatever the ranking's width.
  width = max(num_k, max(ks))
  gains_qk = np.pad(gains_qk, ((0, 0), (0, width - num_k)))
  num_rel_q = np.asarray([len(g) for g in ideal], np.float64)
  valid_q = num_rel_q > 0
  rel_qk = gains_qk > 0
  hits_qk = np.cumsum(rel_qk, axis=1)  # relevant documents in the top r
  ranks_k = np.arange(1, width + 1, dtype=np.float64)
  discount_k = 1.0 / np.log2(ranks_k + 1.0)
  dcg_qk = np.cumsum(gains_qk * discount_k, axis=1)
  ideal_qk = np.zeros((num_q, width))
  for q, grades in enumerate(ideal):
    top = grades[:width]
    ideal_qk[q, :len(top)] = top
  idcg_qk = np.cumsum(ideal_qk * discount_k, axis=1)
  first_rank_q = np.where(rel_qk.any(axis=1), rel_qk.argmax(axis=1) + 1, np.inf)
  # precision@r at each relevant rank r, 0 elsewhere; its running sum feeds MAP@k.
  ap_terms_qk = np.cumsum(np.where(rel_qk, hits_qk / ranks_k, 0.0), axis=1)
  safe_rel_q = np.maximum(num_rel_q, 1.0)

  per_q: dict[str, np.ndarray] = {}
  for k in ks:
    hits_q = hits_qk[:, k - 1]
    per_q[f"recall@{k}"] = hits_q / safe_rel_q
    per_q[f"precision@{k}"] = hits_q / k
    idcg_q = idcg_qk[:, k - 1]
    per_q[f"ndcg@{k}"] = np.where(idcg_q > 0, dcg_qk[:, k - 1] / np.where(idcg_q > 0, idcg_q, 1),
                                  0.0)
    per_q[f"mrr@{k}"] = np.where(first_rank_q <= k, 1.0 / first_rank_q, 0.0)
    per_q[f"map@{k}"] = ap_terms_qk[:, k - 1] / safe_rel_q
  per_q["map"] = ap_terms_qk[:, -1] / safe_rel_q

  out: dict[str, float | int | np.ndarray] = {}
  for name, values_q in per_q.items():
    out[name] = float(values_q[valid_q].mean()) if valid_q.any() else float("nan")
    if per_query:
      out[f"{name}/per_query"] = np.where(valid_q, values_q, np.nan)
  out["num_queries"] = int(num_q)
  out["num_queries_no_relevant"] = int((~valid_q).sum())
  return out


def retrieval_problem(examples: Sequence[Mapping], *, include_negatives: bool = False
                      ) -> tuple[list[str], list[str], list[dict[int, float]]]:
  """Example dicts -> (query texts, corpus texts, relevance) for `retrieval_metrics`.

  Queries are merged by "query_id" and documents by "positive_id" (content hashes), so a query
  whose text occurs with several positives (the same docstring on two functions) has all of them
  relevant (grade 1), and a positive shared by many queries (a class label) is one document.
  Order is first appearance, so the result is deterministic.

  Args:
    examples: dicts with "query", "positive", "query_id", "positive_id" and, if
      include_negatives, "negatives" (texts added to the corpus as distractors, never relevant
      unless they are also some query's positive).

  Returns:
    query_texts (Q,), corpus_texts (N,), relevance: per query {corpus index: 1.0}.
  """
  query_row: dict[int, int] = {}
  doc_col: dict[int, int] = {}
  queries: list[str] = []
  corpus: list[str] = []
  relevance: list[dict[int, float]] = []

  def column(doc_id: int, text: str) -> int:
    if doc_id not in doc_col:
      doc_col[doc_id] = len(corpus)
      corpus.append(text)
    return doc_col[doc_id]

  for ex in examples:
    qid = int(ex["query_id"])
    if qid not in query_row:
      query_row[qid] = len(queries)
      queries.append(ex["query"])
      relevance.append({})
    relevance[query_row[qid]][column(int(ex["positive_id"]), ex["positive"])] = 1.0
  if include_negatives:
    # Negatives carry no ids; a negative that is another query's positive is found by its text.
    text_col = {text: col for col, text in enumerate(corpus)}
    for ex in examples:
      for text in ex.get("negatives", ()):
        if text not in text_col:
          text_col[text] = len(corpus)
          corpus.append(text)
  return queries, corpus, relevance


def reverse_problem(queries: Sequence[Any], corpus: Sequence[Any], relevance: Sequence[Mapping[int, float]]
                    ) -> tuple[list[Any], list[Any], list[dict[int, float]]]:
  """The same judgments the other way round: the corpus becomes the queries (each with the old
  queries that judged it relevant) and the queries the corpus. Documents no query judged are dropped
  as queries (nothing to find)."""
  back: list[dict[int, float]] = [{} for _ in corpus]
  for q, rel in enumerate(relevance):
    for d, grade in rel.items():
      if grade > 0:
        back[d][q] = grade
  keep = [d for d in range(len(corpus)) if back[d]]
  return [corpus[d] for d in keep], list(queries), [back[d] for d in keep]
