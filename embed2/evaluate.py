r"""Evaluates a checkpoint on a benchmark suite: prints a table, writes JSON.

  python -m embed2.evaluate --checkpoint=/tmp/demo/checkpoints --suite=demo
  python -m embed2.evaluate --checkpoint=DIR --suite=mteb_code --data_dir=/data --dims=128,768 \
      --out=/tmp/mteb_code.json

--checkpoint takes a checkpoints directory (its latest step), a step directory, or a workdir.
--dims defaults to every MRL dim the model was trained at; all dims come from one embedding pass.
Suites and their data layouts: embed2/eval/suites.py (`--suite=list` prints them).

JSON written to --out:
  {"checkpoint": ..., "step": ..., "suite": ..., "dims": [...], "seconds": ...,
   "metrics": {"<task>/<metric>/dim_<d>": ..., "<task>/<metric>/bm25": ..., "mean/...": ...}}
"""

from __future__ import annotations

import json
import os
import time
from typing import Mapping, Sequence

from absl import flags
from etils import epath

from embed2 import checkpoint as ckpt_lib
from embed2 import cli
from embed2.eval import suites
from embed2.inference import Embedder


def format_table(results: Mapping[str, float]) -> str:
  """Rows "<task>  <metric>", one column per "dim_<d>" (increasing) and "bm25"."""
  cells: dict[tuple[str, str], dict[str, float]] = {}
  columns: set[str] = set()
  for key, value in results.items():
    parts = key.rsplit("/", 2)
    if len(parts) != 3:
      continue
    task, metric, col = parts
    cells.setdefault((task, metric), {})[col] = value
    columns.add(col)
  dims = sorted((c for c in columns if c.startswith("dim_")), key=lambda c: int(c[4:]))
  cols = dims + sorted(c for c in columns if not c.startswith("dim_"))
  task_w = max([len("task")] + [len(t) for t, _ in cells])
  metric_w = max([len("metric")] + [len(m) for _, m in cells])
  lines = [f"{'task':<{task_w}}  {'metric':<{metric_w}}  " + "  ".join(f"{c:>8}" for c in cols)]
  lines.append("-" * len(lines[0]))
  for (task, metric), row in cells.items():
    vals = "  ".join(f"{row[c]:>8.4f}" if c in row else f"{'':>8}" for c in cols)
    lines.append(f"{task:<{task_w}}  {metric:<{metric_w}}  {vals}")
  return "\n".join(lines)


FLAGS = flags.FlagValues()  # this program's own flags (embed2/cli.py says why)
flags.DEFINE_string("checkpoint", None, "checkpoints dir, step dir or workdir", flag_values=FLAGS)
flags.DEFINE_string("suite", None, "suite name (see embed2/eval/suites.py); 'list' lists",
                    flag_values=FLAGS)
flags.DEFINE_string("dims", "", "comma-separated MRL dims; default all trained dims", flag_values=FLAGS)
flags.DEFINE_string("out", "", "JSON file to write", flag_values=FLAGS)
flags.DEFINE_string("data_dir", "", "data folder (default $EMBED2_DATA_DIR or ~/embed2_data)",
                    flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 32, "inputs per forward pass", flag_values=FLAGS)
flags.DEFINE_integer("max_length", 0, "tokens per input; 0 = the model's", flag_values=FLAGS)
flags.DEFINE_string("dtype", "", "compute dtype override: float32 / bfloat16", flag_values=FLAGS)
flags.DEFINE_bool("no_bm25", False, "skip the BM25 baseline", flag_values=FLAGS)
flags.mark_flag_as_required("suite", flag_values=FLAGS)


class SuiteEvaluator:
  """`evaluator(model, global_step, stage_name) -> scalars`: the `eval_fn` of `trainer.train`.

  The Embedder is built on the first call and kept (its compiled buckets with it; `embedder`); it
  reads the model's current parameters at every call. Keys are prefixed "eval/<suite>/".
  """

  def __init__(self, suite: str | suites.Suite, *, tokenizer, task_strings: Mapping[str, str],
               dims: Sequence[int] | None = None, data_dir: str | os.PathLike | None = None,
               **embedder_kwargs):
    self.suite = suites.get_suite(suite)
    self.tokenizer = tokenizer
    self.task_strings = dict(task_strings)
    self.dims = dims
    self.data_dir = data_dir
    self.embedder_kwargs = embedder_kwargs
    self.embedder = None

  def __call__(self, model, global_step: int, stage_name: str) -> dict[str, float]:
    del global_step, stage_name
    if self.embedder is None or self.embedder.model is not model:
      self.embedder = Embedder(model, self.tokenizer, task_strings=self.task_strings,
                               **self.embedder_kwargs)
    res = suites.evaluate_suite(self.embedder, self.suite, self.dims, data_dir=self.data_dir)
    return {f"eval/{self.suite.name}/{k}": v for k, v in res.items()}


def main(argv: Sequence[str]) -> dict:
  """Runs the command line `argv` (after the program name); returns the JSON document it writes."""
  args = cli.parse(FLAGS, argv)
  if args.suite == "list":
    for name, s in suites.SUITES.items():
      print(f"{name:<16} {'+'.join(s.modalities):<12} {s.description}")
    return {}
  if not args.checkpoint:
    raise SystemExit("--checkpoint is required (a checkpoints dir, a step dir or a workdir)")
  suite = suites.get_suite(args.suite)
  try:
    dims = tuple(int(d) for d in args.dims.split(",") if d.strip()) or None
  except ValueError:
    raise SystemExit(f"--dims={args.dims!r} must be comma-separated integers, e.g. --dims=64,256")

  start = time.perf_counter()
  directory, step = ckpt_lib.resolve_checkpoint_path(args.checkpoint)
  embedder = Embedder.from_checkpoint(os.fspath(directory / str(step)), dtype=args.dtype or None,
                                      batch_size=args.batch_size,
                                      max_length=args.max_length or None)
  results = suites.evaluate_suite(embedder, suite, dims, data_dir=args.data_dir or None,
                                  bm25=not args.no_bm25)
  doc = {"checkpoint": os.fspath(directory), "step": step, "suite": suite.name,
         "dims": list(dims or embedder.dims), "seconds": round(time.perf_counter() - start, 3),
         "metrics": results}
  print(f"suite {suite.name}, checkpoint {directory} step {step} ({doc['seconds']:.1f} s)")
  print(format_table(results))
  if args.out:  # local, gs:// or s3://
    out = epath.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, sort_keys=True))
    print(f"wrote {args.out}")
  return doc


if __name__ == "__main__":
  cli.run(main, FLAGS)
