"""The stage-scheduled training loop.

  config.stages = [pft, ft, ...]        each with its own steps, tasks and rates, optimizer, freezing
  for stage in stages[resume_stage:]:
    optimizer <- AdamW schedule of this stage (fresh state; parameters carried over)
    data      <- PFT: every batch mixes tasks at fixed rates | FT: one task per batch, sampled by rate
    for step: batch -> compiled step for this task's shape (cached) -> metrics / eval / checkpoint

Resume order (a re-run of the same command on the same workdir):
  1. the config is validated and compared with the checkpoint's (refused before anything is written);
  2. the model is built sharded, then the latest finished checkpoint's parameters are restored onto it;
  3. the stage index and the step within the stage are read from the checkpoint's meta;
  4. that stage's optimizer is rebuilt and its state restored (skipped when the stage had just ended);
  5. the data iterator is rebuilt and its state restored, so the batches continue exactly.

Guard rails: a step with a non-finite loss or gradient changes nothing and is counted; after
`config.max_consecutive_skips` in a row the run stops with an error (the last checkpoint, written before
the streak, is intact). SIGTERM (a preemption notice) saves at the current step and exits with code 0.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import signal
import time
import zlib
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from flax import nnx
from ml_collections import config_dict

from embed2 import distributed
from embed2 import losses
from embed2 import sharding
from embed2.data import interleave
from embed2.data import pipeline
from embed2.data import tokenizer as tokenizer_lib
from embed2.data.tokenizer import Tokenizer
from embed2.model import EmbeddingModel, ModelConfig
from embed2 import checkpoint as ckpt_lib
from embed2.train import faults
from embed2.train import optim
from embed2.train import step as step_lib
from embed2.train.metrics_writer import MetricsWriter

# Config fields whose change makes a checkpoint unusable for this run (the rest may change on resume).
_IDENTITY_FIELDS = ("model", "stages", "tasks", "loss", "seed")


class TrainingStopped(RuntimeError):
  """Raised when the run stops on a guard rail (too many non-finite steps)."""


@dataclasses.dataclass
class TaskData:
  """A task's examples (resolved by the entry point from `data_pipelines`) for one split."""
  train: Sequence[dict]
  eval: Sequence[dict] = ()


# ---------------------------------------------------------------------------- config


def loss_config(config, task_cfg=None) -> losses.LossConfig:
  kw = dict(config.loss)
  kw.setdefault("mrl_dims", tuple(ModelConfig.from_dict(config.model.to_dict()).resolved_mrl_dims))
  if task_cfg is not None and "in_batch_negatives" in task_cfg:
    kw["in_batch_negatives"] = bool(task_cfg.in_batch_negatives)
  return losses.LossConfig(**kw)


# Keys of a task's config that are not batch-shape fields.
_TASK_KEYS = ("source", "task_string", "p_drop", "in_batch_negatives")
_STAGE_KEYS = ("name", "mode", "steps", "tasks", "batch", "optim", "freeze", "grad_cache_chunks")
_BATCH_KEYS = tuple(f.name for f in dataclasses.fields(pipeline.BatchSpec))


def _refuse_unknown(d: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
  """A misspelt key (`query_lenn`) would silently fall back to a default: refuse it by name."""
  unknown = sorted(set(dict(d)) - set(allowed))
  if unknown:
    hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, allowed, n=1)) else repr(k)
             for k in unknown]
    raise ValueError(f"{where} has unknown keys {', '.join(hints)}; known keys: {sorted(allowed)}")


