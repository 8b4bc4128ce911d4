"""The train step: embed the three sides of a packed batch, contrastive loss over global negatives,
AdamW update, and a skipped update when the loss or gradients are not finite.

  train_step(trainee, optimizer, batch) -> metrics

`Trainee` bundles the embedding model with the loss's own learnable parameters (the temperature's log
scale, the sigmoid bias), so one optimizer trains both while checkpoints and soups can still take the
model alone. `StepFunctions` jits the step once per batch shape (one per fine-tuning task), with the
training state donated and its shardings pinned, and keeps the compiled executables.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from embed2 import losses
from embed2 import sharding
from embed2.model import EmbeddingModel, gather_slots
from embed2.model.embedding_model import MEDIA_KEYS, ROW_KEYS
from embed2.train import grad_cache

SIDES = ("query", "positive", "negative")


class Trainee(nnx.Module):
  """The model plus the loss's learnable scalars (`log_scale`, `bias`), trained together."""

  def __init__(self, model: EmbeddingModel, loss_params: dict[str, jax.Array]):
    self.model = model
    self.loss = nnx.Dict({k: nnx.Param(jnp.asarray(v, jnp.float32), logical_axes=())
                          for k, v in loss_params.items()})


def batch_loss(trainee: Trainee, batch: dict[str, jax.Array], *, loss_fn: Callable, num_groups: int):
  """Contrastive loss of one packed batch; `loss_fn` is `losses.sharded_contrastive_loss(...)`."""
  e = trainee.model.embed_sides(batch, num_groups, [s for s in SIDES if f"{s}_tokens" in batch])
  q, p, neg = e["query"], e["positive"], e.get("negative")
  params = {k: v[...] for k, v in trainee.loss.items()}
  return loss_fn(q, p, neg_bkd=neg, neg_valid_bk=batch.get("negative_valid") if neg is not None else None,
                 q_ids_b=batch.get("query_ids"), p_ids_b=batch.get("positive_ids"),
                 valid_b=batch.get("example_valid"), **params)


def grad_cache_loss_and_grads(trainee: Trainee, batch: dict[str, jax.Array], *, loss_fn: Callable,
                              num_groups: int, num_chunks: int):
  """(loss, aux), grads of `batch_loss` computed with GradCache (embed2.train.grad_cache): the rows of
  every side are embedded in `num_chunks` chunks without keeping activations, then re-run chunk by
  chunk to pull dL/dE back. A media side's image / audio slots are encoded by the frontends in chunks
  of their own (at most `num_chunks` per side, each taking an equal piece of every pack group's
  slots), and the rows read their soft tokens from the whole side's frontend outputs, so every row
  sees exactly the soft tokens of a full-batch pass and the frontends get their gradient through
  them. Rows go through `EmbeddingModel.embed_rows`, the same path as `batch_loss`. Equal to
  `nnx.value_and_grad(batch_loss)` up to float summation order; activation memory of one chunk (plus
  the side's soft tokens and their gradient)."""
  graphdef, params, rest = nnx.split(trainee.model, nnx.Param, ...)
  sides = [s for s in SIDES if f"{s}_tokens" in batch]
  rows = {s: {k: batch[f"{s}_{k}"] for k in ROW_KEYS if f"{s}_{k}" in batch} for s in sides}
  slots = {s: {k: batch[f"{s}_{k}"] for k in MEDIA_KEYS if f"{s}_{k}" in batch} for s in sides}
  slots = {s: v for s, v in slots.items() if v}
  model_keys = {f"{s}_{k}" for s in sides for k in ROW_KEYS + MEDIA_KEYS}
  loss_inputs = {k: v for k, v in batch.items() if k not in model_keys}

  def model(p):
    return nnx.merge(graphdef, p, rest)

  def embed_fn(p, x, features):
    return model(p).embed_rows(x, num_groups, features=features or None)

  # The frontends exactly as `EmbeddingModel.media_features` runs them, one kind of slot at a time.
  feature_fns = {k: (lambda p, x, k=k: model(p).media_features({k: x})[k]) for k in MEDIA_KEYS}

  def loss_of_embeddings(embs, loss_params, li):
    e = {s: gather_slots(embs[s], li[f"{s}_slot"], num_groups) for s in sides}
    return loss_fn(e["query"], e["positive"], neg_bkd=e.get("negative"),
                   neg_valid_bk=li.get("negative_valid") if "negative" in e else None,
                   q_ids_b=li.get("query_ids"), p_ids_b=li.get("positive_ids"),
                   valid_b=li.get("example_valid"), **loss_params)

  fn = grad_cache.grad_cache_value_and_grad(embed_fn, loss_of_embeddings, num_chunks=num_chunks,
                                            num_groups=num_groups, has_aux=True,
                                            feature_fns=feature_fns)
  loss_params = {k: v[...] for k, v in trainee.loss.items()}
  value, (g_model, g_loss) = fn(params, loss_params, rows, loss_inputs, slots)
  grads = nnx.state(trainee, nnx.Param)
  nnx.replace_by_pure_dict(grads, {"model": nnx.to_pure_dict(g_model), "loss": g_loss})
  return value, grads


