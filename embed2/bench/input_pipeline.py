"""Input pipeline vs train step: examples/s the grain pipeline delivers per host, per modality, against
what the train step consumes; and what an accelerator host needs, against what this CPU's cores give.

    python -m embed2.bench.input_pipeline                       # configs/demo.py: tasks, batches, model
    python -m embed2.bench.input_pipeline --config_arg=batch=128 --batches=30
    python -m embed2.bench.input_pipeline --config=tiny --toy --out=/tmp/input_pipeline.json
    python -m embed2.bench.input_pipeline --real_sizes --workers=1,2 --batches=6 --rounds=3

Three parts; every run writes the per-host need (2), and one of (1) or (3).

1. Pipeline vs train step (default). Streams (table rows): the config's first stage if it is a PFT
   stage (one mixed batch shape) and every task of `config.tasks` as a fine-tuning stream of its own
   (each FT task has its own batch shape).

  pipeline   `pipeline.build_pft_iterator` / `build_ft_iterator` exactly as the trainer builds them
             (tokenization with the package tokenizer, packing, one process, no grain workers: the
             calling thread does the work); `--batches` next() calls after one untimed call.
             Build time (tokenizing the row-suggestion sample) is reported apart.
  train step the trainer's compiled step (`StepFunctions`) on the first batch of each stream, the
             config's own model; every stream once per round, one state threaded, median step time.

  examples/s count valid examples (`num_examples`); the ratio is pipeline / train step (the target:
  >= 3x for every modality). On a CPU-only host the two compete for the same cores in a real run; here
  each is measured alone. A stream's modality is what its examples hold besides text (a task of
  captions -> images is "image", an interleaved image + text query is "image"; the PFT mixture is
  "mixed"); the per-modality ratio is the lowest of its streams. A modality no stream holds (e.g. any
  media with `--config=tiny`, or with `--config_arg=media=false`) is reported as "n/a: no stream".

2. What a host needs (`per_host_need`, arithmetic only): examples/s a train step consumes on one TPU v5e
   host (4 chips x 197 TFLOP/s bf16), one TPU v5p host (4 x 459) and one H100 (989), at the README's
   target MFU (45%), for the gemma3-1b and gemma3-4b shapes with Gemma 3's ViT frontend (SigLIP So400m/14
   at 896 px) and the conv audio frontend, over the demo's tasks at real sizes (`DEMO_AT_REAL_SIZE`:
   10 s audio clips, 8 s videos at 1 frame a second with their audio track):
     train FLOPs of an example = 6 x (transformer matmul parameters) x (tokens of all its sides)
                               + 6 x (ViT matmul parameters) x (patches) per image or video frame
                               + 6 x (projector) x (soft tokens) per image + 6 x (audio convs) per chunk
     need (examples/s) = chips x peak x MFU / (mean FLOPs of an example over the mix)
   per modality (its tasks at their demo rates) and for the demo's whole PFT mixture. Attention scores
   (QK^T, PV) are left out of the formula, as in 6 N D, so the need is an upper bound; the JSON gives
   the need with them counted too (`with_attention`). Every assumption is in the JSON's `need`.

3. Real sizes (`--real_sizes`): media generated from `--seed` into a temporary folder (natural-looking
   JPEGs of 1024x768 and 3000x2000, 10 s 48 kHz stereo FLAC, 8-frame 1280x720 H.264 mp4 at 1 fps with
   a 48 kHz AAC track), made into tasks shaped like the demo's t2i, a2t and v2t, and read through
   `pipeline.build_ft_iterator` with the real-size media settings (896 px ViT input, 16 kHz audio,
   video at 1 fps; a small text model: only the input side is measured) at each `--workers` count.
   Per stream: examples/s (median over `--rounds`, each a fresh iterator: one untimed batch, then
   `--batches` timed), the scaling from the first to the last of `--workers` (median of the rounds'
   ratios) beside a reference scaling measured right after each timing (as many threads running a
   GIL-free Pillow resize: what the machine gave any such threads then), the CPU each thread role used
   per example (decode threads, the batch-assembly thread; from /proc) and the scaling that split
   allows on idle cores (`scaling_bound`), examples per CPU-second of the whole process, and against
   the need of part 2: the cores one host needs to feed its step. The load average is recorded beside
   each figure.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
import statistics
import tempfile
import threading
import time
from typing import Any, Sequence

import numpy as np
import soundfile
from absl import flags
from PIL import Image, ImageDraw

from embed2 import cli
from embed2.bench import common
from embed2.bench import train_step as ts
from embed2.data import interleave
from embed2.data import pipeline
from embed2.data import segments
from embed2.data.tokenizer import Tokenizer
from embed2.model import frontends
from embed2.model.presets import MediaConfig, ModelConfig

MODALITIES = ("text", "image", "audio", "video")
NO_STREAM = "n/a: no stream"
# The README's MFU target (Performance: ">= 45%" for the gemma3-1b shape at seq 512 on one H100/H200).
TARGET_MFU = 0.45


CONFIGS = ("demo", "tiny")


def load_config(name: str, arg: str = ""):
  """configs/{name}.py's config with its knobs `arg` (e.g. "batch=128"), normalised as the trainer
  reads it."""
  from configs import demo, tiny  # pylint: disable=g-import-not-at-top
  from embed2.train import trainer  # pylint: disable=g-import-not-at-top
  get = {"demo": demo.get_config, "tiny": tiny.get_config}[name]
  return trainer.normalize(get(arg or None))


FLAGS = common.program_flags("input_pipeline")  # --out, --toy, and this program's own:
flags.DEFINE_enum("config", "demo", CONFIGS,
                  "configs/demo.py (stdlib tasks) or configs/tiny.py (generated tasks)", flag_values=FLAGS)
flags.DEFINE_string("config_arg", "", "the config's knobs, e.g. 'batch=128,layers=2'", flag_values=FLAGS)
flags.DEFINE_string("streams", "", "comma-separated stream names (default: all; with --real_sizes: "
                    "of REAL_STREAMS)", flag_values=FLAGS)
flags.DEFINE_integer("batches", 20, "timed next() calls per stream", flag_values=FLAGS)
flags.DEFINE_integer("steps", 5, "timed train-step rounds", flag_values=FLAGS)
flags.DEFINE_bool("real_sizes", False, "part 3: generated media at real sizes through the pipeline with "
                  "--workers decode workers (no train step)", flag_values=FLAGS)
flags.DEFINE_string("workers", "1,2", "--real_sizes: comma-separated worker counts to compare",
                    flag_values=FLAGS)
flags.DEFINE_integer("rounds", 2, "--real_sizes: rounds over the worker counts (fresh iterators)",
                     flag_values=FLAGS)
flags.DEFINE_integer("real_batch", 8, "--real_sizes: examples per batch", flag_values=FLAGS)
flags.DEFINE_integer("media_files", 8, "--real_sizes: distinct files generated per stream",
                     flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "--real_sizes: seed of the generated media and texts", flag_values=FLAGS)
flags.DEFINE_float("mfu", TARGET_MFU, "the MFU the per-host need assumes (the README's target)",
                   flag_values=FLAGS)


def _args(argv: Sequence[str]) -> cli.Args:
  args = cli.parse(FLAGS, argv)
  if args.toy:
    args.batches, args.steps, args.rounds, args.real_batch, args.media_files = 3, 1, 1, 4, 2
    args.config_arg = args.config_arg or "layers=1,batch=16"
  return args


# ----------------------------------------------------------------------------- what a host needs

# One host: (name, its chip's key in common.PEAK_FLOPS, chips); dense bf16 peaks from the datasheets.
HOSTS = (("TPU v5e host", "TPU v5e", 4), ("TPU v5p host", "TPU v5p", 4), ("H100", "H100", 1))
NEED_PRESETS = ("gemma3-1b", "gemma3-4b")
# Tokens of a video frame's time stamp after <timestamp>: Gemma 3's tokenizer splits digits, so "7.0s"
# is "7" "." "0" "s". (The package tokenizer's count is what the pipeline really writes.)
TIMESTAMP_TOKENS = 4
AUDIO_SECONDS = 10.0  # an audio input at real size
VIDEO_SECONDS = 8.0  # a video at real size: 8 frames at 1 fps, with an audio track as long
IMAGE, AUDIO, VIDEO = ("image",), ("audio", AUDIO_SECONDS), ("video", VIDEO_SECONDS)
# The demo's tasks (configs/demo.py) at real sizes: name -> (modality, sides), a side being
# (text tokens, media items) for the query, the positive, then each hard negative. Text tokens are
# the means over 200 train examples of the demo's tasks through the package tokenizer, bos / eos and
# the query's task string included, rounded; the media items are at the real sizes above (an image is
# one image_size input whatever its source size).
DEMO_AT_REAL_SIZE: dict[str, tuple[str, tuple[tuple[int, tuple], ...]]] = {
    "code_search": ("text", ((29, ()), (77, ()), (80, ()))),
    "doc_retrieval": ("text", ((25, ()), (69, ()))),
    "module_cls": ("text", ((27, ()), (28, ()))),
    "t2i": ("image", ((21, ()), (2, (IMAGE,)))),
    "i2t": ("image", ((12, (IMAGE,)), (12, ()))),
    "edit": ("image", ((16, (IMAGE,)), (2, (IMAGE,)))),
    "a2t": ("audio", ((10, (AUDIO,)), (20, ()))),
    "spell": ("audio", ((12, (AUDIO,)), (7, ()))),
    "v2t": ("video", ((12, (VIDEO,)), (14, ()))),
}


def real_media() -> MediaConfig:
  """The real-size media settings: configs/pft_gemma3_4b.py's image frontend (Gemma 3's SigLIP So400m/14
  at 896 px, 256 soft tokens an image) plus the conv audio frontend, the rest MediaConfig's defaults
  (16 kHz audio, 64 mel bands, 10 ms hop, 2 s chunks, at most 8; video at 1 fps, at most 8 frames)."""
  from configs import pft_gemma3_4b  # pylint: disable=g-import-not-at-top
  return MediaConfig(**pft_gemma3_4b.get_config().model.media.to_dict(), audio_frontend="conv")


def demo_rates() -> dict[str, float]:
  """The demo's PFT mixture (configs/demo.py): task -> share of examples."""
  return {k: float(v) for k, v in load_config("demo").stages[0].tasks.items()}


