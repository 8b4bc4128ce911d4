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
    assert set(saved[part]) == {"packed", "padded"}
    for variant in ("packed", "padded"):
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
