"""The main job: train every stage of a config, evaluate, and (optionally) soup fine-tuned variants.

  python -m embed2.main --config=configs/demo.py --workdir=/tmp/embed2_demo
  python -m embed2.main --config=configs/demo.py --workdir=DIR --config.stages[1].steps=50

Re-running the same command on the same workdir resumes from the last finished checkpoint. SIGTERM
saves a checkpoint at the current step and exits with code 0.

This entry point is the one place where `embed2` reads `data_pipelines`: it resolves each task's
`source` name (config.tasks.NAME.source) through `data_pipelines.tasks.TASKS`, or reads a prepared
TFDS dataset (`source="tfds:embed2/TASK"`, `data_dir=...`; `python -m embed2.prepare` writes them).
"""

from __future__ import annotations

import json
import logging as pylogging
import os
import sys
from typing import Any

import jax
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from data_pipelines import tasks as task_defs
from embed2 import checkpoint as ckpt_lib
from embed2 import distributed
from embed2 import evaluate
from embed2 import sharding
from embed2 import soup as soup_lib
from embed2.data import tfds_source
from embed2.eval import suites
from embed2.train import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:args]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and eval results go (a local path, gs:// or s3://).")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
_INIT_TIMEOUT = flags.DEFINE_integer("init_timeout", 120, "Seconds to wait for the coordinator.")

# Where embed2's own log lines come from (its stages, checkpoints, evaluations, data warnings).
_OWN_CODE = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (ckpt_lib, task_defs))


class LibrariesAtWarning(pylogging.Filter):
  """Passes WARNING and above from anyone, and INFO / DEBUG only from embed2 and data_pipelines.

  Orbax logs through absl's own logger, like embed2, so a logger's name cannot tell them apart; the
  file a record comes from can (absl and the standard library both record the caller's path).
  """

  def filter(self, record: pylogging.LogRecord) -> bool:
    return record.levelno >= pylogging.WARNING or record.pathname.startswith(_OWN_CODE)


