"""Real multi-controller runs on loopback: 2 processes x 2 CPU devices against 1 process x 4 devices,
and a run preempted mid-stage that resumes on another mesh and process count.

The runs of a mesh and process count are few and shared (the compiled programs too, through the session's
compilation cache, tests/conftest.py): 2 x 2 devices as data=2 x fsdp=2 (`two_process_run`, the
preempted run) and 1 x 4 as data=2 x tensor=2 in the same 4 pack groups (`one_process_run`, the
resumed run, the run from `init_from`), all with the same stages. (Process 1 of a 2-process run never
finds its programs there: JAX writes the cache from process 0 only, and on CPU the key differs by
process; it compiles in every 2-process run.)

The start-ups that must be refused (`refused_starts`) are launched in the background when the module
starts: they mostly wait (for --init_timeout, or for Gloo's 30 s deadline on a peer that never joins), so
they wait while the runs above compute."""

import concurrent.futures
import os
import socket
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
# Checkpoints only at stage ends and on preemption; PFT of 3 steps, so a preemption can fall inside it.
# One transformer block: the meshes split its matrices as they split any block's, and a run traces and
# compiles about a third less.
ARG = "pft_steps=3,ft_steps=3,every=100,layers=1"
STEPS = 6


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(workdir, devices, *flags, fault=""):
  env = dict(os.environ, XLA_FLAGS=f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  env.pop(faults.ENV, None)
  if fault:
    env[faults.ENV] = fault
  cmd = [sys.executable, "-m", "embed2.main", f"--config={REPO}/configs/tiny.py:{ARG}",
         f"--workdir={workdir}", *flags]
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(procs, timeout=600):
  outs = []
  for p in procs:
    out, err = p.communicate(timeout=timeout)
    outs.append((p.returncode, err))
  return outs


def losses(workdir):
  return [(r["step"], r["task"], r["loss"]) for r in read_metrics(workdir) if "loss" in r]


def batch_crcs(workdir):
  """{step: crc32 of process 0's query tokens} (process 0's pack groups: comparable between runs
  with the same process count only)."""
  return {r["step"]: r["data/batch_crc"] for r in read_metrics(workdir) if "data/batch_crc" in r}


def two_processes(workdir, devices, *flags, fault=""):
  port = free_port()
  procs = [start(workdir, devices, f"--coordinator=127.0.0.1:{port}", "--num_processes=2",
                 f"--process_id={i}", *flags, fault=fault) for i in range(2)]
  outs = finish(procs)
  for code, err in outs:
    assert code == 0, err[-3000:]
  return outs


# The 2-process runs' mesh; the 1-process runs' (1 process x 4 devices, the 2-process runs' 4 pack groups).
TWO_PROCESS_MESH = ("--config.mesh.data=2", "--config.mesh.fsdp=2")
ONE_PROCESS_MESH = ("--config.mesh.data=2", "--config.mesh.tensor=2", "--config.data_groups=4")


def _timed(procs, timeout):
  """[(returncode, stderr)] of `procs` once all finished, and the seconds until then."""
  t0 = time.time()
  outs = finish(procs, timeout=timeout)
  return outs, time.time() - t0


def _mismatched_counts(workdir):
  port = free_port()
  p0 = start(workdir, 2, f"--coordinator=127.0.0.1:{port}", "--num_processes=2", "--process_id=0",
             "--init_timeout=60")
  time.sleep(2)
  p1 = start(workdir, 2, f"--coordinator=127.0.0.1:{port}", "--num_processes=3", "--process_id=1",
             "--init_timeout=60")
  return finish([p0, p1], timeout=300)


@pytest.fixture(scope="module", autouse=True)
def refused_starts(request, tmp_path_factory):
  """{test name: Future of its start-ups' results}, for the selected tests of this module that start
  processes which must fail; all launched when the module starts (see the module docstring)."""
  root = tmp_path_factory.mktemp("refused")
  launches = {
      "test_unreachable_coordinator_fails_fast": lambda: (_timed, [start(
          root, 2, f"--coordinator=127.0.0.1:{free_port()}", "--num_processes=2", "--process_id=1",
          "--init_timeout=2")], 300),
      "test_bad_process_arguments_are_refused": lambda: (finish, [
          start(root, 2, "--coordinator=127.0.0.1:1", "--num_processes=2", "--process_id=2"),
          start(root, 2, "--num_processes=2")], 300),
      "test_mismatched_process_counts_are_refused": lambda: (_mismatched_counts, root / "mismatched"),
  }
  selected = {item.name for item in request.session.items if item.module is request.module}
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(launches))
  yield {name: pool.submit(*launch()) for name, launch in launches.items() if name in selected}
  pool.shutdown(wait=True)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("mp")
  two_processes(workdir, 2, *TWO_PROCESS_MESH)
  return workdir


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("sp")
  (code, err), = finish([start(workdir, 4, *ONE_PROCESS_MESH)])
  assert code == 0, err[-3000:]
  return workdir


def test_two_processes_equal_one_process(two_process_run, one_process_run):
  # Equal to float tolerance: fsdp and tensor split the reductions of the passes differently (see the
  # next test).
  a, b = losses(two_process_run), losses(one_process_run)
  assert len(a) == len(b) == STEPS
  for (sa, ta, la), (sb, tb, lb) in zip(a, b):
    assert (sa, ta) == (sb, tb)
    assert abs(la - lb) / abs(lb) < 1e-5, (sa, la, lb)


