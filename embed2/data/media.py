"""Host-side media preprocessing (numpy, no jax): decode, resize, resample, log-mel, sample video.

Every media item (`embed2.data.segments`) becomes fixed-shape numpy arrays here, before batching:

  load_image(Image, cfg, where)  -> uint8 (S, S, 3), S = cfg.image_size
  load_audio(Audio, cfg, where)  -> float32 (T,) mono at cfg.sample_rate
  audio_chunks(wave_t, cfg)      -> log-mel chunks float32 (cfg.audio_chunk_frames, cfg.n_mels) each
  load_video(Video, cfg, where)  -> VideoClip(frames uint8 (T, S, S, 3), timestamps (T,) s, audio)

Pixels stay uint8 until the device (the frontends compute x / 127.5 - 1 there,
`embed2.model.frontends.normalize_pixels`), which keeps host batches four times smaller. Bad input raises `MediaError` (a ValueError) whose message
starts with `where` (e.g. "inputs[3]" or "task 'shapes' example 17 query") and says the fix; training
pipelines catch it to skip and count the record, `Embedder` lets it through.

Decoders: Pillow for images (always installed), `soundfile` (libsndfile) for audio bytes and files,
`scipy.signal.resample_poly` for resampling, PyAV for video files (optional: `pip install
'embed2[video]'`; video given as arrays needs nothing extra). The optional ones are imported on first use.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import os
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image as PILImage
from PIL import ImageOps

from embed2.data import segments

if TYPE_CHECKING:
  from embed2.model.presets import ModelConfig

# Pillow format ids decoded; anything else is refused before decoding (smaller attack surface, clear
# errors). Animated GIF / WebP: the first frame.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
AUDIO_FORMATS = "WAV, FLAC, OGG/Vorbis, MP3, AIFF (what libsndfile reads)"
# Channels accepted in an (T, C) sample array; more means the array is most likely channel-major.
_MAX_AUDIO_CHANNELS = 16
# log-mel compression: feature = (log10(mel + _MEL_EPS) + _LOG_SHIFT) / _LOG_SCALE (see `log_mel`).
_MEL_EPS = 1e-8
_LOG_SHIFT = 4.0
_LOG_SCALE = 4.0
# Frames per block in the STFT: bounds the float64 scratch of long clips to ~ block * n_fft * 16 bytes.
_STFT_BLOCK = 2048
# Multiply-adds per BLAS call of the filterbank product. OpenBLAS hands a gemm to its thread pool above
# 4 * 65536 of them (m * n * k); waking the pool for a 150-frame clip costs ~0.2-0.5 ms (10x the product
# itself) on a 2-core host shared with other work, so `_mel_project` stays below that in row blocks.
_GEMM_MAX_MACS = 4 * 65536


# The one error class for unusable media (defined with the items, so the pipeline can catch it without
# importing the decoders): the message names the input (`where`) and the fix.
MediaError = segments.MediaError


def _error(where: str, problem: str, fix: str) -> MediaError:
  return MediaError(f"{where}: {problem}; {fix}")


def _check_file(path, where: str, what: str) -> str:
  try:
    path = os.fspath(path)
  except TypeError:
    raise _error(where, f"{what} path has type {type(path).__name__}", "give a str or os.PathLike path")
  if not os.path.isfile(path):
    raise _error(where, f"no such {what} file {path!r}", "check the path (relative paths are resolved "
                 f"against the working directory {os.getcwd()!r})")
  return path


def _check_bytes(data, where: str, what: str) -> bytes:
  if not isinstance(data, (bytes, bytearray, memoryview)):
    raise _error(where, f"{what} data has type {type(data).__name__}", "give the encoded file as bytes "
                 "(e.g. open(path, 'rb').read()) or use path=")
  data = bytes(data)
  if not data:
    raise _error(where, f"{what} data is empty (0 bytes)", "give the encoded file's bytes")
  return data


# ============================================================================ images


def _check_pixel_count(h: int, w: int, cfg: ModelConfig, where: str) -> None:
  if h * w > cfg.max_image_pixels:
    raise _error(where, f"image is {w}x{h} = {h * w:,} pixels, more than config.model.max_image_pixels="
                 f"{cfg.max_image_pixels:,}", "downscale it before embedding, or raise "
                 "config.model.max_image_pixels")


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
    raise _error(where, f"{what} contain NaN or inf", "give finite float pixels in [0, 1] or uint8 pixels")
  lo, hi = float(a.min()), float(a.max())
  if lo < 0 or hi > 1:
    raise _error(where, f"float {what} span [{lo:g}, {hi:g}], outside [0, 1]", "scale float pixels to "
                 "[0, 1] (x / 255 for 0..255 values) or give uint8 pixels")
  return np.round(a.astype(np.float64) * 255.0).astype(np.uint8)


def pixels_to_rgb(pixels, cfg: ModelConfig, where: str, what: str = "image pixels") -> np.ndarray:
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
    raise _error(where, f"{what} have shape {tuple(np.shape(pixels))}", "give (H, W), (H, W, 1), (H, W, 3) "
                 "RGB or (H, W, 4) RGBA")
  h, w = a.shape[:2]
  if h == 0 or w == 0:
    raise _error(where, f"{what} have shape {tuple(a.shape)}, an image with no pixels", "give a non-empty "
                 "image")
  _check_pixel_count(h, w, cfg, where)
  if np.issubdtype(a.dtype, np.floating):
    a = _float_to_uint8(a, where, what)
  elif a.dtype != np.uint8:
    raise _error(where, f"{what} have dtype {a.dtype}", "give uint8 (0..255) or float in [0, 1]")
  return _to_rgb(a)


def _pil_to_rgb(img: PILImage.Image, where: str) -> np.ndarray:
  """A loaded Pillow image of any mode -> uint8 (H, W, 3)."""
  mode = img.mode
  if mode == "I" or mode.startswith("I;16"):
    # 16-bit greyscale (PNG / TIFF): 0..65535 -> 0..255. Pillow's own I -> L conversion clips instead.
    a = np.asarray(img).astype(np.float64)
    return _to_rgb(np.round(np.clip(a, 0, 65535) / 257.0).astype(np.uint8)[..., None])
  if mode == "F":
    return _to_rgb(_float_to_uint8(np.asarray(img)[..., None], where, "float image pixels"))
  if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
    return _over_white(np.asarray(img.convert("RGBA")))
  if mode == "L":
    return _to_rgb(np.asarray(img)[..., None])
  return np.asarray(img.convert("RGB"))


def _decode_image(item: segments.Image, cfg: ModelConfig, where: str) -> np.ndarray:
  if item.data is not None:
    src = io.BytesIO(_check_bytes(item.data, where, "image"))
  else:
    src = _check_file(item.path, where, "image")
  formats = ", ".join("WebP" if f == "WEBP" else f for f in IMAGE_FORMATS)
  try:
    img = PILImage.open(src, formats=IMAGE_FORMATS)  # reads the header only
  except PILImage.DecompressionBombError as e:
    raise _error(where, f"image is larger than Pillow's decompression-bomb limit ({e})", "downscale it "
                 "before embedding; config.model.max_image_pixels cannot exceed that limit") from e
  except PILImage.UnidentifiedImageError as e:
    raise _error(where, "the data is not an image in a supported format", f"supported formats: {formats}; "
                 "convert it, or decode it yourself and give Image(pixels=...)") from e
  except OSError as e:  # e.g. data cut inside the header
    raise _error(where, f"the image data is corrupt or truncated, or unreadable ({type(e).__name__}: {e})",
                 "re-encode or replace the file") from e
  with img:
    w, h = img.size
    _check_pixel_count(h, w, cfg, where)  # before any pixel is decoded
    try:
      img.load()  # a full decode now, so corrupt or truncated data fails here and not half-way later
      img = ImageOps.exif_transpose(img)  # camera JPEGs store rotation in EXIF
      return _pil_to_rgb(img, where)
    except MediaError:
      raise
    except Exception as e:  # decoders raise OSError, SyntaxError, zlib.error, struct.error, ...
      raise _error(where, f"the {img.format} image data is corrupt or truncated ({type(e).__name__}: {e})",
                   "re-encode or replace the file") from e


def fit_square(rgb_hw3: np.ndarray, cfg: ModelConfig) -> np.ndarray:
  """uint8 (H, W, 3) -> uint8 (S, S, 3), S = cfg.image_size, by cfg.image_resize.

  "pad": keep the aspect ratio, fit inside S x S, centre it on black (0); "crop": scale the shorter side
  to S and cut the centre square; "squash": stretch to S x S. Resampling is Pillow's antialiased BICUBIC
  (deterministic, integer arithmetic). An S x S input is returned unchanged (as a copy).
  """
  s = cfg.image_size
  h, w = rgb_hw3.shape[:2]
  if (h, w) == (s, s):
    return np.array(rgb_hw3, np.uint8)
  img = PILImage.fromarray(np.ascontiguousarray(rgb_hw3, np.uint8))
  bicubic = PILImage.Resampling.BICUBIC
  if cfg.image_resize == "squash":
    return np.asarray(img.resize((s, s), bicubic))
  if cfg.image_resize == "crop":
    side = min(h, w)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)  # sub-pixel centred square
    return np.asarray(img.resize((s, s), bicubic, box=box))
  if cfg.image_resize == "pad":
    scale = s / max(h, w)
    nw, nh = min(s, max(1, round(w * scale))), min(s, max(1, round(h * scale)))
    small = np.asarray(img.resize((nw, nh), bicubic)) if (nw, nh) != (w, h) else rgb_hw3
    out = np.zeros((s, s, 3), np.uint8)
    top, left = (s - nh) // 2, (s - nw) // 2
    out[top:top + nh, left:left + nw] = small
    return out
  raise ValueError(f"config.model.image_resize={cfg.image_resize!r}; use 'pad', 'crop' or 'squash'")


def load_image(item: segments.Image, cfg: ModelConfig, where: str) -> np.ndarray:
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
    rgb = pixels_to_rgb(item.pixels, cfg, where)
  else:
    rgb = _decode_image(item, cfg, where)
  return fit_square(rgb, cfg)


# ============================================================================ audio


def _sample_rate(rate, where: str) -> int:
  try:
    r = float(rate)
  except (TypeError, ValueError):
    r = float("nan")
  if not (math.isfinite(r) and r > 0 and r == round(r)):
    raise _error(where, f"sample_rate={rate!r}", "give the samples' rate in Hz as a positive integer")
  return int(round(r))


def _samples_to_tc(samples, where: str) -> np.ndarray:
  """A sample array (T,) or (T, C) -> float32 or float64 (T, C) (float32 stays float32: widening it
  changes no value); int16 / int32 PCM scaled to [-1, 1) in float64."""
  a = np.asarray(samples)
  if a.ndim == 1:
    a = a[:, None]
  if a.ndim != 2 or a.shape[1] == 0:
    raise _error(where, f"audio samples have shape {tuple(np.shape(samples))}", "give (T,) mono or (T, C) "
                 "time-major samples")
  if a.shape[1] > _MAX_AUDIO_CHANNELS:
    raise _error(where, f"audio samples have shape {a.shape}: {a.shape[1]} channels", "samples are (T, C) "
                 "time-major; pass samples.T if yours are (C, T)")
  if a.dtype in (np.float32, np.float64):
    return a
  if np.issubdtype(a.dtype, np.floating):
    return a.astype(np.float64)
  if a.dtype == np.int16:
    return a.astype(np.float64) / 32768.0
  if a.dtype == np.int32:
    return a.astype(np.float64) / 2147483648.0
  raise _error(where, f"audio samples have dtype {a.dtype}", "give float samples (nominally in [-1, 1]) "
               "or int16 / int32 PCM")


def _decode_audio(item: segments.Audio, where: str) -> tuple[np.ndarray, int]:
  """Encoded audio -> (float64 (T, C), sample rate)."""
  try:
    import soundfile  # pylint: disable=g-import-not-at-top
  except (ImportError, OSError) as e:
    raise _error(where, f"decoding audio files needs the soundfile package ({e})", "pip install soundfile, "
                 "or decode it yourself and give Audio(samples=..., sample_rate=...)") from e
  if item.data is not None:
    src = io.BytesIO(_check_bytes(item.data, where, "audio"))
  else:
    src = _check_file(item.path, where, "audio")
  try:
    x_tc, rate = soundfile.read(src, dtype="float64", always_2d=True)
  except Exception as e:  # LibsndfileError (a RuntimeError) for bad data; others for odd headers
    msg = (getattr(e, "error_string", None) or str(e)).rstrip(".")
    raise _error(where, f"could not decode the audio: corrupt, truncated or unsupported ({msg})",
                 f"supported formats: {AUDIO_FORMATS}; convert it, or decode it yourself and give "
                 "Audio(samples=..., sample_rate=...)") from e
  return x_tc, int(rate)


def _to_model_rate(x_tc: np.ndarray, rate: int, cfg: ModelConfig, where: str) -> np.ndarray:
  """float32 / float64 (T, C) at `rate` -> float32 (T',) mono at cfg.sample_rate (channels averaged in
  float64), a new array."""
  if x_tc.shape[0] == 0:
    raise _error(where, "audio has 0 samples", "give at least one sample (audio shorter than an STFT window "
                 "is fine)")
  bad = ~np.isfinite(x_tc)
  if bad.any():
    t = int(np.argmax(bad.any(axis=1)))
    raise _error(where, f"audio has {int(bad.sum())} NaN or inf values (first at sample {t})", "fix or drop "
                 "the clip; samples must be finite")
  # One channel is its own mean (exactly): no float64 copy, and float32 mono at the model rate (the
  # generated tasks' audio) goes straight to the float32 result.
  mono_t = x_tc[:, 0] if x_tc.shape[1] == 1 else x_tc.astype(np.float64).mean(axis=1)
  if rate != cfg.sample_rate:
    from scipy import signal  # pylint: disable=g-import-not-at-top  (slow import; audio only)
    g = math.gcd(cfg.sample_rate, rate)
    mono_t = signal.resample_poly(mono_t.astype(np.float64), cfg.sample_rate // g, rate // g)
  out_t = mono_t.astype(np.float32)  # a copy: the caller's samples are never aliased
  if not np.all(np.isfinite(out_t)):
    raise _error(where, "audio samples overflow float32", "give samples nominally in [-1, 1]")
  return out_t


def load_audio(item: segments.Audio, cfg: ModelConfig, where: str) -> np.ndarray:
  """An audio item -> float32 (T,) mono waveform at cfg.sample_rate Hz.

  Sources: `samples` (T,) or (T, C) float (nominally [-1, 1]) or int16 / int32 PCM at `sample_rate`, or
  encoded `data` / a `path` decoded with soundfile (WAV, FLAC, OGG, ... at any rate). Channels are
  averaged; the rate is changed with scipy.signal.resample_poly (polyphase, Kaiser-windowed low-pass,
  up / down = the rates over their gcd).

  Raises:
    MediaError: 0 samples, NaN or inf samples, undecodable or unsupported data, a missing file, a bad
      sample array or rate.
  """
  if item.samples is not None:
    x_tc, rate = _samples_to_tc(item.samples, where), _sample_rate(item.sample_rate, where)
  else:
    x_tc, rate = _decode_audio(item, where)
  return _to_model_rate(x_tc, rate, cfg, where)


def hann_window(n: int) -> np.ndarray:
  """Periodic Hann window, float64 (n,): 0.5 - 0.5 cos(2 pi k / n) (the STFT convention)."""
  return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)


@functools.lru_cache(maxsize=16)
def _window(n: int) -> np.ndarray:
  w = hann_window(n)
  w.setflags(write=False)
  return w


def hz_to_mel(f_hz):
  """HTK mel scale: 2595 log10(1 + f / 700)."""
  return 2595.0 * np.log10(1.0 + np.asarray(f_hz, np.float64) / 700.0)


def mel_to_hz(m):
  return 700.0 * (10.0 ** (np.asarray(m, np.float64) / 2595.0) - 1.0)


@functools.lru_cache(maxsize=16)
def _filterbank(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
  bins_k = np.arange(n_fft // 2 + 1) * sample_rate / n_fft
  edges = mel_to_hz(np.linspace(0.0, hz_to_mel(sample_rate / 2), n_mels + 2))
  lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # (M, 1)
  rise = (bins_k[None] - lo) / (mid - lo)
  fall = (hi - bins_k[None]) / (hi - mid)
  tri_mk = np.maximum(0.0, np.minimum(rise, fall)) * (2.0 / (hi - lo))
  fb = np.ascontiguousarray(tri_mk.T)
  fb.setflags(write=False)
  return fb


def mel_filterbank(cfg: ModelConfig) -> np.ndarray:
  """Mel filterbank, float64 (n_fft // 2 + 1, n_mels), read-only.

  Filter m (m = 1..M) is a triangle over FFT bin frequency f_k = k * sample_rate / n_fft:
  max(0, min((f - f[m-1]) / (f[m] - f[m-1]), (f[m+1] - f) / (f[m+1] - f[m]))) * 2 / (f[m+1] - f[m-1]),
  where f[0..M+1] are M + 2 points equally spaced on the HTK mel scale from 0 Hz to sample_rate / 2. The
  2 / width factor is Slaney's area normalisation: a flat spectrum gives every band the same energy.
  """
  return _filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels)


def _compress(mel: np.ndarray) -> np.ndarray:
  return ((np.log10(mel + _MEL_EPS) + _LOG_SHIFT) / _LOG_SCALE).astype(np.float32)


def _compress_into(mel: np.ndarray, out: np.ndarray) -> None:
  """`_compress(mel)` written to `out` (float32, mel's shape); mel (float64) is overwritten."""
  np.add(mel, _MEL_EPS, out=mel)
  np.log10(mel, out=mel)
  mel += _LOG_SHIFT
  mel /= _LOG_SCALE
  out[...] = mel


def _mel_project(power_fk: np.ndarray, fb_km: np.ndarray) -> np.ndarray:
  """power float64 (F, K) @ filterbank (K, M) -> float64 (F, M), in row blocks that each stay on the
  calling thread (see `_GEMM_MAX_MACS`)."""
  f, (k, m) = power_fk.shape[0], fb_km.shape
  rows = max(1, _GEMM_MAX_MACS // (k * m))
  if f <= rows:
    return power_fk @ fb_km
  out_fm = np.empty((f, m))
  for start in range(0, f, rows):
    np.matmul(power_fk[start:start + rows], fb_km, out=out_fm[start:start + rows])
  return out_fm


def _log_mel_into(x_t: np.ndarray, cfg: ModelConfig, out_fm: np.ndarray) -> None:
  """`log_mel(x_t)[:len(out_fm)]` of a non-empty float64 (T,) waveform, written to float32
  out_fm[:min(F, len(out_fm))] (F = 1 + T // hop); rows beyond F are left alone."""
  n_fft, hop = cfg.n_fft, cfg.hop_length
  num_frames = min(1 + x_t.size // hop, out_fm.shape[0])
  left = n_fft // 2
  # Zero-padded clip, only as long as the frames reach: [left zeros | the clip | zeros].
  padded = np.zeros((num_frames - 1) * hop + n_fft)
  take = min(x_t.size, padded.size - left)
  padded[left:left + take] = x_t[:take]
  # Frame f = padded[f * hop : f * hop + n_fft], a strided view (the ndarray constructor: as_strided's
  # Python wrapper costs more than the rest of the framing).
  step = padded.itemsize
  frames_fn = np.ndarray((num_frames, n_fft), np.float64, padded, 0, (hop * step, step))
  window = _window(n_fft)
  fb = mel_filterbank(cfg)
  for start in range(0, num_frames, _STFT_BLOCK):
    stop = min(start + _STFT_BLOCK, num_frames)
    spec = np.fft.rfft(frames_fn[start:stop] * window, axis=-1)
    power = np.square(spec.real)
    power += np.square(spec.imag)
    _compress_into(_mel_project(power, fb), out_fm[start:stop])


def log_mel(wave_t: np.ndarray, cfg: ModelConfig) -> np.ndarray:
  """Log-mel features of a waveform: float (T,) at cfg.sample_rate -> float32 (F, cfg.n_mels).

  STFT: frame f covers samples [f * hop - n_fft // 2, f * hop - n_fft // 2 + n_fft) (centred frames,
  zero outside the clip: zeros rather than reflection so a frame never depends on samples it does not
  cover and short clips need no special case), F = 1 + T // hop; each frame times a periodic Hann window,
  power |rfft|^2 (unnormalised, as Whisper / librosa), then `mel_filterbank`, then the fixed compression
  (log10(mel + 1e-8) + 4) / 4: silence is exactly -1 (`log_mel_pad_value`), -20 dBFS noise ~0.3..0.7 and a
  full-scale tone ~1.5 at the demo sizes. Whisper uses the same affine, but clamps per clip; there is no
  per-clip statistic here, so a frame's features depend only on its own samples and chunking a clip
  never changes a frame. Computed in float64 on the calling thread (no BLAS thread pool).
  """
  x_t = np.asarray(wave_t, np.float64)
  if x_t.ndim != 1 or x_t.size == 0:
    raise ValueError(f"log_mel needs a non-empty (T,) waveform, got shape {x_t.shape}")
  out = np.empty((1 + x_t.size // cfg.hop_length, cfg.n_mels), np.float32)
  _log_mel_into(x_t, cfg, out)
  return out


_SILENCE = float(_compress(np.zeros(1))[0])


def log_mel_pad_value(cfg: ModelConfig) -> float:
  """The feature value of a silent frame (every band); audio chunks are padded with it."""
  del cfg  # the compression is fixed; the argument keeps call sites stable if it ever depends on cfg
  return _SILENCE


def audio_chunks(wave_t: np.ndarray, cfg: ModelConfig) -> tuple[list[np.ndarray], list[int], bool]:
  """A waveform -> its log-mel features cut into chunks the audio frontend reads one at a time.

  Args:
    wave_t: float (T,) mono at cfg.sample_rate (from `load_audio`), T >= 1.
    cfg: the model config.

  Returns:
    chunks: float32 (cfg.audio_chunk_frames, n_mels) each, at most cfg.max_audio_chunks; the last one
      padded with `log_mel_pad_value`. Frame f of chunk c equals frame c * audio_chunk_frames + f of
      `log_mel(wave_t)`.
    valid: the number of real (unpadded) frames of each chunk.
    truncated: True when the clip had frames beyond cfg.max_audio_chunks chunks (they are dropped).
  """
  wave_t = np.asarray(wave_t)
  c = cfg.audio_chunk_frames
  budget = c * cfg.max_audio_chunks
  truncated = 1 + wave_t.shape[0] // cfg.hop_length > budget
  if truncated:
    # Samples the first `budget` frames cover; later samples would only be thrown away.
    wave_t = wave_t[:(budget - 1) * cfg.hop_length + cfg.n_fft - cfg.n_fft // 2]
  x_t = np.asarray(wave_t, np.float64)
  if x_t.ndim != 1 or x_t.size == 0:
    raise ValueError(f"log_mel needs a non-empty (T,) waveform, got shape {x_t.shape}")
  num_frames = min(1 + x_t.size // cfg.hop_length, budget)
  num_chunks = -(-num_frames // c)
  # All chunks in one buffer, pre-filled with the pad value: the features land in place and each chunk
  # is a contiguous (c, n_mels) view of it (no per-chunk concatenate / copy).
  feats_fm = np.full((num_chunks * c, cfg.n_mels), log_mel_pad_value(cfg), np.float32)
  _log_mel_into(x_t, cfg, feats_fm)
  chunks = [feats_fm[i * c:(i + 1) * c] for i in range(num_chunks)]
  valid = [min(c, num_frames - i * c) for i in range(num_chunks)]
  return chunks, valid, truncated


# ============================================================================ video


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class VideoClip:
  """A sampled video: what the model reads of it.

  Attributes:
    frames: uint8 (T, S, S, 3), each frame as `load_image` makes it.
    timestamps: float64 (T,) seconds from the clip's first frame: the sampling times (k / video_fps, or
      evenly spread over the clip when over the frame budget); each frame is the source frame nearest.
    audio: float32 (T_a,) mono at cfg.sample_rate, or None when the video has no audio.
  """
  frames: np.ndarray
  timestamps: np.ndarray
  audio: np.ndarray | None = None


def sample_times(src_times: np.ndarray, duration: float, cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
  """Which source frames a video keeps.

  Args:
    src_times: float64 (N,) ascending presentation times of the source frames, seconds, the first at 0.
    duration: the clip's length in seconds (last frame's time + its display time).
    cfg: video_fps and video_max_frames.

  Returns:
    timestamps float64 (T,): k / video_fps for every k with k / video_fps < duration; when that is more
    than video_max_frames, video_max_frames times spread evenly from the first to the last source frame.
    index int64 (T,): the source frame nearest each timestamp (the earlier one on a tie).
  """
  n = max(1, math.ceil(duration * cfg.video_fps - 1e-9))
  if n <= cfg.video_max_frames:
    ts = np.arange(n, dtype=np.float64) / cfg.video_fps
  else:
    ts = np.linspace(0.0, float(src_times[-1]), cfg.video_max_frames)
  if src_times.shape[0] == 1:
    return ts, np.zeros(ts.shape, np.int64)
  j = np.clip(np.searchsorted(src_times, ts), 1, src_times.shape[0] - 1)
  earlier = ts - src_times[j - 1] <= src_times[j] - ts
  return ts, np.where(earlier, j - 1, j).astype(np.int64)


def _check_fps(fps, where: str) -> float:
  try:
    f = float(fps)
  except (TypeError, ValueError):
    f = float("nan")
  if not (math.isfinite(f) and f > 0):
    raise _error(where, f"video fps={fps!r}", "give the frame rate in frames per second (> 0)")
  return f


def _video_from_frames(item: segments.Video, cfg: ModelConfig, where: str) -> VideoClip:
  frames = np.asarray(item.frames)
  if frames.ndim == 3:
    frames = frames[..., None]
  if frames.ndim != 4 or frames.shape[-1] not in (1, 3, 4):
    raise _error(where, f"video frames have shape {tuple(np.shape(item.frames))}", "give uint8 "
                 "(T, H, W, 3) frames")
  if frames.shape[0] == 0:
    raise _error(where, "the video has no frames", "give at least one frame")
  fps = _check_fps(item.fps, where)
  num = frames.shape[0]
  ts, idx = sample_times(np.arange(num) / fps, num / fps, cfg)
  out = np.stack([fit_square(pixels_to_rgb(frames[i], cfg, where, f"video frame {i}"), cfg) for i in idx])
  audio = load_audio(item.audio, cfg, f"{where} audio track") if item.audio is not None else None
  return VideoClip(frames=out, timestamps=ts, audio=audio)


def _video_from_file(item: segments.Video, cfg: ModelConfig, where: str) -> VideoClip:
  try:
    import av  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise _error(where, "decoding video files needs PyAV", "pip install 'embed2[video]' (or pip install av), "
                 "or decode the frames yourself and give Video(frames=..., fps=...)") from e
  if item.data is not None:
    data = _check_bytes(item.data, where, "video")
    source = lambda: io.BytesIO(data)  # a fresh reader per pass
  else:
    path = _check_file(item.path, where, "video")
    source = lambda: path

  try:
    # Pass 1: demux only (no decoding) to learn the frames' times and pick the ones to keep.
    with av.open(source(), mode="r") as container:
      if not container.streams.video:
        raise _error(where, "the file has no video stream", "give a video file, or an Audio item for audio")
      stream = container.streams.video[0]
      _check_pixel_count(stream.height or 0, stream.width or 0, cfg, where)
      rate = stream.average_rate or stream.guessed_rate
      time_base = float(stream.time_base) if stream.time_base else None
      pts = [p.pts for p in container.demux(stream) if p.size]
    if not pts:
      raise _error(where, "the video has no frames", "give a video with at least one frame")
    fps = float(rate) if rate else None
    if time_base and all(p is not None for p in pts):
      src_times = np.sort(np.asarray(pts, np.float64)) * time_base
      src_times -= src_times[0]
    elif fps:
      src_times = np.arange(len(pts)) / fps
    else:
      raise _error(where, "the video has neither frame timestamps nor a frame rate", "re-encode it (e.g. "
                   "ffmpeg -i in -c:v libx264 out.mp4) or give Video(frames=..., fps=...)")
    if fps:
      frame_s = 1.0 / fps
    else:
      frame_s = float(np.median(np.diff(src_times))) if len(src_times) > 1 else 0.0
    ts, idx = sample_times(src_times, float(src_times[-1]) + frame_s, cfg)

    # Pass 2: decode up to the last frame needed; convert only the kept ones (presentation order).
    want = set(int(i) for i in idx)
    last = max(want)
    kept = {}
    with av.open(source(), mode="r") as container:
      for i, frame in enumerate(container.decode(video=0)):
        if i in want:
          rgb = frame.to_ndarray(format="rgb24")
          kept[i] = fit_square(pixels_to_rgb(rgb, cfg, where, f"video frame {i}"), cfg)
        if i >= last:
          break
    if len(kept) < len(want):
      raise _error(where, f"the video stream lists {len(pts)} frames but only {len(kept)} of the "
                   f"{len(want)} sampled could be decoded (corrupt or truncated)", "re-encode or replace "
                   "the file")

    # The audio track, if any: decoded to planar float at its own rate, then as `load_audio`.
    audio = None
    with av.open(source(), mode="r") as container:
      if container.streams.audio:
        a_stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="fltp")  # keep layout and rate; planar float32 (C, n)
        parts, a_rate = [], None
        for frame in container.decode(audio=0):
          a_rate = a_rate or frame.sample_rate
          parts.extend(f.to_ndarray() for f in resampler.resample(frame))
        parts.extend(f.to_ndarray() for f in resampler.resample(None))
        a_rate = a_rate or a_stream.rate
        if parts and sum(p.shape[1] for p in parts):
          x_tc = np.concatenate(parts, axis=1).T.astype(np.float64)
          audio = _to_model_rate(x_tc, int(a_rate), cfg, f"{where} audio track")
  except MediaError:
    raise
  except Exception as e:  # av.FFmpegError subclasses, plus odd container states
    raise _error(where, f"could not decode the video: corrupt, truncated or not a format FFmpeg reads "
                 f"({type(e).__name__}: {e})", "re-encode or replace the file (mp4, webm, mkv, ... work), "
                 "or give decoded Video(frames=..., fps=...)") from e

  frames = np.stack([kept[int(i)] for i in idx])
  return VideoClip(frames=frames, timestamps=ts, audio=audio)


def load_video(item: segments.Video, cfg: ModelConfig, where: str) -> VideoClip:
  """A video item -> VideoClip: frames sampled at cfg.video_fps (at most cfg.video_max_frames, spread
  over the clip beyond that), each resized as `load_image`, plus the audio track.

  Sources: `frames` uint8 (T, H, W, 3) at `fps` (float [0, 1], greyscale and RGBA frames as in
  `pixels_to_rgb`) with an optional `audio` item, or encoded `data` / a `path` decoded with PyAV (the
  file's first video stream, and its first audio stream when there is one, channels averaged and
  resampled as `load_audio`). Frame times are taken relative to the first frame.

  Raises:
    MediaError: no frames, a bad frame array or fps, a corrupt or unreadable file, a missing file, frames
      larger than cfg.max_image_pixels, PyAV not installed (for files), a bad audio track.
  """
  if item.frames is not None:
    return _video_from_frames(item, cfg, where)
  return _video_from_file(item, cfg, where)
