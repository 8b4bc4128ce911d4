"""The layout tables: each Hugging Face tensor's name and shape, its path in embed2's parameter tree,
and the maps between the two layouts.

HF Linear weights are (out, in); ours are (in, out), with heads split out:
  q_proj (H*hd, D) -> attn.q (D, H, hd)      k_proj / v_proj (K*hd, D) -> attn.k / attn.v (D, K, hd)
  o_proj (D, H*hd) -> attn.o (H, hd, D)      gate_proj / up_proj (F, D) -> (D, F)    down_proj (D, F) -> (F, D)
  Gemma3RMSNorm scales by (1 + w) as ours does: norm weights are copied unchanged.
  sentence-transformers Dense linear.weight (out, in) -> head[j] (in, out).
  SigLIP: patch conv (Wv, C, p, p) -> patch.kernel (p, p, C, Wv); q/k/v_proj (Wv, Wv) -> (Wv, h, hd)
  with biases (h, hd); out_proj -> (h, hd, Wv); fc1 / fc2 transposed; projector weight (Wv, D) as is.

BERT (config.model.arch="bert", embed2.model.bert): query / key / value.weight (H*hd, D) -> (D, H, hd)
  with biases (H, hd); attention.output.dense -> attn.o (H, hd, D) + o_bias; intermediate.dense /
  output.dense transposed; LayerNorm weight / bias -> scale / bias; the embedding tables as they are.
  The pooler (BertModel's [CLS] head; sentence-transformers does not use it) is ignored.

A checkpoint's tensors sit under a prefix that depends on the class that saved it (Gemma3TextModel,
Gemma3ForCausalLM, Gemma3ForConditionalGeneration); `best_prefix` finds it.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Sequence

import numpy as np
from flax import nnx

from embed2 import sharding
from embed2.model import ModelConfig
from embed2.model.vision import VisionConfig


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
  if cfg.arch == "bert":
    return bert_entries(cfg, prefix)
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


def bert_entries(cfg: ModelConfig, prefix: str = "") -> list[Entry]:
  """A BertModel's tensors (HF names under `prefix`, e.g. "bert." for BertForMaskedLM)."""
  d, h, hd, f = cfg.model_dim, cfg.num_heads, cfg.resolved_head_dim, cfg.mlp_dim
  t = ("transformer",)

  def norm(hf, ours):
    return [Entry(f"{hf}.weight", ours + ("scale",), (d,), *_ID), Entry(f"{hf}.bias", ours + ("bias",), (d,), *_ID)]

  e = f"{prefix}embeddings."
  out = [Entry(e + "word_embeddings.weight", t + ("word_embeddings",), (cfg.vocab_size, d), *_ID),
         Entry(e + "position_embeddings.weight", t + ("position_embeddings",), (cfg.max_positions, d), *_ID),
         Entry(e + "token_type_embeddings.weight", t + ("token_type_embeddings",), (cfg.type_vocab_size, d),
               *_ID)] + norm(e + "LayerNorm", t + ("embed_norm",))
  for i in range(cfg.num_layers):
    p, ours = f"{prefix}encoder.layer.{i}.", t + ("blocks", i)
    for hf, name in (("query", "q"), ("key", "k"), ("value", "v")):
      out += [Entry(f"{p}attention.self.{hf}.weight", ours + ("attn", name), (h * hd, d), *_in_heads(h, hd, d)),
              Entry(f"{p}attention.self.{hf}.bias", ours + ("attn", f"{name}_bias"), (h * hd,),
                    *_bias_heads(h, hd))]
    out += [Entry(p + "attention.output.dense.weight", ours + ("attn", "o"), (d, h * hd), *_out_heads(h, hd, d)),
            Entry(p + "attention.output.dense.bias", ours + ("attn", "o_bias"), (d,), *_ID),
            Entry(p + "intermediate.dense.weight", ours + ("mlp", "up"), (f, d), *_T),
            Entry(p + "intermediate.dense.bias", ours + ("mlp", "up_bias"), (f,), *_ID),
            Entry(p + "output.dense.weight", ours + ("mlp", "down"), (d, f), *_T),
            Entry(p + "output.dense.bias", ours + ("mlp", "down_bias"), (d,), *_ID)]
    out += norm(p + "attention.output.LayerNorm", ours + ("attn_norm",))
    out += norm(p + "output.LayerNorm", ours + ("mlp_norm",))
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


TEXT_PREFIXES = ("model.language_model.model.", "model.language_model.", "language_model.model.",
                  "language_model.", "model.", "")
TEXT_RE = re.compile(r"^(embed_tokens\.weight|norm\.weight|layers\.\d+\.)")
TOWER_PREFIXES = ("model.vision_tower.vision_model.", "vision_tower.vision_model.", "model.vision_tower.",
                   "vision_tower.")
TOWER_RE = re.compile(r"^(embeddings\.|encoder\.layers\.\d+\.|post_layernorm\.|head\.)")
PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")
LM_HEAD_RE = re.compile(r"^(model\.)?(language_model\.)?lm_head\.weight$")
BERT_PREFIXES = ("bert.", "")
BERT_RE = re.compile(r"^(embeddings\.|encoder\.layer\.\d+\.)")
# BertModel's pooler, the position_ids buffer, pre-training heads: nothing of the embedding reads them.
BERT_IGNORED_RE = re.compile(r"^(bert\.)?(pooler\.|embeddings\.position_ids$)|^cls\.")
# By config.model.arch: (the prefixes a checkpoint's text tensors may sit under, the pattern of what
# follows, tensors the import ignores).
TEXT_NAMES = {"gemma3": (TEXT_PREFIXES, TEXT_RE, LM_HEAD_RE),
              "bert": (BERT_PREFIXES, BERT_RE, BERT_IGNORED_RE)}


def best_prefix(names: Iterable[str], prefixes: Sequence[str], pattern: re.Pattern) -> str | None:
  """The prefix of `prefixes` under which most `names` continue with `pattern`; None if none does."""
  counts = {p: 0 for p in prefixes}
  for n in names:
    for p in prefixes:
      if n.startswith(p) and pattern.match(n[len(p):]):
        counts[p] += 1
  best = max(prefixes, key=lambda p: counts[p])  # ties: the first (longest) prefix
  return best if counts[best] else None


def get_path(tree, path):
  """`tree[path[0]][path[1]]...`: a leaf of a params tree by its Entry.path."""
  for k in path:
    tree = tree[k]
  return tree


def set_path(tree, path, value):
  """Sets the leaf of a params tree at an Entry.path."""
  for k in path[:-1]:
    tree = tree[k]
  tree[path[-1]] = value


def abstract_params(factory, mesh, rules) -> tuple[dict, dict]:
  """(ShapeDtypeStruct tree, NamedSharding tree) of a module's parameters, as pure dicts."""
  state = nnx.state(nnx.eval_shape(factory), nnx.Param)
  return nnx.to_pure_dict(state), nnx.to_pure_dict(sharding.param_shardings(state, mesh, rules))
