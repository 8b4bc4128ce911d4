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

Slot features (media). A packed row reads soft tokens that per-slot encoders (the image / audio
frontends) make from its pack group's media slots, and a row may read any slot of its group: the slots
are filled in packing order, not row by row. So the rows of a chunk cannot take "their" slots with
them. Chunking whole groups instead would give each chunk the rows of a few devices only (the others
idle), and computing the frontends once for the whole side would keep every frontend activation alive.
With `feature_fns` the step has two chunked encoders:

  0. The slots of each group are cut into chunks too (chunk c = piece c of every group's slots; a
     group's slot count is padded, with copies of its last slot, up to a multiple of the piece, and
     the padding's features are dropped), and `feature_fns` map every chunk (`lax.map`) to its
     features F. Only F is kept (for images (num_groups * N_g, T, D): one vector per soft token).
  1. Every row chunk is embedded from its inputs and the whole F: E_c = f(theta, x_c, F).
  2. G = dL/dE, as above.
  3. Each row chunk's vjp gives dL/dtheta from the rows and dL/dF from its soft tokens; dL/dF is
     summed over chunks (float32, the size of F).
  4. Each slot chunk's vjp pulls its slice of dL/dF back through the slot encoder into dL/dtheta.

By the chain rule, dL/dtheta = sum_c (dE_c/dtheta)^T G_c + sum_m (dF_m/dtheta)^T sum_c (dE_c/dF_m)^T
G_c, exactly the full-batch gradient. Peak activation memory is one row chunk's or one slot chunk's,
plus F and dL/dF for the whole batch: one vector per soft token of every slot, at most about one
(R, L, D) hidden state of the full batch (soft tokens fill some of the row positions; unused slots
add their slack), against the full batch's every activation of every layer without GradCache.
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


def _slot_pieces(n_g: int, num_chunks: int) -> tuple[int, int]:
  """(chunks, slots per group per chunk) for n_g slots a group: at most num_chunks chunks of
  ceil(n_g / num_chunks) slots, padding at most one piece short of a multiple."""
  per = -(-n_g // min(num_chunks, n_g))
  return -(-n_g // per), per


def _split_slots(x: jax.Array, num_groups: int, num_chunks: int, mode: str) -> jax.Array:
  """(G * n_g, ...) -> (chunks, G * per, ...): chunk c = slots [c * per, (c + 1) * per) of each group,
  the groups' slots padded (`jnp.pad` mode: "edge" for inputs, "constant" zeros for gradients)."""
  n_g = x.shape[0] // num_groups
  c, per = _slot_pieces(n_g, num_chunks)
  x = x.reshape((num_groups, n_g) + x.shape[1:])
  if c * per > n_g:
    x = jnp.pad(x, [(0, 0), (0, c * per - n_g)] + [(0, 0)] * (x.ndim - 2), mode=mode)
  x = jnp.swapaxes(x.reshape((num_groups, c, per) + x.shape[2:]), 0, 1)
  return x.reshape((c, num_groups * per) + x.shape[3:])


def _merge_slots(y: jax.Array, num_groups: int, n_g: int) -> jax.Array:
  """(chunks, G * per, ...) -> (G * n_g, ...): the inverse of `_split_slots`, padding dropped."""
  c, m = y.shape[:2]
  y = jnp.swapaxes(y.reshape((c, num_groups, m // num_groups) + y.shape[2:]), 0, 1)
  y = y.reshape((num_groups, c * (m // num_groups)) + y.shape[3:])[:, :n_g]
  return y.reshape((num_groups * n_g,) + y.shape[2:])


def _check_params(params: PyTree) -> None:
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
      raise ValueError(
          f"params leaf {jax.tree_util.keystr(path)} has dtype {jnp.result_type(leaf)}; GradCache "
          "differentiates every leaf of params, so pass only float leaves, e.g. "
          "`graphdef, params, rest = nnx.split(model, nnx.Param, ...)`")


def grad_cache_value_and_grad(
    embed_fn: Callable[..., PyTree],
    loss_fn: Callable[..., Any],
    *,
    num_chunks: int,
    num_groups: int = 1,
    has_aux: bool = False,
    feature_fns: dict[str, Callable[[PyTree, jax.Array], jax.Array]] | None = None,
) -> Callable[..., Any]:
  """Builds a GradCache equivalent of `jax.value_and_grad` of a loss of embeddings.

  Args:
    embed_fn: `embed_fn(params, inputs_chunk) -> emb` with `params` any pytree of float arrays (an
      NNX model's `nnx.split` state works: `lambda p, x: nnx.merge(graphdef, p)(x)`), `inputs_chunk`
      a pytree whose leaves have a leading batch dim, `emb` an array (or pytree) with a leading
      dim, typically (b, d). With `feature_fns`: `embed_fn(params, inputs_chunk, features)`, where
      `features` = {name: features of ALL the input group's slots, (G * n_g, ...)} ({} for a group
      without slots).
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
    feature_fns: per-slot encoders (the media frontends), {name: `feature_fn(params, slots) ->
      features`}, each mapping every slot (leading dim) to its features on its own, whatever the
      other slots. Their slots come in `fn`'s `slots` argument, G * n_g of them (group g's are
      [g * n_g, (g + 1) * n_g)); they are encoded in at most `num_chunks` chunks (see the module
      docstring), so any n_g works.

  Returns:
    `fn(params, loss_params, inputs, loss_inputs=None, slots=None) -> (value, (param_grads,
    loss_param_grads))` with `inputs` a dict {group name: inputs pytree}, `slots` (with
    `feature_fns`) a dict {group name: {feature name: (G * n_g, ...) array}}, `value` = loss or
    (loss, aux), and `param_grads` float32-accumulated then cast to each param's dtype. It equals
    `jax.value_and_grad(lambda p, lp: loss_fn({k: embed_fn(p, x) for k, x in inputs.items()},
    lp, loss_inputs), argnums=(0, 1), has_aux=has_aux)(params, loss_params)` (with `feature_fns`:
    `embed_fn(p, x, {n: feature_fns[n](p, s) for n, s in slots[k].items()})`).
  """
  if num_chunks < 1:
    raise ValueError(f"num_chunks={num_chunks} must be >= 1")
  if num_groups < 1:
    raise ValueError(f"num_groups={num_groups} must be >= 1")
  with_features = feature_fns is not None

  def fn(params, loss_params, inputs, loss_inputs=None, slots=None):
    if not isinstance(inputs, dict):
      raise ValueError(f"inputs must be a dict {{group name: inputs pytree}}; got "
                       f"{type(inputs).__name__}")
    slots = dict(slots or {})
    if slots and not with_features:
      raise ValueError(f"slots are given for {sorted(slots)} but no feature_fns encode them")
    for k, named in slots.items():
      if k not in inputs:
        raise ValueError(f"slots[{k!r}] has no input group {k!r} in inputs {sorted(inputs)}")
      for name, x in named.items():
        if name not in feature_fns:
          raise ValueError(f"slots[{k!r}][{name!r}] has no feature_fns[{name!r}]; feature_fns has "
                           f"{sorted(feature_fns)}")
        if x.shape[0] % num_groups:
          raise ValueError(f"slots[{k!r}][{name!r}] has {x.shape[0]} slots, not divisible into "
                           f"num_groups={num_groups}")
    _check_params(params)
    chunks = {k: jax.tree_util.tree_map_with_path(
        lambda path, x, k=k: _split_chunks(x, num_groups, num_chunks,
                                           f"inputs[{k!r}]{jax.tree_util.keystr(path)}"), v)
              for k, v in inputs.items()}
    slot_chunks = {k: {n: _split_slots(x, num_groups, num_chunks, "edge") for n, x in named.items()
                       if x.shape[0]} for k, named in slots.items()}

    # 0. Slot features, slot chunk by slot chunk (lax.map), then back in the full layout.
    features = {k: {} for k in inputs} if with_features else None
    for k, named in slots.items():
      for n, x in named.items():
        if not x.shape[0]:  # no slots: nothing to encode or differentiate
          features[k][n] = feature_fns[n](params, x)
          continue
        out = lax.map(lambda xc, n=n: feature_fns[n](params, xc), slot_chunks[k][n])
        features[k][n] = _merge_slots(out, num_groups, x.shape[0] // num_groups)

    def embed(p, k, x, f=None):
      if not with_features:
        return embed_fn(p, x)
      return embed_fn(p, x, features[k] if f is None else f)

    # 1. Embeddings only: lax.map keeps one chunk's activations alive at a time.
    embs = {}
    for k, xs in chunks.items():
      out = lax.map(lambda x, k=k: embed(params, k, x), xs)
      embs[k] = jax.tree_util.tree_map_with_path(
          lambda path, y, k=k: _merge_chunks(y, num_groups, f"{k!r}{jax.tree_util.keystr(path)}"),
          out)

    # 2. The loss and its gradient w.r.t. the (full-batch) embeddings and its own parameters.
    value, (g_embs, g_loss_params) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=has_aux)(embs, loss_params, loss_inputs)

    # 3. Re-run each chunk's forward and pull its slice of dL/dE back to the parameters (and, with
    # slots, to the slot features every chunk reads: summed over chunks).
    acc = jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params)
    for k, xs in chunks.items():
      g_chunks = jax.tree.map(lambda g: _split_chunks(g, num_groups, num_chunks, k), g_embs[k])
      f_k = features[k] if with_features else {}
      acc_f = jax.tree.map(lambda f: jnp.zeros_like(f, jnp.float32), f_k)

      def body(carry, chunk, k=k, f_k=f_k):
        acc, acc_f = carry
        x, g = chunk
        _, pullback = jax.vjp(lambda p, f: embed(p, k, x, f), params, f_k)
        g_params, g_f = pullback(g)
        add = lambda a, b: a + b.astype(jnp.float32)
        return (jax.tree.map(add, acc, g_params), jax.tree.map(add, acc_f, g_f)), None

      (acc, acc_f), _ = lax.scan(body, (acc, acc_f), (xs, g_chunks))

      # 4. Each slot chunk's forward again, pulling its slice of dL/dF back to the parameters.
      for n, xs_n in slot_chunks.get(k, {}).items():
        g_n = _split_slots(acc_f[n].astype(f_k[n].dtype), num_groups, num_chunks, "constant")

        def slot_body(acc, chunk, n=n):
          x, g = chunk
          _, pullback = jax.vjp(lambda p: feature_fns[n](p, x), params)
          (g_params,) = pullback(g)
          return jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc, g_params), None

        acc, _ = lax.scan(slot_body, acc, (xs_n, g_n))
    grads = jax.tree.map(lambda a, p: a.astype(jnp.result_type(p)), acc, params)
    return value, (grads, g_loss_params)

  return fn
