"""Audio: decode (soundfile), mix to mono, resample (scipy) to the model's rate, log-mel features, and
the chunks the audio frontend reads.

  load_audio(Audio, cfg, where)  -> float32 (T,) mono at cfg.sample_rate   (cfg: MediaConfig)
  audio_chunks(wave_t, cfg)      -> log-mel chunks float32 (cfg.audio_chunk_frames, cfg.n_mels) each
"""

from __future__ import annotations

import functools
import io
import math

import numpy as np

from embed2.data import segments
from embed2.data.media.source import check_bytes, check_file, error
from embed2.model.presets import MediaConfig

try:
  import soundfile
  _SOUNDFILE_ERROR = None
except (ImportError, OSError) as e:  # a host without libsndfile: only audio files fail, as MediaError
  soundfile, _SOUNDFILE_ERROR = None, e

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


def _sample_rate(rate, where: str) -> int:
  try:
    r = float(rate)
  except (TypeError, ValueError):
    r = float("nan")
  if not (math.isfinite(r) and r > 0 and r == round(r)):
    raise error(where, f"sample_rate={rate!r}", "give the samples' rate in Hz as a positive integer")
  return int(round(r))


def _samples_to_tc(samples, where: str) -> np.ndarray:
  """A sample array (T,) or (T, C) -> float32 or float64 (T, C) (float32 stays float32: widening it
  changes no value); int16 / int32 PCM scaled to [-1, 1) in float64."""
  a = np.asarray(samples)
  if a.ndim == 1:
    a = a[:, None]
  if a.ndim != 2 or a.shape[1] == 0:
    raise error(where, f"audio samples have shape {tuple(np.shape(samples))}", "give (T,) mono or (T, C) "
                "time-major samples")
  if a.shape[1] > _MAX_AUDIO_CHANNELS:
    raise error(where, f"audio samples have shape {a.shape}: {a.shape[1]} channels", "samples are (T, C) "
                "time-major; pass samples.T if yours are (C, T)")
  if a.dtype in (np.float32, np.float64):
    return a
  if np.issubdtype(a.dtype, np.floating):
    return a.astype(np.float64)
  if a.dtype == np.int16:
    return a.astype(np.float64) / 32768.0
  if a.dtype == np.int32:
    return a.astype(np.float64) / 2147483648.0
  raise error(where, f"audio samples have dtype {a.dtype}", "give float samples (nominally in [-1, 1]) "
              "or int16 / int32 PCM")


def _decode_audio(item: segments.Audio, where: str) -> tuple[np.ndarray, int]:
  """Encoded audio -> (float64 (T, C), sample rate)."""
  if soundfile is None:
    raise error(where, f"decoding audio files needs the soundfile package ({_SOUNDFILE_ERROR})",
                "pip install soundfile, or decode it yourself and give Audio(samples=..., sample_rate=...)")
  if item.data is not None:
    src = io.BytesIO(check_bytes(item.data, where, "audio"))
  else:
    src = check_file(item.path, where, "audio")
  try:
    x_tc, rate = soundfile.read(src, dtype="float64", always_2d=True)
  except Exception as e:  # LibsndfileError (a RuntimeError) for bad data; others for odd headers
    msg = (getattr(e, "error_string", None) or str(e)).rstrip(".")
    raise error(where, f"could not decode the audio: corrupt, truncated or unsupported ({msg})",
                f"supported formats: {AUDIO_FORMATS}; convert it, or decode it yourself and give "
                "Audio(samples=..., sample_rate=...)") from e
  return x_tc, int(rate)


def _channel_mean(x_tc: np.ndarray) -> np.ndarray:
  """float32 / float64 (T, C) -> float64 (T,): `x_tc.astype(np.float64).mean(axis=1)`, bit for bit.

  Stereo takes a fast path: numpy reduces a short axis row by row (~8 ms for 10 s of 48 kHz stereo,
  holding the GIL), two column adds take ~0.8 ms. numpy's sum starts from +0.0, so a row of two -0.0
  sums to +0.0 there: the `+= 0.0` does the same here (it changes no other value).
  """
  if x_tc.shape[1] != 2:
    return x_tc.astype(np.float64).mean(axis=1)
  mono_t = np.add(x_tc[:, 0], x_tc[:, 1], dtype=np.float64)
  mono_t += 0.0
  mono_t /= 2
  return mono_t


def to_model_rate(x_tc: np.ndarray, rate: int, cfg: MediaConfig, where: str) -> np.ndarray:
  """float32 / float64 (T, C) at `rate` -> float32 (T',) mono at cfg.sample_rate (channels averaged in
  float64), a new array."""
  if x_tc.shape[0] == 0:
    raise error(where, "audio has 0 samples", "give at least one sample (audio shorter than an STFT window "
                "is fine)")
  bad = ~np.isfinite(x_tc)
  if bad.any():
    t = int(np.argmax(bad.any(axis=1)))
    raise error(where, f"audio has {int(bad.sum())} NaN or inf values (first at sample {t})", "fix or drop "
                "the clip; samples must be finite")
  # One channel is its own mean (exactly): no float64 copy, and float32 mono at the model rate (the
  # generated tasks' audio) goes straight to the float32 result.
  mono_t = x_tc[:, 0] if x_tc.shape[1] == 1 else _channel_mean(x_tc)
  if rate != cfg.sample_rate:
    from scipy import signal  # a slow import, for resampling only; pylint: disable=g-import-not-at-top
    g = math.gcd(cfg.sample_rate, rate)
    mono_t = signal.resample_poly(mono_t.astype(np.float64), cfg.sample_rate // g, rate // g)
  out_t = mono_t.astype(np.float32)  # a copy: the caller's samples are never aliased
  if not np.all(np.isfinite(out_t)):
    raise error(where, "audio samples overflow float32", "give samples nominally in [-1, 1]")
  return out_t


def load_audio(item: segments.Audio, cfg: MediaConfig, where: str) -> np.ndarray:
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
  return to_model_rate(x_tc, rate, cfg, where)


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


def mel_filterbank(cfg: MediaConfig) -> np.ndarray:
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


def _log_mel_into(x_t: np.ndarray, cfg: MediaConfig, out_fm: np.ndarray) -> None:
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


def log_mel(wave_t: np.ndarray, cfg: MediaConfig) -> np.ndarray:
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


def log_mel_pad_value(cfg: MediaConfig) -> float:
  """The feature value of a silent frame (every band); audio chunks are padded with it."""
  del cfg  # the compression is fixed; the argument keeps call sites stable if it ever depends on cfg
  return _SILENCE


def audio_chunks(wave_t: np.ndarray, cfg: MediaConfig) -> tuple[list[np.ndarray], list[int], bool]:
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
