"""Export: the text encoder of an embed2 checkpoint -> a sentence-transformers folder.

The tokenizer of an export is the checkpoint's own (`tokenizer.checkpoint_tokenizer`; a checkpoint
that names none, or whose file is gone, is refused): an imported model's files as imported, a
sentencepiece one (the packaged default, Gemma's tokenizer.model) converted to an equivalent
tokenizer.json (`tokenizer.sentencepiece_to_hf`). `hf_tokenizer=DIR` writes DIR's files instead.
Either way the written files are loaded as sentence-transformers loads them and must give the
checkpoint tokenizer's ids on probe texts and the prompts before anything is written. The export's
max_seq_length is an imported model's own, else the model's max_length; its prompts an imported
model's own, else the checkpoint's task strings (which `SentenceTransformer.encode_query(...,
prompt_name=TASK)` applies as `Embedder.embed(..., task=TASK)` does).

The folder is built aside and renamed into place when complete (`folders.tmp_dir`); on an object store
(`--out=gs://...`, no rename) it is written in place with config.json last, without which neither
transformers nor sentence-transformers loads a folder. model.safetensors streams into the store
tensor by tensor (`write_safetensors`); no local copy of it is made.
"""

from __future__ import annotations

import itertools
import json
import os
from typing import Any

import jax
import ml_dtypes
import numpy as np
from absl import logging
from flax import nnx

from embed2 import checkpoint as ckpt_lib
from embed2 import sharding
from embed2.convert import folders
from embed2.convert.hf_config import hf_config_from_model_config
from embed2.convert.layout import abstract_params, get_path, head_entries, text_entries
from embed2.convert.safetensors_io import write_safetensors
from embed2.data import tokenizer as tok_lib
from embed2.model import EmbeddingModel, ModelConfig


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
  if dtype not in folders.DTYPES:
    raise ValueError(f"--dtype={dtype!r}; choose one of {folders.DTYPES}")
  out = folders.absolute(out)
  folders.check_out(out)
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
  tok_files = folders.export_tokenizer_files(tokenizer, hf_tokenizer, max_seq_length)
  hf_cfg = hf_config_from_model_config(cfg)
  hf_cfg["dtype"] = dtype
  config_json = json.dumps(hf_cfg, indent=2)
  # Before the weights are read: a refusal costs little and writes nothing.
  folders.check_exported_tokenizer({**tok_files, "config.json": config_json.encode()}, tokenizer, prompts)
  mesh = mesh if mesh is not None else sharding.make_mesh({"fsdp": -1})
  rules = sharding.DEFAULT_RULES
  shapes, shardings = abstract_params(lambda: EmbeddingModel(cfg, rules=rules, rngs=nnx.Rngs(0)), mesh, rules)
  target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
  params = reader.restore(step, params=target)["params"]

  np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float32)
  dense_dirs = [f"{j + 2}_Dense" for j in range(len(cfg.head_dims))]

  def write(path, entries, rename=lambda n: n, zeros=()):
    specs = [(rename(e.hf_name), e.hf_shape, np_dtype) for e in entries] + [(n, s, np_dtype) for n, s in zeros]
    # One tensor at a time: gathered from its shards, laid out as HF, cast, written, dropped.
    arrays = itertools.chain(
        (e.to_hf(np.asarray(jax.device_get(get_path(params, e.path)))).astype(np_dtype) for e in entries),
        (np.zeros(s, np_dtype) for _, s in zeros))
    write_safetensors(path, specs, arrays)

  modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
             {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
  tmp = folders.tmp_dir(out)
  try:
    tmp.mkdir(parents=True, exist_ok=True)
    for name, content in tok_files.items():
      (tmp / name).write_bytes(content)
    # BertModel always builds its pooler ([CLS] -> dense -> tanh), which no embedding reads: written as
    # zeros, so loading the export initialises nothing at random (and reports nothing missing).
    pooler = ((("pooler.dense.weight", (cfg.model_dim, cfg.model_dim)), ("pooler.dense.bias", (cfg.model_dim,)))
              if cfg.arch == "bert" else ())
    write(tmp / "model.safetensors", text_entries(cfg), zeros=pooler)
    (tmp / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length,
                                                               "do_lower_case": False}, indent=2))
    (tmp / "1_Pooling").mkdir(exist_ok=True)
    pooling = {k: k == "pooling_mode_mean_tokens" for k in folders.LEGACY_POOLING}
    (tmp / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": cfg.model_dim, **pooling, "include_prompt": True}, indent=2))
    dims = (cfg.model_dim,) + tuple(cfg.head_dims)
    for j, (folder, entry) in enumerate(zip(dense_dirs, head_entries(cfg, dense_dirs))):
      (tmp / folder).mkdir(exist_ok=True)
      (tmp / folder / "config.json").write_text(json.dumps(
          {"in_features": dims[j], "out_features": dims[j + 1], "bias": False,
           "activation_function": "torch.nn.modules.linear.Identity"}, indent=2))
      write(tmp / folder / "model.safetensors", [entry], rename=lambda n: n.split("/", 1)[1])
      modules.append({"idx": j + 2, "name": str(j + 2), "path": folder,
                      "type": "sentence_transformers.models.Dense"})
    norm_idx = len(modules)
    # Empty (an object store keeps no empty folder; sentence-transformers loads Normalize without it).
    (tmp / f"{norm_idx}_Normalize").mkdir(exist_ok=True)
    modules.append({"idx": norm_idx, "name": str(norm_idx), "path": f"{norm_idx}_Normalize",
                    "type": "sentence_transformers.models.Normalize"})
    (tmp / "modules.json").write_text(json.dumps(modules, indent=2))
    (tmp / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": prompts, "default_prompt_name": default_prompt,
         "similarity_fn_name": "cosine", "model_type": "SentenceTransformer"}, indent=2))
    (tmp / "config.json").write_text(config_json)  # last: what makes the folder loadable
    folders.commit(tmp, out)
  except BaseException:
    folders.discard(tmp)
    raise
  return {"out": str(out), "model_config": cfg.to_dict(), "modules": [m["type"] for m in modules]}
