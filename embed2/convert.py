"""Hugging Face Gemma 3 / EmbeddingGemma checkpoints <-> embed2 checkpoints.

Import (safetensors -> an embed2 parameters-only checkpoint that `config.init_from` and
`Embedder.from_checkpoint` load):

  python -m embed2.convert --hf_dir=/ckpt/hf/embeddinggemma-300m --out=/ckpt/embeddinggemma-300m
  python -m embed2.convert --hf_dir=/ckpt/hf/gemma-3-1b-pt --out=/ckpt/gemma3-1b
  python -m embed2.convert --hf_dir=/ckpt/hf/gemma-3-4b-pt --out=/ckpt/gemma3-4b --dtype=bfloat16 \
      --mesh=fsdp=-1 [--text_only]

Export (the text encoder of an embed2 checkpoint -> a sentence-transformers folder):

  python -m embed2.convert --to_safetensors --ckpt=WORKDIR/stages/ft --out=/ckpt/st/my-model \
      [--dtype=bfloat16] [--hf_tokenizer=DIR]

`--hf_dir` holds either
  * a transformers folder (config.json + *.safetensors, sharded or not) of Gemma3TextModel,
    Gemma3ForCausalLM (lm_head is ignored: embed2 has no LM head) or Gemma3ForConditionalGeneration
    (the language model, the SigLIP vision tower and the multimodal projector); or
  * a sentence-transformers folder (modules.json), like EmbeddingGemma: the Gemma3TextModel backbone,
    mean Pooling, bias-free Dense layers with identity activation (-> config.model.head_dims),
    Normalize. Its prompts and default_prompt_name (config_sentence_transformers.json) and the length
    it cuts inputs at (sentence_bert_config.json's max_seq_length, else the tokenizer's
    model_max_length capped at max_position_embeddings) go into the meta; `Embedder` applies them as
    sentence-transformers does (the "query" prompt to queries, "document" to documents).

The tokenizer. An import carries the source's own tokenizer, or is refused (a folder without one,
or one embed2 cannot reproduce). A tokenizer.json (what current transformers / sentence-transformers
save), and any tokenizer of a sentence-transformers folder, is loaded with transformers'
AutoTokenizer as sentence-transformers would load it; the resolved `tokenizers` file is written to
OUT/tokenizer.json and embed2's `HFTokenizer` must give AutoTokenizer's ids on probe texts and the
prompts (this needs transformers at import time; embedding needs only `tokenizers`). A transformers
folder with only a sentencepiece tokenizer.model keeps it (`SentencePieceTokenizer`: embed2's
[bos] ... [eos] framing and modality tokens, as training on it uses).

`--out` receives
  OUT/0/{params,meta}   the text model as `EmbeddingModel` parameters; meta holds model_config,
                        tokenizer (absolute path of OUT/tokenizer.json or OUT/tokenizer.model; a moved
                        OUT is found by name), tokenizer_kind, task_strings, for sentence-transformers
                        sources prompts, default_prompt_name and max_seq_length, and source (where it
                        came from, which tensors were ignored)
  OUT/vision/0/...      multimodal sources only: `embed2.model.vision.VisionEncoder` parameters and
                        meta.vision_config; load with `load_vision_params`
  OUT/tokenizer.json, tokenizer_config.json, special_tokens_map.json, tokenizer.model
                        the source's tokenizer files (those it has)

Layouts. HF Linear weights are (out, in); ours are (in, out), with heads split out:
  q_proj (H*hd, D) -> attn.q (D, H, hd)      k_proj / v_proj (K*hd, D) -> attn.k / attn.v (D, K, hd)
  o_proj (D, H*hd) -> attn.o (H, hd, D)      gate_proj / up_proj (F, D) -> (D, F)    down_proj (D, F) -> (F, D)
  Gemma3RMSNorm scales by (1 + w) as ours does: norm weights are copied unchanged.
  sentence-transformers Dense linear.weight (out, in) -> head[j] (in, out).
  SigLIP: patch conv (Wv, C, p, p) -> patch.kernel (p, p, C, Wv); q/k/v_proj (Wv, Wv) -> (Wv, h, hd)
  with biases (h, hd); out_proj -> (h, hd, Wv); fc1 / fc2 transposed; projector weight (Wv, D) as is.

Sliding windows. transformers' bidirectional Gemma 3 (`use_bidirectional_attention`, EmbeddingGemma)
halves the configured window: token i sees j when |i - j| <= sliding_window // 2 (see
`Gemma3TextConfig.__post_init__` and `_bidirectional_window_overlay`), so EmbeddingGemma's
sliding_window=512 is our sliding_window=257 (|i - j| < 257). A causal checkpoint's window
(0 <= i - j < sliding_window) carries over unchanged. The export writes the inverse.

What cannot be represented is refused before anything is written ("unsupported architecture"): RoPE
types other than default (and linear scaling on global layers), attention logit soft-capping, biased
attention, activations other than gelu_pytorch_tanh, layer patterns other than "every k-th layer
global", pooling other than mean over all tokens, Dense layers with a bias or an activation.

Memory. Tensors are memory-mapped and placed one at a time: each device's shard is cut from the mapped
file straight onto its `NamedSharding` on `--mesh` (the target shardings come from the model's logical
axes and `embed2.sharding.DEFAULT_RULES`), so the host holds about one shard beyond what the devices
hold; on accelerators the model is never whole in host memory. On a CPU-only machine the devices are
host memory: `--dtype=bfloat16` halves what the converted model takes there (a bfloat16 checkpoint
restores into float32 parameters).

Failure. Architecture, tensor names and shapes are all checked from config.json and the safetensors
headers before any output is written; a clear error names each missing, unexpected or mis-shaped tensor.
The output is built in a temporary sibling directory and renamed into place only when complete, so a
failed run leaves no partial --out behind.

The tokenizer of an export is the checkpoint's own (`tokenizer.checkpoint_tokenizer`; a checkpoint
that names none, or whose file is gone, is refused): an imported model's files as imported, a
sentencepiece one (the packaged default, Gemma's tokenizer.model) converted to an equivalent
tokenizer.json (`tokenizer.sentencepiece_to_hf`). `--hf_tokenizer=DIR` writes DIR's files instead.
Either way the written files are loaded as sentence-transformers loads them and must give the
checkpoint tokenizer's ids on probe texts and the prompts before anything is written. The export's
max_seq_length is an imported model's own, else the model's max_length; its prompts an imported
model's own, else the checkpoint's task strings (which `SentenceTransformer.encode_query(...,
prompt_name=TASK)` applies as `Embedder.embed(..., task=TASK)` does).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import jax
import ml_dtypes
import numpy as np
from absl import logging
from flax import nnx

from embed2 import sharding
from embed2.data import tokenizer as tok_lib
from embed2.model import EmbeddingModel, ModelConfig
from embed2.model.presets import PRESETS
from embed2.model.vision import VisionConfig, VisionEncoder
from embed2 import checkpoint as ckpt_lib

DTYPES = ("float32", "bfloat16")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json")
_IDENTITY_ACTIVATIONS = ("torch.nn.modules.linear.Identity", "torch.nn.Identity")

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


# ================================================================================ safetensors I/O
#
# A small reader/writer of the format (8-byte little-endian header size, a JSON header of
# {name: {dtype, shape, data_offsets}}, then the raw row-major little-endian bytes), written here
# because the `safetensors` numpy API cannot read bfloat16, the dtype Gemma ships in, and because
# memory-mapping lets a shard be cut out of a tensor without reading the rest of it.

_ST_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "F64": np.dtype(np.float64),
              "BF16": np.dtype(ml_dtypes.bfloat16)}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """Where one tensor lives: file, dtype name, shape, absolute byte range."""
  file: str
  dtype: str
  shape: tuple[int, ...]
  start: int
  end: int


def read_safetensors_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
  """Tensor name -> TensorInfo from a .safetensors file's header (reads no tensor data)."""
  path = Path(path)
  size = path.stat().st_size
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise ValueError(f"{path} is not a safetensors file (shorter than 8 bytes)")
    n = int.from_bytes(head, "little")
    if n > size - 8:
      raise ValueError(f"{path} is not a safetensors file or is truncated (header of {n} bytes, file of "
                       f"{size})")
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{path} has a corrupt safetensors header ({e})") from None
  base, out = 8 + n, {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    dtype, shape = info.get("dtype"), tuple(int(s) for s in info.get("shape", ()))
    if dtype not in _ST_DTYPES:
      raise ValueError(f"tensor {name!r} in {path} has dtype {dtype}; embed2.convert reads "
                       f"{sorted(_ST_DTYPES)} (convert the checkpoint's floats first)")
    b, e = (int(x) for x in info["data_offsets"])
    if e - b != math.prod(shape) * _ST_DTYPES[dtype].itemsize or base + e > size:
      raise ValueError(f"tensor {name!r} in {path}: data_offsets {[b, e]} do not fit its shape {shape} "
                       f"{dtype} or the file size {size} (truncated or corrupt file)")
    out[name] = TensorInfo(str(path), dtype, shape, base + b, base + e)
  return out


def load_tensor(info: TensorInfo) -> np.ndarray:
  """A read-only memory-mapped view of one tensor (nothing is read until it is indexed)."""
  dtype = _ST_DTYPES[info.dtype]
  if info.end == info.start:
    return np.zeros(info.shape, dtype)
  mm = np.memmap(info.file, dtype=np.uint8, mode="r", offset=info.start, shape=(info.end - info.start,))
  return mm.view(dtype).reshape(info.shape)


def write_safetensors(path: str | os.PathLike, specs: Sequence[tuple[str, tuple[int, ...], Any]],
                      arrays: Iterable[np.ndarray], metadata: dict[str, str] | None = None) -> None:
  """Writes tensors one at a time: `specs` (name, shape, dtype) first, then each array as it comes.

  `arrays` yields the tensors in the order of `specs` (a generator, so only one is in memory).
  """
  header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
  offset = 0
  for name, shape, dtype in specs:
    dt = np.dtype(dtype)
    nbytes = math.prod(shape) * dt.itemsize
    header[name] = {"dtype": _ST_NAMES[dt], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as the reference writer does
  with open(path, "wb") as f:
    f.write(len(blob).to_bytes(8, "little"))
    f.write(blob)
    count = 0
    for (name, shape, dtype), arr in zip(specs, arrays):
      arr = np.ascontiguousarray(arr)
      if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
        raise ValueError(f"tensor {name!r}: got {arr.shape} {arr.dtype}, declared {shape} {np.dtype(dtype)}")
      f.write(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
      count += 1
    if count != len(specs):
      raise ValueError(f"{path}: {len(specs)} tensors declared, {count} written")


def _safetensors_files(model_dir: Path) -> list[Path]:
  index = model_dir / "model.safetensors.index.json"
  if index.exists():
    weight_map = json.loads(index.read_text())["weight_map"]
    files = [model_dir / f for f in sorted(set(weight_map.values()))]
  else:
    files = sorted(model_dir.glob("*.safetensors"))
  if not files:
    bins = sorted(p.name for p in model_dir.glob("*.bin"))
    hint = (f" (found {bins}: re-save it with safe_serialization=True)" if bins else "")
    raise FileNotFoundError(f"no *.safetensors weights in {model_dir}{hint}")
  return files


def _read_headers(files: Sequence[Path], rename: Callable[[str], str] = lambda n: n) -> dict[str, TensorInfo]:
  out: dict[str, TensorInfo] = {}
  for path in files:
    for name, info in read_safetensors_header(path).items():
      key = rename(name)
      if key in out:
        raise ValueError(f"tensor {key!r} appears in both {out[key].file} and {path}")
      out[key] = info
  return out


# ================================================================================ configs


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
        "or 'gemma3' (Gemma3ForConditionalGeneration)")
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
  arch = ckpt_lib.architecture(cfg)
  for name in PRESETS:
    preset = ModelConfig.from_name(name)
    if ckpt_lib.architecture(preset) == arch:
      return cfg.replace(name=name, mrl_dims=preset.mrl_dims)
  return cfg


def hf_config_from_model_config(cfg: ModelConfig) -> dict[str, Any]:
  """The `config.json` of a transformers Gemma3TextModel equal to `cfg`'s transformer (the inverse of
  `model_config_from_hf`; legacy rope keys, which transformers 4.56+ and 5.x both read)."""
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


# ================================================================================ the weight map


@dataclasses.dataclass(frozen=True)
class Entry:
  """One tensor: its name on the Hugging Face side, its path in our params tree, the HF shape, and the
  layout maps HF -> ours and ours -> HF (reshapes / transposes, views where numpy allows)."""
  hf_name: str
  path: tuple
  hf_shape: tuple[int, ...]
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


_ID = (lambda x: x, lambda y: y)
_T = (lambda x: x.T, lambda y: y.T)


def _in_heads(n, hd, d):
  """(n*hd, d) Linear weight <-> (d, n, hd)."""
  return (lambda x: x.reshape(n, hd, d).transpose(2, 0, 1),
          lambda y: y.transpose(1, 2, 0).reshape(n * hd, d))


def _out_heads(n, hd, d):
  """(d, n*hd) Linear weight <-> (n, hd, d)."""
  return (lambda x: x.reshape(d, n, hd).transpose(1, 2, 0),
          lambda y: y.transpose(2, 0, 1).reshape(d, n * hd))


def _bias_heads(n, hd):
  return (lambda x: x.reshape(n, hd), lambda y: y.reshape(n * hd))


_CONV = (lambda x: x.transpose(2, 3, 1, 0), lambda y: y.transpose(3, 2, 0, 1))  # (W,C,p,p) <-> (p,p,C,W)


def text_entries(cfg: ModelConfig, prefix: str = "") -> list[Entry]:
  """The transformer's tensors (HF names under `prefix`, e.g. "model." for Gemma3ForCausalLM)."""
  d, h, k, hd, f, v = (cfg.model_dim, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim, cfg.mlp_dim,
                       cfg.vocab_size)
  out = [Entry(f"{prefix}embed_tokens.weight", ("transformer", "embedder", "embedding"), (v, d), *_ID),
         Entry(f"{prefix}norm.weight", ("transformer", "final_norm", "scale"), (d,), *_ID)]
  for i in range(cfg.num_layers):
    p, ours = f"{prefix}layers.{i}.", ("transformer", "blocks", i)
    out += [
        Entry(p + "input_layernorm.weight", ours + ("pre_attn_norm", "scale"), (d,), *_ID),
        Entry(p + "post_attention_layernorm.weight", ours + ("post_attn_norm", "scale"), (d,), *_ID),
        Entry(p + "pre_feedforward_layernorm.weight", ours + ("pre_ffw_norm", "scale"), (d,), *_ID),
        Entry(p + "post_feedforward_layernorm.weight", ours + ("post_ffw_norm", "scale"), (d,), *_ID),
        Entry(p + "self_attn.q_proj.weight", ours + ("attn", "q"), (h * hd, d), *_in_heads(h, hd, d)),
        Entry(p + "self_attn.k_proj.weight", ours + ("attn", "k"), (k * hd, d), *_in_heads(k, hd, d)),
        Entry(p + "self_attn.v_proj.weight", ours + ("attn", "v"), (k * hd, d), *_in_heads(k, hd, d)),
        Entry(p + "self_attn.o_proj.weight", ours + ("attn", "o"), (d, h * hd), *_out_heads(h, hd, d)),
        Entry(p + "self_attn.q_norm.weight", ours + ("attn", "q_norm", "scale"), (hd,), *_ID),
        Entry(p + "self_attn.k_norm.weight", ours + ("attn", "k_norm", "scale"), (hd,), *_ID),
        Entry(p + "mlp.gate_proj.weight", ours + ("mlp", "gate"), (f, d), *_T),
        Entry(p + "mlp.up_proj.weight", ours + ("mlp", "up"), (f, d), *_T),
        Entry(p + "mlp.down_proj.weight", ours + ("mlp", "down"), (d, f), *_T),
    ]
  return out


def head_entries(cfg: ModelConfig, dense_dirs: Sequence[str]) -> list[Entry]:
  """The dense head: one sentence-transformers Dense folder per layer, `linear.weight` (out, in)."""
  dims = (cfg.model_dim,) + tuple(cfg.head_dims)
  return [Entry(f"{folder}/linear.weight", ("head", j), (dims[j + 1], dims[j]), *_T)
          for j, folder in enumerate(dense_dirs)]


def vision_entries(cfg: VisionConfig, tower: str, projector: str) -> list[Entry]:
  """The SigLIP tower's tensors under `tower` and the projector's under `projector`."""
  w, hh, f, p, c = cfg.width, cfg.num_heads, cfg.mlp_dim, cfg.patch_size, cfg.num_channels
  hd = w // hh
  t = ("tower",)
  out = [Entry(f"{tower}embeddings.patch_embedding.weight", t + ("patch", "kernel"), (w, c, p, p), *_CONV),
         Entry(f"{tower}embeddings.patch_embedding.bias", t + ("patch", "bias"), (w,), *_ID),
         Entry(f"{tower}embeddings.position_embedding.weight", t + ("pos_embedding",), (cfg.num_patches, w), *_ID),
         Entry(f"{tower}post_layernorm.weight", t + ("post_norm", "scale"), (w,), *_ID),
         Entry(f"{tower}post_layernorm.bias", t + ("post_norm", "bias"), (w,), *_ID),
         Entry(f"{projector}mm_input_projection_weight", ("projector", "projection"), (w, cfg.text_dim), *_ID),
         Entry(f"{projector}mm_soft_emb_norm.weight", ("projector", "norm", "scale"), (w,), *_ID)]
  for i in range(cfg.depth):
    hp, ours = f"{tower}encoder.layers.{i}.", t + ("blocks", i)
    for ln, name in (("layer_norm1", "ln1"), ("layer_norm2", "ln2")):
      out += [Entry(f"{hp}{ln}.weight", ours + (name, "scale"), (w,), *_ID),
              Entry(f"{hp}{ln}.bias", ours + (name, "bias"), (w,), *_ID)]
    for proj in ("q", "k", "v"):
      out += [Entry(f"{hp}self_attn.{proj}_proj.weight", ours + ("attn", proj), (w, w), *_in_heads(hh, hd, w)),
              Entry(f"{hp}self_attn.{proj}_proj.bias", ours + ("attn", f"{proj}_bias"), (w,), *_bias_heads(hh, hd))]
    out += [Entry(f"{hp}self_attn.out_proj.weight", ours + ("attn", "o"), (w, w), *_out_heads(hh, hd, w)),
            Entry(f"{hp}self_attn.out_proj.bias", ours + ("attn", "o_bias"), (w,), *_ID),
            Entry(f"{hp}mlp.fc1.weight", ours + ("mlp", "fc1"), (f, w), *_T),
            Entry(f"{hp}mlp.fc1.bias", ours + ("mlp", "fc1_bias"), (f,), *_ID),
            Entry(f"{hp}mlp.fc2.weight", ours + ("mlp", "fc2"), (w, f), *_T),
            Entry(f"{hp}mlp.fc2.bias", ours + ("mlp", "fc2_bias"), (w,), *_ID)]
  return out


_TEXT_PREFIXES = ("model.language_model.model.", "model.language_model.", "language_model.model.",
                  "language_model.", "model.", "")
_TEXT_RE = re.compile(r"^(embed_tokens\.weight|norm\.weight|layers\.\d+\.)")
_TOWER_PREFIXES = ("model.vision_tower.vision_model.", "vision_tower.vision_model.", "model.vision_tower.",
                   "vision_tower.")
_TOWER_RE = re.compile(r"^(embeddings\.|encoder\.layers\.\d+\.|post_layernorm\.|head\.)")
_PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")
_LM_HEAD_RE = re.compile(r"^(model\.)?(language_model\.)?lm_head\.weight$")


def _best_prefix(names: Iterable[str], prefixes: Sequence[str], pattern: re.Pattern) -> str | None:
  counts = {p: 0 for p in prefixes}
  for n in names:
    for p in prefixes:
      if n.startswith(p) and pattern.match(n[len(p):]):
        counts[p] += 1
  best = max(prefixes, key=lambda p: counts[p])  # ties: the first (longest) prefix
  return best if counts[best] else None


# ================================================================================ reading a source


@dataclasses.dataclass
class Source:
  """Everything known about a Hugging Face checkpoint before a byte of it is converted."""
  hf_dir: Path
  format: str  # "transformers" | "sentence-transformers"
  hf_config: dict[str, Any]
  model_config: ModelConfig
  vision_config: VisionConfig | None
  text: list[Entry]  # transformer + dense head
  vision: list[Entry]
  tensors: dict[str, TensorInfo]
  ignored: list[str]
  tokenizer: "SourceTokenizer"
  prompts: dict[str, str]
  default_prompt_name: str | None = None
  max_seq_length: int | None = None  # sentence-transformers folders: what it truncates inputs at


@dataclasses.dataclass
class SourceTokenizer:
  """The source's tokenizer, read and checked before anything is written.

  kind "tokenizers": `json` is the tokenizer.json as transformers resolves the folder (its
  tokenizer class may rebuild parts of the file), `config` the tokenizer_config.json to write beside
  it; kind "sentencepiece": a tokenizer.model, used by `SentencePieceTokenizer` (embed2's framing and
  modality tokens). `folder`'s other tokenizer files are copied verbatim.
  """
  kind: str
  folder: Path
  json: str | None = None
  config: dict[str, Any] | None = None
  model_max_length: int | None = None

  @property
  def file_name(self) -> str:
    return "tokenizer.json" if self.kind == "tokenizers" else "tokenizer.model"


def _read_json(path: Path) -> Any:
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    raise FileNotFoundError(f"{path} is missing") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e})") from None


