"""Prepare a registered task as a TFDS ArrayRecord dataset (random access, local or gs://), no TensorFlow.

  python -m embed2.prepare --task=shapes_caption,tone_description --data_dir=/data/tfds
  python -m embed2.prepare --task=coco_captions --root=/data/mscoco --data_dir=gs://bucket/tfds
  python -m embed2.prepare --task=stdlib_code_search --data_dir=DIR --limit=512 --config=code_search_512

writes DATA_DIR/embed2/CONFIG/VERSION/ (CONFIG: --config, default the task name; VERSION: --version),
which a config reads with

  config.tasks.NAME.source = "tfds:embed2/CONFIG:VERSION"   (":VERSION" optional: the newest)
  config.tasks.NAME.data_dir = DATA_DIR

Any task of data_pipelines.tasks.TASKS: the stdlib tasks, the generated media tasks, and the real
datasets of data_pipelines/media_datasets.py read from their native layout in --root (default:
$EMBED2_DATA_DIR/<dir>). Records hold encoded media (the files' own bytes; generated arrays as PNG /
float WAV / .npy, lossless) and the builder's content ids, in the builder's order
(embed2/data/tfds_source.py has the layout). Example i of a prepared split is the builder's example i.

Resumable: the splits are written shard by shard, and embed2_prepare.json in the version folder records
the finished ones; a killed or failed run, run again with the same flags, writes only what is missing.
dataset_info.json is written last, so a dataset reads as complete only once it is (readers refuse a
folder without it). A folder that holds another dataset (another task, limit, splits or examples) is
never written over: the run stops and says so.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import math
import os
import tempfile
from typing import Any, Callable, Sequence

import tensorflow_datasets as tfds
import tqdm
from absl import flags
from absl import logging
from etils import epath

from data_pipelines import media_datasets
from data_pipelines import tasks as task_defs
from embed2 import cli
from embed2.data import tfds_source

FLAGS = flags.FlagValues()
flags.DEFINE_list("task", None, "Tasks of data_pipelines.tasks.TASKS (comma-separated), prepared one "
                  "after the other.", flag_values=FLAGS)
flags.DEFINE_string("data_dir", None, "TFDS data dir: DATA_DIR/embed2/CONFIG/VERSION is written (local or gs://).",
                    flag_values=FLAGS)
flags.DEFINE_string("config", "", "TFDS config name (default: the task name; one task only).",
                    flag_values=FLAGS)
flags.DEFINE_string("version", tfds_source.VERSION, "Dataset version (X.Y.Z).", flag_values=FLAGS)
flags.DEFINE_list("splits", ["train", "eval"], "Splits to write.", flag_values=FLAGS)
flags.DEFINE_integer("limit", 0, "Write the first LIMIT examples of each split (0: all).", flag_values=FLAGS)
flags.DEFINE_string("root", "", "A real dataset's folder (data_pipelines/media_datasets.py; default: "
                    "$EMBED2_DATA_DIR/<dir>).", flag_values=FLAGS)
flags.DEFINE_float("shard_mib", 256.0, "Target shard size in MiB (estimated from the first examples).",
                   flag_values=FLAGS)
flags.DEFINE_integer("examples_per_shard", 0, "Examples per shard (0: by --shard_mib).", flag_values=FLAGS)
flags.DEFINE_integer("workers", 1, "Threads encoding examples (media encoders release the GIL).",
                     flag_values=FLAGS)
flags.DEFINE_bool("progress", True, "Show a progress bar per split.", flag_values=FLAGS)
flags.mark_flags_as_required(["task", "data_dir"], flag_values=FLAGS)

STATE_FILE = "embed2_prepare.json"  # in the version folder, while a preparation is unfinished
_SIZE_SAMPLE = 16  # examples encoded to estimate the bytes per example (the shard plan)
_FINGERPRINT_SAMPLE = 8  # examples per split whose ids identify the data


def _examples_fn(task: str, root: str) -> Callable[[str], Sequence[dict]]:
  """split -> the task's examples, as the training run builds them."""
  if task not in task_defs.TASKS:
    raise ValueError(f"--task={task!r} is unknown; known tasks: {sorted(task_defs.TASKS)}")
  if root:
    if task not in media_datasets.DATASETS:
      raise ValueError(f"--root is for the real datasets {sorted(media_datasets.DATASETS)}; "
                       f"{task!r} is generated: drop --root")
    return lambda split: task_defs.TASKS[task](split, root=root)
  return lambda split: task_defs.build_task(task, split)


