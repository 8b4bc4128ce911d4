"""Attention at real row lengths: compiled memory and FLOPs of forward + backward per kernel, CPU speed.

    python -m embed2.bench.attention                                  # gemma3-1b heads, L = 1k ... 32k
    python -m embed2.bench.attention --lengths=1024,2048 --throughput_max_length=2048
    python -m embed2.bench.attention --toy --out=/tmp/attention.json  # seconds: what the test runs

One attention call of one layer, batch 1 (so every figure is per example per layer): q (1, L, H, hd),
k / v (1, L, K, hd) with the head shape of --preset (gemma3-1b: H = 4, K = 1, hd = 256, window 512),
one example filling the row (the densest mask: nothing to skip), forward and the gradient of all three
inputs (`jax.vjp`), through `embed2.model.attention.attend` exactly as the model calls it. Rows per
kernel (--impls; `splash` / `pallas_gpu` only where their backend is) x layer kind (global, sliding
window) x L. Columns:

  temp_mib       XLA's scratch memory of the compiled program (`memory_analysis().temp_size_in_bytes`;
                 arguments and outputs excluded). Compiled from abstract shapes: nothing executes, so
                 a 32k xla program costs compile time, not RAM.
  xla_gflop      `compiled.cost_analysis()["flops"]`: XLA's own count. It counts the body of a loop
                 ONCE, so for the blockwise kernel (two nested scans) it is the cost of one block
                 step plus the O(L) work, not the total.
  hlo_gflop      matmul FLOPs of the compiled HLO with every while body multiplied by its known trip
                 count and a conditional counted as its costliest branch (`hlo_dot_flops`): what
                 the program computes when no block is skipped. For loop-free programs it equals XLA's
                 matmul count.
  exact_gflop    the attention FLOPs of the mask itself: 4 H hd x allowed pairs forward, 2x that
                 backward (matmuls only); hlo / exact is the kernel's overhead (the padded band,
                 recomputation in the backward).
  ms, tflops     measured on this machine (median of --repeats), for L <= --throughput_max_length
                 and backends where the kernel runs; tflops = exact FLOPs / time.

Targets (issue 18): blockwise temp at L = 32k below 1 GiB per example per layer; a sliding-window
layer's FLOPs linear in L (the fit's exponent `sliding_flops_exponent` ~ 1). Writes JSON to --out.
"""

from __future__ import annotations

import re
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from embed2 import cli
from embed2.bench import common
from embed2.model import attention as attention_lib
from embed2.model import presets

FLAGS = common.program_flags("attention")  # --out, --toy, and this program's own:
flags.DEFINE_list("lengths", ["1024", "2048", "4096", "8192", "16384", "32768"], "row lengths L",
                  flag_values=FLAGS)
flags.DEFINE_list("impls", ["xla", "blockwise", "splash", "pallas_gpu"],
                  "kernels (those whose backend is absent are listed as skipped)", flag_values=FLAGS)
flags.DEFINE_enum("preset", "gemma3-1b", sorted(presets.PRESETS),
                  "heads, head dim, window and scale from this preset", flag_values=FLAGS)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "q / k / v dtype", flag_values=FLAGS)
flags.DEFINE_integer("block_q", attention_lib.BLOCK_Q, "blockwise query tile", flag_values=FLAGS)
flags.DEFINE_integer("block_k", attention_lib.BLOCK_K, "blockwise key tile", flag_values=FLAGS)
flags.DEFINE_integer("throughput_max_length", 8192, "time the kernels up to this L (0 = never)",
                     flag_values=FLAGS)
flags.DEFINE_integer("repeats", 3, "timed calls per (kernel, layer, L)", flag_values=FLAGS)

# Which backend each accelerator kernel needs (the others run everywhere).
_NEEDS = {"splash": "tpu", "pallas_gpu": "gpu"}


# ----------------------------------------------------------------------------------- HLO FLOPs

_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s+->\s+.*\{\s*$")
_DEF = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\w+)\[([\d,]*)\]")


def _dims(text: str) -> list[int]:
  return [int(d) for d in text.split(",") if d]


