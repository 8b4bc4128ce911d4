"""Multi-controller start-up and the few host-level collectives the training loop needs.

One process per host (JAX's multi-controller runtime). Start-up is:
  * explicit, for several processes on one machine or a hand-made cluster:
      initialize(coordinator="127.0.0.1:PORT", num_processes=N, process_id=i)
  * automatic on TPU pods and under SLURM (jax.distributed.initialize() finds the cluster), when
    `auto=True` and the environment shows one;
  * nothing at all for a single process.
A process that cannot reach the coordinator fails within `timeout_s` with a clear message, not a hang.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


class StartupError(RuntimeError):
  """The distributed runtime could not start (unreachable coordinator, mismatched process counts)."""


def _cluster_env() -> str | None:
  if os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return "slurm"
  if os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("CLOUD_TPU_TASK_ID") or os.environ.get(
      "MEGASCALE_COORDINATOR_ADDRESS"):
    return "tpu"
  return None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = True, timeout_s: int = 120) -> None:
  """Starts the distributed runtime if this is a multi-process job (see the module docstring)."""
  explicit = [coordinator, num_processes, process_id]
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ValueError("multi-process start needs all of --coordinator, --num_processes and --process_id "
                       f"(got coordinator={coordinator!r}, num_processes={num_processes}, "
                       f"process_id={process_id})")
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} must be in [0, --num_processes={num_processes})")
    if num_processes == 1:
      return
    logging.info("jax.distributed: process %d of %d, coordinator %s; waiting up to %ds for the others",
                 process_id, num_processes, coordinator, timeout_s)
    if process_id != 0:
      # JAX's client aborts the whole process on a connection deadline; probe first so that the
      # failure is a clear error instead.
      _wait_for_coordinator(coordinator, process_id, num_processes, timeout_s)
    try:
      jax.distributed.initialize(coordinator, num_processes, process_id,
                                 initialization_timeout=int(timeout_s))
    except Exception as e:  # the runtime raises several types; all mean the same to the user
      raise StartupError(
          f"process {process_id} of {num_processes} could not join the coordinator at {coordinator} "
          f"within {timeout_s}s ({type(e).__name__}: {str(e)[:300]}). Check that process 0 is running "
          "with the same --coordinator and --num_processes, and that the port is reachable.") from None
    _check_process_count(num_processes)
    return
  if auto and _cluster_env():
    logging.info("jax.distributed: detected a %s cluster, initialising automatically", _cluster_env())
    jax.distributed.initialize(initialization_timeout=int(timeout_s))


def _wait_for_coordinator(coordinator: str, process_id: int, num_processes: int, timeout_s: int) -> None:
  host, _, port = coordinator.rpartition(":")
  if not host or not port.isdigit():
    raise StartupError(f"--coordinator={coordinator!r} must look like HOST:PORT (e.g. 127.0.0.1:12355)")
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=2):
        return
    except OSError as e:
      if time.monotonic() > deadline:
        raise StartupError(
            f"process {process_id} of {num_processes} could not join the coordinator at {coordinator} "
            f"within {timeout_s}s ({e}). Check that process 0 is running with the same --coordinator and "
            "--num_processes, and that the port is reachable.") from None
      time.sleep(0.5)


def _check_process_count(expected: int) -> None:
  if jax.process_count() != expected:
    raise StartupError(f"this process was started with --num_processes={expected} but the job has "
                       f"{jax.process_count()} processes; start every process with the same count")
  try:
    counts = allgather_json(expected)
  except Exception as e:  # a peer that refused its own start-up never joins the collective
    raise StartupError(f"the {expected} processes could not exchange their process counts "
                       f"({type(e).__name__}: {str(e)[:200]}); another process probably stopped at "
                       "start-up (see its log), e.g. because it was given a different --num_processes") from None
  if len(set(counts)) != 1:
    raise StartupError(f"processes disagree on --num_processes: {counts}; start every process with the "
                       "same count")


def allgather_json(obj: Any) -> list[Any]:
  """Every process's JSON-serialisable `obj`, in process order (a host-level all-gather)."""
  if jax.process_count() == 1:
    return [obj]
  data = np.frombuffer(json.dumps(obj, sort_keys=True).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.asarray([data.size], np.int32))
  padded = np.zeros(int(np.max(lengths)), np.uint8)
  padded[:data.size] = data
  gathered = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(row[:int(n)]).decode()) for row, n in zip(gathered, np.ravel(lengths))]


def any_process(flag: bool) -> bool:
  """True on every process if `flag` is True on any (e.g. one host received SIGTERM)."""
  if jax.process_count() == 1:
    return bool(flag)
  return any(allgather_json(bool(flag)))
