"""Attention for packed rows: the mask rule, the kernels behind one switch, and blockwise attention.

Masking is driven by per-token segment ids and positions, so the same code covers padding, several
examples packed into one row, bidirectional or causal attention and sliding windows:

  allowed(i, j) = seg[i] == seg[j] != 0                       (same example, not padding)
                  and (not causal or pos[j] <= pos[i])
                  and (not local  or |pos[i] - pos[j]| < w)    (w-1 tokens each side; causal: w-1 back)

Positions restart at 0 for every packed example, so windows never reach across examples either.
A padding query (seg 0) attends to nothing; its output is defined as zero rather than NaN.
`make_mask` writes the rule out as a (B, 1, L, L) array: the readable definition, used by the xla path
and the tests. The other kernels never build it.

Kernels (`config.model.attention_impl`, embed2.model.presets.ATTENTION_IMPLS):
  xla                    einsum -> float32 softmax -> einsum over the full mask; runs everywhere; the
                         reference. Memory O(L^2) per layer: (B, K, G, L, L) float32 logits.
  dot_product_attention  jax.nn.dot_product_attention with the full boolean mask; JAX picks the
                         backend (XLA today); O(L^2) like xla.
  cudnn                  the same call forced to cuDNN (GPU only; fails loudly elsewhere). With a dense
                         mask it is O(L^2) too; see "GPU" below for why no mask-free cuDNN form fits.
  blockwise              pure JAX flash attention (this file, `blockwise_attention`); O(L) memory.
  splash                 Pallas TPU splash attention (embed2.model.attention_kernels); TPU only.
  pallas_gpu             Pallas GPU flash attention with segment ids on global layers, blockwise on
                         sliding-window layers (embed2.model.attention_kernels); GPU only.
  auto                   `resolve_impl`: splash on TPU, pallas_gpu on GPU, and elsewhere xla for rows
                         up to AUTO_XLA_MAX_LENGTH tokens, blockwise above.

Blockwise attention. The row is cut into query blocks of `block_q` and key blocks of `block_k` tokens
(padded internally to a multiple of both with segment id 0). For each query block a scan over key
blocks keeps the online softmax (running max m, normaliser l, float32 accumulator), and the mask of
each (query block, key block) pair is computed on the spot from the blocks' segment ids and positions
by the rule above. A pair the mask rules out entirely is skipped at run time (`lax.cond`): in a row of
short packed examples most pairs are. A sliding-window layer visits only the band of key blocks that
can hold keys within the window of the query block: ceil((block_q + 2 (w - 1)) / block_k) + 1 blocks,
so its cost is O(L * w), not O(L^2). The band assumes what the packer and the Embedder make: within an
example, positions count up by one per token, so |pos_i - pos_j| < w implies |i - j| < w. Grouped-query
attention runs as (K, G) head groups against the K key/value heads; nothing is repeated. The backward
pass is a custom VJP that keeps only q, k, v, the output and the log-sum-exp per query (all O(L)) and
recomputes each block's probabilities, flash-attention style; dk and dv accumulate into (B, K, L, hd)
buffers. No array of the forward or backward program has two dimensions of length L.

Sharding. The kernels that own their loops (blockwise, splash, pallas_gpu) run per shard under
`jax.shard_map` when a mesh is set: the batch over the rules' `act_batch` axes, the kv heads (or, when
there are fewer kv heads than tensor shards, the query heads of each group) over `act_kv_heads` /
`act_heads`. Attention never mixes examples or heads, so this needs no communication.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from embed2 import sharding
from embed2.model import attention_kernels

_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)
# Default blockwise tiles (tokens). 512 x 512 keeps a block's float32 logits at 1 MiB per head.
BLOCK_Q = 512
BLOCK_K = 512
# `auto` on CPU: rows up to this length use the xla path. `python -m embed2.bench.attention` (gemma3-1b
# heads, forward + backward, 2-core CPU): xla 11 ms vs blockwise 20 ms at L = 256, but 199 vs 80 ms at
# 512 and 1.3 vs 0.8 s at 1,024.
AUTO_XLA_MAX_LENGTH = 256


# ------------------------------------------------------------------------------------------ mask


def allowed(seg_q, pos_q, seg_k, pos_k, *, causal: bool, window: int | None) -> jax.Array:
  """The mask rule on broadcastable query / key arrays of segment ids and positions."""
  mask = (seg_q == seg_k) & (seg_k != 0)
  if causal:
    mask &= pos_k <= pos_q
  if window is not None:
    mask &= jnp.abs(pos_q - pos_k) < window
  return mask


def make_mask(segment_ids_bl: jax.Array, positions_bl: jax.Array, *, causal: bool,
              window: int | None) -> jax.Array:
  """Boolean (B, 1, L, L) mask: True where query i may attend key j."""
  mask = allowed(segment_ids_bl[:, :, None], positions_bl[:, :, None], segment_ids_bl[:, None, :],
                 positions_bl[:, None, :], causal=causal, window=window)
  return mask[:, None, :, :]


# -------------------------------------------------------------------------------------- dispatch


def resolve_impl(impl: str, length: int, backend: str | None = None) -> str:
  """The kernel `impl` names for rows of `length` tokens on `backend` (default: jax's): `auto` picks."""
  if impl != "auto":
    return impl
  backend = backend or jax.default_backend()
  if backend == "tpu":
    return "splash"
  if backend == "gpu":
    return "pallas_gpu"
  return "xla" if length <= AUTO_XLA_MAX_LENGTH else "blockwise"


def attend(q_blhk: jax.Array, k_blkh: jax.Array, v_blkh: jax.Array, segment_ids_bl: jax.Array,
           positions_bl: jax.Array, *, causal: bool, window: int | None, scale: float, impl: str,
           rules=None, block_q: int | None = None, block_k: int | None = None) -> jax.Array:
  """Grouped-query attention of packed rows.

  Args:
    q_blhk: queries (B, L, H, hd), already RoPE'd and normed.
    k_blkh: keys (B, L, K, hd); K divides H, each kv head serves G = H/K query heads.
    v_blkh: values (B, L, K, hd).
    segment_ids_bl: int (B, L); 0 = padding, 1..S = the packed example of each token.
    positions_bl: int (B, L); position of each token within its example.
    causal: keys after the query (by position) are masked.
    window: sliding window w (|pos_i - pos_j| < w), or None for global attention.
    scale: multiplier of the logits.
    impl: one of embed2.model.presets.ATTENTION_IMPLS.
    rules: logical-axis rules (embed2.sharding) for the per-shard kernels; None = the defaults.
    block_q, block_k: blockwise tiles (tokens; None = BLOCK_Q / BLOCK_K); a row shorter than a
      tile is one tile.

  Returns:
    (B, L, H, hd) in the dtype of q; rows of fully-masked queries are zero.
  """
  b, l, h, hd = q_blhk.shape
  kv = k_blkh.shape[2]
  if window is not None and window >= l:
    window = None  # the window covers the whole row; skip the extra compare and the band
  impl = resolve_impl(impl, l)
  if impl in ("xla", "dot_product_attention", "cudnn"):
    mask_b1ll = make_mask(segment_ids_bl, positions_bl, causal=causal, window=window)
    if impl == "xla":
      return _attend_xla(q_blhk, k_blkh, v_blkh, mask_b1ll, scale)
    implementation = "cudnn" if impl == "cudnn" else None
    out = jax.nn.dot_product_attention(q_blhk, k_blkh, v_blkh, mask=mask_b1ll, scale=scale,
                                       implementation=implementation)
    has_key = jnp.any(mask_b1ll[:, 0], axis=-1)  # (B, L)
    return jnp.where(has_key[:, :, None, None], out, 0).astype(q_blhk.dtype)
  q_blkgd = q_blhk.reshape(b, l, kv, h // kv, hd)
  if impl in ("splash", "pallas_gpu"):
    attention_kernels.require_backend(impl, "tpu" if impl == "splash" else "gpu")
  if impl == "blockwise" or (impl == "pallas_gpu" and window is not None):
    # The Pallas GPU kernel has no sliding window; the band of the blockwise kernel is O(L * w).
    kernel = functools.partial(blockwise_attention, causal=causal, window=window, scale=scale,
                               block_q=block_q or BLOCK_Q, block_k=block_k or BLOCK_K)
  elif impl == "splash":
    kernel = functools.partial(attention_kernels.splash_attention, causal=causal, window=window,
                               scale=scale)
  elif impl == "pallas_gpu":
    kernel = functools.partial(attention_kernels.pallas_gpu_attention, causal=causal, scale=scale)
  else:
    raise ValueError(f"attention impl {impl!r}; choose one of embed2.model.presets.ATTENTION_IMPLS")
  out = per_shard(kernel, q_blkgd, k_blkh, rules)(q_blkgd, k_blkh, v_blkh, segment_ids_bl,
                                                  positions_bl)
  return out.reshape(b, l, h, hd)


def per_shard(kernel, q_blkgd: jax.Array, k_blkh: jax.Array, rules):
  """`kernel(q_blkgd, k, v, seg, pos)` under `jax.shard_map` over batch and head shards of the mesh
  in context (see the module docstring); the kernel itself where there is no mesh of several devices."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or mesh.size == 1:
    return kernel
  rules = rules if rules is not None else sharding.DEFAULT_RULES
  spec_k = sharding.logical_to_spec(("act_batch", None, "act_kv_heads", None), rules, mesh,
                                    k_blkh.shape)
  batch, heads = spec_k[0], spec_k[2]
  group = None
  if heads is None:  # too few kv heads to shard: shard each group's query heads instead
    spec_q = sharding.logical_to_spec(("act_batch", None, None, "act_heads", None), rules, mesh,
                                      q_blkgd.shape)
    group = spec_q[3]
  q_spec = P(batch, None, heads, group, None)
  kv_spec = P(batch, None, heads, None)
  row_spec = P(batch, None)
  return jax.shard_map(kernel, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, row_spec, row_spec),
                       out_specs=q_spec, check_vma=False)


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


# ------------------------------------------------------------------------------------- blockwise


@dataclasses.dataclass(frozen=True)
class BlockPlan:
  """The static tiling of one blockwise call (hashable: it is a nondiff argument of the VJP)."""

  length: int  # L: the row as given
  padded: int  # Lp: L rounded up to a multiple of both tiles
  block_q: int
  block_k: int
  visit: int  # key blocks visited per query block: all, or the sliding window's band
  causal: bool
  window: int | None
  scale: float

  @property
  def num_q(self) -> int:
    return self.padded // self.block_q

  @property
  def num_k(self) -> int:
    return self.padded // self.block_k

  def first_key_block(self, i):
    """Index of the first key block visited by query block i (traced int)."""
    if self.visit == self.num_k:
      return jnp.zeros_like(i)
    lo = jnp.maximum(i * self.block_q - (self.window - 1), 0) // self.block_k
    return jnp.minimum(lo, self.num_k - self.visit)


def make_plan(length: int, *, causal: bool, window: int | None, scale: float,
              block_q: int = BLOCK_Q, block_k: int = BLOCK_K) -> BlockPlan:
  """Tiles for a row of `length` tokens: a row shorter than a tile is one tile."""
  if block_q < 1 or block_k < 1:
    raise ValueError(f"blockwise attention tiles block_q={block_q}, block_k={block_k} must be >= 1")
  bq, bk = min(block_q, length), min(block_k, length)
  step = bq * bk // math.gcd(bq, bk)
  padded = -(-length // step) * step
  num_k = padded // bk
  visit = num_k
  if window is not None:
    # Query block [s, s + bq) needs keys [s - w + 1, s + bq + w - 2]: bq + 2 (w - 1) tokens, which
    # touch at most ceil(that / bk) + 1 key blocks.
    visit = min(num_k, -(-(bq + 2 * (window - 1)) // bk) + 1)
  return BlockPlan(length=length, padded=padded, block_q=bq, block_k=bk, visit=visit,
                   causal=causal, window=window, scale=float(scale))


def blockwise_attention(q_blkgd: jax.Array, k_blkh: jax.Array, v_blkh: jax.Array,
                        segment_ids_bl: jax.Array, positions_bl: jax.Array, *, causal: bool,
                        window: int | None, scale: float, block_q: int = BLOCK_Q,
                        block_k: int = BLOCK_K) -> jax.Array:
  """Flash-style attention in pure JAX (see the module docstring).

  Args:
    q_blkgd: queries (B, L, K, G, hd): K kv heads, G query heads each.
    k_blkh, v_blkh: (B, L, K, hd).
    segment_ids_bl, positions_bl: int (B, L), as `attend` takes them.
    causal, window, scale: as `attend`.
    block_q, block_k: tiles (tokens).

  Returns:
    (B, L, K, G, hd) in q's dtype; fully masked (padding) queries are zero.
  """
  b, l, kv, g, hd = q_blkgd.shape
  plan = make_plan(l, causal=causal, window=window, scale=scale, block_q=block_q, block_k=block_k)
  pad = plan.padded - l
  widen = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  seg, pos = widen(segment_ids_bl.astype(jnp.int32)), widen(positions_bl.astype(jnp.int32))
  # Queries as (num_q, B, K, G, bq, hd) for a scan over query blocks; keys as (B, K, Lp, hd).
  q = widen(q_blkgd).reshape(b, plan.num_q, plan.block_q, kv, g, hd).transpose(1, 0, 3, 4, 2, 5)
  k = widen(k_blkh).transpose(0, 2, 1, 3)
  v = widen(v_blkh).transpose(0, 2, 1, 3)
  out = _flash(q, k, v, seg, pos, plan)  # (num_q, B, K, G, bq, hd)
  out = out.transpose(1, 0, 4, 2, 3, 5).reshape(b, plan.padded, kv, g, hd)
  return out[:, :l]


def _query_rows(x_bl, plan):
  """(B, Lp) -> (num_q, B, bq): a row array cut into query blocks for the scan."""
  return x_bl.reshape(x_bl.shape[0], plan.num_q, plan.block_q).transpose(1, 0, 2)


def _key_block(plan, kb, k, v, seg, pos):
  """Key block number kb (traced): k, v (B, K, bk, hd), seg, pos (B, bk)."""
  at = kb * plan.block_k
  return (lax.dynamic_slice_in_dim(k, at, plan.block_k, axis=2),
          lax.dynamic_slice_in_dim(v, at, plan.block_k, axis=2),
          lax.dynamic_slice_in_dim(seg, at, plan.block_k, axis=1),
          lax.dynamic_slice_in_dim(pos, at, plan.block_k, axis=1))


def _block_mask(plan, seg_q, pos_q, seg_k, pos_k):
  """(B, 1, 1, bq, bk): the mask rule on one (query block, key block) pair."""
  mask = allowed(seg_q[:, :, None], pos_q[:, :, None], seg_k[:, None, :], pos_k[:, None, :],
                 causal=plan.causal, window=plan.window)
  return mask[:, None, None]


def _logits(plan, q, k_blk):
  return jnp.einsum("bkgqd,bksd->bkgqs", q, k_blk, preferred_element_type=jnp.float32) * plan.scale


def _forward(q, k, v, seg, pos, plan):
  """Online softmax over each query block's key blocks; returns out (like q) and lse (f32)."""

  def one_query_block(_, xs):
    q_blk, seg_q, pos_q, i = xs  # (B, K, G, bq, hd), (B, bq), (B, bq), ()
    first = plan.first_key_block(i)

    def one_key_block(carry, j):
      k_blk, v_blk, seg_k, pos_k = _key_block(plan, first + j, k, v, seg, pos)
      mask = _block_mask(plan, seg_q, pos_q, seg_k, pos_k)

      def update(carry):
        m, l, acc = carry
        s = jnp.where(mask, _logits(plan, q_blk, k_blk), _NEG)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        l = l * corr + p.sum(-1)
        pv = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(v.dtype), v_blk,
                        preferred_element_type=jnp.float32)
        return m_new, l, acc * corr[..., None] + pv

      return lax.cond(jnp.any(mask), update, lambda c: c, carry), None

    stats = q_blk.shape[:-1]
    init = (jnp.full(stats, _NEG, jnp.float32), jnp.zeros(stats, jnp.float32),
            jnp.zeros(q_blk.shape, jnp.float32))
    (m, l, acc), _ = lax.scan(one_key_block, init, jnp.arange(plan.visit))
    seen = l > 0  # False only for queries that may attend nothing (padding)
    out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
    return None, (out.astype(q.dtype), lse)

  xs = (q, _query_rows(seg, plan), _query_rows(pos, plan), jnp.arange(plan.num_q))
  _, (out, lse) = lax.scan(one_query_block, None, xs)
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, seg, pos, plan):
  return _forward(q, k, v, seg, pos, plan)[0]


