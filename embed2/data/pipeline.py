"""Per-task batch builders: examples -> tokenized tuples -> packed group batches.

One stage iterator yields one train step's process-local batch per `next()` (the
contract is in `embed2.data.packing`). Build one with `build_pft_iterator` (every
group's batch mixes tasks at fixed rates, one shape for the stage) or
`build_ft_iterator` (each step's batch comes from ONE task, picked by `TaskSampler`;
every task has its own shape and batch size).

Data flow for one task (all lazy grain MapDatasets, random access):

  examples (list / any __len__+__getitem__ / grain MapDataset)
    EpochShuffleMapDataset(seed_t)   repeated, a new permutation every epoch
    .random_map(PrependTaskString)   task string kept with prob 1 - p_drop
    .map(Tokenize) x 3 sides         [bos] + ids + [eos] (the tokenizer's frame),
                                     truncated to the side's L; media /
                                     interleaved sides through an
                                     `interleave.InputEncoder` (decode, soft-token
                                     placeholders); an undecodable record (bad
                                     media, or text that is not valid Unicode) is
                                     marked skipped, counted by the packer
    [g::G]                           group g's share of the stream
    (PFT: MapDataset.mix over tasks with the rates, per group)
    PackedGroupIterDataset           -> one group batch per next()

Groups are the unit of determinism: group g reads stream elements g, g+G, g+2G, ...
and packs them alone, whatever process builds it. A process builds groups
[process_index * G_local, (process_index + 1) * G_local) only (or the groups given
as `local_groups`), so it reads only its shard, and 1 process x 4 groups gives the
same global batch as 2 processes x 2 groups (concatenate the local batches in
process order). Exception: when rows (or, for a multimodal model, media slots)
are left for the pipeline to suggest, every process encodes the same sample of
ROWS_SAMPLE_SIZE tuples of each task at build time (media decoded too), so that
all processes agree on the shapes; a sample mostly undecodable is an error.

Checkpointing: `get_state()` is a JSON-serialisable dict (step, per-stream per-group
read position and held-over indices, and a fingerprint of the set-up);
`set_state()` restores exactly. Held-over tuples are stored as stream indices and
re-read on restore.

Workers (`workers=N` in the builders; `config.data_workers` in the trainer): 0
computes every stream element (tokenize, media decode) in the calling thread when
the packer reads it. N > 0 starts a pool of N decode threads shared by the stage
(`embed2.data.readahead`): each local group's next elements are computed ahead of
its packer, which takes them strictly in index order, and one background thread
assembles the next batch while the caller trains on this one. Elements are pure
functions of their index, so the batches are the same for every N, 0 included:
the state records N (`num_workers`, informational only) and a state saved with N
workers restores exactly with M; the state is that of the batches handed out,
never of one prefetched and not yet taken. Threads, not processes: the decoders
release the GIL (see `readahead`). `close()` stops the threads (the trainer closes
each stage's iterator when the stage ends); an unclosed iterator's threads are
daemons, stopped at exit or when it is garbage collected.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import threading
import weakref
import zlib
from typing import Any, Callable, Sequence

import grain
import numpy as np

from embed2.data import packing
from embed2.data import readahead
from embed2.data import transforms
from embed2.data.packing import GroupShape, SideShape

STATE_VERSION = 1
# Examples tokenized to suggest rows when a BatchSpec leaves them unset (a task
# with fewer examples uses all of them). Heavy-tailed lengths make the sample mean
# uncertain by ~CV / sqrt(n) (~3% here), which moves the fill by as much.
ROWS_SAMPLE_SIZE = 1024


# ------------------------------------------------------------------------ specs


@dataclasses.dataclass(frozen=True, kw_only=True)
class BatchSpec:
  """Static batch shape of a task (FT) or of a whole stage (PFT).

  Counts are global (over all G groups); each must be divisible by G.

  Attributes:
    batch_size: B, examples per step.
    query_len: L of the query side (task string, bos and eos included).
    positive_len: L of the positive side.
    negative_len: L of the negative side (used iff num_negatives > 0).
    num_negatives: K, hard negatives per example.
    segments: S, examples per row at most.
    query_rows: R of the query side; None: suggested from a sample of lengths.
    positive_rows: R of the positive side; None: suggested.
    negative_rows: R of the negative side; None: suggested.
    rows_slack: `packing.suggest_rows` slack used when rows are suggested.
    rows_multiple: suggested rows per group are rounded up to a multiple of this (a
      GradCache stage cuts every group's rows into `grad_cache_chunks` equal pieces).
    media_slack: capacity over the expected count of suggested media slots. An
      unused slot costs a frontend call on a blank input but no row tokens, while a
      used-up slot pool keeps every further tuple with that medium out of the batch
      and leaves rows empty; 1.1 keeps the pools from binding before the rows do
      (the demo's PFT mixture over 140 batches with the lookahead window: 94.4% -> 95.1%
      non-pad tokens).
    max_misses: `packing.GroupShape.max_misses`.
    lookahead: `packing.GroupShape.lookahead`: tuples the packer chooses from at
      each pick to keep every side's rows full (0: strictly in stream order); None:
      B_g (the examples per group), at most 64. Each group holds up to lookahead +
      max_misses tuples read ahead (their indices are in the iterator state).
    query_images, positive_images, negative_images: image slots of each side
      (video frames count as images); None: suggested from the sample (0 when
      the sample has no images on that side).
    query_audio, positive_audio, negative_audio: audio-chunk slots, likewise.
  """

  batch_size: int
  query_len: int
  positive_len: int
  negative_len: int = 0
  num_negatives: int = 0
  segments: int = 16
  query_rows: int | None = None
  positive_rows: int | None = None
  negative_rows: int | None = None
  rows_slack: float = 1.0
  rows_multiple: int = 1
  media_slack: float = 1.1
  max_misses: int = 64
  lookahead: int | None = None
  query_images: int | None = None
  positive_images: int | None = None
  negative_images: int | None = None
  query_audio: int | None = None
  positive_audio: int | None = None
  negative_audio: int | None = None


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class TaskSpec:
  """One task of a stage.

  Attributes:
    name: unique within the stage; names the task's state and errors.
    examples: example dicts ({"query", "positive", "negatives", "query_id",
      "positive_id", ...}); a list, any object with __len__/__getitem__, or a
      grain.MapDataset.
    rate: sampling rate (relative; PFT: share of examples, FT: share of steps).
    task_string: prepended to the query as is (include the separator, e.g.
      "task: search result | query: ").
    p_drop: probability of dropping the task string for an example.
    batch: the task's batch shape (FT); PFT uses the stage's BatchSpec instead.
  """

  name: str
  examples: Any = dataclasses.field(repr=False)
  rate: float = 1.0
  task_string: str = ""
  p_drop: float = 0.0
  batch: BatchSpec | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskSampler:
  """Picks the task of each FT step, i.i.d. with probabilities ~ rates.

  The choice is a pure function of (seed, step), so every process picks the same
  task for the same step and a restored run continues the same sequence.
  """

  rates: tuple[float, ...]
  seed: int

  def __post_init__(self):
    _check_rates(self.rates, [f"task {i}" for i in range(len(self.rates))])

  @property
  def probabilities(self) -> np.ndarray:
    r = np.asarray(self.rates, np.float64)
    return r / r.sum()

  def task_at(self, step: int) -> int:
    """Index into `rates` of the task of train step `step`."""
    u = np.random.default_rng([self.seed, step, 0x5A3B]).random()
    cdf = np.cumsum(self.probabilities)
    i = int(np.searchsorted(cdf, u, side="right"))
    i = min(i, len(cdf) - 1)
    # u can land on a zero-rate task only through float round-off at the end.
    while self.rates[i] <= 0:
      i -= 1
    return i


def _check_rates(rates: Sequence[float], names: Sequence[str]):
  for name, r in zip(names, rates):
    if not np.isfinite(r) or r < 0:
      raise ValueError(f"{name}: rate={r} must be finite and >= 0; fix the "
                       "task's rate in the stage config.")
  if not any(r > 0 for r in rates):
    raise ValueError(f"all task rates are zero ({list(zip(names, rates))}); "
                     "give at least one task a rate > 0.")


# ------------------------------------------------------------------- shuffling


class EpochShuffleMapDataset(grain.MapDataset):
  """The parent repeated forever, each epoch in a fresh permutation.

  Like `.shuffle(seed).repeat()`, but grain's per-index Feistel shuffle costs
  ~0.7 ms per read on small datasets (tens of examples; FT has such tasks), so up
  to `_PERM_CACHE_MAX` examples the epoch's permutation is drawn once with numpy
  and cached (the last few epochs; groups of a process read about the same epoch).
  Larger datasets use grain's index_shuffle (~5 us per read there, no memory).
  Thread-safe (decode workers read one stream concurrently).
  """

  _PERM_CACHE_MAX = 1 << 22
  _EPOCHS_CACHED = 3

  def __init__(self, parent: grain.MapDataset, *, seed: int):
    super().__init__(parent)
    self._n = len(parent)
    self._seed = int(seed)
    self._perms: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return sys.maxsize

  def __str__(self) -> str:
    return f"EpochShuffleMapDataset(n={self._n}, seed={self._seed})"

  def _index(self, index: int) -> int:
    epoch, i = divmod(int(index), self._n)
    if self._n > self._PERM_CACHE_MAX:
      return grain.experimental.index_shuffle(
          i, max_index=self._n - 1, seed=(self._seed + epoch) % 2**32, rounds=4)
    with self._lock:
      perm = self._perms.get(epoch)
      if perm is None:
        rng = np.random.default_rng([self._seed, epoch])
        perm = rng.permutation(self._n).astype(np.int32)
        self._perms[epoch] = perm
        for old in sorted(self._perms)[:-self._EPOCHS_CACHED]:
          del self._perms[old]
    return int(perm[i])

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._index(index)]


# ---------------------------------------------------------------- group packing


class PackedGroupIterDataset(grain.IterDataset):
  """One pack group's batches from a random-access stream of tokenized tuples.

  With a `pool`, the stream's next `depth` elements are computed on it ahead of the
  packer (`readahead.Window`); the batches are the same.
  """

  def __init__(self, parent: grain.MapDataset, shape: GroupShape,
               pool: readahead.DecodePool | None = None, depth: int = 0):
    super().__init__(parent)
    self._stream = parent
    self._shape = shape
    self._pool = pool
    self._depth = depth

  def __iter__(self) -> "PackedGroupIterator":
    window = (None if self._pool is None else
              readahead.Window(self._pool, self._stream, self._depth))
    return PackedGroupIterator(self._stream, self._shape, window)

  def __str__(self) -> str:
    return f"PackedGroupIterDataset(examples={self._shape.examples})"


class PackedGroupIterator(grain.DatasetIterator):
  """Iterator of `PackedGroupIterDataset`; state = read position + held indices.

  `window` (optional): reads stream[next_index], stream[next_index + 1], ... ahead
  on a decode pool; the packer takes them in the same order as without it.
  """

  def __init__(self, stream: grain.MapDataset, shape: GroupShape,
               window: readahead.Window | None = None):
    super().__init__()
    self._stream = stream
    self._shape = shape
    self._window = window
    self._next_index = 0
    self._held: list[packing.Item] = []

  def prime(self) -> None:
    """Starts computing the next elements on the pool (no-op without one)."""
    if self._window is not None:
      self._window.fill()

  def _pull(self) -> packing.Item:
    i = self._next_index
    self._next_index += 1
    if self._window is None:
      return i, self._stream[i]
    return i, self._window.take(i)

  def __next__(self) -> dict[str, np.ndarray]:
    batch, self._held = packing.pack_group(self._shape, self._held, self._pull)
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"next_index": self._next_index,
            "held": [int(i) for i, _ in self._held]}

  def set_state(self, state: dict[str, Any]):
    self._next_index = int(state["next_index"])
    held = [int(i) for i in state["held"]]
    if self._window is None:
      self._held = [(i, self._stream[i]) for i in held]
    else:
      self._window.reset(self._next_index)
      self._held = list(zip(held, self._window.read(held)))


# ----------------------------------------------------------------------- stages


def _task_seed(seed: int, name: str, purpose: int) -> int:
  """A 32-bit seed per (stage seed, task name, purpose); stable if tasks change."""
  ss = np.random.SeedSequence([seed, zlib.crc32(name.encode()), purpose])
  return int(ss.generate_state(1)[0])


def _source(task: TaskSpec) -> grain.MapDataset:
  ex = task.examples
  ds = ex if isinstance(ex, grain.MapDataset) else grain.MapDataset.source(ex)
  if len(ds) == 0:
    raise ValueError(f"task {task.name!r} has no examples; check its data "
                     "source or remove the task from the stage.")
  return ds


def _task_stream(task: TaskSpec, task_index: int, spec: BatchSpec, tokenizer,
                 seed: int, encoder=None) -> grain.MapDataset:
  """The task's infinite stream of tokenized tuples (before group slicing)."""
  ds = EpochShuffleMapDataset(_source(task), seed=_task_seed(seed, task.name, 0))
  ds = ds.random_map(transforms.PrependTaskString(task_string=task.task_string,
                                       p_drop=task.p_drop),
                     seed=_task_seed(seed, task.name, 1))
  common = dict(tokenizer=tokenizer, encoder=encoder, where=f"task {task.name!r}")
  ds = ds.map(transforms.Tokenize(in_key="query", out_key="query_tokens",
                       truncated_key="query_truncated", max_length=spec.query_len,
                       **common))
  ds = ds.map(transforms.Tokenize(in_key="positive", out_key="positive_tokens",
                       truncated_key="positive_truncated",
                       max_length=spec.positive_len, **common))
  if spec.num_negatives > 0:
    ds = ds.map(transforms.Tokenize(in_key="negatives", out_key="negative_tokens",
                         truncated_key="negative_truncated",
                         max_length=spec.negative_len,
                         max_items=spec.num_negatives, **common))
  return ds.map(transforms.SetTaskIndex(task_index=task_index))


def _divide(total: int, groups: int, where: str, field: str) -> int:
  if total % groups:
    up = math.ceil(total / groups) * groups
    raise ValueError(
        f"{where}: {field}={total} is not divisible by num_groups={groups} (data "
        f"shards = devices along the batch mesh axes); set {field} to a multiple "
        f"of {groups}, e.g. {up}.")
  return total // groups


def _media_slots(spec: BatchSpec, side: str, kind: str, b_g: int,
                 num_groups: int, sample: Sequence[dict], where: str) -> int:
  """Per-group media slots of one side: the spec's, or suggested from `sample`."""
  field = f"{side}_{'images' if kind == 'image' else 'audio'}"
  given = getattr(spec, field)
  if given is not None:
    return _divide(given, num_groups, where, field)
  if not sample:
    return 0
  key = f"{side}_media"

  def count(media) -> int:
    return sum(m.kind == kind for m in media)

  if side == "negative":
    per_tuple = [sum(count(m) for m in ex.get(key, ())) for ex in sample]
  else:
    per_tuple = [count(ex.get(key, ())) for ex in sample]
  if not any(per_tuple):
    return 0
  # Enough for the batch's expected count, and for the largest tuple (so any
  # tuple fits an empty batch).
  expected = math.ceil(b_g * float(np.mean(per_tuple)) * spec.media_slack)
  return max(expected, max(per_tuple))


def group_shape(spec: BatchSpec, num_groups: int, sample: Sequence[dict] = (),
                where: str = "batch", model_cfg=None) -> GroupShape:
  """The per-group shape of a BatchSpec; unset rows are suggested from `sample`.

  Args:
    spec: the global batch shape.
    num_groups: G.
    sample: tokenized tuples (as the stream yields them) to suggest rows and
      media slots from; needed only when some rows are None.
    where: names the task/stage in errors.
    model_cfg: the model's `ModelConfig`; gives the media slots' shapes.

  Returns:
    The GroupShape (R_g = R / G, B_g = B / G).
  """
  if spec.batch_size < 1:
    raise ValueError(f"{where}: batch_size={spec.batch_size} must be >= 1.")
  if spec.num_negatives > 0 and spec.negative_len < 1:
    raise ValueError(f"{where}: num_negatives={spec.num_negatives} needs "
                     f"negative_len >= 1 (got {spec.negative_len}).")
  for field in ("rows_slack", "media_slack"):
    if not getattr(spec, field) > 0:
      raise ValueError(f"{where}: {field}={getattr(spec, field)} must be > 0 (1.0 sizes "
                       "suggested capacities to the sample's mean).")
  b_g = _divide(spec.batch_size, num_groups, where, "batch_size")
  k = spec.num_negatives
  sides = packing.SIDES if k > 0 else packing.SIDES[:2]
  shapes = {}
  for s in sides:
    length = getattr(spec, f"{s}_len")
    rows = getattr(spec, f"{s}_rows")
    if rows is None:
      if not sample:
        raise ValueError(f"{where}: {s}_rows is None and no sample to suggest "
                         "it from; set it.")
      if s == "negative":
        lengths = [t.size for ex in sample for t in ex["negative_tokens"]]
        sequences = b_g * len(lengths) / len(sample)
        lengths = lengths or [1]
      else:
        lengths = [ex[f"{s}_tokens"].size for ex in sample]
        sequences = b_g
      r_g = packing.suggest_rows(lengths, sequences=sequences, length=length,
                                 segments=spec.segments, slack=spec.rows_slack)
      if s == "negative":
        r_g = max(r_g, k)
      r_g = -(-r_g // spec.rows_multiple) * spec.rows_multiple
    else:
      r_g = _divide(rows, num_groups, where, f"{s}_rows")
    shapes[s] = SideShape(
        length=length, rows=r_g,
        images=_media_slots(spec, s, "image", b_g, num_groups, sample, where),
        audio=_media_slots(spec, s, "audio", b_g, num_groups, sample, where))
  media = {}
  if any(ss.images or ss.audio for ss in shapes.values()):
    if model_cfg is None:
      raise ValueError(f"{where}: the batch has media slots but no model config "
                       "was given for their shapes; pass encoder= to the "
                       "iterator builder.")
    media = packing.media_shapes(model_cfg)
  try:
    return GroupShape(examples=b_g, segments=spec.segments, num_negatives=k,
                      max_misses=spec.max_misses,
                      lookahead=min(b_g, 64) if spec.lookahead is None else spec.lookahead,
                      **shapes, **media)
  except ValueError as e:
    raise ValueError(f"{where}: {e} (rows here are per group; the BatchSpec "
                     f"counts are {num_groups}x that)") from None


@dataclasses.dataclass(frozen=True)
class _Stream:
  name: str
  shape: GroupShape
  iters: dict[int, PackedGroupIterator]  # global group index -> iterator


class _Batches:
  """Assembles a stage's batches, step after step: the body of `StageIterator`,
  run by its prefetch thread when it has workers (and holding no reference to the
  StageIterator, so an unclosed iterator can be garbage collected and stopped)."""

  def __init__(self, streams: Sequence[_Stream], sampler: TaskSampler | None,
               stream_of_task: Sequence[int], local_groups: Sequence[int]):
    self.streams = list(streams)
    self.sampler = sampler
    self.stream_of_task = list(stream_of_task)
    self.local_groups = tuple(local_groups)
    self.step = 0  # the step of the next batch

  def task_at(self, step: int) -> int:
    return -1 if self.sampler is None else self.sampler.task_at(step)

  def stream_at(self, step: int) -> _Stream:
    task = self.task_at(step)
    return self.streams[0 if task < 0 else self.stream_of_task[task]]

  def next(self) -> dict[str, np.ndarray]:
    task = self.task_at(self.step)
    stream = self.stream_at(self.step)
    # Every local group's read-ahead starts before the first group packs, and the
    # next step's stream (FT: maybe another task) right after.
    for s in (stream, self.stream_at(self.step + 1)):
      for g in self.local_groups:
        s.iters[g].prime()
    groups = [next(stream.iters[g]) for g in self.local_groups]
    batch = packing.concat_groups(stream.shape, groups)
    batch["task_index"] = np.asarray(task, np.int32)
    self.step += 1
    return batch

  def state(self) -> dict[str, Any]:
    return {"step": self.step, "streams": {
        s.name: {str(g): it.get_state() for g, it in s.iters.items()}
        for s in self.streams}}

  def produce(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(the next batch, the state after it): what the prefetch thread hands over."""
    batch = self.next()
    return batch, self.state()


class StageIterator(grain.DatasetIterator):
  """Yields one train step's process-local batch (dict of numpy arrays) per next().

  The local batch holds the groups `local_groups` (by default [process_index *
  G_local, (process_index + 1) * G_local)); rows and examples of those groups in
  that order. Stats (0-d entries,
  see `packing.batch_stats`) cover the local groups only; `task_index` is the FT
  task of the step (-1 in PFT, see `example_task`).

  With a decode `pool` (workers > 0), one background thread assembles the next
  batch while the caller uses this one; `get_state()` is the state after the
  batches handed out. `close()` stops the threads (idempotent).

  Build with `build_pft_iterator` / `build_ft_iterator`.
  """

  def __init__(self, *, mode: str, task_names: Sequence[str],
               streams: Sequence[_Stream], sampler: TaskSampler | None,
               stream_of_task: Sequence[int], seed: int, num_groups: int,
               local_groups: Sequence[int],
               pool: readahead.DecodePool | None = None):
    super().__init__()
    self.mode = mode
    self.task_names = tuple(task_names)
    self._seed = seed
    self.num_groups = num_groups
    self.local_groups = tuple(local_groups)
    self.workers = 0 if pool is None else pool.workers
    self._batches = _Batches(streams, sampler, stream_of_task, local_groups)
    # The state after the last batch handed out, while the prefetch thread may be
    # a batch further (None: ask the streams, nothing is prefetched).
    self._handed: dict[str, Any] | None = None
    self._prefetch = (None if pool is None else
                      readahead.Prefetcher(self._batches.produce))
    self._finalizer = weakref.finalize(self, _stop_threads, self._prefetch, pool)

  @property
  def group_shapes(self) -> dict[str, GroupShape]:
    """Stream name (task name in FT, "mixture" in PFT) -> its group shape."""
    return {s.name: s.shape for s in self._batches.streams}

  @property
  def step(self) -> int:
    """Batches handed out."""
    return self._batches.step if self._handed is None else self._handed["step"]

  def task_at(self, step: int) -> int:
    """The task index of step `step` (FT) or -1 (PFT)."""
    return self._batches.task_at(step)

  def __next__(self) -> dict[str, np.ndarray]:
    if self._closed:
      raise ValueError("this stage iterator was closed; build a new one.")
    if self._prefetch is None:
      return self._batches.next()
    batch, self._handed = self._prefetch.next()
    return batch

  def close(self) -> None:
    """Stops the decode pool and the prefetch thread; the iterator is done
    (idempotent; grain's `__del__` calls it too)."""
    self._closed = True
    self._finalizer()

  def _fingerprint(self) -> dict[str, Any]:
    return {"version": STATE_VERSION, "mode": self.mode, "seed": self._seed,
            "num_groups": self.num_groups, "tasks": list(self.task_names)}

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable state: fingerprint, step, per-stream per-group states, and
    `num_workers` (informational: any worker count restores it)."""
    state = self._fingerprint()
    state["num_workers"] = self.workers
    state.update(copy.deepcopy(self._handed) if self._handed is not None
                 else self._batches.state())
    return state

  def set_state(self, state: dict[str, Any]):
    """Restores a `get_state()` state (or a `merge_states` of several processes').

    The state may come from a run with another worker count (the batches do not
    depend on it).

    Raises:
      ValueError: the state comes from a different set-up (seed, mode, groups,
        tasks) or lacks one of this process's groups.
    """
    want = self._fingerprint()
    for key, value in want.items():
      got = state.get(key)
      if got != value:
        raise ValueError(f"data iterator state has {key}={got!r} but this "
                         f"iterator has {key}={value!r}; restore with the same "
                         "stage config as the run that saved it.")
    for s in self._batches.streams:
      saved = state["streams"].get(s.name)
      if saved is None:
        raise ValueError(f"data iterator state has no stream {s.name!r}; restore "
                         "with the same stage config.")
      missing = [g for g in s.iters if str(g) not in saved]
      if missing:
        raise ValueError(
            f"data iterator state lacks group {missing[0]} of stream {s.name!r} (this "
            f"process builds groups {list(self.local_groups)}); merge every "
            "process's state with pipeline.merge_states before restoring on a "
            "different process layout.")
    if self._prefetch is not None:
      self._prefetch.stop()  # a prefetched batch must not shift the restored stream
    self._handed = None
    for s in self._batches.streams:
      for g, it in s.iters.items():
        it.set_state(state["streams"][s.name][str(g)])
    self._batches.step = int(state["step"])


def _stop_threads(prefetch: readahead.Prefetcher | None,
                  pool: readahead.DecodePool | None) -> None:
  # The pool first: its queued work is cancelled, so a prefetch thread waiting on
  # it stops at once instead of finishing its batch.
  if pool is not None:
    pool.close()
  if prefetch is not None:
    prefetch.stop()


def merge_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Merges the states of all processes (same step) into one restorable anywhere."""
  merged = {k: v for k, v in states[0].items() if k != "streams"}
  merged["streams"] = {}
  for st in states:
    if st["step"] != merged["step"]:
      raise ValueError(f"states are at different steps ({st['step']} vs "
                       f"{merged['step']}); save them at the same step.")
    for name, groups in st["streams"].items():
      merged["streams"].setdefault(name, {}).update(groups)
  return merged


def with_suggested_rows(task: TaskSpec, spec: BatchSpec, *, tokenizer,
                        num_groups: int, sample_size: int = 8192,
                        seed: int = 0, encoder=None) -> BatchSpec:
  """`spec` with every unset row count filled in from a large sample of `task`.

  For configs: the iterators suggest rows from ROWS_SAMPLE_SIZE tuples at build
  time, whose mean length is uncertain by a few percent; run this once with a big
  sample and write the global row counts into the config instead.

  Args:
    task: the task (its examples, task string and p_drop are used).
    spec: the batch shape; rows already set are kept.
    tokenizer: as in `build_ft_iterator`.
    num_groups: G.
    sample_size: tuples tokenized (at most one epoch of the task).
    seed: shuffle seed of the sample.
    encoder: as in `build_ft_iterator`; with one, media slots are set too.

  Returns:
    A copy of `spec` with global query/positive/negative rows (and media slots)
    set.
  """
  ds = _task_stream(task, 0, spec, tokenizer, seed, encoder)
  media = encoder is not None
  sample = _suggestion_sample(ds, min(sample_size, len(_source(task))), spec,
                              media, where=f"task {task.name!r}")
  shape = group_shape(spec, num_groups, sample, where=f"task {task.name!r}",
                      model_cfg=encoder.cfg if media else None)
  rows = {f"{s}_rows": shape.side(s).rows * num_groups for s in shape.sides}
  if media:
    for s in shape.sides:
      rows[f"{s}_images"] = shape.side(s).images * num_groups
      rows[f"{s}_audio"] = shape.side(s).audio * num_groups
  return dataclasses.replace(spec, **rows)


def _check_stage(tasks: Sequence[TaskSpec], num_groups: int, process_index: int,
                 process_count: int,
                 local_groups: Sequence[int] | None) -> tuple[int, ...]:
  """Validates a stage; returns the groups this process builds."""
  if not tasks:
    raise ValueError("a stage needs at least one task.")
  names = [t.name for t in tasks]
  if len(set(names)) != len(names):
    raise ValueError(f"task names must be unique, got {names}.")
  _check_rates([t.rate for t in tasks], [f"task {t.name!r}" for t in tasks])
  for t in tasks:
    if not 0.0 <= t.p_drop <= 1.0:
      raise ValueError(f"task {t.name!r}: p_drop={t.p_drop} must be in [0, 1].")
  for t in tasks:
    _source(t)  # rejects empty tasks, rate 0 or not
  if local_groups is not None:
    groups = tuple(int(g) for g in local_groups)
    if not groups or len(set(groups)) != len(groups) or not all(
        0 <= g < num_groups for g in groups):
      raise ValueError(f"local_groups={list(local_groups)} must be distinct "
                       f"group indices in [0, num_groups={num_groups}).")
    return groups
  if num_groups < 1 or process_count < 1 or num_groups % process_count:
    raise ValueError(
        f"num_groups={num_groups} must be a positive multiple of process_count="
        f"{process_count} (every process builds the same number of groups).")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, "
                     f"{process_count}).")
  g_local = num_groups // process_count
  return tuple(range(process_index * g_local, (process_index + 1) * g_local))


def _suggestion_sample(ds: grain.MapDataset, n: int, spec: BatchSpec,
                       media: bool = False, where: str = "batch",
                       pool: readahead.DecodePool | None = None) -> list[dict]:
  """The first n tuples of a stream (skipped records left out) if some rows (or,
  with `media`, media slots) are left to suggest, else []; read on `pool` if given."""
  k = spec.num_negatives
  unset = (spec.query_rows, spec.positive_rows, spec.negative_rows if k else 0)
  if media:
    unset += (spec.query_images, spec.positive_images,
              spec.negative_images if k else 0, spec.query_audio,
              spec.positive_audio, spec.negative_audio if k else 0)
  if None not in unset:
    return []
  out = ([ds[i] for i in range(n)] if pool is None else
         pool.map(ds.__getitem__, range(n)))
  good = [ex for ex in out if packing.SKIPPED not in ex]
  if len(good) < len(out) / 2:
    first = next(ex[packing.SKIPPED] for ex in out if packing.SKIPPED in ex)
    raise ValueError(
        f"{where}: {len(out) - len(good)} of the first {len(out)} records cannot be "
        f"decoded (e.g. {first}); check the task's data (paths, formats, the "
        "'video' extra for video files) before training on it.")
  return good


def _decode_pool(workers: int) -> readahead.DecodePool | None:
  """The stage's pool of `workers` decode threads; None for 0 (the calling thread)."""
  if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 0:
    raise ValueError(f"workers={workers!r} must be an int >= 0 (0 = decode in the "
                     "calling thread, N = N decode threads).")
  return readahead.DecodePool(int(workers)) if workers else None


def _readahead_depth(shape: GroupShape, pool: readahead.DecodePool) -> int:
  """Elements of each group stream read ahead: about one group batch (so the pool
  decodes the whole next batch during a train step), and enough to feed every
  worker."""
  return max(shape.examples, 2 * pool.workers)


def _group_iters(stream_of_group: Callable[[int], grain.MapDataset],
                 shape: GroupShape, local: Sequence[int],
                 pool: readahead.DecodePool | None) -> dict[int, PackedGroupIterator]:
  """Global group index -> its packed-batch iterator, for the local groups."""
  depth = 0 if pool is None else _readahead_depth(shape, pool)
  return {g: iter(PackedGroupIterDataset(stream_of_group(g), shape, pool, depth))
          for g in local}


def build_ft_iterator(tasks: Sequence[TaskSpec], *, tokenizer, num_groups: int,
                      seed: int, process_index: int = 0, process_count: int = 1,
                      local_groups: Sequence[int] | None = None, encoder=None,
                      workers: int = 0) -> StageIterator:
  """Fine-tuning stage: every step's batch comes from one task.

  Args:
    tasks: the stage's tasks; each needs `batch` (its own shape). Tasks with rate
      0 are never sampled (and build nothing).
    tokenizer: an `embed2.data.tokenizer.Tokenizer`, or anything with `encode(text) -> list[int]`
      (framed with its `prefix_ids` / `suffix_ids`, else Gemma's bos 2 ... eos 1).
    num_groups: G, data shards of the global batch (devices along the batch axes).
    seed: stage seed (shuffles, task-string drops, task sampling).
    process_index: this process (jax.process_index()).
    process_count: number of processes (jax.process_count()); this process
      builds groups [process_index * G / process_count, ...) in order.
    local_groups: overrides that range: the global group indices this process
      builds, in the order its local batch concatenates them (e.g. the batch
      positions of its devices when the mesh does not put them contiguously).
    encoder: `interleave.InputEncoder` of the model; needed when examples hold
      images / audio / video or interleaved inputs (their media slots are then
      suggested from the sample unless the BatchSpec sets them).
    workers: decode threads (0: the calling thread computes every element). The
      batches are the same for every count (see the module docstring); close()
      the iterator to stop the threads.

  Returns:
    A StageIterator; step n's task is `it.task_at(n)`, the same on all processes.
  """
  local = _check_stage(tasks, num_groups, process_index, process_count,
                       local_groups)
  pool = _decode_pool(workers)
  try:
    return _build_ft(tasks, tokenizer, num_groups, seed, local, encoder, pool)
  except BaseException:
    if pool is not None:
      pool.close()
    raise


def _build_ft(tasks, tokenizer, num_groups, seed, local, encoder, pool) -> StageIterator:
  streams, stream_of_task = [], []
  for i, t in enumerate(tasks):
    if t.batch is None:
      raise ValueError(f"task {t.name!r} has no batch spec; FT needs a "
                       "BatchSpec per task (TaskSpec.batch).")
    if t.rate == 0:
      stream_of_task.append(-1)
      continue
    ds = _task_stream(t, i, t.batch, tokenizer, seed, encoder)
    sample = _suggestion_sample(
        ds, min(ROWS_SAMPLE_SIZE, len(_source(t))), t.batch, encoder is not None,
        where=f"task {t.name!r}", pool=pool)
    shape = group_shape(t.batch, num_groups, sample, where=f"task {t.name!r}",
                        model_cfg=None if encoder is None else encoder.cfg)
    iters = _group_iters(lambda g, ds=ds: ds[g::num_groups], shape, local, pool)
    stream_of_task.append(len(streams))
    streams.append(_Stream(t.name, shape, iters))
  sampler = TaskSampler(rates=tuple(float(t.rate) for t in tasks),
                        seed=_task_seed(seed, "__sampler__", 2))
  return StageIterator(mode="ft", task_names=[t.name for t in tasks],
                       streams=streams, sampler=sampler,
                       stream_of_task=stream_of_task, seed=seed,
                       num_groups=num_groups, local_groups=local, pool=pool)


def build_pft_iterator(tasks: Sequence[TaskSpec], batch: BatchSpec, *, tokenizer,
                       num_groups: int, seed: int, process_index: int = 0,
                       process_count: int = 1,
                       local_groups: Sequence[int] | None = None, encoder=None,
                       workers: int = 0) -> StageIterator:
  """Pre-fine-tuning stage: every group's batch mixes tasks at fixed rates.

  Mixing is per example and deterministic (grain's proportional interleave), so
  every batch holds the tasks in close to exact proportion; `example_task` tells
  them apart. All tasks share `batch`'s shape (TaskSpec.batch is ignored).

  Args:
    tasks: the stage's tasks (rate 0: left out of the mixture).
    batch: the stage's one batch shape.
    tokenizer, num_groups, seed, process_index, process_count, local_groups,
      encoder, workers: as in `build_ft_iterator`.

  Returns:
    A StageIterator with one stream named "mixture".
  """
  local = _check_stage(tasks, num_groups, process_index, process_count,
                       local_groups)
  pool = _decode_pool(workers)
  try:
    return _build_pft(tasks, batch, tokenizer, num_groups, seed, local, encoder, pool)
  except BaseException:
    if pool is not None:
      pool.close()
    raise


def _build_pft(tasks, batch, tokenizer, num_groups, seed, local, encoder,
               pool) -> StageIterator:
  live = [(i, t) for i, t in enumerate(tasks) if t.rate > 0]
  full = [_task_stream(t, i, batch, tokenizer, seed, encoder) for i, t in live]
  rates = [float(t.rate) for _, t in live]

  def mix(parts):
    return parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, rates)

  sample = _suggestion_sample(mix(full), ROWS_SAMPLE_SIZE, batch,
                              encoder is not None, where="pft stage", pool=pool)
  shape = group_shape(batch, num_groups, sample, where="pft stage batch",
                      model_cfg=None if encoder is None else encoder.cfg)
  iters = _group_iters(lambda g: mix([ds[g::num_groups] for ds in full]), shape,
                       local, pool)
  return StageIterator(mode="pft", task_names=[t.name for t in tasks],
                       streams=[_Stream("mixture", shape, iters)], sampler=None,
                       stream_of_task=[0] * len(tasks), seed=seed,
                       num_groups=num_groups, local_groups=local, pool=pool)
