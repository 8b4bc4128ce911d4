"""Suites, `python -m embed2.evaluate` and `python -m embed2.export` on a tiny checkpoint."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from embed2 import evaluate, export
from embed2 import main as main_lib
from embed2.eval import suites
from embed2.inference import Embedder, MissingFrontendError

TASK_STRINGS = {"code_search": "task: code retrieval | query: ",  # configs/demo.py's names
                "stdlib_doc_retrieval": "task: search result | query: "}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory, request, fixture_rng, save_random_checkpoint):
  d = tmp_path_factory.mktemp("workdir") / "checkpoints"
  save_random_checkpoint(d, fixture_rng(request), step=7, task_strings=TASK_STRINGS)
  return d


@pytest.fixture(scope="module")
def embedder(ckpt_dir):
  return Embedder.from_checkpoint(ckpt_dir)


def write_beir(folder, docs, queries, qrels):
  """A BEIR-layout task: docs {id: (title, text)}, queries {id: text}, qrels [(qid, did, score)]."""
  (folder / "qrels").mkdir(parents=True)
  with open(folder / "corpus.jsonl", "w") as f:
    for i, (title, text) in docs.items():
      f.write(json.dumps({"_id": i, "title": title, "text": text}) + "\n")
  with open(folder / "queries.jsonl", "w") as f:
    for i, text in queries.items():
      f.write(json.dumps({"_id": i, "text": text}) + "\n")
  with open(folder / "qrels" / "test.tsv", "w") as f:
    f.write("query-id\tcorpus-id\tscore\n")
    for q, d, s in qrels:
      f.write(f"{q}\t{d}\t{s}\n")


WORDS = "alpha beta gamma delta sigma omega kappa lambda theta zeta".split()


def perfect_beir(rng, folder, n=12):
  """Each query is its document's exact text, so a deterministic embedder ranks it first."""
  docs = {f"d{i}": (f"title {i}", " ".join(rng.choice(WORDS, 6))) for i in range(n)}
  queries = {f"q{i}": f"title {i} {docs[f'd{i}'][1]}" for i in range(n)}
  queries["q_unjudged"] = "no judgment: left out"
  write_beir(folder, docs, queries, [(f"q{i}", f"d{i}", 1) for i in range(n)])


def test_demo_suite_in_process(embedder):
  res = suites.evaluate_suite(embedder, "demo")
  for task in suites.DEMO_TASKS:
    for metric in ("recall@1", "recall@10", "ndcg@10", "mrr@10"):
      for dim in embedder.dims:
        assert 0.0 <= res[f"{task}/{metric}/dim_{dim}"] <= 1.0
      assert 0.0 <= res[f"{task}/{metric}/bm25"] <= 1.0
  assert res["code_search/ndcg@10/bm25"] > 0.2  # the lexical baseline works on this data
  assert "module_classification_clusters/v_measure/dim_64" in res
  means = [np.mean([res[f"{t}/ndcg@10/dim_32"] for t in suites.DEMO_TASKS])]
  assert res["mean/ndcg@10/dim_32"] == pytest.approx(means[0])


def test_demo_queries_get_the_trained_task_strings(embedder):
  got = {name: suites._task_kwargs(embedder, names)["task"]
         for name, names in suites.DEMO_TASKS.items()}
  assert got == {"code_search": "code_search", "doc_retrieval": "stdlib_doc_retrieval",
                 "module_classification": None}


def test_suite_evaluator_keeps_its_compiled_embedder(embedder, tmp_path, rng):
  perfect_beir(rng, tmp_path / "mteb_retrieval" / "SciFact")
  eval_fn = evaluate.SuiteEvaluator("mteb_retrieval", tokenizer=embedder.tokenizer,
                                    task_strings=embedder.task_strings, dims=(16,), data_dir=tmp_path)
  first = eval_fn(embedder.model, 10, "ft")
  n = eval_fn.embedder.num_compilations
  second = eval_fn(embedder.model, 20, "ft")
  assert eval_fn.embedder.num_compilations == n  # in-training evaluation compiles once
  assert first == second
  assert first["eval/mteb_retrieval/SciFact/ndcg@10/dim_16"] == pytest.approx(1.0)
  assert "eval/mteb_retrieval/SciFact/ndcg@10/bm25" in first


