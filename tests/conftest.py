"""Test set-up, before jax is imported anywhere (subprocesses inherit the environment):

- 8 simulated CPU devices;
- a persistent compilation cache, fresh for each test session: many tests compile the same small
  programs (the tiny config's train steps, in-process and in subprocesses), and compiling dominates
  their run time on a 2-core machine. The first compile of each program in a session is real.
"""
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="embed2_test_jax_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