def hlo_dot_flops(hlo_text: str) -> float:
  """Matmul FLOPs (2 per multiply-add) of an optimized HLO module, loops expanded.

  Every `dot` counts 2 x output size x contracted size; a computation called from a `while` counts
  `known_trip_count` times (XLA annotates it for scans), a `conditional` counts its costliest
  branch, fusions and calls count once per call site.
  """
  shapes, dots, calls, comps, entry, current = {}, {}, {}, set(), None, None
  for line in hlo_text.splitlines():
    head = _COMP.match(line)
    if head:
      current = head.group(1)
      comps.add(current)
      dots[current], calls[current] = 0.0, []
      if line.startswith("ENTRY"):
        entry = current
      continue
    if current is None or "=" not in line:
      continue
    define = _DEF.match(line)  # array-valued instructions (tuple-valued ones need no shape)
    if define:
      shapes[define.group(1)] = _dims(define.group(3))
    op = re.search(r"\s([\w\-]+)\(", line.split("=", 1)[1])
    op, rest = (op.group(1), line[line.index(op.group(0)) + len(op.group(0)):]) if op else ("", "")
    if op == "dot" and define:
      lhs = re.match(r"\s*(?:\w+\[[\d,]*\]\S*\s+)?%?([\w.\-]+)", rest).group(1)
      contract = _dims(re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest).group(1))
      lhs_shape = shapes.get(lhs)
      if lhs_shape is not None:
        dots[current] += (2.0 * np.prod(shapes[define.group(1)])
                          * np.prod([lhs_shape[i] for i in contract]))
    elif op == "while":
      trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
      body = re.search(r"body=%?([\w.\-]+)", rest).group(1)
      calls[current].append(("times", int(trip.group(1)) if trip else 1, [body]))
    elif op == "conditional":
      branches = re.findall(r"%([\w.\-]+)", (re.search(r"branch_computations=\{([^}]*)\}", rest)
                                              or re.search(r"(true_computation=.*)", rest)).group(1))
      calls[current].append(("max", 1, branches))
    else:
      for callee in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", rest):
        calls[current].append(("times", 1, [callee]))

  memo: dict[str, float] = {}

  def total(comp: str) -> float:
    if comp not in memo:
      flops = dots.get(comp, 0.0)
      for kind, n, callees in calls.get(comp, []):
        costs = [total(c) for c in callees if c in comps]
        if costs:
          flops += n * (max(costs) if kind == "max" else sum(costs))
      memo[comp] = flops
    return memo[comp]

  return total(entry) if entry else 0.0


# ----------------------------------------------------------------------------------------- runs


def exact_flops(h: int, hd: int, l: int, window: int | None) -> float:
  """Matmul FLOPs of exact attention over one example of l tokens, forward + backward.

  Forward QK^T and PV: 2 x 2 x hd per allowed pair and head; backward dV, dP, dQ, dK: twice that.
  Allowed pairs: l^2, or |i - j| < window.
  """
  pairs = float(l) * l
  if window is not None and window < l:
    far = l - window
    pairs -= far * (far + 1)
  return 3 * 4.0 * h * hd * pairs


def _inputs(cfg, l: int, dtype, *, abstract: bool, seed: int = 0):
  h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
  shapes = [(1, l, h, hd), (1, l, kv, hd), (1, l, kv, hd), (1, l, h, hd)]
  if abstract:
    arrays = [jax.ShapeDtypeStruct(s, dtype) for s in shapes]
    ids = [jax.ShapeDtypeStruct((1, l), jnp.int32)] * 2
    return arrays, ids
  keys = jax.random.split(jax.random.key(seed), len(shapes))
  arrays = [jax.random.normal(k, s, dtype) for k, s in zip(keys, shapes)]
  return arrays, [jnp.ones((1, l), jnp.int32), jnp.arange(l, dtype=jnp.int32)[None]]


def _program(cfg, impl: str, window: int | None, block_q: int, block_k: int):
  scale = float(cfg.query_pre_attn_scalar or cfg.resolved_head_dim) ** -0.5

  def fwd_bwd(q, k, v, dout, seg, pos):
    fn = lambda q, k, v: attention_lib.attend(q, k, v, seg, pos, causal=False, window=window,
                                              scale=scale, impl=impl, block_q=block_q,
                                              block_k=block_k)
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(dout))

  return jax.jit(fwd_bwd)


def measure(cfg, impl: str, layer: str, l: int, *, dtype, block_q: int, block_k: int,
            time_it: bool, repeats: int) -> dict[str, Any]:
  """One (kernel, layer kind, L) row: compile from abstract shapes, then optionally time it."""
  window = cfg.sliding_window if layer == "sliding" else None
  f = _program(cfg, impl, window, block_q, block_k)
  arrays, ids = _inputs(cfg, l, dtype, abstract=True)
  t0 = time.perf_counter()
  compiled = f.lower(*arrays, *ids).compile()
  row = {"impl": impl, "layer": layer, "length": l, "compile_s": round(time.perf_counter() - t0, 2)}
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  row["temp_bytes"] = int(mem.temp_size_in_bytes) if mem is not None else None
  row["temp_mib"] = row["temp_bytes"] / 2 ** 20 if row["temp_bytes"] is not None else None
  row["xla_flops"] = float(cost.get("flops", 0.0)) if cost else None
  row["hlo_flops"] = hlo_dot_flops(compiled.as_text())
  row["exact_flops"] = exact_flops(cfg.num_heads, cfg.resolved_head_dim, l, window)
  for key in ("xla", "hlo", "exact"):
    row[f"{key}_gflop"] = row[f"{key}_flops"] / 1e9 if row[f"{key}_flops"] is not None else None
  row["hlo_over_exact"] = row["hlo_flops"] / row["exact_flops"]
  if time_it:
    concrete = _inputs(cfg, l, dtype, abstract=False)
    call = lambda: jax.block_until_ready(compiled(*concrete[0], *concrete[1]))
    seconds = common.interleaved({"call": call}, repeats=repeats)["call"]
    row["time_s"] = common.summary(seconds)
    row["ms"] = 1e3 * row["time_s"]["median_s"]
    row["tflops"] = row["exact_flops"] / row["time_s"]["median_s"] / 1e12
  return row