def text_matmul_params(cfg: ModelConfig) -> int:
  """Parameters a token multiplies in the transformer: q, k, v, o, gate, up, down of every block. The
  embedding table is a gather, and an embedding model has no LM head."""
  d, h, k, hd, f = cfg.model_dim, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim, cfg.mlp_dim
  return cfg.num_layers * (d * h * hd + 2 * d * k * hd + h * hd * d + 3 * d * f)


def head_params(cfg: ModelConfig) -> int:
  """Parameters of the dense head after pooling (one product per pooled vector)."""
  dims = (cfg.model_dim,) + tuple(cfg.head_dims)
  return sum(a * b for a, b in zip(dims[:-1], dims[1:]))


def text_params_total(cfg: ModelConfig) -> int:
  """Every parameter of a Gemma 3 shape from its fields: the matmuls, the embedding table, four RMSNorms
  a block plus the q / k norms, the final norm and the head."""
  d, hd = cfg.model_dim, cfg.resolved_head_dim
  return (text_matmul_params(cfg) + cfg.vocab_size * d + cfg.num_layers * (4 * d + 2 * hd) + d
          + head_params(cfg))


def audio_counts(seconds: float, media: MediaConfig) -> tuple[int, int]:
  """(sequence tokens with <start/end_of_audio>, frontend chunks) of a clip of `seconds`, laid out as
  `interleave.InputEncoder` does (`media.audio_chunks`: 1 + samples // hop frames, at most
  max_audio_chunks chunks of audio_chunk_frames)."""
  c = media.audio_chunk_frames
  frames = min(1 + round(seconds * media.sample_rate) // media.hop_length, c * media.max_audio_chunks)
  chunks = -(-frames // c)
  return 2 + sum(media.audio_tokens(min(c, frames - i * c)) for i in range(chunks)), chunks


def item_counts(item: tuple, media: MediaConfig, timestamp_tokens: int = TIMESTAMP_TOKENS
                ) -> tuple[int, int, int]:
  """A media item of `DEMO_AT_REAL_SIZE` -> (sequence tokens, images through the image frontend, audio
  chunks through the audio frontend), laid out as `interleave.InputEncoder` does."""
  kind = item[0]
  if kind == "image":
    return media.image_tokens + 2, 1, 0
  if kind == "audio":
    tokens, chunks = audio_counts(item[1], media)
    return tokens, 0, chunks
  if kind == "video":  # frames as `media.sample_times` keeps them, then the audio track
    frames = min(max(1, math.ceil(item[1] * media.video_fps - 1e-9)), media.video_max_frames)
    tokens, chunks = audio_counts(item[1], media)
    return 2 + frames * (1 + timestamp_tokens + media.image_tokens + 2) + tokens, frames, chunks
  raise ValueError(f"media item {item!r}: the kind must be 'image', 'audio' or 'video'")


def vision_matmul_params(cfg: ModelConfig) -> dict[str, int]:
  """The ViT frontend's matmul parameters: per patch (patch embedding and every block's q, k, v, o, fc1,
  fc2) and per soft token (the projector)."""
  v = frontends.ViTImageFrontend.vision_config(cfg)
  return {"per_patch": v.patch_size ** 2 * v.num_channels * v.width
                      + v.depth * (4 * v.width ** 2 + 2 * v.width * v.mlp_dim),
          "per_soft_token": v.width * v.text_dim, "patches": v.num_patches,
          "soft_tokens": v.mm_tokens_per_image}


def audio_frontend_macs(cfg: ModelConfig) -> int:
  """Multiply-adds of the conv audio frontend on one chunk: conv1 (k3, s2) at ceil(F/2) positions, conv2
  and the projection to D at ceil(ceil(F/2)/2)."""
  m = cfg.media
  f1 = -(-m.audio_chunk_frames // 2)
  f2 = -(-f1 // 2)
  return f1 * 3 * m.n_mels * m.audio_conv_dim + f2 * (3 * m.audio_conv_dim ** 2 + m.audio_conv_dim *
                                                      cfg.model_dim)


def example_flops(sides: Sequence[tuple[int, tuple]], cfg: ModelConfig,
                  timestamp_tokens: int = TIMESTAMP_TOKENS) -> dict[str, float]:
  """Train FLOPs (forward + backward = 3 x forward, 2 per multiply-add) of one example.

  Args:
    sides: (text tokens, media items) of the query, the positive and each negative.
    cfg: the model (its transformer shape and its media frontends).
    timestamp_tokens: tokens of a video frame's time stamp.

  Returns:
    tokens (every side's sequence), images (frames included), audio_chunks, and FLOPs: flops (the
    formula of the module docstring) and attention_flops (QK^T and PV of the transformer, sliding
    layers within their window, and of the ViT over its patches, left out of `flops`).
  """
  lengths, images, chunks = [], 0, 0
  for text, items in sides:
    n = text
    for item in items:
      t, i, c = item_counts(item, cfg.media, timestamp_tokens)
      n, images, chunks = n + t, images + i, chunks + c
    lengths.append(n)
  tokens = sum(lengths)
  text = 6.0 * (text_matmul_params(cfg) * tokens + head_params(cfg) * len(sides))
  vit = vision_matmul_params(cfg)
  vision = 6.0 * images * (vit["per_patch"] * vit["patches"] + vit["per_soft_token"] * vit["soft_tokens"])
  audio = 6.0 * chunks * audio_frontend_macs(cfg)
  v = frontends.ViTImageFrontend.vision_config(cfg)
  attention = (3.0 * ts.forward_flops(cfg, np.asarray(lengths), num_pooled=len(sides)) - text
               + 3.0 * images * v.depth * 4.0 * v.width * float(v.num_patches) ** 2)
  return {"tokens": tokens, "images": images, "audio_chunks": chunks, "flops": text + vision + audio,
          "text_flops": text, "vision_flops": vision, "audio_flops": audio, "attention_flops": attention}


def per_host_need(tasks: dict[str, tuple[str, tuple]] | None = None,
                  rates: dict[str, float] | None = None, *, media: MediaConfig | None = None,
                  presets: Sequence[str] = NEED_PRESETS, hosts=HOSTS, mfu: float = TARGET_MFU,
                  timestamp_tokens: int = TIMESTAMP_TOKENS) -> dict[str, Any]:
  """Examples/s a train step consumes per host, per modality and for the whole mixture.

  Args:
    tasks: name -> (modality, sides) as `DEMO_AT_REAL_SIZE` (the default).
    rates: name -> share of examples (default: the demo's PFT mixture, `demo_rates`); every task of
      `tasks` needs one.
    media: the frontends and preprocessing (default `real_media()`).
    presets: model shapes (embed2.model.presets names).
    hosts: (name, common.PEAK_FLOPS key, chips) each.
    mfu: the fraction of the bf16 peak the step reaches.
    timestamp_tokens: tokens of a video frame's time stamp.

  Returns:
    JSON-able: assumptions, per model the parameter counts, per task its tokens / images / chunks /
    FLOPs, and per_host[preset][host][modality or "mix"] = examples/s (with_attention: the same with
    attention FLOPs counted).
  """
  tasks = DEMO_AT_REAL_SIZE if tasks is None else tasks
  rates = demo_rates() if rates is None else rates
  media = real_media() if media is None else media
  missing = sorted(set(tasks) - set(rates))
  if missing:
    raise ValueError(f"per_host_need: no rate for tasks {missing}; give every task a share of examples")
  if not 0 < mfu <= 1:
    raise ValueError(f"--mfu={mfu} must be in (0, 1]")
  modalities = sorted({m for m, _ in tasks.values()})
  out: dict[str, Any] = {
      "formula": "examples/s = chips x peak bf16 FLOP/s x MFU / mean over the mix of (6 x transformer "
                 "matmul params x tokens + 6 x ViT matmul params x patches per image + 6 x projector "
                 "x soft tokens per image + 6 x audio conv MACs per chunk)",
      "assumptions": {
          "mfu": mfu, "mfu_source": "README Performance: >= 45% MFU target of the gemma3-1b shape",
          "hosts": {n: {"chip": k, "chips": c, "peak_bf16_per_chip": common.PEAK_FLOPS[k]["bfloat16"]}
                    for n, k, c in hosts},
          "media": dict(vars(media)),
          "vision_tower": "Gemma 3's SigLIP So400m/14 (configs/pft_gemma3_4b.py) on both shapes, "
                          "projecting to the model dim, trained (3 x forward); gemma3-1b ships none",
          "audio": f"{AUDIO_SECONDS:g} s clips; the conv frontend on every chunk",
          "video": f"{VIDEO_SECONDS:g} s clips at video_fps with an audio track as long; "
                   f"{timestamp_tokens} tokens per time stamp",
          "text_tokens": "means of the demo's tasks through the package tokenizer (bos/eos, task "
                         "strings included); Gemma's tokenizer gives fewer",
          "not_counted": "attention scores (see with_attention), embedding gathers, norms, the loss, "
                         "the optimizer",
          "rates": dict(rates), "rates_source": "configs/demo.py PFT stage (share of examples)",
          "tasks": {n: {"modality": m, "sides": [[t, [list(i) for i in items]] for t, items in sides]}
                    for n, (m, sides) in tasks.items()}},
      "models": {}, "tasks": {}, "per_host": {}, "with_attention": {}}
  for preset in presets:
    cfg = ModelConfig.from_name(preset, media=media)
    vit = vision_matmul_params(cfg)
    out["models"][preset] = {
        "params_total_text": text_params_total(cfg), "transformer_matmul_params": text_matmul_params(cfg),
        "embedding_params": cfg.vocab_size * cfg.model_dim, "vit_matmul_params_per_patch": vit["per_patch"],
        "vit_patches": vit["patches"], "projector_params": vit["per_soft_token"],
        "audio_frontend_macs_per_chunk": audio_frontend_macs(cfg)}
    per_task = {n: example_flops(sides, cfg, timestamp_tokens) for n, (_, sides) in tasks.items()}
    for n, f in per_task.items():
      out["tasks"].setdefault(n, {k: f[k] for k in ("tokens", "images", "audio_chunks")})
      out["tasks"][n].setdefault("flops", {})[preset] = f["flops"]
      out["tasks"][n].setdefault("attention_flops", {})[preset] = f["attention_flops"]
    groups = {m: [n for n in tasks if tasks[n][0] == m] for m in modalities}
    groups["mix"] = list(tasks)
    for key, extra in (("per_host", False), ("with_attention", True)):
      table = out[key][preset] = {}
      for host, chip, chips in hosts:
        flops_s = chips * common.PEAK_FLOPS[chip]["bfloat16"] * mfu
        row = table[host] = {}
        for g, names in groups.items():
          total = sum(rates[n] for n in names)
          if total <= 0:
            row[g] = None  # a modality the mix never samples
            continue
          mean = sum(rates[n] * (per_task[n]["flops"] + extra * per_task[n]["attention_flops"])
                     for n in names) / total
          row[g] = flops_s / mean
  return out


NEED_COLUMNS = ("text", "image", "audio", "video", "mix")


def need_report(need: dict[str, Any]) -> str:
  """The per-host need as a table: examples/s per modality, per model shape and host."""
  rows = [dict(need["per_host"][p][h], name=p, host=h)
          for p in need["per_host"] for h in need["per_host"][p]]
  cols = (("name", "model"), ("host", "host")) + tuple((m, f"{m} ex/s", ".1f") for m in NEED_COLUMNS)
  a = need["assumptions"]
  return (f"per-host need: examples/s a train step consumes at {a['mfu']:.0%} MFU (demo task mix at real "
          "sizes; 6 x params x tokens + the ViT per image; attention not counted)\n"
          + common.format_table(rows, cols))


# ---------------------------------------------------------------------------------- real sizes

# name -> (modality, the demo task it is shaped like, source size): (width, height) of a JPEG, seconds
# of a 48 kHz stereo FLAC, or (width, height, frames) of a 1 fps mp4 with a 48 kHz AAC track.
REAL_STREAMS = {
    "image_1024x768": ("image", "t2i", (1024, 768)),
    "image_3000x2000": ("image", "t2i", (3000, 2000)),
    "audio_10s_48k": ("audio", "a2t", AUDIO_SECONDS),
    "video_8f_720p": ("video", "v2t", (1280, 720, int(VIDEO_SECONDS))),
}
TOY_SIZES = {"image_1024x768": (64, 48), "image_3000x2000": (96, 64), "audio_10s_48k": 0.5,
             "video_8f_720p": (64, 48, 2)}
SOURCE_RATE = 48_000  # Hz of the generated audio
WORDS = ("red", "small", "old", "bright", "quiet", "wooden", "dog", "car", "river", "house", "street",
         "child", "runs", "sits", "plays", "near", "under", "a", "the", "park", "beach", "city", "night")


def natural_image(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
  """uint8 (height, width, 3) that compresses like a photo (~2 bits a pixel as a quality-90 JPEG): 1/f
  noise (the spectrum of natural scenes) at 1/8 size upsampled, 40 filled shapes (edges), fine grain."""
  sw, sh = max(8, width // 8), max(8, height // 8)
  spectrum = np.fft.rfft2(rng.standard_normal((3, sh, sw)))
  f = np.hypot(np.fft.fftfreq(sh)[:, None], np.fft.rfftfreq(sw)[None, :])
  low = np.fft.irfft2(spectrum / np.maximum(f, 1.0 / max(sw, sh)), s=(sh, sw))
  low = (low - low.mean()) / low.std()
  img = Image.fromarray(np.clip(128 + 45 * low.transpose(1, 2, 0), 0, 255).astype(np.uint8))
  img = img.resize((width, height), Image.Resampling.BICUBIC)
  draw = ImageDraw.Draw(img)
  for _ in range(40):
    x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
    r = int(rng.integers(max(1, min(width, height) // 40), max(2, min(width, height) // 5)))
    box = [x, y, x + r, y + int(r * rng.uniform(0.5, 2.0))]
    fill = tuple(int(c) for c in rng.integers(0, 256, 3))
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
  grain = rng.standard_normal((height, width, 3), dtype=np.float32) * 6.0
  return np.clip(np.asarray(img, np.float32) + grain, 0, 255).astype(np.uint8)


def natural_sound(rng: np.random.Generator, seconds: float, rate: int = SOURCE_RATE) -> np.ndarray:
  """float32 (T, 2) in [-0.8, 0.8]: a voiced harmonic sound with gliding pitch and syllable-like bursts
  over faint noise, the right channel a delayed copy; compresses like speech (FLAC ~ 600 kb/s)."""
  t = np.arange(int(round(seconds * rate))) / rate
  f0 = 120.0 * 2.0 ** (rng.uniform(0, 1.5) + 0.3 * np.sin(2 * np.pi * rng.uniform(0.2, 1.0) * t))
  phase = 2 * np.pi * np.cumsum(f0) / rate
  voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
  bursts = np.clip(np.sin(2 * np.pi * rng.uniform(1, 4) * t + rng.uniform(0, 2 * np.pi)), 0, None) ** 2
  x = 0.2 * voiced * bursts + 0.03 * rng.standard_normal(t.size)
  x_t2 = np.stack([x, 0.9 * np.roll(x, 37)], axis=1)
  return (0.8 * x_t2 / np.abs(x_t2).max()).astype(np.float32)


def write_mp4(path: str, frames_thw3: np.ndarray, sound_t2: np.ndarray) -> None:
  """An H.264 mp4 at 1 frame a second (yuv420p, crf 23) with a stereo AAC track at SOURCE_RATE."""
  import av  # the optional video extra; pylint: disable=g-import-not-at-top
  with av.open(path, mode="w", format="mp4") as container:
    video = container.add_stream("libx264", rate=1)
    video.width, video.height, video.pix_fmt = frames_thw3.shape[2], frames_thw3.shape[1], "yuv420p"
    video.options = {"crf": "23", "preset": "veryfast", "threads": "1"}  # one thread: reproducible
    audio = container.add_stream("aac", rate=SOURCE_RATE)
    audio.layout = "stereo"
    for i, frame in enumerate(frames_thw3):
      vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
      vf.pts = i
      container.mux(video.encode(vf))
    container.mux(video.encode(None))
    for start in range(0, len(sound_t2), 1024):  # AAC frames of 1024 samples
      af = av.AudioFrame.from_ndarray(np.ascontiguousarray(sound_t2[start:start + 1024].T), format="fltp",
                                      layout="stereo")
      af.sample_rate, af.pts = SOURCE_RATE, start
      container.mux(audio.encode(af))
    container.mux(audio.encode(None))


def write_media(stream: str, folder: str, count: int, seed: int, toy: bool = False) -> list[str]:
  """Generates `count` media files of a REAL_STREAMS stream (TOY_SIZES with `toy`) into `folder`,
  deterministically from `seed`; returns their paths."""
  kind, _, size = REAL_STREAMS[stream]
  size = TOY_SIZES[stream] if toy else size
  paths = []
  for i in range(count):
    rng = np.random.default_rng([seed, i, sum(map(ord, stream))])
    if kind == "image":
      path = os.path.join(folder, f"{stream}_{i}.jpg")
      Image.fromarray(natural_image(rng, *size)).save(path, "JPEG", quality=90)
    elif kind == "audio":
      path = os.path.join(folder, f"{stream}_{i}.flac")
      soundfile.write(path, natural_sound(rng, size), SOURCE_RATE, format="FLAC", subtype="PCM_16")
    else:  # a camera panning over a scene, one frame a second
      w, h, n = size
      step = max(1, w // 64)
      scene = natural_image(rng, w + n * step, h + n * step)
      frames = np.stack([scene[k * step:k * step + h, k * step:k * step + w] for k in range(n)])
      path = os.path.join(folder, f"{stream}_{i}.mp4")
      write_mp4(path, frames, natural_sound(rng, float(n)))
    paths.append(path)
  return paths


def real_examples(stream: str, paths: Sequence[str], n: int, seed: int) -> list[dict[str, Any]]:
  """n examples shaped like the stream's demo task: t2i (caption -> image), a2t / v2t (clip ->
  description); example i reads file i % len(paths); the texts are 6 random words."""
  kind = REAL_STREAMS[stream][0]
  item = {"image": segments.Image, "audio": segments.Audio, "video": segments.Video}[kind]
  rng = np.random.default_rng([seed, 1])
  out = []
  for i in range(n):
    text, media = " ".join(rng.choice(WORDS, size=6)), item(path=paths[i % len(paths)])
    query, positive = (text, media) if kind == "image" else (media, text)
    out.append({"query": query, "positive": positive, "negatives": [], "query_id": i,
                "positive_id": i, "group": stream})
  return out


def real_batch_spec(encoder, example: dict[str, Any], task_string: str, batch: int):
  """A BatchSpec with every row and media slot set (no build-time sample to decode): the media side one
  example a row, sized by encoding `example`; the text side 128-token rows, 4 examples each."""
  media_side = "positive" if isinstance(example["query"], str) else "query"
  e = encoder.encode(example[media_side], max_length=encoder.cfg.max_length,
                     task_string=task_string if media_side == "query" else "")
  sides = {"query": {}, "positive": {}}
  sides[media_side] = dict(len=e.tokens.size + 16, rows=batch, images=batch * e.count("image"),
                           audio=batch * e.count("audio"))
  text_side = "positive" if media_side == "query" else "query"
  sides[text_side] = dict(len=128, rows=-(-batch // 2), images=0, audio=0)
  return pipeline.BatchSpec(
      batch_size=batch, segments=4,
      **{f"{s}_{k}": v for s, d in sides.items() for k, v in (
          ("len", d["len"]), ("rows", d["rows"]), ("images", d["images"]), ("audio", d["audio"]))})


def _loadavg() -> float:
  return os.getloadavg()[0]


def thread_cpu_s() -> dict[str, float]:
  """CPU seconds (user + system) of this process's live threads by role: "decode" (the pipeline's
  decode pool, `embed2.data.readahead`), "assemble" (its batch prefetch thread: packing), "main", "other";
  {} where /proc is missing (not Linux)."""
  tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
  out: dict[str, float] = {}
  for t in threading.enumerate():
    try:
      with open(f"/proc/self/task/{t.native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
      continue
    role = ("decode" if t.name.startswith("embed2-decode") else
            "assemble" if t.name.startswith("embed2-batch-prefetch") else
            "main" if t is threading.main_thread() else "other")
    out[role] = out.get(role, 0.0) + (int(fields[11]) + int(fields[12])) / tick  # utime, stime
  return out


def reference_rate(threads: int, jobs_per_thread: int = 12) -> float:
  """Jobs/s of `threads` threads (at least 1), each resizing a 1024x768 image to 896x672 (Pillow's
  BICUBIC, which releases the GIL): what as many GIL-free workers get of this machine right now. The
  pipeline's scaling is compared with this one's, measured beside it, so that load from other
  processes does not pass for the pipeline's."""
  threads = max(threads, 1)
  img = Image.fromarray(np.full((768, 1024, 3), 128, np.uint8))
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    t0 = time.perf_counter()
    list(pool.map(lambda _: img.resize((896, 672), Image.Resampling.BICUBIC),
                  range(threads * jobs_per_thread)))
    return threads * jobs_per_thread / (time.perf_counter() - t0)


def run_real_sizes(args: cli.Args) -> dict[str, Any]:
  """Part 3 of the module docstring: generated real-size media through the pipeline at each worker
  count; returns the JSON-able results (the per-host need included)."""
  from configs import demo  # pylint: disable=g-import-not-at-top

  workers = [int(w) for w in args.workers.split(",") if w.strip()]
  if not workers or min(workers) < 0:
    raise ValueError(f"--workers={args.workers!r} must list worker counts >= 0, e.g. 1,2")
  wanted = [s for s in args.streams.split(",") if s] or list(REAL_STREAMS)
  unknown = sorted(set(wanted) - set(REAL_STREAMS))
  if unknown:
    raise ValueError(f"--streams names {unknown}; --real_sizes has streams {sorted(REAL_STREAMS)}")
  need = per_host_need(mfu=args.mfu)
  model_cfg = ModelConfig.from_name("small", max_length=4096, max_segments=4, media=need_media(need))
  tokenizer = Tokenizer.default()
  encoder = interleave.InputEncoder(tokenizer, model_cfg)
  task_strings = {n: t["task_string"] for n, t in demo.media_tasks(args.real_batch).items()}
  n_examples = max(256, args.real_batch * (args.batches + 2))
  rows: dict[str, dict[str, Any]] = {}
  with tempfile.TemporaryDirectory(prefix="embed2_real_sizes_") as folder:
    for stream in wanted:
      modality, shaped_like, size = REAL_STREAMS[stream]
      t0 = time.perf_counter()
      paths = write_media(stream, folder, args.media_files, args.seed, args.toy)
      gen_s = time.perf_counter() - t0
      examples = real_examples(stream, paths, n_examples, args.seed)
      spec = real_batch_spec(encoder, examples[0], task_strings[shaped_like], args.real_batch)
      task = pipeline.TaskSpec(name=stream, examples=examples, task_string=task_strings[shaped_like],
                               batch=spec)
      by_workers: dict[int, dict[str, list[float]]] = {
          w: {"examples_per_s": [], "cpu_s_per_example": [], "thread_cpu_s_per_example": [], "load": [],
              "reference_per_s": []} for w in workers}
      for _ in range(args.rounds):
        for w in workers:
          it = pipeline.build_ft_iterator([task], tokenizer=tokenizer, num_groups=1, seed=args.seed,
                                          encoder=encoder, workers=w)
          next(it)  # untimed: workers starting, first-epoch permutation
          load0, threads0 = _loadavg(), thread_cpu_s()
          cpu0, t0 = time.process_time(), time.perf_counter()
          n = sum(int(next(it)["num_examples"]) for _ in range(args.batches))
          wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
          threads = {k: v - threads0.get(k, 0.0) for k, v in thread_cpu_s().items()}
          it.close()
          r = by_workers[w]
          r["examples_per_s"].append(n / wall)
          r["cpu_s_per_example"].append(cpu / n)
          r["thread_cpu_s_per_example"].append({k: v / n for k, v in threads.items()})
          r["load"].append(round((load0 + _loadavg()) / 2, 2))
          r["reference_per_s"].append(reference_rate(w, 2 if args.toy else 12))
      rows[stream] = _real_row(stream, modality, shaped_like, size, args, paths, gen_s, spec,
                               by_workers, workers, need)
  return {"benchmark": "input_pipeline", "mode": "real_sizes", "host": common.host_info(),
          "config": {"workers": workers, "rounds": args.rounds, "batches": args.batches,
                     "real_batch": args.real_batch, "media_files": args.media_files, "seed": args.seed,
                     "toy": bool(args.toy), "model": model_cfg.to_dict()},
          "real_sizes": rows, "need": need}


def need_media(need: dict[str, Any]) -> MediaConfig:
  """The MediaConfig a `per_host_need` result assumed."""
  return MediaConfig(**need["assumptions"]["media"])


def _model_rate(workers: int, decode_ms: float, rest_ms: float, cores: int | None = None) -> float:
  """Examples/s the CPU split allows on `cores` idle cores (default: this machine's), GIL contention
  and other processes ignored: `workers` decode threads at decode_ms each per example, the batch
  assembly (rest_ms, one thread) beside them; with 0 workers one thread does both."""
  cores = cores or os.cpu_count() or 1
  if workers == 0:
    return 1e3 / (decode_ms + rest_ms)
  return 1e3 * min(workers / decode_ms, 1.0 / rest_ms if rest_ms else math.inf,
                   cores / (decode_ms + rest_ms))


def _real_row(stream, modality, shaped_like, size, args, paths, gen_s, spec, by_workers, workers,
              need) -> dict[str, Any]:
  """One real-size stream's JSON row: per worker count the medians, the scaling (the last worker count of
  --workers over the first), and against the need (at the last count's examples per CPU-second)."""
  lo, hi = workers[0], workers[-1]
  per_w = {}
  for w, r in by_workers.items():
    ex_s, cpu = statistics.median(r["examples_per_s"]), statistics.median(r["cpu_s_per_example"])
    roles = sorted({k for d in r["thread_cpu_s_per_example"] for k in d})
    per_w[str(w)] = {"examples_per_s": ex_s, "examples_per_cpu_s": 1.0 / cpu,
                     "examples_per_s_per_worker": ex_s / max(w, 1), "load": r["load"],
                     "rounds": r["examples_per_s"],
                     "thread_cpu_ms_per_example": {k: 1e3 * statistics.median(
                         d.get(k, 0.0) for d in r["thread_cpu_s_per_example"]) for k in roles}}
  scaling, reference = (statistics.median(a / b for a, b in zip(by_workers[hi][key], by_workers[lo][key]))
                        for key in ("examples_per_s", "reference_per_s"))
  per_core = per_w[str(hi)]["examples_per_cpu_s"]
  split = per_w[str(hi)]["thread_cpu_ms_per_example"]
  decode_ms = split.get("decode", 0.0)
  rest_ms = sum(v for k, v in split.items() if k != "decode")
  bound = None
  if hi > 0 and decode_ms > 0:
    bound = _model_rate(hi, decode_ms, rest_ms) / _model_rate(lo, decode_ms, rest_ms)
  vs_need = {p: {h: {"need": row[modality], "cores": row[modality] / per_core,
                     "this_machine_over_need": per_w[str(hi)]["examples_per_s"] / row[modality]}
                 for h, row in hosts.items()} for p, hosts in need["per_host"].items()}
  return {"modality": modality, "shaped_like": shaped_like,
          "source": {"size": list(size) if isinstance(size, tuple) else size, "toy": bool(args.toy),
                     "files": len(paths),
                     "mean_file_bytes": float(np.mean([os.path.getsize(p) for p in paths])),
                     "generate_s": round(gen_s, 2)},
          "batch": {"batch_size": spec.batch_size, "query_len": spec.query_len,
                    "positive_len": spec.positive_len},
          "workers": per_w, "scaling": scaling, "scaling_workers": [lo, hi], "scaling_bound": bound,
          "scaling_reference": reference,
          "examples_per_cpu_s": per_core, "vs_need": vs_need}


def real_report(result: dict[str, Any]) -> str:
  workers = [str(w) for w in result["config"]["workers"]]
  rows, cols = [], [("name", "stream")]
  cols += [(f"w{w}", f"ex/s w={w}", ".2f") for w in workers]
  cols += [("scaling", f"w={workers[-1]}/w={workers[0]}", ".2f"), ("reference", "reference", ".2f"),
           ("bound", "bound", ".2f"), ("per_cpu", "ex/CPU-s", ".2f"),
           ("decode", "decode ms/ex", ".1f"), ("assemble", "assemble ms/ex", ".1f"), ("load", "load"),
           ("need", "need 4b v5e", ".1f"), ("cores", "cores 4b v5e", ".1f")]
  for name, r in result["real_sizes"].items():
    last = r["workers"][workers[-1]]
    v = r["vs_need"]["gemma3-4b"]["TPU v5e host"]
    rows.append({"name": name, **{f"w{w}": r["workers"][w]["examples_per_s"] for w in workers},
                 "scaling": r["scaling"], "reference": r["scaling_reference"], "bound": r["scaling_bound"],
                 "per_cpu": r["examples_per_cpu_s"],
                 "decode": last["thread_cpu_ms_per_example"].get("decode"),
                 "assemble": last["thread_cpu_ms_per_example"].get("assemble"),
                 "load": "/".join(f"{x:.1f}" for w in workers for x in r["workers"][w]["load"]),
                 "need": v["need"], "cores": v["cores"]})
  return (need_report(result["need"]) + "\n\nreal sizes: examples/s at each worker count (medians of "
          f"{result['config']['rounds']} rounds); reference: the same threads' scaling on a GIL-free resize "
          "beside it; bound: what the CPU split allows on idle cores; CPU ms per example of the decode "
          f"threads and of the batch assembly at w={workers[-1]}; cores = a gemma3-4b TPU v5e host's need / "
          "examples per CPU-second\n"
          + common.format_table(rows, cols))


def streams(config, data, tokenizer, num_groups: int, wanted: Sequence[str] = ()):
  """name -> (iterator factory, loss config): the config's first PFT stage as the trainer builds it,
  and every task of `config.tasks` as a fine-tuning stream of its own; `wanted` names a subset."""
  from embed2.train import trainer  # pylint: disable=g-import-not-at-top
  out = {}
  for si, stage in enumerate(config.stages):
    if stage.mode == "pft":
      out[stage.name] = (
          lambda stage=stage, si=si: trainer.stage_iterator(config, stage, data, tokenizer,
                                                            num_groups, si),
          trainer.loss_config(config))
      break
  for name, tc in config.tasks.items():
    if name not in data or not len(data[name].train):  # pylint: disable=g-explicit-length-test
      continue

    def build(name=name, tc=tc):
      task = pipeline.TaskSpec(name=name, examples=data[name].train, rate=1.0,
                               task_string=tc.get("task_string", ""),
                               p_drop=float(tc.get("p_drop", 0.0)),
                               batch=trainer.batch_spec(tc, f"config.tasks.{name}"))
      return pipeline.build_ft_iterator([task], tokenizer=tokenizer, num_groups=num_groups,
                                        seed=int(config.seed),
                                        encoder=trainer.input_encoder(config, tokenizer))

    out[name] = (build, trainer.loss_config(config, tc))
  if wanted:
    known = set(config.tasks) | {s.name for s in config.stages if s.mode == "pft"}
    unknown = sorted(set(wanted) - known)
    if unknown:
      raise ValueError(f"--streams names {unknown}; this config has streams {sorted(known)}")
    out = {k: v for k, v in out.items() if k in wanted}
  return out


def only_tasks(config, wanted: Sequence[str]):
  """`config` with only the tasks the `wanted` streams read (a task's own stream, the PFT stream's
  mixture), so that no other task is built (the stdlib tasks take seconds); all of them when none is
  wanted."""
  if not wanted:
    return config
  names = [n for n in config.tasks if n in wanted]
  for stage in config.stages:
    if stage.mode == "pft" and stage.name in wanted:
      names += [n for n in stage.tasks if n not in names]
  sub = config.copy_and_resolve_references()
  with sub.unlocked():
    sub.tasks = {n: config.tasks[n].to_dict() for n in names}
  return sub


def run(args: cli.Args) -> dict[str, Any]:
  """Measures every stream's pipeline and train step (or, with --real_sizes, `run_real_sizes`);
  returns the JSON-able results, the per-host need included."""
  if args.real_sizes:
    return run_real_sizes(args)
  from embed2 import sharding  # pylint: disable=g-import-not-at-top
  from embed2.main import resolve_tasks  # pylint: disable=g-import-not-at-top
  from embed2.train import step as step_lib  # pylint: disable=g-import-not-at-top
  from embed2.train import trainer  # pylint: disable=g-import-not-at-top

  config = load_config(args.config, args.config_arg)
  mesh = sharding.make_mesh(dict(config.mesh))
  rules = tuple(tuple(r) for r in config.sharding_rules)
  num_groups = int(config.get("data_groups", 0)) or sharding.num_batch_shards(mesh)
  tokenizer = (Tokenizer.from_file(config.tokenizer) if config.get("tokenizer")
               else Tokenizer.default())
  wanted = [s for s in args.streams.split(",") if s]
  t0 = time.perf_counter()
  data = resolve_tasks(only_tasks(config, wanted))
  load_s = time.perf_counter() - t0
  built = streams(config, data, tokenizer, num_groups, wanted)

  rows: dict[str, dict[str, Any]] = {}
  first_batches = {}
  for name, (factory, _) in built.items():
    t0 = time.perf_counter()
    it = factory()
    build_s = time.perf_counter() - t0
    first_batches[name] = next(it)  # untimed: first-epoch permutation, lazy set-up
    times, examples, tokens = [], 0, 0
    t_all = time.perf_counter()
    for _ in range(args.batches):
      t0 = time.perf_counter()
      b = next(it)
      times.append(time.perf_counter() - t0)
      examples += int(b["num_examples"])
      tokens += int(b["num_tokens"])
    seconds = time.perf_counter() - t_all
    rows[name] = {"build_s": round(build_s, 3), "batch_examples": int(first_batches[name]["num_examples"]),
                  "pipeline_batch_s": common.summary(times),
                  "pipeline_examples_per_s": examples / seconds,
                  "pipeline_tokens_per_s": tokens / seconds}

  trainee = trainer.build_trainee(config, mesh, rules)
  graphdef, state, state_shardings = ts.make_state(trainee, mesh)
  del trainee
  steps = step_lib.StepFunctions(graphdef, state_shardings, mesh, num_groups)
  fns = {}
  for name, (_, loss_cfg) in built.items():
    batch = step_lib.device_batch(first_batches[name], mesh)
    t0 = time.perf_counter()
    compiled = steps.get(name, loss_cfg, state, batch)
    rows[name]["step_compile_s"] = round(time.perf_counter() - t0, 2)
    fns[name] = (compiled, batch)
  thread = ts.StateThread(state)
  del state
  times = common.interleaved({n: thread.runner(c, b) for n, (c, b) in fns.items()},
                             repeats=args.steps, warmup=1)
  for name, r in rows.items():
    step_s = common.summary(times[name])
    r["step_s"] = step_s
    r["step_examples_per_s"] = r["batch_examples"] / step_s["median_s"]
    r["ratio"] = r["pipeline_examples_per_s"] / r["step_examples_per_s"]
    r["modality"] = _modality(data[name].train) if name in data else "mixed"
  by_modality = {}
  for name, r in rows.items():
    by_modality.setdefault(r["modality"], []).append(name)
  return {
      "benchmark": "input_pipeline", "mode": "train_step", "host": common.host_info(),
      "need": per_host_need(mfu=args.mfu),
      "config": {"config": args.config, "config_arg": args.config_arg, "batches": args.batches,
                 "steps": args.steps, "num_groups": num_groups, "model": config.model.to_dict()},
      "task_load_s": round(load_s, 2),
      "per_host": "one process: the whole global batch is this host's",
      "streams": rows,
      "modalities": {m: ({"min_ratio": min(rows[n]["ratio"] for n in by_modality[m]),
                          "streams": sorted(by_modality[m])} if m in by_modality else NO_STREAM)
                     for m in MODALITIES},
  }


def _modality(examples) -> str:
  """What a task's first example holds besides text ("text" when nothing)."""
  ex = examples[0]
  found = segments.modalities_of(ex["query"]) | segments.modalities_of(ex["positive"])
  media = [m for m in MODALITIES[1:] if m in found]
  return media[-1] if media else "text"  # video over audio over image (a video has frames)


COLUMNS = (("name", "stream"), ("modality", "modality"), ("batch_examples", "B"),
           ("pipeline_examples_per_s", "pipeline ex/s", ".1f"),
           ("pipeline_tokens_per_s", "pipeline tok/s", ".0f"),
           ("step_examples_per_s", "step ex/s", ".1f"), ("ratio", "pipeline/step", ".2f"),
           ("build_s", "build s", ".2f"), ("step_compile_s", "compile s", ".1f"))


def report(result: dict[str, Any]) -> str:
  if result["mode"] == "real_sizes":
    return real_report(result)
  rows = [dict(v, name=k) for k, v in result["streams"].items()]
  rows += [{"name": "-", "modality": m, "ratio": result["modalities"][m]}
           for m in MODALITIES if not isinstance(result["modalities"][m], dict)]
  host = result["host"]
  mins = ", ".join(f"{m} {v['min_ratio']:.2f}x" for m, v in result["modalities"].items()
                   if isinstance(v, dict))
  return (common.format_table(rows, COLUMNS) +
          f"\n{host['cpus']} CPUs, {host['num_devices']} {host['device_kind']} device(s), jax "
          f"{host['jax']}; lowest pipeline/step ratio per modality: {mins}\n\n"
          + need_report(result["need"]))


def main(argv: Sequence[str]) -> dict[str, Any]:
  """The command line after the program name -> the JSON document written to --out."""
  return common.run_and_write(_args(argv), run, report)


if __name__ == "__main__":
  cli.run(main, FLAGS)
