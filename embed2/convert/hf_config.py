"""Hugging Face Gemma 3 / BERT `config.json` <-> embed2 `ModelConfig` / `VisionConfig`.

Sliding windows. transformers' bidirectional Gemma 3 (`use_bidirectional_attention`, EmbeddingGemma)
halves the configured window: token i sees j when |i - j| <= sliding_window // 2 (see
`Gemma3TextConfig.__post_init__` and `_bidirectional_window_overlay`), so EmbeddingGemma's
sliding_window=512 is our sliding_window=257 (|i - j| < 257). A causal checkpoint's window
(0 <= i - j < sliding_window) carries over unchanged. The export writes the inverse.

What cannot be represented is refused before anything is written (`UnsupportedArchitecture`): RoPE
types other than default (and linear scaling on global layers), attention logit soft-capping, biased
attention, activations other than gelu_pytorch_tanh, layer patterns other than "every k-th layer
global"; for BERT (`model_type` "bert", config.model.arch="bert"): position embeddings other than
"absolute", activations other than exact "gelu", decoders and cross-attention (and, reading a
sentence-transformers folder, pooling other than mean over all tokens, Dense
layers with a bias or an activation).
"""

from __future__ import annotations

from typing import Any, Sequence

from embed2 import checkpoint as ckpt_lib
from embed2.model import ModelConfig
from embed2.model.presets import PRESETS
from embed2.model.vision import VisionConfig

# transformers' Gemma3TextConfig defaults: published configs leave these out (gemma-3-4b's text_config
# lists only a handful of fields), so the converter must fill them in the same way.
_TEXT_DEFAULTS: dict[str, Any] = dict(
    vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh",
    max_position_embeddings=131_072, rms_norm_eps=1e-6, attention_bias=False, query_pre_attn_scalar=256,
    sliding_window=4096, sliding_window_pattern=6, attn_logit_softcapping=None,
    use_bidirectional_attention=False, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
    rope_scaling=None)
# transformers' SiglipVisionConfig defaults, for the same reason.
_VISION_DEFAULTS: dict[str, Any] = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, num_channels=3,
    image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
    vision_use_head=True, model_type="siglip_vision_model")


class UnsupportedArchitecture(ValueError):
  """The checkpoint uses something embed2's modules cannot represent."""

  def __init__(self, msg: str):
    super().__init__(f"unsupported architecture: {msg}")


def _int(x) -> int | float:
  return int(x) if float(x).is_integer() else float(x)


def _text_config(hf_config: dict[str, Any]) -> dict[str, Any]:
  model_type = hf_config.get("model_type")
  if model_type == "gemma3":
    text = dict(hf_config.get("text_config") or {})
    text.setdefault("model_type", "gemma3_text")
  elif model_type == "gemma3_text":
    text = dict(hf_config)
  else:
    raise UnsupportedArchitecture(
        f"model_type={model_type!r} (architectures {hf_config.get('architectures')}); embed2.convert reads "
        "Gemma 3 checkpoints: model_type 'gemma3_text' (Gemma3TextModel, Gemma3ForCausalLM, EmbeddingGemma) "
        "or 'gemma3' (Gemma3ForConditionalGeneration), and BERT encoders: model_type 'bert' (BertModel, "
        "e.g. sentence-transformers/all-MiniLM-L6-v2)")
  if text.get("model_type", "gemma3_text") != "gemma3_text":
    raise UnsupportedArchitecture(f"text_config.model_type={text.get('model_type')!r}; expected 'gemma3_text'")
  c = dict(_TEXT_DEFAULTS)
  c.update(text)
  return c


