"""Tests for embed2.data.media (image.py / audio.py / video.py): decoding, resizing, log-mel, chunking,
bad input."""

import io
import math
import struct
import sys
import zlib

import numpy as np
import pytest
from PIL import Image as PILImage
from PIL import ImageOps
from scipy import signal

from embed2.data import media
from embed2.data.media import MediaError
from embed2.data.media import audio as audio_lib
from embed2.data.media import video as video_lib
from embed2.data.segments import Audio, Image, Video
from embed2.model.presets import MediaConfig

WHERE = "task 'shapes' example 17 query"
S = 32


def _cfg(**kw):
  base = dict(image_size=S, patch_size=8, image_tokens=16, sample_rate=8000, n_mels=32, n_fft=256,
              hop_length=80, audio_chunk_frames=100, max_audio_chunks=3, video_fps=2.0,
              video_max_frames=4)
  base.update(kw)
  return MediaConfig(**base)


CFG = _cfg()


def _raises(fn, *needles):
  with pytest.raises(MediaError) as e:
    fn()
  msg = str(e.value)
  assert msg.startswith(WHERE), msg
  for n in needles:
    assert n in msg, msg
  return msg


def _encode(arr, fmt, **kw):
  buf = io.BytesIO()
  PILImage.fromarray(arr).save(buf, format=fmt, **kw)
  return buf.getvalue()


def _smooth_image(rng, h, w):
  """A smooth random RGB image (lossy codecs reproduce it closely), values in 20..235."""
  coarse = rng.uniform(20, 235, (4, 4, 3))
  yy, xx = np.linspace(0, 3, h), np.linspace(0, 3, w)
  y0, x0 = np.minimum(yy.astype(int), 2), np.minimum(xx.astype(int), 2)
  fy, fx = (yy - y0)[:, None, None], (xx - x0)[None, :, None]
  c = coarse
  img = ((1 - fy) * (1 - fx) * c[y0][:, x0] + (1 - fy) * fx * c[y0][:, x0 + 1]
         + fy * (1 - fx) * c[y0 + 1][:, x0] + fy * fx * c[y0 + 1][:, x0 + 1])
  return np.round(img).astype(np.uint8)


def _png_chunk(kind, payload):
  return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png16_rgb(arr_hw3_u16):
  h, w = arr_hw3_u16.shape[:2]
  raw = b"".join(b"\x00" + arr_hw3_u16[i].astype(">u2").tobytes() for i in range(h))
  return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
          + _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b""))


# ============================================================================ images


@pytest.mark.parametrize("policy", ["pad", "crop", "squash"])
@pytest.mark.parametrize("shape", [(20, 50), (50, 20, 1), (23, 41, 3), (64, 40, 4)])
def test_pixels_shapes_dtype_determinism(rng, policy, shape):
  cfg = _cfg(image_resize=policy)
  pixels = rng.integers(0, 256, shape, dtype=np.uint8)
  before = pixels.copy()
  out = media.load_image(Image(pixels=pixels), cfg, WHERE)
  assert out.shape == (S, S, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, media.load_image(Image(pixels=pixels), cfg, WHERE))
  np.testing.assert_array_equal(pixels, before)  # input untouched


def test_square_pixels_pass_through_as_copy(rng):
  pixels = rng.integers(0, 256, (S, S, 3), dtype=np.uint8)
  out = media.load_image(Image(pixels=pixels), CFG, WHERE)
  np.testing.assert_array_equal(out, pixels)
  assert not np.shares_memory(out, pixels)


def test_grey_float_and_rgba_pixels(rng):
  grey = rng.integers(0, 256, (S, S), dtype=np.uint8)
  out = media.load_image(Image(pixels=grey), CFG, WHERE)
  np.testing.assert_array_equal(out, np.repeat(grey[..., None], 3, -1))

  f = rng.uniform(0, 1, (S, S, 3))
  np.testing.assert_array_equal(media.load_image(Image(pixels=f.astype(np.float32)), CFG, WHERE),
                                np.round(f.astype(np.float32).astype(np.float64) * 255).astype(np.uint8))

  rgba = rng.integers(0, 256, (S, S, 4), dtype=np.uint8)
  a = rgba[..., 3:].astype(np.float64) / 255
  ref = np.round(rgba[..., :3] * a + 255 * (1 - a)).astype(np.uint8)  # over white
  np.testing.assert_array_equal(media.load_image(Image(pixels=rgba), CFG, WHERE), ref)


def test_pad_keeps_aspect_and_black_borders(rng):
  cfg = _cfg(image_resize="pad")
  wide = rng.integers(40, 256, (16, 32, 3), dtype=np.uint8)  # fits at scale 1: no resampling
  out = media.load_image(Image(pixels=wide), cfg, WHERE)
  assert (out[:8] == 0).all() and (out[24:] == 0).all()
  np.testing.assert_array_equal(out[8:24], wide)

  colour = rng.integers(60, 256, 3).astype(np.uint8)
  tall = np.broadcast_to(colour, (100, 25, 3)).copy()  # -> 32 x 8, centred: columns 12..19
  out = media.load_image(Image(pixels=tall), cfg, WHERE)
  assert (out[:, :12] == 0).all() and (out[:, 20:] == 0).all()
  assert np.abs(out[:, 12:20].astype(int) - colour).max() <= 1


