"""Orbax checkpoints of a training run, and of anything that holds model parameters (soups, imports).

A checkpoint is a step directory `DIR/<step>/` with three items:

  params  the model's parameters (a nested dict of arrays, as `nnx.to_pure_dict`)
  train   optimizer state, RNG key data, and other arrays needed to continue exactly (absent in a soup)
  meta    JSON: step, stage index, data-iterator and sampler state, the model config, the config
          fingerprint, and free-form extras

Orbax writes each step into a temporary directory and renames it only when every process has finished,
so a step directory that exists is complete; `CheckpointManager` lists only finished steps, and a
leftover `*.orbax-checkpoint-tmp-*` directory from a killed run is never restored.
On an object store (`gs://`: tensorstore's own GCS driver for the arrays, epath for the rest) there is
no rename: Orbax writes the step in place and marks it finished with a `commit_success.txt` last.

Restoring takes an abstract target (ShapeDtypeStruct with shardings) for each array item, so a checkpoint
written on one mesh restores directly, shard by shard, onto another.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx

from embed2 import sharding
from embed2.model import EmbeddingModel, ModelConfig, presets

# The frontends: each is both the EmbeddingModel attribute and the MediaConfig field that switches it on.
FRONTENDS = ("image_frontend", "audio_frontend")

ITEMS = ("params", "train", "meta")


def is_remote(path: str | os.PathLike) -> bool:
  """Whether `path` is on an object store (gs://bucket/..., s3://bucket/...): no append, no rename, no
  local file for numpy or pyarrow to map; every tool goes through epath or Orbax there."""
  return "://" in os.fspath(path)


def architecture(cfg: ModelConfig) -> dict[str, Any]:
  """The fields of a model config that decide its parameters, flat: a nested config's fields are
  dotted names (`"media.image_size"`). Every field but those the dataclasses mark parameter-free
  (`presets.parameter_free`: dtype, kernels, limits, ...), across a change of which a checkpoint loads."""
  out = {}
  for f in dataclasses.fields(cfg):
    if f.metadata.get(presets.PARAMETER_FREE):
      continue
    v = getattr(cfg, f.name)
    if dataclasses.is_dataclass(v):
      out.update({f"{f.name}.{k}": x for k, x in architecture(v).items()})
    else:
      out[f.name] = v
  return out


class Checkpointer:
  """Saves and restores training checkpoints in `directory` (created on first save)."""

  def __init__(self, directory: str | os.PathLike, *, every: int = 1, keep: int | None = 3,
               async_save: bool = True, read_only: bool = False):
    self.directory = epath.Path(directory)
    if not is_remote(self.directory):  # Orbax restores from absolute paths only
      self.directory = self.directory.absolute()
    if read_only:  # (the save options would only draw warnings)
      options = ocp.CheckpointManagerOptions(save_interval_steps=0, max_to_keep=None, create=False,
                                             read_only=True)
    else:
      options = ocp.CheckpointManagerOptions(save_interval_steps=max(1, int(every)), max_to_keep=keep,
                                             enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  # ---------------------------------------------------------------------------- queries

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def read_meta(self, step: int | None = None) -> dict[str, Any]:
    step = self._resolve(step)
    out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out["meta"])

  def has_item(self, step: int, item: str) -> bool:
    return (self.directory / str(step) / item).exists()

  # ------------------------------------------------------------------------------- save

  def save(self, step: int, *, params: Any, meta: dict[str, Any], train: Any = None,
           force: bool = False) -> bool:
    """Starts saving (asynchronously) if `step` is on the interval or `force`; returns whether it did."""
    items = dict(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta))
    if train is not None:
      items["train"] = ocp.args.StandardSave(train)
    saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
    if saved:
      logging.info("checkpoint: saving step %d to %s", step, self.directory)
    return saved

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  # ---------------------------------------------------------------------------- restore

  def restore(self, step: int | None = None, *, params: Any, train: Any = None) -> dict[str, Any]:
    """Restores `params` (and `train` if given) onto the shardings of the abstract targets.

    Args:
      step: a finished step; None = the latest.
      params: abstract pytree (jax.ShapeDtypeStruct with .sharding) of the parameters.
      train: abstract pytree of the training state, or None to skip it (inference, soups).

    Returns:
      dict with "params", "meta" and (if asked) "train".
    """
    step = self._resolve(step)
    items = dict(params=ocp.args.StandardRestore(params), meta=ocp.args.JsonRestore())
    if train is not None:
      if not self.has_item(step, "train"):
        raise ValueError(f"checkpoint {self.directory / str(step)} has no training state (a soup or an "
                         "imported model?); start a new run from it with config.init_from instead")
      items["train"] = ocp.args.StandardRestore(train)
    out = self._manager.restore(step, args=ocp.args.Composite(**items))
    return {k: out[k] for k in items}

  def _resolve(self, step: int | None) -> int:
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise FileNotFoundError(f"no finished checkpoint in {self.directory} (unfinished temporary "
                                "directories are ignored); train first or point to another directory")
      return max(steps)
    if step not in steps:
      raise FileNotFoundError(f"checkpoint step {step} is not a finished checkpoint in {self.directory}; "
                              f"finished steps: {steps}")
    return step


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs carrying each array's sharding: the restore target that places a checkpoint onto
  the same devices and layout as `tree`."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def restore_params_into(module, checkpointer: "Checkpointer", step: int) -> None:
  """Restores a checkpoint's `params` item into an NNX module, in place, on the module's own shardings."""
  state = nnx.state(module, nnx.Param)
  restored = checkpointer.restore(step, params=abstract_like(nnx.to_pure_dict(state)))
  nnx.replace_by_pure_dict(state, restored["params"])
  nnx.update(module, state)


def resolve_checkpoint_path(path: str | os.PathLike) -> tuple[epath.Path, int]:
  """Accepts a checkpoints directory (latest step), a step directory, or a workdir holding `checkpoints/`."""
  p = epath.Path(path)
  if not p.exists():
    raise FileNotFoundError(f"checkpoint path {p} does not exist")
  if (p / "params").exists() and (p / "meta").exists() and p.name.isdigit():
    return p.parent, int(p.name)
  if (p / "checkpoints").exists():
    p = p / "checkpoints"
  ckpt = Checkpointer(p, read_only=True)
  step = ckpt.latest_step()
  if step is None:
    raise FileNotFoundError(f"no finished checkpoint under {path} (unfinished temporary directories are "
                            "ignored)")
  return p, step


def read_checkpoint(path: str | os.PathLike) -> tuple[epath.Path, int, dict[str, Any]]:
  """(checkpoints directory, step, meta) of a checkpoint `resolve_checkpoint_path` accepts.

  Raises:
    FileNotFoundError: nothing finished there.
    ValueError: the meta has no model config (not written by embed2's trainer, soup or import).
  """
  directory, step = resolve_checkpoint_path(path)
  meta = Checkpointer(directory, read_only=True).read_meta(step)
  if "model_config" not in meta:
    raise ValueError(f"checkpoint {directory}/{step} has no model_config in its meta; it was not "
                     "written by embed2's trainer, soup or import")
  return directory, step, meta


def load_model(path: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None, rules=None,
               dtype: str | None = None, attention_impl: str | None = None
               ) -> tuple[EmbeddingModel, dict[str, Any]]:
  """The model a checkpoint holds (a training run's, a soup, an import), placed on `mesh`.

  The model is built abstractly from the checkpoint's own config (shapes and shardings, no values) and
  the restore fills it shard by shard: no device ever holds more than its shard, so a model too large
  for one device loads onto a mesh that holds it.

  Args:
    path: a checkpoints directory (latest step), a step directory, or a workdir.
    mesh: default a data-parallel mesh over all devices.
    rules: logical-axis rules; default `sharding.DEFAULT_RULES`.
    dtype: compute dtype override ("float32" / "bfloat16"); parameters keep the checkpoint's dtype.
    attention_impl: attention kernel override (`embed2.model.attention`; e.g. "blockwise" for inputs
      longer than the run trained on); None keeps the checkpoint's.

  Returns:
    (model, meta).
  """
  directory, step, meta = read_checkpoint(path)
  cfg = ModelConfig.from_dict(meta["model_config"])
  if dtype is not None:
    cfg = cfg.replace(dtype=dtype)
  if attention_impl is not None:
    cfg = cfg.replace(attention_impl=attention_impl)
  mesh = mesh if mesh is not None else sharding.make_mesh()
  rules = tuple(rules) if rules is not None else sharding.DEFAULT_RULES
  model = sharding.abstract_sharded(lambda: EmbeddingModel(cfg, rules=rules, rngs=nnx.Rngs(0)), mesh,
                                    rules)
  load_model_params(model, directory / str(step))
  unfilled = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(nnx.state(model))
              if not isinstance(x, jax.Array)]
  if unfilled:
    raise ValueError(f"checkpoint {directory}/{step} did not provide {unfilled}")
  return model, meta


def load_model_params(model, path: str | os.PathLike) -> dict[str, Any]:
  """Restores a checkpoint's parameters onto an EmbeddingModel, in place, on the model's own shardings.

  The checkpoint may come from any mesh (restored shard by shard) and be a training checkpoint, a soup
  or an imported model. Fields that do not change the parameters (dtype, attention kernel, remat, max
  length, MRL dims) may differ; anything else is refused with the differing fields named.

  Returns:
    the checkpoint's meta dict.
  """
  directory, step = resolve_checkpoint_path(path)
  ck = Checkpointer(directory, read_only=True)
  meta = ck.read_meta(step)
  saved = ModelConfig.from_dict(meta["model_config"])
  want, have = architecture(saved), architecture(model.cfg)
  # A text model's checkpoint starts a multimodal model: its transformer and head load, the frontends
  # the checkpoint lacks keep their initialisation (or come from `vision_init_from`).
  missing = [f for f in FRONTENDS
             if getattr(saved.media, f) == "none" and getattr(model.cfg.media, f) != "none"]
  if missing:
    want = {k: v for k, v in want.items() if not k.startswith("media.")}
    have = {k: v for k, v in have.items() if not k.startswith("media.")}
  if want != have:
    diff = {k: (v, have.get(k)) for k, v in want.items() if have.get(k) != v}
    raise ValueError(f"checkpoint {path} has a different architecture: {diff} (checkpoint, config)")
  if not missing:
    restore_params_into(model, ck, step)
    return meta
  state = nnx.state(model, nnx.Param)
  pure = nnx.to_pure_dict(state)
  kept = {k: v for k, v in pure.items() if k not in missing}
  restored = ck.restore(step, params=abstract_like(kept))["params"]
  nnx.replace_by_pure_dict(state, {**pure, **restored})
  nnx.update(model, state)
  logging.info("loaded %s from %s; %s not in the checkpoint: kept at initialisation", sorted(kept), path,
               missing)
  return meta
