"""Packing efficiency and host-side batch-building throughput: packed vs padded.

    python -m embed2.bench.packing                         # B_g = 256, L = 128 / 512 / 512
    python -m embed2.bench.packing --examples_per_group=64 --steps=50
    python -m embed2.bench.packing --toy --out=/tmp/packing.json

Three parts. The first two are run packed (suggested rows, S segments per row, a
lookahead window of --lookahead tuples), packed in order (the same rows, tuples taken
strictly as they come: lookahead 0) and padded (one example per row: S = 1, R_g = B_g
rows per side, the baseline without packing):

  packing   pre-tokenized tuples with a realistic length mix (log-normal: queries
            median 18 tokens, passages and one hard negative median 140, clipped
            to L) through `packing.pack_group`: the packer alone; rows suggested
            from 8192 tuples; a "step" here is one group batch.
  pipeline  synthetic text tuples through `pipeline.build_ft_iterator` with the
            package tokenizer (`Tokenizer.default()`; byte-level stand-in with
            --tokenizer=bytes): tokenization + packing, one process, G groups.

The third is packed only, with tuples taken strictly in order (lookahead 0) and with the
config's lookahead window (`BatchSpec.lookahead`; unset: B_g, at most 64):

  config    the streams of a training config (--config=demo: configs/demo.py with its media
            tasks) exactly as the trainer builds them (`input_pipeline.streams`): its PFT stage
            and every task as an FT stream; --config_batches batches each (the first
            batches of a fresh window pack better than its steady state: measure dozens). `run_mix` is the
            non-pad fraction over a whole run of the main job: each stream weighted by the steps
            the config spends on it (the PFT stage's steps; an FT stage's steps times the task's
            share of its rates); the soup variants' stages are not counted.

Columns: non-pad fraction per side and overall (useful tokens / row tokens: the
model computes on every row token), example fill (valid example slots / B), rows
per step (the model-side cost), useful tokens/s of host batch building (wall clock
of this process), and steps/s. Writes JSON to --out.
"""

from __future__ import annotations

import copy
import os
import platform
import time
from typing import Any, Sequence

import numpy as np
from absl import flags

from embed2 import cli
from embed2.bench import common
from embed2.bench import input_pipeline
from embed2.data import packing
from embed2.data import pipeline
from embed2.data.packing import GroupShape, SideShape

# Tuples whose lengths size the rows in the packing part (as
# `pipeline.with_suggested_rows` would; the pipeline part suggests from
# pipeline.ROWS_SAMPLE_SIZE at build time, like a config that leaves rows unset).
_SAMPLE = 8192

_WORDS = ("the of and to in is for on that with as by at from this are be or an "
          "model data train embed query search result code python function class "
          "return value list dict string token batch vector image audio video text "
          "learning network layer attention pooling loss negative positive").split()


FLAGS = common.program_flags("packing")  # --out, --toy, and this program's own:
flags.DEFINE_integer("examples_per_group", 256, "B_g", flag_values=FLAGS)
flags.DEFINE_integer("groups", 4, "G (pipeline part)", flag_values=FLAGS)
flags.DEFINE_integer("segments", 16, "S", flag_values=FLAGS)
flags.DEFINE_integer("query_len", 128, "L of the query side", flag_values=FLAGS)
flags.DEFINE_integer("positive_len", 512, "L of the positive side", flag_values=FLAGS)
flags.DEFINE_integer("negative_len", 512, "L of the negative side", flag_values=FLAGS)
flags.DEFINE_integer("num_negatives", 1, "K", flag_values=FLAGS)
flags.DEFINE_integer("steps", 40, "group batches (packing part) / steps (pipeline part) measured",
                     flag_values=FLAGS)
flags.DEFINE_integer("max_misses", 64, "the packer's max_misses", flag_values=FLAGS)
flags.DEFINE_integer("lookahead", 64, "W of the packed variant", flag_values=FLAGS)
flags.DEFINE_float("slack", 1.0, "suggest_rows slack", flag_values=FLAGS)
flags.DEFINE_enum("tokenizer", "default", ("default", "bytes"), "tokenizer of the pipeline part",
                  flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "seed of the generated tuples", flag_values=FLAGS)
flags.DEFINE_enum("config", "demo", input_pipeline.CONFIGS + ("none",),
                  "config of the config part (none: skip it)", flag_values=FLAGS)