def _sentence_transformers_modules(hf_dir: Path) -> tuple[Path, list[str], list[int], dict[str, str]]:
  """(backbone dir, Dense folders, their out dims, prompts) of a sentence-transformers folder."""
  modules = sorted(_read_json(hf_dir / "modules.json"), key=lambda m: int(m.get("idx", 0)))
  kinds = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
  if not kinds or kinds[0] != "Transformer":
    raise UnsupportedArchitecture(f"sentence-transformers modules {kinds}; the first must be a Transformer")
  backbone = hf_dir / modules[0].get("path", "")
  dense_dirs, dims, seen_pool = [], [], False
  for m, kind in zip(modules[1:], kinds[1:]):
    folder = hf_dir / m.get("path", "")
    if kind == "Pooling":
      if seen_pool or dense_dirs:
        raise UnsupportedArchitecture(f"sentence-transformers modules {kinds}; expected Transformer, Pooling, "
                                      "Dense..., Normalize")
      _check_pooling(_read_json(folder / "config.json"), folder)
      seen_pool = True
    elif kind == "Dense":
      if not seen_pool:
        raise UnsupportedArchitecture(f"sentence-transformers modules {kinds}: a Dense before Pooling")
      cfg = _read_json(folder / "config.json")
      act = cfg.get("activation_function")
      if cfg.get("bias", True) or act not in _IDENTITY_ACTIVATIONS or cfg.get("use_residual"):
        raise UnsupportedArchitecture(
            f"{folder.name}: Dense with bias={cfg.get('bias', True)}, activation_function={act!r}, "
            f"use_residual={cfg.get('use_residual', False)}; embed2's head is bias-free linear maps "
            "(bias=false, torch.nn.modules.linear.Identity)")
      dense_dirs.append(m.get("path", ""))
      dims.append(int(cfg["out_features"]))
    elif kind == "Normalize":
      pass  # embed2 always L2-normalises
    else:
      raise UnsupportedArchitecture(f"sentence-transformers module {m.get('type')!r} ({folder.name}); embed2 "
                                    "reads Transformer, Pooling (mean), Dense (no bias, identity), Normalize")
  if not seen_pool:
    raise UnsupportedArchitecture(f"sentence-transformers modules {kinds} have no Pooling; embed2 mean-pools")
  prompts = {}
  st_cfg = hf_dir / "config_sentence_transformers.json"
  if st_cfg.exists():
    prompts = {str(k): str(v) for k, v in (_read_json(st_cfg).get("prompts") or {}).items()}
  return backbone, dense_dirs, dims, prompts