def _rope(c: dict[str, Any]) -> tuple[float, float, float]:
  """(local base, global base, global linear scale) from either rope config format."""
  params = c.get("rope_parameters")
  if params and ("sliding_attention" in params or "full_attention" in params):
    local = dict(params.get("sliding_attention") or {})
    full = dict(params.get("full_attention") or {})
    local.setdefault("rope_theta", c.get("rope_local_base_freq"))
    full.setdefault("rope_theta", c.get("rope_theta"))
  else:  # legacy keys (transformers 4.x configs, the published Gemma 3 ones among them)
    full = {"rope_type": "default", "rope_theta": c["rope_theta"]}
    scaling = c.get("rope_scaling") or (params if params else None)
    if scaling:
      full.update(scaling)
    local = {"rope_type": "default", "rope_theta": c["rope_local_base_freq"]}
  scales = {}
  for which, p in (("sliding", local), ("full", full)):
    rtype = p.get("rope_type", p.get("type", "default"))
    if rtype not in ("default", "linear"):
      raise UnsupportedArchitecture(
          f"{which}-attention layers use rope_type={rtype!r}; embed2's Gemma 3 has default RoPE, with linear "
          "scaling on global layers only")
    if float(p.get("partial_rotary_factor", 1.0)) != 1.0:
      raise UnsupportedArchitecture(f"{which}-attention partial_rotary_factor={p['partial_rotary_factor']}; "
                                    "embed2 rotates the whole head_dim")
    scales[which] = float(p.get("factor", 1.0)) if rtype == "linear" else 1.0
  if scales["sliding"] != 1.0:
    raise UnsupportedArchitecture(f"sliding-window layers use linear RoPE scaling factor {scales['sliding']}; "
                                  "embed2 scales RoPE on global layers only")
  return float(local["rope_theta"]), float(full["rope_theta"]), scales["full"]


def _global_every(c: dict[str, Any], n: int) -> int:
  types = c.get("layer_types")
  if types is None:
    pattern = int(c.get("sliding_window_pattern", c.get("_sliding_window_pattern", 6)))
    types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
  types = list(types)
  if len(types) != n:
    raise ValueError(f"config.json layer_types has {len(types)} entries but num_hidden_layers={n}")
  unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
  if unknown:
    raise UnsupportedArchitecture(f"layer_types {unknown}; embed2 has 'sliding_attention' and 'full_attention'")
  full = [i for i, t in enumerate(types) if t == "full_attention"]
  every = full[0] + 1 if full else n + 1
  if types != ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n)]:
    raise UnsupportedArchitecture(
        f"layer_types {types} is not 'every k-th layer global'; embed2 makes block i global when "
        "(i + 1) % config.model.global_every == 0")
  return every


