"""The Gemma 3 transformer as a bidirectional encoder (Flax NNX).

Block (pre- and post-norms around both sub-layers, as Gemma 3):

  x = x + post_attn_norm(attn(pre_attn_norm(x)))
  x = x + post_ffw_norm(mlp(pre_ffw_norm(x)))

Attention: grouped-query, RMS-normed q and k per head (QK-norm), RoPE with base 10k on sliding-window
layers and 1M (optionally linearly scaled) on global layers, queries scaled by query_pre_attn_scalar**-0.5.
MLP: GeGLU, down(gelu_tanh(gate(x)) * up(x)). RMSNorm scales by (1 + w) with w initialised at 0.
Inputs are token ids, optionally replaced position by position by a stream of soft tokens (B, L, D) from
the modality frontends: a soft token enters the residual stream as given (no sqrt(D) scaling).

Parameter names and shapes follow the Gemma layout so that published weights map one to one:
  embedder.embedding (V, D); attn.q (D, H, hd); attn.k / attn.v (D, K, hd); attn.o (H, hd, D);
  mlp.gate / mlp.up (D, F); mlp.down (F, D); norms (D,), q/k norms (hd,).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from embed2 import sharding
from embed2.model import attention
from embed2.model.presets import ModelConfig

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _param(rngs, init, shape, axes, scale=None):
  value = init(rngs.params(), shape, jnp.float32)
  if scale is not None:
    value = value * scale
  return nnx.Param(value, logical_axes=axes)


class RMSNorm(nnx.Module):
  """y = x / sqrt(mean(x^2) + eps) * (1 + w), computed in float32, returned in x's dtype."""

  def __init__(self, dim: int, *, eps: float, axis_name: str = "norm", rngs: nnx.Rngs):
    del rngs
    self.scale = nnx.Param(jnp.zeros((dim,), jnp.float32), logical_axes=(axis_name,))
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * (1.0 + self.scale[...])).astype(x.dtype)


def rope(x_blhk: jax.Array, positions_bl: jax.Array, *, base: float, scale: float = 1.0) -> jax.Array:
  """Rotary embedding, rotate-half layout (the first and second halves of head_dim form the pairs)."""
  hd = x_blhk.shape[-1]
  inv_freq = 1.0 / (base ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
  inv_freq = jnp.asarray(inv_freq / scale, jnp.float32)
  angles = positions_bl.astype(jnp.float32)[:, :, None] * inv_freq  # (B, L, hd/2)
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x_blhk.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_blhk.dtype)


class Attention(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, is_global: bool, rules, rngs: nnx.Rngs):
    d, h, k, hd = cfg.model_dim, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
    init = nnx.initializers.normal(stddev=1.0)
    self.q = _param(rngs, init, (d, h, hd), ("embed", "heads", "head_dim"), d ** -0.5)
    self.k = _param(rngs, init, (d, k, hd), ("embed", "kv_heads", "head_dim"), d ** -0.5)
    self.v = _param(rngs, init, (d, k, hd), ("embed", "kv_heads", "head_dim"), d ** -0.5)
    self.o = _param(rngs, init, (h, hd, d), ("heads", "head_dim", "embed"), (h * hd) ** -0.5)
    self.q_norm = RMSNorm(hd, eps=cfg.rms_eps, axis_name="head_dim", rngs=rngs)
    self.k_norm = RMSNorm(hd, eps=cfg.rms_eps, axis_name="head_dim", rngs=rngs)
    self.is_global = is_global
    self.window = None if is_global else cfg.sliding_window
    self.rope_base = cfg.rope_global_base if is_global else cfg.rope_local_base
    self.rope_scale = cfg.rope_global_scale if is_global else 1.0
    self.scale = float(cfg.query_pre_attn_scalar or hd) ** -0.5
    self.impl = cfg.attention_impl
    self.causal = cfg.causal
    self.rules = rules

  def __call__(self, x_bld, segment_ids_bl, positions_bl):
    dt = x_bld.dtype
    q = jnp.einsum("bld,dhk->blhk", x_bld, self.q[...].astype(dt))
    k = jnp.einsum("bld,dhk->blhk", x_bld, self.k[...].astype(dt))
    v = jnp.einsum("bld,dhk->blhk", x_bld, self.v[...].astype(dt))
    q = sharding.constrain(q, ("act_batch", "act_len", "act_heads", None), self.rules)
    q = rope(self.q_norm(q), positions_bl, base=self.rope_base, scale=self.rope_scale)
    k = rope(self.k_norm(k), positions_bl, base=self.rope_base, scale=self.rope_scale)
    out = attention.attend(q, k, v, segment_ids_bl, positions_bl, causal=self.causal,
                           window=self.window, scale=self.scale, impl=self.impl, rules=self.rules)
    return jnp.einsum("blhk,hkd->bld", out, self.o[...].astype(dt))


class MLP(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rules, rngs: nnx.Rngs):
    d, f = cfg.model_dim, cfg.mlp_dim
    init = nnx.initializers.normal(stddev=1.0)
    self.gate = _param(rngs, init, (d, f), ("embed", "mlp"), d ** -0.5)
    self.up = _param(rngs, init, (d, f), ("embed", "mlp"), d ** -0.5)
    self.down = _param(rngs, init, (f, d), ("mlp", "embed"), f ** -0.5)
    self.rules = rules

  def __call__(self, x_bld):
    dt = x_bld.dtype
    gate = jax.nn.gelu(x_bld @ self.gate[...].astype(dt), approximate=True)
    h_blf = gate * (x_bld @ self.up[...].astype(dt))
    h_blf = sharding.constrain(h_blf, ("act_batch", "act_len", "act_mlp"), self.rules)
    return h_blf @ self.down[...].astype(dt)


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, is_global: bool, rules, rngs: nnx.Rngs):
    norm = lambda: RMSNorm(cfg.model_dim, eps=cfg.rms_eps, rngs=rngs)
    self.pre_attn_norm = norm()
    self.attn = Attention(cfg, is_global=is_global, rules=rules, rngs=rngs)
    self.post_attn_norm = norm()
    self.pre_ffw_norm = norm()
    self.mlp = MLP(cfg, rules=rules, rngs=rngs)
    self.post_ffw_norm = norm()
    self.is_global = is_global

  def __call__(self, x_bld, segment_ids_bl, positions_bl):
    x_bld = x_bld + self.post_attn_norm(self.attn(self.pre_attn_norm(x_bld), segment_ids_bl,
                                                  positions_bl))
    return x_bld + self.post_ffw_norm(self.mlp(self.pre_ffw_norm(x_bld)))


