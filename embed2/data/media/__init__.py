"""Host-side media preprocessing (numpy): decode, resize, resample, log-mel, sample video.

Every media item (`embed2.data.segments`) becomes fixed-shape numpy arrays here, before batching, as
the model's `MediaConfig` (`config.model.media`) says:

  load_image(Image, cfg, where)  -> uint8 (S, S, 3), S = cfg.image_size                 (image.py)
  load_audio(Audio, cfg, where)  -> float32 (T,) mono at cfg.sample_rate                 (audio.py)
  audio_chunks(wave_t, cfg)      -> log-mel chunks float32 (cfg.audio_chunk_frames, cfg.n_mels) each
  load_video(Video, cfg, where)  -> VideoClip(frames uint8 (T, S, S, 3), timestamps (T,) s, audio)
                                                                                          (video.py)

Pixels stay uint8 until the device (the frontends compute x / 127.5 - 1 there,
`embed2.model.frontends.normalize_pixels`), which keeps host batches four times smaller. Bad input raises
`MediaError` (a ValueError) whose message starts with `where` (e.g. "inputs[3]" or "task 'shapes'
example 17 query") and says the fix (source.py); training pipelines catch it to skip and count the
record, `Embedder` lets it through.

Decoders: Pillow for images, `soundfile` (libsndfile) for audio bytes and files,
`scipy.signal.resample_poly` for resampling, PyAV for video files (optional: `pip install
'embed2[video]'`; video given as arrays needs nothing extra). scipy and PyAV are imported on first
use; a host without libsndfile fails only audio files (a MediaError).
"""

from embed2.data.media.audio import (AUDIO_FORMATS, audio_chunks, hann_window, hz_to_mel, load_audio,
                                     log_mel, log_mel_pad_value, mel_filterbank, mel_to_hz)
from embed2.data.media.image import IMAGE_FORMATS, fit_square, load_image, pixels_to_rgb
from embed2.data.media.source import MediaError
from embed2.data.media.video import VideoClip, load_video, sample_times