def train_step(trainee: Trainee, optimizer: nnx.Optimizer, batch: dict[str, jax.Array], *,
               loss_fn: Callable, num_groups: int, grad_cache_chunks: int = 0) -> dict[str, jax.Array]:
  """One update. A non-finite loss or gradient leaves the model and optimizer untouched.

  With `grad_cache_chunks` > 0 the gradient comes from GradCache (see `grad_cache_loss_and_grads`).

  Returns metrics: loss, per-MRL-dim losses and accuracies, temperature, grad norm, `skipped` (1 when
  the update was skipped), number of valid examples.
  """

  def objective(t):
    return batch_loss(t, batch, loss_fn=loss_fn, num_groups=num_groups)

  if grad_cache_chunks:
    (loss, aux), grads = grad_cache_loss_and_grads(trainee, batch, loss_fn=loss_fn, num_groups=num_groups,
                                                   num_chunks=grad_cache_chunks)
  else:
    (loss, aux), grads = nnx.value_and_grad(objective, has_aux=True)(trainee)
  grad_norm = optax.tree.norm(grads)
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  before = nnx.state((trainee, optimizer))
  # Non-finite gradients would poison AdamW's moments even if the update were masked afterwards, so
  # the optimizer sees zeros and the whole state is then put back.
  safe = jax.tree.map(lambda g: jnp.where(ok, g, jnp.zeros_like(g)), grads)
  optimizer.update(trainee, safe)
  after = nnx.state((trainee, optimizer))
  nnx.update((trainee, optimizer), jax.tree.map(lambda a, b: jnp.where(ok, a, b), after, before))
  metrics = {k: v for k, v in aux.items()}
  metrics.update(loss=loss, grad_norm=grad_norm, skipped=1 - ok.astype(jnp.int32),
                 temperature=1.0 / aux["scale"])
  return metrics


@dataclasses.dataclass
class StepFunctions:
  """Compiled train steps, one per batch signature (shapes and dtypes), compiled once and cached.

  Attributes:
    graphdef: the static structure of (trainee, optimizer).
    state_shardings: shardings of the training state (kept fixed across steps; the state is donated).
    mesh: the device mesh.
  """

  graphdef: Any
  state_shardings: Any
  mesh: jax.sharding.Mesh
  num_groups: int
  compiled: dict = dataclasses.field(default_factory=dict)
  compile_seconds: dict = dataclasses.field(default_factory=dict)

  def get(self, key: Any, loss_cfg: losses.LossConfig, state: Any, batch: dict[str, jax.Array],
          grad_cache_chunks: int = 0):
    sig = (key, loss_cfg, grad_cache_chunks,
           tuple(sorted((k, v.shape, str(v.dtype)) for k, v in batch.items())))
    if sig not in self.compiled:
      loss_fn = losses.sharded_contrastive_loss(self.mesh, cfg=loss_cfg)
      graphdef, num_groups = self.graphdef, self.num_groups

      def step(state, batch):
        trainee, optimizer = nnx.merge(graphdef, state)
        metrics = train_step(trainee, optimizer, batch, loss_fn=loss_fn, num_groups=num_groups,
                             grad_cache_chunks=grad_cache_chunks)
        return nnx.state((trainee, optimizer)), metrics

      t0 = time.perf_counter()
      with jax.set_mesh(self.mesh):
        jitted = jax.jit(step, donate_argnums=0, out_shardings=(self.state_shardings, None))
        self.compiled[sig] = jitted.lower(state, batch).compile()
      self.compile_seconds[sig] = time.perf_counter() - t0
      logging.info("compiled the train step for %s in %.1fs", key, self.compile_seconds[sig])
    return self.compiled[sig]

  @property
  def num_compiled(self) -> int:
    return len(self.compiled)


def device_batch(host_batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Host (process-local) numpy batch -> global arrays sharded over the batch axes.

  Every array's leading dim is rows or examples, which this process holds its own slice of; the global
  array is assembled with `jax.make_array_from_process_local_data`. 0-d entries (the batch's
  logging statistics) and non-array values stay on the host.
  """
  out = {}
  for k, v in host_batch.items():
    if not isinstance(v, np.ndarray) or v.ndim == 0:
      continue
    shard = sharding.batch_sharding(mesh, v.ndim)
    global_shape = (v.shape[0] * jax.process_count(),) + v.shape[1:]
    out[k] = jax.make_array_from_process_local_data(shard, v, global_shape)
  return out
