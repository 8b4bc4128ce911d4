"""Hard negatives mined with BM25 over a task's own split: the targets that a lexical retriever ranks
highest for a query, other than the query's positive.

  examples = stdlib_tasks.load_task("code_search", "train")
  mined = bm25_negatives(examples)   # each example's "negatives" = [its best-ranked wrong target]

The corpus is the split's distinct positives (so negatives come from the same split: train examples
never see an eval target). A candidate is skipped when its text equals the positive's, or when it
is the positive of another example with the same query text (a second right answer, not a negative);
then the `skip` best-ranked wrong targets are passed over too: in the stdlib tasks they are mostly
near-copies of the positive (an overload, the same docstring on a sibling class), right answers that
only lack the label, and training them apart costs held-out accuracy.
An example whose query matches nothing keeps its mined-at-source negatives. Deterministic: BM25
scores with ties broken by corpus order (embed2.eval.bm25).

`TASKS` adds the stdlib retrieval tasks with these negatives (data_pipelines.tasks lists them).
"""
from __future__ import annotations

import collections
import functools
from typing import Any, Sequence

from data_pipelines import stdlib_tasks
from embed2.eval import bm25


def bm25_negatives(examples: Sequence[dict[str, Any]], *, num_negatives: int = 1, skip: int = 0,
                   depth: int = 20) -> list[dict[str, Any]]:
  """Copies of `examples` whose "negatives" are the top-`num_negatives` BM25 targets that are wrong.

  Args:
    examples: {"query", "positive", "negatives", ...} dicts of one split.
    num_negatives: negatives per example.
    skip: wrong targets passed over, best-ranked first, before the negatives are taken.
    depth: candidates looked at per query; an example with fewer wrong ones among them keeps what
      it found, topped up with its own negatives.

  Returns:
    new dicts (the input is not changed), in input order.
  """
  if num_negatives < 1 or skip < 0 or depth < skip + num_negatives:
    raise ValueError(f"num_negatives={num_negatives} must be >= 1, skip={skip} >= 0, and skip + "
                     f"num_negatives <= depth={depth}")
  corpus = list(dict.fromkeys(ex["positive"] for ex in examples))
  right = collections.defaultdict(set)  # query text -> every positive it has in this split
  for ex in examples:
    right[ex["query"]].add(ex["positive"])
  index = bm25.BM25(corpus)
  _, idx_qk = index.topk([ex["query"] for ex in examples], min(depth, len(corpus)))
  out = []
  for ex, idx in zip(examples, idx_qk):
    found = [corpus[i] for i in idx if corpus[i] not in right[ex["query"]]][skip:skip + num_negatives]
    found += [n for n in ex["negatives"] if n not in found][:num_negatives - len(found)]
    out.append(dict(ex, negatives=found))
  return out


# Best-ranked wrong targets passed over in the stdlib tasks (see the module docstring).
STDLIB_SKIP = 2


@functools.lru_cache(maxsize=None)
def _mined(task: str, split: str) -> tuple[dict[str, Any], ...]:
  return tuple(bm25_negatives(stdlib_tasks.load_task(task, split), skip=STDLIB_SKIP))


def stdlib_bm25(task: str, split: str) -> list[dict[str, Any]]:
  """A stdlib retrieval task (stdlib_tasks.TASK_NAMES) with BM25 hard negatives; mined once per process."""
  return [dict(ex, negatives=list(ex["negatives"])) for ex in _mined(task, split)]


TASKS = {
    "stdlib_code_search_bm25": functools.partial(stdlib_bm25, "code_search"),
    "stdlib_doc_retrieval_bm25": functools.partial(stdlib_bm25, "doc_retrieval"),
}
