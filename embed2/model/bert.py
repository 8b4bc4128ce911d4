"""A BERT-family encoder (BERT, MiniLM, the sentence-transformers all-* models) as a drop-in backbone.

`EmbeddingModel` builds it instead of the Gemma 3 `Transformer` when `config.model.arch == "bert"`;
pooling, the projection head, MRL, sharding rules, the loss, the trainer, `Embedder`, soups and export
are shared. It takes the same inputs and returns the same (B, L, D) token states:

  x = LayerNorm(word[token] + position[pos] + token_type[0])       (a soft token replaces word[token])
  x = LayerNorm(x + attn(x))                                        (post-LayerNorm, as BERT)
  x = LayerNorm(x + down(gelu(up(x))))

Positions are learned and absolute, taken from `positions_bl`, which restart at 0 in every packed
segment, so a packed example sees the positions it would see alone. Every input is one sentence
(token type 0); the whole (type_vocab_size, D) table is kept so that an import exports unchanged.
Attention is multi-head (num_kv_heads == num_heads), biased, scaled by head_dim**-0.5, global, and
runs through `embed2.model.attention.attend`, so segment / padding masks, packing and the fast kernels
apply as in the Gemma transformer. GELU is the exact (erf) one, BERT's "gelu".

Parameter layout (the Hugging Face BertModel tensors map one to one, see embed2.convert.layout):
  word_embeddings (V, D); position_embeddings (P, D); token_type_embeddings (T, D); embed_norm;
  blocks[i].attn.q / k / v (D, H, hd) + q_bias / k_bias / v_bias (H, hd); attn.o (H, hd, D) + o_bias (D,);
  blocks[i].attn_norm; blocks[i].mlp.up (D, F) + up_bias (F,); mlp.down (F, D) + down_bias (D,);
  blocks[i].mlp_norm. LayerNorms hold scale and bias (D,).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from embed2 import sharding
from embed2.model import attention
from embed2.model.presets import ModelConfig
from embed2.model.transformer import _DTYPES, _param, _remat, check_inputs
from embed2.model.vision import LayerNorm, _zeros


class BertAttention(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rules, rngs: nnx.Rngs):
    d, h, hd = cfg.model_dim, cfg.num_heads, cfg.resolved_head_dim
    init = nnx.initializers.normal(stddev=1.0)
    for name in ("q", "k", "v"):
      setattr(self, name, _param(rngs, init, (d, h, hd), ("embed", "heads", "head_dim"), d ** -0.5))
      setattr(self, f"{name}_bias", _zeros((h, hd), ("heads", "head_dim")))
    self.o = _param(rngs, init, (h, hd, d), ("heads", "head_dim", "embed"), (h * hd) ** -0.5)
    self.o_bias = _zeros((d,), ("norm",))
    self.scale = float(hd) ** -0.5
    self.impl = cfg.attention_impl
    self.causal = cfg.causal
    self.rules = rules

  def __call__(self, x_bld, segment_ids_bl, positions_bl):
    dt = x_bld.dtype

    def proj(w, b):
      return jnp.einsum("bld,dhk->blhk", x_bld, w[...].astype(dt)) + b[...].astype(dt)

    q, k, v = proj(self.q, self.q_bias), proj(self.k, self.k_bias), proj(self.v, self.v_bias)
    q = sharding.constrain(q, ("act_batch", "act_len", "act_heads", None), self.rules)
    out = attention.attend(q, k, v, segment_ids_bl, positions_bl, causal=self.causal, window=None,
                           scale=self.scale, impl=self.impl, rules=self.rules)
    return jnp.einsum("blhk,hkd->bld", out, self.o[...].astype(dt)) + self.o_bias[...].astype(dt)


class BertMLP(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rules, rngs: nnx.Rngs):
    d, f = cfg.model_dim, cfg.mlp_dim
    init = nnx.initializers.normal(stddev=1.0)
    self.up = _param(rngs, init, (d, f), ("embed", "mlp"), d ** -0.5)
    self.up_bias = _zeros((f,), ("mlp",))
    self.down = _param(rngs, init, (f, d), ("mlp", "embed"), f ** -0.5)
    self.down_bias = _zeros((d,), ("norm",))
    self.rules = rules

  def __call__(self, x_bld):
    dt = x_bld.dtype
    h_blf = jax.nn.gelu(x_bld @ self.up[...].astype(dt) + self.up_bias[...].astype(dt), approximate=False)
    h_blf = sharding.constrain(h_blf, ("act_batch", "act_len", "act_mlp"), self.rules)
    return h_blf @ self.down[...].astype(dt) + self.down_bias[...].astype(dt)


class BertBlock(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rules, rngs: nnx.Rngs):
    self.attn = BertAttention(cfg, rules=rules, rngs=rngs)
    self.attn_norm = LayerNorm(cfg.model_dim, eps=cfg.layer_norm_eps)
    self.mlp = BertMLP(cfg, rules=rules, rngs=rngs)
    self.mlp_norm = LayerNorm(cfg.model_dim, eps=cfg.layer_norm_eps)

  def __call__(self, x_bld, segment_ids_bl, positions_bl):
    x_bld = self.attn_norm(x_bld + self.attn(x_bld, segment_ids_bl, positions_bl))
    return self.mlp_norm(x_bld + self.mlp(x_bld))


class BertEncoder(nnx.Module):
  """Token ids (+ soft tokens) -> token states (B, L, D); the `Transformer` interface."""

  def __init__(self, cfg: ModelConfig, *, rules=None, rngs: nnx.Rngs):
    self.cfg = cfg
    self.rules = rules
    d = cfg.model_dim
    init = nnx.initializers.normal(stddev=0.02)  # BERT's initializer_range
    self.word_embeddings = _param(rngs, init, (cfg.vocab_size, d), ("vocab", "embed"))
    self.position_embeddings = _param(rngs, init, (cfg.max_positions, d), (None, "embed"))
    self.token_type_embeddings = _param(rngs, init, (cfg.type_vocab_size, d), (None, "embed"))
    self.embed_norm = LayerNorm(d, eps=cfg.layer_norm_eps)
    self.blocks = nnx.List([BertBlock(cfg, rules=rules, rngs=rngs) for _ in range(cfg.num_layers)])

  def __call__(self, tokens_bl, segment_ids_bl, positions_bl, soft_tokens_bld=None, soft_mask_bl=None):
    """Encodes a batch of (possibly packed) rows; arguments and result as `Transformer.__call__`."""
    cfg = self.cfg
    check_inputs(cfg, tokens_bl, segment_ids_bl, positions_bl, soft_tokens_bld, soft_mask_bl)
    dtype = _DTYPES[cfg.dtype]
    x = jnp.take(self.word_embeddings[...], tokens_bl, axis=0)
    if soft_tokens_bld is not None:
      x = jnp.where(soft_mask_bl[:, :, None], soft_tokens_bld.astype(jnp.float32), x)
    # Padding may carry any position; clip so the gather stays in the table (its state is masked out).
    pos_bl = jnp.clip(positions_bl, 0, cfg.max_positions - 1)
    x = x + jnp.take(self.position_embeddings[...], pos_bl, axis=0) + self.token_type_embeddings[0]
    x = self.embed_norm(x.astype(dtype))
    x = sharding.constrain(x, ("act_batch", "act_len", "act_embed"), self.rules)
    for block in self.blocks:
      call = _remat(type(block).__call__, cfg.remat)
      x = call(block, x, segment_ids_bl, positions_bl)
      x = sharding.constrain(x, ("act_batch", "act_len", "act_embed"), self.rules)
    return x
