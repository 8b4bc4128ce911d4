"""Compiled temp memory of the contrastive loss (+ its gradient) vs global batch: dense vs blockwise.

    python -m embed2.bench.loss_memory                       # B = 1024 ... 65536, d = 768
    python -m embed2.bench.loss_memory --host_devices=8      # also sharded over 8 simulated devices
    python -m embed2.bench.loss_memory --batches=512,1024 --dim=64 --out=/tmp/mem.json

Nothing is executed: each variant is `jax.jit(jax.value_and_grad(loss)).lower(ShapeDtypeStruct...)
.compile()` and we read `memory_analysis().temp_size_in_bytes` (XLA's scratch memory per device,
excluding the arguments and outputs). So a dense (65536, 65536) float32 logit matrix costs compile
time, not RAM. Columns:

  dense / blockwise          the whole global batch on one device (`contrastive_loss`).
  sharded dense / blockwise  `sharded_contrastive_loss` over all devices (mesh data=N): per-device
                             temp with B_local = B / N; only when more than one device is visible.

The blockwise columns grow linearly with B (the (B, d) embeddings and their gradient); dense grows
quadratically (single device) or as B_local * B (sharded). Writes JSON to --out.
"""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

from absl import flags

from embed2 import cli
from embed2.bench import common


FLAGS = common.program_flags("loss_memory", toy=False)  # --out, and this program's own:
flags.DEFINE_string("batches", "1024,2048,4096,8192,16384,32768,65536",
                    "comma-separated global batch sizes", flag_values=FLAGS)
flags.DEFINE_integer("dim", 768, "embedding dim d", flag_values=FLAGS)
flags.DEFINE_string("mrl_dims", "", "comma-separated MRL prefixes (default: d only)", flag_values=FLAGS)
flags.DEFINE_integer("num_negatives", 0, "hard negatives K per query", flag_values=FLAGS)
flags.DEFINE_bool("symmetric", False, "add the target->query direction", flag_values=FLAGS)
flags.DEFINE_enum("kind", "softmax", ("softmax", "sigmoid"), "loss kind", flag_values=FLAGS)
flags.DEFINE_integer("block_size", 1024, "targets per block (blockwise)", flag_values=FLAGS)
flags.DEFINE_enum("dtype", "bfloat16", ("bfloat16", "float32"),
                  "embedding dtype (logits are float32 either way)", flag_values=FLAGS)
flags.DEFINE_integer("max_dense_batch", 65536,
                     "skip the dense variants above this global batch (compile time only)",
                     flag_values=FLAGS)
flags.DEFINE_integer("host_devices", 0, "simulate this many CPU devices (only if jax has not started yet)",
                     flag_values=FLAGS)


def _measure(fn, *args) -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  return {"temp_bytes": int(mem.temp_size_in_bytes) if mem is not None else None,
          "compile_s": round(seconds, 3)}


def run(args: cli.Args) -> dict[str, Any]:
  """Compiles every variant; returns the JSON-able results."""
  if args.host_devices:
    xla_flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in xla_flags:
      os.environ["XLA_FLAGS"] = f"{xla_flags} --xla_force_host_platform_device_count={args.host_devices}"
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from embed2 import losses  # pylint: disable=g-import-not-at-top

  batches = [int(b) for b in args.batches.split(",") if b]
  mrl_dims = tuple(int(m) for m in args.mrl_dims.split(",") if m)
  dtype = jnp.dtype(args.dtype)
  devices = jax.devices()
  n_dev = len(devices)
  mesh = None
  if n_dev > 1:
    mesh = jax.make_mesh((n_dev,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=devices)

  def variant(blockwise: bool, b: int, sharded: bool) -> dict[str, Any]:
    cfg = losses.LossConfig(kind=args.kind, symmetric=args.symmetric, mrl_dims=mrl_dims,
                            blockwise=blockwise, block_size=args.block_size)
    sharding = NamedSharding(mesh, P("data")) if sharded else None
    emb = jax.ShapeDtypeStruct((b, args.dim), dtype, sharding=sharding)
    neg = None
    if args.num_negatives:
      neg = jax.ShapeDtypeStruct((b, args.num_negatives, args.dim), dtype, sharding=sharding)
    loss = losses.sharded_contrastive_loss(mesh, cfg=cfg) if sharded else (
        lambda q, p, **kw: losses.contrastive_loss(q, p, **kw, cfg=cfg))

    def value_and_grad(q, p, n):
      return jax.value_and_grad(lambda q, p, n: loss(q, p, neg_bkd=n)[0], argnums=(0, 1, 2))(q, p, n)

    return _measure(value_and_grad, emb, emb, neg)

  rows = []
  for b in batches:
    row: dict[str, Any] = {"global_batch": b}
    dense_ok = b <= args.max_dense_batch
    row["dense"] = variant(False, b, False) if dense_ok else None
    row["blockwise"] = variant(True, b, False)
    if mesh is not None and b % n_dev == 0:
      row["local_batch"] = b // n_dev
      row["sharded_dense"] = variant(False, b, True) if dense_ok else None
      row["sharded_blockwise"] = variant(True, b, True)
    rows.append(row)
    _print_row(row, first=len(rows) == 1)
  return {
      "benchmark": "loss_memory",
      "platform": devices[0].platform,
      "num_devices": n_dev,
      "jax_version": jax.__version__,
      "config": {"dim": args.dim, "mrl_dims": list(mrl_dims), "num_negatives": args.num_negatives,
                 "symmetric": args.symmetric, "kind": args.kind, "block_size": args.block_size,
                 "dtype": args.dtype},
      "measure": "value_and_grad of the loss w.r.t. embeddings; XLA temp_size_in_bytes per device",
      "rows": rows,
  }


def _fmt(v: dict[str, Any] | None) -> str:
  if v is None or v.get("temp_bytes") is None:
    return "skipped"
  return f"{v['temp_bytes'] / 2**20:,.1f} MiB"


def _print_row(row: dict[str, Any], first: bool) -> None:
  cols = ("dense", "blockwise", "sharded_dense", "sharded_blockwise")
  if first:
    print(f"{'global B':>9} " + " ".join(f"{c:>18}" for c in cols))
  vals = [_fmt(row[c]) if c in row else "-" for c in cols]
  print(f"{row['global_batch']:>9} " + " ".join(f"{v:>18}" for v in vals), flush=True)


def main(argv: Sequence[str]) -> dict[str, Any]:
  """The command line after the program name -> the JSON document written to --out."""
  return common.run_and_write(cli.parse(FLAGS, argv), run)


if __name__ == "__main__":
  cli.run(main, FLAGS)