flags.DEFINE_string("config_arg", "", "the config's knobs, e.g. 'batch=128'", flag_values=FLAGS)
flags.DEFINE_integer("config_batches", 60,
                     "batches per stream (config part); the lookahead window reaches its steady state "
                     "(the tuples it keeps passing over pile up in it) after a few dozen",
                     flag_values=FLAGS)
flags.DEFINE_string("streams", "", "comma-separated stream names of the config part (default: all)",
                    flag_values=FLAGS)


def _args(argv: Sequence[str]) -> cli.Args:
  args = cli.parse(FLAGS, argv)
  if args.toy:
    args.examples_per_group, args.groups, args.steps = 16, 2, 4
    args.config_batches = 2
    if args.config == "demo":
      args.config = "tiny"
    args.query_len, args.positive_len, args.negative_len = 32, 128, 128
  return args


def _token_tuples(rng, n, args) -> list[dict[str, Any]]:
  # Queries median 18 tokens, passages and negatives median 140 (common.token_tuples' defaults).
  return common.token_tuples(rng, n, query_len=args.query_len, positive_len=args.positive_len,
                             negative_len=args.negative_len, num_negatives=args.num_negatives)


def _text_tuples(rng, n, args) -> list[dict[str, Any]]:
  def text(median):
    # ~1.3 tokens per word for this vocabulary; lengths in words.
    k = int(common.lognormal_lengths(rng, 1, median / 1.3, 0.8, 4 * args.positive_len)[0])
    return " ".join(rng.choice(_WORDS, k))

  return [{"query": text(16), "positive": text(140),
           "negatives": [text(140) for _ in range(args.num_negatives)],
           "query_id": i, "positive_id": i, "group": "bench"} for i in range(n)]


def _shape(args, rows: dict[str, int], segments: int, lookahead: int) -> GroupShape:
  k = args.num_negatives
  return GroupShape(
      examples=args.examples_per_group, segments=segments, num_negatives=k,
      max_misses=args.max_misses, lookahead=lookahead,
      query=SideShape(length=args.query_len, rows=rows["query"]),
      positive=SideShape(length=args.positive_len, rows=rows["positive"]),
      negative=(SideShape(length=args.negative_len, rows=rows["negative"])
                if k else None))


def _summary(shape: GroupShape, batch: dict[str, np.ndarray], steps: int,
             groups: int, seconds: float) -> dict[str, Any]:
  stats = packing.batch_stats(batch)
  capacity = sum(groups * shape.side(s).rows * shape.side(s).length
                 for s in shape.sides)
  out = {f"{s}_nonpad_fraction": round(stats[f"{s}_nonpad_fraction"], 4)
         for s in shape.sides}
  out.update({
      "rows_per_group": {s: shape.side(s).rows for s in shape.sides},
      "nonpad_fraction": round(stats["num_tokens"] / capacity, 4),
      "example_fill": round(stats["example_fill"], 4),
      "row_tokens_per_step": capacity // steps,
      "useful_tokens_per_step": stats["num_tokens"] // steps,
      "useful_tokens_per_s": round(stats["num_tokens"] / seconds),
      "steps_per_s": round(steps / seconds, 2),
      "num_truncated": stats["num_truncated"],
  })
  return out


def _bench_packing(args, rng) -> dict[str, Any]:
  b_g, k = args.examples_per_group, args.num_negatives
  n = b_g * args.steps * 2 + args.lookahead + args.max_misses + _SAMPLE  # + what the packer reads ahead
  tuples = _token_tuples(rng, n, args)
  sample = tuples[:_SAMPLE]
  rows = {}
  for s in packing.SIDES if k else packing.SIDES[:2]:
    lengths = [t.size for ex in sample
               for t in (ex["negative_tokens"] if s == "negative"
                         else [ex[f"{s}_tokens"]])]
    rows[s] = packing.suggest_rows(
        lengths, sequences=b_g * (k if s == "negative" else 1),
        length=getattr(args, f"{s}_len"), segments=args.segments,
        slack=args.slack)
    if s == "negative":
      rows[s] = max(rows[s], k)
  variants = {
      "packed": _shape(args, rows, args.segments, args.lookahead),
      "in_order": _shape(args, rows, args.segments, 0),
      "padded": _shape(args, {"query": b_g, "positive": b_g,
                              "negative": b_g * k}, 1, 0),
  }
  results = {}
  for name, shape in variants.items():
    stream = iter(enumerate(tuples[_SAMPLE:]))
    held, groups = [], []
    t0 = time.perf_counter()
    for _ in range(args.steps):
      gb, held = packing.pack_group(shape, held, lambda: next(stream))
      groups.append(gb)
    batch = packing.concat_groups(shape, groups)
    seconds = time.perf_counter() - t0
    results[name] = _summary(shape, batch, args.steps, args.steps, seconds)
  return results