def batch_spec(d: Mapping[str, Any], where: str) -> pipeline.BatchSpec:
  """The BatchSpec of a task's (FT) or a stage's (PFT) config, every field checked."""
  kw = {k: v for k, v in dict(d).items() if k in _BATCH_KEYS}
  missing = [k for k in ("batch_size", "query_len", "positive_len") if k not in kw]
  if missing:
    raise ValueError(f"{where} lacks {missing}; give the batch shape (batch_size, query_len, positive_len, "
                     "and negative_len/num_negatives for hard negatives)")
  spec = pipeline.BatchSpec(**kw)
  for name in ("batch_size", "query_len", "positive_len", "segments"):
    v = getattr(spec, name)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f"{where}.{name}={v!r} must be a positive integer")
  for name in ("negative_len", "num_negatives", "max_misses") + tuple(
      f"{s}_{m}" for s in ("query", "positive", "negative") for m in ("rows", "images", "audio")) + (
          "lookahead",):
    v = getattr(spec, name)
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0):
      raise ValueError(f"{where}.{name}={v!r} must be a non-negative integer"
                       + (" or None (suggested from a sample)" if name not in (
                           "negative_len", "num_negatives", "max_misses") else ""))
  for name in ("query_rows", "positive_rows") + (("negative_rows",) if spec.num_negatives else ()):
    if getattr(spec, name) == 0:
      raise ValueError(f"{where}.{name}=0 leaves that side no rows; give a positive count or None")
  if spec.num_negatives and spec.negative_len < 1:
    raise ValueError(f"{where}.num_negatives={spec.num_negatives} needs negative_len >= 1 (got "
                     f"{spec.negative_len}); set the hard negatives' row length")
  for name in ("rows_slack", "media_slack"):
    v = getattr(spec, name)
    if not isinstance(v, (int, float, np.floating, np.integer)) or not np.isfinite(v) or v <= 0:
      raise ValueError(f"{where}.{name}={v!r} must be a number > 0 (1.0 sizes suggested capacities to "
                       "the sample's mean)")
  if isinstance(spec.rows_multiple, bool) or not isinstance(spec.rows_multiple, (int, np.integer)) or (
      spec.rows_multiple < 1):
    raise ValueError(f"{where}.rows_multiple={spec.rows_multiple!r} must be a positive integer")
  return spec