def test_preempted_mid_stage_resumes_on_another_mesh_and_process_count(two_process_run, one_process_run,
                                                                       tmp_path, saved_item):
  """Preempted (SIGTERM) inside PFT on 2 processes x 2 devices, mesh data=2 x fsdp=2; resumed on
  1 process x 4 devices, mesh data=2 x tensor=2. The resumed run continues PFT with the restored
  optimizer state (Adam moments, step count) and data state, crosses into FT and finishes: every
  step's loss and batch and the final parameters and optimizer state equal the uninterrupted run's.

  Equal to float tolerance, not bitwise: the meshes differ (fsdp / tensor split the reductions of
  the forward and backward passes differently), so float32 sums are rounded in another order.
  Measured (one block, ARG): losses within 1.7e-7 relative, parameters and optimizer state within
  1.4e-6 of each leaf's largest value. A resume that drops the optimizer state (tried in a scratch
  copy) gives losses 17-21% off from step 4 and final parameters 1.3e-2 of the leaf scale off (median
  over the leaves; up to 0.5); one that drops the data state gives step 3 another batch (its CRC
  differs, its loss is 32% off).
  """
  workdir = tmp_path / "run"
  two_processes(workdir, 2, *TWO_PROCESS_MESH, fault="sigterm@1")  # asked to stop before step 2: saves at 2
  ck = ckpt_lib.Checkpointer(workdir / "checkpoints", read_only=True)
  assert ck.latest_step() == 2
  meta = ck.read_meta(2)
  ck.close()
  assert (meta["stage_name"], meta["stage_step"], meta["process_count"]) == ("pft", 2, 2)
  assert not (workdir / "stages" / "pft").exists()  # mid-stage: PFT has not ended

  (code, err), = finish([start(workdir, 4, *ONE_PROCESS_MESH)])
  assert code == 0, err[-3000:]
  assert "resuming from step 2 (stage 0, step 2 of it)" in err

  # Per-step losses: steps 1-2 from the 2-process run, 3 (PFT's last) to 6 from the resumed one.
  got, want = losses(workdir), losses(two_process_run)
  assert [(s, t) for s, t, _ in got] == [(s, t) for s, t, _ in want]
  assert len(got) == STEPS
  for (step, _, lg), (_, _, lw) in zip(got, want):
    assert abs(lg - lw) / abs(lw) < 1e-5, (step, lg, lw)
  # The same batches: process 0's share in the 2-process part, the whole batch after the resume.
  crcs = batch_crcs(workdir)
  assert {s: crcs[s] for s in (1, 2)} == {s: batch_crcs(two_process_run)[s] for s in (1, 2)}
  assert {s: crcs[s] for s in range(3, STEPS + 1)} == {
      s: batch_crcs(one_process_run)[s] for s in range(3, STEPS + 1)}

  # Final parameters and FT optimizer state, and PFT's export (written by the resumed run).
  for where, step, items in (("checkpoints", STEPS, ("params", "train")),
                             ("stages/pft", 3, ("params",))):
    for item in items:
      got_tree = saved_item(workdir / where / str(step) / item)
      want_tree = saved_item(two_process_run / where / str(step) / item)
      assert jax.tree.structure(got_tree) == jax.tree.structure(want_tree)
      for (path, g), w in zip(jax.tree.flatten_with_path(got_tree)[0],
                              jax.tree.leaves(want_tree)):
        # Relative to the leaf's scale: Adam's second moments are all far below any fixed atol.
        scale = float(np.max(np.abs(w))) if np.size(w) else 0.0
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * scale,
                                   err_msg=f"{where}/{step}/{item}{jax.tree_util.keystr(path)}")


def test_init_from_a_two_process_run_on_another_mesh(two_process_run, tmp_path):
  # A finished run cannot get more steps (its stages are part of its identity): continue it in ONE
  # process with a (data=2, tensor=2) mesh through init_from.
  (code, err), = finish([start(tmp_path / "next", 4, *ONE_PROCESS_MESH, f"--config.init_from={two_process_run}")])
  assert code == 0, err[-3000:]
  assert "initialised from" in err
  assert ckpt_lib.Checkpointer(tmp_path / "next" / "checkpoints", read_only=True).latest_step() == STEPS


def test_unreachable_coordinator_fails_fast(refused_starts):
  [(code, err)], seconds = refused_starts["test_unreachable_coordinator_fails_fast"].result()
  assert code != 0
  assert "could not join the coordinator" in err
  assert seconds < 120


def test_bad_process_arguments_are_refused(refused_starts):
  (code, err), (code2, err2) = refused_starts["test_bad_process_arguments_are_refused"].result()
  assert code != 0 and "--process_id=2 must be in [0, --num_processes=2)" in err
  assert code2 != 0 and "needs all of --coordinator, --num_processes and --process_id" in err2


def test_mismatched_process_counts_are_refused(refused_starts):
  (c0, e0), (c1, e1) = refused_starts["test_mismatched_process_counts_are_refused"].result()
  assert c1 != 0 and "started with --num_processes=3 but the job has 2 processes" in e1
  assert c0 != 0 and "could not exchange their process counts" in e0