def _fingerprint(sources: dict[str, Sequence[dict]]) -> str:
  """A hash of each split's size and the content ids of its first examples: two runs that would write
  different records (another Python's stdlib, another dataset root) disagree here."""
  h = hashlib.blake2b(digest_size=8)
  for split, ex in sources.items():
    h.update(f"{split}:{len(ex)}".encode())
    for i in range(min(len(ex), _FINGERPRINT_SAMPLE)):
      e = ex[i]
      h.update(f"{e['query_id']},{e['positive_id']};".encode())
  return h.hexdigest()


def _plan(builder: tfds_source.Embed2, split: str, n: int, shard_bytes: float,
          examples_per_shard: int) -> list[list[int]]:
  """[start, stop) example ranges of the split's shards: `examples_per_shard` each, or about
  `shard_bytes` each (estimated from the first examples) when that is 0."""
  if n == 0:
    return []
  if examples_per_shard:
    return [[a, min(a + examples_per_shard, n)] for a in range(0, n, examples_per_shard)]
  sample = [builder.info.features.serialize_example(r)
            for _, r in builder._generate_examples(split, 0, min(n, _SIZE_SAMPLE))]  # pylint: disable=protected-access
  per_example = sum(len(s) for s in sample) / len(sample)
  k = max(1, min(n, math.ceil(n * per_example / shard_bytes)))
  return [[n * j // k, n * (j + 1) // k] for j in range(k)]


def _is_remote(path: epath.Path) -> bool:
  return "://" in os.fspath(path)


def _write_shard(records, dst: epath.Path) -> int:
  """Writes (key, serialized) pairs as one ArrayRecord file at `dst`, whole or not at all (a local
  file is renamed into place; a remote one is uploaded once written); returns the bytes of records."""
  adapter = tfds.core.file_adapters.ADAPTER_FOR_FORMAT[tfds.core.FileFormat.ARRAY_RECORD]
  size = [0]

  def counted():
    for key, data in records:
      size[0] += len(data)
      yield key, data

  if _is_remote(dst):
    with tempfile.TemporaryDirectory() as tmp:
      local = epath.Path(tmp) / dst.name
      adapter.write_examples(local, counted())
      local.copy(dst, overwrite=True)
  else:
    tmp = dst.parent / (dst.name + ".incomplete")  # a kill leaves it; the next run writes it anew
    try:
      adapter.write_examples(tmp, counted())
    except BaseException:
      tmp.unlink(missing_ok=True)
      raise
    tmp.rename(dst)
  return size[0]


def _describe(identity: dict[str, Any]) -> str:
  return (f"task {identity.get('task')!r}, limit {identity.get('limit')}, splits {identity.get('splits')}, "
          f"examples {identity.get('examples')}")


def _refuse(out: epath.Path, theirs: dict[str, Any] | None, ours: dict[str, Any]) -> ValueError:
  held = _describe(theirs) if theirs else "a dataset embed2.prepare did not write"
  return ValueError(f"{out} holds another dataset ({held}), not this one ({_describe(ours)}); it is "
                    "left as it is. Give another --config or --version, or delete that folder to replace it")


def prepare(task: str, *, data_dir: str, config: str = "", version: str = tfds_source.VERSION,
            splits: Sequence[str] = ("train", "eval"), limit: int = 0, root: str = "",
            shard_mib: float = 256.0, examples_per_shard: int = 0, workers: int = 1,
            progress: bool = True) -> dict[str, Any]:
  """Writes (or finishes) task `task` as DATA_DIR/embed2/CONFIG/VERSION; see the module docstring.

  Returns:
    {"path", "source" (the config's tfds: string), "examples": {split: n}, "written": {split: shards
    written by this call}, "complete": True}.

  Raises:
    ValueError: an unknown task, bad flags, or a folder holding another dataset (left untouched).
    FileNotFoundError: a real dataset's files are missing (data_pipelines.media_datasets).
  """
  if limit < 0:
    raise ValueError(f"--limit={limit} must be >= 0 (0: every example)")
  if shard_mib <= 0 or examples_per_shard < 0:
    raise ValueError(f"--shard_mib={shard_mib} must be > 0 and --examples_per_shard={examples_per_shard} >= 0")
  if not splits or len(set(splits)) != len(splits):
    raise ValueError(f"--splits={','.join(splits)} must name distinct splits, e.g. train,eval")
  if not tfds_source._VERSION_RE.match(version):  # pylint: disable=protected-access
    raise ValueError(f"--version={version!r} must be X.Y.Z, e.g. {tfds_source.VERSION}")
  examples_fn = _examples_fn(task, root)
  sources = {}
  for s in splits:
    ex = examples_fn(s)
    sources[s] = ex if not limit or len(ex) <= limit else tfds_source._Head(ex, limit)  # pylint: disable=protected-access
  identity = {"task": task, "limit": int(limit), "splits": list(splits),
              "examples": {s: len(ex) for s, ex in sources.items()}, "fingerprint": _fingerprint(sources)}
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # TFDS warns "Using custom data configuration" of any config made here
  try:
    builder = tfds_source.Embed2(task=task, examples=sources.__getitem__, splits=splits, limit=limit,
                                 identity=identity, config=config, version=version, data_dir=data_dir)
  finally:
    logging.set_verbosity(verbosity)
  out = epath.Path(builder.data_path)
  ref = tfds_source.DatasetRef(tfds_source.NAME, builder.builder_config.name, version)
  result = {"path": os.fspath(out), "source": str(ref), "examples": identity["examples"],
            "written": {s: 0 for s in splits}, "complete": True}
  state_path = out / STATE_FILE
  if (out / tfds_source.INFO_FILE).exists():
    theirs = tfds_source._embed2_meta(out)  # pylint: disable=protected-access
    if not theirs or {k: v for k, v in theirs.items() if k != "schema"} != identity:
      raise _refuse(out, theirs, identity)
    print(f"{out} is already prepared ({_describe(identity)}); nothing to do")
    return result
  if state_path.exists():
    state = json.loads(state_path.read_text())
    if state["identity"] != identity:
      raise _refuse(out, state["identity"], identity)
  else:
    if out.exists() and any(p.name != STATE_FILE for p in out.iterdir()):
      raise _refuse(out, None, identity)
    state = {"identity": identity,
             "plan": {s: _plan(builder, s, len(sources[s]), shard_mib * 2**20, examples_per_shard)
                      for s in splits},
             "done": {s: {} for s in splits}}
    out.mkdir(parents=True, exist_ok=True)
    state_path.write_text(json.dumps(state, indent=1))

  features = builder.info.features
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    for split in splits:
      plan = state["plan"][split]
      template = tfds.core.ShardedFileTemplate(data_dir=out, dataset_name=builder.name, split=split,
                                               filetype_suffix="array_record")
      done = state["done"][split]
      bar = tqdm.tqdm(total=len(sources[split]), initial=sum(b - a for k, (a, b) in enumerate(plan) if str(k) in done),
                      desc=f"{ref} {split}", unit=" examples", disable=not progress, mininterval=1.0)
      with bar:
        for k, (start, stop) in enumerate(plan):
          if str(k) in done:
            continue

          def record(i, split=split):
            return i, features.serialize_example(tfds_source.encode_example(
                sources[split][i], f"task {task!r} {split} example {i}"))

          def records(start=start, stop=stop):
            for key_data in pool.map(record, range(start, stop)):
              bar.update(1)
              yield key_data

          num_bytes = _write_shard(records(), template.sharded_filepath(shard_index=k, num_shards=len(plan)))
          done[str(k)] = [stop - start, num_bytes]
          state_path.write_text(json.dumps(state, indent=1))
          result["written"][split] += 1

  infos = []
  for split in splits:
    plan, done = state["plan"][split], state["done"][split]
    infos.append(tfds.core.SplitInfo(
        name=split, shard_lengths=[done[str(k)][0] for k in range(len(plan))],
        num_bytes=sum(done[str(k)][1] for k in range(len(plan))),
        filename_template=tfds.core.ShardedFileTemplate(data_dir=out, dataset_name=builder.name, split=split,
                                                        filetype_suffix="array_record")))
  builder.info.set_splits(tfds.core.SplitDict(infos))
  builder.info.write_to_directory(out)  # features.json, metadata.json, then dataset_info.json: complete
  state_path.unlink()
  print(f"prepared {out}: {identity['examples']}; read it with source={str(ref)!r}, data_dir={data_dir!r}")
  return result


def main(argv: Sequence[str]) -> dict[str, dict[str, Any]]:
  """Prepares each --task; returns {task: `prepare`'s result}."""
  args = cli.parse(FLAGS, argv)
  if args.config and len(args.task) > 1:
    raise ValueError(f"--config names one dataset; give one --task with it, not {len(args.task)}")
  return {task: prepare(task, data_dir=args.data_dir, config=args.config, version=args.version,
                        splits=tuple(args.splits), limit=args.limit, root=args.root,
                        shard_mib=args.shard_mib, examples_per_shard=args.examples_per_shard,
                        workers=args.workers, progress=args.progress)
          for task in args.task}


if __name__ == "__main__":
  cli.run(main, FLAGS)
