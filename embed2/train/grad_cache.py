"""GradCache: the exact full-batch contrastive gradient for batches far beyond activation memory.

A contrastive loss couples every example of the global batch (each query sees every target), so it
cannot be split into independent micro-batches like a per-example loss. But it only touches the
encoder through the embeddings, which are small. GradCache (Gao et al., 2021) splits the step in
three:

  1. Embed every chunk of every input group with `lax.map`, keeping only the embeddings
     E = f(theta, x) (no activations are stored: nothing is differentiated here).
  2. Evaluate the loss on the full set of embeddings and take G = dL/dE (and the gradient of the
     loss's own parameters, e.g. a learnable temperature). This is the only place the whole batch
     meets, and it needs only O(B d) memory (with the blockwise loss of `embed2.losses`).
  3. For each chunk again (`lax.scan`), recompute the chunk's forward with `jax.vjp` and pull its
     slice of G back: dL/dtheta = sum_chunks (dE_chunk/dtheta)^T G_chunk, accumulated in float32.

By the chain rule this equals the full-batch gradient exactly (up to float summation order); the
price is one extra forward per chunk. Peak activation memory is that of one chunk.

Chunk layout. Every input group (a pytree whose leaves share a leading batch dim N) is seen as
`num_groups` contiguous groups (pass the number of batch shards, so that every chunk takes an equal
slice of every device's rows and no device idles or gathers), each cut into `num_chunks` contiguous
pieces; chunk c is piece c of every group, concatenated. `embed_fn`'s outputs are reassembled in the
same layout, so for an `embed_fn` that maps each input row to a fixed number of output rows (one
embedding per example, or S packed segments per row) the embeddings come out exactly as a full-batch
call would give them.

`embed_fn` must be a deterministic function of (params, chunk): both passes must compute the same
thing. For dropout, carry per-example keys inside the inputs.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

PyTree = Any


def _split_chunks(x: jax.Array, num_groups: int, num_chunks: int, name: str) -> jax.Array:
  """(N, ...) -> (num_chunks, N / num_chunks, ...): chunk c = piece c of each of the groups."""
  n = x.shape[0]
  if n % (num_groups * num_chunks):
    raise ValueError(f"{name} has leading (batch) dim {n}, not divisible by num_groups={num_groups} "
                     f"* num_chunks={num_chunks}; pick num_chunks dividing {n // num_groups or n}")
  x = x.reshape((num_groups, num_chunks, n // (num_groups * num_chunks)) + x.shape[1:])
  x = jnp.swapaxes(x, 0, 1)
  return x.reshape((num_chunks, n // num_chunks) + x.shape[3:])


def _merge_chunks(y: jax.Array, num_groups: int, name: str) -> jax.Array:
  """(num_chunks, M, ...) -> (num_chunks * M, ...): the inverse layout of `_split_chunks`."""
  c, m = y.shape[:2]
  if m % num_groups:
    raise ValueError(f"embed_fn output {name} has {m} rows per chunk, not divisible by "
                     f"num_groups={num_groups}")
  y = y.reshape((c, num_groups, m // num_groups) + y.shape[2:])
  y = jnp.swapaxes(y, 0, 1)
  return y.reshape((c * m,) + y.shape[3:])


def _check_params(params: PyTree) -> None:
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
      raise ValueError(
          f"params leaf {jax.tree_util.keystr(path)} has dtype {jnp.result_type(leaf)}; GradCache "
          "differentiates every leaf of params, so pass only float leaves, e.g. "
          "`graphdef, params, rest = nnx.split(model, nnx.Param, ...)`")


def grad_cache_value_and_grad(
    embed_fn: Callable[[PyTree, PyTree], PyTree],
    loss_fn: Callable[..., Any],
    *,
    num_chunks: int,
    num_groups: int = 1,
    has_aux: bool = False,
) -> Callable[..., Any]:
  """Builds a GradCache equivalent of `jax.value_and_grad` of a loss of embeddings.

  Args:
    embed_fn: `embed_fn(params, inputs_chunk) -> emb` with `params` any pytree of float arrays (an
      NNX model's `nnx.split` state works: `lambda p, x: nnx.merge(graphdef, p)(x)`), `inputs_chunk`
      a pytree whose leaves have a leading batch dim, `emb` an array (or pytree) with a leading
      dim, typically (b, d).
    loss_fn: `loss_fn(embeddings, loss_params, loss_inputs) -> loss` (or `(loss, aux)` with
      has_aux), `embeddings` a dict with the keys of `inputs`, each the full-batch embeddings of
      that input group; `loss_params` a pytree of float arrays that gets a gradient (e.g.
      {"log_scale": ...}, or {}); `loss_inputs` anything else the loss needs (ids, masks), no
      gradient.
    num_chunks: chunks per input group; every group's batch dim must divide by
      num_groups * num_chunks. Peak activation memory is that of one chunk.
    num_groups: the batch is laid out as this many contiguous groups (the batch shards); each chunk
      takes an equal slice of each (see the module docstring). 1 = plain contiguous chunks.
    has_aux: whether loss_fn returns (loss, aux).

  Returns:
    `fn(params, loss_params, inputs, loss_inputs=None) -> (value, (param_grads, loss_param_grads))`
    with `inputs` a dict {group name: inputs pytree}, `value` = loss or (loss, aux), and
    `param_grads` float32-accumulated then cast to each param's dtype. It equals
    `jax.value_and_grad(lambda p, lp: loss_fn({k: embed_fn(p, x) for k, x in inputs.items()},
    lp, loss_inputs), argnums=(0, 1), has_aux=has_aux)(params, loss_params)`.
  """
  if num_chunks < 1:
    raise ValueError(f"num_chunks={num_chunks} must be >= 1")
  if num_groups < 1:
    raise ValueError(f"num_groups={num_groups} must be >= 1")

  def fn(params, loss_params, inputs, loss_inputs=None):
    if not isinstance(inputs, dict):
      raise ValueError(f"inputs must be a dict {{group name: inputs pytree}}; got "
                       f"{type(inputs).__name__}")
    _check_params(params)
    chunks = {k: jax.tree_util.tree_map_with_path(
        lambda path, x, k=k: _split_chunks(x, num_groups, num_chunks,
                                           f"inputs[{k!r}]{jax.tree_util.keystr(path)}"), v)
              for k, v in inputs.items()}

    # 1. Embeddings only: lax.map keeps one chunk's activations alive at a time.
    embs = {}
    for k, xs in chunks.items():
      out = lax.map(lambda x: embed_fn(params, x), xs)
      embs[k] = jax.tree_util.tree_map_with_path(
          lambda path, y, k=k: _merge_chunks(y, num_groups, f"{k!r}{jax.tree_util.keystr(path)}"),
          out)

    # 2. The loss and its gradient w.r.t. the (full-batch) embeddings and its own parameters.
    value, (g_embs, g_loss_params) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=has_aux)(embs, loss_params, loss_inputs)

    # 3. Re-run each chunk's forward and pull its slice of dL/dE back to the parameters.
    acc = jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params)
    for k, xs in chunks.items():
      g_chunks = jax.tree.map(lambda g: _split_chunks(g, num_groups, num_chunks, k), g_embs[k])

      def body(acc, chunk):
        x, g = chunk
        _, pullback = jax.vjp(lambda p: embed_fn(p, x), params)
        (g_params,) = pullback(g)
        return jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc, g_params), None

      acc, _ = lax.scan(body, acc, (xs, g_chunks))
    grads = jax.tree.map(lambda a, p: a.astype(jnp.result_type(p)), acc, params)
    return value, (grads, g_loss_params)

  return fn
