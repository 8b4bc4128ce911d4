"""Import: a Hugging Face Gemma 3 / EmbeddingGemma folder -> an embed2 checkpoint.

Memory. Tensors are memory-mapped and placed one at a time: each device's shard is cut from the mapped
file straight onto its `NamedSharding` on the mesh (the target shardings come from the model's logical
axes and `embed2.sharding.DEFAULT_RULES`), so the host holds about one shard beyond what the devices
hold; on accelerators the model is never whole in host memory. On a CPU-only machine the devices are
host memory: `dtype="bfloat16"` halves what the converted model takes there (a bfloat16 checkpoint
restores into float32 parameters). A source on an object store (`--hf_dir=gs://...`) cannot be mapped:
each tensor is read whole (one ranged read) before its shards are cut, so the host holds one tensor
(the largest is the embedding table: vocab x model dim) beyond what the devices hold.

Failure. Architecture, tensor names and shapes are all checked from config.json and the safetensors
headers before any output is written (`folders.read_source`); a clear error names each missing,
unexpected or mis-shaped tensor. The output is built in a temporary sibling directory and renamed into
place only when complete, so a failed run leaves no partial output behind. On an object store (no
rename) it is written in place, the text checkpoint OUT/0 last: Orbax marks it finished last, so a
killed import leaves a folder that no loader takes ("no finished checkpoint"); a failure removes it.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import ml_dtypes
import numpy as np
from absl import logging
from etils import epath
from flax import nnx

from embed2 import checkpoint as ckpt_lib
from embed2 import sharding
from embed2.convert import folders
from embed2.convert.layout import Entry, abstract_params, get_path, set_path
from embed2.convert.safetensors_io import TensorInfo, load_tensor
from embed2.model import EmbeddingModel
from embed2.model.vision import VisionEncoder


def _place(entries: Sequence[Entry], tensors: dict[str, TensorInfo], factory, mesh, rules, dtype: str) -> dict:
  """Builds the params tree of `factory()`'s module from the source tensors, shard by shard."""
  shapes, shardings = abstract_params(factory, mesh, rules)
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
    want = get_path(shapes, e.path).shape
    if src.shape != tuple(want):
      raise RuntimeError(f"{e.hf_name} maps to {src.shape} but the model's {e.path} is {want}")
    arr = jax.make_array_from_callback(tuple(want), get_path(shardings, e.path),
                                       lambda idx, s=src: np.asarray(s[idx], dtype=np_dtype))
    set_path(out, e.path, arr)
  return out


def _save_params(directory: epath.Path, params: dict, meta: dict[str, Any]) -> None:
  """`params` and `meta` as step 0 of a checkpoint in `directory`, written before returning."""
  ck = ckpt_lib.Checkpointer(directory, keep=None, async_save=False)
  ck.save(0, params=params, meta=meta, force=True)
  ck.close()


def convert_hf(hf_dir: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "float32",
               mesh: jax.sharding.Mesh | None = None, text_only: bool = False) -> dict[str, Any]:
  """Converts a Hugging Face Gemma 3 / EmbeddingGemma folder into an embed2 checkpoint at `out`.

  Args:
    hf_dir: a transformers or sentence-transformers folder (see embed2.convert).
    out: a new (or empty) directory.
    dtype: "float32" or "bfloat16": the stored parameters' dtype.
    mesh: where the tensors are placed while converting (default: every device on the fsdp axis).
    text_only: convert the language model of a multimodal checkpoint and ignore its vision tower.

  Returns:
    the text checkpoint's meta dict.
  """
  if dtype not in folders.DTYPES:
    raise ValueError(f"--dtype={dtype!r}; choose one of {folders.DTYPES}")
  out = folders.absolute(out)
  folders.check_out(out)
  src = folders.read_source(hf_dir, text_only=text_only)
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
  tmp = folders.tmp_dir(out)
  try:
    # The text checkpoint last: in place on an object store, its commit marks the folder complete.
    folders.write_source_tokenizer(src.tokenizer, tmp)
    if src.vision_config is not None:
      vcfg = src.vision_config
      vparams = _place(src.vision, src.tensors, lambda: VisionEncoder(vcfg, rngs=nnx.Rngs(0)), mesh, rules,
                       dtype)
      _save_params(tmp / "vision", vparams, {"step": 0, "vision_config": vcfg.to_dict(),
                                             "source": meta["source"]})
      del vparams
    params = _place(src.text, src.tensors, lambda: EmbeddingModel(cfg, rules=rules, rngs=nnx.Rngs(0)),
                    mesh, rules, dtype)
    _save_params(tmp, params, meta)
    del params
    folders.commit(tmp, out)
  except BaseException:
    folders.discard(tmp)
    raise
  logging.info("convert: %s (%s, %s) -> %s", src.hf_dir, src.format, cfg.name, out)
  return meta


def load_vision_params(model: VisionEncoder, path: str | os.PathLike) -> dict[str, Any]:
  """Restores converted vision weights (OUT or OUT/vision) onto `model`, in place, on its shardings.

  Returns:
    the vision checkpoint's meta.
  """
  p = epath.Path(path)
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