def quiet_libraries() -> None:
  """Libraries (orbax, jax, grain, tensorboardX, ...) log at WARNING: the terminal keeps the progress
  bar, embed2's lines (a stage, a checkpoint, an evaluation) and the tables. Idempotent."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, LibrariesAtWarning) for f in handler.filters):
    handler.addFilter(LibrariesAtWarning())


def resolve_tasks(config) -> dict[str, trainer.TaskData]:
  """Task name -> its train/eval examples, from `config.tasks.NAME.source`: a task name of
  data_pipelines.tasks.TASKS (its Python builder), or "tfds:NAME[/CONFIG][:VERSION]", a TFDS ArrayRecord
  dataset in `config.tasks.NAME.data_dir` (local or gs://; `python -m embed2.prepare` writes them from
  the builders; one prepared elsewhere also needs `config.tasks.NAME.fields`: see
  embed2/data/tfds_source.py).

  Real datasets skip (and count) examples whose media file is missing, up to
  `config.max_skipped_fraction` of a split: the same limit the trainer puts on undecodable records.

  Raises:
    ValueError / FileNotFoundError: an unknown task, a tfds: dataset that is missing, incomplete, of
      another version or without the train or eval split; the message names config.tasks.NAME and the fix.
  """
  max_skipped = trainer.max_skipped_fraction(config)
  data = {}
  for name, tc in config.tasks.items():
    source = tc.get("source", name)
    where = f"config.tasks.{name}"
    if tfds_source.is_tfds(source):
      fields = tc.get("fields")
      kw = dict(data_dir=str(tc.get("data_dir", "")), where=where, fields=dict(fields) if fields else None)
      data[name] = trainer.TaskData(train=tfds_source.load(source, "train", **kw),
                                    eval=tfds_source.load(source, "eval", **kw))
      continue
    if source not in task_defs.TASKS:
      raise ValueError(f"{where}.source={source!r} is not a known task; known: "
                       f"{sorted(task_defs.TASKS)}, or a prepared dataset 'tfds:NAME/CONFIG:VERSION'")
    for key in ("data_dir", "fields"):
      if tc.get(key):
        raise ValueError(f"{where}.{key} is for tfds: sources; {where}.source={source!r} is a Python "
                         f"builder: drop {key}, or set source='tfds:{tfds_source.NAME}/{source}'")
    data[name] = trainer.TaskData(
        train=task_defs.build_task(source, "train", max_skipped_fraction=max_skipped),
        eval=task_defs.build_task(source, "eval", max_skipped_fraction=max_skipped))
  return data


def make_eval_fn(config, workdir):
  """eval_fn(model, step, stage) for the trainer: the config's suite (compiled once, reading the live
  weights at every call); results also in DIR/eval/step_STEP_STAGE.json."""
  suite = config.get("eval_suite")
  if not suite:
    return None

  tokenizer, _ = trainer.resolve_tokenizer(config)  # the one the run trains with
  evaluator = evaluate.SuiteEvaluator(suite, tokenizer=tokenizer,
                                    task_strings={n: t.get("task_string", "") for n, t in config.tasks.items()})

  def eval_fn(model, step, stage):
    results = evaluator(model, step, stage)
    if jax.process_index() == 0:
      out = epath.Path(workdir) / "eval"
      out.mkdir(parents=True, exist_ok=True)
      path = out / f"step_{step}_{stage}.json"
      path.write_text(json.dumps(results, indent=1, sort_keys=True))
      logging.info("evaluation at step %d (%s): %s; all %d scores in %s", step, stage,
                   headline(unprefixed(results)), len(results), path)
    return results

  return eval_fn


def headline(results: dict[str, float], metric: str = "ndcg@10") -> str:
  """"task metric value, ..." at the full MRL dim, for one log line (BM25 and means left out)."""
  keys = suites.full_dim_keys((k for k in results if not k.startswith(("bm25", "mean"))), metric)
  if not keys:
    return "no " + metric
  return f"{metric} at dim {keys[0].rsplit('dim_', 1)[1]}: " + ", ".join(
      f"{k.split('/')[0]} {results[k]:.3f}" for k in keys)


def unprefixed(results: dict[str, float]) -> dict[str, float]:
  """"eval/SUITE/task/metric/dim_d" -> "task/metric/dim_d"."""
  return {k.split("/", 2)[2] if k.startswith("eval/") else k: v for k, v in results.items()}


def variant_config(config, variant, workdir):
  """The config of one fine-tuning variant: the last stage again, from the previous stage's export (a
  one-stage run: from its `config.init_from`, e.g. a pretrained import), with the variant's overrides
  (`tasks` rates, `seed`, `optim` fields)."""
  config = trainer.normalize(config)
  if len(config.stages) < 2 and not config.get("init_from"):
    raise ValueError("config.soup.variants re-run the last stage from the one before it, or from "
                     "config.init_from; give config.stages two stages or set config.init_from")
  v = trainer.normalize(config)
  last = v.stages[-1]
  with v.unlocked():
    if "tasks" in variant:
      last.tasks = dict(variant["tasks"])
    if "optim" in variant:
      last.optim.update(dict(variant["optim"]))
    if "seed" in variant:
      v.seed = int(variant["seed"])
    v.stages = [last]
    if len(config.stages) > 1:
      v.init_from = str(trainer.stage_export_path(workdir, config.stages[-2].name))
  return v


def run_soup(config, workdir, data, eval_fn, main_eval: dict[str, float] | None = None) -> dict[str, Any]:
  """Fine-tunes each variant of `config.soup.variants`, soups them with the main run, evaluates all
  (the main run by `main_eval`, its end-of-stage results, when given: the same model)."""
  workdir = epath.Path(workdir)
  ingredients = {config.stages[-1].name: workdir / "checkpoints"}
  for variant in config.soup.variants:
    name = variant["name"]
    vdir = workdir / "variants" / name
    logging.info("soup: fine-tuning variant %s in %s", name, vdir)
    vconfig = variant_config(config, variant, workdir)
    r = trainer.train(vconfig, str(vdir), data)
    if r.preempted:
      return {"preempted": True}
    ingredients[name] = vdir / "checkpoints"
  out = workdir / "soup"
  if not (out / soup_lib.SOUP_JSON).exists():
    # soup.json is written last: without it, a soup checkpoint there is one a kill interrupted. The soup
    # is a function of the finished ingredients, so it is made again, over whatever was left.
    soup_lib.make_soup([str(p) for p in ingredients.values()], out=str(out),
                       method=config.soup.get("method", "uniform"),
                       weights=config.soup.get("weights") or None, overwrite=True)
  results = {}
  if eval_fn is not None:
    # Each model loads onto the run's own mesh, shard by shard (a soup of a 4B model fits where its
    # training run did).
    mesh = sharding.make_mesh(dict(config.mesh))
    rules = tuple(tuple(r) for r in config.sharding_rules)
    for name, path in list(ingredients.items()) + [("soup", out)]:
      if name == config.stages[-1].name and main_eval:
        results[name] = unprefixed(main_eval)
        continue
      model, _ = ckpt_lib.load_model(path, mesh=mesh, rules=rules)
      results[name] = unprefixed(eval_fn(model, 0, f"soup_{name}"))
    if jax.process_index() == 0:
      (workdir / "eval" / "soup.json").write_text(json.dumps(results, indent=1, sort_keys=True))
      print(soup_table(results))
  return results


def soup_table(results: dict[str, dict[str, float]], metric: str = "ndcg@10") -> str:
  """Rows: ingredients and the soup; columns: each task's `metric` at the full MRL dim."""
  names = list(results)
  keys = suites.full_dim_keys((k for r in results.values() for k in r
                               if not k.startswith(("bm25", "mean"))), metric)
  head = ["model"] + [k.split("/")[0] for k in keys]
  rows = [head] + [[n] + [f"{results[n].get(k, float('nan')):.3f}" for k in keys] for n in names]
  width = [max(len(r[i]) for r in rows) for i in range(len(head))]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, width)) for r in rows)


