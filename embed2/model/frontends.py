"""Modality frontends: raw pixels and log-mel frames -> soft tokens in the model dim (Flax NNX).

Each frontend turns one modality into a fixed number of soft tokens (N, T, D) that replace placeholder
tokens in the transformer's input (`Transformer(..., soft_tokens_bld=..., soft_mask_bl=...)`). Host-side
preprocessing (decode, resize, log-mel, chunking) lives in `embed2.data.media`; everything here runs on
device and is jit-able, with static shapes set by the config.

  PatchImageFrontend   uint8 (N, S, S, 3) -> x/127.5 - 1 -> p x p patches -> linear (p*p*3 -> D) + bias
                       + learned position embedding per patch -> average-pool the (S/p)^2 grid to
                       sqrt(T) x sqrt(T) -> RMSNorm (1 + w)                              -> (N, T, D)
  ViTImageFrontend     uint8 (N, S, S, 3) -> x/127.5 - 1 -> `vision.VisionEncoder` (SigLIP tower,
                       Gemma 3 projector: pool, RMSNorm, projection)                     -> (N, T, D)
  ConvAudioFrontend    float32 log-mel (N, F, M) -> conv1d(k3, s2, p1, M -> C) + bias, gelu
                       -> conv1d(k3, s2, p1, C -> C) + bias, gelu -> linear (C -> D) -> RMSNorm (1 + w)
                                                                       -> (N, ceil(ceil(F/2)/2), D)

Scale. Gemma multiplies its token embeddings by sqrt(D), so a text token enters the residual stream with
entries of about unit RMS. The patch and audio frontends end in an RMSNorm with (1 + w) scales (w = 0 at
init) so their soft tokens start at exactly unit RMS too and neither modality drowns the other. The ViT
frontend keeps Gemma 3's projector unchanged (its output is what Gemma 3's language model was trained to
read, so it gets no extra norm): RMSNorm over the vision width, then the (Wv, D) projection; at our init
(projection ~ N(0, 1/Wv)) its entries have about unit RMS, and with Gemma 3 weights loaded they have the
scale Gemma 3's projector learned.

Audio receptive field. Both convolutions have kernel 3, stride 2, zero padding 1, so first-conv output i
sees frames 2i-1..2i+1 and soft token t sees frames 4t-3..4t+3 (frames outside [0, F) are zeros, and
the second conv's padding is a zero first-conv output, not a convolution of zero frames). Hence the first
k tokens depend on frames 0..4k-1 only: running frames [0, 4k) alone gives the same first k tokens.
Tokens near a chunk's end do see the chunk's padding frames, so a chunk must always be padded the same
way (to `audio_chunk_frames` with `media.log_mel_pad_value`) for an audio clip to embed identically
wherever it appears.

Parameters are float32 with logical axis names (the model dim is "embed"); compute runs in cfg.dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from embed2.model import vision
from embed2.model.presets import ModelConfig
from embed2.model.transformer import RMSNorm, _param

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Audio subsampling convolutions: kernel, stride, zero padding on each side (see the module docstring).
CONV_KERNEL, CONV_STRIDE, CONV_PAD = 3, 2, 1


def normalize_pixels(images_nhw3: jax.Array, dtype) -> jax.Array:
  """uint8 pixels (..., 3) in [0, 255] -> x / 127.5 - 1 in [-1, 1] (SigLIP): float32 math, then `dtype`."""
  return (images_nhw3.astype(jnp.float32) / 127.5 - 1.0).astype(dtype)


def _check_images(cfg: ModelConfig, images_nhw3) -> None:
  s = cfg.media.image_size
  if images_nhw3.ndim != 4 or tuple(images_nhw3.shape[1:]) != (s, s, 3):
    raise ValueError(f"images have shape {tuple(images_nhw3.shape)}; the image frontend expects "
                     f"(N, {s}, {s}, 3) uint8 RGB, channels last, resized to config.model.media.image_size={s} "
                     "(embed2.data.media.load_image does this)")
  if images_nhw3.dtype != jnp.uint8:
    raise ValueError(f"images have dtype {images_nhw3.dtype}; the image frontend expects uint8 pixels in "
                     "[0, 255] and normalises them itself (x / 127.5 - 1); pass the raw pixels")


class PatchImageFrontend(nnx.Module):
  """Linear patch embedding straight into the model dim, for small models.

  Parameters: kernel (p, p, 3, D), bias (D,), pos_embedding ((S/p)^2, D) row-major over the patch grid,
  norm.scale (D,).
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    p, d = cfg.media.patch_size, cfg.model_dim
    grid = cfg.media.image_size // p
    init = nnx.initializers.normal(stddev=1.0)
    self.kernel = _param(rngs, init, (p, p, 3, d), (None, None, None, "embed"), (p * p * 3) ** -0.5)
    self.bias = nnx.Param(jnp.zeros((d,), jnp.float32), logical_axes=("norm",))
    # Small (ViT-style) so position nudges rather than replaces the content at init.
    self.pos_embedding = _param(rngs, init, (grid * grid, d), (None, "embed"), 0.02)
    self.norm = RMSNorm(d, eps=cfg.rms_eps, axis_name="norm", rngs=rngs)

  def __call__(self, images_nhw3: jax.Array) -> jax.Array:
    """uint8 (N, S, S, 3) RGB -> soft tokens (N, cfg.media.image_tokens, D) in cfg.dtype, ~unit RMS."""
    cfg, media = self.cfg, self.cfg.media
    _check_images(cfg, images_nhw3)
    dt = _DTYPES[cfg.dtype]
    n, p = images_nhw3.shape[0], media.patch_size
    g = media.image_size // p  # patches per side
    x = normalize_pixels(images_nhw3, dt).reshape(n, g, p, g, p, 3)  # (N, row, i, col, j, 3)
    x_npd = jnp.einsum("nxiyjc,ijcd->nxyd", x, self.kernel[...].astype(dt)).reshape(n, g * g, -1)
    x_npd = x_npd + self.bias[...].astype(dt) + self.pos_embedding[...].astype(dt)
    t = math.isqrt(media.image_tokens)  # tokens per side; the config guarantees t divides g
    k = g // t
    grid = x_npd.reshape(n, t, k, t, k, -1)  # (N, token row, i, token col, j, D)
    pooled = jnp.mean(grid.astype(jnp.float32), axis=(2, 4)).astype(dt).reshape(n, t * t, -1)
    return self.norm(pooled)


