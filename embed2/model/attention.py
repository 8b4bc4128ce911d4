"""Attention masks for packed rows and the attention kernels behind one switch.

Masking is driven by per-token segment ids and positions, so the same code covers padding, several
examples packed into one row, bidirectional or causal attention and sliding windows:

  allowed(i, j) = seg[i] == seg[j] != 0                       (same example, not padding)
                  and (not causal or pos[j] <= pos[i])
                  and (not local  or |pos[i] - pos[j]| < w)    (w-1 tokens each side; causal: w-1 back)

Positions restart at 0 for every packed example, so windows never reach across examples either.
A padding query (seg 0) attends to nothing; its output is defined as zero rather than NaN.

Kernels (`config.model.attention_impl`):
  xla                    einsum -> float32 softmax -> einsum; runs everywhere; the reference.
  dot_product_attention  jax.nn.dot_product_attention with the full boolean mask; JAX picks the
                         backend (cuDNN flash attention on GPU where the mask form allows, XLA otherwise).
  cudnn                  the same call forced to cuDNN (GPU only; fails loudly elsewhere).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)


def make_mask(segment_ids_bl: jax.Array, positions_bl: jax.Array, *, causal: bool,
              window: int | None) -> jax.Array:
  """Boolean (B, 1, L, L) mask: True where query i may attend key j."""
  seg_q = segment_ids_bl[:, :, None]
  seg_k = segment_ids_bl[:, None, :]
  mask = (seg_q == seg_k) & (seg_k != 0)
  pos_q = positions_bl[:, :, None]
  pos_k = positions_bl[:, None, :]
  if causal:
    mask &= pos_k <= pos_q
  if window is not None:
    mask &= jnp.abs(pos_q - pos_k) < window
  return mask[:, None, :, :]


def attend(q_blhk: jax.Array, k_blkh: jax.Array, v_blkh: jax.Array, mask_b1ll: jax.Array, *,
           scale: float, impl: str) -> jax.Array:
  """Grouped-query attention.

  Args:
    q_blhk: queries (B, L, H, hd), already RoPE'd and normed.
    k_blkh: keys (B, L, K, hd); K divides H, each kv head serves H/K query heads.
    v_blkh: values (B, L, K, hd).
    mask_b1ll: boolean mask from `make_mask`.
    scale: multiplier of the logits.
    impl: one of embed2.model.presets.ATTENTION_IMPLS.

  Returns:
    (B, L, H, hd) in the dtype of q; rows of fully-masked queries are zero.
  """
  if impl == "xla":
    return _attend_xla(q_blhk, k_blkh, v_blkh, mask_b1ll, scale)
  implementation = "cudnn" if impl == "cudnn" else None
  out = jax.nn.dot_product_attention(q_blhk, k_blkh, v_blkh, mask=mask_b1ll, scale=scale,
                                     implementation=implementation)
  has_key = jnp.any(mask_b1ll[:, 0], axis=-1)  # (B, L)
  return jnp.where(has_key[:, :, None, None], out, 0).astype(q_blhk.dtype)


def _attend_xla(q, k, v, mask, scale):
  b, l, h, d = q.shape
  kv = k.shape[2]
  q = q.reshape(b, l, kv, h // kv, d)
  logits = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32) * scale
  logits = jnp.where(mask[:, :, None], logits, _NEG)  # mask (B,1,L,L) -> (B,1,1,L,L)
  probs = jax.nn.softmax(logits, axis=-1)
  probs = jnp.where(mask[:, :, None], probs, 0.0)  # fully-masked rows give 0, not a uniform average
  out = jnp.einsum("bkgqs,bskd->bqkgd", probs.astype(v.dtype), v)
  return out.reshape(b, l, h, d)