def run(config, workdir: str) -> dict[str, Any]:
  config = trainer.normalize(config)
  data = resolve_tasks(config)
  eval_fn = make_eval_fn(config, workdir)
  result = trainer.train(config, workdir, data, eval_fn=eval_fn)
  summary = {"global_step": result.global_step, "preempted": result.preempted,
             "skipped_steps": result.skipped_steps}
  if result.preempted:
    logging.info("preempted at step %d; re-run the same command to resume", result.global_step)
    return summary
  if eval_fn is not None:
    final = result.last_eval or eval_fn(result.trainee.model, result.global_step, "final")
    summary["eval"] = final
    if jax.process_index() == 0:
      (epath.Path(workdir) / "eval" / "final.json").write_text(json.dumps(final, indent=1, sort_keys=True))
      print(evaluate.format_table(unprefixed(final)))
  if config.get("soup") and config.soup.get("variants"):
    summary["soup"] = run_soup(config, workdir, data, eval_fn, main_eval=summary.get("eval"))
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; overrides look like --config.seed=1")
  if _CONFIG.value is None or not _WORKDIR.value:
    raise app.UsageError("--config and --workdir are required, e.g. "
                         "python -m embed2.main --config=configs/demo.py --workdir=/tmp/embed2_demo")
  if not flags.FLAGS["verbosity"].present:  # --verbosity=0 (-v 0) or more shows every library's INFO too
    quiet_libraries()
  try:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                           timeout_s=_INIT_TIMEOUT.value)
    run(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError, trainer.TrainingStopped, distributed.StartupError) as e:
    # Errors of the config, the data or the workdir: each message names the field or file and the fix.
    # (The trainer has already closed its checkpointer: pending saves of good states are committed.)
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
