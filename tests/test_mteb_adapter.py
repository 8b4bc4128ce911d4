"""MtebEncoder: prompt priority, both encode interfaces, and (when mteb is installed) a real
`mteb.evaluate` run on mteb's in-memory mock tasks."""

import sys
import types

import numpy as np
import pytest
from absl import app

from embed2.data.tokenizer import Tokenizer
from embed2 import mteb_adapter
from embed2.mteb_adapter import DEFAULT_PROMPTS, EMBEDDINGGEMMA_PROMPTS, MtebEncoder
from embed2.inference import Embedder, MissingFrontendError

TRAINED = {"stdlib_doc_retrieval": "task: docs | query: "}


@pytest.fixture(scope="module")
def embedder(request, fixture_rng, random_tiny_model):
  return Embedder(random_tiny_model(fixture_rng(request)), Tokenizer.default(),
                  task_strings=TRAINED, batch_size=8, max_length=64, buckets=(32, 64))


def meta(name, kind):
  return types.SimpleNamespace(name=name, type=kind)


def test_prompt_priority(embedder):
  enc = MtebEncoder(embedder, prompts={
      "SciFact-query": "a", "SciFact": "b", "Retrieval-query": "c", "Retrieval": "d", "query": "e",
      "STS": "stdlib_doc_retrieval"})
  assert enc.prompt("SciFact", "Retrieval", "query") == "a"
  assert enc.prompt("SciFact", "Retrieval", "document") == "b"
  assert enc.prompt("NFCorpus", "Retrieval", "query") == "c"
  assert enc.prompt("NFCorpus", "Retrieval", "document") == "d"
  assert enc.prompt("Banking77", "Classification", "query") == "e"
  assert enc.prompt("Banking77", "Classification", None) == ""
  assert enc.prompt("STS12", "STS", None) == TRAINED["stdlib_doc_retrieval"]  # a trained task's string
  # Enum-like prompt types (mteb's PromptType) are read by value.
  assert enc.prompt("SciFact", "Retrieval", types.SimpleNamespace(value="query")) == "a"
  default = MtebEncoder(embedder)
  assert default.prompt("X", "Retrieval", "query") == DEFAULT_PROMPTS["Retrieval-query"]
  assert default.prompt("X", "Retrieval", "document") == ""  # embed2 trains no document prompt
  gemma = MtebEncoder(embedder, prompts=EMBEDDINGGEMMA_PROMPTS)
  assert gemma.prompt("X", "Retrieval", "document") == "title: none | text: "


def test_encode_both_interfaces(embedder):
  texts = ["read a tar archive", "open a socket", "parse json text"]
  enc = MtebEncoder(embedder, dim=32)
  q_prompt = DEFAULT_PROMPTS["Retrieval-query"]
  want_q = embedder.embed(texts, dim=32, prefix=q_prompt)
  want_d = embedder.embed(texts, dim=32, is_query=False)
  batches = [{"text": texts[:2]}, {"text": texts[2:]}]  # mteb >= 2: a DataLoader of batch dicts
  got = enc.encode(batches, task_metadata=meta("SciFact", "Retrieval"), hf_split="test",
                   hf_subset="default", prompt_type="query", batch_size=2)
  assert got.dtype == np.float32 and got.shape == (3, 32)
  np.testing.assert_allclose(got, want_q, atol=1e-6)
  got_d = enc.encode(batches, task_metadata=meta("SciFact", "Retrieval"), hf_split="test",
                     hf_subset="default", prompt_type="document")
  np.testing.assert_allclose(got_d, want_d, atol=1e-6)
  # mteb 1.x: a list of sentences and a task name (no metadata: no task-type prompt applies to a
  # task mteb does not know).
  old = MtebEncoder(embedder, dim=32, prompts={"MyTask": "my: "})
  np.testing.assert_allclose(old.encode(texts, task_name="MyTask", prompt_type=None),
                             embedder.embed(texts, dim=32, prefix="my: "), atol=1e-6)
  sim = np.asarray(enc.similarity(got, got_d))
  np.testing.assert_allclose(sim, got @ got_d.T, atol=1e-5)
  np.testing.assert_allclose(np.asarray(enc.similarity_pairwise(got, got_d)),
                             np.sum(got * got_d, axis=1), atol=1e-5)


def test_encode_bad_input(embedder):
  enc = MtebEncoder(embedder)
  with pytest.raises(MissingFrontendError, match="no image frontend"):
    enc.encode([{"image": [object()]}], task_metadata=meta("T2I", "Any2AnyRetrieval"))
  with pytest.raises(TypeError, match="not one string"):
    enc.encode("a string", task_metadata=meta("X", "STS"))
  with pytest.raises(ValueError, match="not a trained MRL dim"):
    MtebEncoder(embedder, dim=48)


def test_mteb_evaluate_mock_tasks(embedder):
  mteb = pytest.importorskip("mteb")
  from mteb.mocks.mock_tasks.retrieval import MockRetrievalTask
  from mteb.mocks.mock_tasks.sts import MockSTSTask

  seen = []

  class Spy(MtebEncoder):
    def prompt(self, task_name, task_type, prompt_type):
      p = super().prompt(task_name, task_type, prompt_type)
      seen.append((task_name, mteb_adapter._value(prompt_type), p))
      return p

  enc = Spy(embedder, dim=16, prompts={"Retrieval-query": "stdlib_doc_retrieval", "STS": "sts: "})
  result = mteb.evaluate(enc, [MockRetrievalTask(), MockSTSTask()], cache=None,
                         show_progress_bar=False)
  scores = {r.task_name: r.get_score() for r in result.task_results}
  assert set(scores) == {"MockRetrievalTask", "MockSTSTask"}
  assert all(np.isfinite(v) for v in scores.values())
  assert ("MockRetrievalTask", "query", TRAINED["stdlib_doc_retrieval"]) in seen
  assert ("MockRetrievalTask", "document", "") in seen
  assert any(t == "MockSTSTask" and p == "sts: " for t, _, p in seen)
  meta_ = enc.mteb_model_meta
  assert meta_.embed_dim == 16


def test_command_line_flags(monkeypatch):
  """`python -m embed2.mteb_adapter`: both flags required; without mteb a message says how to
  install it (checked before any checkpoint is read)."""
  with pytest.raises(app.UsageError, match="--tasks must have a value"):
    mteb_adapter.main(["--checkpoint=/nowhere"])
  with pytest.raises(app.UsageError, match="Unknown command line flag 'task'"):
    mteb_adapter.main(["--checkpoint=/nowhere", "--task=SciFact"])
  monkeypatch.setitem(sys.modules, "mteb", None)  # `import mteb` raises ImportError
  with pytest.raises(SystemExit, match="pip install mteb"):
    mteb_adapter.main(["--checkpoint=/nowhere", "--tasks=SciFact", "--dim=16"])
