"""What the benchmark programs share: timing on a noisy machine, device facts, length mixes, output.

Timing: `interleaved` runs the contenders round-robin (A B C A B C ...), so a burst of load from
another process hits all of them alike, and the programs report medians (and the median of the
per-round ratios when two contenders are compared). Every timed callable must block until its
result is ready (`jax.block_until_ready`, `.numpy()`), or the clock measures dispatch only.

Peak FLOP/s (the denominator of MFU): a datasheet table for accelerators (dense, no sparsity), and
for a CPU the best achieved FLOP/s of one large jitted matmul in the compute dtype, labelled as
measured: a CPU has no datasheet figure that XLA can reach.

Output: each program prints a table (`format_table`) and writes one JSON file (`write_json`) whose
`host` entry (`host_info`) says where it ran: jax version, device kind, CPU count, and the
nvidia-smi device name on a GPU. `program_flags` starts each program's flags (--out, --toy) and
`run_and_write` is every program's `main` once they are parsed.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from absl import flags

# Dense (no structured sparsity) peak FLOP/s per chip, from the vendors' datasheets.
# "float32" is what a float32 matmul runs at under jax's default precision: TF32 on NVIDIA Ampere and
# later, bf16 passes on TPU (so the bf16 figure).
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H100": {"bfloat16": 989e12, "float32": 494e12},  # H100 SXM
    "H200": {"bfloat16": 989e12, "float32": 494e12},
    "A100": {"bfloat16": 312e12, "float32": 156e12},
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12, "float32": 197e12},  # v5e
    "TPU v5e": {"bfloat16": 197e12, "float32": 197e12},
    "TPU v5p": {"bfloat16": 459e12, "float32": 459e12},
    "TPU v5": {"bfloat16": 459e12, "float32": 459e12},  # v5p reports "TPU v5"
    "TPU v6 lite": {"bfloat16": 918e12, "float32": 918e12},  # v6e (Trillium)
}


# ---------------------------------------------------------------------------------------- timing


def interleaved(fns: Mapping[str, Callable[[], Any]], *, repeats: int, warmup: int = 1
                ) -> dict[str, list[float]]:
  """Times each blocking callable `repeats` times, round-robin; returns seconds per call.

  Args:
    fns: name -> a callable that does one unit of work and returns when it is done.
    repeats: timed rounds.
    warmup: untimed rounds first (compilation, caches, allocator).

  Returns:
    name -> list of `repeats` wall-clock durations in seconds, in round order.
  """
  for _ in range(warmup):
    for fn in fns.values():
      fn()
  out = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      out[name].append(time.perf_counter() - t0)
  return out


def summary(seconds: Sequence[float]) -> dict[str, float]:
  """Median / min / max of a list of durations (seconds), and how many there were."""
  return {"median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds),
          "repeats": len(seconds)}


def median_ratio(numerator_s: Sequence[float], denominator_s: Sequence[float]) -> float:
  """Median over rounds of numerator[i] / denominator[i] (paired rounds of `interleaved`).

  Pairing by round cancels load that changes between rounds, which a ratio of medians does not.
  """
  if len(numerator_s) != len(denominator_s) or not numerator_s:
    raise ValueError(f"median_ratio needs two equally long, non-empty lists; got {len(numerator_s)} "
                     f"and {len(denominator_s)}")
  return statistics.median(a / b for a, b in zip(numerator_s, denominator_s))


# -------------------------------------------------------------------------------- device facts


def nvidia_smi_name() -> str | None:
  """nvidia-smi's name of GPU 0, or None where there is no nvidia-smi."""
  exe = shutil.which("nvidia-smi")
  if exe is None:
    return None
  try:
    out = subprocess.run([exe, "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                         text=True, timeout=20, check=True).stdout
  except (OSError, subprocess.SubprocessError):
    return None
  return out.strip().splitlines()[0] if out.strip() else None


def host_info() -> dict[str, Any]:
  """Where a benchmark ran: python, jax, platform, device kind and count, CPUs, GPU name."""
  import jax  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  info = {"python": platform.python_version(), "machine": platform.machine(),
          "cpus": os.cpu_count(), "jax": jax.__version__, "platform": dev.platform,
          "device_kind": dev.device_kind, "num_devices": jax.device_count(),
          "num_processes": jax.process_count()}
  if dev.platform == "gpu":
    info["nvidia_smi_name"] = nvidia_smi_name()
  return info


def measured_matmul_flops(dtype: str = "float32", n: int = 2048, repeats: int = 3) -> float:
  """Best achieved FLOP/s of one jitted (n, n) @ (n, n) matmul in `dtype` on the default device."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), jnp.dtype(dtype))
  b = jax.random.normal(kb, (n, n), jnp.dtype(dtype))
  f = jax.jit(jnp.dot)
  times = interleaved({"matmul": lambda: f(a, b).block_until_ready()}, repeats=repeats)["matmul"]
  return 2.0 * n ** 3 / min(times)


def device_peak_flops(dtype: str, *, override: float = 0.0, matmul_n: int = 2048
                      ) -> tuple[float, str]:
  """Peak FLOP/s of one device for `dtype` compute, and where the number comes from.

  Args:
    dtype: "float32" or "bfloat16".
    override: a FLOP/s figure to use instead (e.g. a PCIe card's); > 0 wins.
    matmul_n: matrix size of the CPU measurement.

  Returns:
    (FLOP/s, a label: "override", "datasheet <kind> <dtype> dense", or "measured: ...").
  """
  import jax  # pylint: disable=g-import-not-at-top
  if override > 0:
    return float(override), "override (--peak_flops)"
  dev = jax.devices()[0]
  kind = dev.device_kind
  for key in sorted(PEAK_FLOPS, key=len, reverse=True):  # "TPU v5 lite" before "TPU v5"
    if key.lower() in kind.lower():
      return PEAK_FLOPS[key][dtype], f"datasheet {key} {dtype} dense"
  if dev.platform == "cpu":
    flops = measured_matmul_flops(dtype, matmul_n)
    return flops, (f"measured: best of 3 jitted {dtype} ({matmul_n}x{matmul_n})@({matmul_n}x"
                   f"{matmul_n}) matmuls on this CPU ({os.cpu_count()} cores); not a datasheet peak")
  raise ValueError(f"no peak FLOP/s known for device kind {kind!r}; pass --peak_flops=FLOPS "
                   f"(the datasheet's dense {dtype} figure)")


# ---------------------------------------------------------------------------------- length mixes


def lognormal_lengths(rng: np.random.Generator, n: int, median: float, sigma: float, max_len: int,
                      min_len: int = 3) -> np.ndarray:
  """n integer lengths, log-normal around `median` with log-std `sigma`, clipped to [min_len, max_len]."""
  x = np.exp(np.log(median) + sigma * rng.standard_normal(n))
  return np.clip(np.round(x), min_len, max_len).astype(int)


def token_tuples(rng: np.random.Generator, n: int, *, query_len: int, positive_len: int,
                 negative_len: int = 0, num_negatives: int = 0, query_median: float = 18,
                 passage_median: float = 140, query_sigma: float = 0.6, passage_sigma: float = 0.8,
                 vocab_size: int = 0) -> list[dict[str, Any]]:
  """Pre-tokenized (query, positive, K negatives) tuples with a realistic length mix.

  Lengths are log-normal (`lognormal_lengths`): queries around `query_median` tokens, positives and
  negatives around `passage_median`, each clipped to its side's length. Token ids are uniform in
  [3, vocab_size) (0/1/2 are pad/eos/bos), or all 7 when vocab_size is 0 (packing cares about lengths
  only). Ids query_id = positive_id = the tuple's index, so no two tuples are duplicates.

  Returns:
    n dicts with query_tokens / positive_tokens int32 (n,), negative_tokens [int32 (n,)] * K,
    query_id, positive_id: the packer's input (see embed2.data.packing).
  """
  ql = lognormal_lengths(rng, n, query_median, query_sigma, query_len)
  pl = lognormal_lengths(rng, n, passage_median, passage_sigma, positive_len)
  nl = lognormal_lengths(rng, n * num_negatives, passage_median, passage_sigma,
                         max(negative_len, 3)).reshape(n, num_negatives)

  def ids(m):
    if not vocab_size:
      return np.full(m, 7, np.int32)
    return rng.integers(3, vocab_size, m, dtype=np.int32)

  return [{"query_tokens": ids(ql[i]), "positive_tokens": ids(pl[i]),
           "negative_tokens": [ids(m) for m in nl[i]], "query_id": i, "positive_id": i}
          for i in range(n)]


# ---------------------------------------------------------------------------------------- output


def _cell(v: Any, fmt: str | None) -> str:
  if v is None:
    return "-"
  if fmt and isinstance(v, (int, float, np.integer, np.floating)):
    return format(v, fmt)
  return str(v)


def format_table(rows: Sequence[Mapping[str, Any]],
                 columns: Sequence[tuple[str, str] | tuple[str, str, str]]) -> str:
  """A plain-text table: one line per row, columns (key, header[, format spec]); missing -> "-"."""
  cells = [[_cell(r.get(c[0]), c[2] if len(c) > 2 else None) for c in columns] for r in rows]
  widths = [max([len(c[1])] + [len(line[i]) for line in cells]) for i, c in enumerate(columns)]
  head = "  ".join(c[1].rjust(w) for c, w in zip(columns, widths))
  body = ["  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in cells]
  return "\n".join([head, "-" * len(head)] + body)


def _jsonable(x: Any) -> Any:
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, float) and not np.isfinite(x):
    return None  # JSON has no NaN / inf
  return x


def write_json(path: str, result: Mapping[str, Any]) -> dict[str, Any]:
  """Writes `result` (numpy scalars/arrays converted, NaN -> null) to `path`, creating its folder.

  Returns:
    The JSON-able copy that was written (what a reader of the file gets back).
  """
  data = _jsonable(dict(result))
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  with open(path, "w") as f:
    json.dump(data, f, indent=2)
  print(f"wrote {path}")
  return data


def program_flags(name: str, *, toy: bool = True) -> flags.FlagValues:
  """A benchmark program's own FlagValues (embed2/cli.py says why one per program), holding the flags
  every program has: --out (default bench_out/NAME.json) and, when `toy`, --toy (the program picks
  the tiny sizes)."""
  flag_values = flags.FlagValues()
  flags.DEFINE_string("out", f"bench_out/{name}.json", "JSON output path", flag_values=flag_values)
  if toy:
    flags.DEFINE_bool("toy", False, "tiny sizes for a smoke run (tests)", flag_values=flag_values)
  return flag_values


def run_and_write(args: Any, run: Callable[[Any], Mapping[str, Any]],
                  report: Callable[[Mapping[str, Any]], str] | None = None) -> dict[str, Any]:
  """A benchmark program once its flags are parsed: measures (`run(args)`), prints the table
  (`report(result)`; a program that prints its rows as it measures has none) and writes the result to
  `args.out` as JSON.

  Returns:
    The JSON-able copy that was written.
  """
  result = run(args)
  if report is not None:
    print(report(result))
  return write_json(args.out, result)
