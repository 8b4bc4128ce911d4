"""The trainer's test seam: faults a test injects into a real run, named in $EMBED2_FAULTS.

Tests need a run to die exactly between two commits (a stage end writes the stage export and then the
checkpoint), to be preempted at a known step, or to meet a batch whose loss is not finite: things a
signal from outside or real data hit only by chance. None of it is in the jitted step: the trainer
consults `Faults` on the host, once before each step and at each save point.

  EMBED2_FAULTS="FAULT@STEP[,FAULT@STEP...]"      STEP counts the steps done (0 = before the first)

  kill@S             SIGKILL (nothing flushed) before the next step runs, once S steps are done
  kill_save@S        SIGKILL right after the (asynchronous) save of the checkpoint at S started: half written
  kill_checkpoint@S  SIGKILL after the checkpoint at S has been committed (the trainer waits for it first)
  kill_export@S      SIGKILL after the stage export at S has been committed, before that step's checkpoint
  sigterm@S          SIGTERM (a preemption notice) to itself before the next step runs, once S steps are done
  nan@S              the next step, once S steps are done, reads token ids past any vocabulary: the
                     embedding lookup fills them with NaN (`jnp.take`'s "fill" mode), so its loss and
                     gradients are NaN and the guard rail skips it

e.g. `EMBED2_FAULTS=kill_export@5 python -m embed2.main ...`. A run and its soup variants (one process,
one after the other) each count their own steps. Unset, each consultation is one set lookup.
"""

from __future__ import annotations

import os
import signal

import numpy as np

ENV = "EMBED2_FAULTS"
FAULTS = ("kill", "kill_save", "kill_checkpoint", "kill_export", "sigterm", "nan")
# Past any vocabulary, and still an int32 like the token arrays it replaces (the compiled step is reused).
OUT_OF_VOCABULARY = np.iinfo(np.int32).max


def parse(spec: str) -> frozenset[tuple[str, int]]:
  """"kill_export@5,nan@7" -> {("kill_export", 5), ("nan", 7)}."""
  out = set()
  for item in filter(None, (x.strip() for x in spec.split(","))):
    fault, at, step = item.partition("@")
    if not at or fault not in FAULTS or not step.isdigit():
      raise ValueError(f"${ENV}={spec!r}: expected FAULT@STEP items with FAULT in {FAULTS} and STEP >= 0, "
                       "e.g. kill_export@5")
    out.add((fault, int(step)))
  return frozenset(out)


class Faults:
  """The faults of $EMBED2_FAULTS (read when the trainer starts a run), consulted on the host."""

  def __init__(self, spec: str = ""):
    self.points = parse(spec)

  @classmethod
  def from_env(cls) -> Faults:
    return cls(os.environ.get(ENV, ""))

  def before_step(self, step: int, host: dict) -> dict:
    """The inputs of the step after `step` steps: `host`, or a copy whose token ids are out of
    vocabulary (nan@step). Kills the process first at kill@step; sends it SIGTERM at sigterm@step (the
    step still runs: the trainer stops after it, as on a real preemption notice)."""
    if not self.points:
      return host
    self._kill("kill", step)
    if ("sigterm", step) in self.points:
      os.kill(os.getpid(), signal.SIGTERM)
    if ("nan", step) in self.points:
      host = {k: np.full_like(v, OUT_OF_VOCABULARY) if k.endswith("_tokens") else v for k, v in host.items()}
    return host

  def after_save(self, step: int, wait) -> None:
    """After the checkpoint at `step` started saving: kill_save@step kills now; kill_checkpoint@step
    calls `wait()` (until the save committed) and kills."""
    self._kill("kill_save", step)
    if ("kill_checkpoint", step) in self.points:
      wait()
      self._kill("kill_checkpoint", step)

  def after_export(self, step: int) -> None:
    """After the stage export at `step` committed: kill_export@step kills now."""
    self._kill("kill_export", step)

  def _kill(self, fault: str, step: int) -> None:
    if (fault, step) in self.points:
      os.kill(os.getpid(), signal.SIGKILL)
