"""Where training metrics go: JSON lines under `workdir/metrics/` (one line per logged row), TensorBoard
event files (tensorboardX, no TensorFlow) under `workdir/tensorboard`, and a progress bar with ETA.

The workdir may be on an object store (`gs://`, `s3://`), which has no append: the lines go into parts
`metrics/part-SSSSS-NNNNN.jsonl`, each written whole (every write rewrites the open part, at most
`ROWS_PER_PART` lines, then the next part begins). S counts writer sessions (one per process start of
a run: a resume is a new session), N the parts of a session. `read_metrics` is the one reader: it joins
the parts (after a pre-parts workdir's single `metrics.jsonl`) into one stream in which the steps a
resumed run replayed appear once, as the resumed run wrote them.

Only process 0 writes (`enabled`); the others keep quiet.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from typing import Any, Iterator

from absl import logging
from etils import epath
from tqdm import tqdm

from embed2.checkpoint import is_remote

# TensorBoard's tag alphabet; tensorboardX renames any other character to '_' with a log line each time.
_NOT_IN_TAGS = re.compile(r"[^-/\w.]")

METRICS_DIR = "metrics"
LEGACY_FILE = "metrics.jsonl"  # workdirs written before the parts: one file, appended in place
ROWS_PER_PART = 200  # a write rewrites the open part: bounded work per write
_PART = re.compile(r"part-(\d+)-(\d+)\.jsonl")
# TensorBoard's event writer for gs:// and s3:// re-uploads the whole event file at each flush: at most
# this often there (and at close); a local one flushes at every write.
_REMOTE_TB_FLUSH_S = 60.0


def tb_tag(name: str) -> str:
  """A metric name as a legal TensorBoard tag: '@' -> '_at_' ('ndcg@10' -> 'ndcg_at_10'), any other
  character TensorBoard refuses -> '_'. metrics.jsonl keeps the names as they are."""
  return _NOT_IN_TAGS.sub("_", name.replace("@", "_at_")).lstrip("/")


def _parts(workdir) -> list[tuple[int, int, epath.Path]]:
  """(session, part, path) of the metric parts of `workdir`, in write order."""
  folder = epath.Path(workdir) / METRICS_DIR
  if is_remote(folder):
    # gcsfs / s3fs keep a folder's listing (names and sizes) for the life of the process; the trainer,
    # another process, adds parts and rewrites the open one: list afresh.
    try:
      epath.backend.fsspec_backend.fs(folder).invalidate_cache(os.fspath(folder))
    except ImportError:  # no gcsfs / s3fs: epath reads through TensorFlow's gfile, which keeps no listing
      pass
  if not folder.is_dir():
    return []
  found = [(int(m[1]), int(m[2]), p) for p in folder.iterdir() if (m := _PART.fullmatch(p.name))]
  return sorted(found, key=lambda t: t[:2])


def _summary_writer(logdir: str):
  """tensorboardX's SummaryWriter on `logdir`, imported without torch unless torch is imported already.

  tensorboardX's package imports torch when it can (`try: import torch`, for the tensors and graphs it
  can log): ~2 s of CPU in every training process, which logs scalars only. A `None` in sys.modules
  makes that import raise ImportError, tensorboardX's own case of torch not installed; it is removed
  at once, so a later `import torch` works as usual. The event files are the same.
  """
  block = "torch" not in sys.modules
  if block:
    sys.modules["torch"] = None
  try:
    from tensorboardX import SummaryWriter  # boto3, google-cloud-storage (~1 s): only with TensorBoard on
  finally:
    if block and sys.modules.get("torch", 0) is None:
      del sys.modules["torch"]
  return SummaryWriter(logdir)


class MetricsWriter:
  """Writes `workdir/metrics/part-SSSSS-NNNNN.jsonl` (a new session S each time it is opened on the
  workdir), TensorBoard events and the progress bar. `write` returns once the row is stored."""

  def __init__(self, workdir, *, enabled: bool = True, tensorboard: bool = True,
               progress: bool | None = None, rows_per_part: int = ROWS_PER_PART):
    self.enabled = enabled
    self.folder = epath.Path(workdir) / METRICS_DIR
    self._tb = None
    self._bar = None
    self._progress = sys.stderr.isatty() if progress is None else progress
    self._rows_per_part = rows_per_part
    self._lines: list[str] = []  # the open part's lines
    self._part = 0
    self._remote = is_remote(workdir)
    self._tb_flushed = 0.0
    if not enabled:
      return
    self.folder.mkdir(parents=True, exist_ok=True)
    self._session = max((s for s, _, _ in _parts(workdir)), default=-1) + 1
    if tensorboard:
      self._tb = _summary_writer(str(epath.Path(workdir) / "tensorboard"))

  @property
  def path(self) -> epath.Path:
    """The part the next row goes into."""
    return self.folder / f"part-{self._session:05d}-{self._part:05d}.jsonl"

  def write(self, step: int, values: dict[str, Any]) -> None:
    if not self.enabled or not values:
      return
    row = {"step": int(step), "time": time.time()}
    for k, v in values.items():
      if isinstance(v, float) and not math.isfinite(v):
        v = str(v)  # JSON has no NaN; keep it visible as a string
      row[k] = v
    if len(self._lines) == self._rows_per_part:
      self._part, self._lines = self._part + 1, []
    self._lines.append(json.dumps(row) + "\n")
    # Written whole, never appended: a kill leaves the previous version of the part or this one.
    self.path.write_text("".join(self._lines))
    if self._tb is not None:
      for k, v in values.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
          self._tb.add_scalar(tb_tag(k), v, step)
      if not self._remote or time.monotonic() - self._tb_flushed > _REMOTE_TB_FLUSH_S:
        self._tb.flush()
        self._tb_flushed = time.monotonic()

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
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def _sessions(workdir) -> Iterator[list[dict[str, Any]]]:
  """The rows of each writer session in write order: the legacy file cut where its steps go back (a
  resume appended to it), then the parts grouped by session."""
  legacy = epath.Path(workdir) / LEGACY_FILE
  if legacy.exists():
    rows: list[dict[str, Any]] = []
    for line in legacy.read_text().splitlines():
      if not line.strip():
        continue
      row = json.loads(line)
      if rows and row["step"] < rows[-1]["step"]:
        yield rows
        rows = []
      rows.append(row)
    if rows:
      yield rows
  session, rows = None, []
  for s, _, path in _parts(workdir):
    if s != session and rows:
      yield rows
      rows = []
    session = s
    rows.extend(json.loads(line) for line in path.read_text().splitlines() if line.strip())
  if rows:
    yield rows


def has_metrics(workdir) -> bool:
  """Whether `workdir` holds training metrics (parts or a legacy metrics.jsonl)."""
  return bool(_parts(workdir)) or (epath.Path(workdir) / LEGACY_FILE).exists()


def read_metrics(workdir) -> list[dict[str, Any]]:
  """The metric rows of a workdir (local or on an object store) as one stream, in step order.

  A resumed run replays the steps after its last checkpoint: each step keeps the rows of the last
  session that wrote it (all of that session's rows of the step: a step may have a training row, an
  evaluation row and a skip row), so no step is lost and none appears twice.
  """
  by_step: dict[int, list[dict[str, Any]]] = {}
  for rows in _sessions(workdir):
    mine: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
      mine.setdefault(row["step"], []).append(row)
    by_step.update(mine)
  return [row for step in sorted(by_step) for row in by_step[step]]
