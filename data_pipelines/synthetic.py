"""A small generated text task for tests and quick checks: a query of random words, its positive the
same words mapped through a fixed substitution (so an encoder can learn the pairing), a hard negative
of the same words in another order. Deterministic per (split, size, seed); splits do not overlap.
"""

from __future__ import annotations

import numpy as np

from data_pipelines import stdlib_tasks

_VOCAB = [f"{a}{b}" for a in "bcdfghjklmnprstvz" for b in "aeiou"]  # 85 syllables
_SPLIT_SEED = {"train": 0, "eval": 1}


def word_pairs(split: str, *, size: int = 512, seed: int = 0, num_labels: int = 0) -> list[dict]:
  """Examples {"query", "positive", "negatives", "query_id", "positive_id", "group"}.

  Args:
    split: "train" or "eval".
    size: number of examples.
    seed: generator seed (the split is folded in).
    num_labels: if > 0, a classification variant: the positive is one of `num_labels` label texts
      chosen by the query's first word, so many queries share a target.
  """
  if split not in _SPLIT_SEED:
    raise ValueError(f"split={split!r}; choose 'train' or 'eval'")
  rng = np.random.default_rng([seed, _SPLIT_SEED[split], num_labels])
  perm = np.random.default_rng(seed).permutation(len(_VOCAB))
  out = []
  for i in range(size):
    n = int(rng.integers(3, 12))
    words = [int(w) for w in rng.integers(0, len(_VOCAB), n)]
    query = " ".join(_VOCAB[w] for w in words)
    if num_labels:
      positive = f"label {words[0] % num_labels}"
    else:
      positive = " ".join(_VOCAB[perm[w]] for w in words)
    negative = " ".join(_VOCAB[perm[w]] for w in rng.permutation(words))
    out.append({"query": query, "positive": positive, "negatives": [negative],
                "query_id": stdlib_tasks.content_id(query), "positive_id": stdlib_tasks.content_id(positive),
                "group": f"{split}{i % 7}"})
  return out
