"""The embedding model: transformer -> mean pool per packed example -> dense head -> L2 normalise.

  E = normalize(f(mean_{t in example} M(T)_t))

Rows may hold up to S packed examples (segment ids 1..S); pooling returns one vector per (row, segment)
slot, (R, S, d). A batch then picks its examples out of the slots with per-group slot indices (see
embed2.data.packing for the layout): the rows of pack group g hold only group g's examples, so the
gather never crosses a device boundary.

Media: a side with images / audio (`{prefix}images`, `{prefix}audio`, `{prefix}soft_index`, see
embed2.data.packing) runs each media slot through its frontend (embed2.model.frontends), flattens the
soft tokens per pack group, and gathers them into the rows at the placeholder positions, again within
the group. Every image / audio chunk is encoded on its own, so where it sits does not change its soft
tokens.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from embed2 import sharding
from embed2.model import frontends
from embed2.model.presets import ModelConfig
from embed2.model.transformer import Transformer, _param


def mean_pool(h_bld: jax.Array, segment_ids_bl: jax.Array, num_segments: int) -> jax.Array:
  """Mean of the token states of each segment: (B, L, D) -> (B, S, D) in float32.

  Padding (segment 0) is ignored; a slot with no tokens pools to zero.
  """
  onehot_bls = (segment_ids_bl[:, :, None] == jnp.arange(1, num_segments + 1)).astype(jnp.float32)
  sums = jnp.einsum("bls,bld->bsd", onehot_bls, h_bld.astype(jnp.float32))
  counts = jnp.sum(onehot_bls, axis=1)[:, :, None]
  return sums / jnp.maximum(counts, 1.0)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def mrl_truncate(e_nd: jax.Array, dim: int) -> jax.Array:
  """Matryoshka prefix: the first `dim` coordinates, re-normalised to unit length."""
  if dim > e_nd.shape[-1]:
    raise ValueError(f"MRL dim {dim} is larger than the embedding dim {e_nd.shape[-1]}")
  return l2_normalize(e_nd[..., :dim])


def gather_slots(pooled_rsd: jax.Array, slot_b: jax.Array, num_groups: int) -> jax.Array:
  """Picks examples out of pooled slots, group by group.

  Args:
    pooled_rsd: (R, S, d) one vector per (row, segment); R = G * R_g.
    slot_b: int32 (B,) or (B, K); B = G * B_g; entry b indexes group b // B_g's flattened (R_g * S) slots.
    num_groups: G.

  Returns:
    (B, d) or (B, K, d).
  """
  r, s, d = pooled_rsd.shape
  if r % num_groups or slot_b.shape[0] % num_groups:
    raise ValueError(f"rows={r} and examples={slot_b.shape[0]} must both divide into {num_groups} "
                     "pack groups")
  flat = pooled_rsd.reshape(num_groups, (r // num_groups) * s, d)
  idx = slot_b.reshape(num_groups, -1)
  out = jnp.take_along_axis(flat, idx[:, :, None], axis=1)  # (G, B_g*K, d)
  return out.reshape(*slot_b.shape, d)


class EmbeddingModel(nnx.Module):
  """Transformer plus pooling and projection head.

  The head is a stack of bias-free linear maps (`config.model.head_dims`), as EmbeddingGemma's
  sentence-transformers Dense layers; no activation between them.
  """

  def __init__(self, cfg: ModelConfig, *, rules=None, rngs: nnx.Rngs):
    self.cfg = cfg
    self.rules = rules
    self.transformer = Transformer(cfg, rules=rules, rngs=rngs)
    self.image_frontend, self.audio_frontend = frontends.build_frontends(cfg, rngs=rngs)
    dims = (cfg.model_dim,) + tuple(cfg.head_dims)
    init = nnx.initializers.normal(stddev=1.0)
    self.head = nnx.List([
        _param(rngs, init, (a, b), ("embed" if i == 0 else "proj", "proj" if i == 0 else "embed"),
               a ** -0.5)
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]))])

  def encode_rows(self, tokens_bl, segment_ids_bl, positions_bl, soft_tokens_bld=None,
                  soft_mask_bl=None) -> jax.Array:
    """Embeds every (row, segment) slot: returns unit-norm float32 (B, S, d), S = config max_segments."""
    h = self.transformer(tokens_bl, segment_ids_bl, positions_bl, soft_tokens_bld, soft_mask_bl)
    pooled = mean_pool(h, segment_ids_bl, self.cfg.max_segments)
    pooled = sharding.constrain(pooled, ("act_batch", None, "act_embed"), self.rules)
    for w in self.head:
      pooled = pooled @ w[...]
    return l2_normalize(pooled)

  def soft_inputs(self, side: dict, num_groups: int, prefix: str = ""):
    """Soft tokens of one side's media at their placeholder positions.

    Args:
      side: dict with `{prefix}soft_index` int32 (R, L) and `{prefix}images` uint8 (G * N_g, S, S, 3)
        and / or `{prefix}audio` float32 (G * A_g, F, M).
      num_groups: G.
      prefix: key prefix.

    Returns:
      (soft tokens (R, L, D), soft mask bool (R, L)), or (None, None) for a side without media.
    """
    idx_rl = side.get(prefix + "soft_index")
    if idx_rl is None:
      return None, None
    g = num_groups
    r, l = idx_rl.shape
    parts = []
    for key, frontend, what in (("images", self.image_frontend, "image_frontend"),
                                ("audio", self.audio_frontend, "audio_frontend")):
      x = side.get(prefix + key)
      if x is None:
        continue
      if frontend is None:
        raise ValueError(f"the batch has {prefix}{key} but this model has no {key} frontend; set "
                         f"config.model.{what}")
      if x.shape[0] % g:
        raise ValueError(f"{prefix}{key} has {x.shape[0]} slots, not divisible into {g} pack groups")
      soft = frontend(x)  # (G * slots, T, D)
      parts.append(soft.reshape(g, -1, soft.shape[-1]))
    if not parts:
      raise ValueError(f"{prefix}soft_index is given without {prefix}images or {prefix}audio")
    soft_gnd = jnp.concatenate([p.astype(parts[0].dtype) for p in parts], axis=1)
    idx_gm = idx_rl.reshape(g, -1)
    out = jnp.take_along_axis(soft_gnd, jnp.maximum(idx_gm, 0)[:, :, None], axis=1)
    return out.reshape(r, l, -1), idx_rl >= 0

  def __call__(self, side: dict, num_groups: int, prefix: str = "") -> jax.Array:
    """Embeds the examples of one side of a packed batch.

    Args:
      side: dict with `{prefix}tokens`, `{prefix}segment_ids`, `{prefix}positions` (R, L) and
        `{prefix}slot` (B,) or (B, K); for media, `{prefix}soft_index` with `{prefix}images` /
        `{prefix}audio` (see `soft_inputs`).
      num_groups: G, the number of pack groups the rows were built in.
      prefix: key prefix, e.g. "query_".

    Returns:
      unit-norm float32 (B, d) (or (B, K, d)).
    """
    soft, mask = self.soft_inputs(side, num_groups, prefix)
    pooled = self.encode_rows(side[prefix + "tokens"], side[prefix + "segment_ids"],
                              side[prefix + "positions"], soft, mask)
    return gather_slots(pooled, side[prefix + "slot"], num_groups)

  def embed_sides(self, batch: dict, num_groups: int, sides) -> dict[str, jax.Array]:
    """Embeds several sides of a packed batch ({side}_tokens ... {side}_slot), as `__call__` per side.

    Text sides whose rows have the same length share ONE transformer pass: their rows are joined within
    each pack group (so a device's rows stay on that device) and split again after pooling. One pass
    instead of three makes the train step's program smaller (faster to compile) and its matmuls larger.

    Returns:
      {side: unit-norm float32 (B, d) or (B, K, d)}.
    """
    by_len: dict[Any, list[str]] = {}
    for s in sides:
      key = s if f"{s}_soft_index" in batch else batch[f"{s}_tokens"].shape[1]  # media sides alone
      by_len.setdefault(key, []).append(s)
    out = {}
    g = num_groups
    for names in by_len.values():
      if len(names) == 1:
        out[names[0]] = self(batch, g, prefix=f"{names[0]}_")
        continue
      rows = [batch[f"{s}_tokens"].shape[0] // g for s in names]

      def joined(key):
        parts = [batch[f"{s}_{key}"] for s in names]
        parts = [p.reshape((g, -1) + p.shape[1:]) for p in parts]
        cat = jnp.concatenate(parts, axis=1)
        return cat.reshape((-1,) + cat.shape[2:])

      pooled = self.encode_rows(joined("tokens"), joined("segment_ids"), joined("positions"))
      pooled = pooled.reshape((g, -1) + pooled.shape[1:])  # (G, sum R_g, S, d)
      start = 0
      for s, r in zip(names, rows):
        part = pooled[:, start:start + r].reshape((g * r,) + pooled.shape[2:])
        out[s] = gather_slots(part, batch[f"{s}_slot"], g)
        start += r
    return out