def _default_prompt_name(hf_dir: Path, prompts: dict[str, str]) -> str | None:
  st_cfg = hf_dir / "config_sentence_transformers.json"
  name = _read_json(st_cfg).get("default_prompt_name") if st_cfg.exists() else None
  if name is not None and name not in prompts:
    raise ValueError(f"{st_cfg}: default_prompt_name={name!r} is not one of its prompts {sorted(prompts)} "
                     "(sentence-transformers refuses it too)")
  return name


def _sentence_bert_max_length(model_dir: Path, cfg: ModelConfig, model_max_length: int | None) -> int:
  """The length sentence-transformers (6.x) truncates inputs at: sentence_bert_config.json's
  max_seq_length when set, else the tokenizer's model_max_length capped at max_position_embeddings;
  refuses the settings that change tokenization in ways embed2 does not reproduce."""
  path = model_dir / "sentence_bert_config.json"
  sbert = _read_json(path) if path.exists() else {}
  problems = []
  if sbert.get("do_lower_case"):
    problems.append("do_lower_case=true (inputs lowercased)")
  if sbert.get("transformer_task", "feature-extraction") != "feature-extraction":
    problems.append(f"transformer_task={sbert['transformer_task']!r}")
  if sbert.get("processing_kwargs"):
    problems.append(f"processing_kwargs={sbert['processing_kwargs']}")
  for key in ("query_length", "document_length", "query_expansion"):
    if sbert.get(key) is not None:
      problems.append(f"{key}={sbert[key]} (a per-side length)")
  if problems:
    raise UnsupportedArchitecture(f"{path}: {'; '.join(problems)}; embed2 tokenizes both sides the same "
                                  "way, cut at one max_seq_length")
  if sbert.get("max_seq_length") is not None:
    length = int(sbert["max_seq_length"])
  else:
    length = min(model_max_length or cfg.max_length, cfg.max_length)
  if length < 3:
    raise ValueError(f"{path}: max_seq_length={length} leaves no room for text")
  if length > cfg.max_length:
    logging.warning("convert: %s: max_seq_length=%d is above max_position_embeddings=%d; embed2 cuts "
                    "inputs at %d", path, length, cfg.max_length, cfg.max_length)
    length = cfg.max_length
  return length