def _check_grad_cache_rows(spec: pipeline.BatchSpec, chunks: int, num_groups: int, w: str, where: str) -> None:
  """GradCache cuts every pack group's rows into `chunks` equal pieces: rows set by hand must allow it
  (suggested rows are rounded up to a multiple, see `stage_batch_spec`)."""
  sides = ("query", "positive") + (("negative",) if spec.num_negatives else ())
  for s in sides:
    rows = getattr(spec, f"{s}_rows")
    if rows is not None and (rows % num_groups or (rows // num_groups) % chunks):
      raise ValueError(f"{w}.{s}_rows={rows} gives {rows / num_groups:g} rows per pack group, not divisible by "
                       f"{where}.grad_cache_chunks={chunks}; use a multiple of {num_groups * chunks} "
                       f"({num_groups} groups x {chunks} chunks), or leave it None (suggested)")


def stage_batch_spec(d: Mapping[str, Any], where: str, stage) -> pipeline.BatchSpec:
  """`batch_spec` of a task or PFT batch as the stage trains it (suggested rows fit its GradCache)."""
  spec = batch_spec(d, where)
  chunks = int(stage.get("grad_cache_chunks", 0))
  return dataclasses.replace(spec, rows_multiple=spec.rows_multiple * chunks) if chunks > 1 else spec


def optim_config(stage, where: str = "config.stages[i]") -> optim.OptimConfig:
  kw = dict(stage.get("optim", {}))
  _refuse_unknown(kw, [f.name for f in dataclasses.fields(optim.OptimConfig) if f.name != "freeze"],
                  f"{where}.optim")
  kw["freeze"] = tuple(stage.get("freeze", ()))
  return optim.OptimConfig(**kw)


def validate(config, data: Mapping[str, TaskData], num_groups: int) -> None:
  """Every check that can fail before anything is written or compiled: unknown tasks and keys, empty
  tasks, rates, every batch shape of every stage and task."""
  ModelConfig.from_dict(config.model.to_dict())
  if not config.stages:
    raise ValueError("config.stages is empty; add at least one stage (see configs/demo.py)")
  names = [s.name for s in config.stages]
  if len(set(names)) != len(names):
    raise ValueError(f"config.stages names must be unique, got {names}")
  max_segments = ModelConfig.from_dict(config.model.to_dict()).max_segments
  for name, tc in config.tasks.items():
    _refuse_unknown(tc, _TASK_KEYS + _BATCH_KEYS, f"config.tasks.{name}")
    p_drop = tc.get("p_drop", 0.0)
    if not 0.0 <= float(p_drop) <= 1.0:
      raise ValueError(f"config.tasks.{name}.p_drop={p_drop} must be in [0, 1]")
  for si, stage in enumerate(config.stages):
    where = f"config.stages[{si}] ({stage.name})"
    _refuse_unknown(stage, _STAGE_KEYS, where)
    if stage.mode not in ("pft", "ft"):
      raise ValueError(f"{where}.mode={stage.mode!r}; choose 'pft' (mixed batches) or 'ft' (one task a batch)")
    if int(stage.steps) < 1:
      raise ValueError(f"{where}.steps={stage.steps} must be >= 1")
    if int(stage.get("grad_cache_chunks", 0)) < 0:
      raise ValueError(f"{where}.grad_cache_chunks={stage.grad_cache_chunks} must be >= 0 (0 = off)")
    if not stage.tasks:
      raise ValueError(f"{where}.tasks is empty; map task names to sampling rates")
    rates = dict(stage.tasks)
    for name, rate in rates.items():
      if name not in config.tasks:
        raise ValueError(f"{where}.tasks names unknown task {name!r}; config.tasks defines "
                         f"{sorted(config.tasks)}")
      if not np.isfinite(rate) or rate < 0:
        raise ValueError(f"{where}.tasks[{name!r}]={rate} is negative or not finite; rates must be >= 0")
      if rate > 0 and len(data[name].train) == 0:
        raise ValueError(f"task {name!r} has zero training examples; check its source "
                         f"{config.tasks[name].get('source', name)!r} or drop it from {where}.tasks")
    if not any(r > 0 for r in rates.values()):
      raise ValueError(f"{where}.tasks rates are all zero; give at least one task a rate > 0")
    if stage.mode == "pft":
      if "batch" not in stage:
        raise ValueError(f"{where} is a pft stage without a batch; give {where}.batch (batch_size, "
                         "query_len, positive_len, ...): PFT batches mix tasks in one shape")
      _refuse_unknown(stage.batch, _BATCH_KEYS, f"{where}.batch")
    # Every task of the stage, a zero rate included: a rate is the one field a resumed run may not
    # change, but a bad shape must never surface after a stage has trained.
    specs = ([(f"{where}.batch", stage.batch)] if stage.mode == "pft" else
             [(f"config.tasks.{n}", config.tasks[n]) for n in rates])
    for w, d in specs:
      spec = batch_spec(d, w)
      if spec.segments != max_segments:
        raise ValueError(f"{w}.segments={spec.segments} differs from config.model.max_segments="
                         f"{max_segments}; the model pools max_segments slots per row, so set both to the "
                         "same number")
      if spec.batch_size % num_groups:
        raise ValueError(f"{w}.batch_size={spec.batch_size} is not divisible by the {num_groups} data shards "
                         f"(mesh data x fsdp); use a multiple of {num_groups}")
      if int(stage.get("grad_cache_chunks", 0)) > 1:
        _check_grad_cache_rows(spec, int(stage.grad_cache_chunks), num_groups, w, where)
    optim_config(stage, where).validate(where + ".optim")
  loss_config(config)


def normalize(config):
  """A copy of `config` whose stages are ConfigDicts (a list of plain dicts is accepted)."""
  config = config_dict.ConfigDict(config.to_dict())
  with config.unlocked():
    config.stages = [config_dict.ConfigDict(dict(s)) for s in config.stages]
  return config


def fingerprint(config) -> dict[str, Any]:
  """The parts of the config that must match for a checkpoint to be resumed."""
  d = config.to_dict()
  return {k: d.get(k) for k in _IDENTITY_FIELDS}


def _canonical(x):
  return json.loads(json.dumps(x, sort_keys=True, default=str))


def check_workdir_compatible(config, meta: dict[str, Any], workdir) -> None:
  want, have = _canonical(fingerprint(config)), meta.get("fingerprint")
  if have is None:
    raise ValueError(f"workdir {workdir} holds a checkpoint without a config fingerprint; use a new workdir")
  for key in _IDENTITY_FIELDS:
    if want.get(key) != have.get(key):
      raise ValueError(
          f"workdir {workdir} holds a checkpoint from an incompatible config: config.{key} differs "
          f"(checkpoint: {json.dumps(have.get(key), sort_keys=True)[:300]} ; now: "
          f"{json.dumps(want.get(key), sort_keys=True)[:300]}). Use a new --workdir, or start from that "
          "checkpoint with config.init_from. Nothing in the workdir was changed.")


# ------------------------------------------------------------------------- tokenizer

def resolve_tokenizer(config) -> tuple[Tokenizer, str]:
  """The run's tokenizer, and the path its checkpoints record ("" = the packaged default).

  A run that starts from a checkpoint (`config.init_from`: an import or an earlier run) uses that
  checkpoint's own tokenizer: `config.tokenizer = ""` takes it, and a `config.tokenizer` that tokenizes
  differently is refused (a model must never see ids of another tokenizer). Without `init_from`:
  `config.tokenizer` or the packaged default.
  """
  given = config.get("tokenizer") or ""
  init = config.get("init_from") or ""
  if not init:
    return (Tokenizer.from_file(given) if given else Tokenizer.default()), given
  directory, step = ckpt_lib.resolve_checkpoint_path(init)
  reader = ckpt_lib.Checkpointer(directory, read_only=True)
  meta = reader.read_meta(step)
  reader.close()
  own = tokenizer_lib.checkpoint_tokenizer(meta, directory)
  own_path = own.source if meta.get("tokenizer") else ""
  if not given:
    return own, own_path
  tok = Tokenizer.from_file(given)
  if not tokenizer_lib.same_tokenizer(tok, own):
    raise ValueError(
        f"config.tokenizer={given} is not the tokenizer of config.init_from={init} "
        f"({own_path or 'the packaged default'}): their ids differ. Set config.tokenizer='' to train with "
        "the checkpoint's own tokenizer.")
  return tok, given


# ----------------------------------------------------------------------------- model


def build_trainee(config, mesh, rules) -> step_lib.Trainee:
  model_cfg = ModelConfig.from_dict(config.model.to_dict())
  loss_params = losses.init_loss_params(loss_config(config))
  seed = int(config.seed)

  def factory():
    return step_lib.Trainee(EmbeddingModel(model_cfg, rules=rules, rngs=nnx.Rngs(seed)), loss_params)

  return sharding.create_sharded(factory, mesh, rules)


def init_vision(model: EmbeddingModel, path: str) -> None:
  """Loads converted Gemma 3 vision weights (`embed2.convert`'s OUT/vision) into the `vit` frontend."""
  if model.cfg.media.image_frontend != "vit":
    raise ValueError(f"config.vision_init_from={path!r} needs config.model.media.image_frontend='vit' (got "
                     f"{model.cfg.media.image_frontend!r}); the SigLIP weights load into the ViT frontend")
  from embed2 import convert  # pylint: disable=g-import-not-at-top
  convert.load_vision_params(model.image_frontend.encoder, path)
  logging.info("vision frontend initialised from %s", path)


def model_params(trainee) -> dict:
  return nnx.to_pure_dict(nnx.state(trainee.model, nnx.Param))


# ------------------------------------------------------------------------------ data


def input_encoder(config, tokenizer) -> interleave.InputEncoder | None:
  """The encoder of media and interleaved inputs for the config's model; None for a text-only model
  (text keeps the plain tokenizing pipeline)."""
  model_cfg = ModelConfig.from_dict(config.model.to_dict())
  return interleave.InputEncoder(tokenizer, model_cfg) if len(model_cfg.media.modalities) > 1 else None


def stage_iterator(config, stage, data: Mapping[str, TaskData], tokenizer, num_groups: int,
                   stage_index: int) -> pipeline.StageIterator:
  tasks = []
  for name, rate in dict(stage.tasks).items():
    tc = config.tasks[name]
    tasks.append(pipeline.TaskSpec(
        name=name, examples=data[name].train, rate=float(rate), task_string=tc.get("task_string", ""),
        p_drop=float(tc.get("p_drop", 0.0)),
        batch=stage_batch_spec(tc, f"config.tasks.{name}", stage) if stage.mode == "ft" else None))
  seed = int(config.seed) * 1000 + stage_index
  kw = dict(tokenizer=tokenizer, num_groups=num_groups, seed=seed, process_index=jax.process_index(),
            process_count=jax.process_count(), encoder=input_encoder(config, tokenizer))
  if stage.mode == "pft":
    return pipeline.build_pft_iterator(tasks, stage_batch_spec(stage.batch, f"{stage.name}.batch", stage), **kw)
  return pipeline.build_ft_iterator(tasks, **kw)


# ------------------------------------------------------------------------------ loop


def max_skipped_fraction(config) -> float:
  """`config.max_skipped_fraction`: the share of records that may be skipped, for any cause (media files
  missing when a real dataset is built, records the pipeline cannot decode)."""
  value = float(config.get("max_skipped_fraction", 0.01))
  if not 0.0 <= value <= 1.0:
    raise ValueError(f"config.max_skipped_fraction={value} must be in [0, 1]")
  return value


class _RecordSkips:
  """Counts the records the data pipeline skipped (media it could not decode) and stops the run when
  they exceed `config.max_skipped_fraction` of the records read (judged once `config.
  skipped_grace_records` were read, so one bad record in the first batch is not 100%).

  The counts are this process's (its pack groups); with several processes they decide together every
  `config.log_every` steps (a host allgather). The checkpoint's meta keeps process 0's counts.
  """

  def __init__(self, config, meta):
    self.max_fraction = max_skipped_fraction(config)
    self.grace = int(config.get("skipped_grace_records", 200))
    self.check_every = max(int(config.get("log_every", 1)), 1)
    self.skipped = int(meta.get("records_skipped", 0)) if meta else 0
    self.read = int(meta.get("records_read", 0)) if meta else 0

  def update(self, host, global_step: int, stage_name: str) -> None:
    new = int(host.get("num_skipped", 0))
    self.skipped += new
    # Both counted as a record is pulled from the stream (packing.pack_group), good or bad: examples
    # packed would miss the tuples the lookahead window holds read ahead and overstate the skipped share.
    self.read += int(host["num_read"])
    if new:
      logging.warning("step %d: the data pipeline skipped %d undecodable records (%d of %d so far)",
                      global_step, new, self.skipped, self.read)
    bad = self.read >= self.grace and self.skipped > self.max_fraction * self.read
    if jax.process_count() > 1:
      # Every process decides together, at the same steps: one host allgather per `check_every`.
      if global_step % self.check_every:
        return
      bad = distributed.any_process(bad)
    if bad:
      raise TrainingStopped(
          f"the data pipeline skipped {self.skipped} of {self.read} records ({self.skipped / max(self.read, 1):.1%}) "
          f"it could not decode (corrupt or unsupported media; the log names them), more than "
          f"config.max_skipped_fraction={self.max_fraction} (stage {stage_name}, step {global_step}). Fix "
          "or drop the bad records, or raise config.max_skipped_fraction.")


class _Preemption:
  """Turns SIGTERM into a flag checked between steps."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. inside a notebook worker): no handler
      self._old = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint at the current step and exiting")
    self.requested = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


@dataclasses.dataclass
class TrainResult:
  global_step: int
  preempted: bool
  skipped_steps: int
  compiled_steps: int
  trainee: Any
  last_eval: dict[str, float] | None = None  # the eval_fn results at the end of the last stage run


def train(config, workdir: str, data: Mapping[str, TaskData], *,
          eval_fn: Callable[[EmbeddingModel, int, str], dict[str, float]] | None = None,
          batch_hook: Callable[[int, dict], dict] | None = None) -> TrainResult:
  """Runs (or resumes) every stage of `config` in `workdir`.

  Args:
    config: the experiment ConfigDict (see configs/demo.py for the fields).
    workdir: where checkpoints, metrics.jsonl and TensorBoard events go.
    data: task name -> TaskData for every task the stages use.
    eval_fn: called as eval_fn(model, global_step, stage_name) every `config.eval_every` steps and at the
      end of each stage; returns scalars to log (named as they should appear, e.g. "eval/demo/...").
    batch_hook: test hook, called as batch_hook(global_step, host_batch) -> host_batch.
  """
  workdir = epath.Path(workdir)
  config = normalize(config)
  mesh = sharding.make_mesh(dict(config.mesh))
  rules = tuple(tuple(r) for r in config.sharding_rules)
  shards = sharding.num_batch_shards(mesh)
  num_groups = int(config.get("data_groups", 0)) or shards
  validate(config, data, num_groups)

  tokenizer, tokenizer_path = resolve_tokenizer(config)
  with config.unlocked():
    config.tokenizer = tokenizer_path  # what the checkpoints record (model_meta)
  model_cfg = ModelConfig.from_dict(config.model.to_dict())
  if tokenizer.base_vocab_size > model_cfg.vocab_size:
    raise ValueError(f"the tokenizer has {tokenizer.base_vocab_size} ids but config.model.vocab_size="
                     f"{model_cfg.vocab_size}; raise vocab_size to at least {tokenizer.base_vocab_size}")

  latest, meta = None, None
  # Decided together: a process must not see a directory that another has just created (the managers
  # below synchronise all processes, so they must all take the same branch).
  if distributed.any_process((workdir / "checkpoints").exists()):
    reader = ckpt_lib.Checkpointer(workdir / "checkpoints", read_only=True)
    latest = reader.latest_step()
    if latest is not None:
      meta = reader.read_meta(latest)
      check_workdir_compatible(config, meta, workdir)
      if (meta.get("tokenizer") or "") != tokenizer_path and not tokenizer_lib.same_tokenizer(
          tokenizer_lib.checkpoint_tokenizer(meta, workdir / "checkpoints"), tokenizer):
        raise ValueError(
            f"workdir {workdir} was trained with the tokenizer {meta.get('tokenizer') or 'packaged with embed2'}, "
            f"and this config gives {tokenizer_path or 'the packaged one'}, which tokenizes differently. Resume "
            "with the run's own tokenizer (config.tokenizer), or use a new --workdir. Nothing in the workdir "
            "was changed.")
    reader.close()
  if meta is not None and not config.get("data_groups"):
    # Resuming on another mesh: keep the run's pack groups, so the batches continue exactly.
    num_groups = int(meta.get("num_groups", num_groups))
  if num_groups % shards:
    raise ValueError(f"the run packs its batches in {num_groups} groups (config.data_groups or the "
                     f"checkpoint), which the {shards} data shards of mesh {dict(mesh.shape)} do not divide; "
                     f"use a mesh whose data x fsdp divides {num_groups}")
  validate(config, data, num_groups)
  checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", every=int(config.checkpoint.every),
                                       keep=config.checkpoint.get("keep", 3),
                                       async_save=bool(config.checkpoint.get("async_save", True)))
  writer = None
  try:
    writer = MetricsWriter(workdir, enabled=jax.process_index() == 0)
    result = _run_stages(config, workdir, data, mesh, rules, num_groups, tokenizer, checkpointer, writer,
                         latest, meta, eval_fn=eval_fn, batch_hook=batch_hook)
  except BaseException:
    # Pending saves are of good states: let them finish, but never let a failure to close hide the
    # error that brought us here.
    _close_quietly(checkpointer, writer)
    raise
  checkpointer.close()
  writer.close()
  return result


def _close_quietly(checkpointer, writer) -> None:
  for thing in (checkpointer, writer):
    if thing is None:
      continue
    try:
      thing.close()
    except Exception as e:  # pylint: disable=broad-except
      logging.error("while stopping on an error, closing %s failed too: %s", type(thing).__name__, e)


def _run_stages(config, workdir, data, mesh, rules, num_groups, tokenizer, checkpointer, writer, latest,
                meta, *, eval_fn, batch_hook) -> TrainResult:
  """The loop of `train` over the stages, from the resume point (see the module docstring)."""
  trainee = build_trainee(config, mesh, rules)
  if meta is not None:
    ckpt_lib.load_model_params(trainee.model, str(workdir / "checkpoints" / str(latest)))
    set_loss_params(trainee, meta)
    logging.info("resuming from step %d (stage %d, step %d of it)", latest, meta["stage_index"],
                 meta["stage_step"])
  elif config.get("init_from"):
    set_loss_params(trainee, ckpt_lib.load_model_params(trainee.model, config.init_from))
    logging.info("initialised from %s", config.init_from)
    if config.get("vision_init_from"):
      init_vision(trainee.model, config.vision_init_from)

  max_skips = int(config.get("max_consecutive_skips", 5))
  global_step = latest or 0
  start_stage = meta["stage_index"] if meta else 0
  start_stage_step = meta["stage_step"] if meta else 0
  if meta and start_stage_step >= int(config.stages[start_stage].steps):
    # The checkpoint is a stage's last step. Its export may not have been committed (a kill between the
    # two commits of a stage end, or a workdir of an older version that saved the checkpoint first):
    # write it from the restored parameters, which are the ones the stage ended with.
    export_stage(workdir, config, trainee, config.stages[start_stage].name, latest)
    start_stage, start_stage_step = start_stage + 1, 0
  skipped_total = int(meta.get("skipped_total", 0)) if meta else 0
  records = _RecordSkips(config, meta)
  kill = faults.KillSwitch(int(config.get("debug_kill_at_step", -1)))
  preempted = False
  steps_compiled = 0
  last_eval = None
  debug_nan = set(int(s) for s in config.get("debug_nan_steps", ()))

  with _Preemption() as preemption:
    for si in range(start_stage, len(config.stages)):
      stage = config.stages[si]
      n_steps = int(stage.steps)
      stage_step = start_stage_step if si == start_stage else 0
      ocfg = optim_config(stage)
      params_state = nnx.state(trainee, nnx.Param)
      tx = optim.make_optimizer(ocfg, n_steps, params_state, where=f"config.stages[{si}].optim")
      with jax.set_mesh(mesh):
        optimizer = nnx.Optimizer(trainee, tx, wrt=nnx.Param)
      it = stage_iterator(config, stage, data, tokenizer, num_groups, si)
      if meta is not None and si == meta["stage_index"] and stage_step > 0:
        restored = checkpointer.restore(latest, params=ckpt_lib.abstract_like(model_params(trainee)),
                                        train=ckpt_lib.abstract_like(_train_tree(trainee, optimizer)))
        _set_train_tree(trainee, optimizer, restored["train"])
        it.set_state(meta["data_state"])
      graphdef, state = nnx.split((trainee, optimizer))
      state_shardings = jax.tree.map(lambda x: x.sharding, state)
      steps = step_lib.StepFunctions(graphdef, state_shardings, mesh, num_groups)
      task_names = list(dict(stage.tasks))
      loss_cfgs = {n: loss_config(config, config.tasks[n]) for n in task_names}
      pft_loss = loss_config(config)
      gc_chunks = int(stage.get("grad_cache_chunks", 0))
      consecutive = 0
      writer.progress_start(stage.name, stage_step, n_steps)
      t_last, examples_since, tokens_since = time.perf_counter(), 0, 0
      while stage_step < n_steps:
        kill("step", global_step)
        if global_step == int(config.get("debug_sigterm_at_step", -1)):
          os.kill(os.getpid(), signal.SIGTERM)
        host = next(it)
        records.update(host, global_step, stage.name)
        if batch_hook is not None:
          host = batch_hook(global_step, host)
        task_i = int(host["task_index"])
        task = "mixture" if task_i < 0 else task_names[task_i]
        lcfg = pft_loss if task_i < 0 else loss_cfgs[task]
        batch = step_lib.device_batch(host, mesh, poison=np.nan if global_step in debug_nan else 1.0)
        compiled_before = steps.num_compiled
        fn = steps.get(task, lcfg, state, batch, grad_cache_chunks=gc_chunks)
        state, metrics = fn(state, batch)
        metrics = jax.device_get(metrics)
        if steps.num_compiled != compiled_before:  # keep compilation out of the throughput figures
          t_last, examples_since, tokens_since = time.perf_counter(), 0, 0
        else:
          examples_since += int(np.sum(host["example_valid"]))
          tokens_since += int(host.get("num_tokens", 0))
        global_step += 1
        stage_step += 1
        if int(metrics["skipped"]):
          consecutive += 1
          skipped_total += 1
          logging.warning("step %d: non-finite loss or gradient (loss=%s, grad_norm=%s); update skipped "
                          "(%d in a row, %d in total)", global_step, metrics["loss"], metrics["grad_norm"],
                          consecutive, skipped_total)
          writer.write(global_step, {"skipped_total": skipped_total, "stage": stage.name, "task": task})
          if consecutive >= max_skips:
            raise TrainingStopped(
                f"{consecutive} consecutive steps had a non-finite loss or gradient (last at step "
                f"{global_step}, stage {stage.name}, task {task}); stopping. The last good checkpoint "
                f"(step {checkpointer.latest_step()}) is intact. Lower the learning rate, check the data, "
                "or raise config.max_consecutive_skips.")
        else:
          consecutive = 0
        nnx.update((trainee, optimizer), state)
        writer.progress_update(1, float(metrics["loss"]))
        if global_step % int(config.log_every) == 0 or stage_step == n_steps:
          dt = max(time.perf_counter() - t_last, 1e-9)
          row = {"stage": stage.name, "task": task, "examples_per_s": examples_since / dt,
                 "tokens_per_s": tokens_since / dt, "skipped_total": skipped_total,
                 "records_skipped_total": records.skipped,
                 "learning_rate": float(optim.schedule(ocfg, n_steps)(stage_step - 1))}
          row.update({k: float(v) for k, v in metrics.items() if np.ndim(v) == 0})
          row.update({f"data/{k}": float(v) for k, v in host.items()
                      if np.ndim(v) == 0 and k not in ("task_index",)})
          capacity = sum(v.size for k, v in host.items() if k.endswith("_tokens") and np.ndim(v) == 2)
          row["nonpad_fraction"] = float(host["num_tokens"]) / max(capacity, 1)
          row["data/batch_crc"] = zlib.crc32(host["query_tokens"].tobytes())
          writer.write(global_step, row)
          t_last, examples_since, tokens_since = time.perf_counter(), 0, 0
        stage_done = stage_step == n_steps
        if eval_fn is not None and (stage_done or (config.get("eval_every") and
                                                   global_step % int(config.eval_every) == 0)):
          last_eval = eval_fn(trainee.model, global_step, stage.name)
          writer.write(global_step, dict(last_eval))
        if jax.process_count() > 1:  # every process must agree to stop at the same step
          preemption.requested = distributed.any_process(preemption.requested)
        if stage_done:
          # The export commits before the stage's last checkpoint is saved. A kill between the two leaves
          # the export and an older checkpoint: the re-run replays to here and finds the export written
          # (the same bits: resume is exact). The other order is repaired at resume (above).
          export_stage(workdir, config, trainee, stage.name, global_step)
          kill("export", global_step)
        if preemption.requested or stage_done or global_step % int(config.checkpoint.every) == 0:
          _save(checkpointer, config, trainee, optimizer, it, si, stage_step, global_step, skipped_total,
                records)
          kill("save", global_step)
          if kill.wants("checkpoint", global_step):
            checkpointer.wait()
            kill("checkpoint", global_step)
        if preemption.requested:
          preempted = True
          break
      steps_compiled += steps.num_compiled
      writer.progress_end()
      del state
      if preempted:
        break
  return TrainResult(global_step=global_step, preempted=preempted, skipped_steps=skipped_total,
                     compiled_steps=steps_compiled, trainee=trainee,
                     last_eval=last_eval if not preempted else None)


def _train_tree(trainee, optimizer) -> dict:
  return {"optimizer": nnx.to_pure_dict(nnx.state(optimizer)),
          "loss": nnx.to_pure_dict(nnx.state(trainee.loss))}


def _set_train_tree(trainee, optimizer, tree) -> None:
  opt_state = nnx.state(optimizer)
  nnx.replace_by_pure_dict(opt_state, tree["optimizer"])
  nnx.update(optimizer, opt_state)
  loss_state = nnx.state(trainee.loss)
  nnx.replace_by_pure_dict(loss_state, tree["loss"])
  nnx.update(trainee.loss, loss_state)


def model_meta(config, step: int, trainee=None) -> dict[str, Any]:
  """What a parameters-only checkpoint needs to be loaded on its own (by Embedder, soups, init_from).

  The loss's learnable scalars (temperature, sigmoid bias) ride along as exact float32 values in JSON,
  so that they carry over into the next stage, a resumed run or a fine-tuning variant.
  """
  meta = {"step": step, "model_config": ModelConfig.from_dict(config.model.to_dict()).to_dict(),
          "tokenizer": config.get("tokenizer") or "",
          "task_strings": {n: t.get("task_string", "") for n, t in config.tasks.items()}}
  if trainee is not None:
    meta["loss_params"] = {k: float(jax.device_get(v[...])) for k, v in trainee.loss.items()}
  return meta


def set_loss_params(trainee, meta: dict[str, Any]) -> None:
  """Loss scalars from a checkpoint's meta, where it has them under the same names."""
  saved = meta.get("loss_params") or {}
  for k, v in trainee.loss.items():
    if k in saved:
      v[...] = jax.device_put(np.float32(saved[k]), v[...].sharding)


def stage_export_path(workdir, stage_name: str) -> epath.Path:
  return epath.Path(workdir) / "stages" / stage_name


def _export_step(workdir, stage_name: str) -> int | None:
  """The step of stage `stage_name`'s finished export, or None (absent, or only a temporary directory)."""
  path = stage_export_path(workdir, stage_name)
  if not distributed.any_process(path.exists()):
    return None
  reader = ckpt_lib.Checkpointer(path, read_only=True)
  step = reader.latest_step()
  reader.close()
  return step


def export_stage(workdir, config, trainee, stage_name: str, step: int) -> None:
  """Keeps each stage's final parameters in WORKDIR/stages/NAME (outside the retention policy), so a
  later stage, a fine-tuning variant or a soup can start from them.

  Idempotent: an export already committed at `step` is kept. A re-run only gets here again by replaying
  the same steps from a checkpoint, and resume is exact, so it holds the same bits.
  """
  if _export_step(workdir, stage_name) == step:
    logging.info("stage %s: export at step %d already committed; kept", stage_name, step)
    return
  ck = ckpt_lib.Checkpointer(stage_export_path(workdir, stage_name), keep=1, async_save=False)
  try:
    ck.save(step, params=model_params(trainee), meta=model_meta(config, step, trainee), force=True)
  finally:
    ck.close()


def _save(checkpointer, config, trainee, optimizer, it, stage_index, stage_step, global_step,
          skipped_total, records):
  # Each process holds its own pack groups' iterator state; merged, it restores on any process layout.
  states = distributed.allgather_json(it.get_state())
  data_state = states[0] if len(states) == 1 else pipeline.merge_states(states)
  meta = model_meta(config, global_step, trainee)
  meta.update({
      "stage_index": stage_index, "stage_step": stage_step,
      "stage_name": config.stages[stage_index].name, "data_state": data_state,
      "fingerprint": _canonical(fingerprint(config)), "skipped_total": skipped_total,
      "process_count": jax.process_count(), "num_groups": it.num_groups,
      "records_skipped": records.skipped, "records_read": records.read,
  })
  checkpointer.save(global_step, params=model_params(trainee), train=_train_tree(trainee, optimizer),
                    meta=meta, force=True)
