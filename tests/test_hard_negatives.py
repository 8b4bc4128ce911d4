"""BM25 hard negatives (data_pipelines/hard_negatives.py), against BM25 scores computed here."""

import numpy as np
import pytest

from data_pipelines import hard_negatives
from embed2.eval import bm25


def _examples(rng, n=40):
  words = [f"w{i}" for i in range(60)]
  out = []
  for i in range(n):
    positive = " ".join(rng.choice(words, size=int(rng.integers(5, 15))))
    query = " ".join(rng.choice(positive.split(), size=3))
    out.append({"query": query, "positive": positive, "negatives": [f"own {i}"], "query_id": i,
                "positive_id": i, "group": "g"})
  # one query with two right answers: neither may be the other's negative
  out.append(dict(out[0], positive=out[1]["positive"], query_id=0, positive_id=1))
  return out


@pytest.mark.parametrize("skip", [0, 2])
def test_bm25_negatives_are_the_best_ranked_wrong_targets(rng, skip):
  examples = _examples(rng)
  before = [dict(ex, negatives=list(ex["negatives"])) for ex in examples]
  mined = hard_negatives.bm25_negatives(examples, skip=skip)
  assert examples == before  # the input is not changed
  corpus = list(dict.fromkeys(ex["positive"] for ex in examples))
  scores_qn = bm25.BM25(corpus).scores([ex["query"] for ex in examples])
  right = {}
  for ex in examples:
    right.setdefault(ex["query"], set()).add(ex["positive"])
  for ex, got, s_n in zip(examples, mined, scores_qn):
    assert {k: v for k, v in got.items() if k != "negatives"} == {k: v for k, v in ex.items() if k != "negatives"}
    (neg,) = got["negatives"]
    assert neg not in right[ex["query"]]
    order = np.lexsort((-np.arange(len(corpus)), -s_n))  # by score, ties to the higher index
    wrong = [corpus[i] for i in order if corpus[i] not in right[ex["query"]]]
    assert neg == wrong[skip]


def test_bm25_negatives_refuses_bad_counts(rng):
  with pytest.raises(ValueError, match="skip"):
    hard_negatives.bm25_negatives(_examples(rng), skip=19, depth=19)
