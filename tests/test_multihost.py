"""Real multi-controller runs on loopback: 2 processes x 2 CPU devices against 1 process x 4 devices."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from embed2.train import checkpoint as ckpt_lib
from embed2.train.metrics_writer import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARG = "pft_steps=2,ft_steps=3,every=100"


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(workdir, devices, *flags, arg=ARG):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  cmd = [sys.executable, "-m", "embed2.main", f"--config={REPO}/configs/tiny.py:{arg}",
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


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("mp")
  port = free_port()
  procs = [start(workdir, 2, f"--coordinator=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}")
           for i in range(2)]
  for code, err in finish(procs):
    assert code == 0, err[-3000:]
  return workdir


def test_two_processes_equal_one_process(two_process_run, tmp_path):
  (code, err), = finish([start(tmp_path, 4)])
  assert code == 0, err[-3000:]
  a, b = losses(two_process_run), losses(tmp_path)
  assert len(a) == len(b) == 5
  for (sa, ta, la), (sb, tb, lb) in zip(a, b):
    assert (sa, ta) == (sb, tb)
    assert abs(la - lb) / abs(lb) < 1e-5, (sa, la, lb)


def test_two_process_checkpoint_resumes_on_another_mesh(two_process_run, tmp_path):
  # Continue the 2-process run's workdir (a copy) in ONE process with a (data=2, tensor=2) mesh.
  import shutil
  workdir = tmp_path / "resumed"
  shutil.copytree(two_process_run, workdir)
  (code, err), = finish([start(workdir, 4, "--config.mesh.data=2", "--config.mesh.tensor=2",
                               arg="pft_steps=2,ft_steps=3,every=100")])
  assert code == 0, err[-3000:]
  assert "resuming from step 5" in err
  # Extend the run: one more FT step is refused (incompatible stages), so continue via init_from.
  (code, err), = finish([start(tmp_path / "next", 4, "--config.mesh.data=2", "--config.mesh.tensor=2",
                               f"--config.init_from={workdir}", arg="pft_steps=1,ft_steps=2,every=100")])
  assert code == 0, err[-3000:]
  assert "initialised from" in err
  assert ckpt_lib.Checkpointer(tmp_path / "next" / "checkpoints", read_only=True).latest_step() == 3


def test_unreachable_coordinator_fails_fast(tmp_path):
  t0 = time.time()
  (code, err), = finish([start(tmp_path, 2, f"--coordinator=127.0.0.1:{free_port()}", "--num_processes=2",
                               "--process_id=1", "--init_timeout=5")], timeout=300)
  assert code != 0
  assert "could not join the coordinator" in err
  assert time.time() - t0 < 120


def test_bad_process_arguments_are_refused(tmp_path):
  (code, err), = finish([start(tmp_path, 2, "--coordinator=127.0.0.1:1", "--num_processes=2",
                               "--process_id=2")], timeout=120)
  assert code != 0 and "--process_id=2 must be in [0, --num_processes=2)" in err
  (code, err), = finish([start(tmp_path, 2, "--num_processes=2")], timeout=120)
  assert code != 0 and "needs all of --coordinator, --num_processes and --process_id" in err


def test_mismatched_process_counts_are_refused(tmp_path):
  port = free_port()
  p0 = start(tmp_path, 2, f"--coordinator=127.0.0.1:{port}", "--num_processes=2", "--process_id=0",
             "--init_timeout=20")
  time.sleep(2)
  p1 = start(tmp_path, 2, f"--coordinator=127.0.0.1:{port}", "--num_processes=3", "--process_id=1",
             "--init_timeout=20")
  (c0, e0), (c1, e1) = finish([p0, p1], timeout=300)
  assert c1 != 0 and "started with --num_processes=3 but the job has 2 processes" in e1
  assert c0 != 0 and "could not exchange their process counts" in e0
