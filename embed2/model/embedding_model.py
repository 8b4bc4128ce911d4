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

One side of a batch is embedded by one method, `EmbeddingModel.embed_rows` (rows and their media ->
pooled slots); `__call__`, `embed_sides` and the GradCache step (embed2.train.step) all go through it.
It takes the media either as slots (run through the frontends here) or as the frontends' outputs
computed elsewhere (`features`, how GradCache encodes media slots and rows in separate chunks).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from embed2 import sharding
from embed2.model import frontends
from embed2.model.bert import BertEncoder
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


# A side's model inputs: per-row arrays (R, L), and media slots (G * N, ...) in the order their soft
# tokens are laid out in a group (packing.soft_index_base: images first, then audio).
ROW_KEYS = ("tokens", "segment_ids", "positions", "soft_index")
MEDIA_KEYS = ("images", "audio")


def place_soft_tokens(soft_index_rl: jax.Array, features: dict[str, jax.Array], num_groups: int,
                      prefix: str = ""):
  """Puts the frontends' soft tokens at their placeholder positions, group by group.

  Args:
    soft_index_rl: int32 (R, L), R = G * R_g; -1 on ordinary tokens, else an index into group g's
      flattened soft tokens (see embed2.data.packing).
    features: {kind: (G * N_kind, T_kind, D)} frontend outputs of every media slot, kinds in
      MEDIA_KEYS order.
    num_groups: G.
    prefix: the side's key prefix, for error messages.

  Returns:
    (soft tokens (R, L, D), soft mask bool (R, L)).
  """
  g = num_groups
  r, l = soft_index_rl.shape
  if r % g:
    raise ValueError(f"{prefix}soft_index has {r} rows, not divisible into {g} pack groups")
  parts = []
  for key in MEDIA_KEYS:
    if key not in features:
      continue
    x = features[key]
    if x.shape[0] % g:
      raise ValueError(f"{prefix}{key} has {x.shape[0]} slots, not divisible into {g} pack groups")
    parts.append(x.reshape(g, -1, x.shape[-1]))
  unknown = set(features) - set(MEDIA_KEYS)
  if unknown or not parts:
    raise ValueError(f"{prefix}soft_index needs the features of {' and / or '.join(MEDIA_KEYS)}; got "
                     f"{sorted(features)}")
  soft_gnd = jnp.concatenate([p.astype(parts[0].dtype) for p in parts], axis=1)
  idx_gm = soft_index_rl.reshape(g, -1)
  out = jnp.take_along_axis(soft_gnd, jnp.maximum(idx_gm, 0)[:, :, None], axis=1)
  return out.reshape(r, l, -1), soft_index_rl >= 0


class EmbeddingModel(nnx.Module):
  """Transformer plus pooling and projection head.

  The head is a stack of bias-free linear maps (`config.model.head_dims`), as EmbeddingGemma's
  sentence-transformers Dense layers; no activation between them.
  """

  def __init__(self, cfg: ModelConfig, *, rules=None, rngs: nnx.Rngs):
    self.cfg = cfg
    self.rules = rules
    backbone = BertEncoder if cfg.arch == "bert" else Transformer  # config.model.arch picks it
    self.transformer = backbone(cfg, rules=rules, rngs=rngs)
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

  def frontend(self, key: str, prefix: str = "") -> nnx.Module:
    """The frontend that reads media slots `key` ("images" or "audio"); an error if the model has none."""
    frontend, what = {"images": (self.image_frontend, "image_frontend"),
                      "audio": (self.audio_frontend, "audio_frontend")}[key]
    if frontend is None:
      raise ValueError(f"the batch has {prefix}{key} but this model has no {key} frontend; set "
                       f"config.model.media.{what}")
    return frontend

  def media_features(self, side: dict, prefix: str = "") -> dict[str, jax.Array]:
    """Frontend outputs of a side's media slots: {kind: (N, T, D)} for each of `{prefix}images`
    (uint8 (N, S, S, 3)) and `{prefix}audio` (float32 (N, F, M)) present. Each slot on its own."""
    return {k: self.frontend(k, prefix)(side[prefix + k]) for k in MEDIA_KEYS if prefix + k in side}

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
      _refuse_unread_media(side, prefix, f"no {prefix}soft_index places them in the rows")
      return None, None
    features = self.media_features(side, prefix)
    if not features:
      raise ValueError(f"{prefix}soft_index is given without {prefix}images or {prefix}audio")
    return place_soft_tokens(idx_rl, features, num_groups, prefix)

  def embed_rows(self, side: dict, num_groups: int, prefix: str = "",
                 features: dict[str, jax.Array] | None = None) -> jax.Array:
    """Embeds every (row, segment) slot of one side: THE path from a side's inputs to embeddings.

    Args:
      side: `{prefix}tokens`, `{prefix}segment_ids`, `{prefix}positions` (R, L), R = G * R_g; for
        media, `{prefix}soft_index` (R, L) with either the media slots (`{prefix}images` /
        `{prefix}audio`, see `soft_inputs`) or `features`.
      num_groups: G, the number of pack groups the rows were built in (rows [g * R_g, (g + 1) * R_g)
        and media slots [g * N_g, (g + 1) * N_g) belong to group g).
      prefix: key prefix, e.g. "query_".
      features: the frontends' outputs for the side's media slots, {kind: (G * N_kind, T, D)}, as
        `media_features` gives them; when given, `side` holds no media slots (GradCache computes
        them in chunks of their own and passes them here).

    Returns:
      unit-norm float32 (R, S, d), S = config max_segments.
    """
    soft = mask = None
    if features is not None:
      if prefix + "soft_index" not in side:
        raise ValueError(f"features are given for a side without {prefix}soft_index")
      _refuse_unread_media(side, prefix, "their frontend outputs (features) are given as well")
      soft, mask = place_soft_tokens(side[prefix + "soft_index"], features, num_groups, prefix)
    else:
      soft, mask = self.soft_inputs(side, num_groups, prefix)
    return self.encode_rows(side[prefix + "tokens"], side[prefix + "segment_ids"],
                            side[prefix + "positions"], soft, mask)

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
    return gather_slots(self.embed_rows(side, num_groups, prefix), side[prefix + "slot"], num_groups)

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
      media = any(f"{s}_{k}" in batch for k in ("soft_index",) + MEDIA_KEYS)
      key = s if media else batch[f"{s}_tokens"].shape[1]  # media sides alone
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

      pooled = self.embed_rows({k: joined(k) for k in ("tokens", "segment_ids", "positions")}, g)
      pooled = pooled.reshape((g, -1) + pooled.shape[1:])  # (G, sum R_g, S, d)
      start = 0
      for s, r in zip(names, rows):
        part = pooled[:, start:start + r].reshape((g * r,) + pooled.shape[2:])
        out[s] = gather_slots(part, batch[f"{s}_slot"], g)
        start += r
    return out


def _refuse_unread_media(side: dict, prefix: str, why: str) -> None:
  """Media slots the rows will not read are an error: they would be dropped without a trace."""
  extra = [prefix + k for k in MEDIA_KEYS if prefix + k in side]
  if extra:
    raise ValueError(f"{extra} are given but {why}; pack media with embed2.data.packing, which "
                     "writes both")
