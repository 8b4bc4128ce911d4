"""Accelerator attention kernels for packed rows: Pallas splash attention (TPU), Pallas flash (GPU).

Both take the layout of embed2.model.attention.blockwise_attention: q (B, L, K, G, hd), k / v
(B, L, K, hd), segment ids and positions (B, L); both return (B, L, K, G, hd) with padding queries
(segment 0) set to zero, and both pad the row internally to their tile size with segment id 0.
Their masks are by token index, not position: a causal or sliding-window rule by index equals the
rule by position when positions count up by one within each (contiguous) packed example, which is
what the packer and the Embedder produce. `embed2.model.attention.attend` calls them; it checks the
backend first (`require_backend`) and never falls back silently.

TPU: splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`), the kernel MaxText trains
with. Packing through `SegmentIds` (a query sees keys of its own segment id); the static mask is
`FullMask`, `CausalMask`, or `LocalMask` with window (w - 1, w - 1) (bidirectional) or (w - 1, 0)
(causal) for sliding-window layers. Splash's block-sparse mask info skips the blocks outside the band.
Grouped-query attention through the MQA kernel vmapped over the K kv heads (no repeat). Splash has no
logit scale, so q is multiplied by `scale` first. Padding tokens share segment 0 and so attend each
other (splash needs no empty rows); their outputs are zeroed after. Verified on CPU: the kernel's own
Pallas interpret mode (`interpret=True`) runs the same kernel bodies forward and backward, and
tests/test_attention.py checks it against the float64 reference. Not verified here: Mosaic
compilation for a real TPU, its block sizes and its speed.

GPU: `jax.experimental.pallas.ops.gpu.attention.mha`, a Triton-style flash attention that takes
`segment_ids` (B, L) and masks pairs of unequal ids, which is exactly packing; causal is by index. It
has neither a sliding window nor grouped-query heads: K / V are repeated to H heads here (O(L) memory,
not O(L^2)), and `attend` sends sliding-window layers to the blockwise kernel (whose band is
O(L * w)). Why not cuDNN: `jax.nn.dot_product_attention(implementation="cudnn")` (jax 0.10 / 0.11
source, jax/_src/nn/functions.py) expresses masks as (a) `is_causal`, (b) `query_seq_lengths` /
`key_value_seq_lengths`, one valid prefix per row, i.e. padding of ONE example per row, (c)
`local_window_size` only together with causal (a right window raises "cuDNN doesn't support right
window"), or (d) a dense `mask` / `bias` array of (B, 1, L, L), which brings back the O(L^2) memory.
Several examples per row need cuDNN's segment offsets (`q_offsets` / `kv_offsets` in
jax._src.cudnn.fused_attention_stablehlo), which jax.nn.dot_product_attention does not expose, and a
bidirectional window is not expressible at all. So no mask-free cuDNN form covers packed
bidirectional rows. Verified on CPU: `mha(..., interpret=True)` forward and backward against the
float64 reference. Not verified here: Triton compilation and speed on a GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

try:  # Pallas kernels live in jax.experimental; a jax without them gets a clear error on use.
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
except ImportError:  # pragma: no cover
  splash = None
try:
  from jax.experimental.pallas.ops.gpu import attention as pallas_gpu
except ImportError:  # pragma: no cover
  pallas_gpu = None

SPLASH_BLOCK = 512  # splash tile (tokens), rounded to the row for short rows; a multiple of 128
GPU_BLOCK = 128  # Pallas GPU forward tile (the kernel's default)


def require_backend(impl: str, platform: str) -> None:
  """Raises unless jax's default backend is `platform` ("tpu" / "gpu"): no silent fallback."""
  backend = jax.default_backend()
  if backend != platform:
    raise ValueError(f"config.model.attention_impl={impl!r} runs on {platform.upper()} only; this "
                     f"process's jax backend is {backend!r}. Use attention_impl='blockwise' (any "
                     "backend) or 'auto' (the best kernel of the backend)")


