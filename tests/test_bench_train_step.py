"""`python -m embed2.bench.train_step` runs at toy size and writes its JSON; the analytic FLOP count is
checked against a float64 count written out loop by loop (no timing assertions)."""

import json

import numpy as np

from embed2.bench import train_step as bench
from embed2.model import ModelConfig


def _flops_by_loops(cfg, lengths, num_pooled):
  """Forward FLOPs counted pair by pair and matrix by matrix, in float64."""
  d, h, k, hd, f = cfg.model_dim, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim, cfg.mlp_dim
  total = 0.0
  for n in lengths:
    for layer in range(cfg.num_layers):
      # q, k, v, o projections and the three MLP matrices: 2 FLOPs per multiply-add per token.
      total += n * 2.0 * (d * h * hd + d * k * hd + d * k * hd + h * hd * d + d * f + d * f + f * d)
      window = None if cfg.is_global_layer(layer) else cfg.sliding_window
      pairs = sum(1 for i in range(n) for j in range(n) if window is None or abs(i - j) < window)
      total += pairs * h * (2.0 * hd + 2.0 * hd)  # one QK^T dot and one PV accumulation per pair
  dims = (cfg.model_dim,) + tuple(cfg.head_dims)
  total += num_pooled * sum(2.0 * a * b for a, b in zip(dims[:-1], dims[1:]))
  return total


def test_forward_flops_matches_loop_count():
  rng = np.random.default_rng(0)
  cfg = ModelConfig.from_name("tiny", num_layers=3, sliding_window=int(rng.integers(3, 9)),
                              global_every=2)
  lengths = rng.integers(1, 40, size=7)
  got = bench.forward_flops(cfg, lengths, num_pooled=5)
  np.testing.assert_allclose(got, _flops_by_loops(cfg, lengths.tolist(), 5), rtol=1e-12)


def test_batch_flops_rows_cover_useful():
  cfg = ModelConfig.from_name("tiny", max_segments=2)
  seg = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 0, 0, 0, 0]], np.int32)
  host = {"query_segment_ids": seg, "query_tokens": seg * 5}
  f = bench.batch_flops(cfg, host, ["query"])
  want = 3.0 * bench.forward_flops(cfg, np.array([3, 2, 2]), num_pooled=3)
  np.testing.assert_allclose(f["useful"], want, rtol=1e-12)
  assert f["rows"] > f["useful"]  # every row token, L x L attention, R x S head vectors


def test_bench_runs_and_writes_json(tmp_path):
  out = tmp_path / "sub" / "train_step.json"
  result = bench.main(["--toy", f"--out={out}"])
  data = json.loads(out.read_text())
  assert data == result
  assert data["benchmark"] == "train_step" and data["peak_flops_per_device"] > 0
  assert data["peak_flops_source"]
  assert set(data["variants"]) == {"packed", "padded", "trivial_loss"}
  for name, v in data["variants"].items():
    for key in ("step_ms", "examples_per_s", "useful_tokens_per_s", "row_tokens_per_s", "mfu",
                "analytic_flops", "analytic_row_flops"):
      assert v[key] > 0, (name, key)
    assert 0 < v["nonpad_fraction"] <= 1
    assert v["analytic_row_flops"] >= v["analytic_flops"]
    if v["xla_flops"] is not None:
      assert v["xla_over_analytic"] > 0
  assert data["variants"]["padded"]["nonpad_fraction"] < data["variants"]["packed"]["nonpad_fraction"]
  assert data["loss_share"]["loss_alone_ms"] > 0
  assert "share_of_step" in data["loss_share"]
  assert data["packed_over_padded"]["useful_tokens_per_s"] > 0
  assert data["host"]["jax"] and data["host"]["device_kind"]