def test_evaluate_main_writes_json_and_table(ckpt_dir, tmp_path, capsys, rng):
  perfect_beir(rng, tmp_path / "mteb_retrieval" / "NFCorpus")
  perfect_beir(rng, tmp_path / "mteb_retrieval" / "ArguAna")
  out = tmp_path / "res" / "retrieval.json"
  doc = evaluate.main([f"--checkpoint={ckpt_dir.parent}", "--suite=mteb_retrieval",
                       "--dims=16,64", f"--data_dir={tmp_path}", f"--out={out}", "--no_bm25"])
  printed = capsys.readouterr().out
  assert "NFCorpus" in printed and "ArguAna" in printed and "dim_16" in printed
  saved = json.loads(out.read_text())
  assert saved == json.loads(json.dumps(doc))
  assert saved["step"] == 7 and saved["dims"] == [16, 64] and saved["suite"] == "mteb_retrieval"
  assert not any(k.endswith("/bm25") for k in saved["metrics"])
  assert not any("dim_32" in k for k in saved["metrics"])
  assert saved["metrics"]["mean/ndcg@10/dim_64"] == pytest.approx(1.0)
  with pytest.raises(ValueError, match="not trained MRL dims"):
    evaluate.main([f"--checkpoint={ckpt_dir}", "--suite=demo", "--dims=20"])
  with pytest.raises(ValueError, match="unknown suite 'nope'"):
    evaluate.main([f"--checkpoint={ckpt_dir}", "--suite=nope"])
  evaluate.main(["--suite=list"])
  assert "mscoco" in capsys.readouterr().out


def test_cli_subprocess_on_beir_stand_in(ckpt_dir, tmp_path, rng):
  perfect_beir(rng, tmp_path / "mteb_code" / "CosQA")
  out = tmp_path / "code.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "embed2.evaluate", f"--checkpoint={ckpt_dir / '7'}", "--suite=mteb_code",
       f"--data_dir={tmp_path}", f"--out={out}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "CosQA" in proc.stdout and "ndcg@10" in proc.stdout
  assert not re.search(r"^I\d{4} ", proc.stderr, re.M), proc.stderr[-3000:]  # absl INFO lines: none
  m = json.loads(out.read_text())["metrics"]
  # Identical texts embed identically: a perfect ranking at every dim, and BM25 finds them too.
  for dim in (16, 32, 64):
    assert m[f"CosQA/ndcg@10/dim_{dim}"] == pytest.approx(1.0)
    assert m[f"CosQA/mrr@10/dim_{dim}"] == pytest.approx(1.0)
  assert m["CosQA/recall@10/bm25"] == pytest.approx(1.0)


def test_beir_loader_and_missing_data(tmp_path, embedder):
  write_beir(tmp_path / "T", {"a": ("", "x"), "b": ("t", "y"), "c": ("", "z")},
             {"1": "q1", "2": "q2", "3": "q3"}, [("1", "b", 2), ("1", "c", 1), ("2", "a", 0)])
  task = suites.load_beir(tmp_path / "T")
  assert task.corpus == ["x", "t y", "z"]
  assert task.queries == ["q1"]  # q2 has only a grade-0 judgment, q3 none
  assert task.relevance == [{1: 2.0, 2: 1.0}]
  with pytest.raises(FileNotFoundError, match="BEIR layout"):
    suites.evaluate_suite(embedder, "mteb_retrieval", data_dir=tmp_path / "empty")
  write_beir(tmp_path / "Bad", {"a": ("", "x")}, {"1": "q"}, [("1", "zz", 1)])
  with pytest.raises(ValueError, match="missing from"):
    suites.load_beir(tmp_path / "Bad")


