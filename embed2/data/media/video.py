"""Video: sample frames at the model's rate (arrays, or files decoded with PyAV), each fitted as an image,
plus the audio track.

  load_video(Video, cfg, where)  -> VideoClip(frames uint8 (T, S, S, 3), timestamps (T,) s, audio)
"""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np

from embed2.data import segments
from embed2.data.media import audio as audio_lib
from embed2.data.media import image as image_lib
from embed2.data.media.source import MediaError, check_bytes, check_file, error
from embed2.model.presets import MediaConfig


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


def sample_times(src_times: np.ndarray, duration: float, cfg: MediaConfig) -> tuple[np.ndarray, np.ndarray]:
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
    raise error(where, f"video fps={fps!r}", "give the frame rate in frames per second (> 0)")
  return f


def _video_from_frames(item: segments.Video, cfg: MediaConfig, where: str) -> VideoClip:
  frames = np.asarray(item.frames)
  if frames.ndim == 3:
    frames = frames[..., None]
  if frames.ndim != 4 or frames.shape[-1] not in (1, 3, 4):
    raise error(where, f"video frames have shape {tuple(np.shape(item.frames))}", "give uint8 "
                "(T, H, W, 3) frames")
  if frames.shape[0] == 0:
    raise error(where, "the video has no frames", "give at least one frame")
  fps = _check_fps(item.fps, where)
  num = frames.shape[0]
  ts, idx = sample_times(np.arange(num) / fps, num / fps, cfg)
  rgb = (image_lib.pixels_to_rgb(frames[i], cfg, where, f"video frame {i}") for i in idx)
  out = np.stack([image_lib.fit_square(x, cfg) for x in rgb])
  audio = audio_lib.load_audio(item.audio, cfg, f"{where} audio track") if item.audio is not None else None
  return VideoClip(frames=out, timestamps=ts, audio=audio)


# Bytes of demuxed packets a video's single pass holds to decode from: a longer file is demuxed again
# to decode (opened twice), not held in memory (a 10 s 720p H.264 clip is ~2 MB).
_HOLD_PACKET_BYTES = 64 << 20


def _decode_packets(packets, video_index: int, want: set[int], audio_stream, cfg: MediaConfig,
                    where: str) -> tuple[dict[int, np.ndarray], np.ndarray | None]:
  """Decodes demuxed packets (file order, the flush packets last): the video stream's frames up to the
  last one in `want` (presentation order), of which those in `want` are fitted as images, and the
  whole audio stream when `audio_stream` is given (to planar float at its own rate, then as
  `load_audio`). Returns ({frame index: uint8 (S, S, 3)}, float32 (T_a,) or None)."""
  import av  # the optional video extra; pylint: disable=g-import-not-at-top
  last = max(want)
  kept, i = {}, 0  # i: the next video frame's index
  resampler = av.AudioResampler(format="fltp") if audio_stream is not None else None  # (C, n) float32
  parts, a_rate = [], None
  for packet in packets:
    if packet.stream_index == video_index:
      if i > last:
        continue
      for frame in packet.decode():
        if i in want:
          rgb = frame.to_ndarray(format="rgb24")
          kept[i] = image_lib.fit_square(image_lib.pixels_to_rgb(rgb, cfg, where, f"video frame {i}"), cfg)
        i += 1
        if i > last:
          break
    elif resampler is not None and packet.stream_index == audio_stream.index:
      for frame in packet.decode():
        a_rate = a_rate or frame.sample_rate
        parts.extend(f.to_ndarray() for f in resampler.resample(frame))
  audio = None
  if resampler is not None:
    parts.extend(f.to_ndarray() for f in resampler.resample(None))
    a_rate = a_rate or audio_stream.rate
    if parts and sum(p.shape[1] for p in parts):
      x_tc = np.concatenate(parts, axis=1).T  # float32 (T, C): `to_model_rate` averages in float64
      audio = audio_lib.to_model_rate(x_tc, int(a_rate), cfg, f"{where} audio track")
  return kept, audio


