"""`python -m embed2.bench.loss_memory` runs at toy sizes and writes its JSON (no timing asserts)."""

import json

from embed2.bench import loss_memory


def test_bench_runs_and_writes_json(tmp_path):
  out = tmp_path / "sub" / "loss_memory.json"
  result = loss_memory.main(["--batches=64,128", "--dim=16", "--block_size=32",
                             "--max_dense_batch=64", "--dtype=float32", f"--out={out}"])
  with open(out) as f:
    data = json.load(f)
  assert data == json.loads(json.dumps(result))
  assert data["benchmark"] == "loss_memory" and data["num_devices"] >= 1
  assert data["config"]["dim"] == 16 and data["config"]["block_size"] == 32
  rows = data["rows"]
  assert [r["global_batch"] for r in rows] == [64, 128]
  for r in rows:
    assert r["blockwise"]["temp_bytes"] > 0 and r["blockwise"]["compile_s"] >= 0
  assert rows[0]["dense"]["temp_bytes"] > 0
  assert rows[1]["dense"] is None  # above --max_dense_batch: skipped, marked None
  if data["num_devices"] > 1:  # the test run has 8 simulated devices
    assert rows[0]["local_batch"] == 64 // data["num_devices"]
    assert rows[0]["sharded_blockwise"]["temp_bytes"] > 0
    assert rows[0]["sharded_dense"]["temp_bytes"] > 0