def _growth_exponent(rows, impl: str, layer: str, key: str) -> float | None:
  """Slope of log(key) vs log(L) over the rows of one (kernel, layer): 1 = linear, 2 = quadratic."""
  pts = [(r["length"], r[key]) for r in rows if r["impl"] == impl and r["layer"] == layer
         and r.get(key)]
  if len(pts) < 2:
    return None
  x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
  return float(np.polyfit(x, y, 1)[0])


def run(*, lengths: Sequence[int], impls: Sequence[str], preset: str = "gemma3-1b",
        dtype: str = "float32", block_q: int = attention_lib.BLOCK_Q,
        block_k: int = attention_lib.BLOCK_K, throughput_max_length: int = 8192, repeats: int = 3,
        model_overrides: dict[str, Any] | None = None, out: str = "bench_out/attention.json"
        ) -> dict[str, Any]:
  """Measures every (kernel, layer kind, L); prints the table, writes and returns the JSON."""
  cfg = presets.ModelConfig.from_name(preset, **(model_overrides or {}))
  backend = jax.default_backend()
  unknown = sorted(set(impls) - set(presets.ATTENTION_IMPLS))
  if unknown:
    raise ValueError(f"--impls has unknown kernels {unknown}; choose from {presets.ATTENTION_IMPLS}")
  runnable = [i for i in impls if _NEEDS.get(i, backend) == backend]
  skipped = {i: f"needs a {_NEEDS[i].upper()} (backend here: {backend})"
             for i in impls if i not in runnable}
  rows = []
  for layer in ("global", "sliding"):
    for impl in runnable:
      for l in lengths:
        time_it = l <= throughput_max_length
        row = measure(cfg, impl, layer, l, dtype=jnp.dtype(dtype), block_q=block_q,
                      block_k=block_k, time_it=time_it, repeats=repeats)
        rows.append(row)
        print(f"{impl:>10s} {layer:>7s} L={l:>6d}  temp {row['temp_mib']:10.1f} MiB  "
              f"hlo {row['hlo_gflop']:10.2f} GFLOP" + (f"  {row['ms']:9.1f} ms" if time_it else ""),
              flush=True)
  blockwise_32k = [r["temp_bytes"] for r in rows if r["impl"] == "blockwise" and r["length"] == 32768]
  result = {
      "benchmark": "attention", "host": common.host_info(),
      "config": {"preset": preset, "num_heads": cfg.num_heads, "num_kv_heads": cfg.num_kv_heads,
                 "head_dim": cfg.resolved_head_dim, "sliding_window": cfg.sliding_window,
                 "dtype": dtype, "block_q": block_q, "block_k": block_k, "batch": 1,
                 "lengths": list(lengths), "impls": list(impls),
                 "throughput_max_length": throughput_max_length, "repeats": repeats},
      "skipped": skipped, "rows": rows,
      "summary": {
          "sliding_flops_exponent": {i: _growth_exponent(rows, i, "sliding", "hlo_flops")
                                     for i in runnable},
          "global_temp_exponent": {i: _growth_exponent(rows, i, "global", "temp_bytes")
                                   for i in runnable},
          "blockwise_temp_32k_bytes": max(blockwise_32k) if blockwise_32k else None,
          "blockwise_temp_32k_below_1gib": (max(blockwise_32k) < 2 ** 30) if blockwise_32k else None,
      },
  }
  print(common.format_table(rows, [
      ("impl", "kernel"), ("layer", "layer"), ("length", "L"), ("temp_mib", "temp MiB", ".1f"),
      ("xla_gflop", "xla GFLOP", ".2f"), ("hlo_gflop", "hlo GFLOP", ".2f"),
      ("exact_gflop", "exact GFLOP", ".2f"), ("ms", "ms", ".1f"), ("tflops", "TFLOP/s", ".4f")]))
  for impl, why in skipped.items():
    print(f"{impl}: not measured, {why}")
  print("summary:", result["summary"])
  return common.write_json(out, result)


def main(argv: Sequence[str]) -> dict[str, Any]:
  """The command line after the program name -> the JSON document written to --out."""
  args = cli.parse(FLAGS, argv)
  kwargs = dict(lengths=[int(x) for x in args.lengths], impls=list(args.impls), preset=args.preset,
                dtype=args.dtype, block_q=args.block_q, block_k=args.block_k,
                throughput_max_length=args.throughput_max_length, repeats=args.repeats, out=args.out)
  if args.toy:
    kwargs.update(lengths=[64, 128], preset="tiny", block_q=16, block_k=16, throughput_max_length=64,
                  repeats=1)
  return run(**kwargs)


if __name__ == "__main__":
  cli.run(main, FLAGS)