class Embedder(nnx.Module):
  """Token embedding table, scaled by sqrt(D) in the activation dtype (as Gemma does)."""

  def __init__(self, vocab_size: int, dim: int, *, rngs: nnx.Rngs):
    self.embedding = _param(rngs, nnx.initializers.normal(stddev=1.0), (vocab_size, dim),
                            ("vocab", "embed"), dim ** -0.5)

  def __call__(self, tokens_bl, dtype):
    x = jnp.take(self.embedding[...], tokens_bl, axis=0).astype(dtype)
    return x * jnp.asarray(self.embedding[...].shape[1] ** 0.5, dtype)


class Transformer(nnx.Module):
  """Token ids (+ soft tokens) -> final-normed token states (B, L, D)."""

  def __init__(self, cfg: ModelConfig, *, rules=None, rngs: nnx.Rngs):
    self.cfg = cfg
    self.rules = rules
    self.embedder = Embedder(cfg.vocab_size, cfg.model_dim, rngs=rngs)
    self.blocks = nnx.List([Block(cfg, is_global=cfg.is_global_layer(i), rules=rules, rngs=rngs)
                            for i in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.model_dim, eps=cfg.rms_eps, rngs=rngs)

  def __call__(self, tokens_bl, segment_ids_bl, positions_bl, soft_tokens_bld=None, soft_mask_bl=None):
    """Encodes a batch of (possibly packed) rows.

    Args:
      tokens_bl: int32 (B, L) token ids in [0, vocab_size).
      segment_ids_bl: int32 (B, L); 0 = padding, 1..S = the packed example a token belongs to.
      positions_bl: int32 (B, L); position of each token within its own example.
      soft_tokens_bld: optional (B, L, D) embeddings from modality frontends.
      soft_mask_bl: optional bool (B, L); True where the soft token replaces the token embedding.

    Returns:
      (B, L, D) token states in the config's dtype.
    """
    cfg = self.cfg
    check_inputs(cfg, tokens_bl, segment_ids_bl, positions_bl, soft_tokens_bld, soft_mask_bl)
    dtype = _DTYPES[cfg.dtype]
    x = self.embedder(tokens_bl, dtype)
    if soft_tokens_bld is not None:
      x = jnp.where(soft_mask_bl[:, :, None], soft_tokens_bld.astype(dtype), x)
    x = sharding.constrain(x, ("act_batch", "act_len", "act_embed"), self.rules)
    # Each layer's attention builds its mask from the segment ids and positions (blockwise kernels
    # block by block, the xla path as one (B, 1, L, L) array; embed2.model.attention).
    for block in self.blocks:
      call = _remat(type(block).__call__, cfg.remat)
      x = call(block, x, segment_ids_bl, positions_bl)
      x = sharding.constrain(x, ("act_batch", "act_len", "act_embed"), self.rules)
    return self.final_norm(x)


def _remat(fn, policy):
  if policy == "none":
    return fn
  if policy == "full":
    return nnx.remat(fn)
  return nnx.remat(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)


def check_inputs(cfg: ModelConfig, tokens_bl, segment_ids_bl, positions_bl, soft_tokens_bld=None,
                 soft_mask_bl=None) -> None:
  """Shape checks always; value checks (token ids in vocabulary) when the inputs are concrete."""
  if tokens_bl.ndim != 2:
    raise ValueError(f"tokens must be (B, L) int32, got shape {tokens_bl.shape}")
  b, l = tokens_bl.shape
  if l > cfg.max_length:
    raise ValueError(f"sequence length {l} is longer than config.model.max_length={cfg.max_length}; "
                     "truncate the inputs or raise max_length")
  for name, arr in (("segment_ids", segment_ids_bl), ("positions", positions_bl)):
    if arr.shape != (b, l):
      raise ValueError(f"{name} has shape {arr.shape}; it must match tokens {(b, l)}")
  if (soft_tokens_bld is None) != (soft_mask_bl is None):
    raise ValueError("soft_tokens and soft_mask must be given together")
  if soft_tokens_bld is not None:
    if soft_tokens_bld.shape != (b, l, cfg.model_dim):
      raise ValueError(f"soft_tokens has shape {soft_tokens_bld.shape}; expected {(b, l, cfg.model_dim)} "
                       "(B, L, model_dim)")
    if soft_mask_bl.shape != (b, l):
      raise ValueError(f"soft_mask has shape {soft_mask_bl.shape}; expected {(b, l)}")
  if not isinstance(tokens_bl, jax.core.Tracer):
    t = np.asarray(tokens_bl)
    if t.size and (t.min() < 0 or t.max() >= cfg.vocab_size):
      bad = int(t.max()) if t.max() >= cfg.vocab_size else int(t.min())
      raise ValueError(f"token id {bad} is out of vocabulary [0, {cfg.vocab_size}); the tokenizer and "
                       "config.model.vocab_size disagree")
