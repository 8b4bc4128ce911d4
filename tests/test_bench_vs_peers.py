"""`python -m embed2.bench.vs_peers` runs at toy size: the same random model in sentence-transformers /
PyTorch and in embed2 gives the same token ids, embeddings and first-step loss in every regime, each
contender in its own process, and the JSON has the speed and load fields (no timing assertions)."""

import json
import os

import numpy as np
import pytest

pytest.importorskip("sentence_transformers")
pytest.importorskip("torch")

from embed2.bench import vs_peers as bench  # pylint: disable=g-import-not-at-top
from embed2.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top


@pytest.fixture(scope="module")
def tokenizer_json():
  return tok_lib.sentencepiece_to_hf(tok_lib.Tokenizer.default())[0]


def test_tokenizers_agree_and_mix_words_are_tokens(tokenizer_json, rng):
  """transformers' fast tokenizer of the tokenizer.json (sentence-transformers' side) == embed2's."""
  theirs = bench.hf_tokenizer(tokenizer_json, max_len=512)
  ours = tok_lib.Tokenizer.default()
  vocab = theirs.get_vocab()
  texts = bench.mix_texts(rng, 20, vocab, median_words=12, max_words=40)
  texts += ['def read(path):\n    """Read a tar file."""\n  return  <bos> x', "déjà vu \t 🦜"]
  for text in texts:
    assert theirs(text)["input_ids"] == [tok_lib.BOS_ID] + ours.encode(text) + [tok_lib.EOS_ID], text
  # The mix's words are whole-word pieces: about one token each.
  words = sum(len(t.split()) for t in texts[:20])
  tokens = sum(len(ours.encode(t)) for t in texts[:20])
  assert words <= tokens <= 1.5 * words


def test_thread_settings_are_every_count_up_to_the_cores():
  args = bench._args([])
  assert args.threads == list(range(1, min(os.cpu_count(), 4) + 1))
  assert bench._args(["--threads=2,1,2"]).threads == [1, 2]
  assert bench._args(["--toy"]).threads == [1]


def test_bench_runs_and_outputs_agree(tmp_path):
  out = tmp_path / "vs_peers.json"
  result = bench.main(["--toy", "--noonnx", "--embed2_1cpu", f"--out={out}"])
  data = json.loads(out.read_text())
  assert data == result
  assert data["onnx"] == "skipped: --noonnx"
  # The one-CPU contender is pinned (XLA's one-thread flags, its earlier setting, used every core).
  assert data["threads"]["affinity"] == {"embed2": os.cpu_count(), "embed2_1cpu": 1, "st_torch_1t": os.cpu_count()}
  assert data["embed2"]["segments"] > 1  # packed inference is the default
  for regime in bench.REGIMES:
    inf = data["inference"][regime]
    assert not inf["refused"], inf
    assert set(inf["max_abs_diff"]) == {"embed2", "embed2_unpacked", "embed2_1cpu", "st_torch_1t"}
    assert max(inf["max_abs_diff"].values()) < 1e-4
    assert inf["vs_fastest_st_torch"] > 0 and inf["packing_gain"] > 0
    for tool in ("embed2", "embed2_unpacked", "st_torch_1t"):
      assert inf[tool]["texts_per_s"] > 0 and inf[tool]["tokens_per_s"] > 0
    assert set(inf["load"]) == {"load_before", "load_after", "cpus", "others_cpus", "busy"}
    assert inf["load"]["others_cpus"] >= 0
    assert inf["useful_gflop"] > 0 and inf["embed2"]["useful_gflop_per_s"] > 0
  lo, _, hi = data["inference"]["queries"]["tokens_min_median_max"]
  assert bench.QUERY_TOKENS[0] <= lo and hi <= bench.QUERY_TOKENS[1]
  assert data["inference"]["documents"]["tokens_min_median_max"][0] == 64  # cut to the toy's --max_len
  tr = data["train"]
  assert not tr["refused"], tr
  fs = tr["first_step"]["torch_1t"]
  assert fs["loss_abs_diff"] < 1e-4 and fs["grad_norm_rel_diff"] < 1e-3
  assert tr["vs_fastest_torch"] > 0 and tr["embed2"]["examples_per_s"] > 0
  assert tr["torch_1t"]["examples_per_s"] > 0


def test_onnx_backbone_agrees_with_torch(tmp_path, tokenizer_json):
  """The ONNX Runtime contender: the exported backbone inside sentence-transformers embeds as torch."""
  missing = bench.onnx_missing()
  if missing:
    pytest.skip(f"the ONNX Runtime contender needs {missing}")
  from sentence_transformers import SentenceTransformer  # pylint: disable=g-import-not-at-top
  args = bench._args(["--toy"])
  st_dir = bench.build_sentence_transformer(bench.model_config(args), str(tmp_path), max_len=64,
                                            tokenizer_json=tokenizer_json, seed=3)
  bench.export_onnx(st_dir)
  st = SentenceTransformer(st_dir, device="cpu", local_files_only=True)
  texts = ["read a tar file", "the socket server and its client threads " * 3, "x"]
  want = st.encode(texts, batch_size=2, convert_to_numpy=True)
  st[0].model = bench.ort_backbone(os.path.join(st_dir, "onnx", "model.onnx"), 1, st[0].model.config)
  got = st.encode(texts, batch_size=2, convert_to_numpy=True)
  assert np.abs(got - want).max() < 1e-5


def test_cpu_meter_counts_other_processes_not_ours(monkeypatch):
  """others_cpus = (busy ticks of the machine - ticks of our processes) / CLK_TCK / wall."""
  hz = os.sysconf("SC_CLK_TCK")
  clock = iter([100.0, 102.0])  # two seconds of wall
  machine = iter([1000.0, 1000.0 + 3.5 * hz * 2])  # 3.5 CPUs busy on average...
  ours = iter([50.0, 50.0 + 2.0 * hz * 2])  # ...2 of them ours
  monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))
  monkeypatch.setattr(bench, "_busy_ticks", lambda: next(machine))
  monkeypatch.setattr(bench, "_process_ticks", lambda pids: next(ours))
  monkeypatch.setattr(bench.os, "cpu_count", lambda: 2)
  out = bench.CpuMeter([123]).stop()
  assert out["others_cpus"] == pytest.approx(1.5) and out["busy"] and out["cpus"] == 2


def test_cpu_meter_sees_a_spinning_process():
  """Live: a process spinning on a CPU shows in others_cpus, and not when it is listed as ours (two
  meters over the same second, so whatever else the machine does counts alike in both)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  proc = subprocess.Popen([sys.executable, "-c",
                           "import time\nt = time.time()\nwhile time.time() - t < 2.5: pass"])
  try:
    time.sleep(0.5)
    theirs, ours = bench.CpuMeter([]), bench.CpuMeter([proc.pid])
    time.sleep(1.0)
    theirs, ours = theirs.stop()["others_cpus"], ours.stop()["others_cpus"]
  finally:
    proc.wait()
  assert theirs - ours > 0.3, (theirs, ours)  # the spinner's share of a CPU, seen by one meter only