def test_crop_takes_the_centre(rng):
  cfg = _cfg(image_resize="crop")
  wide = rng.integers(0, 256, (S, 2 * S, 3), dtype=np.uint8)
  out = media.load_image(Image(pixels=wide), cfg, WHERE)
  np.testing.assert_array_equal(out, wide[:, S // 2:S // 2 + S])  # scale 1: an exact crop

  red, blue = np.array([255, 0, 0], np.uint8), np.array([0, 0, 255], np.uint8)
  img = np.broadcast_to(red, (2 * S, 4 * S, 3)).copy()
  img[:, S:3 * S] = blue  # the centre square is blue, both sides red
  out = media.load_image(Image(pixels=img), cfg, WHERE)
  assert np.abs(out[:, 2:-2].astype(int) - blue).max() <= 1


def test_squash_stretches(rng):
  cfg = _cfg(image_resize="squash")
  c1, c2 = rng.integers(0, 256, (2, 3)).astype(np.uint8)
  img = np.empty((10, 80, 3), np.uint8)
  img[:, :40], img[:, 40:] = c1, c2
  out = media.load_image(Image(pixels=img), cfg, WHERE)
  assert (out == out[:1]).all()  # vertically constant input stays so; no padding rows
  assert np.abs(out[:, :14].astype(int) - c1).max() <= 1
  assert np.abs(out[:, 18:].astype(int) - c2).max() <= 1


def test_encoded_round_trips(rng, tmp_path):
  img = _smooth_image(rng, S, S)
  for fmt, kw, tol in [("PNG", {}, 0), ("WEBP", {"lossless": True}, 0), ("JPEG", {"quality": 95}, 6),
                       ("WEBP", {"quality": 95}, 8), ("BMP", {}, 0), ("TIFF", {}, 0)]:
    data = _encode(img, fmt, **kw)
    out = media.load_image(Image(data=data), CFG, WHERE)
    assert out.shape == (S, S, 3) and out.dtype == np.uint8
    err = np.abs(out.astype(int) - img)
    assert err.mean() <= tol / 2 and err.max() <= 4 * tol, (fmt, kw, err.mean(), err.max())
    np.testing.assert_array_equal(out, media.load_image(Image(data=data), CFG, WHERE))
  path = tmp_path / "x.png"
  path.write_bytes(_encode(img, "PNG"))
  np.testing.assert_array_equal(media.load_image(Image(path=str(path)), CFG, WHERE), img)
  np.testing.assert_array_equal(media.load_image(Image(path=path), CFG, WHERE), img)


def test_encoded_modes(rng):
  rgb = rng.integers(0, 256, (S, S, 3), dtype=np.uint8)
  grey = rng.integers(0, 256, (S, S), dtype=np.uint8)
  out = media.load_image(Image(data=_encode(grey, "PNG")), CFG, WHERE)
  np.testing.assert_array_equal(out, np.repeat(grey[..., None], 3, -1))
  out = media.load_image(Image(data=_encode(grey, "JPEG", quality=95)), CFG, WHERE)
  assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()

  # Palette: decoded through the palette; a transparent palette index reads as white.
  pal = PILImage.fromarray(rgb).quantize(colors=16)
  idx = np.asarray(pal)
  palette = np.array(pal.getpalette()[:48], np.uint8).reshape(16, 3)
  buf = io.BytesIO()
  pal.save(buf, format="PNG")
  np.testing.assert_array_equal(media.load_image(Image(data=buf.getvalue()), CFG, WHERE), palette[idx])
  clear = int(idx[0, 0])
  buf = io.BytesIO()
  pal.save(buf, format="PNG", transparency=clear)
  want = palette[idx].copy()
  want[idx == clear] = 255
  np.testing.assert_array_equal(media.load_image(Image(data=buf.getvalue()), CFG, WHERE), want)

  # RGBA and LA: composited over white (float64 reference).
  rgba = rng.integers(0, 256, (S, S, 4), dtype=np.uint8)
  a = rgba[..., 3:].astype(np.float64) / 255
  ref = np.round(rgba[..., :3] * a + 255 * (1 - a)).astype(np.uint8)
  np.testing.assert_array_equal(media.load_image(Image(data=_encode(rgba, "PNG")), CFG, WHERE), ref)
  la = rng.integers(0, 256, (S, S, 2), dtype=np.uint8)
  buf = io.BytesIO()
  PILImage.fromarray(la, mode="LA").save(buf, format="PNG")
  a = la[..., 1:].astype(np.float64) / 255
  ref = np.round(la[..., :1] * a + 255 * (1 - a)).astype(np.uint8).repeat(3, -1)
  np.testing.assert_array_equal(media.load_image(Image(data=buf.getvalue()), CFG, WHERE), ref)

  # 16-bit greyscale and 16-bit RGB: scaled to 8 bits.
  g16 = rng.integers(0, 65536, (S, S)).astype(np.uint16)
  out = media.load_image(Image(data=_encode(g16, "PNG")), CFG, WHERE)
  np.testing.assert_array_equal(out[..., 0], np.round(g16 / 257.0).astype(np.uint8))
  c16 = rng.integers(0, 65536, (S, S, 3)).astype(np.uint16)
  out = media.load_image(Image(data=_png16_rgb(c16)), CFG, WHERE)
  assert np.abs(out.astype(np.float64) - c16 / 257.0).max() <= 1.0

  # EXIF orientation 6 (rotate 90 degrees clockwise to display) is applied.
  exif = PILImage.Exif()
  exif[0x0112] = 6
  out = media.load_image(Image(data=_encode(rgb, "PNG", exif=exif)), CFG, WHERE)
  np.testing.assert_array_equal(out, np.rot90(rgb, k=-1))


def test_encoded_non_square_matches_pixels_path(rng):
  """Decoded images and pixel arrays share one resize."""
  img = rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)
  for policy in ("pad", "crop", "squash"):
    cfg = _cfg(image_resize=policy)
    np.testing.assert_array_equal(media.load_image(Image(data=_encode(img, "PNG")), cfg, WHERE),
                                  media.load_image(Image(pixels=img), cfg, WHERE))


def _old_fit_square(rgb, cfg):
  """`fit_square` as it was before images were resized as decoded (commit 7873505): a Pillow image
  made from the RGB array, resized."""
  s, (h, w) = cfg.image_size, rgb.shape[:2]
  if (h, w) == (s, s):
    return rgb.copy()
  img, bicubic = PILImage.fromarray(np.ascontiguousarray(rgb)), PILImage.Resampling.BICUBIC
  if cfg.image_resize == "squash":
    return np.asarray(img.resize((s, s), bicubic))
  if cfg.image_resize == "crop":
    side = min(h, w)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    return np.asarray(img.resize((s, s), bicubic, box=box))
  scale = s / max(h, w)
  nw, nh = min(s, max(1, round(w * scale))), min(s, max(1, round(h * scale)))
  small = np.asarray(img.resize((nw, nh), bicubic)) if (nw, nh) != (w, h) else rgb
  out = np.zeros((s, s, 3), np.uint8)
  out[(s - nh) // 2:(s - nh) // 2 + nh, (s - nw) // 2:(s - nw) // 2 + nw] = small
  return out


def _old_load_image(data, cfg):
  """`load_image` of encoded data as it was before (commit 7873505): decoded, EXIF-rotated as a copy,
  every mode made a uint8 RGB numpy array by the formulas of the docstring (float64 here), then
  `_old_fit_square`."""
  with PILImage.open(io.BytesIO(data)) as img:
    img.load()
    img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode == "I" or mode.startswith("I;16"):
      grey = np.round(np.clip(np.asarray(img).astype(np.float64), 0, 65535) / 257.0)[..., None]
    elif mode == "F":
      grey = np.round(np.asarray(img).astype(np.float64) * 255.0)[..., None]
    elif mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
      rgba = np.asarray(img.convert("RGBA")).astype(np.float64)
      a = rgba[..., 3:] / 255
      grey = np.round(rgba[..., :3] * a + 255 * (1 - a))
    elif mode == "L":
      grey = np.asarray(img)[..., None]
    else:
      grey = np.asarray(img.convert("RGB"))
  return _old_fit_square(np.broadcast_to(grey, grey.shape[:2] + (3,)).astype(np.uint8), cfg)


def _random_encoded(rng, kind, h, w):
  """Seeded random pixels of one Pillow mode (kind: a `_MODES` name), encoded."""
  u8 = lambda *c: rng.integers(0, 256, (h, w) + c, dtype=np.uint8)
  buf = io.BytesIO()
  if kind == "RGB":
    PILImage.fromarray(u8(3)).save(buf, "PNG")
  elif kind == "RGB-jpeg":
    PILImage.fromarray(u8(3)).save(buf, "JPEG", quality=int(rng.integers(60, 96)))
  elif kind.startswith("RGB-exif"):  # orientation 2..8: flips and rotations
    exif = PILImage.Exif()
    exif[0x0112] = int(kind[-1])
    PILImage.fromarray(u8(3)).save(buf, "JPEG", quality=90, exif=exif)
  elif kind == "RGB-tRNS":  # RGB with one colour transparent
    rgb = u8(3)
    rgb[: h // 2] = rgb[0, 0]
    PILImage.fromarray(rgb).save(buf, "PNG", transparency=tuple(int(c) for c in rgb[0, 0]))
  elif kind == "L":
    PILImage.fromarray(u8()).save(buf, "PNG")
  elif kind == "L-jpeg":
    PILImage.fromarray(u8()).save(buf, "JPEG", quality=90)
  elif kind in ("RGBA", "LA"):
    PILImage.fromarray(u8(len(kind)), mode=kind).save(buf, "PNG")
  elif kind in ("P", "P-transparent", "GIF"):
    pal = PILImage.fromarray(u8(3)).quantize(colors=int(rng.integers(2, 200)))
    extra = {"transparency": int(np.asarray(pal)[0, 0])} if kind != "P" else {}
    pal.save(buf, "GIF" if kind == "GIF" else "PNG", **extra)
  elif kind == "1":
    PILImage.fromarray(rng.random((h, w)) < 0.5).save(buf, "PNG")
  elif kind == "I;16":
    PILImage.fromarray(rng.integers(0, 65536, (h, w)).astype(np.uint16)).save(buf, "PNG")
  elif kind == "I":  # 32-bit: values outside 0..65535 are clipped
    PILImage.fromarray(rng.integers(-70000, 140000, (h, w)).astype(np.int32)).save(buf, "TIFF")
  elif kind == "F":
    PILImage.fromarray(rng.uniform(0, 1, (h, w)).astype(np.float32)).save(buf, "TIFF")
  elif kind == "CMYK":
    PILImage.fromarray(u8(4), mode="CMYK").save(buf, "JPEG" if rng.random() < 0.5 else "TIFF")
  return buf.getvalue()


_MODES = ("RGB", "RGB-jpeg", "RGB-tRNS", "L", "L-jpeg", "RGBA", "LA", "P", "P-transparent", "GIF", "1",
          "I;16", "I", "F", "CMYK") + tuple(f"RGB-exif{k}" for k in range(2, 9))


@pytest.mark.parametrize("policy", ["pad", "crop", "squash"])
def test_decoded_images_equal_the_old_numpy_path(rng, policy):
  """Images are resized as decoded (no numpy round trip; greyscale resized in L): every mode, EXIF
  orientation, odd and square sizes and both directions of resizing give the old pixels bit for bit."""
  cfg = _cfg(image_resize=policy)
  # (h, w): odd, square, one side = S (pad at scale 1), smaller than S (upscaled), tall and wide.
  for h, w in [(37, 53), (53, 37), (S, S), (S, 19), (5, 3), (2 * S + 1, S - 3)]:
    for kind in _MODES:
      data = _random_encoded(rng, kind, h, w)
      out = media.load_image(Image(data=data), cfg, WHERE)
      np.testing.assert_array_equal(out, _old_load_image(data, cfg), err_msg=f"{kind} {h}x{w}")
      assert out.shape == (S, S, 3) and out.dtype == np.uint8


@pytest.mark.parametrize("shape", [(37, 53), (53, 37, 1), (S, 19, 3), (5, 3, 4), (2 * S + 1, S - 3, 3)])
def test_pixel_arrays_equal_the_old_path(rng, shape):
  """The pixels path (and video frames) share the resize: same pixels as before, every policy."""
  pixels = rng.integers(0, 256, shape, dtype=np.uint8)
  rgb = media.pixels_to_rgb(pixels, CFG, WHERE)
  for policy in ("pad", "crop", "squash"):
    cfg = _cfg(image_resize=policy)
    np.testing.assert_array_equal(media.load_image(Image(pixels=pixels), cfg, WHERE),
                                  _old_fit_square(rgb, cfg))


def test_bad_images(rng, tmp_path):
  img = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
  png, jpg = _encode(img, "PNG"), _encode(img, "JPEG")
  for data in (png[:len(png) // 2], jpg[:len(jpg) * 2 // 3], jpg[:400], png[:60]):
    _raises(lambda: media.load_image(Image(data=data), CFG, WHERE), "corrupt or truncated")
  junk = rng.integers(0, 256, 500, dtype=np.uint8).tobytes()
  _raises(lambda: media.load_image(Image(data=junk), CFG, WHERE), "supported format", "PNG", "WebP")
  text = tmp_path / "notes.png"
  text.write_text("not an image at all\n" * 10)
  _raises(lambda: media.load_image(Image(path=str(text)), CFG, WHERE), "supported format")
  ppm = _encode(img, "PPM")  # Pillow reads it, but it is not a format we take
  _raises(lambda: media.load_image(Image(data=ppm), CFG, WHERE), "supported format")
  _raises(lambda: media.load_image(Image(path=str(tmp_path / "missing.png")), CFG, WHERE), "no such")
  _raises(lambda: media.load_image(Image(data=b""), CFG, WHERE), "empty")
  _raises(lambda: media.load_image(Image(data="x.png"), CFG, WHERE), "bytes")

  small = _cfg(max_image_pixels=1000)  # 40 x 40 = 1600 pixels
  for item in (Image(pixels=img), Image(data=png)):
    _raises(lambda: media.load_image(item, small, WHERE), "1,600 pixels",
            "config.model.media.max_image_pixels")
  # The limit is checked from the header, before decoding: a 5000 x 5000 header over a few bytes of data.
  ihdr = struct.pack(">IIBBBBB", 5000, 5000, 8, 2, 0, 0, 0)
  forged = png[:8] + _png_chunk(b"IHDR", ihdr) + png[33:200]
  _raises(lambda: media.load_image(Image(data=forged), _cfg(max_image_pixels=1_000_000), WHERE),
          "25,000,000 pixels", "max_image_pixels")
  # Past Pillow's own decompression-bomb limit.
  bomb = png[:8] + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)) + png[33:]
  _raises(lambda: media.load_image(Image(data=bomb), CFG, WHERE), "max_image_pixels")

  for bad, needle in [(img[..., :2], "shape"), (img[0, 0], "shape"), (img.astype(np.int32), "dtype"),
                      (img / 255.0 * 2, "[0, 1]"), (np.full((4, 4, 3), np.nan), "NaN"),
                      (np.zeros((0, 5, 3), np.uint8), "no pixels")]:
    _raises(lambda: media.load_image(Image(pixels=bad), CFG, WHERE), needle)


# ============================================================================ audio


def _wav_bytes(x, rate, fmt="WAV", subtype=None):
  import soundfile
  buf = io.BytesIO()
  soundfile.write(buf, x, rate, format=fmt, subtype=subtype)
  return buf.getvalue()


def _peak_hz(x, rate):
  spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
  return np.argmax(spec) * rate / len(x)


def test_audio_from_samples(rng):
  x = rng.uniform(-0.5, 0.5, 1234)
  out = media.load_audio(Audio(samples=x, sample_rate=8000), CFG, WHERE)
  assert out.shape == (1234,) and out.dtype == np.float32
  np.testing.assert_allclose(out, x, atol=1e-7)

  st = rng.uniform(-0.5, 0.5, (999, 2))
  np.testing.assert_allclose(media.load_audio(Audio(samples=st, sample_rate=8000), CFG, WHERE),
                             st.mean(1), atol=1e-7)
  pcm = rng.integers(-32768, 32768, 777).astype(np.int16)
  np.testing.assert_allclose(media.load_audio(Audio(samples=pcm, sample_rate=8000), CFG, WHERE),
                             pcm / 32768.0, atol=1e-7)
  a = media.load_audio(Audio(samples=st, sample_rate=22050), CFG, WHERE)
  np.testing.assert_array_equal(a, media.load_audio(Audio(samples=st, sample_rate=22050), CFG, WHERE))


def test_audio_at_model_rate_is_an_exact_copy(rng):
  """Float mono samples at the model rate come back as their float32 values exactly (the mean of one
  channel is the channel), in a new array."""
  x32 = rng.uniform(-1, 1, 1001).astype(np.float32)
  for samples in (x32, x32[:, None], x32.astype(np.float64), rng.uniform(-1, 1, (77, 1))):
    out = media.load_audio(Audio(samples=samples, sample_rate=8000), CFG, WHERE)
    assert out.dtype == np.float32 and out.shape == (len(samples),)
    np.testing.assert_array_equal(out, np.asarray(samples, np.float64)[..., 0 if samples.ndim == 2
                                                                        else slice(None)].astype(np.float32))
    assert not np.shares_memory(out, samples)
  half = rng.uniform(-1, 1, 300).astype(np.float16)
  np.testing.assert_array_equal(media.load_audio(Audio(samples=half, sample_rate=8000), CFG, WHERE),
                                half.astype(np.float32))


@pytest.mark.parametrize("channels", [2, 3, 6, 8])
def test_channel_mean_is_numpys_mean_bit_for_bit(rng, channels):
  """The channel average (stereo's fast path included) equals the float64 numpy mean it replaced, bit
  for bit: float32 / float64, time- and channel-major memory, -0.0 and 0.0 samples; and so does what
  load_audio returns, at the model rate and resampled, from samples and from FLAC."""
  n = 4099
  for dtype in (np.float32, np.float64):
    x = rng.uniform(-1, 1, (n, channels)).astype(dtype)
    x[rng.random(n) < 0.1] = -0.0  # whole rows of -0.0
    x[rng.random((n, channels)) < 0.1] *= 0  # signed zeros mixed with values
    for x_tc in (x, np.asfortranarray(x)):
      want = x_tc.astype(np.float64).mean(axis=1)
      got = audio_lib._channel_mean(x_tc)
      assert got.dtype == np.float64
      np.testing.assert_array_equal(got.view(np.int64), want.view(np.int64))
  for rate in (CFG.sample_rate, 12000):
    ref = x.astype(np.float64).mean(axis=1)
    if rate != CFG.sample_rate:
      ref = signal.resample_poly(ref, 2, 3)
    out = media.load_audio(Audio(samples=x, sample_rate=rate), CFG, WHERE)
    np.testing.assert_array_equal(out.view(np.int32), ref.astype(np.float32).view(np.int32))
  pcm = rng.integers(-32768, 32768, (n, channels)).astype(np.int16)
  ref = signal.resample_poly((pcm / 32768.0).mean(axis=1), 2, 3).astype(np.float32)
  out = media.load_audio(Audio(data=_wav_bytes(pcm, 12000, "FLAC", "PCM_16")), CFG, WHERE)
  np.testing.assert_array_equal(out.view(np.int32), ref.view(np.int32))


def test_audio_resampling_keeps_pitch(rng):
  freq = float(rng.integers(300, 3000))
  t = np.arange(44100) / 44100
  x = 0.5 * np.sin(2 * np.pi * freq * t)
  out = media.load_audio(Audio(samples=x, sample_rate=44100), CFG, WHERE)
  assert out.shape == (8000,) and out.dtype == np.float32 and np.isfinite(out).all()
  assert abs(_peak_hz(out, 8000) - freq) <= 1.0
  assert 0.4 < np.abs(out[100:-100]).max() < 0.6  # pass-band gain ~1

  # Above the new Nyquist (4 kHz) a tone is filtered out, not aliased.
  hi = media.load_audio(Audio(samples=0.5 * np.sin(2 * np.pi * 6000 * t), sample_rate=44100), CFG, WHERE)
  assert np.abs(hi[200:-200]).max() < 0.02


def test_audio_wav_flac(rng, tmp_path):
  pcm = rng.integers(-32768, 32768, (2000, 2)).astype(np.int16)  # int16 is stored as is
  for fmt in ("WAV", "FLAC"):
    data = _wav_bytes(pcm, 8000, fmt, "PCM_16")
    out = media.load_audio(Audio(data=data), CFG, WHERE)
    assert out.shape == (2000,) and out.dtype == np.float32
    np.testing.assert_allclose(out, pcm.mean(1) / 32768.0, atol=1e-7)
  freq = float(rng.integers(300, 3000))
  tone = 0.5 * np.sin(2 * np.pi * freq * np.arange(44100) / 44100)
  path = tmp_path / "tone.flac"
  path.write_bytes(_wav_bytes(np.stack([tone, tone], 1), 44100, "FLAC", "PCM_16"))
  out = media.load_audio(Audio(path=str(path)), CFG, WHERE)
  assert out.shape == (8000,) and abs(_peak_hz(out, 8000) - freq) <= 1.0


def test_bad_audio(rng, tmp_path):
  a = lambda **kw: (lambda: media.load_audio(Audio(**kw), CFG, WHERE))
  _raises(a(samples=np.zeros(0), sample_rate=8000), "0 samples")
  _raises(a(data=_wav_bytes(np.zeros((0, 1)), 8000)), "0 samples")
  x = rng.standard_normal(100)
  x[37] = np.nan
  _raises(a(samples=x, sample_rate=8000), "NaN", "sample 37")
  x[37] = np.inf
  _raises(a(samples=x, sample_rate=16000), "inf")
  junk = rng.integers(0, 256, 4000, dtype=np.uint8).tobytes()
  _raises(a(data=junk), "could not decode", "WAV, FLAC")
  wav = _wav_bytes(rng.uniform(-0.5, 0.5, 800), 8000)
  _raises(a(data=wav[:30]), "could not decode", "truncated")
  text = tmp_path / "x.wav"
  text.write_text("hello\n" * 50)
  _raises(a(path=str(text)), "could not decode", "WAV, FLAC")
  _raises(a(path=str(tmp_path / "missing.wav")), "no such")
  _raises(a(samples=rng.standard_normal((2, 500)), sample_rate=8000), "samples.T")
  _raises(a(samples=rng.integers(0, 255, 50).astype(np.uint8), sample_rate=8000), "dtype")
  _raises(a(samples=rng.standard_normal((3, 3, 3)), sample_rate=8000), "shape")
  _raises(a(samples=x, sample_rate=8000.5), "sample_rate")
  _raises(a(samples=x, sample_rate=-1), "sample_rate")


def test_audio_files_without_libsndfile_are_a_media_error(rng, monkeypatch):
  """A host where soundfile cannot load (no libsndfile) refuses audio files naming the input; audio
  given as samples needs no decoder."""
  monkeypatch.setattr(audio_lib, "soundfile", None)
  monkeypatch.setattr(audio_lib, "_SOUNDFILE_ERROR", OSError("cannot load library 'libsndfile.so'"))
  x = rng.uniform(-0.5, 0.5, 800)
  _raises(lambda: media.load_audio(Audio(data=_wav_bytes(x, 8000)), CFG, WHERE),
          "needs the soundfile package", "libsndfile.so", "Audio(samples=")
  np.testing.assert_array_equal(media.load_audio(Audio(samples=x, sample_rate=8000), CFG, WHERE),
                                x.astype(np.float32))


# ============================================================================ log-mel


def _ref_filterbank(rate, n_fft, n_mels):
  """Triangles on the HTK mel scale, Slaney area normalisation, written out per filter and bin."""
  mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)
  hz = lambda m: 700.0 * (10.0 ** (m / 2595.0) - 1.0)
  top = mel(rate / 2.0)
  f = [hz(top * i / (n_mels + 1)) for i in range(n_mels + 2)]
  fb = np.zeros((n_fft // 2 + 1, n_mels))
  for m in range(1, n_mels + 1):
    for k in range(n_fft // 2 + 1):
      fk = k * rate / n_fft
      if f[m - 1] < fk <= f[m]:
        w = (fk - f[m - 1]) / (f[m] - f[m - 1])
      elif f[m] < fk < f[m + 1]:
        w = (f[m + 1] - fk) / (f[m + 1] - f[m])
      else:
        w = 0.0
      fb[k, m - 1] = w * 2.0 / (f[m + 1] - f[m - 1])
  return fb


def _ref_log_mel(x, cfg):
  n, hop = cfg.n_fft, cfg.hop_length
  num = 1 + len(x) // hop
  win = np.array([0.5 - 0.5 * np.cos(2 * np.pi * i / n) for i in range(n)])
  frames = np.zeros((num, n))
  for f in range(num):
    for i in range(n):
      t = f * hop - n // 2 + i
      if 0 <= t < len(x):
        frames[f, i] = x[t]
  k = np.arange(n // 2 + 1)
  dft = np.exp(-2j * np.pi * np.outer(np.arange(n), k) / n)  # direct DFT sum
  power = np.abs((frames * win) @ dft) ** 2
  mel = power @ _ref_filterbank(cfg.sample_rate, n, cfg.n_mels)
  return (np.log10(mel + 1e-8) + 4.0) / 4.0


@pytest.mark.parametrize("n_fft,hop,rate,n_mels", [(256, 80, 8000, 32), (201, 80, 8000, 24),
                                                   (400, 160, 16000, 64)])
def test_log_mel_matches_reference(rng, n_fft, hop, rate, n_mels):
  cfg = _cfg(n_fft=n_fft, hop_length=hop, sample_rate=rate, n_mels=n_mels)
  np.testing.assert_allclose(media.mel_filterbank(cfg), _ref_filterbank(rate, n_fft, n_mels),
                             rtol=1e-9, atol=1e-15)
  x = rng.uniform(-0.3, 0.3, int(rng.integers(1500, 2600)))
  out = media.log_mel(x.astype(np.float32), cfg)
  assert out.shape == (1 + len(x) // hop, n_mels) and out.dtype == np.float32
  np.testing.assert_allclose(out, _ref_log_mel(x.astype(np.float32).astype(np.float64), cfg),
                             atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("stft_block,gemm_macs", [(7, 3 * 129 * 32), (2048, 1), (5, 10**9)])
def test_log_mel_blocks_match_reference(rng, monkeypatch, stft_block, gemm_macs):
  """The STFT blocks and the filterbank product's row blocks (single-threaded BLAS calls) change no
  frame: every split of the frames against the float64 reference, including ragged last blocks."""
  monkeypatch.setattr(audio_lib, "_STFT_BLOCK", stft_block)
  monkeypatch.setattr(audio_lib, "_GEMM_MAX_MACS", gemm_macs)
  x = rng.uniform(-0.3, 0.3, int(rng.integers(2500, 4000))).astype(np.float32)
  out = media.log_mel(x, CFG)
  assert out.shape == (1 + len(x) // 80, 32) and out.dtype == np.float32 and out.flags.c_contiguous
  np.testing.assert_allclose(out, _ref_log_mel(x.astype(np.float64), CFG), atol=2e-5, rtol=1e-5)
  chunks, valid, cut = media.audio_chunks(x, _cfg(audio_chunk_frames=9, max_audio_chunks=8))
  assert not cut and len(chunks) == -(-out.shape[0] // 9)
  np.testing.assert_allclose(np.concatenate(chunks)[:sum(valid)], out, atol=1e-6)


def test_mel_project_rows_stay_under_the_thread_pool_threshold(rng, monkeypatch):
  """Each BLAS call of the filterbank product has at most _GEMM_MAX_MACS multiply-adds (OpenBLAS
  hands larger ones to its thread pool, whose wake-up costs more than the product), and the blocks
  add up to the plain product."""
  fb = media.mel_filterbank(CFG)
  power = rng.uniform(0, 5, (int(rng.integers(150, 400)), fb.shape[0])) ** 4
  calls = []
  real_matmul = np.matmul

  def spy(a, b, **kw):
    calls.append(a.shape[0] * a.shape[1] * b.shape[1])
    return real_matmul(a, b, **kw)

  monkeypatch.setattr(audio_lib.np, "matmul", spy)
  out = audio_lib._mel_project(power, fb)
  monkeypatch.undo()
  assert len(calls) > 1 and max(calls) <= audio_lib._GEMM_MAX_MACS
  np.testing.assert_allclose(out, power.astype(np.float64) @ fb, rtol=1e-12)


def test_log_mel_shapes_silence_locality_range(rng):
  for t in (1, 79, 80, 81, 255, 8000):
    assert media.log_mel(rng.standard_normal(t) * 0.1, CFG).shape == (1 + t // 80, 32)
  pad = media.log_mel_pad_value(CFG)
  assert pad == -1.0
  assert (media.log_mel(np.zeros(1000), CFG) == np.float32(pad)).all()

  # A frame depends on its own samples only: changing samples from t0 on leaves earlier frames alone.
  x = rng.standard_normal(4000) * 0.1
  y = x.copy()
  t0 = 2000
  y[t0:] = rng.standard_normal(2000)
  fx, fy = media.log_mel(x, CFG), media.log_mel(y, CFG)
  last_clean = (t0 + 128 - 256) // 80  # frames whose window [f*80 - 128, f*80 + 128) ends before t0
  np.testing.assert_allclose(fx[:last_clean + 1], fy[:last_clean + 1], atol=1e-6)
  assert np.abs(fx[last_clean + 2:] - fy[last_clean + 2:]).min(axis=1).max() > 0

  speech = media.log_mel(rng.standard_normal(8000) * 0.1, CFG)  # -20 dBFS noise
  assert -1.0 <= speech.min() and speech.max() <= 1.5
  loud = media.log_mel(np.sin(2 * np.pi * 440 * np.arange(8000) / 8000), CFG)
  assert loud.max() < 2.0 and loud.min() >= -1.0


def test_audio_chunks(rng):
  pad = np.float32(media.log_mel_pad_value(CFG))
  for frames, want_valid, want_trunc in [(250, [100, 100, 50], False), (300, [100, 100, 100], False),
                                         (420, [100, 100, 100], True), (1, [1], False)]:
    t = (frames - 1) * 80 + int(rng.integers(1, 80))  # 1 + t // hop frames; never an empty clip
    x = (rng.standard_normal(t) * 0.1).astype(np.float32)
    chunks, valid, truncated = media.audio_chunks(x, CFG)
    assert valid == want_valid and truncated == want_trunc
    assert all(c.shape == (100, 32) and c.dtype == np.float32 for c in chunks)
    whole = media.log_mel(x, CFG)
    for i, (c, v) in enumerate(zip(chunks, valid)):
      np.testing.assert_allclose(c[:v], whole[i * 100:i * 100 + v], atol=1e-6)
      assert (c[v:] == pad).all()
    got = media.audio_chunks(x, CFG)
    assert all((a == b).all() for a, b in zip(chunks, got[0]))


# ============================================================================ video


def test_video_from_frames(rng):
  frames = rng.integers(0, 256, (8, S, S, 3), dtype=np.uint8)  # 2 s at 4 fps
  clip = media.load_video(Video(frames=frames, fps=4), CFG, WHERE)
  np.testing.assert_allclose(clip.timestamps, [0.0, 0.5, 1.0, 1.5])
  assert clip.frames.dtype == np.uint8 and clip.timestamps.dtype == np.float64
  np.testing.assert_array_equal(clip.frames, frames[[0, 2, 4, 6]])
  assert clip.audio is None

  # Over the budget: 10 s at 4 fps would be 20 frames at 2 fps; 4 spread from the first to the last.
  frames = rng.integers(0, 256, (40, S, S, 3), dtype=np.uint8)
  clip = media.load_video(Video(frames=frames, fps=4), CFG, WHERE)
  np.testing.assert_allclose(clip.timestamps, [0.0, 3.25, 6.5, 9.75])
  np.testing.assert_array_equal(clip.frames, frames[[0, 13, 26, 39]])

  # Ties go to the earlier frame: 0.25 s is as near frame 0 (0 s) as frame 1 (0.5 s).
  frames = rng.integers(0, 256, (2, S, S, 3), dtype=np.uint8)
  clip = media.load_video(Video(frames=frames, fps=2), _cfg(video_fps=4.0, video_max_frames=8), WHERE)
  np.testing.assert_allclose(clip.timestamps, [0.0, 0.25, 0.5, 0.75])
  np.testing.assert_array_equal(clip.frames, frames[[0, 0, 1, 1]])

  # Non-square frames go through the image path.
  frames = rng.integers(0, 256, (3, 24, 40, 3), dtype=np.uint8)
  clip = media.load_video(Video(frames=frames, fps=1.5), _cfg(image_resize="crop", video_fps=1.5), WHERE)
  assert clip.frames.shape == (3, S, S, 3)
  for i in range(3):
    np.testing.assert_array_equal(
        clip.frames[i], media.load_image(Image(pixels=frames[i]), _cfg(image_resize="crop"), WHERE))


@pytest.mark.parametrize("trial", range(3))
def test_video_sampling_reference(rng, trial):
  del trial
  fps, vfps = float(rng.uniform(3, 30)), float(rng.uniform(0.5, 4))
  num, budget = int(rng.integers(1, 80)), int(rng.integers(1, 10))
  cfg = _cfg(video_fps=vfps, video_max_frames=budget)
  frames = np.broadcast_to(np.arange(num, dtype=np.uint8)[:, None, None, None] + 1, (num, S, S, 3))
  clip = media.load_video(Video(frames=frames, fps=fps), cfg, WHERE)
  src = np.arange(num) / fps
  ts = [k / vfps for k in range(10_000) if k / vfps < num / fps]
  if len(ts) > budget:
    ts = [src[-1] * i / (budget - 1) for i in range(budget)] if budget > 1 else [0.0]
  np.testing.assert_allclose(clip.timestamps, ts, atol=1e-9)
  want = [int(np.argmin(np.abs(src - t))) for t in ts]  # nearest, earliest on a tie
  np.testing.assert_array_equal(clip.frames[:, 0, 0, 0].astype(int) - 1, want)


def test_video_audio_track(rng):
  frames = rng.integers(0, 256, (4, S, S, 3), dtype=np.uint8)
  track = Audio(samples=rng.uniform(-0.5, 0.5, (3000, 2)), sample_rate=16000)
  clip = media.load_video(Video(frames=frames, fps=2, audio=track), CFG, WHERE)
  np.testing.assert_array_equal(clip.audio, media.load_audio(track, CFG, WHERE))
  assert clip.audio.dtype == np.float32 and clip.audio.shape == (1500,)
  bad = Audio(samples=np.full(100, np.nan), sample_rate=8000)
  _raises(lambda: media.load_video(Video(frames=frames, fps=2, audio=bad), CFG, WHERE),
          "audio track", "NaN")


def _colour(i):
  return np.array([(40 + 20 * i) % 256, 255 - 20 * i % 256, 128], np.uint8)


def _encode_video(codec, fmt, num=25, rate=10, tone_hz=440.0, audio=True):
  import av
  buf = io.BytesIO()
  with av.open(buf, mode="w", format=fmt) as c:
    vs = c.add_stream(codec, rate=rate)
    vs.width, vs.height, vs.pix_fmt = 48, 32, "yuv420p"
    vs.bit_rate = 2_000_000
    if audio:
      acodec = "aac" if fmt == "mp4" else "libopus"
      arate = 8000 if acodec == "aac" else 48000
      ast = c.add_stream(acodec, rate=arate)
      ast.layout = "stereo"
    for i in range(num):
      img = np.broadcast_to(_colour(i), (32, 48, 3)).copy()
      for p in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
        c.mux(p)
    for p in vs.encode():
      c.mux(p)
    if audio:
      n = int(arate * num / rate)
      sig = 0.3 * np.sin(2 * np.pi * tone_hz * np.arange(n) / arate)
      sig = np.stack([sig, sig]).astype(np.float32)
      step = ast.codec_context.frame_size or 1024
      for k in range(0, n, step):
        fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(sig[:, k:k + step]), format="fltp",
                                        layout="stereo")
        fr.sample_rate, fr.pts = arate, k
        for p in ast.encode(fr):
          c.mux(p)
      for p in ast.encode():
        c.mux(p)
  return buf.getvalue()


def _codec_ok(name):
  try:
    import av
    av.codec.Codec(name, "w")
    return True
  except Exception:  # pylint: disable=broad-except
    return False


@pytest.mark.parametrize("codec,fmt", [("mpeg4", "mp4"), ("libvpx", "webm")])
def test_video_file(codec, fmt, tmp_path):
  pytest.importorskip("av")
  if not _codec_ok(codec):
    pytest.skip(f"{codec} encoder not available")
  data = _encode_video(codec, fmt)  # 25 frames at 10 fps: 2.5 s -> 5 at 2 fps > 4 -> spread
  clip = media.load_video(Video(data=data), CFG, WHERE)
  assert clip.frames.shape == (4, S, S, 3) and clip.frames.dtype == np.uint8
  np.testing.assert_allclose(clip.timestamps, [0.0, 0.8, 1.6, 2.4], atol=1e-6)
  # Which frames: each source frame has its own colour; "pad" keeps the 48 x 32 frame's black borders.
  for got, i in zip(clip.frames, [0, 8, 16, 24]):
    assert (got[:5] == 0).all() and (got[-5:] == 0).all()
    assert np.abs(got[12:20, 4:28].astype(int) - _colour(i)).mean() < 6, i
  assert clip.audio is not None and clip.audio.dtype == np.float32
  assert 2.3 * 8000 < clip.audio.shape[0] < 2.8 * 8000
  assert abs(_peak_hz(clip.audio, 8000) - 440) < 5
  clip2 = media.load_video(Video(data=data), CFG, WHERE)
  np.testing.assert_array_equal(clip.frames, clip2.frames)
  np.testing.assert_array_equal(clip.audio, clip2.audio)

  path = tmp_path / f"v.{fmt}"
  path.write_bytes(data)
  clip3 = media.load_video(Video(path=str(path)), CFG, WHERE)
  np.testing.assert_array_equal(clip.frames, clip3.frames)

  # Short and silent: 3 frames at 10 fps -> 1 frame at 2 fps, no audio stream.
  clip = media.load_video(Video(data=_encode_video(codec, fmt, num=3, audio=False)), CFG, WHERE)
  assert clip.frames.shape == (1, S, S, 3) and clip.audio is None
  np.testing.assert_allclose(clip.timestamps, [0.0])


def _old_video_file(data, cfg):
  """`load_video` of an encoded file as before (commit 7873505), three opens: the frame times (demux
  only), every frame decoded, the audio decoded; frames as `_old_fit_square`, channels averaged with
  numpy in float64 and resampled as `load_audio`."""
  import av
  with av.open(io.BytesIO(data)) as c:
    stream = c.streams.video[0]
    time_base, fps = float(stream.time_base), float(stream.average_rate)
    pts = [p.pts for p in c.demux(stream) if p.size]
  src = np.sort(np.asarray(pts, np.float64)) * time_base
  ts, idx = media.sample_times(src - src[0], float(src[-1] - src[0]) + 1.0 / fps, cfg)
  with av.open(io.BytesIO(data)) as c:
    rgb = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
  frames = np.stack([_old_fit_square(rgb[i], cfg) for i in idx])
  with av.open(io.BytesIO(data)) as c:
    resampler, parts, rate = av.AudioResampler(format="fltp"), [], None
    for frame in c.decode(audio=0):
      rate = rate or frame.sample_rate
      parts += [f.to_ndarray() for f in resampler.resample(frame)]
    parts += [f.to_ndarray() for f in resampler.resample(None)]
  mono = np.concatenate(parts, axis=1).T.astype(np.float64).mean(axis=1)
  if rate != cfg.sample_rate:
    g = math.gcd(rate, cfg.sample_rate)
    mono = signal.resample_poly(mono, cfg.sample_rate // g, rate // g)
  return frames, ts, mono.astype(np.float32)


@pytest.mark.parametrize("codec,fmt", [("libx264", "mp4"), ("libvpx", "webm")])
def test_video_file_one_open_equals_three(codec, fmt, monkeypatch):
  """A video file is opened once (its packets held between the demux pass and the decoding) or, past
  _HOLD_PACKET_BYTES, twice, and gives what three opens gave, bit for bit: frames (H.264 with B-frames:
  the last ones come out of the decoder's flush), timestamps, the audio track (AAC 8 kHz at the model
  rate; Opus 48 kHz, resampled)."""
  av = pytest.importorskip("av")
  if not _codec_ok(codec):
    pytest.skip(f"{codec} encoder not available")
  data = _encode_video(codec, fmt, num=23)
  want_frames, want_ts, want_audio = _old_video_file(data, CFG)
  opens = []
  real_open = av.open
  monkeypatch.setattr(av, "open", lambda *a, **kw: opens.append(1) or real_open(*a, **kw))
  for hold, n_opens in ((video_lib._HOLD_PACKET_BYTES, 1), (100, 2)):
    monkeypatch.setattr(video_lib, "_HOLD_PACKET_BYTES", hold)
    opens.clear()
    clip = media.load_video(Video(data=data), CFG, WHERE)
    assert len(opens) == n_opens
    np.testing.assert_array_equal(clip.frames, want_frames)
    np.testing.assert_array_equal(clip.timestamps, want_ts)
    np.testing.assert_array_equal(clip.audio.view(np.int32), want_audio.view(np.int32))


def test_bad_video(rng, tmp_path, monkeypatch):
  v = lambda **kw: (lambda: media.load_video(Video(**kw), CFG, WHERE))
  _raises(v(frames=np.zeros((0, 8, 8, 3), np.uint8), fps=2), "no frames")
  _raises(v(frames=rng.integers(0, 256, (4, 8, 8, 2), dtype=np.uint8), fps=2), "shape")
  _raises(v(frames=rng.integers(0, 256, (8, 8), dtype=np.uint8), fps=2), "shape")
  _raises(v(frames=rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8), fps=-1), "fps")
  big = lambda: media.load_video(Video(frames=rng.integers(0, 256, (2, 40, 40, 3), dtype=np.uint8), fps=2),
                                 _cfg(max_image_pixels=1000), WHERE)
  _raises(big, "max_image_pixels")
  pytest.importorskip("av")
  junk = rng.integers(0, 256, 3000, dtype=np.uint8).tobytes()
  _raises(v(data=junk), "could not decode the video")
  data = _encode_video("mpeg4", "mp4")
  _raises(v(data=data[:len(data) // 2]), "corrupt, truncated")
  _raises(v(data=_wav_bytes(rng.uniform(-0.5, 0.5, 800), 8000)), "no video stream")
  _raises(v(path=str(tmp_path / "missing.mp4")), "no such")
  monkeypatch.setitem(sys.modules, "av", None)  # as if PyAV were not installed
  _raises(v(data=data), "pip install 'embed2[video]'")
