"""An embed2 checkpoint as an `mteb` encoder, so the official MTEB benchmarks can run on it.

  import mteb
  from embed2.mteb_adapter import MtebEncoder
  encoder = MtebEncoder.from_checkpoint("/tmp/run/checkpoints", dim=256)
  results = mteb.evaluate(encoder, mteb.get_tasks(tasks=["SciFact", "STS12"]))

  python -m embed2.mteb_adapter --checkpoint=DIR --tasks=SciFact,STS12 [--dim=256]

`mteb` is optional (`pip install mteb`; it downloads the task data from the Hugging Face hub, so it
needs the network). This module imports it only when asked to. `encode` accepts both interfaces:

  mteb >= 2: encode(inputs: DataLoader of {"text": [...]} batches, *, task_metadata, hf_split,
             hf_subset, prompt_type=None, **kwargs)
  mteb 1.x:  encode(sentences: list[str], *, task_name, prompt_type=None, **kwargs)

Task-aware prompts: the prompt of an input is looked up in `prompts` in mteb's order of priority,
the first key present wins:
  "<task name>-<prompt type>", "<task name>", "<task type>-<prompt type>", "<task type>",
  "<prompt type>"
(prompt type "query" or "document"; task type e.g. "Retrieval", "STS", "Clustering"). A prompt
value that names a task the checkpoint was trained with (a key of its `task_strings`) is replaced by
that task's string, so `prompts={"Retrieval-query": "stdlib_doc_retrieval"}` reuses a training
prompt verbatim. The defaults (`DEFAULT_PROMPTS`) are EmbeddingGemma's query prompts and no document
prompt, because embed2 trains with task strings on queries only; `EMBEDDINGGEMMA_PROMPTS` adds its
document prompt, for a checkpoint imported from EmbeddingGemma.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from absl import flags

from embed2 import checkpoint as ckpt_lib
from embed2 import cli
from embed2.data.segments import missing_frontend
from embed2.inference import Embedder

# EmbeddingGemma's prompts (its sentence-transformers config), queries and symmetric tasks.
_GEMMA_QUERY_PROMPTS = {
    "query": "task: search result | query: ",
    "BitextMining": "task: search result | query: ",
    "Clustering": "task: clustering | query: ",
    "Classification": "task: classification | query: ",
    "MultilabelClassification": "task: classification | query: ",
    "PairClassification": "task: sentence similarity | query: ",
    "STS": "task: sentence similarity | query: ",
    "Summarization": "task: summarization | query: ",
    "Reranking-query": "task: search result | query: ",
    "Retrieval-query": "task: search result | query: ",
    "InstructionRetrieval-query": "task: code retrieval | query: ",
}
DEFAULT_PROMPTS: dict[str, str] = dict(_GEMMA_QUERY_PROMPTS)
EMBEDDINGGEMMA_PROMPTS: dict[str, str] = dict(_GEMMA_QUERY_PROMPTS, document="title: none | text: ")


def _value(x) -> str | None:
  """PromptType enum / str / None -> its string value."""
  if x is None:
    return None
  return str(getattr(x, "value", x))


def _texts(inputs: Any) -> list[str]:
  """A list of strings, or an iterable of mteb batch dicts ({"text": [...]}) -> the texts."""
  if isinstance(inputs, str):
    raise TypeError("encode takes a list of texts (or an mteb DataLoader), not one string")
  out: list[str] = []
  for item in inputs:
    if isinstance(item, str):
      out.append(item)
    elif isinstance(item, Mapping):
      if "text" not in item:
        media = [k for k in ("image", "audio", "video") if k in item]
        if media:
          raise missing_frontend(media[0])
        raise ValueError(f"mteb batch has no 'text' column (columns: {sorted(item)})")
      out.extend(str(t) for t in item["text"])
    else:
      raise TypeError(f"cannot encode an input of type {type(item).__name__}; expected str or an "
                      "mteb batch dict with a 'text' column")
  return out


def _task_type(task_name: str | None) -> str | None:
  """The MTEB task type of a task name (mteb's own metadata; None if mteb does not know it)."""
  if not task_name:
    return None
  try:
    import mteb  # optional dependency: task types come from its metadata
    return mteb.get_task(task_name).metadata.type
  except Exception:  # mteb missing, or an unknown / custom task: task-type prompts do not apply
    return None


class MtebEncoder:
  """Implements mteb's encoder protocol on an `embed2.inference.Embedder`.

  Args:
    embedder: the Embedder.
    dim: MRL dim of the vectors (a trained dim); None = the full embedding.
    prompts: prompt table (see the module docstring); None = DEFAULT_PROMPTS, {} = no prompts.
    name: model name reported to mteb (results are filed under it).
    revision: model revision reported to mteb (e.g. the checkpoint step).
  """

  def __init__(self, embedder, *, dim: int | None = None, prompts: Mapping[str, str] | None = None,
               name: str = "embed2/model", revision: str = "0"):
    self.embedder = embedder
    self.dim = embedder.check_dim(dim)
    self.prompts = dict(DEFAULT_PROMPTS if prompts is None else prompts)
    self.name = name
    self.revision = str(revision)

  @classmethod
  def from_checkpoint(cls, path: str, *, dim: int | None = None,
                      prompts: Mapping[str, str] | None = None, **embedder_kwargs) -> "MtebEncoder":
    directory, step = ckpt_lib.resolve_checkpoint_path(path)
    embedder = Embedder.from_checkpoint(path, **embedder_kwargs)
    return cls(embedder, dim=dim, prompts=prompts, name=f"embed2/{directory.parent.name or 'model'}",
               revision=str(step))

  # ------------------------------------------------------------------------------------- prompts

  def prompt(self, task_name: str | None, task_type: str | None, prompt_type: Any) -> str:
    """The string prepended to inputs of this task and side ("" if no key matches)."""
    p = _value(prompt_type)
    keys = []
    if task_name and p:
      keys.append(f"{task_name}-{p}")
    if task_name:
      keys.append(task_name)
    if task_type and p:
      keys.append(f"{task_type}-{p}")
    if task_type:
      keys.append(task_type)
    if p:
      keys.append(p)
    for key in keys:
      if key in self.prompts:
        value = self.prompts[key]
        return self.embedder.task_strings.get(value, value)
    return ""

  # -------------------------------------------------------------------------------------- encode

  def encode(self, inputs: Iterable[Any], *, task_metadata: Any = None, hf_split: str | None = None,
             hf_subset: str | None = None, prompt_type: Any = None, task_name: str | None = None,
             **kwargs) -> np.ndarray:
    """Embeds texts: float32 (N, dim), unit norm. See the module docstring for both interfaces."""
    del hf_split, hf_subset, kwargs  # batch_size, show_progress_bar, ...: the Embedder batches
    if task_metadata is not None:
      task_name = task_name or getattr(task_metadata, "name", None)
      task_type = getattr(task_metadata, "type", None)
    else:
      task_type = _task_type(task_name)
    texts = _texts(inputs)
    prefix = self.prompt(task_name, task_type, prompt_type)
    return self.embedder.embed(texts, dim=self.dim, prefix=prefix)

  def similarity(self, embeddings1, embeddings2):
    """Cosine similarity matrix (Q, N) (a torch tensor when mteb is installed, as it expects)."""
    try:
      from mteb.similarity_functions import cos_sim  # optional dependency (mteb >= 2 asks for it)
    except ImportError:
      a = np.asarray(embeddings1, np.float32)
      b = np.asarray(embeddings2, np.float32)
      a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
      b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
      return np.atleast_2d(a) @ np.atleast_2d(b).T
    return cos_sim(embeddings1, embeddings2)

  def similarity_pairwise(self, embeddings1, embeddings2):
    """Cosine similarity of each pair (N,)."""
    try:
      from mteb.similarity_functions import pairwise_cos_sim  # optional dependency (mteb >= 2 asks for it)
    except ImportError:
      a = np.asarray(embeddings1, np.float32)
      b = np.asarray(embeddings2, np.float32)
      num = np.sum(a * b, axis=-1)
      return num / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)
    return pairwise_cos_sim(embeddings1, embeddings2)

  @property
  def mteb_model_meta(self):
    """mteb's ModelMeta for this checkpoint (None when mteb is not installed)."""
    try:
      from mteb.models import ModelMeta  # optional dependency (mteb >= 2 asks for it)
    except ImportError:
      return None
    try:
      return ModelMeta.create_empty(overwrites=dict(
          name=self.name, revision=self.revision, embed_dim=self.dim,
          max_tokens=self.embedder.max_length, similarity_fn_name="cosine",
          framework=["JAX"], use_instructions=bool(self.prompts), open_weights=True))
    except Exception:  # another mteb version's validation: an empty meta still runs
      return ModelMeta.create_empty()


