"""Input pipeline vs train step: examples/s the grain pipeline delivers per host, per modality, against
what the train step consumes at the same batches.

    python -m embed2.bench.input_pipeline                       # configs/demo.py: tasks, batches, model
    python -m embed2.bench.input_pipeline --config_arg=batch=128 --batches=30
    python -m embed2.bench.input_pipeline --config=tiny --toy --out=/tmp/input_pipeline.json

Streams (table rows): the config's first stage if it is a PFT stage (one mixed batch shape) and every
task of `config.tasks` as a fine-tuning stream of its own (each FT task has its own batch shape).

  pipeline   `pipeline.build_pft_iterator` / `build_ft_iterator` exactly as the trainer builds them
             (tokenization with the package tokenizer, packing, one process, no grain workers: the
             calling thread does the work); `--batches` next() calls after one untimed call.
             Build time (tokenizing the row-suggestion sample) is reported apart.
  train step the trainer's compiled step (`StepFunctions`) on the first batch of each stream, the
             config's own model; every stream once per round, one state threaded, median step time.

examples/s count valid examples (`num_examples`); the ratio is pipeline / train step (the target:
>= 3x for every modality). On a CPU-only host the two compete for the same cores in a real run; here
each is measured alone. A stream's modality is what its examples hold besides text (a task of
captions -> images is "image", an interleaved image + text query is "image"; the PFT mixture is
"mixed"); the per-modality ratio is the lowest of its streams. A modality no stream holds (e.g. any
media with `--config=tiny`, or with `--config_arg=media=false`) is reported as "n/a: no stream".
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from absl import flags

from embed2 import cli
from embed2.bench import common
from embed2.bench import train_step as ts

MODALITIES = ("text", "image", "audio", "video")
NO_STREAM = "n/a: no stream"


CONFIGS = ("demo", "tiny")


def load_config(name: str, arg: str = ""):
  """configs/{name}.py's config with its knobs `arg` (e.g. "batch=128"), normalised as the trainer
  reads it."""
  from configs import demo, tiny  # pylint: disable=g-import-not-at-top
  from embed2.train import trainer  # pylint: disable=g-import-not-at-top
  get = {"demo": demo.get_config, "tiny": tiny.get_config}[name]
  return trainer.normalize(get(arg or None))


FLAGS = common.program_flags("input_pipeline")  # --out, --toy, and this program's own:
flags.DEFINE_enum("config", "demo", CONFIGS,
                  "configs/demo.py (stdlib tasks) or configs/tiny.py (generated tasks)", flag_values=FLAGS)
flags.DEFINE_string("config_arg", "", "the config's knobs, e.g. 'batch=128,layers=2'", flag_values=FLAGS)
flags.DEFINE_string("streams", "", "comma-separated stream names (default: all)", flag_values=FLAGS)
flags.DEFINE_integer("batches", 20, "timed next() calls per stream", flag_values=FLAGS)
flags.DEFINE_integer("steps", 5, "timed train-step rounds", flag_values=FLAGS)


def _args(argv: Sequence[str]) -> cli.Args:
  args = cli.parse(FLAGS, argv)
  if args.toy:
    args.batches, args.steps = 3, 1
    args.config_arg = args.config_arg or "layers=1,batch=16"
  return args


def streams(config, data, tokenizer, num_groups: int, wanted: Sequence[str] = ()):
  """name -> (iterator factory, loss config): the config's first PFT stage as the trainer builds it,
  and every task of `config.tasks` as a fine-tuning stream of its own; `wanted` names a subset."""
  from embed2.data import pipeline  # pylint: disable=g-import-not-at-top
  from embed2.train import trainer  # pylint: disable=g-import-not-at-top
  out = {}
  for si, stage in enumerate(config.stages):
    if stage.mode == "pft":
      out[stage.name] = (
          lambda stage=stage, si=si: trainer.stage_iterator(config, stage, data, tokenizer,
                                                            num_groups, si),
          trainer.loss_config(config))
      break
  for name, tc in config.tasks.items():
    if name not in data or not len(data[name].train):  # pylint: disable=g-explicit-length-test
      continue

    def build(name=name, tc=tc):
      task = pipeline.TaskSpec(name=name, examples=data[name].train, rate=1.0,
                               task_string=tc.get("task_string", ""),
                               p_drop=float(tc.get("p_drop", 0.0)),
                               batch=trainer.batch_spec(tc, f"config.tasks.{name}"))
      return pipeline.build_ft_iterator([task], tokenizer=tokenizer, num_groups=num_groups,
                                        seed=int(config.seed),
                                        encoder=trainer.input_encoder(config, tokenizer))

    out[name] = (build, trainer.loss_config(config, tc))
  if wanted:
    unknown = sorted(set(wanted) - set(out))
    if unknown:
      raise ValueError(f"--streams names {unknown}; this config has streams {sorted(out)}")
    out = {k: v for k, v in out.items() if k in wanted}
  return out


def run(args: cli.Args) -> dict[str, Any]:
  """Measures every stream's pipeline and train step; returns the JSON-able results."""
  from embed2 import sharding  # pylint: disable=g-import-not-at-top
  from embed2.data.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  from embed2.main import resolve_tasks  # pylint: disable=g-import-not-at-top
  from embed2.train import step as step_lib  # pylint: disable=g-import-not-at-top
  from embed2.train import trainer  # pylint: disable=g-import-not-at-top

  config = load_config(args.config, args.config_arg)
  mesh = sharding.make_mesh(dict(config.mesh))
  rules = tuple(tuple(r) for r in config.sharding_rules)
  num_groups = int(config.get("data_groups", 0)) or sharding.num_batch_shards(mesh)
  tokenizer = (Tokenizer.from_file(config.tokenizer) if config.get("tokenizer")
               else Tokenizer.default())
  t0 = time.perf_counter()
  data = resolve_tasks(config)
  load_s = time.perf_counter() - t0
  wanted = [s for s in args.streams.split(",") if s]
  built = streams(config, data, tokenizer, num_groups, wanted)

  rows: dict[str, dict[str, Any]] = {}
  first_batches = {}
  for name, (factory, _) in built.items():
    t0 = time.perf_counter()
    it = factory()
    build_s = time.perf_counter() - t0
    first_batches[name] = next(it)  # untimed: first-epoch permutation, lazy set-up
    times, examples, tokens = [], 0, 0
    t_all = time.perf_counter()
    for _ in range(args.batches):
      t0 = time.perf_counter()
      b = next(it)
      times.append(time.perf_counter() - t0)
      examples += int(b["num_examples"])
      tokens += int(b["num_tokens"])
    seconds = time.perf_counter() - t_all
    rows[name] = {"build_s": round(build_s, 3), "batch_examples": int(first_batches[name]["num_examples"]),
                  "pipeline_batch_s": common.summary(times),
                  "pipeline_examples_per_s": examples / seconds,
                  "pipeline_tokens_per_s": tokens / seconds}

  trainee = trainer.build_trainee(config, mesh, rules)
  graphdef, state, state_shardings = ts.make_state(trainee, mesh)
  del trainee
  steps = step_lib.StepFunctions(graphdef, state_shardings, mesh, num_groups)
  fns = {}
  for name, (_, loss_cfg) in built.items():
    batch = step_lib.device_batch(first_batches[name], mesh)
    t0 = time.perf_counter()
    compiled = steps.get(name, loss_cfg, state, batch)
    rows[name]["step_compile_s"] = round(time.perf_counter() - t0, 2)
    fns[name] = (compiled, batch)
  thread = ts.StateThread(state)
  del state
  times = common.interleaved({n: thread.runner(c, b) for n, (c, b) in fns.items()},
                             repeats=args.steps, warmup=1)
  for name, r in rows.items():
    step_s = common.summary(times[name])
    r["step_s"] = step_s
    r["step_examples_per_s"] = r["batch_examples"] / step_s["median_s"]
    r["ratio"] = r["pipeline_examples_per_s"] / r["step_examples_per_s"]
    r["modality"] = _modality(data[name].train) if name in data else "mixed"
  by_modality = {}
  for name, r in rows.items():
    by_modality.setdefault(r["modality"], []).append(name)
  return {
      "benchmark": "input_pipeline", "host": common.host_info(),
      "config": {"config": args.config, "config_arg": args.config_arg, "batches": args.batches,
                 "steps": args.steps, "num_groups": num_groups, "model": config.model.to_dict()},
      "task_load_s": round(load_s, 2),
      "per_host": "one process: the whole global batch is this host's",
      "streams": rows,
      "modalities": {m: ({"min_ratio": min(rows[n]["ratio"] for n in by_modality[m]),
                          "streams": sorted(by_modality[m])} if m in by_modality else NO_STREAM)
                     for m in MODALITIES},
  }