def _require_module(module, name: str) -> None:
  if module is None:  # pragma: no cover
    raise ImportError(f"{name} is missing from this jax; use attention_impl='blockwise'")


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _pad_rows(x, padded: int):
  return jnp.pad(x, [(0, 0), (0, padded - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def _zero_padding(out_blkgd, segment_ids_bl):
  return jnp.where((segment_ids_bl != 0)[:, :, None, None, None], out_blkgd, 0).astype(out_blkgd.dtype)


def splash_attention(q_blkgd: jax.Array, k_blkh: jax.Array, v_blkh: jax.Array,
                     segment_ids_bl: jax.Array, positions_bl: jax.Array, *, causal: bool,
                     window: int | None, scale: float, block: int = SPLASH_BLOCK,
                     interpret: bool = False) -> jax.Array:
  """Splash attention of packed rows (see the module docstring); (B, L, K, G, hd) like q.

  `interpret=True` runs the kernel in Pallas interpret mode (any backend; slow; for tests).
  """
  _require_module(splash, "jax.experimental.pallas.ops.tpu.splash_attention")
  del positions_bl  # index masks; see the module docstring
  b, l, kv, g, hd = q_blkgd.shape
  tile = min(block, _round_up(l, 128))
  lp = _round_up(l, tile)
  if window is None:
    one = splash.CausalMask((lp, lp)) if causal else splash.FullMask((lp, lp))
  else:
    one = splash.LocalMask((lp, lp), (window - 1, 0 if causal else window - 1), offset=0)
  sizes = splash.BlockSizes(block_q=tile, block_kv=tile, block_kv_compute=tile, block_q_dkv=tile,
                            block_kv_dkv=tile, block_kv_dkv_compute=tile, block_q_dq=tile,
                            block_kv_dq=tile)
  kernel = splash.make_splash_mqa_single_device(splash.MultiHeadMask([one] * g), block_sizes=sizes,
                                                interpret=interpret)
  seg = _pad_rows(segment_ids_bl.astype(jnp.int32), lp)
  q = _pad_rows(q_blkgd * jnp.asarray(scale, q_blkgd.dtype), lp).transpose(0, 2, 3, 1, 4)  # B K G L hd
  k = _pad_rows(k_blkh, lp).transpose(0, 2, 1, 3)  # (B, K, Lp, hd)
  v = _pad_rows(v_blkh, lp).transpose(0, 2, 1, 3)

  def one_row(q_kgld, k_kld, v_kld, seg_l):
    ids = splash.SegmentIds(q=seg_l, kv=seg_l)
    return jax.vmap(lambda qq, kk, vv: kernel(qq, kk, vv, segment_ids=ids))(q_kgld, k_kld, v_kld)

  out = jax.vmap(one_row)(q, k, v, seg)  # (B, K, G, Lp, hd)
  out = out.transpose(0, 3, 1, 2, 4)[:, :l]
  return _zero_padding(out.astype(q_blkgd.dtype), segment_ids_bl)


def pallas_gpu_attention(q_blkgd: jax.Array, k_blkh: jax.Array, v_blkh: jax.Array,
                         segment_ids_bl: jax.Array, positions_bl: jax.Array, *, causal: bool,
                         scale: float, block: int = GPU_BLOCK, interpret: bool = False) -> jax.Array:
  """Pallas GPU flash attention of packed rows, global layers only; (B, L, K, G, hd) like q.

  `interpret=True` runs the kernel in Pallas interpret mode (any backend; slow; for tests).
  """
  _require_module(pallas_gpu, "jax.experimental.pallas.ops.gpu.attention")
  del positions_bl  # index masks; see the module docstring
  b, l, kv, g, hd = q_blkgd.shape
  tile = min(block, _round_up(l, 32))  # a multiple of the backward tiles (32)
  lp = _round_up(l, tile)
  seg = _pad_rows(segment_ids_bl.astype(jnp.int32), lp)
  q = _pad_rows(q_blkgd, lp).reshape(b, lp, kv * g, hd)
  repeat = lambda x: jnp.broadcast_to(_pad_rows(x, lp)[:, :, :, None], (b, lp, kv, g, hd)).reshape(
      b, lp, kv * g, hd)  # the kernel has no grouped-query heads
  sizes = pallas_gpu.BlockSizes(block_q=tile, block_k=tile, block_q_dkv=32, block_kv_dkv=32,
                                block_q_dq=32, block_kv_dq=32)
  out = pallas_gpu.mha(q, repeat(k_blkh), repeat(v_blkh), seg, sm_scale=float(scale), causal=causal,
                       block_sizes=sizes, interpret=interpret)
  out = out.reshape(b, lp, kv, g, hd)[:, :l]
  return _zero_padding(out.astype(q_blkgd.dtype), segment_ids_bl)