# Texts the converter tokenizes both ways (transformers, embed2) before it writes a tokenizer.


def _probe_texts(prompts: dict[str, str]) -> list[str]:
  """The texts a tokenizer read or written here is checked on: tokenizer.PROBE_TEXTS and the prompts."""
  return list(tok_lib.PROBE_TEXTS) + [p + t for p in prompts.values() for t in ("", tok_lib.PROBE_TEXTS[0])]


def _hf_tokenizer(folder: Path, cfg: ModelConfig, prompts: dict[str, str]) -> SourceTokenizer:
  """Reads a Hugging Face tokenizer folder the way transformers (and so sentence-transformers) does,
  and checks that embed2's `HFTokenizer` gives the same ids on probe texts (prompts included)."""
  try:
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError(f"{folder} holds a Hugging Face tokenizer; embed2.convert reads it the way transformers "
                     "does, which needs transformers (pip install -e '.[parity]', or pip install "
                     f"transformers): {e}. Nothing was written.") from None
  try:
    hf = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
  except Exception as e:  # transformers raises many types for unreadable folders
    raise ValueError(f"transformers cannot load the tokenizer in {folder} ({type(e).__name__}: {e})") from None
  backend = getattr(hf, "backend_tokenizer", None)
  if backend is None:
    raise ValueError(f"the tokenizer in {folder} ({type(hf).__name__}) is not a fast (tokenizers) "
                     "tokenizer; embed2 reads tokenizer.json")
  if getattr(hf, "truncation_side", "right") != "right":
    raise UnsupportedArchitecture(f"the tokenizer in {folder} truncates on the {hf.truncation_side}; embed2 "
                                  "cuts over-long inputs at the end")
  data = json.loads(backend.to_str())
  data["truncation"] = data["padding"] = None  # set per call by transformers; embed2 cuts the text
  text = json.dumps(data, ensure_ascii=False)
  split = bool(getattr(hf, "split_special_tokens", False))
  ours = tok_lib.HFTokenizer(text, split_special_tokens=split, source=str(folder / "tokenizer.json"))
  if ours.base_vocab_size > cfg.vocab_size:
    raise ValueError(f"the tokenizer in {folder} has {ours.base_vocab_size} ids but the model's vocab_size is "
                     f"{cfg.vocab_size}; is it this model's tokenizer?")
  probes = _probe_texts(prompts)
  for t in probes:
    want = list(hf(t, verbose=False)["input_ids"])
    got = ours.encode(t, add_bos=True, add_eos=True)
    if got != want:
      raise ValueError(f"embed2 cannot reproduce the tokenizer in {folder}: {t!r:.60} is {want[:16]} in "
                       f"transformers but {got[:16]} read from its tokenizer.json. Nothing was written.")
  config_path = folder / "tokenizer_config.json"
  config = _read_json(config_path) if config_path.exists() else {}
  config["split_special_tokens"] = split
  config.pop("truncation_side", None)
  limit = getattr(hf, "model_max_length", None)
  limit = int(limit) if isinstance(limit, (int, float)) and limit < 1e9 else None
  return SourceTokenizer(kind="tokenizers", folder=folder, json=text, config=config, model_max_length=limit)


