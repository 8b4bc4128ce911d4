"""`python -m embed2.bench.input_pipeline` runs at toy size and writes its JSON (no timing assertions)."""

import json

from embed2.bench import input_pipeline as bench


def test_bench_runs_and_writes_json(tmp_path):
  out = tmp_path / "input_pipeline.json"
  result = bench.main(["--config=tiny", "--toy", "--streams=pairs", f"--out={out}"])
  data = json.loads(out.read_text())
  assert data == result
  assert data["benchmark"] == "input_pipeline"
  assert set(data["streams"]) == {"pairs"}
  r = data["streams"]["pairs"]
  for key in ("pipeline_examples_per_s", "pipeline_tokens_per_s", "step_examples_per_s", "ratio"):
    assert r[key] > 0, key
  assert r["batch_examples"] > 0 and r["modality"] == "text"
  assert data["modalities"]["text"]["min_ratio"] == r["ratio"]
  for m in ("image", "audio", "video"):
    assert data["modalities"][m] == bench.NO_STREAM


def test_bench_measures_a_media_stream(tmp_path):
  out = tmp_path / "input_pipeline.json"
  data = bench.main(["--config=demo", "--toy", "--config_arg=layers=1,batch=8", "--streams=a2t",
                     f"--out={out}"])
  r = data["streams"]["a2t"]
  assert r["modality"] == "audio" and r["batch_examples"] > 0 and r["ratio"] > 0
  assert data["modalities"]["audio"]["streams"] == ["a2t"]
  assert data["modalities"]["text"] == bench.NO_STREAM
