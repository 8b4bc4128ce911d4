"""Stdlib-mined tasks: schema, honest module split, dedup, determinism, counted drops, signal."""
import collections
import json
import textwrap

import numpy as np
import pytest
from absl import app

from data_pipelines import stdlib_tasks, tasks
from embed2.eval import bm25, metrics

KEYS = {"query", "positive", "negatives", "query_id", "positive_id", "group"}


@pytest.fixture(scope="module")
def mined():
  return stdlib_tasks.mine_stdlib()


def test_schema_and_ids(mined):
  for name in stdlib_tasks.TASK_NAMES:
    for split in stdlib_tasks.SPLITS:
      for ex in mined.tasks[name][split]:
        assert set(ex) == KEYS
        assert ex["query_id"] == stdlib_tasks.content_id(ex["query"])
        assert ex["positive_id"] == stdlib_tasks.content_id(ex["positive"])
        assert 0 <= ex["query_id"] < 2**31 and 0 <= ex["positive_id"] < 2**31
        assert ex["positive"] not in ex["negatives"]
        assert all(isinstance(n, str) and n for n in ex["negatives"])
        assert len(ex["query"]) >= 16 and len(ex["positive"]) >= 16


def test_sizes(mined):
  counts = stdlib_tasks.task_counts()
  assert counts["code_search"]["train"] >= 3000 and counts["code_search"]["eval"] >= 200
  assert counts["doc_retrieval"]["train"] >= 1500 and counts["doc_retrieval"]["eval"] >= 100
  assert counts["module_classification"]["train"] >= 1000
  assert counts["module_classification"]["eval"] >= 100


def test_split_is_by_module_and_honest(mined):
  split_of_module = {}
  for name in stdlib_tasks.TASK_NAMES:
    train, eval_ = mined.tasks[name]["train"], mined.tasks[name]["eval"]
    assert not {ex["group"] for ex in train} & {ex["group"] for ex in eval_}
    for split, examples in (("train", train), ("eval", eval_)):
      for ex in examples:
        # One split per module across all tasks: joint training leaks nothing into eval.
        assert split_of_module.setdefault(ex["group"], split) == split
    assert not {ex["query"] for ex in train} & {ex["query"] for ex in eval_}
    pairs = [(ex["query"], ex["positive"]) for ex in train + eval_]
    assert len(pairs) == len(set(pairs))
  eval_share = np.mean([s == "eval" for s in split_of_module.values()])
  assert 0.05 < eval_share < 0.3


def test_stats_account_for_every_example(mined):
  for name in stdlib_tasks.TASK_NAMES:
    c = mined.stats[name]
    assert c["mined"] - c["dropped_duplicate_pair"] - c.get("dropped_eval_overlap_with_train", 0) \
        == c["train"] + c["eval"] == sum(len(v) for v in mined.tasks[name].values())
    assert c["candidates"] - c.get("dropped_short_query", 0) >= c["mined"]
  assert mined.stats["files_found"] > 300 and mined.stats["files_failed"] == 0


def test_main_prints_the_stats(mined, capsys):
  """`python -m data_pipelines.stdlib_tasks`: the mining statistics as JSON, and no arguments."""
  stdlib_tasks.main(["stdlib_tasks"])
  printed = json.loads(capsys.readouterr().out)
  assert printed["code_search"] == mined.stats["code_search"]
  assert printed["files_found"] == mined.stats["files_found"] and "files_failed_paths" not in printed
  with pytest.raises(app.UsageError, match="unexpected arguments"):
    stdlib_tasks.main(["stdlib_tasks", "code_search"])


def test_code_search_positive_is_code_without_docstring(mined):
  for ex in mined.tasks["code_search"]["train"][:500]:
    assert ex["positive"].startswith(("def ", "async def ")), ex["positive"][:80]
    assert ex["query"] not in " ".join(ex["positive"].split())
    assert len(ex["positive"]) <= 600


