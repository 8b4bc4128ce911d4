r"""Embeds a corpus file with a checkpoint and writes the vectors to .npy (and .parquet).

  python -m embed2.export --checkpoint=/tmp/demo/checkpoints --input=docs.jsonl --output=/tmp/docs \
      [--field=text] [--id_field=id] [--dim=256] [--task=NAME --query] [--batch_size=64]

Input: `.jsonl` (one JSON object per line, its text under --field and an optional id under
--id_field; a line may also be a bare JSON string), or any other file read as plain text, one input
per line (empty lines are inputs too, so row i is line i). Blank .jsonl lines are skipped.

Output: `<output>.npy`, float32 (N, dim), row i = input i, each row L2-normalised at dim; and, when
pyarrow is installed, `<output>.parquet` with columns `id` (string: the --id_field value, else the
row number) and `embedding` (fixed-size list of dim float32). Inputs are read and embedded in
chunks of --chunk, so the corpus need not fit in memory; a tqdm bar shows progress. --input and
--output may be on an object store (gs://, s3://): the input is streamed from there; the outputs are
written in a local temporary folder (the .npy is filled chunk by chunk in place) and uploaded whole.

By default inputs are embedded as documents (no task string; an imported sentence-transformers
model's document prompt); `--query --task=NAME` embeds them as queries of a trained task instead.
A .jsonl text that is not valid Unicode (a `\ud800` escape) is refused naming its file:line.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from typing import Iterator, Sequence

import numpy as np
from absl import flags
from etils import epath
from tqdm import tqdm

from embed2 import cli
from embed2.checkpoint import is_remote
from embed2.data.tokenizer import check_text
from embed2.inference import Embedder


def _read(path: str, field: str, id_field: str) -> Iterator[tuple[str, str]]:
  """(id, text) per input, in file order."""
  jsonl = path.endswith(".jsonl")
  with _open_text(path) as f:
    row = 0
    for line_no, line in enumerate(f, 1):
      if not jsonl:
        yield str(row), line.rstrip("\n").rstrip("\r")
        row += 1
        continue
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_no} is not valid JSON ({e})") from None
      if isinstance(obj, str):
        check_text(obj, f"{path}:{line_no}")
        yield str(row), obj
      elif isinstance(obj, dict) and isinstance(obj.get(field), str):
        check_text(obj[field], f"{path}:{line_no} {field!r}")
        yield str(obj.get(id_field, row)), obj[field]
      else:
        raise ValueError(f"{path}:{line_no} has no string field {field!r} (keys: "
                         f"{sorted(obj) if isinstance(obj, dict) else type(obj).__name__}); "
                         "set --field")
      row += 1


def _open_text(path: str) -> io.TextIOWrapper:
  """`path` (local or on an object store) as UTF-8 text with universal newlines, streamed."""
  return io.TextIOWrapper(epath.Path(path).open("rb"), encoding="utf-8")


def count_inputs(path: str) -> int:
  with _open_text(path) as f:
    if path.endswith(".jsonl"):
      return sum(1 for line in f if line.strip())
    return sum(1 for _ in f)


def export_embeddings(embedder, input_path: str, output_prefix: str, *, field: str = "text",
                      id_field: str = "id", dim: int | None = None, task: str | None = None,
                      is_query: bool = False, chunk: int = 1024, parquet: bool = True,
                      progress: bool = True) -> dict:
  """Embeds every input of `input_path`; see the module docstring for formats.

  Returns:
    {"count": N, "dim": dim, "npy": path, "parquet": path or None}.
  """
  input_path, output_prefix = os.fspath(input_path), os.fspath(output_prefix)
  if not epath.Path(input_path).is_file():
    raise FileNotFoundError(f"--input={input_path} is not a file")
  dim = embedder.check_dim(dim)  # validate before reading anything
  if task is not None and not is_query:
    raise ValueError("--task applies to queries only; add --query to embed the inputs as queries")
  kwargs = dict(field=field, id_field=id_field, dim=dim, task=task, is_query=is_query, chunk=chunk,
                parquet=parquet, progress=progress)
  if not is_remote(output_prefix):
    epath.Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    return _export_local(embedder, input_path, output_prefix, **kwargs)
  out = epath.Path(output_prefix)
  with tempfile.TemporaryDirectory(prefix="embed2_export_") as tmp:
    res = _export_local(embedder, input_path, os.path.join(tmp, out.name), **kwargs)
    out.parent.mkdir(parents=True, exist_ok=True)
    for key in ("npy", "parquet"):
      if res[key]:  # one whole object each
        dst = out.parent / os.path.basename(res[key])
        epath.Path(res[key]).copy(dst, overwrite=True)
        res[key] = os.fspath(dst)
  return res


def _export_local(embedder, input_path: str, output_prefix: str, *, field: str, id_field: str,
                  dim: int, task: str | None, is_query: bool, chunk: int, parquet: bool,
                  progress: bool) -> dict:
  """`export_embeddings` into local files `output_prefix`.npy / .parquet (its folder exists)."""
  total = count_inputs(input_path)
  npy_path = output_prefix + ".npy"
  out_nd = np.lib.format.open_memmap(npy_path, mode="w+", dtype=np.float32, shape=(total, dim))
  writer, pq_path, pa = None, None, None
  if parquet:
    try:
      import pyarrow as pa  # optional: without it only the .npy is written
      import pyarrow.parquet as pq  # (the same)
    except ImportError:
      pa = None
    if pa is not None:
      pq_path = output_prefix + ".parquet"
      schema = pa.schema([("id", pa.string()), ("embedding", pa.list_(pa.float32(), dim))])
      writer = pq.ParquetWriter(pq_path, schema)
  done = 0
  bar = tqdm(total=total, unit="input", desc="embedding", disable=not progress)
  try:
    ids, texts = [], []
    rows = _read(input_path, field, id_field)

    def flush():
      nonlocal done
      e_nd = embedder.embed(texts, dim=dim, task=task, is_query=is_query)
      out_nd[done:done + len(texts)] = e_nd
      if writer is not None:
        flat = pa.array(e_nd.reshape(-1), pa.float32())
        writer.write_table(pa.table({"id": pa.array(ids, pa.string()),
                                     "embedding": pa.FixedSizeListArray.from_arrays(flat, dim)}))
      done += len(texts)
      bar.update(len(texts))
      ids.clear()
      texts.clear()

    for i, text in rows:
      ids.append(i)
      texts.append(text)
      if len(texts) == chunk:
        flush()
    if texts:
      flush()
  finally:
    bar.close()
    if writer is not None:
      writer.close()
  out_nd.flush()
  if done != total:
    raise RuntimeError(f"{input_path} changed while it was read ({total} inputs counted, {done} read)")
  return {"count": total, "dim": dim, "npy": npy_path, "parquet": pq_path}


FLAGS = flags.FlagValues()  # this program's own flags (embed2/cli.py says why)
flags.DEFINE_string("checkpoint", None, "checkpoints dir, step dir or workdir", flag_values=FLAGS)
flags.DEFINE_string("input", None, ".jsonl or plain text file", flag_values=FLAGS)
flags.DEFINE_string("output", None, "output path prefix (.npy / .parquet added)", flag_values=FLAGS)
flags.DEFINE_string("field", "text", "the .jsonl field that holds the text", flag_values=FLAGS)
flags.DEFINE_string("id_field", "id", "the .jsonl field that holds the id", flag_values=FLAGS)
flags.DEFINE_integer("dim", 0, "MRL dim; 0 = the full embedding", flag_values=FLAGS)
flags.DEFINE_string("task", "", "task name whose task string queries get", flag_values=FLAGS)
flags.DEFINE_bool("query", False, "embed inputs as queries (default documents)", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 32, "inputs per forward pass", flag_values=FLAGS)
flags.DEFINE_integer("max_length", 0, "tokens per input; 0 = the model's", flag_values=FLAGS)
flags.DEFINE_enum("on_overflow", "truncate", ("truncate", "error"),
                  "what an input longer than --max_length does", flag_values=FLAGS)
flags.DEFINE_integer("chunk", 1024, "inputs read and embedded at a time", flag_values=FLAGS)
flags.DEFINE_bool("no_parquet", False, "write the .npy only", flag_values=FLAGS)
flags.mark_flags_as_required(["checkpoint", "input", "output"], flag_values=FLAGS)


def main(argv: Sequence[str]) -> dict:
  """The command line after the program name -> the summary it prints ({"count", "dim", "npy", ...})."""
  args = cli.parse(FLAGS, argv)
  embedder = Embedder.from_checkpoint(args.checkpoint, batch_size=args.batch_size,
                                      max_length=args.max_length or None,
                                      on_overflow=args.on_overflow)
  res = export_embeddings(embedder, args.input, args.output, field=args.field,
                          id_field=args.id_field, dim=args.dim or None, task=args.task or None,
                          is_query=args.query, chunk=args.chunk, parquet=not args.no_parquet)
  print(json.dumps(res))
  return res


if __name__ == "__main__":
  cli.run(main, FLAGS)
