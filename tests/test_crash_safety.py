"""A run killed at any instant, and re-run with the same command, ends with the same bits as a run
that was never interrupted: every checkpoint item, every stage export, the soup variant and the soup.

Kills come from the trainer's test seam (`embed2/train/faults.py`, $EMBED2_FAULTS: SIGKILL at a named
point, e.g. between the two commits of a stage end) and from outside at random instants. Each run is the
real entry point (`python -m embed2.main`) in a subprocess. More random trials: EMBED2_KILL_TRIALS=10.

Every run decodes with 2 workers (`config.data_workers=2`: read-ahead decodes and a prefetched batch are
in flight at each kill), the reference too: this is also the proof that a run killed with workers on
resumes exactly (tests/test_pipeline_workers.py pins the worker-count independence of the batches).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from embed2 import checkpoint as ckpt_lib
from embed2.train import faults
from embed2.train.metrics_writer import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Two stages (PFT ends at step 5, FT at 12), saves every 3 steps, two kept; then the variant "alt"
# (7 FT steps from the PFT export) and the soup of the two. One transformer block: what is checked
# (the bits after kills and re-runs) does not depend on the depth, and a run traces and compiles about
# a third less. (Every run after the first takes its compiled programs from the session's compilation
# cache, tests/conftest.py.)
ARG = "pft_steps=5,ft_steps=7,every=3,seed=7,layers=1"
FLAGS = ("--config.checkpoint.keep=2", "--config.data_workers=2")


def command(workdir, *flags):
  return [sys.executable, "-m", "embed2.main", f"--config={REPO}/configs/tiny.py:{ARG},soup",
          f"--workdir={workdir}", *FLAGS, *flags]


def env(kill_at=""):
  # The session's XLA flags (tests/conftest.py), 4 devices (the last device count wins).
  e = dict(os.environ, XLA_FLAGS=f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count=4",
           JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  e.pop(faults.ENV, None)
  if kill_at:
    e[faults.ENV] = kill_at
  return e


def run(workdir, *flags, kill_at="", expect_kill=False):
  proc = subprocess.run(command(workdir, *flags), cwd=REPO, env=env(kill_at), capture_output=True,
                        text=True, timeout=600)
  if expect_kill:
    assert proc.returncode == -signal.SIGKILL, (kill_at, proc.returncode, proc.stderr[-3000:])
  else:
    assert proc.returncode == 0, (kill_at, proc.returncode, proc.stderr[-3000:])
  return proc


# ------------------------------------------------------------------------------- what must be equal


def snapshot(directory, workdir, read):
  """The latest finished step of a checkpoints directory: {"step", "meta", "params", "train"?} as numpy
  (`read`: the `saved_item` fixture)."""
  ck = ckpt_lib.Checkpointer(directory, read_only=True)
  step = ck.latest_step()
  assert step is not None, f"no finished checkpoint in {directory}"
  meta = ck.read_meta(step)
  ck.close()
  meta.get("soup", {}).pop("created", None)  # the soup record's wall-clock time
  meta = json.loads(json.dumps(meta).replace(str(workdir), "WORKDIR"))  # the soup's ingredient paths
  out = {"step": step, "meta": meta}
  for item in ("params", "train"):
    if (directory / str(step) / item).exists():
      out[item] = read(directory / str(step) / item)
  return out


def run_state(workdir, read):
  """Everything a finished run leaves that a later run or a user reads, as numpy and JSON."""
  return {name: snapshot(workdir / rel, workdir, read) for name, rel in {
      "checkpoint": "checkpoints", "export_pft": "stages/pft", "export_ft": "stages/ft",
      "variant": "variants/alt/checkpoints", "variant_export": "variants/alt/stages/ft",
      "soup": "soup"}.items()}


def batch_crcs(workdir):
  """{step: crc32 of the step's query tokens} from the run's metrics."""
  return {r["step"]: r["data/batch_crc"] for r in read_metrics(workdir) if "data/batch_crc" in r}


def assert_bitwise_equal(got, want):
  assert got.keys() == want.keys()
  for name in want:
    g, w = got[name], want[name]
    assert g["step"] == w["step"], (name, g["step"], w["step"])
    assert g["meta"] == w["meta"], name  # data-iterator state, loss scalars, counts, ...
    assert g.keys() == w.keys(), name
    for item in ("params", "train"):
      if item in w:
        gl, gt = jax.tree.flatten(g[item])
        wl, wt = jax.tree.flatten(w[item])
        assert gt == wt, (name, item)
        for a, b in zip(gl, wl):
          np.testing.assert_array_equal(a, b, err_msg=f"{name}/{item}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, saved_item):
  """One uninterrupted run, and about how long a run takes once its programs are compiled: the
  reference's time less the compiles it logged (the later runs find them in the compilation cache;
  timed on the full run, kills at random fractions of it would mostly land after a re-run ended)."""
  workdir = tmp_path_factory.mktemp("reference")
  t0 = time.perf_counter()
  proc = run(workdir)
  compiled = sum(float(s) for s in re.findall(r"compiled the train step for \S+ in ([\d.]+)s", proc.stderr))
  assert compiled > 0, proc.stderr[-3000:]
  return run_state(workdir, saved_item), time.perf_counter() - t0 - compiled, workdir


# ----------------------------------------------------------------------------------------- tests


def test_kill_at_every_save_point_finishes_exactly(tmp_path, reference, saved_item):
  """The seam kills the run at each kind of save point in turn, each re-run going further, through the
  main run, the soup variant and the soup; at the end every item has the uninterrupted run's bits, and
  every step (the replayed ones included) trained on the same batch.

  With `config.data_workers=2` (every run here): the first kill, after step 5 of the 5-step PFT stage
  with a prefetched batch and read-ahead decodes in flight, leaves checkpoint 3 (mid-stage, its
  data-iterator state saved by the 2-worker iterator); the re-run replays steps 4 and 5 from it. The
  batch checksum of every step, the final parameters, optimizer state and data-iterator state then
  equal the uninterrupted 2-worker run's: the exact resume with workers (it was
  tests/test_pipeline_workers.py's kill -9 test, which killed at step 4 of the same stage).

  Regression (issue 16.1): the export of a stage committed without its checkpoint used to make every
  re-run fail with "Checkpoint for step 5 already exists"; the checkpoint committed without the export
  used to finish without ever writing stages/pft."""
  w = tmp_path / "w"
  # PFT's end: its export committed, the checkpoint half written. The re-run replays steps 4 and 5 from
  # checkpoint 3 (committed: a save waits for the one before).
  run(w, kill_at="kill_save@5", expect_kill=True)
  assert (w / "stages" / "pft" / "5").exists()
  ck = ckpt_lib.Checkpointer(w / "checkpoints", read_only=True)
  latest, meta = ck.latest_step(), ck.read_meta(3)
  ck.close()
  assert latest == 3 and meta["stage_name"] == "pft" and meta["stage_step"] == 3  # mid-stage
  assert meta["data_state"]["num_workers"] == 2 and meta["data_state"]["step"] == 3
  # The other order (a workdir of an older version): the stage-end checkpoint committed, its export not.
  run(w, kill_at="kill_checkpoint@5", expect_kill=True)
  assert ckpt_lib.Checkpointer(w / "checkpoints", read_only=True).latest_step() == 5
  shutil.rmtree(w / "stages" / "pft")
  # The main run finishes on this re-run (writing PFT's export from checkpoint 5 first); the variant (its
  # own steps 1..7) is next; its last stage's end (what kill_export@12 would be for the main run) is the
  # soup's start.
  run(w, kill_at="kill_export@7", expect_kill=True)
  assert not (w / "soup" / "soup.json").exists()
  # A soup checkpoint committed without its soup.json (a kill between the two) is made again: one is
  # planted (the main run's FT export, so a soup left as found would differ in every bit).
  shutil.copytree(reference[2] / "stages" / "ft" / "12", w / "soup" / "0")
  # The last re-run: the main run is finished (nothing replays), the variant resumes, the soup is made.
  run(w)
  assert (w / "soup" / "soup.json").exists()
  assert_bitwise_equal(run_state(w, saved_item), reference[0])
  # The same batches, step by step (`read_metrics` keeps a replayed step's row from the re-run).
  assert batch_crcs(w) == batch_crcs(reference[2]) and sorted(batch_crcs(w)) == list(range(1, 13))
  assert batch_crcs(w / "variants" / "alt") == batch_crcs(reference[2] / "variants" / "alt")


def test_kill_9_at_random_instants_finishes_exactly(tmp_path, reference, saved_item):
  """kill -9 from outside at random instants, then a re-run to the end. EMBED2_KILL_TRIALS=N trials
  (default 1), EMBED2_KILLS_PER_TRIAL=K kills in each (default 1)."""
  want, duration, _ = reference
  rng = np.random.default_rng(16)
  trials = int(os.environ.get("EMBED2_KILL_TRIALS", "1"))
  moments = []
  for trial in range(trials):
    w = tmp_path / f"trial{trial}"
    for _ in range(int(os.environ.get("EMBED2_KILLS_PER_TRIAL", "1"))):
      delay = float(rng.uniform(0.15, 0.95)) * duration
      proc = subprocess.Popen(command(w), cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
      try:
        proc.wait(timeout=delay)
      except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
      _, err = proc.communicate(timeout=600)
      assert proc.returncode in (0, -signal.SIGKILL), (proc.returncode, err[-3000:])
      moments.append((round(delay, 1), "killed" if proc.returncode else "had finished"))
    run(w)
    assert_bitwise_equal(run_state(w, saved_item), want)
  print(f"kills (s after the start, outcome): {moments}; a run takes about {duration:.1f} s once compiled")


def test_faults_spec_is_checked():
  assert faults.parse("kill_export@5, nan@7,sigterm@0") == {("kill_export", 5), ("nan", 7), ("sigterm", 0)}
  for bad in ("kill_export", "kill_exprot@5", "kill_export@x", "nan@-1", "export@5"):
    with pytest.raises(ValueError, match="FAULT@STEP"):
      faults.parse(bad)


def test_nan_fault_replaces_the_token_ids_of_a_copy(rng):
  host = {"query_tokens": rng.integers(3, 8192, (4, 16), dtype=np.int32),
          "positive_tokens": rng.integers(3, 8192, (4, 16), dtype=np.int32),
          "query_segment_ids": rng.integers(0, 3, (4, 16), dtype=np.int32), "num_tokens": np.int64(64)}
  kept = {k: np.copy(v) for k, v in host.items()}
  seam = faults.Faults("nan@2")
  assert seam.before_step(1, host) is host and faults.Faults().before_step(2, host) is host
  got = seam.before_step(2, host)
  for k, v in host.items():
    np.testing.assert_array_equal(v, kept[k])  # the batch the trainer logs is untouched
    assert got[k].dtype == v.dtype and got[k].shape == v.shape  # the compiled step is reused
    if k.endswith("_tokens"):
      assert np.all(got[k] == faults.OUT_OF_VOCABULARY)
    else:
      np.testing.assert_array_equal(got[k], v)