def test_module_classification_has_few_shared_targets(mined):
  train, eval_ = (mined.tasks["module_classification"][s] for s in stdlib_tasks.SPLITS)
  labels = {ex["positive"] for ex in train}
  assert 10 <= len(labels) <= 20
  assert {ex["positive"] for ex in eval_} <= labels
  assert len(mined.stats["module_classification_families"]) == len(labels)
  # Many queries share one positive: the duplicate mask matters.
  assert collections.Counter(ex["positive_id"] for ex in train).most_common(1)[0][1] >= 50


def test_deterministic_and_copies(mined):
  again = stdlib_tasks._mine_cached.__wrapped__(  # bypass the cache: mine from scratch
      mined.stats["stdlib_dir"], stdlib_tasks.MiningConfig())
  assert again.tasks == mined.tasks
  first = stdlib_tasks.load_task("code_search", "train")
  first[0]["negatives"].append("mutated")
  first[0]["query"] = "mutated"
  assert stdlib_tasks.load_task("code_search", "train")[0] == mined.tasks["code_search"]["train"][0]


def test_task_dict_and_errors():
  assert {"stdlib_code_search", "stdlib_doc_retrieval", "stdlib_module_cls"} <= set(tasks.TASKS)
  assert tasks.build_task("stdlib_doc_retrieval", "eval") == \
      stdlib_tasks.load_task("doc_retrieval", "eval")
  with pytest.raises(ValueError, match="stdlib_code_search"):
    tasks.build_task("code-search", "train")
  with pytest.raises(ValueError, match="split"):
    stdlib_tasks.load_task("code_search", "validation")


def test_mining_rules_on_a_fake_stdlib(tmp_path):
  def write(rel, text):
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))

  body = '''
      def first_function(a, b):
          """Add two numbers together and return the sum."""
          total = a + b
          return total

      class Widget:
          """A widget summary line for the class.

          The body paragraph explains how widgets are made and used.
          """
          def render(self, canvas):
              """Draw the widget onto the given canvas object."""
              canvas.draw(self)
              return canvas

          def short(self):
              """Too short."""
              return 1
      '''
  write("alpha.py", body)
  write("pkg/__init__.py", body.replace("first_function", "second_function"))
  write("broken.py", "def broken(:\n  pass\n")
  for excluded in ("test/test_x.py", "site-packages/thing.py", "idlelib/x.py", "test_y.py",
                   "tkinter/test/test_z.py"):
    write(excluded, body.replace("first_function", "excluded_function"))
  result = stdlib_tasks.mine_stdlib(str(tmp_path), stdlib_tasks.MiningConfig(eval_percent=50))
  assert result.stats["files_found"] == 3 and result.stats["files_failed"] == 1
  code = [ex for s in stdlib_tasks.SPLITS for ex in result.tasks["code_search"][s]]
  assert result.stats["code_search"]["dropped_short_query"] == 2  # "Too short." twice
  # render() is identical in both modules: the first copy (sorted file order) survives the dedup.
  assert result.stats["code_search"]["dropped_duplicate_pair"] == 1
  assert sorted((ex["group"], ex["positive"].split("(")[0]) for ex in code) == [
      ("alpha", "def first_function"), ("alpha", "def render"), ("pkg", "def second_function")]
  render = [ex for ex in code if ex["positive"].startswith("def render")][0]
  # The next function of the module long enough to be a positive (short() is not).
  assert render["negatives"][0].startswith("def first_function")
  docs = [ex for s in stdlib_tasks.SPLITS for ex in result.tasks["doc_retrieval"][s]]
  assert [(ex["query"], ex["positive"]) for ex in docs] == [
      ("A widget summary line for the class.",
       "The body paragraph explains how widgets are made and used.")]


def test_bm25_finds_signal_on_eval(mined):
  """The tasks are learnable: a lexical baseline is far above chance on held-out modules."""
  for name in ("code_search", "doc_retrieval"):
    queries, corpus, rel = metrics.retrieval_problem(mined.tasks[name]["eval"])
    _, idx = bm25.BM25(corpus).topk(queries, 10)
    m = metrics.retrieval_metrics(idx, rel, ks=(1, 10), num_docs=len(corpus))
    assert m["recall@1"] > 10 / len(corpus) and m["recall@10"] > 0.3, (name, m)