def _flash_fwd(q, k, v, seg, pos, plan):
  out, lse = _forward(q, k, v, seg, pos, plan)
  return out, (q, k, v, seg, pos, out, lse)


def _flash_bwd(plan, residuals, dout):
  """Recomputes each block's probabilities from lse; dq per query block, dk / dv accumulated."""
  q, k, v, seg, pos, out, lse = residuals
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # (nq, B, K, G, bq)

  def one_query_block(carry, xs):
    q_blk, do_blk, lse_blk, delta_blk, seg_q, pos_q, i = xs
    first = plan.first_key_block(i)

    def one_key_block(carry, j):
      kb = first + j
      k_blk, v_blk, seg_k, pos_k = _key_block(plan, kb, k, v, seg, pos)
      mask = _block_mask(plan, seg_q, pos_q, seg_k, pos_k)

      def update(carry):
        dq, dk, dv = carry
        p = jnp.where(mask, jnp.exp(_logits(plan, q_blk, k_blk) - lse_blk[..., None]), 0.0)
        dv_blk = jnp.einsum("bkgqs,bkgqd->bksd", p.astype(do_blk.dtype), do_blk,
                            preferred_element_type=jnp.float32)
        dp = jnp.einsum("bkgqd,bksd->bkgqs", do_blk, v_blk, preferred_element_type=jnp.float32)
        ds = p * (dp - delta_blk[..., None]) * plan.scale
        dq = dq + jnp.einsum("bkgqs,bksd->bkgqd", ds.astype(k_blk.dtype), k_blk,
                             preferred_element_type=jnp.float32)
        dk_blk = jnp.einsum("bkgqs,bkgqd->bksd", ds.astype(q_blk.dtype), q_blk,
                            preferred_element_type=jnp.float32)
        at = kb * plan.block_k
        add = lambda acc, d: lax.dynamic_update_slice_in_dim(
            acc, lax.dynamic_slice_in_dim(acc, at, plan.block_k, axis=2) + d, at, axis=2)
        return dq, add(dk, dk_blk), add(dv, dv_blk)

      return lax.cond(jnp.any(mask), update, lambda c: c, carry), None

    dq0 = jnp.zeros(q_blk.shape, jnp.float32)
    (dq, dk, dv), _ = lax.scan(one_key_block, (dq0, *carry), jnp.arange(plan.visit))
    return (dk, dv), dq.astype(q.dtype)

  xs = (q, dout, lse, delta, _query_rows(seg, plan), _query_rows(pos, plan), jnp.arange(plan.num_q))
  init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  (dk, dv), dq = lax.scan(one_query_block, init, xs)
  return dq, dk.astype(k.dtype), dv.astype(v.dtype), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