class ViTImageFrontend(nnx.Module):
  """Gemma 3's vision path: SigLIP tower + multimodal projector, as `vision.VisionEncoder`.

  Its parameters live under `encoder` in VisionEncoder's own layout (`encoder.tower...`,
  `encoder.projector...`), so `embed2.convert.load_vision_params(frontend.encoder, path)` fills them.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.encoder = vision.VisionEncoder(self.vision_config(cfg), rngs=rngs)

  @staticmethod
  def vision_config(cfg: ModelConfig) -> vision.VisionConfig:
    """The VisionConfig the model config's media.vit_* fields describe (projecting into model_dim)."""
    m = cfg.media
    return vision.VisionConfig(image_size=m.image_size, patch_size=m.patch_size, width=m.vit_width,
                               depth=m.vit_depth, num_heads=m.vit_heads, mlp_dim=m.vit_mlp_dim,
                               mm_tokens_per_image=m.image_tokens, text_dim=cfg.model_dim, dtype=cfg.dtype)

  def __call__(self, images_nhw3: jax.Array) -> jax.Array:
    """uint8 (N, S, S, 3) RGB -> soft tokens (N, cfg.media.image_tokens, D) in cfg.dtype (projector scale)."""
    _check_images(self.cfg, images_nhw3)
    return self.encoder(normalize_pixels(images_nhw3, _DTYPES[self.cfg.dtype]))