def model_config_from_hf(hf_config: dict[str, Any], *, head_dims: Sequence[int] = ()) -> ModelConfig:
  """The embed2 ModelConfig of a Gemma 3 text model from its `config.json`.

  Args:
    hf_config: a `gemma3_text` config (Gemma3TextModel / Gemma3ForCausalLM / EmbeddingGemma) or a
      `gemma3` one (Gemma3ForConditionalGeneration: its text_config is read). Missing fields take
      transformers' Gemma3TextConfig defaults, as transformers does.
    head_dims: output sizes of the dense head (sentence-transformers Dense layers), in order.

  Returns:
    a ModelConfig whose `causal` is False for `use_bidirectional_attention` checkpoints; named after
    the preset with the same architecture when there is one (and taking that preset's mrl_dims).

  Raises:
    UnsupportedArchitecture: something the model cannot represent (the message says what).
  """
  if hf_config.get("model_type") == "bert":
    return _named_by_preset(_bert_config(hf_config, head_dims))
  c = _text_config(hf_config)
  act = c.get("hidden_activation") or c.get("hidden_act")
  if act != "gelu_pytorch_tanh":
    raise UnsupportedArchitecture(f"hidden_activation={act!r}; embed2's MLP is GeGLU with gelu_pytorch_tanh")
  if c.get("attention_bias"):
    raise UnsupportedArchitecture("attention_bias=true; embed2's attention projections have no bias")
  if c.get("attn_logit_softcapping") is not None:
    raise UnsupportedArchitecture(f"attn_logit_softcapping={c['attn_logit_softcapping']}; embed2's "
                                  "attention has no logit soft-capping (Gemma 3 has none)")
  if c.get("is_causal") is False:
    raise UnsupportedArchitecture("is_causal=false; embed2 reads bidirectional Gemma 3 checkpoints through "
                                  "use_bidirectional_attention (as EmbeddingGemma's config.json has it)")
  n = int(c["num_hidden_layers"])
  d, h = int(c["hidden_size"]), int(c["num_attention_heads"])
  hd = int(c["head_dim"]) if c.get("head_dim") else d // h
  bidirectional = bool(c.get("use_bidirectional_attention"))
  every = _global_every(c, n)
  max_length = int(c["max_position_embeddings"])
  sw = c.get("sliding_window")
  if sw is None:
    if every != 1:
      raise ValueError("config.json has sliding_attention layers but sliding_window=null")
    window = max_length
  else:
    window = int(sw) // 2 + 1 if bidirectional else int(sw)  # see the module docstring
  local_base, global_base, global_scale = _rope(c)
  qpas = float(c["query_pre_attn_scalar"])
  cfg = ModelConfig(
      name="hf-gemma3", vocab_size=int(c["vocab_size"]), model_dim=d, num_layers=n, num_heads=h,
      num_kv_heads=int(c["num_key_value_heads"]), head_dim=hd, mlp_dim=int(c["intermediate_size"]),
      sliding_window=window, global_every=every, rope_local_base=local_base, rope_global_base=global_base,
      rope_global_scale=global_scale, query_pre_attn_scalar=None if qpas == hd else qpas,
      rms_eps=float(c["rms_norm_eps"]), max_length=max_length, head_dims=tuple(int(x) for x in head_dims),
      causal=not bidirectional)
  return _named_by_preset(cfg)


def _named_by_preset(cfg: ModelConfig) -> ModelConfig:
  """`cfg` named after the preset with the same architecture (taking its mrl_dims), if there is one."""
  arch = ckpt_lib.architecture(cfg)
  for name in PRESETS:
    preset = ModelConfig.from_name(name)
    if ckpt_lib.architecture(preset) == arch:
      return cfg.replace(name=name, mrl_dims=preset.mrl_dims)
  return cfg


# transformers' BertConfig defaults, for fields a config.json leaves out.
_BERT_DEFAULTS: dict[str, Any] = dict(
    vocab_size=30_522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    hidden_act="gelu", max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12,
    position_embedding_type="absolute", is_decoder=False, add_cross_attention=False)


def _bert_config(hf_config: dict[str, Any], head_dims: Sequence[int]) -> ModelConfig:
  """The ModelConfig (arch="bert") of a BertModel `config.json`; refuses what model/bert.py lacks."""
  c = dict(_BERT_DEFAULTS)
  c.update(hf_config)
  if c["hidden_act"] != "gelu":
    raise UnsupportedArchitecture(f"BERT hidden_act={c['hidden_act']!r}; embed2's BERT MLP uses the exact "
                                  "(erf) 'gelu'")
  if c["position_embedding_type"] != "absolute":
    raise UnsupportedArchitecture(f"BERT position_embedding_type={c['position_embedding_type']!r}; embed2's "
                                  "BERT has learned absolute positions")
  if c["is_decoder"] or c["add_cross_attention"]:
    raise UnsupportedArchitecture("BERT is_decoder / add_cross_attention; embed2's BERT is an encoder with "
                                  "bidirectional self-attention only")
  n_pos = int(c["max_position_embeddings"])
  return ModelConfig(
      name="hf-bert", arch="bert", vocab_size=int(c["vocab_size"]), model_dim=int(c["hidden_size"]),
      num_layers=int(c["num_hidden_layers"]), num_heads=int(c["num_attention_heads"]),
      num_kv_heads=int(c["num_attention_heads"]), mlp_dim=int(c["intermediate_size"]), global_every=1,
      max_positions=n_pos, type_vocab_size=int(c["type_vocab_size"]),
      layer_norm_eps=float(c["layer_norm_eps"]), max_length=n_pos, head_dims=tuple(int(x) for x in head_dims))