def _bench_pipeline(args, rng) -> dict[str, Any]:
  if args.tokenizer == "default":
    from embed2.data.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
    tok = Tokenizer.default()
  else:
    class _Bytes:
      def encode(self, text, **unused):
        return [b + 3 for b in text.encode()]
    tok = _Bytes()
  b = args.examples_per_group * args.groups
  examples = _text_tuples(rng, max(2000, b * (args.steps + 2)), args)
  results = {}
  for name, segments, lookahead in (("packed", args.segments, args.lookahead),
                                    ("in_order", args.segments, 0), ("padded", 1, 0)):
    k = args.num_negatives
    rows = {}
    if name == "padded":
      rows = {"query_rows": b, "positive_rows": b, "negative_rows": b * k}
    spec = pipeline.BatchSpec(
        batch_size=b, query_len=args.query_len, positive_len=args.positive_len,
        negative_len=args.negative_len if k else 0, num_negatives=k,
        segments=segments, max_misses=args.max_misses, lookahead=lookahead,
        rows_slack=args.slack, **rows)
    task = pipeline.TaskSpec(name="bench", examples=examples,
                             task_string="task: search result | query: ",
                             p_drop=0.1, batch=spec)
    t0 = time.perf_counter()
    it = pipeline.build_ft_iterator([task], tokenizer=tok,
                                    num_groups=args.groups, seed=args.seed)
    build_s = time.perf_counter() - t0
    shape = it.group_shapes["bench"]
    batches = []
    t0 = time.perf_counter()
    for _ in range(args.steps):
      batches.append(next(it))
    seconds = time.perf_counter() - t0
    joined = {key: (np.asarray(sum(int(x[key]) for x in batches))
                    if np.ndim(batches[0][key]) == 0 else batches[0][key])
              for key in batches[0]}
    # Recompute the side fractions over all steps from the summed counts.
    for s in shape.sides:
      cap = args.steps * args.groups * shape.side(s).rows * shape.side(s).length
      joined[f"{s}_nonpad_fraction"] = np.asarray(
          int(joined[f"{s}_num_tokens"]) / cap)
    joined["example_fill"] = np.asarray(
        int(joined["num_examples"]) / (args.steps * b))
    res = _summary(shape, joined, args.steps, args.steps * args.groups,
                   seconds)
    res["build_s"] = round(build_s, 3)
    results[name] = res
  return results


def run_weights(config) -> dict[str, float]:
  """Steps the config's main job spends on each stream of `input_pipeline.streams`: its first PFT
  stage's steps under the stage's name, and each FT stage's steps spread over its tasks by rate."""
  weights: dict[str, float] = {}
  pft_seen = False
  for stage in config.stages:
    if stage.mode == "pft":
      if not pft_seen:
        weights[stage.name] = float(stage.steps)
        pft_seen = True
      continue
    rates = {n: float(r) for n, r in dict(stage.tasks).items() if float(r) > 0}
    total = sum(rates.values())
    for name, r in rates.items():
      weights[name] = weights.get(name, 0.0) + float(stage.steps) * r / total
  return weights


def _with_lookahead(config, lookahead: int):
  """A copy of `config` whose every batch shape (FT tasks, PFT stages) has this lookahead."""
  config = copy.deepcopy(config)
  with config.unlocked():
    for name in config.tasks:
      config.tasks[name].lookahead = lookahead
    for stage in config.stages:
      if stage.mode == "pft":
        stage.batch.lookahead = lookahead
  return config


