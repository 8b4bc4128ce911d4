"""Images: decode (Pillow), convert to RGB, fit to the model's square.

  load_image(Image, cfg, where)  -> uint8 (S, S, 3), S = cfg.image_size   (cfg: MediaConfig)

Pixels stay uint8 until the device (the frontends compute x / 127.5 - 1 there,
`embed2.model.frontends.normalize_pixels`), which keeps host batches four times smaller.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image as PILImage
from PIL import ImageOps

from embed2.data import segments
from embed2.data.media.source import MediaError, check_bytes, check_file, error
from embed2.model.presets import MediaConfig

# Pillow format ids decoded; anything else is refused before decoding (smaller attack surface, clear
# errors). Animated GIF / WebP: the first frame.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


def check_pixel_count(h: int, w: int, cfg: MediaConfig, where: str) -> None:
  """Refuses an H x W image over cfg.max_image_pixels (checked from a header, before decoding)."""
  if h * w > cfg.max_image_pixels:
    raise error(where, f"image is {w}x{h} = {h * w:,} pixels, more than config.model.media.max_image_pixels"
                f"={cfg.max_image_pixels:,}", "downscale it before embedding, or raise "
                "config.model.media.max_image_pixels")


def _over_white(rgba_hw4: np.ndarray) -> np.ndarray:
  """uint8 RGBA -> uint8 RGB composited over white: round(rgb * a + 255 * (1 - a)), a = alpha / 255,
  in exact integer arithmetic."""
  x = rgba_hw4.astype(np.uint32)
  a = x[..., 3:4]
  return ((x[..., :3] * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def _to_rgb(a_hwc: np.ndarray) -> np.ndarray:
  """uint8 (H, W, 1 | 3 | 4) -> uint8 (H, W, 3): grey repeated, alpha composited over white."""
  c = a_hwc.shape[-1]
  if c == 1:
    return np.repeat(a_hwc, 3, axis=-1)
  if c == 4:
    return _over_white(a_hwc)
  return a_hwc


def _float_to_uint8(a: np.ndarray, where: str, what: str) -> np.ndarray:
  if not np.all(np.isfinite(a)):
    raise error(where, f"{what} contain NaN or inf", "give finite float pixels in [0, 1] or uint8 pixels")
  lo, hi = float(a.min()), float(a.max())
  if lo < 0 or hi > 1:
    raise error(where, f"float {what} span [{lo:g}, {hi:g}], outside [0, 1]", "scale float pixels to "
                "[0, 1] (x / 255 for 0..255 values) or give uint8 pixels")
  return np.round(a.astype(np.float64) * 255.0).astype(np.uint8)


def pixels_to_rgb(pixels, cfg: MediaConfig, where: str, what: str = "image pixels") -> np.ndarray:
  """A pixel array -> uint8 (H, W, 3), not resized.

  Args:
    pixels: uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) (RGBA is composited over white), or a float
      array of those shapes with values in [0, 1] (scaled by 255 and rounded).
    cfg: the model config (for max_image_pixels).
    where: names the input in errors.
    what: what the array is, in errors.
  """
  a = np.asarray(pixels)
  if a.ndim == 2:
    a = a[..., None]
  if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
    raise error(where, f"{what} have shape {tuple(np.shape(pixels))}", "give (H, W), (H, W, 1), (H, W, 3) "
                "RGB or (H, W, 4) RGBA")
  h, w = a.shape[:2]
  if h == 0 or w == 0:
    raise error(where, f"{what} have shape {tuple(a.shape)}, an image with no pixels", "give a non-empty "
                "image")
  check_pixel_count(h, w, cfg, where)
  if np.issubdtype(a.dtype, np.floating):
    a = _float_to_uint8(a, where, what)
  elif a.dtype != np.uint8:
    raise error(where, f"{what} have dtype {a.dtype}", "give uint8 (0..255) or float in [0, 1]")
  return _to_rgb(a)


def _needs_numpy(img: PILImage.Image) -> bool:
  """Whether a Pillow image's mode is converted to RGB with numpy (`_pil_to_rgb`): 16-bit and float
  greyscale, and anything with transparency (composited over white)."""
  mode = img.mode
  return (mode in ("I", "F", "RGBA", "LA", "PA", "RGBa", "La") or mode.startswith("I;16")
          or "transparency" in img.info)


def _pil_to_rgb(img: PILImage.Image, where: str) -> np.ndarray:
  """A loaded Pillow image of a `_needs_numpy` mode -> uint8 (H, W, 3)."""
  mode = img.mode
  if mode == "I" or mode.startswith("I;16"):
    # 16-bit greyscale (PNG / TIFF): 0..65535 -> 0..255. Pillow's own I -> L conversion clips instead.
    a = np.asarray(img).astype(np.float64)
    return _to_rgb(np.round(np.clip(a, 0, 65535) / 257.0).astype(np.uint8)[..., None])
  if mode == "F":
    return _to_rgb(_float_to_uint8(np.asarray(img)[..., None], where, "float image pixels"))
  return _over_white(np.asarray(img.convert("RGBA")))


def _decoded_rgb(img: PILImage.Image, where: str) -> np.ndarray | PILImage.Image:
  """A loaded Pillow image of any mode -> uint8 (H, W, 3) for the `_needs_numpy` modes, else a Pillow
  image in mode RGB or L (for `_fit_image`).

  RGB and greyscale images (and the modes Pillow converts to RGB: palette, CMYK, YCbCr, bilevel) are
  resized as Pillow images, without a full-size numpy copy and a Pillow image made from it again (for
  a 3000x2000 JPEG those copies were ~40% of the decode thread's time, most of it holding the GIL).
  """
  if _needs_numpy(img):
    return _pil_to_rgb(img, where)
  return img if img.mode in ("RGB", "L") else img.convert("RGB")


def _decode_image(item: segments.Image, cfg: MediaConfig, where: str) -> np.ndarray:
  """Encoded `data` / a `path` -> uint8 (S, S, 3), decoded and fitted while the source is open."""
  if item.data is not None:
    src = io.BytesIO(check_bytes(item.data, where, "image"))
  else:
    src = check_file(item.path, where, "image")
  formats = ", ".join("WebP" if f == "WEBP" else f for f in IMAGE_FORMATS)
  try:
    img = PILImage.open(src, formats=IMAGE_FORMATS)  # reads the header only
  except PILImage.DecompressionBombError as e:
    raise error(where, f"image is larger than Pillow's decompression-bomb limit ({e})", "downscale it "
                "before embedding; config.model.media.max_image_pixels cannot exceed that limit") from e
  except PILImage.UnidentifiedImageError as e:
    raise error(where, "the data is not an image in a supported format", f"supported formats: {formats}; "
                "convert it, or decode it yourself and give Image(pixels=...)") from e
  except OSError as e:  # e.g. data cut inside the header
    raise error(where, f"the image data is corrupt or truncated, or unreadable ({type(e).__name__}: {e})",
                "re-encode or replace the file") from e
  with img:
    w, h = img.size
    check_pixel_count(h, w, cfg, where)  # before any pixel is decoded
    try:
      img.load()  # a full decode now, so corrupt or truncated data fails here and not half-way later
      # Camera JPEGs store rotation in EXIF. In place: otherwise an image without it is copied whole.
      ImageOps.exif_transpose(img, in_place=True)
      rgb = _decoded_rgb(img, where)
    except MediaError:
      raise
    except Exception as e:  # decoders raise OSError, SyntaxError, zlib.error, struct.error, ...
      raise error(where, f"the {img.format} image data is corrupt or truncated ({type(e).__name__}: {e})",
                  "re-encode or replace the file") from e
    # Inside `with`: a closed image has no pixels left.
    return fit_square(rgb, cfg) if isinstance(rgb, np.ndarray) else _fit_image(rgb, cfg)


def _fit_image(img: PILImage.Image, cfg: MediaConfig) -> np.ndarray:
  """A Pillow image in mode RGB or L -> uint8 (S, S, 3), as `fit_square` of its RGB pixels.

  An L image is resized in L and repeated to three channels after: Pillow resamples every channel
  with the same integer arithmetic, so this equals resizing the grey repeated to RGB, for a third of
  the work.
  """
  s = cfg.image_size
  w, h = img.size
  bicubic = PILImage.Resampling.BICUBIC
  rgb = lambda x: x.convert("RGB") if x.mode == "L" else x  # grey repeated, on the S x S result
  if (h, w) == (s, s):
    return np.array(rgb(img))  # a writable copy, as `fit_square`'s
  if cfg.image_resize == "squash":
    return np.asarray(rgb(img.resize((s, s), bicubic)))
  if cfg.image_resize == "crop":
    side = min(h, w)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)  # sub-pixel centred square
    return np.asarray(rgb(img.resize((s, s), bicubic, box=box)))
  if cfg.image_resize == "pad":
    scale = s / max(h, w)
    nw, nh = min(s, max(1, round(w * scale))), min(s, max(1, round(h * scale)))
    small = img.resize((nw, nh), bicubic) if (nw, nh) != (w, h) else img
    out = np.zeros((s, s, 3), np.uint8)
    top, left = (s - nh) // 2, (s - nw) // 2
    out[top:top + nh, left:left + nw] = np.asarray(rgb(small))
    return out
  raise ValueError(f"config.model.media.image_resize={cfg.image_resize!r}; use 'pad', 'crop' or 'squash'")


def fit_square(rgb_hw3: np.ndarray, cfg: MediaConfig) -> np.ndarray:
  """uint8 (H, W, 3) -> uint8 (S, S, 3), S = cfg.image_size, by cfg.image_resize.

  "pad": keep the aspect ratio, fit inside S x S, centre it on black (0); "crop": scale the shorter side
  to S and cut the centre square; "squash": stretch to S x S. Resampling is Pillow's antialiased BICUBIC
  (deterministic, integer arithmetic). An S x S input is returned unchanged (as a copy).
  """
  s = cfg.image_size
  if rgb_hw3.shape[:2] == (s, s):
    return np.array(rgb_hw3, np.uint8)
  return _fit_image(PILImage.fromarray(np.ascontiguousarray(rgb_hw3, np.uint8)), cfg)


def load_image(item: segments.Image, cfg: MediaConfig, where: str) -> np.ndarray:
  """An image item -> uint8 (S, S, 3) RGB, S = cfg.image_size, resized by cfg.image_resize.

  Sources: `pixels` (see `pixels_to_rgb`), or encoded `data` / a `path` decoded with Pillow (PNG, JPEG,
  WebP, GIF, BMP, TIFF; the first frame of an animation; EXIF rotation applied). Greyscale is repeated
  to three channels, palette images are expanded, 16-bit images are scaled to 8 bits, and transparency
  (RGBA, LA, palette or tRNS transparency) is composited over WHITE: a transparent logo reads as a logo
  on paper, not on black, and black stays the colour of "pad" borders.

  Raises:
    MediaError: corrupt or truncated data, an unsupported format, a missing file, an image with more
      than cfg.max_image_pixels pixels (checked from the header, before decoding), a bad pixel array.
  """
  if item.pixels is not None:
    return fit_square(pixels_to_rgb(item.pixels, cfg, where), cfg)
  return _decode_image(item, cfg, where)
