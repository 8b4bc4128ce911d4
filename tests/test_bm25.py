"""BM25 against a brute-force float64 evaluation of the formula."""
import collections
import math

import numpy as np
import pytest

from embed2.eval import bm25


def test_tokenize_code_and_english():
  assert bm25.tokenize("parseHTTPHeaders(raw_bytes, v2)") == [
      "parse", "http", "headers", "raw", "bytes", "v", "2"]
  assert bm25.tokenize("os.path.join; __init__ XMLHttpRequest") == [
      "os", "path", "join", "init", "xml", "http", "request"]
  assert bm25.tokenize("Return the Größe, café!") == ["return", "the", "größe", "café"]
  assert bm25.tokenize("  ,;  ") == []


def _reference_scores(corpus, queries, k1, b):
  docs = [collections.Counter(bm25.tokenize(t)) for t in corpus]
  n = len(docs)
  lengths = [sum(d.values()) for d in docs]
  avgdl = sum(lengths) / n
  out = np.zeros((len(queries), n))
  for i, query in enumerate(queries):
    for j, doc in enumerate(docs):
      total = 0.0
      for token in bm25.tokenize(query):
        df = sum(1 for d in docs if token in d)
        if df == 0 or doc[token] == 0:  # adds 0 (and b=1, |d|=0 would divide by 0)
          continue
        idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
        f = doc[token]
        total += idf * f * (k1 + 1) / (f + k1 * (1 - b + b * lengths[j] / avgdl))
      out[i, j] = total
  return out


def _random_texts(rng, count, words, max_len):
  texts = []
  for _ in range(count):
    parts = rng.choice(words, size=rng.integers(0, max_len))
    # Mix separators and case conventions so the tokenizer's splitting is exercised too.
    seps = rng.choice([" ", "_", ".", ", ", "("], size=len(parts))
    texts.append("".join(f"{p.capitalize() if rng.random() < 0.3 else p}{s}"
                         for p, s in zip(parts, seps)))
  return texts


@pytest.mark.parametrize("k1,b", [(1.2, 0.75), (1.5, 0.75), (0.9, 0.0), (2.0, 1.0)])
def test_scores_match_reference(k1, b):
  rng = np.random.default_rng(int(k1 * 10 + b * 100))
  words = np.array([f"w{c}" if i % 3 == 0 else c for i, c in enumerate("abcdefghijklmnopq")])
  corpus = _random_texts(rng, 25, words[:14], 12) + [""]  # an empty document too
  queries = _random_texts(rng, 10, words, 6) + ["zzz unseen", "a a a b"]  # OOV, repeats
  index = bm25.BM25(corpus, k1=k1, b=b)
  got = index.scores(queries)
  np.testing.assert_allclose(got, _reference_scores(corpus, queries, k1, b), rtol=1e-12,
                             atol=1e-12)
  assert got.shape == (len(queries), len(corpus)) and got.dtype == np.float64
  assert (got[-2] == 0).all()  # no query token in the corpus


def test_topk_ties_clip_and_exact_match():
  corpus = ["alpha beta", "gamma", "alpha beta", "delta epsilon alpha"]
  scores, idx = bm25.BM25(corpus).topk(["alpha beta", "nothing here"], 10)
  assert idx.shape == (2, 4)
  assert list(idx[0][:2]) == [2, 0]  # equal scores: higher index first (trec_eval's order)
  assert scores[0, 0] == scores[0, 1] > scores[0, 2] > 0
  np.testing.assert_array_equal(idx[1], [3, 2, 1, 0])  # all zero: index order, descending


def test_rejects_bad_parameters():
  with pytest.raises(ValueError, match="k1"):
    bm25.BM25(["a"], k1=0.0)
  with pytest.raises(ValueError, match="b="):
    bm25.BM25(["a"], b=1.5)