def _bench_config(args) -> dict[str, Any]:
  from embed2 import sharding  # pylint: disable=g-import-not-at-top
  from embed2.data.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  from embed2.main import resolve_tasks  # pylint: disable=g-import-not-at-top
  config = input_pipeline.load_config(args.config, args.config_arg)
  mesh = sharding.make_mesh(dict(config.mesh))
  num_groups = int(config.get("data_groups", 0)) or sharding.num_batch_shards(mesh)
  tokenizer = (Tokenizer.from_file(config.tokenizer) if config.get("tokenizer")
               else Tokenizer.default())
  data = resolve_tasks(config)
  weights = run_weights(config)
  wanted = [x for x in args.streams.split(",") if x]
  out: dict[str, Any] = {"config": args.config, "config_arg": args.config_arg,
                         "num_groups": num_groups, "batches": args.config_batches,
                         "run_weights": weights}
  for variant, cfg in (("in_order", _with_lookahead(config, 0)), ("lookahead", config)):
    per: dict[str, Any] = {}
    for name, (factory, _) in input_pipeline.streams(cfg, data, tokenizer, num_groups,
                                                     wanted).items():
      it = factory()
      tok: dict[str, int] = {}
      cap: dict[str, int] = {}
      examples = slots = 0
      t0 = time.perf_counter()
      for _ in range(args.config_batches):
        b = next(it)
        examples += int(b["num_examples"])
        slots += b["example_valid"].size
        for s in packing.SIDES:
          if f"{s}_tokens" in b:
            tok[s] = tok.get(s, 0) + int(b[f"{s}_num_tokens"])
            cap[s] = cap.get(s, 0) + b[f"{s}_tokens"].size
      seconds = time.perf_counter() - t0
      r = {f"{s}_nonpad_fraction": round(tok[s] / cap[s], 4) for s in tok}
      r.update({"nonpad_fraction": round(sum(tok.values()) / sum(cap.values()), 4),
                "example_fill": round(examples / slots, 4),
                "useful_tokens_per_batch": sum(tok.values()) // args.config_batches,
                "row_tokens_per_batch": sum(cap.values()) // args.config_batches,
                "batch_s": round(seconds / args.config_batches, 4),
                "run_weight": weights.get(name, 0.0)})
      per[name] = r
    used = [n for n in per if per[n]["run_weight"] > 0]
    mix = (sum(per[n]["run_weight"] * per[n]["useful_tokens_per_batch"] for n in used) /
           sum(per[n]["run_weight"] * per[n]["row_tokens_per_batch"] for n in used)) if used else None
    out[variant] = {"streams": per, "run_mix": None if mix is None else round(mix, 4)}
  return out


def run(args: cli.Args) -> dict[str, Any]:
  """Runs the parts; returns the JSON-able results."""
  rng = np.random.default_rng(args.seed)
  out = {
      "config": {k: v for k, v in vars(args).items() if k != "out"},
      "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
               "machine": platform.machine()},
      "packing": _bench_packing(args, rng),
      "pipeline": _bench_pipeline(args, rng),
  }
  if args.config != "none":
    out["config_mix"] = _bench_config(args)
  return out


_COLUMNS = (("part", "part"), ("variant", "variant"), ("nonpad_fraction", "nonpad"),
            ("query_nonpad_fraction", "q"), ("positive_nonpad_fraction", "p"),
            ("negative_nonpad_fraction", "n"), ("example_fill", "fill"),
            ("row_tokens_per_step", "row_tok/step"), ("useful_tokens_per_s", "useful_tok/s"),
            ("steps_per_s", "steps/s"))


_CONFIG_COLUMNS = (("stream", "stream"), ("run_weight", "run steps", ".0f"),
                   ("in_order", "nonpad in order", ".4f"), ("lookahead", "nonpad lookahead", ".4f"),
                   ("in_order_fill", "fill in order", ".3f"), ("lookahead_fill", "fill lookahead", ".3f"),
                   ("batch_s", "batch s (lookahead)", ".3f"))


def _table(results: dict[str, Any]) -> str:
  rows = [dict(r, part=part, variant=variant) for part in ("packing", "pipeline")
          for variant, r in results[part].items()]
  text = common.format_table(rows, _COLUMNS)
  part = results.get("config_mix")
  if part:
    a, b = part["in_order"], part["lookahead"]
    rows = [{"stream": n, "run_weight": r["run_weight"], "in_order": a["streams"][n]["nonpad_fraction"],
             "lookahead": r["nonpad_fraction"], "in_order_fill": a["streams"][n]["example_fill"],
             "lookahead_fill": r["example_fill"], "batch_s": r["batch_s"]}
            for n, r in b["streams"].items()]
    rows.append({"stream": "run mix", "in_order": a["run_mix"], "lookahead": b["run_mix"]})
    text += f"\n\nconfigs/{part['config']}.py streams, {part['batches']} batches each:\n"
    text += common.format_table(rows, _CONFIG_COLUMNS)
  return text


def main(argv: Sequence[str]) -> dict[str, Any]:
  """The command line after the program name -> the JSON document written to --out."""
  return common.run_and_write(_args(argv), run, _table)


if __name__ == "__main__":
  cli.run(main, FLAGS)