def _modality(examples) -> str:
  """What a task's first example holds besides text ("text" when nothing)."""
  from embed2.data import segments  # pylint: disable=g-import-not-at-top
  ex = examples[0]
  found = segments.modalities_of(ex["query"]) | segments.modalities_of(ex["positive"])
  media = [m for m in MODALITIES[1:] if m in found]
  return media[-1] if media else "text"  # video over audio over image (a video has frames)


COLUMNS = (("name", "stream"), ("modality", "modality"), ("batch_examples", "B"),
           ("pipeline_examples_per_s", "pipeline ex/s", ".1f"),
           ("pipeline_tokens_per_s", "pipeline tok/s", ".0f"),
           ("step_examples_per_s", "step ex/s", ".1f"), ("ratio", "pipeline/step", ".2f"),
           ("build_s", "build s", ".2f"), ("step_compile_s", "compile s", ".1f"))


def report(result: dict[str, Any]) -> str:
  rows = [dict(v, name=k) for k, v in result["streams"].items()]
  rows += [{"name": "-", "modality": m, "ratio": result["modalities"][m]}
           for m in MODALITIES if not isinstance(result["modalities"][m], dict)]
  host = result["host"]
  mins = ", ".join(f"{m} {v['min_ratio']:.2f}x" for m, v in result["modalities"].items()
                   if isinstance(v, dict))
  return (common.format_table(rows, COLUMNS) +
          f"\n{host['cpus']} CPUs, {host['num_devices']} {host['device_kind']} device(s), jax "
          f"{host['jax']}; lowest pipeline/step ratio per modality: {mins}")


def main(argv: Sequence[str]) -> dict[str, Any]:
  """The command line after the program name -> the JSON document written to --out."""
  return common.run_and_write(_args(argv), run, report)


if __name__ == "__main__":
  cli.run(main, FLAGS)
