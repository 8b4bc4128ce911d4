"""embed2/cli.py: every program's flags are its own absl FlagValues, parsed by main(argv) in process
or under app.run from the command line."""

import importlib
import os
import subprocess
import sys

import pytest
from absl import app, flags

from embed2 import cli, sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def program_flags():
  fv = flags.FlagValues()
  flags.DEFINE_string("out", None, "where", flag_values=fv)
  flags.DEFINE_integer("steps", 5, "how many", flag_values=fv)
  flags.DEFINE_bool("no_train", False, "skip training", flag_values=fv)
  flags.DEFINE_enum("kind", "a", ("a", "b"), "which", flag_values=fv)
  flags.mark_flag_as_required("out", flag_values=fv)
  return fv


def test_parse_values_defaults_and_a_second_call(program_flags):
  args = cli.parse(program_flags, ["--out=x", "--steps", "7", "--no_train", "--kind=b"])
  assert vars(args) == {"out": "x", "steps": 7, "no_train": True, "kind": "b"}
  # A second parse starts from the defaults, not from the first call's values.
  assert vars(cli.parse(program_flags, ["--out=y"])) == {"out": "y", "steps": 5, "no_train": False,
                                                         "kind": "a"}
  assert cli.parse(program_flags, ["--out=y", "--nono_train"]).no_train is False


@pytest.mark.parametrize("argv, match", [
    (["--steps=3"], "--out must have a value"),
    (["--out=x", "--bogus=1"], "Unknown command line flag 'bogus'"),
    (["--out=x", "--steps=many"], "steps"),
    (["--out=x", "--kind=c"], "kind"),
    (["--out=x", "stray"], r"unexpected arguments \['stray'\]"),
])
def test_parse_refuses_naming_the_flag(program_flags, argv, match):
  with pytest.raises(app.UsageError, match=match):
    cli.parse(program_flags, argv)


def test_positional_arguments(program_flags):
  args = cli.parse(program_flags, ["A", "--out=x", "B"], positional="checkpoints")
  assert args.checkpoints == ["A", "B"] and args.out == "x"
  with pytest.raises(app.UsageError, match="at least one checkpoints"):
    cli.parse(program_flags, ["--out=x"], positional="checkpoints")


@pytest.mark.parametrize("program", [
    "embed2.main", "embed2.sweep", "embed2.export", "embed2.evaluate", "embed2.soup",
    "embed2.mteb_adapter", "embed2.data.train_tokenizer", "embed2.bench.packing", "embed2.bench.attention",
    "embed2.bench.vs_peers", "data_pipelines.stdlib_tasks"])
def test_programs_import_together(program):
  """Every program's flags are its own: importing them into one process defines no flag twice
  (embed2.main and embed2.sweep both have a --config; export, evaluate and mteb_adapter a
  --checkpoint). A second definition would raise absl's DuplicateFlagError here."""
  importlib.import_module(program)


def test_sweep_main_prints_members(capsys):
  members = sweep.main([f"--config={REPO}/configs/demo.py"])
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == len(members) == 6
  assert lines[0].split("\t")[1:] == [f"--config.{k}={v}" for k, v in members[0].items()]


def test_command_line_help_and_usage_error():
  """Under app.run: --help prints the docstring and the program's flags (exit 0); a bad flag prints
  the usage and the message (exit 1)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  run = lambda *a: subprocess.run([sys.executable, "-m", "embed2.sweep", *a], cwd=REPO, env=env,
                                  capture_output=True, text=True, timeout=300)
  helped = run("--help")
  assert helped.returncode == 0 and "Prints the members of a config's sweep" in helped.stdout
  assert "--config: Config file" in helped.stdout
  bad = run("--config=configs/demo.py", "--seeds=3")
  assert bad.returncode == 1 and "Unknown command line flag 'seeds'" in bad.stderr


def test_a_bad_path_is_an_error_line_not_a_traceback(tmp_path):
  """Regression: evaluate / export given a checkpoint that does not exist died with a traceback; the
  programs now say `error: ...` (naming the path) and exit 1, as the main job does."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  missing = tmp_path / "no_such_run"
  out = subprocess.run([sys.executable, "-m", "embed2.export", f"--checkpoint={missing}",
                        f"--input={tmp_path / 'in.jsonl'}", f"--output={tmp_path / 'out'}"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1, out.stderr
  assert f"error: checkpoint path {missing} does not exist" in out.stderr
  assert "Traceback" not in out.stderr


def test_mesh_flag():
  fv = flags.FlagValues()
  cli.DEFINE_mesh("mesh", "fsdp=-1", "mesh axis sizes", flag_values=fv)
  assert cli.parse(fv, []).mesh == {"fsdp": -1}
  assert cli.parse(fv, ["--mesh=data=2, fsdp=-1"]).mesh == {"data": 2, "fsdp": -1}
  for bad in ("data", "data=two", "data=2;fsdp=1"):
    with pytest.raises(app.UsageError, match=f"flag --mesh={bad}: expected axis=size pairs"):
      cli.parse(fv, [f"--mesh={bad}"])
