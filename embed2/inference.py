"""Using a trained model: checkpoint -> `embed(inputs)` -> float32 numpy vectors, and exact search.

  emb = Embedder.from_checkpoint("/tmp/run/checkpoints")
  q_nd = emb.embed(["how do I read a tar file"], task="stdlib_code_search", dim=128)
  d_nd = emb.embed(corpus_texts, is_query=False, dim=128)
  scores_qk, ids_qk = search(q_nd, d_nd, k=10)

Inputs are strings or items (`Text`, `Image`, `Audio`, `Video`), or a list of items for one
interleaved input. They are encoded by the training pipeline's own transforms
(`embed2.data.transforms.PrependTaskString` and `Tokenize`, which hands media to
`embed2.data.interleave.InputEncoder`), so an input gets exactly the token ids and media it would get
in a training batch, and the embedding equals the train step's for the same input and task string.
A modality the model has no frontend for raises `MissingFrontendError`; media that cannot be read
(corrupt or truncated bytes, an unsupported format, empty or NaN audio, a video without frames, an
image over `config.model.media.max_image_pixels`) raises `MediaError` naming the input (`inputs[i]`);
text that is not valid Unicode (a lone surrogate) raises `InvalidTextError` (a ValueError) naming the
input and the character position.

Tokenizer: always the checkpoint's own (`tokenizer.checkpoint_tokenizer`): the file its meta names,
the packaged default only for runs trained on it, and an error when an import carries none or the
file is gone; embed2 never embeds a checkpoint with another tokenizer.

Task strings and prompts, two conventions by where the checkpoint came from:
- embed2-trained (meta `task_strings`): `task=NAME` prepends that task's string to queries, as
  training does; documents get none.
- imported from sentence-transformers (meta `prompts`, from config_sentence_transformers.json): as
  `SentenceTransformer.encode_query` / `encode_document` do, queries get the "query" prompt and
  documents the "document" prompt by default, and `task=NAME` applies prompt NAME to either side
  (sentence-transformers' `prompt_name`). Its `max_seq_length` is the default `max_length`.
`prefix=` is a literal string for either side under both.

Packing: up to `segments` inputs share a row (`packing.RowWriter`: segment ids keep them apart in
attention, positions restart per input, each pools over its own tokens), so a batch of short queries
carries almost no padding; an input's embedding is the same packed or alone (tested to 1e-6). The
model's `max_segments` is parameter-free (the slots pooled per row), so the Embedder pools its own
`segments` whatever the checkpoint was trained with. `segments=1` is one input per row.

Media rows: each row is a pack group of its own, with image / audio-chunk slots for its inputs' media
(the most any row of the call holds, rounded up to a power of two so few shapes compile); the
frontends run slot by slot, so an image's soft tokens are the same alone, interleaved, packed, or next
to any other input.

Batching: inputs are taken longest first (media counts first) and placed first-fit into the rows of a
call: `batch_size` rows of the smallest length bucket that holds the call's longest input (packed: at
least `pack_length` tokens, so short inputs share rows). The default buckets are four per octave (32,
64, 96, 128, 160, ...): a row pads at most a quarter of its tokens, and its attention far less than
with powers of two (documents of 128-512 tokens: 1.9x faster, measured). The last call gets as many rows as it fills,
rounded up to a multiple of batch_size / 4. One function is compiled per (rows, bucket, media slots) shape, and
jax's cache keeps it for every later call with the same shapes (`Embedder.num_compilations` counts
traces).

MRL dims: `embed(..., dim=d)` accepts only the dims the model was trained at (`config.model.mrl_dims`,
plus the full embedding dim). A prefix the loss never saw is a worse embedding with no warning sign,
so asking for one is an error; `truncate(e_nd, dim)` cuts any prefix explicitly if you want one anyway.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from embed2 import checkpoint as ckpt_lib
from embed2 import sharding
from embed2.data import interleave
from embed2.data import packing
from embed2.data import transforms
from embed2.data import segments
from embed2.data.segments import (Audio, Image, MediaError, MissingFrontendError, Text, Video,  # pylint: disable=unused-import
                                  missing_frontend)
from embed2.data import tokenizer as tok_lib
from embed2.data.tokenizer import InvalidTextError, Tokenizer  # pylint: disable=unused-import
from embed2.eval import metrics
from embed2.eval.retrieval import truncate  # re-exported: the public MRL cut
from embed2.model import EmbeddingModel, ModelConfig

OVERFLOW_POLICIES = ("truncate", "error")
# Inputs per row at most, by default (`Embedder(segments=...)`); measured with
# `python -m embed2.bench.vs_peers` (README, Performance): 16 queries of ~14 tokens fill a 128-token
# row where 8 left it 60% full (1.5x on the queries regime).
DEFAULT_SEGMENTS = 16
# Packed rows are at least this long (or max_length), so that short inputs share them.
DEFAULT_PACK_LENGTH = 128


# --------------------------------------------------------------------------------------- helpers


def default_buckets(max_length: int, smallest: int = 32, per_octave: int = 4) -> tuple[int, ...]:
  """Padded lengths below max_length, `per_octave` of them between two powers of two, each a multiple
  of `smallest` (32, 64, 96, 128, 160, 192, 224, 256, 320, 384, ...), then max_length itself.

  Padding costs at most 1 / per_octave of a row's tokens and much less of its attention than powers
  of two alone; the count of shapes grows with log(max_length) (12 up to 512).
  """
  out, b = [], smallest
  while b < max_length:
    out.append(b)
    b += max(smallest, 1 << ((b // per_octave).bit_length() - 1))
  return tuple(out) + (max_length,)


def _model_mesh(model) -> jax.sharding.Mesh | None:
  """The mesh the model's parameters live on, if they are NamedSharding'd."""
  for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
    s = getattr(leaf, "sharding", None)
    if isinstance(s, NamedSharding):
      return s.mesh
  return None


def search(q_qd: np.ndarray, corpus_nd: np.ndarray, k: int, *, mesh=None, chunk: int = 4096
           ) -> tuple[np.ndarray, np.ndarray]:
  """Exact nearest neighbours by dot product (cosine for unit vectors).

  With a mesh, the corpus is split across its devices, each device ranks its shard and the local
  top-k are merged (`metrics.sharded_topk`); without one, a chunked scan on the default device.
  Ties go to the higher corpus index (trec_eval's order; `metrics.rank_topk`).

  Args:
    q_qd: (Q, d) queries.
    corpus_nd: (N, d) corpus.
    k: neighbours per query (clipped to N).
    mesh: optional device mesh.
    chunk: corpus rows scored at a time (per device).

  Returns:
    scores float32 (Q, k'), indices int64 (Q, k'), best first; k' = min(k, N).
  """
  q_qd = np.asarray(q_qd, np.float32)
  corpus_nd = np.asarray(corpus_nd, np.float32)
  if q_qd.ndim != 2 or corpus_nd.ndim != 2 or q_qd.shape[1] != corpus_nd.shape[1]:
    raise ValueError(f"search needs (Q, d) queries and (N, d) corpus with the same d; got "
                     f"{q_qd.shape} and {corpus_nd.shape}")
  if corpus_nd.shape[0] == 0:
    raise ValueError("search: the corpus is empty")
  if q_qd.shape[0] == 0:
    k = min(k, corpus_nd.shape[0])
    return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
  if mesh is not None:
    s, i = metrics.sharded_topk(q_qd, corpus_nd, k, mesh=mesh, chunk=chunk)
  else:
    s, i = metrics.chunked_topk(q_qd, corpus_nd, k=k, chunk=min(chunk, corpus_nd.shape[0]))
  return np.asarray(s, np.float32), np.asarray(i).astype(np.int64)


# -------------------------------------------------------------------------------------- embedder


class Embedder:
  """Embeds batches of inputs with an `EmbeddingModel`, compiled once per length bucket.

  Args:
    model: the model; its parameters are read at every call, so an Embedder built on a model that is
      training sees the current weights (in-training evaluation).
    tokenizer: the tokenizer the model was trained with.
    task_strings: {task name: task string prepended to queries}, as in the checkpoint's meta.
    prompts: sentence-transformers prompts ({name: prompt}); when given (an imported
      sentence-transformers model), queries get prompts["query"] and documents prompts["document"]
      by default, and `task` names a prompt for either side (see the module docstring).
    default_prompt_name: the model's default prompt name, kept for export (sentence-transformers
      applies it only in plain `encode`, which has no counterpart here).
    max_length: tokens per input at most ([bos] + text + [eos]); default the model's max_length.
    batch_size: inputs per compiled call (rounded up to a multiple of the mesh's batch shards).
    buckets: padded lengths to compile for; default `default_buckets(max_length)` (32, 64, 96, 128,
      160, ..., four per octave). Buckets above
      max_length are dropped and max_length is added if missing, so every input fits one.
    mesh: device mesh; default the mesh of the model's parameters (none: the default device).
    on_overflow: "truncate" (cut to max_length, keeping bos and eos, with a warning) or "error"
      (raise ValueError naming the inputs).
    segments: inputs packed into one row at most (1 = one input per row); the embeddings do not
      depend on it, the speed does (see the module docstring).
    pack_length: packed rows are at least this many tokens (clipped to max_length).
  """

  def __init__(self, model: EmbeddingModel, tokenizer: Tokenizer, *,
               task_strings: dict[str, str] | None = None, prompts: dict[str, str] | None = None,
               default_prompt_name: str | None = None, max_length: int | None = None,
               batch_size: int = 32, buckets: Sequence[int] | None = None,
               mesh: jax.sharding.Mesh | None = None, on_overflow: str = "truncate",
               segments: int = DEFAULT_SEGMENTS, pack_length: int = DEFAULT_PACK_LENGTH):
    cfg: ModelConfig = model.cfg
    self.model = model
    self.tokenizer = tokenizer
    self.task_strings = dict(task_strings or {})
    self.prompts = None if prompts is None else dict(prompts)
    self.default_prompt_name = default_prompt_name
    for name, text in {**self.task_strings, **(self.prompts or {})}.items():
      tok_lib.check_text(text, f"task string / prompt {name!r}")
    # Added tokens past the model's rows (Gemma 3's <image_soft_token>) are checked per input.
    base_vocab = getattr(tokenizer, "base_vocab_size", tokenizer.vocab_size)
    if base_vocab > cfg.vocab_size:
      raise ValueError(f"tokenizer has vocab_size={base_vocab} but the model only "
                       f"{cfg.vocab_size} ids; load the tokenizer the model was trained with")
    self.max_length = int(max_length if max_length is not None else cfg.max_length)
    if not 3 <= self.max_length <= cfg.max_length:
      raise ValueError(f"max_length={self.max_length} must be in [3, config.model.max_length="
                       f"{cfg.max_length}] (bos + at least one token + eos)")
    if on_overflow not in OVERFLOW_POLICIES:
      raise ValueError(f"on_overflow={on_overflow!r}; choose one of {OVERFLOW_POLICIES}")
    self.on_overflow = on_overflow
    if buckets is None:
      buckets = default_buckets(self.max_length)
    buckets = sorted({int(b) for b in buckets if 0 < int(b) <= self.max_length})
    if not buckets or buckets[-1] < self.max_length:
      buckets.append(self.max_length)
    self.buckets = tuple(buckets)
    self.mesh = mesh if mesh is not None else _model_mesh(model)
    shards = sharding.num_batch_shards(self.mesh) if self.mesh is not None else 1
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size} must be >= 1")
    self.batch_size = -(-int(batch_size) // shards) * shards
    self._shards = shards
    if not isinstance(segments, (int, np.integer)) or segments < 1:
      raise ValueError(f"segments={segments!r} must be an integer >= 1 (1 = one input per row)")
    self.segments = int(segments)
    self.pack_length = min(int(pack_length), self.max_length) if self.segments > 1 else 1
    self.encoder = interleave.InputEncoder(tokenizer, cfg)
    self._media_shapes = packing.media_shapes(cfg) if len(cfg.media.modalities) > 1 else {}
    self._tokenize = transforms.Tokenize(tokenizer=tokenizer, in_key="text", out_key="tokens",
                                       truncated_key="truncated", max_length=self.max_length,
                                       encoder=self.encoder)
    self._num_traces = 0
    self._graphdef = nnx.graphdef(model)

    # max_segments is parameter-free: the model this Embedder runs pools `segments` slots per row.
    pooled_cfg = cfg.replace(max_segments=self.segments)

    def forward(state, rows):
      self._num_traces += 1  # runs at trace time only: counts compilations
      m = nnx.merge(self._graphdef, state)
      m.cfg = pooled_cfg
      # Each row is a pack group of its own (its media slots are the row's).
      return m.embed_rows(rows, num_groups=rows["tokens"].shape[0])  # (R, S, d)

    if self.mesh is not None:
      self._forward = jax.jit(forward, out_shardings=NamedSharding(self.mesh, P()))
    else:
      self._forward = jax.jit(forward)

  # ------------------------------------------------------------------------------- properties

  @property
  def config(self) -> ModelConfig:
    return self.model.cfg

  @property
  def embed_dim(self) -> int:
    return self.model.cfg.embed_dim

  @property
  def dims(self) -> tuple[int, ...]:
    """The dims `embed` accepts: the trained MRL dims and the full embedding dim, increasing."""
    return tuple(sorted(set(self.model.cfg.resolved_mrl_dims) | {self.embed_dim}))

  @property
  def modalities(self) -> tuple[str, ...]:
    """What this model can read: text, then image / audio / video by its frontends."""
    return self.model.cfg.media.modalities

  @property
  def num_compilations(self) -> int:
    """How many times the forward function was traced (one per new (rows, bucket, slots) shape)."""
    return self._num_traces

  # ----------------------------------------------------------------------------- construction

  @classmethod
  def from_checkpoint(cls, path: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None,
                      dtype: str | None = None, attention_impl: str | None = None, rules=None,
                      **kwargs) -> "Embedder":
    """Loads a checkpoint (a training run's, a soup, an import) for inference.

    Args:
      path: a checkpoints directory (latest step), a step directory, or a workdir.
      mesh: where to place the model; default a data-parallel mesh over all devices.
      dtype: compute dtype override ("float32" / "bfloat16"); parameters stay float32.
      attention_impl: attention kernel override (e.g. "blockwise" for inputs far longer than the run
        trained on: memory linear in the row); None keeps the checkpoint's.
      rules: logical-axis rules; default `sharding.DEFAULT_RULES`.
      **kwargs: the constructor's keyword arguments (max_length, batch_size, buckets, on_overflow,
        segments, pack_length).

    The tokenizer is the checkpoint's own (`tokenizer.checkpoint_tokenizer`); an imported
    sentence-transformers model brings its prompts and its max_seq_length (the default max_length).

    Raises:
      ValueError / FileNotFoundError: the checkpoint names no tokenizer, or its tokenizer is missing.
    """
    directory, step, meta = ckpt_lib.read_checkpoint(path)
    tokenizer = tok_lib.checkpoint_tokenizer(meta, directory)  # before any restore: fail fast
    model, meta = ckpt_lib.load_model(directory / str(step), mesh=mesh, rules=rules, dtype=dtype,
                                      attention_impl=attention_impl)
    cfg = model.cfg
    if meta.get("max_seq_length"):
      kwargs.setdefault("max_length", min(int(meta["max_seq_length"]), cfg.max_length))
    logging.info("Embedder: loaded step %d from %s (tokenizer %s)", step, directory, tokenizer.source)
    return cls(model, tokenizer, task_strings=meta.get("task_strings") or {},
               prompts=meta.get("prompts"), default_prompt_name=meta.get("default_prompt_name"),
               mesh=mesh, **kwargs)

  # -------------------------------------------------------------------------------- tokenize

  def _prefix(self, task: str | None, prefix: str | None, is_query: bool) -> str:
    if task is not None and prefix is not None:
      raise ValueError("give either task (a task name) or prefix (a literal string), not both")
    if prefix is not None:
      if not isinstance(prefix, str):
        raise TypeError(f"prefix must be str, got {type(prefix).__name__}")
      tok_lib.check_text(prefix, "prefix")
      return prefix  # asked for explicitly: applied to queries and documents alike
    if self.prompts is not None:
      # sentence-transformers 6: encode_query uses prompts["query"], encode_document
      # prompts["document"] (both "" when the model has none, which also keeps
      # default_prompt_name out), and prompt_name picks any prompt for either side.
      if task is None:
        return self.prompts.get("query" if is_query else "document", "")
      if task not in self.prompts:
        raise ValueError(f"task={task!r} is not a prompt of this model; its prompts: "
                         f"{sorted(self.prompts)} (or pass task=None for the default query / "
                         "document prompt)")
      return self.prompts[task]
    if task is None or not is_query:
      return ""  # task strings are prepended to queries only, as in training
    if task not in self.task_strings:
      raise ValueError(f"task={task!r} is not a task this model was trained with; known tasks: "
                       f"{sorted(self.task_strings)} (or pass task=None for no task string)")
    return self.task_strings[task]

  def encode(self, inputs: Sequence[Any], *, task: str | None = None, is_query: bool = True,
             prefix: str | None = None) -> list[interleave.Encoded]:
    """Each input exactly as training encodes it: token ids (n <= max_length) and its media.

    Raises:
      TypeError: inputs is not a list, or holds an unsupported type.
      MissingFrontendError: an input needs a frontend this model lacks.
      MediaError: a media item cannot be read (the message names `inputs[i]`).
      InvalidTextError: text that is not valid Unicode (names `inputs[i]` and the position).
      ValueError: an unknown task, or an input too long under on_overflow="error".
    """
    if isinstance(inputs, (str, Text, Image, Audio, Video)) or not isinstance(inputs, Sequence):
      raise TypeError(f"inputs must be a list of inputs, got {type(inputs).__name__}; wrap a single "
                      "input in a list: embed([x])")
    for i, x in enumerate(inputs):
      items = segments.items_of(x, f"inputs[{i}]")
      for j, item in enumerate(items):
        if isinstance(item, (str, Text)):
          tok_lib.check_text(item if isinstance(item, str) else item.text,
                             f"inputs[{i}]" if len(items) == 1 else f"inputs[{i}][{j}]")
      if segments.as_text(x, f"inputs[{i}]") is None:
        self.encoder.check_modalities(x, f"inputs[{i}]")
    task_string = self._prefix(task, prefix, is_query)
    out, overflow, cut = [], [], []
    for i, x in enumerate(inputs):
      # The training pipeline's tokenizing transform, task string in front, as training puts it.
      toks, truncated, media, was_cut = self._tokenize.encode_input(x, f"inputs[{i}]", task_string)
      out.append(interleave.Encoded(tokens=toks, media=tuple(media), truncated=bool(truncated),
                                    cut=was_cut))
      if truncated:
        overflow.append(i)
      if was_cut:
        cut.append(i)
    if cut:
      warnings.warn(f"{len(cut)} of {len(inputs)} inputs (indices {cut[:5]}) hold audio longer than "
                    f"config.model.media.max_audio_chunks={self.config.media.max_audio_chunks} chunks "
                    f"of {self.config.media.audio_chunk_frames} frames; only the first chunks were embedded",
                    stacklevel=2)
    if overflow:
      msg = (f"{len(overflow)} of {len(inputs)} inputs (indices {overflow[:5]}"
             f"{' ...' if len(overflow) > 5 else ''}) are longer than max_length={self.max_length} "
             "tokens")
      if self.on_overflow == "error":
        raise ValueError(msg + "; shorten them, raise max_length, or use on_overflow='truncate'")
      warnings.warn(msg + "; they were truncated (on_overflow='error' refuses them instead)",
                    stacklevel=3)
    return out

  def tokenize(self, inputs: Sequence[Any], *, task: str | None = None, is_query: bool = True,
               prefix: str | None = None) -> list[np.ndarray]:
    """Token ids of each input exactly as training builds them: int32 (n,), n <= max_length.

    Raises: as `encode`.
    """
    return [e.tokens for e in self.encode(inputs, task=task, is_query=is_query, prefix=prefix)]

  # ----------------------------------------------------------------------------------- embed

  def check_dim(self, dim: int | None) -> int:
    if dim is None:
      return self.embed_dim
    if dim not in self.dims:
      raise ValueError(f"dim={dim} is not a trained MRL dim of this model; choose one of {self.dims} "
                       "(or cut any prefix yourself with embed2.inference.truncate)")
    return int(dim)

  def embed_tokens(self, tokens: Sequence[np.ndarray]) -> np.ndarray:
    """Full-dim unit-norm embeddings of tokenized text inputs: float32 (N, d), in input order."""
    return self.embed_encoded([interleave.Encoded(tokens=np.asarray(t), media=(), truncated=False)
                               for t in tokens])

  def embed_encoded(self, encoded: Sequence[interleave.Encoded]) -> np.ndarray:
    """Full-dim unit-norm embeddings of encoded inputs (`encode`): float32 (N, d), in input order."""
    n = len(encoded)
    out_nd = np.zeros((n, self.embed_dim), np.float32)
    if n == 0:
      return out_nd
    lengths = np.asarray([len(e.tokens) for e in encoded])
    if lengths.max() > self.max_length or lengths.min() < 1:
      raise ValueError(f"token sequences must have 1..max_length={self.max_length} ids; got lengths "
                       f"{lengths.min()}..{lengths.max()}")
    vocab = self.config.vocab_size
    for i, e in enumerate(encoded):  # inside jit an id past the table would be clamped silently
      t = np.asarray(e.tokens)
      if t.min() < 0 or t.max() >= vocab:
        bad = int(t.max()) if t.max() >= vocab else int(t.min())
        piece = self.tokenizer.id_to_piece(bad) if 0 <= bad < self.tokenizer.vocab_size else "?"
        raise ValueError(f"inputs[{i}]: token id {bad} ({piece!r}) is outside the model's vocabulary "
                         f"[0, {vocab}); the tokenizer holds ids (e.g. added tokens) the model has no "
                         "rows for")
    state = nnx.state(self.model)
    for length, rows in self.plan(encoded):
      e_rsd = self._run(state, self._rows(encoded, rows, length))
      for r, row in enumerate(rows):
        out_nd[row] = e_rsd[r, :len(row)]
    return out_nd

  def plan(self, encoded: Sequence[interleave.Encoded]) -> list[tuple[int, list[list[int]]]]:
    """The calls that embed `encoded`: [(row length, rows)], each row a list of input indices (its
    segments, at most `segments`, their tokens at most the row length), at most `batch_size` rows.

    Longest first (most images, then audio chunks, then tokens), first fit: the first input of a call
    sets its length bucket, and every later input goes into the first row with room, or a new row
    while the call has fewer than batch_size; otherwise the next call starts.
    """
    lengths = np.asarray([len(e.tokens) for e in encoded])
    n_img = np.asarray([e.count(interleave.IMAGE) for e in encoded])
    n_aud = np.asarray([e.count(interleave.AUDIO) for e in encoded])
    order = np.lexsort((-np.arange(len(encoded)), lengths, n_aud, n_img))[::-1]  # ties: input order
    calls, i, n = [], 0, len(order)
    while i < n:
      need = max(int(lengths[order[i]]), self.pack_length)
      length = next(x for x in self.buckets if x >= need)  # buckets end at max_length
      rows, free = [], []
      while i < n:
        k, nk = int(order[i]), int(lengths[order[i]])
        r = next((r for r in range(len(rows)) if free[r] >= nk and len(rows[r]) < self.segments), -1)
        if r < 0:
          if len(rows) == self.batch_size:
            break
          rows.append([])
          free.append(length)
          r = len(rows) - 1
        rows[r].append(k)
        free[r] -= nk
        i += 1
      calls.append((length, rows))
    return calls

  def _rows(self, encoded: Sequence[interleave.Encoded], rows: Sequence[Sequence[int]], length: int
            ) -> dict[str, np.ndarray]:
    """One call's rows (`length` tokens; batch_size of them, or for a last call that fills fewer, that
    many rounded up to a multiple of batch_size / 4): row r packs inputs rows[r], and is a pack group of its own for
    their media slots (as many as the call's most per row, rounded up to a power of two)."""
    def slots(kind):
      return max(packing.slot_bucket(sum(encoded[k].count(kind) for k in row)) for row in rows)
    images, audio = slots(interleave.IMAGE), slots(interleave.AUDIO)
    step = max(1, self.batch_size // 4)  # few row counts to compile, few empty rows to compute
    num_rows = -(-len(rows) // step) * step
    num_rows = min(self.batch_size, -(-num_rows // self._shards) * self._shards)
    out = packing.RowWriter(num_rows, length, groups=num_rows, images=images, audio=audio,
                            **self._media_shapes)
    for r, row in enumerate(rows):
      start = image_slot = audio_slot = 0
      for seg, k in enumerate(row):
        e = encoded[k]
        out.write(r, start, seg, np.asarray(e.tokens), e.media, group=r, image_slot=image_slot,
                  audio_slot=audio_slot)
        start += len(e.tokens)
        image_slot += e.count(interleave.IMAGE)
        audio_slot += e.count(interleave.AUDIO)
    return out.arrays()

  def _run(self, state, rows: dict[str, np.ndarray]) -> np.ndarray:
    if self.mesh is None:
      return np.asarray(self._forward(state, rows))
    # make_array_from_callback works on any mesh, multi-process included (every process holds the
    # same host batch here); the output is replicated, so every process can read it whole.
    def put(x):
      return jax.make_array_from_callback(x.shape, sharding.batch_sharding(self.mesh, x.ndim),
                                          lambda i: x[i])
    with jax.set_mesh(self.mesh):
      out = self._forward(state, {k: put(v) for k, v in rows.items()})
    return np.asarray(out)

  def embed(self, inputs: Sequence[Any], *, dim: int | None = None, task: str | None = None,
            is_query: bool = True, prefix: str | None = None) -> np.ndarray:
    """Embeds inputs: float32 (N, dim), each row L2-normalised at `dim`.

    Args:
      inputs: a list of str / Text / Image / Audio / Video, or lists of items (one interleaved
        input each). An empty list gives a (0, dim) array.
      dim: an MRL dim the model was trained at (see `dims`); None = the full embedding.
      task: a task name of `task_strings`; its task string is prepended to each query, as in
        training. None = no task string.
      is_query: False for documents / targets: `task` is ignored (training adds no task string to
        them).
      prefix: a literal string prepended to every input (queries or documents), instead of a named
        task's string; e.g. an MTEB prompt.

    Raises:
      TypeError: inputs is not a list, or holds an unsupported type.
      MissingFrontendError: an image / audio / video item the model has no frontend for.
      MediaError: a media item that cannot be read (names the input).
      ValueError: an untrained dim, an unknown task, or (on_overflow="error") a too-long input.
    """
    dim = self.check_dim(dim)
    encoded = self.encode(inputs, task=task, is_query=is_query, prefix=prefix)
    e_nd = self.embed_encoded(encoded)
    return e_nd if dim == self.embed_dim else truncate(e_nd, dim)

