"""Prints the members of a config's sweep, one per line: NAME<TAB>--config.KEY=VALUE<TAB>...

A config file may define `sweep(arg=None) -> list[dict]` beside `get_config`: each dict maps a config
path (as written after `--config.`, e.g. "seed" or "stages[1].optim.learning_rate") to a value.
`launch/run.sh sweep CONFIG WORKDIR` runs each member in WORKDIR/NAME.

  python -m embed2.sweep --config=configs/demo.py
"""

from __future__ import annotations

import importlib.util
import re
import sys
from typing import Sequence

from absl import flags

from embed2 import cli

# This program's own flags (embed2/cli.py says why): embed2.main's global --config is another flag.
FLAGS = flags.FlagValues()
flags.DEFINE_string("config", None, "Config file, optionally with :arg.", flag_values=FLAGS)
flags.mark_flag_as_required("config", flag_values=FLAGS)


def load_sweep(path: str) -> list[dict]:
  file, _, arg = path.partition(":")
  spec = importlib.util.spec_from_file_location("_sweep_config", file)
  if spec is None:
    raise ValueError(f"--config={path}: cannot load {file}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "sweep"):
    raise ValueError(f"{file} defines no sweep(); add `def sweep(arg=None) -> list[dict]` beside get_config")
  members = module.sweep(arg or None)
  if not members:
    raise ValueError(f"{file}: sweep() returned no members")
  return [dict(m) for m in members]


def member_name(overrides: dict) -> str:
  name = ",".join(f"{k}={v}" for k, v in sorted(overrides.items())) or "base"
  return re.sub(r"[^A-Za-z0-9_.,=-]+", "_", name)


def main(argv: Sequence[str]) -> list[dict]:
  """Prints the members of the command line's (`argv`, after the program name) sweep; returns them."""
  args = cli.parse(FLAGS, argv)
  members = load_sweep(args.config)
  for m in members:
    fields = [member_name(m)] + [f"--config.{k}={v}" for k, v in m.items()]
    sys.stdout.write("\t".join(fields) + "\n")
  return members


if __name__ == "__main__":
  cli.run(main, FLAGS)