def _video_from_file(item: segments.Video, cfg: MediaConfig, where: str) -> VideoClip:
  try:
    import av  # the optional video extra; pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise error(where, "decoding video files needs PyAV", "pip install 'embed2[video]' (or pip install av), "
                "or decode the frames yourself and give Video(frames=..., fps=...)") from e
  if item.data is not None:
    data = check_bytes(item.data, where, "video")
    source = lambda: io.BytesIO(data)  # a fresh reader per open
  else:
    path = check_file(item.path, where, "video")
    source = lambda: path

  try:
    # One open: opening probes the streams (FFmpeg decodes a few frames to do so), ~40 ms for a 720p
    # mp4, as much as decoding 3 of its frames.
    with av.open(source(), mode="r") as container:
      if not container.streams.video:
        raise error(where, "the file has no video stream", "give a video file, or an Audio item for audio")
      stream = container.streams.video[0]
      image_lib.check_pixel_count(stream.height or 0, stream.width or 0, cfg, where)
      rate = stream.average_rate or stream.guessed_rate
      time_base = float(stream.time_base) if stream.time_base else None
      a_stream = container.streams.audio[0] if container.streams.audio else None
      streams = [stream] + ([a_stream] if a_stream is not None else [])
      # Demux only (no decoding) to learn the frames' times and pick the ones to keep; the packets are
      # held (up to _HOLD_PACKET_BYTES) and decoded after.
      pts, packets, held = [], [], 0
      for p in container.demux(streams):
        if p.stream_index == stream.index and p.size:
          pts.append(p.pts)
        if packets is not None:
          packets.append(p)
          held += p.size
          if held > _HOLD_PACKET_BYTES:
            packets = None
      if not pts:
        raise error(where, "the video has no frames", "give a video with at least one frame")
      fps = float(rate) if rate else None
      if time_base and all(p is not None for p in pts):
        src_times = np.sort(np.asarray(pts, np.float64)) * time_base
        src_times -= src_times[0]
      elif fps:
        src_times = np.arange(len(pts)) / fps
      else:
        raise error(where, "the video has neither frame timestamps nor a frame rate", "re-encode it (e.g. "
                    "ffmpeg -i in -c:v libx264 out.mp4) or give Video(frames=..., fps=...)")
      if fps:
        frame_s = 1.0 / fps
      else:
        frame_s = float(np.median(np.diff(src_times))) if len(src_times) > 1 else 0.0
      ts, idx = sample_times(src_times, float(src_times[-1]) + frame_s, cfg)

      # Decode up to the last frame needed, converting only the kept ones, and the audio track if any.
      want = set(int(i) for i in idx)
      if packets is not None:
        kept, audio = _decode_packets(packets, stream.index, want, a_stream, cfg, where)
      else:
        with av.open(source(), mode="r") as again:
          v2, a2 = again.streams.video[0], again.streams.audio[0] if again.streams.audio else None
          kept, audio = _decode_packets(again.demux([v2] + ([a2] if a2 is not None else [])), v2.index,
                                        want, a2, cfg, where)
    if len(kept) < len(want):
      raise error(where, f"the video stream lists {len(pts)} frames but only {len(kept)} of the "
                  f"{len(want)} sampled could be decoded (corrupt or truncated)", "re-encode or replace "
                  "the file")
  except MediaError:
    raise
  except Exception as e:  # av.FFmpegError subclasses, plus odd container states
    raise error(where, f"could not decode the video: corrupt, truncated or not a format FFmpeg reads "
                f"({type(e).__name__}: {e})", "re-encode or replace the file (mp4, webm, mkv, ... work), "
                "or give decoded Video(frames=..., fps=...)") from e

  frames = np.stack([kept[int(i)] for i in idx])
  return VideoClip(frames=frames, timestamps=ts, audio=audio)


def load_video(item: segments.Video, cfg: MediaConfig, where: str) -> VideoClip:
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