def test_media_suites_defined_but_need_frontends(tmp_path, embedder):
  for suite, key, short in (("mscoco", "image", "i"), ("flickr30k", "image", "i"),
                            ("msrvtt", "video", "v"), ("vatex", "video", "v")):
    folder = tmp_path / suite
    folder.mkdir()
    rows = [{key: f"m{i}.bin", "captions": [f"cap {i} a", f"cap {i} b"]} for i in range(3)]
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = suites.SUITES[suite].load(tmp_path)
    t2m, m2t = tasks
    assert t2m.name == f"t2{short}" and m2t.name == f"{short}2t"
    assert t2m.queries == ["cap 0 a", "cap 0 b", "cap 1 a", "cap 1 b", "cap 2 a", "cap 2 b"]
    assert t2m.relevance == [{0: 1.0}, {0: 1.0}, {1: 1.0}, {1: 1.0}, {2: 1.0}, {2: 1.0}]
    assert m2t.relevance == [{0: 1.0, 1: 1.0}, {2: 1.0, 3: 1.0}, {4: 1.0, 5: 1.0}]
    assert m2t.queries[1].path == str(folder / "m1.bin")
    # No frontend yet: a clear error before any data is read (none is needed to get it).
    with pytest.raises(MissingFrontendError, match=f"no {key} frontend"):
      suites.evaluate_suite(embedder, suite, data_dir=tmp_path / "nowhere")


def test_export_npy_parquet_and_cli(ckpt_dir, tmp_path, embedder, rng):
  texts = [" ".join(rng.choice(WORDS, int(rng.integers(1, 9)))) for _ in range(23)]
  src = tmp_path / "docs.jsonl"
  src.write_text("".join(json.dumps({"id": f"doc{i}", "body": t}) + "\n" + ("\n" if i == 3 else "")
                         for i, t in enumerate(texts)))
  res = export.export_embeddings(embedder, str(src), str(tmp_path / "out" / "docs"), field="body",
                                 dim=32, chunk=5, progress=False)
  assert res["count"] == 23 and res["dim"] == 32
  want = embedder.embed(texts, dim=32, is_query=False)
  np.testing.assert_allclose(np.load(res["npy"]), want, atol=1e-6)
  pq = pytest.importorskip("pyarrow.parquet")
  table = pq.read_table(res["parquet"])
  assert table.column("id").to_pylist() == [f"doc{i}" for i in range(23)]
  np.testing.assert_allclose(np.asarray(table.column("embedding").to_pylist(), np.float32), want,
                             atol=1e-6)
  # Plain text, queries with a task string, through the command's main().
  txt = tmp_path / "q.txt"
  txt.write_text("\n".join(texts[:4]) + "\n")
  out = export.main([f"--checkpoint={ckpt_dir}", f"--input={txt}", f"--output={tmp_path / 'q'}",
                     "--query", "--task=code_search", "--no_parquet"])
  assert out["parquet"] is None
  np.testing.assert_allclose(np.load(out["npy"]),
                             embedder.embed(texts[:4], task="code_search"), atol=1e-6)
  with pytest.raises(ValueError, match="not a trained MRL dim"):
    export.export_embeddings(embedder, str(src), str(tmp_path / "bad"), dim=7)
  with pytest.raises(ValueError, match="no string field 'text'"):
    export.export_embeddings(embedder, str(src), str(tmp_path / "bad"), progress=False)


def test_the_full_dim_columns_of_tables_and_log_lines():
  """One rule picks what a table or a log line shows: each task's metric at the largest dim."""
  res = {"code/ndcg@10/dim_8": 0.1, "code/ndcg@10/dim_16": 0.25, "docs/ndcg@10/dim_16": 0.5,
         "code/ndcg@10/bm25": 0.9, "mean/ndcg@10/dim_16": 0.4, "code/recall@1/dim_16": 0.3}
  assert suites.full_dim_keys(res) == ["code/ndcg@10/dim_16", "docs/ndcg@10/dim_16", "mean/ndcg@10/dim_16"]
  assert suites.full_dim_keys(res, "mrr@10") == []
  assert main_lib.headline(res) == "ndcg@10 at dim 16: code 0.250, docs 0.500"
  table = main_lib.soup_table({"ft": res, "soup": {**res, "docs/ndcg@10/dim_16": 0.75}}).splitlines()
  assert table[0].split() == ["model", "code", "docs"]
  assert table[1].split() == ["ft", "0.250", "0.500"] and table[2].split() == ["soup", "0.250", "0.750"]