def _source_tokenizer(fmt: str, dirs: Sequence[Path], cfg: ModelConfig,
                      prompts: dict[str, str]) -> SourceTokenizer:
  """The source's own tokenizer: tokenizer.json (read as transformers reads it), or for a
  transformers folder with only a sentencepiece tokenizer.model, that model; refuses a folder with
  neither (an import must carry its tokenizer)."""
  folder = next((d for d in dirs if (d / "tokenizer.json").is_file()), None)
  spm_folder = next((d for d in dirs if (d / "tokenizer.model").is_file()), None)
  if folder is None and spm_folder is not None and fmt == "sentence-transformers":
    folder = spm_folder  # sentence-transformers tokenizes with what transformers converts it to
  if folder is not None:
    return _hf_tokenizer(folder, cfg, prompts)
  if spm_folder is not None:
    tok = tok_lib.Tokenizer.from_file(spm_folder / "tokenizer.model")
    if tok.vocab_size > cfg.vocab_size:
      raise ValueError(f"{spm_folder / 'tokenizer.model'} has {tok.vocab_size} ids (modality tokens "
                       f"appended) but the model's vocab_size is {cfg.vocab_size}")
    return SourceTokenizer(kind="sentencepiece", folder=spm_folder)
  raise FileNotFoundError(
      f"{' / '.join(str(d) for d in dirs)} holds no tokenizer (tokenizer.json, or a sentencepiece "
      "tokenizer.model); embed2 embeds a model only with its own tokenizer, so the import needs it: copy "
      "the model's tokenizer files beside its config.json. Nothing was written.")


_LEGACY_POOLING = ("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens",
                   "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens",
                   "pooling_mode_lasttoken")


def _check_pooling(cfg: dict[str, Any], folder: Path) -> None:
  if "pooling_mode" in cfg:
    mode = cfg["pooling_mode"]
    modes = [mode] if isinstance(mode, str) else list(mode)
  else:
    modes = [k for k in _LEGACY_POOLING if cfg.get(k)]
    modes = ["mean" if m == "pooling_mode_mean_tokens" else m for m in modes]
  if modes != ["mean"]:
    raise UnsupportedArchitecture(f"{folder.name}: pooling {modes}; embed2 mean-pools the token states")
  if not cfg.get("include_prompt", True):
    raise UnsupportedArchitecture(f"{folder.name}: include_prompt=false leaves the prompt out of the mean; "
                                  "embed2 pools over every token of the input, prompt included")


def read_source(hf_dir: str | os.PathLike, *, text_only: bool = False) -> Source:
  """Reads config(s) and safetensors headers and checks that every tensor has a place.

  Raises:
    UnsupportedArchitecture: see `model_config_from_hf` and the module docstring.
    ValueError: missing, unexpected or mis-shaped tensors (each named).
    FileNotFoundError: no config.json / safetensors.
  """
  hf_dir = Path(hf_dir).absolute()
  if not hf_dir.is_dir():
    raise FileNotFoundError(f"--hf_dir={hf_dir} is not a directory")
  dense_dirs, head_dims, prompts = [], [], {}
  if (hf_dir / "modules.json").exists():
    fmt = "sentence-transformers"
    model_dir, dense_dirs, head_dims, prompts = _sentence_transformers_modules(hf_dir)
  else:
    fmt, model_dir = "transformers", hf_dir
  hf_config = _read_json(model_dir / "config.json")
  cfg = model_config_from_hf(hf_config, head_dims=head_dims)
  default_prompt = _default_prompt_name(hf_dir, prompts) if fmt == "sentence-transformers" else None
  for name, prompt in prompts.items():
    tok_lib.check_text(prompt, f"{hf_dir / 'config_sentence_transformers.json'} prompt {name!r}")
  multimodal = hf_config.get("model_type") == "gemma3" and not text_only
  vcfg = vision_config_from_hf(hf_config) if multimodal else None

  tensors = _read_headers(_safetensors_files(model_dir))
  text_prefix = _best_prefix(tensors, _TEXT_PREFIXES, _TEXT_RE)
  if text_prefix is None:
    raise ValueError(f"no Gemma 3 text tensors (names like 'layers.0.self_attn.q_proj.weight') in {model_dir}; "
                     f"its first tensors are {sorted(tensors)[:5]}")
  text = text_entries(cfg, text_prefix)
  for folder in dense_dirs:
    tensors.update(_read_headers(_safetensors_files(hf_dir / folder), rename=lambda n, f=folder: f"{f}/{n}"))
  text += head_entries(cfg, dense_dirs)

  vision, ignore = [], [_LM_HEAD_RE]
  tower_prefix = _best_prefix(tensors, _TOWER_PREFIXES, _TOWER_RE)
  if vcfg is not None:
    if tower_prefix is None:
      raise ValueError(f"config.json describes a multimodal Gemma 3 but {model_dir} has no vision tower "
                       "tensors (vision_tower.*); pass --text_only to convert the language model alone")
    projector_prefix = next((p for p in _PROJECTOR_PREFIXES if any(n.startswith(p) for n in tensors)),
                            _PROJECTOR_PREFIXES[-1])
    vision = vision_entries(vcfg, tower_prefix, projector_prefix)
    if hf_config.get("vision_config", {}).get("vision_use_head", True):
      ignore.append(re.compile("^" + re.escape(tower_prefix) + r"head\."))  # SigLIP's pooling head: unused
  elif text_only:
    ignore += [re.compile("^(" + "|".join(re.escape(p) for p in _TOWER_PREFIXES + _PROJECTOR_PREFIXES) + ")")]

  expected = {e.hf_name: e for e in text + vision}
  missing = [n for n in expected if n not in tensors]
  ignored = sorted(n for n in tensors if n not in expected and any(r.match(n) for r in ignore))
  extra = sorted(n for n in tensors if n not in expected and n not in ignored)
  bad = [f"{n} has {tensors[n].shape}, config implies {e.hf_shape}" for n, e in expected.items()
         if n in tensors and tensors[n].shape != e.hf_shape]
  problems = []
  if missing:
    problems.append(f"missing tensors ({len(missing)}): {missing[:10]}")
  if extra:
    problems.append(f"unexpected tensors ({len(extra)}), which embed2's Gemma 3 has no place for: {extra[:10]}")
  if bad:
    problems.append(f"shape mismatches ({len(bad)}): {'; '.join(bad[:10])}")
  if problems:
    raise ValueError(f"checkpoint {hf_dir} does not match its config.json: " + " | ".join(problems) +
                     ". Nothing was written.")
  tok = _source_tokenizer(fmt, [model_dir] + ([hf_dir] if hf_dir != model_dir else []), cfg, prompts)
  max_seq_length = None
  if fmt == "sentence-transformers":
    limit = tok.model_max_length
    if limit is None and (tok.folder / "tokenizer_config.json").exists():
      value = _read_json(tok.folder / "tokenizer_config.json").get("model_max_length")
      limit = int(value) if isinstance(value, (int, float)) and value < 1e9 else None
    max_seq_length = _sentence_bert_max_length(model_dir, cfg, limit)
  return Source(hf_dir=hf_dir, format=fmt, hf_config=hf_config, model_config=cfg, vision_config=vcfg,
                text=text, vision=vision, tensors=tensors, ignored=ignored, tokenizer=tok, prompts=prompts,
                default_prompt_name=default_prompt, max_seq_length=max_seq_length)


