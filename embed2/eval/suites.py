"""Benchmark suites: which data, which tasks, which metrics; and `evaluate_suite` to run one.

  results = evaluate_suite(embedder, "demo")                # {"code_search/ndcg@10/dim_64": ..., ...}
  results = evaluate_suite(embedder, "mscoco", data_dir="/data")

Suites (the `SUITES` dict; each entry's `load` builds its tasks from `data_dir`):

  demo            the offline stdlib eval split (`data_pipelines.stdlib_tasks`): code_search,
                  doc_retrieval, module_classification as retrieval (queries with the task's task
                  string, corpus = the split's positives) plus the BM25 baseline on the same split,
                  and a clustering of module_classification's queries by family (v-measure); and the
                  generated multimodal eval splits (`data_pipelines.media_tasks`): text->image,
                  image->text, audio->text, video->text, interleaved (image + edit)->image and
                  spelled audio->word, R@1/R@10/nDCG@10 with the chance level of R@1. A model
                  without the frontend a task needs skips that task (logged), so text-only models
                  run the demo suite too.
  mscoco          image-text retrieval, both directions, R@1/5/10. Manifest
  flickr30k       `<data_dir>/<suite>/test.jsonl`, one image per line:
                    {"image": "path/relative/to/manifest.jpg", "captions": ["...", ...]}
  msrvtt          video-text retrieval, both directions, nDCG@10 and R@1/5/10. Manifest
  vatex           `<data_dir>/<suite>/test.jsonl`: {"video": "clip.mp4", "captions": [...]}
  mteb_code       MTEB-format (BEIR layout) retrieval tasks under `<data_dir>/<suite>/<Task>/`:
  mteb_retrieval    corpus.jsonl {"_id", "title", "text"}, queries.jsonl {"_id", "text"},
                    qrels/test.tsv (query-id, corpus-id, score; a header line). nDCG@10, R@10, MRR@10.
                  (`python -m embed2.mteb_adapter` runs the official MTEB harness instead.)

`data_dir` may be local or on an object store (`gs://`, `s3://`): manifests, BEIR files and judgments are
read through etils.epath. (The image and video files a manifest names are opened by the media decoders,
which read local paths.)

Image and video suites need the model's image frontend; evaluating them with a model that has none
raises `MissingFrontendError` ("this model has no image frontend") before any data is read.

Keys of the result: "<task>/<metric>/dim_<d>" for each MRL dim, "<task>/<metric>/bm25" for the
lexical baseline, "<task>/recall@1/chance" (the expected R@1 of a random ranking, 1 / corpus size)
for tasks that report it, and "mean/<metric>/dim_<d>" over the
suite's retrieval tasks.

`data_pipelines` is imported only inside the demo suite's loaders: they are the one place this library
reads the offline task data, the way the entry point resolves task names (DESIGN.md: embed2 imports
data_pipelines only where a task name is resolved, so importing embed2 never imports the data side).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import warnings
from typing import Any, Callable, Mapping, Sequence

from absl import logging
from etils import epath

from embed2.eval import bm25 as bm25_lib
from embed2.eval import metrics
from embed2.eval import retrieval
from embed2.data import segments
from embed2.data.segments import Image, Video, missing_frontend
from embed2.data.tokenizer import check_text

DATA_DIR_ENV = "EMBED2_DATA_DIR"

# The demo suite's tasks, each with the config task names whose task string its queries get: the
# first of them the checkpoint's `task_strings` holds (configs/demo.py names its tasks like the
# first; the second is the data_pipelines.tasks.TASKS source name).
DEMO_TASKS = {"code_search": ("code_search", "stdlib_code_search"),
              "doc_retrieval": ("doc_retrieval", "stdlib_doc_retrieval"),
              "module_classification": ("module_cls", "module_classification",
                                        "stdlib_module_cls")}

# The demo suite's generated multimodal tasks: suite task -> (data_pipelines.tasks.TASKS source,
# reversed (corpus = the source's queries), config task names whose task string its queries get).
DEMO_MEDIA_TASKS = {
    "text_to_image": ("shapes_caption", False, ("t2i", "shapes_caption")),
    "image_to_text": ("shapes_caption", True, ("i2t", "shapes_caption_reversed")),
    "audio_to_text": ("tone_description", False, ("a2t", "tone_description")),
    "video_to_text": ("moving_shapes", False, ("v2t", "moving_shapes")),
    "interleaved_to_image": ("image_edit", False, ("edit", "image_edit")),
    "spelled_audio_to_word": ("tone_spelling", False, ("spell", "tone_spelling")),
}

# MTEB(Code, v1): the benchmark's retrieval tasks. The suite runs those found under its folder.
MTEB_CODE_TASKS = ("AppsRetrieval", "COIRCodeSearchNetRetrieval", "CodeEditSearchRetrieval",
                   "CodeFeedbackMT", "CodeFeedbackST", "CodeSearchNetCCRetrieval",
                   "CodeSearchNetRetrieval", "CodeTransOceanContest", "CodeTransOceanDL", "CosQA",
                   "StackOverflowQA", "SyntheticText2SQL")


# ---------------------------------------------------------------------------------------- tasks


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class RetrievalTask:
  """Queries ranked against a corpus.

  Attributes:
    name: key prefix of the results.
    queries: Q inputs (str or inference items).
    corpus: N inputs.
    relevance: per query {corpus index: grade > 0}.
    query_task: config task name(s) whose task string the queries get: the first name the
      model's `task_strings` holds (none held: no task string, logged). None: no task string.
    ks: cut-offs computed.
    report: metric names (keys of `metrics.retrieval_metrics`) kept in the results.
    bm25: also score the BM25 baseline (text tasks).
    chance: also report "recall@1/chance", the R@1 of a random ranking.
  """
  name: str
  queries: Sequence[Any] = dataclasses.field(repr=False)
  corpus: Sequence[Any] = dataclasses.field(repr=False)
  relevance: Sequence[Mapping[int, float]] = dataclasses.field(repr=False)
  query_task: str | tuple[str, ...] | None = None
  ks: tuple[int, ...] = (1, 10)
  report: tuple[str, ...] = retrieval.RETRIEVAL_METRICS
  bm25: bool = False
  chance: bool = False

  @property
  def modalities(self) -> set[str]:
    """What the model must read for this task (from its first query and first document)."""
    out = set()
    for xs in (self.queries, self.corpus):
      if len(xs):
        out |= segments.modalities_of(xs[0])
    return out


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class ClusteringTask:
  """Inputs clustered with k-means (k = number of labels), scored by v-measure."""
  name: str
  inputs: Sequence[Any] = dataclasses.field(repr=False)
  labels: Sequence[Any] = dataclasses.field(repr=False)
  query_task: str | tuple[str, ...] | None = None

  @property
  def modalities(self) -> set[str]:
    return segments.modalities_of(self.inputs[0]) if len(self.inputs) else set()


Task = RetrievalTask | ClusteringTask


@dataclasses.dataclass(frozen=True, kw_only=True)
class Suite:
  """A named set of tasks built from a data folder.

  Attributes:
    name: the suite's name (`--suite=`).
    description: one line for listings.
    modalities: what the model must read (checked before any data is loaded).
    load: data_dir -> tasks (raises FileNotFoundError naming the expected layout).
    skip_unreadable: tasks needing a modality the model cannot read are skipped (logged) instead
      of failing the suite.
  """
  name: str
  description: str
  modalities: tuple[str, ...]
  load: Callable[[epath.Path], list[Task]]
  skip_unreadable: bool = False


# -------------------------------------------------------------------------------------- loaders


def load_demo(data_dir: epath.Path | None = None) -> list[Task]:
  """The offline stdlib eval split (data_dir is unused: the data is mined from this Python)."""
  del data_dir
  from data_pipelines import stdlib_tasks  # the demo's task data: see the module docstring
  tasks: list[Task] = []
  for name, config_task in DEMO_TASKS.items():
    examples = stdlib_tasks.load_task(name, "eval")
    queries, corpus, relevance = metrics.retrieval_problem(examples)
    tasks.append(RetrievalTask(name=name, queries=queries, corpus=corpus, relevance=relevance,
                               query_task=config_task, bm25=True))
    if name == "module_classification":
      first = {}
      for ex in examples:
        first.setdefault(ex["query_id"], ex)
      tasks.append(ClusteringTask(name=f"{name}_clusters", inputs=[e["query"] for e in first.values()],
                                  labels=[e["positive"] for e in first.values()],
                                  query_task=config_task))
  return tasks + load_demo_media()


def load_demo_media() -> list[Task]:
  """The generated multimodal eval splits (`DEMO_MEDIA_TASKS`), built on demand and held out from
  training by content (see data_pipelines.media_tasks)."""
  from data_pipelines import tasks as task_lib  # the demo's task data: see the module docstring
  out: list[Task] = []
  for name, (source, reverse, config_task) in DEMO_MEDIA_TASKS.items():
    examples = task_lib.build_task(source, "eval")
    queries, corpus, relevance = metrics.retrieval_problem(examples)
    if reverse:
      queries, corpus, relevance = metrics.reverse_problem(queries, corpus, relevance)
    out.append(RetrievalTask(name=name, queries=queries, corpus=corpus, relevance=relevance,
                             query_task=config_task, ks=(1, 10),
                             report=("recall@1", "recall@10", "ndcg@10"), chance=True))
  return out


def _open_text(path: epath.Path) -> io.TextIOWrapper:
  """A local or remote file as UTF-8 text with universal newlines, as builtin open reads it locally."""
  return io.TextIOWrapper(path.open("rb"), encoding="utf-8")


def _read_jsonl(path: epath.Path, what: str) -> list[dict]:
  if not path.is_file():
    raise FileNotFoundError(f"no {what} at {path}; see embed2/eval/suites.py for the expected "
                            f"layout, and pass --data_dir (or set ${DATA_DIR_ENV})")
  rows = []
  with _open_text(path) as f:
    for line_no, line in enumerate(f, 1):
      if line.strip():
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{line_no} is not valid JSON ({e})") from None
        row = rows[-1]
        for key, value in (row.items() if isinstance(row, dict) else ()):
          for text in (value if isinstance(value, list) else [value]):
            if isinstance(text, str):  # a JSON \ud800 escape is no text
              check_text(text, f"{path}:{line_no} {key!r}")
  if not rows:
    raise ValueError(f"{path} has no rows")
  return rows


def _media_text_tasks(manifest: epath.Path, key: str, item_type, short: str, *,
                      ks: tuple[int, ...], report: tuple[str, ...]) -> list[Task]:
  """A media-captions manifest -> text-to-media and media-to-text retrieval tasks."""
  rows = _read_jsonl(manifest, f"{key}-text manifest")
  media, captions, t2m, m2t = [], [], [], []
  for i, row in enumerate(rows):
    if key not in row or not row.get("captions"):
      raise ValueError(f"{manifest} row {i} needs {key!r} and a non-empty 'captions' list; got keys "
                       f"{sorted(row)}")
    path = epath.Path(row[key])
    media.append(item_type(path=str(path if path.is_absolute() else manifest.parent / path)))
    mine = {}
    for cap in row["captions"]:
      mine[len(captions)] = 1.0
      t2m.append({i: 1.0})
      captions.append(cap)
    m2t.append(mine)
  return [RetrievalTask(name=f"t2{short}", queries=captions, corpus=media, relevance=t2m, ks=ks,
                        report=report),
          RetrievalTask(name=f"{short}2t", queries=media, corpus=captions, relevance=m2t, ks=ks,
                        report=report)]


def load_image_text(folder: epath.Path, split: str = "test") -> list[Task]:
  """`<folder>/<split>.jsonl` of {"image", "captions"} -> t2i and i2t, R@1/5/10."""
  return _media_text_tasks(epath.Path(folder) / f"{split}.jsonl", "image", Image, "i", ks=(1, 5, 10),
                           report=("recall@1", "recall@5", "recall@10"))


def load_video_text(folder: epath.Path, split: str = "test") -> list[Task]:
  """`<folder>/<split>.jsonl` of {"video", "captions"} -> t2v and v2t, nDCG@10 and R@1/5/10."""
  return _media_text_tasks(epath.Path(folder) / f"{split}.jsonl", "video", Video, "v", ks=(1, 5, 10),
                           report=("ndcg@10", "recall@1", "recall@5", "recall@10"))


def load_beir(folder: epath.Path, *, name: str | None = None, split: str = "test") -> RetrievalTask:
  """One MTEB / BEIR-layout retrieval task. Documents are "title text" (MTEB's joining).

  Only queries with a judged document are kept (BEIR evaluates those only); judgments naming an
  unknown query or document are an error.
  """
  folder = epath.Path(folder)
  corpus_rows = _read_jsonl(folder / "corpus.jsonl", "corpus")
  query_rows = _read_jsonl(folder / "queries.jsonl", "queries")
  qrels_path = folder / "qrels" / f"{split}.tsv"
  if not qrels_path.is_file():
    raise FileNotFoundError(f"no relevance judgments at {qrels_path} (BEIR layout: qrels/{split}.tsv "
                            "with columns query-id, corpus-id, score)")
  doc_col = {str(r["_id"]): i for i, r in enumerate(corpus_rows)}
  corpus = [f"{r.get('title') or ''} {r.get('text') or ''}".strip() for r in corpus_rows]
  query_text = {str(r["_id"]): r["text"] for r in query_rows}
  judged: dict[str, dict[int, float]] = {}
  with _open_text(qrels_path) as f:
    for line_no, line in enumerate(f, 1):
      parts = line.rstrip("\n").split("\t")
      if not line.strip() or (line_no == 1 and parts[0] == "query-id"):
        continue
      if len(parts) < 3:
        raise ValueError(f"{qrels_path}:{line_no} needs 3 tab-separated columns")
      qid, did, score = parts[0], parts[1], float(parts[2])
      if qid not in query_text or did not in doc_col:
        raise ValueError(f"{qrels_path}:{line_no} names query {qid!r} / document {did!r} missing from "
                         "queries.jsonl / corpus.jsonl")
      judged.setdefault(qid, {})[doc_col[did]] = score
  qids = [q for q in query_text if any(g > 0 for g in judged.get(q, {}).values())]
  return RetrievalTask(name=name or folder.name, queries=[query_text[q] for q in qids],
                       corpus=corpus, relevance=[judged[q] for q in qids],
                       report=("ndcg@10", "recall@10", "mrr@10"), bm25=True)


def load_beir_folder(folder: epath.Path, expected: Sequence[str] = ()) -> list[Task]:
  """Every BEIR-layout task folder under `folder` (those holding corpus.jsonl), sorted by name."""
  folder = epath.Path(folder)
  if not folder.is_dir():
    raise FileNotFoundError(f"no folder {folder}; put MTEB retrieval tasks there in the BEIR layout "
                            "(<Task>/corpus.jsonl, queries.jsonl, qrels/test.tsv)")
  found = sorted(p for p in folder.iterdir() if (p / "corpus.jsonl").is_file())
  if not found:
    raise FileNotFoundError(f"{folder} holds no task folder with a corpus.jsonl (BEIR layout)")
  missing = sorted(set(expected) - {p.name for p in found})
  if missing:
    logging.warning("%s: %d of the benchmark's tasks are missing and not scored: %s", folder,
                    len(missing), missing)
  return [load_beir(p) for p in found]


SUITES: dict[str, Suite] = {
    "demo": Suite(name="demo", description="offline stdlib eval split + BM25 baseline, and the "
                  "generated image / audio / video / interleaved tasks", modalities=("text",),
                  load=load_demo, skip_unreadable=True),
    "mscoco": Suite(name="mscoco", description="MSCOCO 5k test image-text retrieval, R@1/5/10",
                    modalities=("text", "image"), load=lambda d: load_image_text(d / "mscoco")),
    "flickr30k": Suite(name="flickr30k", description="Flickr30k 1k test image-text retrieval",
                       modalities=("text", "image"), load=lambda d: load_image_text(d / "flickr30k")),
    "msrvtt": Suite(name="msrvtt", description="MSR-VTT video-text retrieval, nDCG@10",
                    modalities=("text", "video"), load=lambda d: load_video_text(d / "msrvtt")),
    "vatex": Suite(name="vatex", description="Vatex video-text retrieval, nDCG@10",
                   modalities=("text", "video"), load=lambda d: load_video_text(d / "vatex")),
    "mteb_code": Suite(name="mteb_code", description="MTEB(Code) retrieval tasks, nDCG@10",
                       modalities=("text",),
                       load=lambda d: load_beir_folder(d / "mteb_code", MTEB_CODE_TASKS)),
    "mteb_retrieval": Suite(name="mteb_retrieval", description="MTEB retrieval tasks, nDCG@10",
                            modalities=("text",),
                            load=lambda d: load_beir_folder(d / "mteb_retrieval")),
}


def full_dim_keys(keys, metric: str = "ndcg@10") -> list[str]:
  """The result keys ("...<task>/<metric>/dim_<d>") of `metric` at the largest dim among them, sorted
  (the one column a table or a log line shows per task)."""
  keys = sorted({k for k in keys if f"/{metric}/dim_" in k})
  if not keys:
    return []
  top = max(int(k.rsplit("dim_", 1)[1]) for k in keys)
  return [k for k in keys if k.endswith(f"/dim_{top}")]


def get_suite(suite: str | Suite) -> Suite:
  if isinstance(suite, Suite):
    return suite
  if suite not in SUITES:
    raise ValueError(f"unknown suite {suite!r}; known suites: {sorted(SUITES)}")
  return SUITES[suite]


def default_data_dir() -> epath.Path:
  return epath.Path(os.environ.get(DATA_DIR_ENV, "~/embed2_data")).expanduser()


@functools.lru_cache(maxsize=16)
def _load_cached(suite: Suite, data_dir: epath.Path) -> tuple[Task, ...]:
  return tuple(suite.load(data_dir))


def load_suite(suite: str | Suite, data_dir: str | os.PathLike | None = None) -> tuple[Task, ...]:
  """The suite's tasks (cached per process: in-training evaluation reads the data once)."""
  suite = get_suite(suite)
  return _load_cached(suite, epath.Path(data_dir).expanduser() if data_dir else default_data_dir())


# ------------------------------------------------------------------------------------ evaluation


@functools.lru_cache(maxsize=64)
def _bm25_results(task: RetrievalTask) -> dict[str, float]:
  """The BM25 baseline of a text task (cached: it does not change while the model trains)."""
  index = bm25_lib.BM25(task.corpus)
  _, ranked = index.topk(task.queries, max(task.ks))
  m = metrics.retrieval_metrics(ranked, task.relevance, task.ks, num_docs=len(task.corpus))
  return {f"{task.name}/{k}/bm25": float(m[k]) for k in task.report}


_warned: set[tuple[str, ...]] = set()


def _task_kwargs(embedder, query_task: str | tuple[str, ...] | None) -> dict[str, Any]:
  """embed() kwargs for a suite's queries; a task the model was not trained with gets no string."""
  if query_task is None:
    return {"task": None}
  names = (query_task,) if isinstance(query_task, str) else tuple(query_task)
  for name in names:
    if name in embedder.task_strings:
      return {"task": name}
  if names not in _warned:
    _warned.add(names)
    logging.warning("the model has no task string for any of %s (known: %s); those queries are "
                    "embedded without one", names, sorted(embedder.task_strings))
  return {"task": None}


def _embed_quietly(embedder, inputs, **kw):
  """embed(), with inputs longer than the model's max_length cut as usual but logged once, not
  warned at every in-training evaluation."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.filterwarnings("always", message=".*longer than max_length", category=UserWarning)
    out = embedder.embed(inputs, **kw)
  for w in caught:
    if "longer than max_length" in str(w.message):
      logging.log_first_n(logging.INFO, "evaluation: %s", 5, w.message)
    else:
      warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
  return out


def evaluate_suite(embedder, suite: str | Suite, dims: Sequence[int] | None = None, *,
                   data_dir: str | os.PathLike | None = None, bm25: bool = True,
                   mesh=None) -> dict[str, float]:
  """Runs every task of a suite at each MRL dim (one embedding pass per task).

  Args:
    embedder: an `embed2.inference.Embedder`.
    suite: a name of `SUITES` or a Suite.
    dims: MRL dims to report; default all the model's trained dims (`embedder.dims`).
    data_dir: where the suite's data lives (default $EMBED2_DATA_DIR or ~/embed2_data).
    bm25: add the BM25 baseline for the tasks that define one.
    mesh: rank with the corpus sharded over this mesh; default the embedder's.

  Returns:
    flat {"<task>/<metric>/dim_<d>": float, "<task>/<metric>/bm25": float,
          "mean/<metric>/dim_<d>": float}.

  Raises:
    MissingFrontendError: the suite needs a modality the model cannot read.
    FileNotFoundError: the suite's data is not under data_dir (the message gives the layout).
  """
  suite = get_suite(suite)
  for modality in suite.modalities:
    if modality not in embedder.modalities:
      raise missing_frontend(modality)
  dims = tuple(embedder.dims if dims is None else dims)
  bad = [d for d in dims if d not in embedder.dims]
  if bad:
    raise ValueError(f"dims {bad} are not trained MRL dims of this model; choose from "
                     f"{embedder.dims}")
  mesh = embedder.mesh if mesh is None else mesh
  tasks = load_suite(suite, data_dir)
  out: dict[str, float] = {}
  retrieval_names = []
  for task in tasks:
    missing = sorted(task.modalities - set(embedder.modalities))
    if missing:
      if not suite.skip_unreadable:
        raise missing_frontend(missing[0])
      logging.log_first_n(logging.INFO, "suite %s: task %s skipped, the model reads no %s", 20,
                          suite.name, task.name, "/".join(missing))
      continue
    kw = _task_kwargs(embedder, task.query_task)
    if isinstance(task, RetrievalTask):
      q_qd = _embed_quietly(embedder, task.queries, is_query=True, **kw)
      c_nd = _embed_quietly(embedder, task.corpus, is_query=False)
      res = retrieval.retrieval_sweep(q_qd, c_nd, task.relevance, dims=dims, ks=task.ks,
                                      names=task.report, mesh=mesh)
      out.update({f"{task.name}/{k}": v for k, v in res.items()})
      if task.chance:
        # A random ranking puts each of a query's r relevant documents first with chance 1/N, so
        # its expected recall@1 = (r / N) / r = 1 / N whatever r is.
        out[f"{task.name}/recall@1/chance"] = 1.0 / len(task.corpus)
      retrieval_names.append(task.name)
      if bm25 and task.bm25:
        out.update(_bm25_results(task))
    else:
      e_nd = _embed_quietly(embedder, task.inputs, is_query=True, **kw)
      res = retrieval.clustering_v_measure(e_nd, task.labels, dims=dims)
      out.update({f"{task.name}/{k}": v for k, v in res.items()})
  if len(retrieval_names) > 1:
    out.update(retrieval.mean_over_tasks(
        {k: v for k, v in out.items() if not k.endswith("/bm25")}, retrieval_names))
  return out
