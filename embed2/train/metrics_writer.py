"""Where training metrics go: `metrics.jsonl` in the workdir (one JSON line per logged step), TensorBoard
event files (tensorboardX, no TensorFlow) under `workdir/tensorboard`, and a progress bar with ETA.

Only process 0 writes (`enabled`); the others keep quiet.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from typing import Any

from absl import logging
from etils import epath
from tensorboardX import SummaryWriter
from tqdm import tqdm

# TensorBoard's tag alphabet; tensorboardX renames any other character to '_' with a log line each time.
_NOT_IN_TAGS = re.compile(r"[^-/\w.]")


def tb_tag(name: str) -> str:
  """A metric name as a legal TensorBoard tag: '@' -> '_at_' ('ndcg@10' -> 'ndcg_at_10'), any other
  character TensorBoard refuses -> '_'. metrics.jsonl keeps the names as they are."""
  return _NOT_IN_TAGS.sub("_", name.replace("@", "_at_")).lstrip("/")


class MetricsWriter:

  def __init__(self, workdir, *, enabled: bool = True, tensorboard: bool = True,
               progress: bool | None = None):
    self.enabled = enabled
    self.path = epath.Path(workdir) / "metrics.jsonl"
    self._tb = None
    self._bar = None
    self._progress = sys.stderr.isatty() if progress is None else progress
    if not enabled:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._file = open(self.path, "a")
    if tensorboard:
      self._tb = SummaryWriter(str(epath.Path(workdir) / "tensorboard"))

  def write(self, step: int, values: dict[str, Any]) -> None:
    if not self.enabled or not values:
      return
    row = {"step": int(step), "time": time.time()}
    for k, v in values.items():
      if isinstance(v, float) and not math.isfinite(v):
        v = str(v)  # JSON has no NaN; keep it visible as a string
      row[k] = v
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in values.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
          self._tb.add_scalar(tb_tag(k), v, step)
      self._tb.flush()

  def progress_start(self, stage: str, done: int, total: int) -> None:
    if not self.enabled:
      return
    logging.info("stage %s: %s", stage, f"resumed at step {done} of {total}" if done else f"{total} steps")
    self._bar = tqdm(total=total, initial=done, desc=f"stage {stage}", unit="step",
                     disable=not self._progress, dynamic_ncols=True)

  def progress_update(self, n: int, loss: float) -> None:
    if self._bar is not None:
      self._bar.update(n)
      self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

  def progress_end(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None

  def close(self) -> None:
    self.progress_end()
    if not self.enabled:
      return
    self._file.close()
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir) -> list[dict[str, Any]]:
  """All rows of `workdir/metrics.jsonl`."""
  path = epath.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
