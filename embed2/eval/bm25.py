"""Okapi BM25: the lexical baseline a learned embedding has to beat.

score(q, d) = sum over query tokens t (repeats count, as in Lucene / rank_bm25) of
    idf(t) * f(t, d) * (k1 + 1) / (f(t, d) + k1 * (1 - b + b * |d| / avgdl))
    idf(t)  = log(1 + (N - n(t) + 0.5) / (n(t) + 0.5))        (Lucene's form; always > 0)

f(t, d) is the count of t in d, |d| the token count of d, avgdl the mean |d| over the corpus, N
the number of documents, n(t) the number of documents containing t. Query tokens that never occur
in the corpus add nothing.

Tokenisation suits code and English alike: identifiers are split on non-alphanumerics
(snake_case, dotted.names) and on case changes (camelCase, HTTPServer -> http, server), letters
and digits are separated, everything is lower-cased.

The index is sparse (postings per term, numpy only); scoring one query touches only the postings
of its terms, and the (Q, N) dense score matrix is built one row at a time.
"""
from __future__ import annotations

import collections
import re
from typing import Sequence

import numpy as np

from embed2.eval import metrics

_RUN_RE = re.compile(r"[^\W_]+")  # letters and digits (any script); `_` and punctuation split
# Inside an ASCII run: an acronym before a capitalised word (HTTP|Server), a (capitalised)
# lower-case word, an acronym, or digits.
_PART_RE = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")


def tokenize(text: str) -> list[str]:
  """'parseHTTPHeaders(raw_bytes, v2)' -> ['parse', 'http', 'headers', 'raw', 'bytes', 'v', '2'].

  Runs with non-ASCII characters are kept whole (lower-cased): case splitting is for identifiers.
  """
  tokens = []
  for run in _RUN_RE.findall(text):
    if run.isascii():
      tokens.extend(part.lower() for part in _PART_RE.findall(run))
    else:
      tokens.append(run.lower())
  return tokens


class BM25:
  """Okapi BM25 index over a fixed corpus.

  Args:
    corpus_texts: N documents.
    k1: term-frequency saturation (> 0).
    b: length normalisation in [0, 1].
  """

  def __init__(self, corpus_texts: Sequence[str], *, k1: float = 1.2, b: float = 0.75):
    if k1 <= 0:
      raise ValueError(f"BM25 k1={k1} must be > 0 (1.2 is the usual choice).")
    if not 0 <= b <= 1:
      raise ValueError(f"BM25 b={b} must be in [0, 1] (0.75 is the usual choice).")
    self.k1, self.b = float(k1), float(b)
    self.num_docs = len(corpus_texts)
    self.vocab: dict[str, int] = {}
    term_ids, doc_ids, tfs = [], [], []
    doc_len_n = np.zeros(self.num_docs, np.float64)
    for doc, text in enumerate(corpus_texts):
      counts = collections.Counter(tokenize(text))
      doc_len_n[doc] = sum(counts.values())
      for token, tf in counts.items():
        term_ids.append(self.vocab.setdefault(token, len(self.vocab)))
        doc_ids.append(doc)
        tfs.append(tf)
    term_ids = np.asarray(term_ids, np.int64)
    doc_ids = np.asarray(doc_ids, np.int64)
    tf = np.asarray(tfs, np.float64)
    # Postings grouped by term (CSC layout): term t's postings are [ptr[t], ptr[t + 1]).
    order = np.argsort(term_ids, kind="stable")
    self._post_doc = doc_ids[order]
    df_v = np.bincount(term_ids, minlength=len(self.vocab)).astype(np.float64)
    self._ptr = np.concatenate([[0], np.cumsum(df_v)]).astype(np.int64)
    n = self.num_docs
    self.idf_v = np.log1p((n - df_v + 0.5) / (df_v + 0.5))
    avgdl = doc_len_n.mean() if n and doc_len_n.sum() > 0 else 1.0
    norm = self.k1 * (1.0 - self.b + self.b * doc_len_n[doc_ids] / avgdl)
    weight = self.idf_v[term_ids] * tf * (self.k1 + 1.0) / (tf + norm)
    self._post_weight = weight[order]

  def _score_row(self, text: str) -> np.ndarray:
    ids = [self.vocab[t] for t in tokenize(text) if t in self.vocab]
    if not ids:
      return np.zeros(self.num_docs, np.float64)
    ids_t = np.asarray(ids, np.int64)
    starts, ends = self._ptr[ids_t], self._ptr[ids_t + 1]
    # Concatenated postings of all query tokens (repeats included), summed per doc.
    pos = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)])
    return np.bincount(self._post_doc[pos], weights=self._post_weight[pos],
                       minlength=self.num_docs)

  def scores(self, query_texts: Sequence[str]) -> np.ndarray:
    """BM25 scores, (Q, N) float64; 0 for documents sharing no token with the query."""
    out_qn = np.zeros((len(query_texts), self.num_docs), np.float64)
    for i, text in enumerate(query_texts):
      out_qn[i] = self._score_row(text)
    return out_qn

  def topk(self, query_texts: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k documents per query: (scores (Q, k') float64, indices (Q, k') int64), k' = min(k, N).

    Ties (e.g. all-zero rows) go to the higher document index, as in `metrics.rank_topk`.
    """
    scores_qn = self.scores(query_texts)
    idx_qk = metrics.rank_topk(scores_qn, k)
    return np.take_along_axis(scores_qn, idx_qk, axis=1), idx_qk
