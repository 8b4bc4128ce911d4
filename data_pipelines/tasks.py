"""Task name -> builder of that task's examples. A plain dict: jump to each definition from here.

A builder takes the split ("train" or "eval") and returns a TaskSource: a random-access sequence of
example dicts {"query", "positive", "negatives", "query_id", "positive_id", "group"} (see
`data_pipelines.stdlib_tasks`), which a `grain.MapDataset.source(...)` can wrap directly.

Everything about how a task is trained (task string / prompt, sequence lengths, batch size,
sampling rate) lives in the config, not here. To add a task, write its builder and add one line.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

from data_pipelines import hard_negatives
from data_pipelines import media_datasets
from data_pipelines import media_tasks
from data_pipelines import stdlib_tasks
from data_pipelines import synthetic

TaskSource = Sequence[dict[str, Any]]

TASKS: dict[str, Callable[..., TaskSource]] = {
    "stdlib_code_search": functools.partial(stdlib_tasks.load_task, "code_search"),
    "stdlib_doc_retrieval": functools.partial(stdlib_tasks.load_task, "doc_retrieval"),
    "stdlib_module_cls": functools.partial(stdlib_tasks.load_task, "module_classification"),
    # The retrieval tasks with BM25-mined hard negatives (data_pipelines/hard_negatives.py).
    **hard_negatives.TASKS,
    # Generated, for tests and quick checks.
    "synthetic_pairs": functools.partial(synthetic.word_pairs, size=512),
    "synthetic_labels": functools.partial(synthetic.word_pairs, size=512, num_labels=6),
    "synthetic_empty": functools.partial(synthetic.word_pairs, size=0),
    # Generated multimodal tasks (data_pipelines/media_tasks.py): the demo's image, audio, video and
    # interleaved tasks, held out by content.
    **media_tasks.MEDIA_TASKS,
    "shapes_caption_reversed": lambda split: media_tasks.swap_sides(media_tasks.shapes_caption(split)),
    # Real datasets (data_pipelines/media_datasets.py), read from $EMBED2_DATA_DIR/<name> when present.
    **media_datasets.DATASETS,
}


def build_task(name: str, split: str, *, max_skipped_fraction: float | None = None) -> TaskSource:
  """Examples of task `name` for `split`.

  Args:
    name: a key of TASKS.
    split: "train" or "eval" (real datasets also take their own split names).
    max_skipped_fraction: for the real datasets (media_datasets.DATASETS), the share of a split's
      examples whose media file may be missing (skipped and counted); None: the dataset's default.
      The trainer applies the same limit to records it cannot decode (`config.max_skipped_fraction`).

  Raises:
    ValueError: unknown task name (the message lists the known ones) or split.
    FileNotFoundError: a real dataset's annotations, or more of its media files than allowed, are missing.
  """
  if name not in TASKS:
    raise ValueError(f"task name={name!r} is unknown; known tasks: {sorted(TASKS)}. "
                     "Add a builder to data_pipelines.tasks.TASKS or fix the config's task name.")
  builder = TASKS[name]
  if max_skipped_fraction is not None and builder in media_datasets.DATASETS.values():
    return builder(split, max_missing_fraction=max_skipped_fraction)
  return builder(split)