class Conv1d(nnx.Module):
  """1-D convolution over time with bias: kernel 3, stride 2, zero padding 1 on each side.

  Parameters: kernel (3, Cin, Cout), where tap k multiplies frame 2i - 1 + k for output i; bias (Cout,).
  """

  def __init__(self, in_dim: int, out_dim: int, *, rngs: nnx.Rngs):
    init = nnx.initializers.normal(stddev=1.0)
    self.kernel = _param(rngs, init, (CONV_KERNEL, in_dim, out_dim), (None, None, None),
                         (CONV_KERNEL * in_dim) ** -0.5)
    self.bias = nnx.Param(jnp.zeros((out_dim,), jnp.float32), logical_axes=(None,))

  def __call__(self, x_nfc: jax.Array) -> jax.Array:
    """(N, F, Cin) -> (N, ceil(F / 2), Cout) in x's dtype."""
    out = jax.lax.conv_general_dilated(
        x_nfc, self.kernel[...].astype(x_nfc.dtype), window_strides=(CONV_STRIDE,),
        padding=((CONV_PAD, CONV_PAD),), dimension_numbers=("NWC", "WIO", "NWC"))
    return out + self.bias[...].astype(x_nfc.dtype)


class ConvAudioFrontend(nnx.Module):
  """Log-mel frames -> soft tokens: two stride-2 convolutions (4x fewer tokens than frames), then D.

  Parameters: conv1.{kernel (3, M, C), bias (C,)}, conv2.{kernel (3, C, C), bias (C,)}, proj (C, D),
  norm.scale (D,).
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    m, c, d = cfg.media.n_mels, cfg.media.audio_conv_dim, cfg.model_dim
    self.conv1 = Conv1d(m, c, rngs=rngs)
    self.conv2 = Conv1d(c, c, rngs=rngs)
    init = nnx.initializers.normal(stddev=1.0)
    self.proj = _param(rngs, init, (c, d), (None, "embed"), c ** -0.5)
    self.norm = RMSNorm(d, eps=cfg.rms_eps, axis_name="norm", rngs=rngs)

  def __call__(self, mel_nfm: jax.Array) -> jax.Array:
    """float32 log-mel (N, F, n_mels) -> soft tokens (N, cfg.media.audio_tokens(F), D) in cfg.dtype, ~unit RMS.

    Token t sees frames 4t-3..4t+3 (see the module docstring); F >= 1.
    """
    cfg, n_mels = self.cfg, self.cfg.media.n_mels
    if mel_nfm.ndim != 3 or mel_nfm.shape[2] != n_mels or mel_nfm.shape[1] < 1:
      raise ValueError(f"log-mel features have shape {tuple(mel_nfm.shape)}; the audio frontend expects "
                       f"(N, F >= 1, {n_mels}) with config.model.media.n_mels={n_mels} mel bands "
                       "(embed2.data.media.log_mel makes them with the same config)")
    if not jnp.issubdtype(mel_nfm.dtype, jnp.floating):
      raise ValueError(f"log-mel features have dtype {mel_nfm.dtype}; expected float32")
    dt = _DTYPES[cfg.dtype]
    x = mel_nfm.astype(dt)
    h = jax.nn.gelu(self.conv1(x), approximate=True)  # (N, ceil(F/2), C)
    h = jax.nn.gelu(self.conv2(h), approximate=True)  # (N, ceil(ceil(F/2)/2), C)
    return self.norm(h @ self.proj[...].astype(dt))  # (N, T, D)


ImageFrontend = PatchImageFrontend | ViTImageFrontend


def build_frontends(cfg: ModelConfig, *, rngs: nnx.Rngs
                    ) -> tuple[ImageFrontend | None, ConvAudioFrontend | None]:
  """(image frontend, audio frontend) for cfg.media.image_frontend / audio_frontend; None where "none".

  Video has no frontend of its own: each frame goes through the image frontend. The names are checked
  by MediaConfig (IMAGE_FRONTENDS, AUDIO_FRONTENDS).
  """
  image = {"none": None, "patch": PatchImageFrontend, "vit": ViTImageFrontend}[cfg.media.image_frontend]
  audio = {"none": None, "conv": ConvAudioFrontend}[cfg.media.audio_frontend]
  return (None if image is None else image(cfg, rngs=rngs),
          None if audio is None else audio(cfg, rngs=rngs))
