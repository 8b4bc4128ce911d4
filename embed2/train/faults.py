"""A test seam: the trainer kills its own process (SIGKILL, nothing flushed) at a named point.

The crash-safety tests need the process to die exactly between two commits (a stage end writes the
stage export and then the checkpoint), which a kill from outside hits only by chance. The points:

  step        before the next step runs, once STEP steps are done (what `config.debug_kill_at_step` does)
  save        right after the (asynchronous) save of the checkpoint at STEP started: it is half written
  checkpoint  after the checkpoint at STEP has been committed (the trainer waits for it first)
  export      after the stage export at STEP has been committed, before that step's checkpoint is saved

Set `EMBED2_KILL_AT="POINT@STEP[,POINT@STEP...]"` in the environment of a run, e.g.
`EMBED2_KILL_AT=export@5 python -m embed2.main ...`. Unset, each point costs one set lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "EMBED2_KILL_AT"
POINTS = ("step", "save", "checkpoint", "export")


def parse(spec: str) -> frozenset[tuple[str, int]]:
  """"export@5,step@7" -> {("export", 5), ("step", 7)}."""
  out = set()
  for item in filter(None, (x.strip() for x in spec.split(","))):
    point, at, step = item.partition("@")
    if not at or point not in POINTS or not step.lstrip("-").isdigit():
      raise ValueError(f"${ENV}={spec!r}: expected POINT@STEP items with POINT in {POINTS}, e.g. export@5")
    out.add((point, int(step)))
  return frozenset(out)


class KillSwitch:
  """Kills the process at the points named by $EMBED2_KILL_AT (and at `step@debug_kill_at_step`)."""

  def __init__(self, debug_kill_at_step: int = -1):
    points = set(parse(os.environ.get(ENV, "")))
    if debug_kill_at_step >= 0:
      points.add(("step", int(debug_kill_at_step)))
    self.points = frozenset(points)

  def wants(self, point: str, step: int) -> bool:
    return (point, step) in self.points

  def __call__(self, point: str, step: int) -> None:
    if (point, step) in self.points:
      os.kill(os.getpid(), signal.SIGKILL)
