"""Size presets: instantiated abstractly (no memory), counted against the published Gemma 3 counts."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

from embed2 import checkpoint as ckpt_lib
from embed2.model import PRESETS, EmbeddingModel, ModelConfig
from embed2.model.presets import MediaConfig

# Published parameter counts (Hugging Face model cards / safetensors metadata of google/gemma-3-*,
# google/embeddinggemma-300m). gemma3-4b: the language model only (the SigLIP tower is separate).
PUBLISHED = {
    "gemma3-270m": 268_098_176,
    "gemma3-1b": 999_885_952,
    "gemma3-4b": 3_880_263_168,
    "embeddinggemma-300m": 307_581_696,
}


def abstract_count(cfg):
  model = nnx.eval_shape(lambda: EmbeddingModel(cfg, rngs=nnx.Rngs(0)))
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing was allocated
  return sum(int(np.prod(x.shape)) for x in leaves)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_instantiates_abstractly(name):
  cfg = ModelConfig.from_name(name)
  n = abstract_count(cfg)
  assert n > 0
  if name in PUBLISHED:
    assert abs(n - PUBLISHED[name]) / PUBLISHED[name] < 0.01, (name, n, PUBLISHED[name])


def test_overrides_apply():
  cfg = ModelConfig.from_name("gemma3-1b", num_layers=2)
  assert cfg.num_layers == 2 and cfg.model_dim == 1152
  assert [cfg.is_global_layer(i) for i in range(12)] == [False] * 5 + [True] + [False] * 5 + [True]


# The old (flat) layout: a checkpoint's meta model_config from before MediaConfig, as it was saved.
FLAT_META = {
    "name": "small", "vocab_size": 8192, "model_dim": 128, "num_layers": 2, "num_heads": 4,
    "num_kv_heads": 1, "head_dim": 32, "mlp_dim": 384, "sliding_window": 64, "global_every": 2,
    "rope_local_base": 10000.0, "rope_global_base": 1000000.0, "rope_global_scale": 1.0,
    "query_pre_attn_scalar": None, "rms_eps": 1e-06, "max_length": 256, "head_dims": [128],
    "mrl_dims": [32, 64, 128], "causal": False, "attention_impl": "xla", "remat": "none",
    "dtype": "float32", "max_segments": 8, "image_frontend": "patch", "image_size": 32, "patch_size": 8,
    "image_tokens": 16, "image_resize": "pad", "max_image_pixels": 40000000, "vit_width": 128,
    "vit_depth": 2, "vit_heads": 4, "vit_mlp_dim": 512, "audio_frontend": "conv", "sample_rate": 8000,
    "n_mels": 32, "n_fft": 256, "hop_length": 80, "audio_chunk_frames": 100, "max_audio_chunks": 2,
    "audio_conv_dim": 128, "video_fps": 2.0, "video_max_frames": 4}


def test_from_dict_reads_the_flat_layout_of_older_checkpoints():
  cfg = ModelConfig.from_dict(FLAT_META)
  want = MediaConfig(image_frontend="patch", image_size=32, patch_size=8, image_tokens=16,
                     audio_frontend="conv", sample_rate=8000, n_mels=32, n_fft=256, hop_length=80,
                     audio_chunk_frames=100, max_audio_chunks=2, audio_conv_dim=128, video_fps=2.0,
                     video_max_frames=4)
  assert cfg.media == want and cfg.model_dim == 128 and cfg.mrl_dims == (32, 64, 128)
  # Written back, it is nested, and reads the same again (through JSON, as a meta is stored).
  nested = json.loads(json.dumps(cfg.to_dict()))
  assert nested["media"]["image_size"] == 32 and "image_size" not in nested
  assert ModelConfig.from_dict(nested) == cfg
  with pytest.raises(ValueError, match="config.model.image_size and config.model.media.image_size"):
    ModelConfig.from_dict({**FLAT_META, "media": {"image_size": 64}})
  with pytest.raises(ValueError, match=r"unknown config.model.media fields \['image_sise'\]"):
    ModelConfig.from_dict({"preset": "tiny", "media": {"image_sise": 64}})


def test_architecture_leaves_out_exactly_the_parameter_free_fields():
  """The split is the dataclasses' own: fields made with presets.parameter_free may change across a
  checkpoint, every other one (nested media fields included, as dotted names) may not."""
  cfg = ModelConfig.from_dict(FLAT_META)
  arch = ckpt_lib.architecture(cfg)
  free = {"name", "max_length", "mrl_dims", "causal", "attention_impl", "remat", "dtype", "max_segments",
          "media.image_resize", "media.max_image_pixels", "media.max_audio_chunks", "media.video_fps",
          "media.video_max_frames"}
  every = {f.name for f in dataclasses.fields(ModelConfig) if f.name != "media"}
  every |= {f"media.{f.name}" for f in dataclasses.fields(MediaConfig)}
  assert set(arch) == every - free
  assert arch["media.image_size"] == 32 and arch["media.audio_frontend"] == "conv"
  for field, value in (("dtype", "bfloat16"), ("max_length", 512), ("mrl_dims", (64,))):
    assert ckpt_lib.architecture(cfg.replace(**{field: value})) == arch, field
  for field, value in (("image_resize", "crop"), ("max_image_pixels", 10), ("max_audio_chunks", 9),
                       ("video_fps", 0.5), ("video_max_frames", 2)):
    assert ckpt_lib.architecture(cfg.replace(media=cfg.media.replace(**{field: value}))) == arch, field
  for field, value in (("image_size", 64), ("patch_size", 4), ("n_mels", 16), ("sample_rate", 16000),
                       ("image_frontend", "vit"), ("audio_conv_dim", 64)):
    changed = ckpt_lib.architecture(cfg.replace(media=cfg.media.replace(**{field: value})))
    assert changed[f"media.{field}"] == value and changed != arch, field
  assert ckpt_lib.architecture(cfg.replace(mlp_dim=256)) != arch
