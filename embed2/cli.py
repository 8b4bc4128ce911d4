"""The command line of embed2's programs: absl flags, one `flags.FlagValues` per program.

A program (`python -m embed2.export`, `embed2.evaluate`, `embed2.soup`, `embed2.bench.*`, ...) defines
its flags at module level on its own FlagValues, parses them in `main(argv)`, and hands `main` to
`cli.run`, which is absl's `app.run`:

  FLAGS = flags.FlagValues()
  flags.DEFINE_string("out", "", "JSON file to write", flag_values=FLAGS)

  def main(argv: Sequence[str]) -> dict:
    args = cli.parse(FLAGS, argv)  # argv: the command line after the program name
    ... args.out ...

  if __name__ == "__main__":
    cli.run(main, FLAGS)

Why not absl's global `flags.FLAGS` (which `embed2.main` uses, its flags being defined nowhere else):
the programs are imported together (the test suite, a notebook), and the global registry refuses one
name (`--checkpoint`, `--out`, `--batch_size`) defined by two modules. Tests call `main(argv)` in
process, through the same parsing as the command line. Flags are absl's: `--name=value` or
`--name value`, booleans `--name` / `--noname` / `--name=false`, `--flagfile=FILE`.
"""

from __future__ import annotations

import sys
import types
from typing import Any, Callable, Sequence

from absl import app, flags, logging

_HELP = ("-h", "--help", "--helpshort", "--helpfull")

Args = types.SimpleNamespace  # what `parse` returns: one attribute per flag (and the positional list)


def parse(flag_values: flags.FlagValues, argv: Sequence[str], *, positional: str = "") -> Args:
  """Parses `argv`, the command line after the program name, into a program's flags.

  Args:
    flag_values: the program's FlagValues (its module-level FLAGS).
    argv: flags and, where the program takes them, positional arguments, in any order.
    positional: the attribute the positional arguments go under (a list of at least one); "" refuses
      positional arguments.

  Returns:
    one attribute per flag, its value (the default where `argv` does not give it, also on a second
    call), and `positional`'s list when asked for.

  Raises:
    app.UsageError: an unknown flag, a bad value, a required flag missing, a positional argument too
      many or too few; the message names it.
  """
  if flag_values.is_parsed():
    flag_values.unparse_flags()  # a second call starts from the defaults, not the last call's values
  try:
    rest = flag_values(["program", *argv])[1:]
  except flags.Error as e:
    raise app.UsageError(f"{e} (--help lists the flags)") from None
  values = flag_values.flag_values_dict()
  if positional:
    if not rest:
      raise app.UsageError(f"give at least one {positional} argument after the flags")
    values[positional] = rest
  elif rest:
    raise app.UsageError(f"unexpected arguments {rest}: this program takes flags only "
                         "(--name=value)")
  return Args(**values)


class _MeshParser(flags.ArgumentParser):
  """`data=2,fsdp=-1` -> {"data": 2, "fsdp": -1}: mesh axis sizes for `sharding.make_mesh`."""

  syntactic_help = "axis=size pairs, e.g. data=2,fsdp=-1"

  def parse(self, argument: str | dict[str, int]) -> dict[str, int]:
    if isinstance(argument, dict):
      return argument
    axes = {}
    for item in filter(None, argument.split(",")):
      axis, eq, size = item.partition("=")
      if not eq or not size.strip().lstrip("-").isdigit():
        raise ValueError(f"expected {self.syntactic_help}")
      axes[axis.strip()] = int(size)
    return axes

  def flag_type(self) -> str:
    return "mesh"


class _MeshSerializer(flags.ArgumentSerializer):

  def serialize(self, value: dict[str, int]) -> str:
    return ",".join(f"{axis}={size}" for axis, size in value.items())


def DEFINE_mesh(name: str, default: str, help: str, *, flag_values: flags.FlagValues):  # pylint: disable=invalid-name
  """A flag of mesh axis sizes (`--mesh=data=2,fsdp=-1`); its value is the dict `sharding.make_mesh`
  takes. A malformed value is refused when parsed, naming the flag."""
  return flags.DEFINE(_MeshParser(), name, default, help, flag_values=flag_values,
                      serializer=_MeshSerializer())


def run(main: Callable[[list[str]], Any], flag_values: flags.FlagValues) -> None:
  """`if __name__ == "__main__": cli.run(main, FLAGS)`: absl's app.run around `main(sys.argv[1:])`.

  app.run sets up absl logging (here at WARNING) and prints the usage (the module docstring) with the
  message of an app.UsageError, exiting 1. `--help` prints the docstring and the program's flags and
  exits 0. What `main` returns (a JSON document, for callers in process) is not the exit status.
  Errors of the input (ValueError, FileNotFoundError: each names the file or field and the fix) print
  `error: ...` and exit 1, as `embed2.main` does, not a traceback.
  """

  def parse_argv(argv: list[str]) -> list[str]:
    args = argv[1:argv.index("--")] if "--" in argv else argv[1:]
    if any(a in _HELP for a in args):
      doc = sys.modules["__main__"].__doc__ or ""
      flag_help = flag_values.get_help(prefix="  ", include_special_flags=False).strip("\n")
      sys.stdout.write(f"{doc.rstrip()}\n\nflags:\n{flag_help}\n")
      sys.exit(0)
    flags.FLAGS(argv[:1])  # absl's own flags (logging) at their defaults: app.run needs them parsed
    return argv[1:]

  def run_main(argv: list[str]) -> None:
    # app.run turns absl's INFO on; these programs log warnings only, as they did before app.run ran
    # them (libraries such as orbax log every checkpoint read at INFO).
    logging.set_verbosity(logging.WARNING)
    try:
      main(argv)
    except (ValueError, FileNotFoundError) as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(1)

  app.run(run_main, flags_parser=parse_argv)
