"""Where a compiled JAX program's time goes on XLA's CPU backend: per-op times from a profiler trace,
each op classed by the optimised HLO that XLA dumped for it.

    env = dump_env(DIR)                     # XLA_FLAGS for a process about to compile (set before jax starts)
    ops = trace_ops(fn, repeats, TRACE_DIR)  # {(module, op): microseconds per call of fn}
    hlo = read_hlo_dumps(DIR)                # {(module, op): OpInfo(matmul, phase)}
    breakdown(ops, hlo)                      # seconds per call by phase x {matmul, other}

The trace is jax.profiler's Perfetto export: XLA's CPU runtime emits one event per executed thunk (its
`hlo_module` and `hlo_op` in the event's args). The ops of one program run concurrently on the intra-op
threads, so their sum is CPU time spent in ops, not wall time; the breakdown gives both.

An op is a matmul when it is a `dot` / `convolution` or a fusion whose called computations hold one
(XLA:CPU hands dots to YNNPACK / XNNPACK / oneDNN as `*_fusion`s). Its phase comes from the op's
`metadata={op_name=...}`: `transpose(jvp(...))` is the backward pass, `jvp(...)` the forward pass of a
differentiated function, anything else in a train step `update`: the optimizer, the gradient norm and
non-finite guard, metrics, and also the inside of a function with its own VJP (e.g. the blockwise loss),
whose ops carry no `jvp` in their names; in a program with no `jvp` at all (inference), everything is
`forward`.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import os
import re
from typing import Callable

# A top-level HLO instruction of the optimised module: `%name = shape opcode(operands), ...`.
_INSTR = re.compile(r"^\s+(?:ROOT )?%?([\w.\-]+) = .*? ([a-z][\w\-]*)\(")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
MATMUL_OPCODES = ("dot", "convolution")


@dataclasses.dataclass(frozen=True)
class OpInfo:
  matmul: bool
  phase: str  # "forward" | "backward" | "update"


def dump_env(dump_dir: str) -> dict[str, str]:
  """Environment for a process whose compiled programs `read_hlo_dumps(dump_dir)` will read."""
  flags = os.environ.get("XLA_FLAGS", "")
  return {"XLA_FLAGS": f"{flags} --xla_dump_to={dump_dir} --xla_dump_hlo_as_text "
                       "--xla_dump_hlo_pass_re=^$".strip()}


def _phase(op_name: str, differentiated: bool) -> str:
  if "transpose(jvp" in op_name:
    return "backward"
  if "jvp(" in op_name or not differentiated:
    return "forward"
  return "update"


def parse_hlo(text: str) -> dict[str, OpInfo]:
  """Optimised HLO text of one module -> {instruction name: OpInfo}, for the entry computation's and
  every other computation's instructions (a thunk can be an instruction of a while / call body)."""
  bodies: dict[str, list[tuple[str, str, list[str], str]]] = {}
  current = None
  for line in text.splitlines():
    if current is None:
      m = _COMPUTATION.match(line)
      if m and "=" not in line.split("{")[0].split("(")[0]:
        current = m.group(1)
        bodies[current] = []
      continue
    if line.strip() == "}":
      current = None
      continue
    m = _INSTR.match(line)
    if m:
      name, opcode = m.groups()
      op_name = _OP_NAME.search(line)
      bodies[current].append((name, opcode, _CALLS.findall(line), op_name.group(1) if op_name else ""))
  memo: dict[str, bool] = {}

  def has_matmul(comp: str, seen=()) -> bool:
    if comp not in memo:
      memo[comp] = any(op in MATMUL_OPCODES or any(has_matmul(c, seen + (comp,)) for c in calls
                                                   if c in bodies and c not in seen)
                       for _, op, calls, _ in bodies.get(comp, ()))
    return memo[comp]

  differentiated = "jvp(" in text
  out = {}
  for comp, instrs in bodies.items():
    for name, opcode, calls, op_name in instrs:
      matmul = opcode in MATMUL_OPCODES or (opcode in ("fusion", "custom-call")
                                           and any(has_matmul(c) for c in calls if c in bodies))
      out[name] = OpInfo(matmul, _phase(op_name, differentiated))
  return out


def read_hlo_dumps(dump_dir: str) -> dict[tuple[str, str], OpInfo | None]:
  """{(module name, instruction): OpInfo} over the optimised modules XLA dumped in `dump_dir`.

  A trace event names its module by name only, and one jitted function compiled at several shapes gives
  several modules of that name whose instructions of one name need not be the same op: where they class
  differently, the entry is None (`breakdown` counts its time as unclassified)."""
  out: dict[tuple[str, str], OpInfo | None] = {}
  for path in sorted(glob.glob(os.path.join(dump_dir, "*after_optimizations.txt"))):
    with open(path) as f:
      text = f.read()
    m = re.search(r"^HloModule ([\w.\-]+)", text, re.M)
    if not m:
      continue
    for name, info in parse_hlo(text).items():
      key = (m.group(1), name)
      out[key] = info if out.get(key, info) == info else None
  return out


def trace_ops(fn: Callable[[], object], repeats: int, trace_dir: str
              ) -> dict[tuple[str, str], float]:
  """Runs `fn` (blocking) `repeats` times under jax.profiler: {(module, op): microseconds per call}."""
  import jax  # pylint: disable=g-import-not-at-top  # only the worker that profiles starts jax
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(repeats):
      fn()
  paths = glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"), recursive=True)
  if not paths:
    raise RuntimeError(f"jax.profiler wrote no Perfetto trace under {trace_dir}")
  with gzip.open(max(paths, key=os.path.getmtime)) as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  total: dict[tuple[str, str], float] = collections.Counter()
  for e in events:
    args = e.get("args") or {}
    if e.get("ph") == "X" and "hlo_op" in args:
      total[(args.get("hlo_module", ""), args["hlo_op"])] += float(e.get("dur", 0.0)) / repeats
  return dict(total)


def breakdown(ops: dict[tuple[str, str], float], hlo: dict[tuple[str, str], OpInfo | None],
              top: int = 8) -> dict[str, object]:
  """Seconds per call in ops, by phase and matmul / other, and the `top` slowest non-matmul ops; ops not
  in `hlo`, or classed differently by its modules of one name, are `unclassified_seconds`."""
  cells: dict[str, float] = collections.Counter()
  unknown = 0.0
  others = []
  for key, us in ops.items():
    info = hlo.get(key)
    if info is None:
      unknown += us
      continue
    cells[f"{info.phase}_{'matmul' if info.matmul else 'other'}"] += us / 1e6
    if not info.matmul:
      others.append((us, key[1]))
  total = sum(cells.values()) + unknown / 1e6
  out: dict[str, object] = {"op_seconds": total, "unclassified_seconds": unknown / 1e6}
  out.update({k: cells[k] for k in sorted(cells)})
  matmul = sum(v for k, v in cells.items() if k.endswith("_matmul"))
  out["matmul_share"] = matmul / total if total else 0.0
  out["slowest_other_ops"] = [[name, us / 1e6] for us, name in sorted(others, reverse=True)[:top]]
  return out
