"""The command line of `python -m embed2.convert` (see `__main__.py`): its flags and `main(argv)`."""

from __future__ import annotations

import json
from typing import Any, Sequence

from absl import app, flags

from embed2 import cli
from embed2 import sharding
from embed2.convert import folders
from embed2.convert.hf_export import export_sentence_transformers
from embed2.convert.hf_import import convert_hf

FLAGS = flags.FlagValues()  # this program's own flags (embed2/cli.py says why)
flags.DEFINE_string("hf_dir", None, "Hugging Face transformers / sentence-transformers folder to import "
                    "(local or gs://, s3://)", flag_values=FLAGS)
flags.DEFINE_string("out", None, "new directory for the result (local or gs://, s3://)", flag_values=FLAGS)
flags.DEFINE_enum("dtype", "float32", folders.DTYPES, "stored parameter dtype", flag_values=FLAGS)
cli.DEFINE_mesh("mesh", "fsdp=-1", "mesh the tensors are placed on, e.g. data=1,fsdp=-1", flag_values=FLAGS)
flags.DEFINE_bool("text_only", False, "multimodal source: skip the vision tower", flag_values=FLAGS)
flags.DEFINE_bool("to_safetensors", False, "export --ckpt as a sentence-transformers folder instead of "
                  "importing", flag_values=FLAGS)
flags.DEFINE_string("ckpt", None, "embed2 checkpoint to export (checkpoints dir, step dir or workdir)",
                    flag_values=FLAGS)
flags.DEFINE_string("hf_tokenizer", None, "export: write this folder's Hugging Face tokenizer files instead "
                    "of the checkpoint's own (they must tokenize the same)", flag_values=FLAGS)
flags.mark_flag_as_required("out", flag_values=FLAGS)


def main(argv: Sequence[str]) -> dict[str, Any]:
  """The command line after the program name -> what `convert_hf` (the import's meta) or
  `export_sentence_transformers` returns; prints {"out", "model"} as JSON.

  Raises:
    app.UsageError: a bad flag, or neither --hf_dir (import) nor --to_safetensors --ckpt (export).
    SystemExit: the conversion refused (the message says why and the fix); nothing was written.
  """
  args = cli.parse(FLAGS, argv)
  if args.to_safetensors and not args.ckpt:
    raise app.UsageError("--to_safetensors needs --ckpt=CHECKPOINT")
  if not args.to_safetensors and not args.hf_dir:
    raise app.UsageError("give --hf_dir=DIR to import, or --to_safetensors --ckpt=CHECKPOINT to export")
  try:
    mesh = sharding.make_mesh(args.mesh)
    if args.to_safetensors:
      res = export_sentence_transformers(args.ckpt, args.out, dtype=args.dtype,
                                         hf_tokenizer=args.hf_tokenizer, mesh=mesh)
    else:
      res = convert_hf(args.hf_dir, args.out, dtype=args.dtype, mesh=mesh, text_only=args.text_only)
  except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:  # refusals, naming the fix
    raise SystemExit(f"embed2.convert: {e}") from e
  print(json.dumps({"out": str(folders.absolute(args.out)), "model": res["model_config"]["name"]}))
  return res
