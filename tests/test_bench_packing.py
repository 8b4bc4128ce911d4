"""Smoke test of the packing benchmark program at toy size (no timing checks)."""

import json

from embed2.bench import packing as bench


def test_bench_packing_toy(tmp_path):
  out = tmp_path / "packing.json"
  results = bench.main(["--toy", "--tokenizer=bytes", f"--out={out}"])
  saved = json.loads(out.read_text())
  assert saved == json.loads(json.dumps(results))
  assert saved["config"]["examples_per_group"] == 16
  for part in ("packing", "pipeline"):
    assert set(saved[part]) == {"packed", "in_order", "padded"}
    for variant in ("packed", "in_order", "padded"):
      r = saved[part][variant]
      for key in ("nonpad_fraction", "query_nonpad_fraction",
                  "positive_nonpad_fraction", "negative_nonpad_fraction",
                  "example_fill"):
        assert 0.0 < r[key] <= 1.0, (part, variant, key, r[key])
      for key in ("row_tokens_per_step", "useful_tokens_per_step",
                  "useful_tokens_per_s", "steps_per_s"):
        assert r[key] > 0, (part, variant, key)
    # Packing never needs more row tokens per step than one example per row.
    assert (saved[part]["packed"]["row_tokens_per_step"]
            <= saved[part]["padded"]["row_tokens_per_step"])
    assert saved[part]["padded"]["example_fill"] == 1.0
  # The config part: configs/tiny.py's streams (toy), in order and with the lookahead window.
  mix = saved["config_mix"]
  assert mix["config"] == "tiny" and mix["batches"] == 2
  for variant in ("in_order", "lookahead"):
    streams = mix[variant]["streams"]
    assert set(streams) == set(mix["run_weights"]) == {"pft", "pairs", "labels"}
    for name, r in streams.items():
      assert 0.0 < r["nonpad_fraction"] <= 1.0 and 0.0 < r["example_fill"] <= 1.0, (name, r)
      assert r["useful_tokens_per_batch"] <= r["row_tokens_per_batch"]
    assert 0.0 < mix[variant]["run_mix"] <= 1.0
