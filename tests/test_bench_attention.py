"""`python -m embed2.bench.attention` at toy sizes, and its loop-aware HLO FLOP count (no timing asserts)."""

import json

import jax
import jax.numpy as jnp
import numpy as np

from embed2.bench import attention as bench


def test_hlo_dot_flops_counts_loops_and_branches():
  s = jax.ShapeDtypeStruct((32, 48), jnp.float32)
  w = jax.ShapeDtypeStruct((48, 48), jnp.float32)

  def scanned(x, w):
    def body(c, i):
      c = jax.lax.cond(i % 2 == 0, lambda c: c @ w, lambda c: c, c)
      return c @ w, None
    return jax.lax.scan(body, x, jnp.arange(7))[0]

  one = 2.0 * 32 * 48 * 48
  plain = jax.jit(lambda x, w: x @ w).lower(s, w).compile()
  assert bench.hlo_dot_flops(plain.as_text()) == one
  compiled = jax.jit(scanned).lower(s, w).compile()
  # 7 trips x (one matmul + the costlier branch of the cond, one more); XLA's own count sees one trip.
  assert bench.hlo_dot_flops(compiled.as_text()) == 7 * 2 * one
  assert compiled.cost_analysis()["flops"] < 3 * one


def test_bench_runs_and_writes_json(tmp_path):
  out = tmp_path / "sub" / "attention.json"
  result = bench.main(["--toy", "--impls=xla,blockwise,splash", f"--out={out}"])
  with open(out) as f:
    data = json.load(f)
  assert data == json.loads(json.dumps(result))
  assert data["benchmark"] == "attention" and data["config"]["head_dim"] == 16
  assert "splash" in data["skipped"]  # a TPU kernel on a CPU backend: listed, not silently dropped
  rows = {(r["impl"], r["layer"], r["length"]): r for r in data["rows"]}
  assert set(rows) == {(i, k, l) for i in ("xla", "blockwise") for k in ("global", "sliding")
                       for l in (64, 128)}
  for (impl, layer, l), r in rows.items():
    assert r["temp_bytes"] > 0 and r["hlo_flops"] > 0 and r["exact_flops"] > 0
    assert ("ms" in r) == (l <= 64)
  # The tiny preset's window is 8: blockwise sliding FLOPs double with L, xla's quadruple.
  assert np.isclose(data["summary"]["sliding_flops_exponent"]["blockwise"], 1.0, atol=0.05)
  assert np.isclose(data["summary"]["sliding_flops_exponent"]["xla"], 2.0, atol=0.05)
  # Blockwise global: exact attention plus the recomputed Q K^T of the backward (7 / 6).
  r = rows["blockwise", "global", 128]
  assert np.isclose(r["hlo_flops"] / r["exact_flops"], 7 / 6, rtol=0.01)