def _hf_bert_config(cfg: ModelConfig) -> dict[str, Any]:
  """The `config.json` of a transformers BertModel equal to `cfg`'s encoder (arch="bert")."""
  return {
      "architectures": ["BertModel"], "model_type": "bert", "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.model_dim, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.mlp_dim, "hidden_act": "gelu",
      "max_position_embeddings": cfg.max_positions, "type_vocab_size": cfg.type_vocab_size,
      "layer_norm_eps": cfg.layer_norm_eps, "position_embedding_type": "absolute",
      "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "initializer_range": 0.02,
      "pad_token_id": 0, "dtype": "float32",
  }


def hf_config_from_model_config(cfg: ModelConfig) -> dict[str, Any]:
  """The `config.json` of a transformers Gemma3TextModel (a BertModel for arch="bert") equal to `cfg`'s
  transformer (the inverse of `model_config_from_hf`; legacy rope keys, which transformers 4.56+ and 5.x
  both read)."""
  if cfg.arch == "bert":
    return _hf_bert_config(cfg)
  hd = cfg.resolved_head_dim
  if cfg.causal:
    window = cfg.sliding_window
  else:  # transformers halves it back: (2 (w - 1)) // 2 + 1 == w
    window = 2 * (cfg.sliding_window - 1)
  return {
      "architectures": ["Gemma3TextModel"], "model_type": "gemma3_text",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.model_dim, "intermediate_size": cfg.mlp_dim,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads, "head_dim": hd, "hidden_activation": "gelu_pytorch_tanh",
      "max_position_embeddings": cfg.max_length, "rms_norm_eps": cfg.rms_eps,
      "query_pre_attn_scalar": _int(cfg.query_pre_attn_scalar or hd), "sliding_window": window,
      "layer_types": ["full_attention" if cfg.is_global_layer(i) else "sliding_attention"
                      for i in range(cfg.num_layers)],
      "rope_theta": cfg.rope_global_base, "rope_local_base_freq": cfg.rope_local_base,
      "rope_scaling": (None if cfg.rope_global_scale == 1.0 else
                       {"rope_type": "linear", "factor": cfg.rope_global_scale}),
      "use_bidirectional_attention": not cfg.causal, "attention_bias": False, "attention_dropout": 0.0,
      "attn_logit_softcapping": None, "final_logit_softcapping": None, "tie_word_embeddings": True,
      "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "dtype": "float32",
  }


def vision_config_from_hf(hf_config: dict[str, Any]) -> VisionConfig:
  """The VisionConfig of a Gemma3ForConditionalGeneration `config.json` (SigLIP tower + projector)."""
  v = dict(_VISION_DEFAULTS)
  v.update(hf_config.get("vision_config") or {})
  if v.get("model_type") != "siglip_vision_model":
    raise UnsupportedArchitecture(f"vision_config.model_type={v.get('model_type')!r}; embed2's vision "
                                  "tower is SigLIP ('siglip_vision_model')")
  if v.get("hidden_act") != "gelu_pytorch_tanh":
    raise UnsupportedArchitecture(f"vision_config.hidden_act={v.get('hidden_act')!r}; embed2's SigLIP MLP "
                                  "uses gelu_pytorch_tanh")
  text = model_config_from_hf(hf_config)
  try:
    return VisionConfig(
        image_size=int(v["image_size"]), patch_size=int(v["patch_size"]), num_channels=int(v["num_channels"]),
        width=int(v["hidden_size"]), depth=int(v["num_hidden_layers"]), num_heads=int(v["num_attention_heads"]),
        mlp_dim=int(v["intermediate_size"]), layer_norm_eps=float(v["layer_norm_eps"]),
        mm_tokens_per_image=int(hf_config.get("mm_tokens_per_image", 256)), text_dim=text.model_dim)
  except ValueError as e:
    raise UnsupportedArchitecture(str(e)) from None