# ================================================================================ placing tensors


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _set(tree, path, value):
  for k in path[:-1]:
    tree = tree[k]
  tree[path[-1]] = value


def _abstract_params(factory, mesh, rules) -> tuple[dict, dict]:
  """(ShapeDtypeStruct tree, NamedSharding tree) of a module's parameters, as pure dicts."""
  state = nnx.state(nnx.eval_shape(factory), nnx.Param)
  return nnx.to_pure_dict(state), nnx.to_pure_dict(sharding.param_shardings(state, mesh, rules))


def _place(entries: Sequence[Entry], tensors: dict[str, TensorInfo], factory, mesh, rules, dtype: str) -> dict:
  """Builds the params tree of `factory()`'s module from the source tensors, shard by shard."""
  shapes, shardings = _abstract_params(factory, mesh, rules)
  leaves = {tuple(getattr(k, "key", getattr(k, "idx", k)) for k in p)
            for p, _ in jax.tree_util.tree_leaves_with_path(shapes)}
  mapped = {e.path for e in entries}
  if leaves != mapped:  # a bug in the map, not in the checkpoint
    raise RuntimeError(f"embed2.convert's weight map and the model disagree: unmapped {sorted(leaves - mapped, key=str)}, "
                       f"unknown {sorted(mapped - leaves, key=str)}")
  np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float32)
  out = jax.tree.map(lambda x: None, shapes)
  for e in sorted(entries, key=lambda e: (tensors[e.hf_name].file, tensors[e.hf_name].start)):
    src = e.to_ours(load_tensor(tensors[e.hf_name]))
    want = _get(shapes, e.path).shape
    if src.shape != tuple(want):
      raise RuntimeError(f"{e.hf_name} maps to {src.shape} but the model's {e.path} is {want}")
    arr = jax.make_array_from_callback(tuple(want), _get(shardings, e.path),
                                       lambda idx, s=src: np.asarray(s[idx], dtype=np_dtype))
    _set(out, e.path, arr)
  return out


# ================================================================================ output directories


def _check_out(out: Path) -> None:
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise FileExistsError(f"--out={out} exists and is not empty; choose a new directory or delete it")


def _commit(tmp: Path, out: Path) -> None:
  if out.exists():
    out.rmdir()  # empty (checked by _check_out)
  os.rename(tmp, out)


def _tmp_dir(out: Path) -> Path:
  out.parent.mkdir(parents=True, exist_ok=True)
  return out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"


def _save_params(directory: Path, params: dict, meta: dict[str, Any]) -> None:
  ck = ckpt_lib.Checkpointer(directory, keep=None, async_save=False)
  ck.save(0, params=params, meta=meta, force=True)
  ck.close()


# ================================================================================ import


