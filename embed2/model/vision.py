"""Gemma 3's vision frontend: a SigLIP ViT and the multimodal projector (Flax NNX).

  images (B, H, W, C) in [-1, 1] -> patches (B, N, Wv) -> ViT -> (B, N, Wv)
      -> avg-pool to T = mm_tokens_per_image -> RMSNorm (1 + w) -> @ projection (Wv, D) -> soft tokens (B, T, D)

The soft tokens enter the language model's residual stream in place of image placeholder tokens
(`Transformer(..., soft_tokens_bld=..., soft_mask_bl=...)`); `embed2.model.frontends.ViTImageFrontend`
is this encoder as the model's `vit` image frontend (uint8 pixels in, normalised on device).

SigLIP (as `transformers`' SiglipVisionModel without its pooling head, which Gemma 3 does not use):
  patch embedding: a stride-p p x p convolution, written as a dense map over each patch's pixels;
  learned position embeddings (N = (H/p) * (W/p) positions, row-major);
  pre-LN blocks: x += attn(ln1(x)); x += mlp(ln2(x)); full bidirectional attention with biased q/k/v/o,
  queries scaled by head_dim**-0.5; MLP fc2(gelu_tanh(fc1(x))) with biases; a final LayerNorm.

Projector (Gemma3MultiModalProjector): the (H/p) x (W/p) patch grid is average-pooled with a square
kernel down to sqrt(T) x sqrt(T), normalised by an RMSNorm with (1 + w) scales (eps = the ViT's
layer_norm_eps), and multiplied by the projection matrix (Wv, D), which has no bias.

Parameter names and shapes (Wv vision width, Fv vision MLP dim, h heads, hd = Wv / h, p patch size):
  tower.patch.kernel (p, p, C, Wv), tower.patch.bias (Wv,), tower.pos_embedding (N, Wv);
  tower.blocks[i].{ln1,ln2}.{scale,bias} (Wv,); attn.{q,k,v} (Wv, h, hd), attn.{q,k,v}_bias (h, hd),
  attn.o (h, hd, Wv), attn.o_bias (Wv,); mlp.fc1 (Wv, Fv), mlp.fc1_bias (Fv,), mlp.fc2 (Fv, Wv),
  mlp.fc2_bias (Wv,); tower.post_norm.{scale,bias} (Wv,);
  projector.norm.scale (Wv,), projector.projection (Wv, D).
`embed2.convert` maps Hugging Face Gemma 3 multimodal checkpoints onto these one to one.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from embed2.model.transformer import RMSNorm, _param

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True, kw_only=True)
class VisionConfig:
  """Shape of the SigLIP tower and projector. Defaults: Gemma 3 4B/12B/27B (SigLIP So400m/14 at 896 px)."""

  image_size: int = 896  # square input side, pixels
  patch_size: int = 14  # p
  num_channels: int = 3  # C
  width: int = 1152  # Wv
  depth: int = 27
  num_heads: int = 16  # h
  mlp_dim: int = 4304  # Fv
  layer_norm_eps: float = 1e-6  # also the projector RMSNorm's eps, as in Gemma 3
  mm_tokens_per_image: int = 256  # T soft tokens per image
  text_dim: int = 2560  # D of the language model the projector feeds
  dtype: str = "float32"  # compute dtype; parameters stay float32

  def __post_init__(self):
    self.validate()

  @property
  def patches_per_side(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:  # N
    return self.patches_per_side ** 2

  @property
  def tokens_per_side(self) -> int:
    return math.isqrt(self.mm_tokens_per_image)

  @property
  def pool(self) -> int:
    """Side of the average-pooling window over the patch grid."""
    return self.patches_per_side // self.tokens_per_side

  def validate(self) -> None:
    def fail(msg):
      raise ValueError(f"vision config: {msg}")

    for f in ("image_size", "patch_size", "num_channels", "width", "depth", "num_heads", "mlp_dim",
              "mm_tokens_per_image", "text_dim"):
      v = getattr(self, f)
      if not isinstance(v, int) or v < 1:
        fail(f"{f}={v!r} must be a positive integer")
    if self.image_size % self.patch_size:
      fail(f"patch_size={self.patch_size} does not divide image_size={self.image_size}")
    if self.width % self.num_heads:
      fail(f"num_heads={self.num_heads} does not divide width={self.width}")
    if self.tokens_per_side ** 2 != self.mm_tokens_per_image:
      fail(f"mm_tokens_per_image={self.mm_tokens_per_image} must be a square (pooled to a square grid)")
    if self.patches_per_side % self.tokens_per_side:
      fail(f"the {self.patches_per_side}x{self.patches_per_side} patch grid does not pool evenly to "
           f"{self.tokens_per_side}x{self.tokens_per_side} tokens; change mm_tokens_per_image")
    if self.dtype not in _DTYPES:
      fail(f"dtype={self.dtype!r}; choose one of {sorted(_DTYPES)}")

  def replace(self, **overrides: Any) -> "VisionConfig":
    return dataclasses.replace(self, **overrides)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "VisionConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"unknown vision config fields {unknown}; known fields: {sorted(known)}")
    return cls(**d)


class LayerNorm(nnx.Module):
  """y = (x - mean) / sqrt(var + eps) * scale + bias over the last axis, in float32."""

  def __init__(self, dim: int, *, eps: float):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=("norm",))
    self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32), logical_axes=("norm",))
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


def _zeros(shape, axes):
  return nnx.Param(jnp.zeros(shape, jnp.float32), logical_axes=axes)


class PatchEmbed(nnx.Module):
  """Non-overlapping p x p patches -> (B, N, Wv); equal to a stride-p 'valid' convolution."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
    p, c, w = cfg.patch_size, cfg.num_channels, cfg.width
    init = nnx.initializers.normal(stddev=1.0)
    self.kernel = _param(rngs, init, (p, p, c, w), (None, None, None, None), (p * p * c) ** -0.5)
    self.bias = _zeros((w,), ("norm",))
    self.patch_size = p

  def __call__(self, images_bhwc):
    b, h, w, c = images_bhwc.shape
    p = self.patch_size
    x = images_bhwc.reshape(b, h // p, p, w // p, p, c)
    dt = images_bhwc.dtype
    # (B, rows, i, cols, j, C) x (i, j, C, Wv): each output position sees its own patch only.
    out = jnp.einsum("bxiyjc,ijcw->bxyw", x, self.kernel[...].astype(dt)) + self.bias[...].astype(dt)
    return out.reshape(b, (h // p) * (w // p), -1)  # row-major over the patch grid, as the conv's flatten


class SiglipAttention(nnx.Module):

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
    w, h = cfg.width, cfg.num_heads
    hd = w // h
    init = nnx.initializers.normal(stddev=1.0)
    for name in ("q", "k", "v"):
      setattr(self, name, _param(rngs, init, (w, h, hd), (None, "heads", "head_dim"), w ** -0.5))
      setattr(self, f"{name}_bias", _zeros((h, hd), ("heads", "head_dim")))
    self.o = _param(rngs, init, (h, hd, w), ("heads", "head_dim", None), w ** -0.5)
    self.o_bias = _zeros((w,), ("norm",))
    self.scale = hd ** -0.5

  def __call__(self, x_bnw):
    dt = x_bnw.dtype
    proj = lambda w, b: jnp.einsum("bnw,whk->bnhk", x_bnw, w[...].astype(dt)) + b[...].astype(dt)
    q, k, v = proj(self.q, self.q_bias), proj(self.k, self.k_bias), proj(self.v, self.v_bias)
    logits = jnp.einsum("bqhk,bshk->bhqs", q, k, preferred_element_type=jnp.float32) * self.scale
    probs = jax.nn.softmax(logits, axis=-1).astype(dt)
    out = jnp.einsum("bhqs,bshk->bqhk", probs, v)
    return jnp.einsum("bqhk,hkw->bqw", out, self.o[...].astype(dt)) + self.o_bias[...].astype(dt)


class SiglipMLP(nnx.Module):

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
    w, f = cfg.width, cfg.mlp_dim
    init = nnx.initializers.normal(stddev=1.0)
    self.fc1 = _param(rngs, init, (w, f), (None, "mlp"), w ** -0.5)
    self.fc1_bias = _zeros((f,), ("mlp",))
    self.fc2 = _param(rngs, init, (f, w), ("mlp", None), f ** -0.5)
    self.fc2_bias = _zeros((w,), ("norm",))

  def __call__(self, x):
    dt = x.dtype
    h = jax.nn.gelu(x @ self.fc1[...].astype(dt) + self.fc1_bias[...].astype(dt), approximate=True)
    return h @ self.fc2[...].astype(dt) + self.fc2_bias[...].astype(dt)


class SiglipBlock(nnx.Module):

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
    self.ln1 = LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
    self.attn = SiglipAttention(cfg, rngs=rngs)
    self.ln2 = LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
    self.mlp = SiglipMLP(cfg, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.ln1(x))
    return x + self.mlp(self.ln2(x))


class SiglipTower(nnx.Module):
  """Pixels (B, H, W, C) -> final-normed patch states (B, N, Wv)."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.patch = PatchEmbed(cfg, rngs=rngs)
    self.pos_embedding = _param(rngs, nnx.initializers.normal(stddev=1.0), (cfg.num_patches, cfg.width),
                                (None, None), cfg.width ** -0.5)
    self.blocks = nnx.List([SiglipBlock(cfg, rngs=rngs) for _ in range(cfg.depth)])
    self.post_norm = LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

  def __call__(self, images_bhwc):
    cfg = self.cfg
    want = (cfg.image_size, cfg.image_size, cfg.num_channels)
    if images_bhwc.ndim != 4 or tuple(images_bhwc.shape[1:]) != want:
      raise ValueError(f"images have shape {images_bhwc.shape}; expected (B, {want[0]}, {want[1]}, "
                       f"{want[2]}) (channels last, resized to vision config image_size)")
    x = self.patch(images_bhwc.astype(_DTYPES[cfg.dtype]))
    x = x + self.pos_embedding[...].astype(x.dtype)
    for block in self.blocks:
      x = block(x)
    return self.post_norm(x)


class MultiModalProjector(nnx.Module):
  """Patch states (B, N, Wv) -> soft tokens (B, T, D): average-pool, RMSNorm, project."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.norm = RMSNorm(cfg.width, eps=cfg.layer_norm_eps, rngs=rngs)
    self.projection = _param(rngs, nnx.initializers.normal(stddev=1.0), (cfg.width, cfg.text_dim),
                             (None, "embed"), cfg.width ** -0.5)

  def __call__(self, x_bnw):
    cfg = self.cfg
    b, _, w = x_bnw.shape
    g, k = cfg.tokens_per_side, cfg.pool
    grid = x_bnw.reshape(b, g, k, g, k, w)  # (B, token row, i, token col, j, Wv)
    pooled = jnp.mean(grid.astype(jnp.float32), axis=(2, 4)).astype(x_bnw.dtype).reshape(b, g * g, w)
    return self.norm(pooled) @ self.projection[...].astype(x_bnw.dtype)


class VisionEncoder(nnx.Module):
  """Images -> Gemma 3 soft tokens (B, T, D) for the language model."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.tower = SiglipTower(cfg, rngs=rngs)
    self.projector = MultiModalProjector(cfg, rngs=rngs)

  def encode_patches(self, images_bhwc: jax.Array) -> jax.Array:
    """SigLIP's last hidden state: (B, H, W, C) float pixels in [-1, 1] -> (B, N, Wv)."""
    return self.tower(images_bhwc)

  def __call__(self, images_bhwc: jax.Array) -> jax.Array:
    """(B, H, W, C) float pixels in [-1, 1] (SigLIP preprocessing: x / 127.5 - 1) -> (B, T, D)."""
    return self.projector(self.tower(images_bhwc))
