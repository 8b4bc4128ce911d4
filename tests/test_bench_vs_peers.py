"""`python -m embed2.bench.vs_peers` runs at toy size: the same random model in sentence-transformers /
PyTorch and in embed2 gives the same embeddings and first-step loss, and the JSON has the speed fields
(no timing assertions)."""

import json

import pytest

pytest.importorskip("sentence_transformers")
pytest.importorskip("torch")

from embed2.bench import vs_peers as bench  # pylint: disable=g-import-not-at-top


def test_word_tokenizers_agree():
  vocab = bench.word_vocab(64)
  ours, theirs = bench.WordTokenizer(vocab), bench.hf_tokenizer(vocab, max_len=16)
  for text in ("w1 w2 w30", "w59  w0\tw7", "unknown w3"):
    assert theirs(text)["input_ids"] == [2] + ours.encode(text) + [1]
  assert ours.encode("unknown") == [3]


def test_bench_runs_and_outputs_agree(tmp_path):
  out = tmp_path / "vs_peers.json"
  result = bench.main(["--toy", f"--out={out}"])
  data = json.loads(out.read_text())
  assert data == result
  inf = data["inference"]
  assert "refused" not in inf, inf
  assert inf["max_abs_diff"] < 1e-4
  assert inf["speedup"] > 0
  for tool in ("embed2", "sentence_transformers"):
    assert inf[tool]["texts_per_s"] > 0 and inf[tool]["tokens_per_s"] > 0
  tr = data["train"]
  assert "refused" not in tr, tr
  assert tr["first_step"]["loss_abs_diff"] < 1e-4
  assert tr["first_step"]["grad_norm_rel_diff"] < 1e-3
  assert tr["speedup"] > 0 and tr["embed2"]["examples_per_s"] > 0 and tr["torch"]["examples_per_s"] > 0
  assert data["threads"]["torch"] >= 1