FLAGS = flags.FlagValues()  # this program's own flags (embed2/cli.py says why)
flags.DEFINE_string("checkpoint", None, "checkpoints dir, step dir or workdir", flag_values=FLAGS)
flags.DEFINE_string("tasks", None, "comma-separated MTEB task names", flag_values=FLAGS)
flags.DEFINE_integer("dim", 0, "MRL dim; 0 = the full embedding", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 32, "inputs per forward pass", flag_values=FLAGS)
flags.DEFINE_string("out", "", "mteb results cache folder", flag_values=FLAGS)
flags.mark_flags_as_required(["checkpoint", "tasks"], flag_values=FLAGS)


def main(argv: Sequence[str]) -> dict:
  """Runs MTEB tasks on an embed2 checkpoint (needs mteb): the command line `argv` (after the program
  name) -> {task name: main score}."""
  args = cli.parse(FLAGS, argv)
  try:
    import mteb  # optional dependency, needed by this command only
  except ImportError:
    raise SystemExit("this command needs the mteb package: pip install mteb") from None
  encoder = MtebEncoder.from_checkpoint(args.checkpoint, dim=args.dim or None,
                                        batch_size=args.batch_size)
  tasks = mteb.get_tasks(tasks=[t.strip() for t in args.tasks.split(",") if t.strip()])
  kw = {"cache": mteb.ResultCache(args.out)} if args.out else {}
  result = mteb.evaluate(encoder, tasks, **kw)
  scores = {r.task_name: r.get_score() for r in result.task_results}
  print(json.dumps(scores, indent=1))
  return scores


if __name__ == "__main__":
  cli.run(main, FLAGS)
