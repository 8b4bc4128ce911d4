"""The stage-scheduled training loop.

  config.stages = [pft, ft, ...]        each with its own steps, tasks and rates, optimizer, freezing
  for stage in stages[resume_stage:]:
    optimizer <- AdamW schedule of this stage (fresh state; parameters carried over)
    data      <- PFT: every batch mixes tasks at fixed rates | FT: one task per batch, sampled by rate
    for step: batch -> compiled step for this task's shape (cached) -> metrics / eval / checkpoint

Reading order: config checks -> tokenizer -> model -> data -> `train` (the resume order is written
beside it) -> resume -> run stage -> guard rails -> log -> checkpoints.

Guard rails: a step with a non-finite loss or gradient changes nothing and is counted; after
`config.max_consecutive_skips` in a row the run stops with an error (the last checkpoint, written before
the streak, is intact). SIGTERM (a preemption notice) saves at the current step and exits with code 0.
Tests inject kills, SIGTERM and non-finite batches through `embed2/train/faults.py`, consulted on the host.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import signal
import time
import zlib
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from absl import logging
from etils import epath
from flax import nnx
from ml_collections import config_dict

from embed2 import checkpoint as ckpt_lib
from embed2 import convert
from embed2 import distributed
from embed2 import losses
from embed2 import sharding
from embed2.data import interleave
from embed2.data import pipeline
from embed2.data import tokenizer as tokenizer_lib
from embed2.data.tokenizer import Tokenizer
from embed2.model import EmbeddingModel, ModelConfig
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
_TASK_KEYS = ("source", "task_string", "p_drop", "in_batch_negatives", "data_dir", "fields")
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
  data_workers(config)


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


def _same_model(a, b) -> bool:
  """Two `config.model` dicts name the same model: compared as the ModelConfig each builds, so a preset's
  defaults written out or left implicit, or media fields stored flat (runs before `MediaConfig`) or
  nested, are the same model."""
  try:
    return ModelConfig.from_dict(a).to_dict() == ModelConfig.from_dict(b).to_dict()
  except (TypeError, ValueError):
    return a == b


def _task_identity(tasks):
  """`config.tasks` without where each task's prepared data lives (`data_dir`): a dataset copied to a bucket
  is the same data (embed2.prepare refuses to write a different dataset under the same name and version)."""
  if not isinstance(tasks, dict):
    return tasks
  return {n: ({k: v for k, v in t.items() if k != "data_dir"} if isinstance(t, dict) else t)
          for n, t in tasks.items()}


def check_workdir_compatible(config, meta: dict[str, Any], workdir) -> None:
  want, have = _canonical(fingerprint(config)), meta.get("fingerprint")
  if have is None:
    raise ValueError(f"workdir {workdir} holds a checkpoint without a config fingerprint; use a new workdir")
  for key in _IDENTITY_FIELDS:
    if key == "model":
      same = _same_model(want.get(key), have.get(key))
    elif key == "tasks":
      same = _task_identity(want.get(key)) == _task_identity(have.get(key))
    else:
      same = want.get(key) == have.get(key)
    if not same:
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


def build_trainee(config, mesh, rules, resume: tuple[str, dict[str, Any]] | None = None) -> step_lib.Trainee:
  """The model and the loss's learnable scalars, sharded over `mesh`, with their values from the first
  that applies: the checkpoint a run resumes (`resume` = (its path, its meta)); `config.init_from`
  (an import or an earlier run) and/or `config.vision_init_from` (a ViT frontend's tower, loaded last,
  with or without init_from); `config.seed`."""
  model_cfg = ModelConfig.from_dict(config.model.to_dict())
  loss_params = losses.init_loss_params(loss_config(config))
  seed = int(config.seed)

  def factory():
    return step_lib.Trainee(EmbeddingModel(model_cfg, rules=rules, rngs=nnx.Rngs(seed)), loss_params)

  trainee = sharding.create_sharded(factory, mesh, rules)
  if resume is not None:
    path, meta = resume
    ckpt_lib.load_model_params(trainee.model, path)
    set_loss_params(trainee, meta)
    return trainee
  if config.get("init_from"):
    set_loss_params(trainee, ckpt_lib.load_model_params(trainee.model, config.init_from))
    logging.info("initialised from %s", config.init_from)
  if config.get("vision_init_from"):  # after init_from: its tower (if it has one) is replaced
    init_vision(trainee.model, config.vision_init_from)
  return trainee


def init_vision(model: EmbeddingModel, path: str) -> None:
  """Loads converted Gemma 3 vision weights (`embed2.convert`'s OUT/vision) into the `vit` frontend."""
  if model.cfg.media.image_frontend != "vit":
    raise ValueError(f"config.vision_init_from={path!r} needs config.model.media.image_frontend='vit' (got "
                     f"{model.cfg.media.image_frontend!r}); the SigLIP weights load into the ViT frontend")
  convert.load_vision_params(model.image_frontend.encoder, path)
  logging.info("vision frontend initialised from %s", path)


# ------------------------------------------------------------------------------ data


def input_encoder(config, tokenizer) -> interleave.InputEncoder | None:
  """The encoder of media and interleaved inputs for the config's model; None for a text-only model
  (text keeps the plain tokenizing pipeline)."""
  model_cfg = ModelConfig.from_dict(config.model.to_dict())
  return interleave.InputEncoder(tokenizer, model_cfg) if len(model_cfg.media.modalities) > 1 else None


def data_workers(config) -> int:
  """`config.data_workers`: decode threads of the input pipeline (0: the training thread decodes; N: N
  threads read ahead and one more assembles the next batch during the train step). The batches, and so
  the run, are the same for every count, and a run may resume with another."""
  value = config.get("data_workers", 0)
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise ValueError(f"config.data_workers={value!r} must be an int >= 0 (0 = decode in the training "
                     "thread, N = N decode threads; about the host's free cores)")
  return value


def stage_iterator(config, stage, data: Mapping[str, TaskData], tokenizer, num_groups: int,
                   stage_index: int) -> pipeline.StageIterator:
  """Stage `stage_index`'s data iterator, as the trainer builds it; `close()` it when done (it may hold
  `config.data_workers` threads)."""
  tasks = []
  for name, rate in dict(stage.tasks).items():
    tc = config.tasks[name]
    tasks.append(pipeline.TaskSpec(
        name=name, examples=data[name].train, rate=float(rate), task_string=tc.get("task_string", ""),
        p_drop=float(tc.get("p_drop", 0.0)),
        batch=stage_batch_spec(tc, f"config.tasks.{name}", stage) if stage.mode == "ft" else None))
  seed = int(config.seed) * 1000 + stage_index
  kw = dict(tokenizer=tokenizer, num_groups=num_groups, seed=seed, process_index=jax.process_index(),
            process_count=jax.process_count(), encoder=input_encoder(config, tokenizer),
            workers=data_workers(config))
  if stage.mode == "pft":
    return pipeline.build_pft_iterator(tasks, stage_batch_spec(stage.batch, f"{stage.name}.batch", stage), **kw)
  return pipeline.build_ft_iterator(tasks, **kw)


# ----------------------------------------------------------------------------- train
#
# Resume order (a re-run of the same command on the same workdir); each step needs the ones above it:
#   1. `train`: the config is validated, then compared with the workdir's latest finished checkpoint
#      (`_latest_checkpoint`: its fingerprint and tokenizer); a mismatch is refused before anything is
#      written. The run keeps that checkpoint's pack groups, so its batches can continue on another mesh.
#   2. `build_trainee`: the model is built sharded, then the checkpoint's parameters and loss scalars are
#      restored onto it.
#   3. `_resume_point`: the stage index and the step within it, from the checkpoint's meta. A checkpoint
#      at a stage's last step moves on to the next stage, first writing the stage's export if the kill
#      came between the two commits of the stage end.
#   4. `_stage_state`: that stage's optimizer is rebuilt and its state restored (not when the stage had
#      just ended: the next stage starts with a fresh optimizer);
#   5. `_stage_state`: the stage's data iterator is rebuilt and its state restored, so the batches
#      continue exactly; the skip counts continue from the meta.


@dataclasses.dataclass
class TrainResult:
  global_step: int
  preempted: bool
  skipped_steps: int
  compiled_steps: int
  trainee: Any
  last_eval: dict[str, float] | None = None  # the eval_fn results at the end of the last stage run


def train(config, workdir: str, data: Mapping[str, TaskData], *,
          eval_fn: Callable[[EmbeddingModel, int, str], dict[str, float]] | None = None) -> TrainResult:
  """Runs (or resumes) every stage of `config` in `workdir`.

  Args:
    config: the experiment ConfigDict (see configs/demo.py for the fields).
    workdir: where checkpoints, metrics (`metrics_writer`: JSON lines and TensorBoard events) go.
    data: task name -> TaskData for every task the stages use.
    eval_fn: called as eval_fn(model, global_step, stage_name) every `config.eval_every` steps and at the
      end of each stage; returns scalars to log (named as they should appear, e.g. "eval/demo/...").
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

  latest, meta = _latest_checkpoint(config, workdir, tokenizer, tokenizer_path)  # resume 1
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
    run = _Run(config=config, workdir=workdir, data=data, mesh=mesh, rules=rules, num_groups=num_groups,
               tokenizer=tokenizer, checkpointer=checkpointer, writer=writer, eval_fn=eval_fn,
               faults=faults.Faults.from_env())
    result = _run_stages(run, latest, meta)
  except BaseException:
    # Pending saves are of good states: let them finish, but never let a failure to close hide the
    # error that brought us here.
    _close_quietly(checkpointer, writer)
    raise
  checkpointer.close()
  writer.close()
  return result


@dataclasses.dataclass(frozen=True)
class _Run:
  """What every stage of one `train` call shares."""
  config: config_dict.ConfigDict  # normalized; `tokenizer` set to what the checkpoints record
  workdir: epath.Path
  data: Mapping[str, TaskData]
  mesh: jax.sharding.Mesh
  rules: tuple[tuple[str, Any], ...]  # logical axis -> mesh axes (config.sharding_rules)
  num_groups: int  # pack groups of the global batch (the checkpoint's on a resume)
  tokenizer: Tokenizer
  checkpointer: ckpt_lib.Checkpointer
  writer: MetricsWriter
  eval_fn: Callable[[EmbeddingModel, int, str], dict[str, float]] | None
  faults: faults.Faults  # the test seam ($EMBED2_FAULTS); empty in a real run


@dataclasses.dataclass
class _Progress:
  """What carries over from step to step and stage to stage (the checkpoints' meta keeps the counts)."""
  global_step: int
  skipped_total: int  # steps whose update was skipped (non-finite loss or gradient)
  records: _RecordSkips
  consecutive: int = 0  # skipped steps in a row, in this stage
  compiled_steps: int = 0
  last_eval: dict[str, float] | None = None
  preempted: bool = False


def _run_stages(run: _Run, latest: int | None, meta: dict[str, Any] | None) -> TrainResult:
  """The stages of `train`, from the resume point (`latest`, `meta`: the checkpoint resumed, or None)."""
  config = run.config
  resume = (str(run.workdir / "checkpoints" / str(latest)), meta) if meta is not None else None
  trainee = build_trainee(config, run.mesh, run.rules, resume)  # resume 2
  _check_freeze_patterns(config, trainee)
  if meta is not None:
    logging.info("resuming from step %d (stage %d, step %d of it)", latest, meta["stage_index"],
                 meta["stage_step"])
  start_stage, start_stage_step = _resume_point(run, trainee, latest, meta)  # resume 3
  progress = _Progress(global_step=latest or 0,
                       skipped_total=int(meta.get("skipped_total", 0)) if meta else 0,
                       records=_RecordSkips(config, meta))
  with _Preemption() as preemption:
    for si in range(start_stage, len(config.stages)):
      # Only the stage the run resumes inside starts past its step 0; it restores from the checkpoint.
      stage_step = start_stage_step if si == start_stage else 0
      _run_stage(run, trainee, si, stage_step, (latest, meta) if stage_step else None, progress, preemption)
      if progress.preempted:
        break
  return TrainResult(global_step=progress.global_step, preempted=progress.preempted,
                     skipped_steps=progress.skipped_total, compiled_steps=progress.compiled_steps,
                     trainee=trainee, last_eval=None if progress.preempted else progress.last_eval)


def _check_freeze_patterns(config, trainee) -> None:
  """Refuses a stage's freeze pattern that matches no parameter before the first step, not when (hours
  later) that stage begins."""
  params = nnx.state(trainee, nnx.Param)
  for si, stage in enumerate(config.stages):
    freeze = optim_config(stage).freeze
    if freeze:
      optim.param_labels(params, freeze, where=f"config.stages[{si}].optim")


def _close_quietly(checkpointer, writer) -> None:
  for thing in (checkpointer, writer):
    if thing is None:
      continue
    try:
      thing.close()
    except Exception as e:  # pylint: disable=broad-except
      logging.error("while stopping on an error, closing %s failed too: %s", type(thing).__name__, e)


# ---------------------------------------------------------------------------- resume


def _latest_checkpoint(config, workdir: epath.Path, tokenizer: Tokenizer,
                       tokenizer_path: str) -> tuple[int | None, dict[str, Any] | None]:
  """(step, meta) of the workdir's latest finished checkpoint, or (None, None) for a fresh run; refuses
  a checkpoint of another config (`check_workdir_compatible`) or another tokenizer."""
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
  return latest, meta


def _resume_point(run: _Run, trainee, latest: int | None, meta: dict[str, Any] | None) -> tuple[int, int]:
  """(stage index, steps done in it) where the run continues; (0, 0) for a fresh run."""
  if meta is None:
    return 0, 0
  stage_index, stage_step = meta["stage_index"], meta["stage_step"]
  if stage_step >= int(run.config.stages[stage_index].steps):
    # The checkpoint is a stage's last step. Its export may not have been committed (a kill between the
    # two commits of a stage end, or a workdir of an older version that saved the checkpoint first):
    # write it from the restored parameters, which are the ones the stage ended with.
    export_stage(run.workdir, run.config, trainee, run.config.stages[stage_index].name, latest)
    return stage_index + 1, 0
  return stage_index, stage_step


def _stage_state(run: _Run, trainee, si: int, ocfg: optim.OptimConfig,
                 restore: tuple[int, dict[str, Any]] | None) -> tuple[nnx.Optimizer, pipeline.StageIterator]:
  """Stage `si`'s optimizer (over the trainee's parameters as they are) and data iterator, both at the
  stage's start, or with their state from checkpoint `restore` = (step, meta) when resuming inside it."""
  stage = run.config.stages[si]
  tx = optim.make_optimizer(ocfg, int(stage.steps), nnx.state(trainee, nnx.Param),
                            where=f"config.stages[{si}].optim")
  with jax.set_mesh(run.mesh):
    optimizer = nnx.Optimizer(trainee, tx, wrt=nnx.Param)
  it = stage_iterator(run.config, stage, run.data, run.tokenizer, run.num_groups, si)
  if restore is not None:
    step, meta = restore
    restored = run.checkpointer.restore(step, params=ckpt_lib.abstract_like(model_params(trainee)),
                                        train=ckpt_lib.abstract_like(_train_tree(trainee, optimizer)))
    _set_train_tree(trainee, optimizer, restored["train"])  # resume 4
    it.set_state(meta["data_state"])  # resume 5
  return optimizer, it


# ------------------------------------------------------------------------- run stage


def _run_stage(run: _Run, trainee, si: int, stage_step: int, restore: tuple[int, dict[str, Any]] | None,
               progress: _Progress, preemption: _Preemption) -> None:
  """Trains stage `si` from its step `stage_step` to its end, or until a preemption (then
  `progress.preempted`). Each step: a batch from the stage's iterator -> the compiled step of its task's
  shape (compiled once, cached) -> guard rail -> log -> eval -> stage export at the end -> checkpoint."""
  config, writer = run.config, run.writer
  stage = config.stages[si]
  n_steps = int(stage.steps)
  ocfg = optim_config(stage)
  optimizer, it = _stage_state(run, trainee, si, ocfg, restore)
  graphdef, state = nnx.split((trainee, optimizer))
  steps = step_lib.StepFunctions(graphdef, jax.tree.map(lambda x: x.sharding, state), run.mesh,
                                 run.num_groups)
  task_names = list(dict(stage.tasks))
  loss_cfgs = {n: loss_config(config, config.tasks[n]) for n in task_names}
  pft_loss = loss_config(config)
  gc_chunks = int(stage.get("grad_cache_chunks", 0))
  progress.consecutive = 0
  writer.progress_start(stage.name, stage_step, n_steps)
  throughput = _Throughput()
  while stage_step < n_steps:
    host = next(it)
    progress.records.update(host, progress.global_step, stage.name)
    inputs = run.faults.before_step(progress.global_step, host)  # `host` itself in a real run
    task_i = int(host["task_index"])
    task = "mixture" if task_i < 0 else task_names[task_i]
    batch = step_lib.device_batch(inputs, run.mesh)
    compiled_before = steps.num_compiled
    fn = steps.get(task, pft_loss if task_i < 0 else loss_cfgs[task], state, batch, grad_cache_chunks=gc_chunks)
    state, metrics = fn(state, batch)
    metrics = jax.device_get(metrics)
    throughput.add(host, compiled=steps.num_compiled != compiled_before)
    progress.global_step += 1
    stage_step += 1
    step = progress.global_step
    _count_skip(run, progress, metrics, stage.name, task)
    nnx.update((trainee, optimizer), state)
    writer.progress_update(1, float(metrics["loss"]))
    stage_done = stage_step == n_steps
    if step % int(config.log_every) == 0 or stage_done:
      lr = float(optim.schedule(ocfg, n_steps)(stage_step - 1))
      writer.write(step, _log_row(host, metrics, stage.name, task, lr, throughput, progress))
      throughput.restart()
    if run.eval_fn is not None and (stage_done or (config.get("eval_every") and
                                                   step % int(config.eval_every) == 0)):
      progress.last_eval = run.eval_fn(trainee.model, step, stage.name)
      writer.write(step, dict(progress.last_eval))
    if jax.process_count() > 1:  # every process must agree to stop at the same step
      preemption.requested = distributed.any_process(preemption.requested)
    if stage_done:
      # The export commits before the stage's last checkpoint is saved. A kill between the two leaves
      # the export and an older checkpoint: the re-run replays to here and finds the export written
      # (the same bits: resume is exact). The other order is repaired at resume (`_resume_point`).
      export_stage(run.workdir, config, trainee, stage.name, step)
      run.faults.after_export(step)
    if preemption.requested or stage_done or step % int(config.checkpoint.every) == 0:
      _save(run.checkpointer, config, trainee, optimizer, it, si, stage_step, step, progress)
      run.faults.after_save(step, run.checkpointer.wait)
    if preemption.requested:
      progress.preempted = True
      break
  it.close()  # its decode threads (config.data_workers) end with the stage
  progress.compiled_steps += steps.num_compiled
  writer.progress_end()


def _count_skip(run: _Run, progress: _Progress, metrics: Mapping[str, Any], stage_name: str, task: str) -> None:
  """Counts a step whose update was skipped (the step left the state as it was); the guard rail stops
  the run after `config.max_consecutive_skips` in a row."""
  if not int(metrics["skipped"]):
    progress.consecutive = 0
    return
  progress.consecutive += 1
  progress.skipped_total += 1
  step = progress.global_step
  logging.warning("step %d: non-finite loss or gradient (loss=%s, grad_norm=%s); update skipped "
                  "(%d in a row, %d in total)", step, metrics["loss"], metrics["grad_norm"],
                  progress.consecutive, progress.skipped_total)
  run.writer.write(step, {"skipped_total": progress.skipped_total, "stage": stage_name, "task": task})
  if progress.consecutive >= int(run.config.get("max_consecutive_skips", 5)):
    raise TrainingStopped(
        f"{progress.consecutive} consecutive steps had a non-finite loss or gradient (last at step "
        f"{step}, stage {stage_name}, task {task}); stopping. The last good checkpoint "
        f"(step {run.checkpointer.latest_step()}) is intact. Lower the learning rate, check the data, "
        "or raise config.max_consecutive_skips.")


# ----------------------------------------------------------------------- guard rails


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


# ------------------------------------------------------------------------------- log


class _Throughput:
  """Examples and tokens per second since the last logged row, the steps that compiled left out."""

  def __init__(self):
    self.restart()

  def restart(self) -> None:
    self.t0, self.examples, self.tokens = time.perf_counter(), 0, 0

  def add(self, host: Mapping[str, Any], compiled: bool) -> None:
    if compiled:  # keep compilation out of the throughput figures
      self.restart()
    else:
      self.examples += int(np.sum(host["example_valid"]))
      self.tokens += int(host.get("num_tokens", 0))

  def rates(self) -> dict[str, float]:
    dt = max(time.perf_counter() - self.t0, 1e-9)
    return {"examples_per_s": self.examples / dt, "tokens_per_s": self.tokens / dt}


def _log_row(host: Mapping[str, Any], metrics: Mapping[str, Any], stage_name: str, task: str,
             learning_rate: float, throughput: _Throughput, progress: _Progress) -> dict[str, Any]:
  """One metrics row: the step's metrics, the batch's statistics (`data/...`, its CRC), throughput."""
  row = {"stage": stage_name, "task": task, **throughput.rates(), "skipped_total": progress.skipped_total,
         "records_skipped_total": progress.records.skipped, "learning_rate": learning_rate}
  row.update({k: float(v) for k, v in metrics.items() if np.ndim(v) == 0})
  row.update({f"data/{k}": float(v) for k, v in host.items() if np.ndim(v) == 0 and k not in ("task_index",)})
  capacity = sum(v.size for k, v in host.items() if k.endswith("_tokens") and np.ndim(v) == 2)
  row["nonpad_fraction"] = float(host["num_tokens"]) / max(capacity, 1)
  # The batch's identity, to compare a resumed run's batches with an uninterrupted run's.
  row["data/batch_crc"] = zlib.crc32(host["query_tokens"].tobytes())
  return row


# ----------------------------------------------------------------------- checkpoints


def model_params(trainee) -> dict:
  return nnx.to_pure_dict(nnx.state(trainee.model, nnx.Param))


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
          progress: _Progress):
  # Each process holds its own pack groups' iterator state; merged, it restores on any process layout.
  states = distributed.allgather_json(it.get_state())
  data_state = states[0] if len(states) == 1 else pipeline.merge_states(states)
  meta = model_meta(config, global_step, trainee)
  meta.update({
      "stage_index": stage_index, "stage_step": stage_step,
      "stage_name": config.stages[stage_index].name, "data_state": data_state,
      "fingerprint": _canonical(fingerprint(config)), "skipped_total": progress.skipped_total,
      "process_count": jax.process_count(), "num_groups": it.num_groups,
      "records_skipped": progress.records.skipped, "records_read": progress.records.read,
  })
  checkpointer.save(global_step, params=model_params(trainee), train=_train_tree(trainee, optimizer),
                    meta=meta, force=True)