def convert_hf(hf_dir: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "float32",
               mesh: jax.sharding.Mesh | None = None, text_only: bool = False) -> dict[str, Any]:
  """Converts a Hugging Face Gemma 3 / EmbeddingGemma folder into an embed2 checkpoint at `out`.

  Args:
    hf_dir: a transformers or sentence-transformers folder (see the module docstring).
    out: a new (or empty) directory.
    dtype: "float32" or "bfloat16": the stored parameters' dtype.
    mesh: where the tensors are placed while converting (default: every device on the fsdp axis).
    text_only: convert the language model of a multimodal checkpoint and ignore its vision tower.

  Returns:
    the text checkpoint's meta dict.
  """
  if dtype not in DTYPES:
    raise ValueError(f"--dtype={dtype!r}; choose one of {DTYPES}")
  out = Path(out).absolute()
  _check_out(out)
  src = read_source(hf_dir, text_only=text_only)
  mesh = mesh if mesh is not None else sharding.make_mesh({"fsdp": -1})
  rules = sharding.DEFAULT_RULES
  cfg = src.model_config
  meta = {
      "step": 0, "model_config": cfg.to_dict(),
      "tokenizer": str(out / src.tokenizer.file_name), "tokenizer_kind": src.tokenizer.kind,
      "task_strings": src.prompts,
      "source": {"hf_dir": str(src.hf_dir), "format": src.format,
                 "architectures": src.hf_config.get("architectures"), "dtype": dtype,
                 "ignored_tensors": src.ignored, "vision": src.vision_config is not None},
  }
  if src.format == "sentence-transformers":  # applied by Embedder as sentence-transformers does
    meta.update(prompts=src.prompts, default_prompt_name=src.default_prompt_name,
                max_seq_length=src.max_seq_length)
  tmp = _tmp_dir(out)
  try:
    params = _place(src.text, src.tensors, lambda: EmbeddingModel(cfg, rules=rules, rngs=nnx.Rngs(0)),
                    mesh, rules, dtype)
    _save_params(tmp, params, meta)
    del params
    if src.vision_config is not None:
      vcfg = src.vision_config
      vparams = _place(src.vision, src.tensors, lambda: VisionEncoder(vcfg, rngs=nnx.Rngs(0)), mesh, rules,
                       dtype)
      _save_params(tmp / "vision", vparams, {"step": 0, "vision_config": vcfg.to_dict(),
                                             "source": meta["source"]})
      del vparams
    _write_source_tokenizer(src.tokenizer, tmp)
    _commit(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  logging.info("convert: %s (%s, %s) -> %s", src.hf_dir, src.format, cfg.name, out)
  return meta


def _write_source_tokenizer(tok: SourceTokenizer, directory: Path) -> None:
  """The source's tokenizer files into the checkpoint folder (it is self-contained): verbatim, except
  tokenizer.json / tokenizer_config.json, written as read (see SourceTokenizer)."""
  for name in TOKENIZER_FILES:
    if (tok.folder / name).is_file():
      shutil.copyfile(tok.folder / name, directory / name)
  if tok.kind == "tokenizers":
    (directory / "tokenizer.json").write_text(tok.json, encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps(tok.config, indent=2, ensure_ascii=False),
                                                     encoding="utf-8")


def load_vision_params(model: VisionEncoder, path: str | os.PathLike) -> dict[str, Any]:
  """Restores converted vision weights (OUT or OUT/vision) onto `model`, in place, on its shardings.

  Returns:
    the vision checkpoint's meta.
  """
  p = Path(path)
  if (p / "vision").is_dir():
    p = p / "vision"
  ck = ckpt_lib.Checkpointer(p, read_only=True)
  step = ck.latest_step()
  if step is None:
    raise FileNotFoundError(f"no finished vision checkpoint under {path}")
  meta = ck.read_meta(step)
  want = {k: v for k, v in meta["vision_config"].items() if k != "dtype"}
  have = {k: v for k, v in model.cfg.to_dict().items() if k != "dtype"}
  if want != have:
    diff = {k: (v, have.get(k)) for k, v in want.items() if have.get(k) != v}
    raise ValueError(f"vision checkpoint {p} has a different architecture: {diff} (checkpoint, model)")
  ckpt_lib.restore_params_into(model, ck, step)
  return meta


# ================================================================================ export


def export_sentence_transformers(ckpt: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "float32",
                                 hf_tokenizer: str | os.PathLike | None = None,
                                 mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
  """Writes the text encoder of an embed2 checkpoint as a sentence-transformers folder.

  Layout: config.json + model.safetensors (Gemma3TextModel, `use_bidirectional_attention` unless the
  model is causal), the checkpoint's own tokenizer as Hugging Face files (tokenizer.json +
  tokenizer_config.json), modules.json, sentence_bert_config.json (max_seq_length: an imported
  model's own, else the model's max_length), config_sentence_transformers.json (an imported model's
  prompts and default_prompt_name, else the task strings as prompts), 1_Pooling (mean), 2_Dense ...
  (the head, bias-free, identity), then Normalize.

  The tokenizer: an imported model's tokenizer files as imported; a sentencepiece tokenizer (the
  packaged default, Gemma's tokenizer.model) converted to a tokenizer.json that tokenizes the same
  (`tokenizer.sentencepiece_to_hf`); or the files of `hf_tokenizer` when given. Before anything is
  written, the written tokenizer is loaded the way sentence-transformers loads it (transformers'
  AutoTokenizer) and must give the checkpoint tokenizer's ids on probe texts and the prompts, or the
  export is refused.

  Args:
    ckpt: a checkpoints dir, step dir or workdir (anything `resolve_checkpoint_path` accepts).
    out: a new (or empty) directory.
    dtype: "float32" (bit-exact round trip) or "bfloat16".
    hf_tokenizer: a folder whose Hugging Face tokenizer files (TOKENIZER_FILES) are written instead
      of the checkpoint's (checked against the checkpoint's tokenizer all the same).
    mesh: where the checkpoint is restored (default: every device on the fsdp axis).

  Returns:
    {"out": path, "model_config": ..., "modules": [...]}.

  Raises:
    ValueError / FileNotFoundError: the checkpoint names no tokenizer or its tokenizer is missing,
      or the tokenizer cannot be written so that transformers tokenizes the same.
  """
  if dtype not in DTYPES:
    raise ValueError(f"--dtype={dtype!r}; choose one of {DTYPES}")
  out = Path(out).absolute()
  _check_out(out)
  directory, step = ckpt_lib.resolve_checkpoint_path(ckpt)
  reader = ckpt_lib.Checkpointer(directory, read_only=True)
  meta = reader.read_meta(step)
  if "model_config" not in meta:
    raise ValueError(f"checkpoint {directory}/{step} has no model_config in its meta")
  cfg = ModelConfig.from_dict(meta["model_config"])
  tokenizer = tok_lib.checkpoint_tokenizer(meta, directory)
  if tokenizer.base_vocab_size > cfg.vocab_size:
    raise ValueError(f"checkpoint {directory}/{step}: its tokenizer {tokenizer.source} has "
                     f"{tokenizer.base_vocab_size} ids but the model's vocab_size is {cfg.vocab_size}")
  max_seq_length = min(int(meta.get("max_seq_length") or cfg.max_length), cfg.max_length)
  if "prompts" in meta:  # an imported sentence-transformers model: its own prompts
    prompts, default_prompt = dict(meta["prompts"] or {}), meta.get("default_prompt_name")
  else:
    prompts, default_prompt = dict(meta.get("task_strings") or {}), None
    clash = sorted({"query", "document"} & set(prompts))
    if clash:
      logging.warning("export: task strings named %s become prompts that sentence-transformers' "
                      "encode_query / encode_document apply by default; embed2 applies a task string only "
                      "when asked (task=...)", clash)
  tok_files = _export_tokenizer_files(tokenizer, hf_tokenizer, max_seq_length)
  mesh = mesh if mesh is not None else sharding.make_mesh({"fsdp": -1})
  rules = sharding.DEFAULT_RULES
  shapes, shardings = _abstract_params(lambda: EmbeddingModel(cfg, rules=rules, rngs=nnx.Rngs(0)), mesh, rules)
  target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
  params = reader.restore(step, params=target)["params"]

  np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float32)
  dense_dirs = [f"{j + 2}_Dense" for j in range(len(cfg.head_dims))]

  def write(path, entries, rename=lambda n: n):
    specs = [(rename(e.hf_name), e.hf_shape, np_dtype) for e in entries]
    # One tensor at a time: gathered from its shards, laid out as HF, cast, written, dropped.
    arrays = (e.to_hf(np.asarray(jax.device_get(_get(params, e.path)))).astype(np_dtype) for e in entries)
    write_safetensors(path, specs, arrays)

  modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
             {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
  tmp = _tmp_dir(out)
  try:
    tmp.mkdir()
    hf_cfg = hf_config_from_model_config(cfg)
    hf_cfg["dtype"] = dtype
    (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    for name, content in tok_files.items():
      (tmp / name).write_bytes(content)
    _check_exported_tokenizer(tmp, tokenizer, prompts)  # before the weights: a refusal costs little
    write(tmp / "model.safetensors", text_entries(cfg))
    (tmp / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length,
                                                               "do_lower_case": False}, indent=2))
    (tmp / "1_Pooling").mkdir()
    pooling = {k: k == "pooling_mode_mean_tokens" for k in _LEGACY_POOLING}
    (tmp / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": cfg.model_dim, **pooling, "include_prompt": True}, indent=2))
    dims = (cfg.model_dim,) + tuple(cfg.head_dims)
    for j, (folder, entry) in enumerate(zip(dense_dirs, head_entries(cfg, dense_dirs))):
      (tmp / folder).mkdir()
      (tmp / folder / "config.json").write_text(json.dumps(
          {"in_features": dims[j], "out_features": dims[j + 1], "bias": False,
           "activation_function": "torch.nn.modules.linear.Identity"}, indent=2))
      write(tmp / folder / "model.safetensors", [entry], rename=lambda n: n.split("/", 1)[1])
      modules.append({"idx": j + 2, "name": str(j + 2), "path": folder,
                      "type": "sentence_transformers.models.Dense"})
    norm_idx = len(modules)
    (tmp / f"{norm_idx}_Normalize").mkdir()
    modules.append({"idx": norm_idx, "name": str(norm_idx), "path": f"{norm_idx}_Normalize",
                    "type": "sentence_transformers.models.Normalize"})
    (tmp / "modules.json").write_text(json.dumps(modules, indent=2))
    (tmp / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": prompts, "default_prompt_name": default_prompt,
         "similarity_fn_name": "cosine", "model_type": "SentenceTransformer"}, indent=2))
    _commit(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return {"out": str(out), "model_config": cfg.to_dict(), "modules": [m["type"] for m in modules]}


def _export_tokenizer_files(tokenizer: tok_lib.Tokenizer, hf_tokenizer: str | os.PathLike | None,
                            max_seq_length: int) -> dict[str, bytes]:
  """File name -> content of the tokenizer an export writes (see export_sentence_transformers)."""
  if hf_tokenizer:
    folder = Path(hf_tokenizer)
    files = {f: (folder / f).read_bytes() for f in TOKENIZER_FILES if (folder / f).is_file()}
    if not files:
      raise FileNotFoundError(f"--hf_tokenizer={hf_tokenizer} has none of {TOKENIZER_FILES}")
    return files
  if isinstance(tokenizer, tok_lib.HFTokenizer):
    folder = Path(tokenizer.source).parent
    files = {f: (folder / f).read_bytes() for f in TOKENIZER_FILES
             if f != "tokenizer.model" and (folder / f).is_file()}
    config = json.loads(files["tokenizer_config.json"]) if "tokenizer_config.json" in files else {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "pad_token": "<pad>" if tokenizer.backend.token_to_id("<pad>") is not None else None}
    config["split_special_tokens"] = tokenizer.split_special_tokens
    config["model_max_length"] = max_seq_length
    files["tokenizer_config.json"] = json.dumps(config, indent=2, ensure_ascii=False).encode()
    return files
  text, config = tok_lib.sentencepiece_to_hf(tokenizer, model_max_length=max_seq_length)
  return {"tokenizer.json": text.encode(), "tokenizer_config.json": json.dumps(config, indent=2).encode()}


def _check_exported_tokenizer(folder: Path, tokenizer: tok_lib.Tokenizer, prompts: dict[str, str]) -> None:
  """Loads the tokenizer written to `folder` as sentence-transformers will (transformers'
  AutoTokenizer; without transformers, embed2's HFTokenizer) and refuses the export unless it gives
  `tokenizer`'s ids, framing included, on probe texts and the prompts, and pads a batch."""
  try:
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError:
    transformers = None
  probes = _probe_texts(prompts)
  try:
    if transformers is not None:
      hf = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
      got = [list(ids) for ids in hf(probes, verbose=False)["input_ids"]]
      hf(probes[:2], padding=True, verbose=False)  # sentence-transformers pads its batches: a pad token is needed
    else:
      reader = tok_lib.HFTokenizer.from_file(folder / "tokenizer.json")
      got = [reader.encode(t, add_bos=True, add_eos=True) for t in probes]
  except Exception as e:  # whatever the library raises, the export is refused with the reason
    raise ValueError(f"the tokenizer files written for the export do not load ({type(e).__name__}: {e}). "
                     "Nothing was written.") from None
  for t, ids in zip(probes, got):
    want = tokenizer.encode(t, add_bos=True, add_eos=True)
    if ids != want:
      raise ValueError(
          f"the exported tokenizer does not tokenize like the checkpoint's ({tokenizer.source}): {t!r:.60} "
          f"is {ids[:16]} there and {want[:16]} in embed2. Nothing was written.")


# ================================================================================ CLI


def _parse_mesh(s: str) -> dict[str, int]:
  out = {}
  for item in filter(None, s.split(",")):
    k, eq, v = item.partition("=")
    if not eq:
      raise ValueError(f"--mesh={s!r}: expected axis=size pairs, e.g. --mesh=data=1,fsdp=-1")
    out[k.strip()] = int(v)
  return out


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(prog="python -m embed2.convert", description=__doc__.split("\n")[0])
  ap.add_argument("--hf_dir", help="Hugging Face transformers / sentence-transformers folder to import")
  ap.add_argument("--out", required=True, help="new directory for the result")
  ap.add_argument("--dtype", default="float32", choices=DTYPES, help="stored parameter dtype")
  ap.add_argument("--mesh", default="fsdp=-1", help="mesh the tensors are placed on, e.g. data=1,fsdp=-1")
  ap.add_argument("--text_only", action="store_true", help="multimodal source: skip the vision tower")
  ap.add_argument("--to_safetensors", action="store_true",
                  help="export --ckpt as a sentence-transformers folder instead of importing")
  ap.add_argument("--ckpt", help="embed2 checkpoint to export (checkpoints dir, step dir or workdir)")
  ap.add_argument("--hf_tokenizer", help="export: write this folder's Hugging Face tokenizer files instead of "
                                         "the checkpoint's own (they must tokenize the same)")
  args = ap.parse_args(argv)
  if args.to_safetensors and not args.ckpt:
    ap.error("--to_safetensors needs --ckpt=CHECKPOINT")
  if not args.to_safetensors and not args.hf_dir:
    ap.error("give --hf_dir=DIR to import, or --to_safetensors --ckpt=CHECKPOINT to export")
  return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = _parse(argv)
  try:
    mesh = sharding.make_mesh(_parse_mesh(args.mesh))
    if args.to_safetensors:
      res = export_sentence_transformers(args.ckpt, args.out, dtype=args.dtype, hf_tokenizer=args.hf_tokenizer,
                                         mesh=mesh)
    else:
      res = convert_hf(args.hf_dir, args.out, dtype=args.dtype, mesh=mesh, text_only=args.text_only)
  except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:  # refusals: the message says the fix
    raise SystemExit(f"embed2.convert: {e}") from e
  print(json.dumps({"out": str(Path(args.out).absolute()),
                    "model": res["model_config"]["name"]}))
  return res


if __name__ == "__main__":
  main(sys.argv[1:])
