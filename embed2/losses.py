"""Contrastive losses over global in-batch negatives: NCE (softmax) and pairwise sigmoid, with MRL.

The math
--------
Queries q_i and targets p_i (their positives) are L2-normalised and compared by cosine similarity
s(x, y) = <x/|x|, y/|y|>. With scale t = 1/tau (fixed `1/cfg.temperature`, or learnable
`t = min(exp(log_scale), cfg.max_scale)`) and logits z(x, y) = t * s(x, y), the NCE loss is

    L = 1/B sum_i -log( e^{z(q_i,p_i)} / ( e^{z(q_i,p_i)} + sum_k e^{z(q_i,n_ik)}
                                          + sum_{j != i} mask(i,j) e^{z(q_i,p_j)} ) )

  * `j` runs over the GLOBAL batch (every device and host); `n_ik` are query i's own K hard
    negatives (`neg_bkd`, shape (B, K, d); K may be 0 / None; `neg_valid_bk` (bool (B, K)) drops the
    missing ones of an example that had fewer than K).
  * mask(i,j) = 0 when q_i == q_j or p_i == p_j by integer content ids (`q_ids_b`, `p_ids_b`, from the
    batch builder; never by comparing embeddings), else 1. Several queries sharing a target (a
    classification task with few labels) therefore never see their shared target as a negative.
    Without ids, an example's position in the global batch is its id, so only j = i is excluded.
  * `valid_b` (bool (B,)) marks real examples: a padded slot is neither a query nor anybody's
    negative, its embedding is replaced by zeros before anything touches it (so NaN/garbage in a
    padded slot cannot leak into the loss or gradients), and B above is the number of valid queries.
    A NaN in a VALID example is not masked: it makes the loss NaN.
  * `cfg.in_batch_negatives=False` drops the sum over j (the denominator is the positive and the own
    hard negatives only).
  * `cfg.symmetric=True` adds the reverse direction (targets retrieving queries, no hard negatives):
    L = (L_{q->p} + L_{p->q}) / 2, with L_{p->q} the same formula with q and p swapped.

Sigmoid (SigLIP-style, `cfg.kind="sigmoid"`): every valid, unmasked pair is an independent binary
classification with logit z_ij = t * s(q_i, p_j) + b (learnable `bias` b, or `cfg.sigmoid_bias`):

    L = -1/B sum_i [ log sig(z_ii) + sum_{j != i} mask(i,j) log sig(-z_ij) + sum_k log sig(-z(q_i, n_ik)) ]

(the pair set is already symmetric, so `symmetric=True` is rejected for it).

MRL (Matryoshka): for prefixes m in `cfg.mrl_dims` (e.g. 768, 1536, 3072) the loss above is computed on
the first m coordinates of every embedding, each prefix re-L2-normalised, and
L_total = sum_m w_m L_m (weights `cfg.mrl_weights`, default 1 each). All prefixes come out of ONE pass
over the targets: with segments [0, m_1), [m_1, m_2), ... the prefix dot products are cumulative sums
of segment dot products, and each prefix's normalisation is a per-row factor:
z_m(i,j) = t * a_m(i) * b_m(j) * sum_{segments s <= m} <q_i[s], p_j[s]>, a_m = 1/|q_i[:m]|,
b_m = 1/|p_j[:m]|. So the matmul work is that of one d-dim similarity, not sum_m m. Coordinates past
the largest prefix are unused (and get zero gradient).

aux metrics, per prefix m: "loss/dim_m" (L_m) and "accuracy/dim_m" (fraction of valid queries whose
positive logit beats every negative they see: in-batch and hard); plus "loss", "scale" (t),
"num_valid" and, for sigmoid, "bias".

Memory
------
The sum over j is the only O(B_global) part per query. The blockwise path (`cfg.blockwise=True`, the
default) computes it per query as one number per MRL prefix (log-sum-exp for softmax, sum of
log sig(-z) for sigmoid) by scanning over blocks of `cfg.block_size` targets with an online max/sum,
and its backward pass (a `jax.custom_vjp`) recomputes each block instead of storing it:
with w_ij = mask * exp(z_ij - lse_i), dL/dz_ij = g_i * w_ij (softmax) or -g_i * mask * sig(z_ij)
(sigmoid), and dL/dq_i = sum_j dL/dz_ij * dz_ij/dq_i is accumulated block by block. A device holds at
most a few (B_local, M, block) float32 blocks, plus the all-gathered (B_global, d) target embeddings
and their gradient: memory linear in the batch. Logits, log-sum-exps, the gathered targets and all
gradients inside the loss are float32 whatever the embedding dtype (bf16 embeddings are upcast on
entry, so the cross-device sum of target gradients is a float32 reduce-scatter).

`dense_contrastive_loss` is the readable reference: the (B, B) logit matrix and plain autodiff.

Sharding
--------
`sharded_contrastive_loss(mesh, cfg=...)` wraps the same per-device code in `jax.shard_map` over the
batch mesh axes (default ('data', 'fsdp'); others, e.g. 'tensor', see the embeddings replicated). Each
device all-gathers the targets (and their inverse norms, ids, validity) over the batch axes; the
transpose of that all_gather is a psum_scatter, so every target's gradient is summed over the devices
that used it exactly once. The per-device sums of losses are psum'd and divided by the global number
of valid queries.

Usage (the batch keys are those of `embed2.data.packing`):

    cfg = LossConfig(temperature=0.05, learnable_temperature=True, mrl_dims=(768, 1536, 3072))
    loss_params = init_loss_params(cfg)          # {"log_scale": f32[]}: train it with the model
    loss_fn = sharded_contrastive_loss(mesh, cfg=cfg)
    loss, aux = loss_fn(q_bd, p_bd, neg_bkd=n_bkd, neg_valid_bk=batch["negative_valid"],
                        q_ids_b=batch["query_ids"], p_ids_b=batch["positive_ids"],
                        valid_b=batch["example_valid"], **loss_params)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

_KINDS = ("softmax", "sigmoid")
# Norms below this are treated as this (a zero or padded embedding maps to the zero vector).
_NORM_EPS = 1e-12


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossConfig:
  """Contrastive loss settings.

  Attributes:
    kind: "softmax" (NCE / InfoNCE) or "sigmoid" (pairwise, SigLIP-style).
    temperature: tau > 0. Fixed scale 1/tau, or the initial value of a learnable one.
    learnable_temperature: if True the caller passes `log_scale` (and `bias` for sigmoid), trainable
      parameters initialised by `init_loss_params(cfg)`.
    max_scale: upper clamp on a learnable scale exp(log_scale) (CLIP's 100); None for no clamp.
    sigmoid_bias: the sigmoid loss's bias b (fixed, or the initial value of a learnable one).
    symmetric: also let targets retrieve queries (softmax only).
    mrl_dims: embedding prefixes the loss is applied to, strictly increasing; () = the full dim.
    mrl_weights: one weight per prefix; None = 1 each (the losses are summed).
    use_duplicate_mask: mask pairs with equal query or target content ids.
    in_batch_negatives: use other examples' targets as negatives (task negative policy); if False
      only the own positive and own hard negatives form the denominator.
    blockwise: True = memory-linear blockwise kernel; False = dense (B, B) reference.
    block_size: targets per block of the blockwise kernel.
    precision: matmul precision for the similarity ("highest" keeps f32 on TPU/GPU; the loss's
      matmuls are tiny next to the encoder's).
  """
  kind: str = "softmax"
  temperature: float = 0.05
  learnable_temperature: bool = False
  max_scale: float | None = 100.0
  sigmoid_bias: float = -10.0
  symmetric: bool = False
  mrl_dims: tuple[int, ...] = ()
  mrl_weights: tuple[float, ...] | None = None
  use_duplicate_mask: bool = True
  in_batch_negatives: bool = True
  blockwise: bool = True
  block_size: int = 1024
  precision: str | None = "highest"

  def __post_init__(self):
    # Configs from ml_collections hand over lists; keep the dataclass hashable.
    object.__setattr__(self, "mrl_dims", tuple(int(m) for m in self.mrl_dims))
    if self.mrl_weights is not None:
      object.__setattr__(self, "mrl_weights", tuple(float(w) for w in self.mrl_weights))
    if self.kind not in _KINDS:
      raise ValueError(f"config.loss.kind={self.kind!r} must be one of {_KINDS}")
    if not self.temperature > 0:
      raise ValueError(f"config.loss.temperature={self.temperature} must be > 0 (e.g. 0.05)")
    if self.max_scale is not None and not self.max_scale > 0:
      raise ValueError(f"config.loss.max_scale={self.max_scale} must be > 0 or None")
    if self.block_size < 1:
      raise ValueError(f"config.loss.block_size={self.block_size} must be >= 1 (e.g. 1024)")
    dims = self.mrl_dims
    if any(m < 1 for m in dims) or any(b <= a for a, b in zip(dims, dims[1:])):
      raise ValueError(f"config.loss.mrl_dims={dims} must be positive and strictly increasing, "
                       "e.g. (768, 1536, 3072)")
    if self.mrl_weights is not None and len(self.mrl_weights) != max(len(dims), 1):
      raise ValueError(f"config.loss.mrl_weights={self.mrl_weights} needs one weight per entry of "
                       f"mrl_dims={dims}")
    if self.symmetric and self.kind == "sigmoid":
      raise ValueError("config.loss.symmetric=True with kind='sigmoid': the pairwise sigmoid loss is "
                       "already symmetric; set symmetric=False")
    if self.symmetric and not self.in_batch_negatives:
      raise ValueError("config.loss.symmetric=True needs in_batch_negatives=True (targets retrieve "
                       "queries from the batch)")


def init_loss_params(cfg: LossConfig) -> dict[str, jax.Array]:
  """Initial learnable loss parameters, to splat into the loss: `contrastive_loss(..., **params)`.

  Returns:
    {} for a fixed temperature; else {"log_scale": f32[] = log(1/temperature)} and, for sigmoid,
    {"bias": f32[] = cfg.sigmoid_bias}.
  """
  if not cfg.learnable_temperature:
    return {}
  params = {"log_scale": jnp.asarray(math.log(1.0 / cfg.temperature), jnp.float32)}
  if cfg.kind == "sigmoid":
    params["bias"] = jnp.asarray(cfg.sigmoid_bias, jnp.float32)
  return params


# ----------------------------------------------------------------------------------------------
# Checks and small helpers.
# ----------------------------------------------------------------------------------------------


def _check_inputs(q_bd, p_bd, neg_bkd, neg_valid_bk, q_ids_b, p_ids_b, valid_b, log_scale, bias,
                  cfg):
  """Raises ValueError naming the argument whose shape or dtype is wrong."""
  if not isinstance(cfg, LossConfig):
    raise ValueError(f"cfg must be a LossConfig, got {type(cfg).__name__}")
  if len(q_bd.shape) != 2:
    raise ValueError(f"q_bd must have shape (B, d); got {tuple(q_bd.shape)}")
  b, d = q_bd.shape
  if tuple(p_bd.shape) != (b, d):
    raise ValueError(f"p_bd must have the shape of q_bd {(b, d)}; got {tuple(p_bd.shape)}")
  for name, x in (("q_bd", q_bd), ("p_bd", p_bd), ("neg_bkd", neg_bkd)):
    if x is not None and not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must be floating point; got {x.dtype}")
  if neg_bkd is not None and (len(neg_bkd.shape) != 3 or neg_bkd.shape[0] != b
                              or neg_bkd.shape[2] != d):
    raise ValueError(f"neg_bkd must have shape (B={b}, K, d={d}); got {tuple(neg_bkd.shape)}")
  if neg_valid_bk is not None:
    if neg_bkd is None:
      raise ValueError("neg_valid_bk is given but neg_bkd is None; pass both or neither")
    if tuple(neg_valid_bk.shape) != tuple(neg_bkd.shape[:2]):
      raise ValueError(f"neg_valid_bk must have shape (B, K)={tuple(neg_bkd.shape[:2])}; got "
                       f"{tuple(neg_valid_bk.shape)}")
    if neg_valid_bk.dtype != jnp.bool_:
      raise ValueError(f"neg_valid_bk must be bool; got {neg_valid_bk.dtype}")
  for name, x in (("q_ids_b", q_ids_b), ("p_ids_b", p_ids_b)):
    if x is None:
      continue
    if tuple(x.shape) != (b,):
      raise ValueError(f"{name} must have shape (B,)=({b},); got {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"{name} must hold integer content ids; got {x.dtype}")
  if valid_b is not None:
    if tuple(valid_b.shape) != (b,):
      raise ValueError(f"valid_b must have shape (B,)=({b},); got {tuple(valid_b.shape)}")
    if valid_b.dtype != jnp.bool_:
      raise ValueError(f"valid_b must be bool; got {valid_b.dtype}")
  for name, x in (("log_scale", log_scale), ("bias", bias)):
    if x is not None and tuple(jnp.shape(x)) != ():
      raise ValueError(f"{name} must be a scalar; got shape {tuple(jnp.shape(x))}")
  if cfg.learnable_temperature and log_scale is None:
    raise ValueError("config.loss.learnable_temperature=True but log_scale is None; pass the "
                     "parameters from init_loss_params(cfg)")
  if bias is not None and cfg.kind != "sigmoid":
    raise ValueError(f"bias is only used by kind='sigmoid' (config.loss.kind={cfg.kind!r}); "
                     "drop it")
  if cfg.mrl_dims and cfg.mrl_dims[-1] > d:
    raise ValueError(f"config.loss.mrl_dims={cfg.mrl_dims} exceeds the embedding dim d={d} of "
                     "q_bd; lower the prefixes or grow the projection")


def _mrl_dims(cfg: LossConfig, d: int) -> tuple[int, ...]:
  return cfg.mrl_dims or (d,)


def _mrl_weights(cfg: LossConfig, d: int) -> tuple[float, ...]:
  return cfg.mrl_weights or (1.0,) * len(_mrl_dims(cfg, d))


def _segments(dims: Sequence[int]) -> tuple[tuple[int, int], ...]:
  """MRL prefixes (m_1 < m_2 < ...) -> disjoint segments [0, m_1), [m_1, m_2), ..."""
  return tuple(zip((0,) + tuple(dims[:-1]), tuple(dims)))


def _scale_and_bias(cfg: LossConfig, log_scale, bias) -> tuple[jax.Array, jax.Array]:
  """The logit scale t = 1/tau and the sigmoid bias b (0 for softmax), float32 scalars."""
  if log_scale is None:
    scale = jnp.asarray(1.0 / cfg.temperature, jnp.float32)
  else:
    scale = jnp.exp(jnp.asarray(log_scale, jnp.float32))
    if cfg.max_scale is not None:
      scale = jnp.minimum(scale, cfg.max_scale)
  if cfg.kind == "sigmoid":
    b = jnp.asarray(cfg.sigmoid_bias if bias is None else bias, jnp.float32)
  else:
    b = jnp.zeros((), jnp.float32)
  return scale, b


def _prefix_sums(parts: Sequence[jax.Array], axis: int) -> jax.Array:
  """Stacks running sums of `parts` along `axis` (M is 1-4: a few adds beat lax.cumsum, which
  lowers to a large associative scan on CPU)."""
  out = [parts[0]]
  for x in parts[1:]:
    out.append(out[-1] + x)
  return jnp.stack(out, axis)


def _prefix_inv_norms(x_nd: jax.Array, segs) -> jax.Array:
  """(..., d) float -> (..., M) float32 1/|x[..., :m]| per MRL prefix m (zero rows -> 1/eps)."""
  x = x_nd.astype(jnp.float32)
  sq = _prefix_sums([jnp.sum(jnp.square(x[..., a:b]), -1) for a, b in segs], -1)
  return lax.rsqrt(jnp.maximum(sq, _NORM_EPS ** 2))


def _prefix_row_dots(x_nd: jax.Array, y_nd: jax.Array, segs) -> jax.Array:
  """Row-wise (broadcasting) prefix dot products (..., d), (..., d) -> (..., M) float32."""
  x, y = x_nd.astype(jnp.float32), y_nd.astype(jnp.float32)
  return _prefix_sums([jnp.sum(x[..., a:b] * y[..., a:b], -1) for a, b in segs], -1)


def _l2_normalize(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), -1, keepdims=True), _NORM_EPS ** 2))


# ----------------------------------------------------------------------------------------------
# In-batch statistics: for each (local) query and MRL prefix, one number summarising its in-batch
# negatives over all (global) targets.  Softmax: lse_i = log sum_j mask_ij e^{z_ij}; sigmoid:
# sum_j mask_ij log sig(-z_ij).  Also the max negative logit (for accuracy; no gradient).
#
#   q_bd     (Bq, d)   query embeddings (any float dtype)
#   qa_bm    (Bq, M)   f32 scale * 1/|q[:m]|  (the scale is folded in here)
#   qkey_b2  (Bq, 2)   int32 (query id, target id) of each query's own example
#   qc_b     (Bq,)     f32 additive logit offset (the sigmoid bias; 0 for softmax)
#   t_nd     (N, d)    all targets
#   tb_nm    (N, M)    f32 1/|t[:m]|
#   tkey_n2  (N, 2)    int32 ids of each target's example
#   tvalid_n (N,)      bool
# mask_ij = tvalid_j & qkey_i[0] != tkey_j[0] & qkey_i[1] != tkey_j[1]: this also removes j = i,
# since an example's ids equal themselves.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _KernelSpec:
  kind: str
  segs: tuple[tuple[int, int], ...]
  block: int
  precision: str | None


def _block_logits(spec, q_bd, qa_bm, qc_b, t_cd, tb_cm):
  """(Bq, M, C) f32 logits of the queries against a block of C targets, all prefixes at once."""
  q = q_bd.astype(jnp.float32)
  t = t_cd.astype(jnp.float32)
  dots = [jnp.einsum("bd,cd->bc", q[:, a:b], t[:, a:b], precision=spec.precision,
                     preferred_element_type=jnp.float32) for a, b in spec.segs]
  d_bmc = _prefix_sums(dots, 1)  # prefix dot products
  z_bmc = qa_bm[:, :, None] * tb_cm.T[None, :, :] * d_bmc + qc_b[:, None, None]
  return z_bmc, d_bmc


def _block_mask(qkey_b2, tkey_c2, tvalid_c):
  """(Bq, C) bool: which targets of the block are negatives of which query."""
  return (tvalid_c[None, :] & (qkey_b2[:, None, 0] != tkey_c2[None, :, 0])
          & (qkey_b2[:, None, 1] != tkey_c2[None, :, 1]))


def _inbatch_stats_dense(spec, q_bd, qa_bm, qkey_b2, qc_b, t_nd, tb_nm, tkey_n2, tvalid_n):
  """Whole (Bq, M, N) block at once, plain autodiff. Same outputs as `_inbatch_stats_blockwise`."""
  z_bmn, _ = _block_logits(spec, q_bd, qa_bm, qc_b, t_nd, tb_nm)
  mask_b1n = _block_mask(qkey_b2, tkey_n2, tvalid_n)[:, None, :]
  zm = jnp.where(mask_b1n, z_bmn, -jnp.inf)
  neg_max = lax.stop_gradient(jnp.max(zm, -1))
  if spec.kind == "softmax":
    stat = jax.nn.logsumexp(zm, -1)
  else:
    stat = jnp.sum(jnp.where(mask_b1n, jax.nn.log_sigmoid(-z_bmn), 0.0), -1)
  return stat, neg_max


def _pad_blocks(block, t_nd, tb_nm, tkey_n2, tvalid_n):
  """Pads the targets to a multiple of the block and splits them: leading axis = block index."""
  n = t_nd.shape[0]
  c = min(block, n)
  nb = -(-n // c)
  pad = nb * c - n

  def split(x, fill=0):
    if pad:
      x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
    return x.reshape((nb, c) + x.shape[1:])

  # Padded targets are invalid (masked out) and have zero inverse norms, so they add nothing.
  return split(t_nd), split(tb_nm), split(tkey_n2), split(tvalid_n, False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _inbatch_stats_blockwise(spec, q_bd, qa_bm, qkey_b2, qc_b, t_nd, tb_nm, tkey_n2, tvalid_n):
  out, _ = _blockwise_fwd(spec, q_bd, qa_bm, qkey_b2, qc_b, t_nd, tb_nm, tkey_n2, tvalid_n)
  return out


def _blockwise_fwd(spec, q_bd, qa_bm, qkey_b2, qc_b, t_nd, tb_nm, tkey_n2, tvalid_n):
  blocks = _pad_blocks(spec.block, t_nd, tb_nm, tkey_n2, tvalid_n)

  def body(carry, blk):
    run_max, acc = carry
    t_cd, tb_cm, tkey_c2, tvalid_c = blk
    z_bmc, _ = _block_logits(spec, q_bd, qa_bm, qc_b, t_cd, tb_cm)
    mask_b1c = _block_mask(qkey_b2, tkey_c2, tvalid_c)[:, None, :]
    zm = jnp.where(mask_b1c, z_bmc, -jnp.inf)
    new_max = jnp.maximum(run_max, jnp.max(zm, -1))
    if spec.kind == "softmax":
      # Online log-sum-exp: acc = sum_j exp(z_ij - shift_i), shift = running max (0 while no
      # negative was seen, so exp(-inf - shift) stays 0 instead of NaN).
      old_shift = jnp.where(run_max == -jnp.inf, 0.0, run_max)
      shift = jnp.where(new_max == -jnp.inf, 0.0, new_max)
      acc = acc * jnp.exp(old_shift - shift) + jnp.sum(jnp.exp(zm - shift[..., None]), -1)
    else:
      acc = acc + jnp.sum(jnp.where(mask_b1c, jax.nn.log_sigmoid(-z_bmc), 0.0), -1)
    return (new_max, acc), None

  # *_like (not jnp.full) so that inside shard_map the carry varies over the same axes as the
  # values accumulated into it.
  init = (jnp.full_like(qa_bm, -jnp.inf), jnp.zeros_like(qa_bm))
  (neg_max, acc), _ = lax.scan(body, init, blocks)
  if spec.kind == "softmax":
    shift = jnp.where(neg_max == -jnp.inf, 0.0, neg_max)
    stat = shift + jnp.log(acc)  # log(0) = -inf when a query has no negatives
  else:
    stat = acc
  res = (q_bd, qa_bm, qkey_b2, qc_b, t_nd, tb_nm, tkey_n2, tvalid_n, stat)
  return (stat, neg_max), res


def _blockwise_bwd(spec, res, g):
  q_bd, qa_bm, qkey_b2, qc_b, t_nd, tb_nm, tkey_n2, tvalid_n, stat = res
  g_bm = g[0]  # the max negative logit carries no gradient
  n = t_nd.shape[0]
  blocks = _pad_blocks(spec.block, t_nd, tb_nm, tkey_n2, tvalid_n)
  q = q_bd.astype(jnp.float32)

  def body(carry, blk):
    dq_bd, dqa_bm, dqc_b = carry
    t_cd, tb_cm, tkey_c2, tvalid_c = blk
    z_bmc, d_bmc = _block_logits(spec, q_bd, qa_bm, qc_b, t_cd, tb_cm)
    mask_b1c = _block_mask(qkey_b2, tkey_c2, tvalid_c)[:, None, :]
    if spec.kind == "softmax":
      # d lse_i / d z_ij = softmax weight; where() (not a product) keeps masked entries at exactly 0.
      dz = jnp.where(mask_b1c, g_bm[..., None] * jnp.exp(z_bmc - stat[..., None]), 0.0)
    else:
      dz = jnp.where(mask_b1c, -g_bm[..., None] * jax.nn.sigmoid(z_bmc), 0.0)
    # z = qa_i * tb_j * D_ij + qc_i
    dqc_b = dqc_b + jnp.sum(dz, (1, 2))
    dqa_bm = dqa_bm + jnp.sum(dz * tb_cm.T[None] * d_bmc, -1)
    dtb_cm = jnp.sum(dz * qa_bm[:, :, None] * d_bmc, 0).T
    g_bmc = dz * qa_bm[:, :, None] * tb_cm.T[None]  # dL/dD
    # D_m = sum_{s <= m} segment dots, so segment s collects dL/dD_m of every prefix m >= s.
    h_bsc = _prefix_sums([g_bmc[:, i] for i in reversed(range(g_bmc.shape[1]))], 1)[:, ::-1]
    t = t_cd.astype(jnp.float32)
    dq_parts, dt_parts = [], []
    for s, (a, b) in enumerate(spec.segs):
      dq_parts.append(jnp.einsum("bc,cd->bd", h_bsc[:, s], t[:, a:b], precision=spec.precision,
                                 preferred_element_type=jnp.float32))
      dt_parts.append(jnp.einsum("bc,bd->cd", h_bsc[:, s], q[:, a:b], precision=spec.precision,
                                 preferred_element_type=jnp.float32))
    tail = t.shape[1] - spec.segs[-1][1]  # coordinates past the largest prefix get no gradient
    if tail:
      dq_parts.append(jnp.zeros((q.shape[0], tail), jnp.float32))
      dt_parts.append(jnp.zeros((t.shape[0], tail), jnp.float32))
    dq_bd = dq_bd + jnp.concatenate(dq_parts, 1)
    return (dq_bd, dqa_bm, dqc_b), (jnp.concatenate(dt_parts, 1), dtb_cm)

  init = (jnp.zeros_like(q), jnp.zeros_like(qa_bm), jnp.zeros_like(qc_b))
  (dq_bd, dqa_bm, dqc_b), (dt_bcd, dtb_bcm) = lax.scan(body, init, blocks)
  dt_nd = dt_bcd.reshape((-1,) + dt_bcd.shape[2:])[:n]
  dtb_nm = dtb_bcm.reshape((-1,) + dtb_bcm.shape[2:])[:n]
  return (dq_bd.astype(q_bd.dtype), dqa_bm, None, dqc_b, dt_nd.astype(t_nd.dtype), dtb_nm,
          None, None)


_inbatch_stats_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


# ----------------------------------------------------------------------------------------------
# The per-device loss (shared by the single-device and the shard_map paths).
# ----------------------------------------------------------------------------------------------


def _local_loss(q_bd, p_bd, neg_bkd, neg_valid_bk, q_ids_b, p_ids_b, valid_b, log_scale, bias, *,
                cfg, axes):
  """Loss of the local queries against the global targets.

  `axes`: the shard_map batch axes (gather/psum over them), or () on one device / under GSPMD.
  Returns (loss f32[], aux dict of f32[]), identical on every device.
  """
  b, d = q_bd.shape
  dims = _mrl_dims(cfg, d)
  weights = _mrl_weights(cfg, d)
  segs = _segments(dims)
  if axes:
    gather = lambda x: lax.all_gather(x, axes, tiled=True)
    psum = lambda x: lax.psum(x, axes)
    offset = lax.axis_index(axes) * b
    varying = lambda x: lax.pcast(x, axes, to="varying")
  else:
    gather = psum = varying = lambda x: x
    offset = 0
  scale, bias_ = _scale_and_bias(cfg, log_scale, bias)

  valid = jnp.ones((b,), jnp.bool_) if valid_b is None else valid_b
  # Padded slots become zero vectors: they cannot leak NaN into the loss or its gradient. From here
  # on everything is float32, the gathered targets too, so that their gradient is reduce-scattered
  # (summed over devices) in float32; the caller gets gradients in its embeddings' dtype.
  q_bd = jnp.where(valid[:, None], q_bd, 0).astype(jnp.float32)
  p_bd = jnp.where(valid[:, None], p_bd, 0).astype(jnp.float32)
  pos_b = (offset + jnp.arange(b)).astype(jnp.int32)
  use_ids = cfg.use_duplicate_mask
  qid = q_ids_b.astype(jnp.int32) if (use_ids and q_ids_b is not None) else pos_b
  pid = p_ids_b.astype(jnp.int32) if (use_ids and p_ids_b is not None) else pos_b
  key_b2 = jnp.stack([qid, pid], 1)

  qinv_bm = _prefix_inv_norms(q_bd, segs)
  pinv_bm = _prefix_inv_norms(p_bd, segs)
  z_pos_bm = scale * qinv_bm * pinv_bm * _prefix_row_dots(q_bd, p_bd, segs) + bias_
  neg_max_bm = jnp.full(z_pos_bm.shape, -jnp.inf, jnp.float32)

  z_hn_bmk = None
  if neg_bkd is not None and neg_bkd.shape[1] > 0:
    nvalid_b1k = valid[:, None, None]
    if neg_valid_bk is not None:
      nvalid_b1k = nvalid_b1k & neg_valid_bk[:, None, :]
    neg_bkd = jnp.where(jnp.swapaxes(nvalid_b1k, 1, 2), neg_bkd, 0).astype(jnp.float32)
    ninv_bkm = _prefix_inv_norms(neg_bkd, segs)
    dots_bkm = _prefix_row_dots(q_bd[:, None, :], neg_bkd, segs)
    z_hn_bmk = jnp.swapaxes(scale * qinv_bm[:, None, :] * ninv_bkm * dots_bkm + bias_, 1, 2)
    # A missing hard negative is a -inf logit: nothing in the softmax, log sig(-(-inf)) = 0.
    z_hn_bmk = jnp.where(nvalid_b1k, z_hn_bmk, -jnp.inf)
    neg_max_bm = jnp.maximum(neg_max_bm, jnp.max(z_hn_bmk, -1))

  stat_bm = stat_rev_bm = None
  if cfg.in_batch_negatives:
    spec = _KernelSpec(cfg.kind, segs, cfg.block_size, cfg.precision)
    stats = _inbatch_stats_blockwise if cfg.blockwise else _inbatch_stats_dense
    key_g2 = gather(key_b2)
    valid_g = gather(valid)
    qc_b = varying(jnp.broadcast_to(bias_, (b,)))
    stat_bm, nmax_bm = stats(spec, q_bd, varying(scale) * qinv_bm, key_b2, qc_b,
                             gather(p_bd), gather(pinv_bm), key_g2, valid_g)
    neg_max_bm = jnp.maximum(neg_max_bm, nmax_bm)
    if cfg.symmetric:
      stat_rev_bm, _ = stats(spec, p_bd, varying(scale) * pinv_bm, key_b2, qc_b,
                             gather(q_bd), gather(qinv_bm), key_g2, valid_g)

  if cfg.kind == "softmax":
    parts = [z_pos_bm[..., None]]
    if stat_bm is not None:
      parts.append(stat_bm[..., None])
    if z_hn_bmk is not None:
      parts.append(z_hn_bmk)
    loss_bm = jax.nn.logsumexp(jnp.concatenate(parts, -1), -1) - z_pos_bm
    if stat_rev_bm is not None:
      loss_bm = 0.5 * (loss_bm + jnp.logaddexp(z_pos_bm, stat_rev_bm) - z_pos_bm)
  else:
    loss_bm = -jax.nn.log_sigmoid(z_pos_bm)
    if stat_bm is not None:
      loss_bm = loss_bm - stat_bm
    if z_hn_bmk is not None:
      loss_bm = loss_bm - jnp.sum(jax.nn.log_sigmoid(-z_hn_bmk), -1)

  correct_bm = z_pos_bm > neg_max_bm
  n_valid = psum(jnp.sum(valid.astype(jnp.float32)))
  denom = jnp.maximum(n_valid, 1.0)
  loss_m = psum(jnp.sum(jnp.where(valid[:, None], loss_bm, 0.0), 0)) / denom
  acc_m = psum(jnp.sum(jnp.where(valid[:, None], correct_bm, False), 0).astype(jnp.float32)) / denom
  total = sum(w * loss_m[i] for i, w in enumerate(weights))
  aux = {"loss": total, "scale": scale, "num_valid": n_valid}
  if cfg.kind == "sigmoid":
    aux["bias"] = bias_
  for i, m in enumerate(dims):
    aux[f"loss/dim_{m}"] = loss_m[i]
    aux[f"accuracy/dim_{m}"] = acc_m[i]
  return total, aux


# ----------------------------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------------------------


def contrastive_loss(q_bd: jax.Array, p_bd: jax.Array, *, neg_bkd: jax.Array | None = None,
                     neg_valid_bk: jax.Array | None = None,
                     q_ids_b: jax.Array | None = None, p_ids_b: jax.Array | None = None,
                     valid_b: jax.Array | None = None, log_scale: jax.Array | None = None,
                     bias: jax.Array | None = None,
                     cfg: LossConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Contrastive loss of a whole batch held by one device (or left to GSPMD on an Auto mesh; for a
  batch sharded over a mesh prefer `sharded_contrastive_loss`, the only one for Explicit axes).

  Args:
    q_bd: (B, d) query embeddings, any float dtype (need not be normalised).
    p_bd: (B, d) their positive targets.
    neg_bkd: (B, K, d) each query's own hard negatives, or None.
    neg_valid_bk: (B, K) bool, False for missing hard negatives; None = all present.
    q_ids_b, p_ids_b: (B,) integer content ids for the duplicate mask, or None.
    valid_b: (B,) bool, False for padded example slots; None = all valid.
    log_scale: f32[] learnable log(1/tau) (needed when cfg.learnable_temperature).
    bias: f32[] learnable sigmoid bias (kind="sigmoid" only; default cfg.sigmoid_bias).
    cfg: the loss settings; `cfg.blockwise=False` runs `dense_contrastive_loss`.

  Returns:
    (loss f32[], aux) with aux = {"loss", "scale", "num_valid", ["bias"], "loss/dim_{m}",
    "accuracy/dim_{m}"} (accuracy = fraction of valid queries whose positive logit beats every
    negative they see).
  """
  _check_inputs(q_bd, p_bd, neg_bkd, neg_valid_bk, q_ids_b, p_ids_b, valid_b, log_scale, bias,
                cfg)
  if not cfg.blockwise:
    return dense_contrastive_loss(q_bd, p_bd, neg_bkd=neg_bkd, neg_valid_bk=neg_valid_bk,
                                  q_ids_b=q_ids_b, p_ids_b=p_ids_b, valid_b=valid_b,
                                  log_scale=log_scale, bias=bias, cfg=cfg)
  return _local_loss(q_bd, p_bd, neg_bkd, neg_valid_bk, q_ids_b, p_ids_b, valid_b, log_scale, bias,
                     cfg=cfg, axes=())


def dense_contrastive_loss(q_bd, p_bd, *, neg_bkd=None, neg_valid_bk=None, q_ids_b=None,
                           p_ids_b=None, valid_b=None, log_scale=None, bias=None,
                           cfg: LossConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The readable reference: (B, B) logits per MRL prefix and plain autodiff. Same contract as
  `contrastive_loss` (cfg.blockwise and cfg.block_size are ignored). O(B^2) memory."""
  _check_inputs(q_bd, p_bd, neg_bkd, neg_valid_bk, q_ids_b, p_ids_b, valid_b, log_scale, bias,
                cfg)
  b, d = q_bd.shape
  scale, bias_ = _scale_and_bias(cfg, log_scale, bias)
  valid = jnp.ones((b,), jnp.bool_) if valid_b is None else valid_b
  q_bd = jnp.where(valid[:, None], q_bd, 0)
  p_bd = jnp.where(valid[:, None], p_bd, 0)
  ids = jnp.arange(b)
  qid = q_ids_b if (cfg.use_duplicate_mask and q_ids_b is not None) else ids
  pid = p_ids_b if (cfg.use_duplicate_mask and p_ids_b is not None) else ids
  # Examples i and j are each other's negatives unless they share content. Excludes j = i.
  distinct_bb = (qid[:, None] != qid[None, :]) & (pid[:, None] != pid[None, :])
  distinct_bb = distinct_bb & cfg.in_batch_negatives
  mask_bb = distinct_bb & valid[None, :]  # [i, j]: p_j is a negative of query i
  eye_bb = jnp.eye(b, dtype=jnp.bool_)
  n_valid = jnp.sum(valid.astype(jnp.float32))
  denom = jnp.maximum(n_valid, 1.0)

  aux = {"scale": scale, "num_valid": n_valid}
  if cfg.kind == "sigmoid":
    aux["bias"] = bias_
  total = jnp.zeros((), jnp.float32)
  for m, w in zip(_mrl_dims(cfg, d), _mrl_weights(cfg, d)):
    qn, pn = _l2_normalize(q_bd[:, :m]), _l2_normalize(p_bd[:, :m])
    logits_bb = scale * jnp.einsum("id,jd->ij", qn, pn, precision=cfg.precision) + bias_
    pos_b = jnp.diagonal(logits_bb)
    hn_bk = jnp.zeros((b, 0), jnp.float32)
    if neg_bkd is not None:
      nvalid_bk = valid[:, None] & (True if neg_valid_bk is None else neg_valid_bk)
      nn = _l2_normalize(jnp.where(nvalid_bk[..., None], neg_bkd, 0)[:, :, :m])
      hn_bk = scale * jnp.einsum("id,ikd->ik", qn, nn, precision=cfg.precision) + bias_
      hn_bk = jnp.where(nvalid_bk, hn_bk, -jnp.inf)  # a missing negative is no term at all
    if cfg.kind == "softmax":
      # The positive (diagonal) plus the masked in-batch negatives plus the hard negatives.
      in_batch = jnp.where(mask_bb | eye_bb, logits_bb, -jnp.inf)
      loss_b = jax.nn.logsumexp(jnp.concatenate([in_batch, hn_bk], 1), 1) - pos_b
      if cfg.symmetric:
        # Row j: target j retrieving the valid queries i.
        rev = jnp.where((distinct_bb.T & valid[None, :]) | eye_bb, logits_bb.T, -jnp.inf)
        loss_b = 0.5 * (loss_b + jax.nn.logsumexp(rev, 1) - pos_b)
    else:
      loss_b = (-jax.nn.log_sigmoid(pos_b)
                - jnp.sum(jnp.where(mask_bb, jax.nn.log_sigmoid(-logits_bb), 0.0), 1)
                - jnp.sum(jax.nn.log_sigmoid(-hn_bk), 1))
    best_neg = jnp.max(jnp.concatenate([jnp.where(mask_bb, logits_bb, -jnp.inf), hn_bk], 1), 1)
    loss_m = jnp.sum(jnp.where(valid, loss_b, 0.0)) / denom
    aux[f"loss/dim_{m}"] = loss_m
    aux[f"accuracy/dim_{m}"] = jnp.sum(valid & (pos_b > best_neg)) / denom
    total = total + w * loss_m
  aux["loss"] = total
  return total, aux


def sharded_contrastive_loss(mesh: jax.sharding.Mesh, *, cfg: LossConfig,
                             batch_axes: Sequence[str] = ("data", "fsdp")) -> Callable[..., Any]:
  """The loss with negatives gathered from every device of `mesh`, via `jax.shard_map`.

  Args:
    mesh: the device mesh. Batch axes it lacks are skipped (a mesh of ('data',) alone works); its
      other axes (e.g. 'tensor') see the embeddings replicated.
    cfg: the loss settings (cfg.blockwise=False makes each device hold a (B_local, B_global) block).
    batch_axes: the mesh axes the batch dimension is sharded over, major to minor.

  Returns:
    fn(q_bd, p_bd, *, neg_bkd=None, neg_valid_bk=None, q_ids_b=None, p_ids_b=None, valid_b=None,
    log_scale=None, bias=None) -> (loss f32[], aux): the contract of `contrastive_loss`, for
    global arrays whose leading dim is sharded over `batch_axes` (other shardings are resharded on
    entry). The global batch must divide by the number of batch shards. Call it under `jax.jit`.
  """
  axes = tuple(a for a in batch_axes if a in mesh.axis_names)
  n_shards = math.prod(mesh.shape[a] for a in axes)

  def fn(q_bd, p_bd, *, neg_bkd=None, neg_valid_bk=None, q_ids_b=None, p_ids_b=None, valid_b=None,
         log_scale=None, bias=None):
    _check_inputs(q_bd, p_bd, neg_bkd, neg_valid_bk, q_ids_b, p_ids_b, valid_b, log_scale, bias,
                cfg)
    if q_bd.shape[0] % n_shards:
      raise ValueError(f"q_bd has global batch {q_bd.shape[0]}, not divisible by the {n_shards} "
                       f"batch shards of mesh axes {axes}; pad the batch (and mark padding with "
                       "valid_b=False)")
    batched = {"q_bd": q_bd, "p_bd": p_bd, "neg_bkd": neg_bkd, "neg_valid_bk": neg_valid_bk,
               "q_ids_b": q_ids_b,
               "p_ids_b": p_ids_b, "valid_b": valid_b}
    scalars = {"log_scale": log_scale, "bias": bias}
    batched = {k: v for k, v in batched.items() if v is not None}
    scalars = {k: jnp.asarray(v, jnp.float32) for k, v in scalars.items() if v is not None}
    specs = ({k: P(axes) for k in batched}, {k: P() for k in scalars})

    def body(batched, scalars):
      kw = {"neg_bkd": None, "neg_valid_bk": None, "q_ids_b": None, "p_ids_b": None, "valid_b": None,
            "log_scale": None, "bias": None, **batched, **scalars}
      return _local_loss(kw.pop("q_bd"), kw.pop("p_bd"), **kw, cfg=cfg, axes=axes)

    return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=P())(batched, scalars)

  return fn
