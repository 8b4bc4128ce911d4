"""A terminal a person can read: the main job's stderr holds embed2's own lines (a stage, a checkpoint,
an evaluation) and warnings, not the INFO lines of orbax, jax, grain or tensorboardX, and no
TensorBoard tag warning; TensorBoard tags are legal as written while metrics.jsonl keeps '@'."""

import json
import logging
import os
import pathlib
import re
import struct
import subprocess
import sys

import pytest

from embed2 import main as main_lib
from embed2.train.metrics_writer import read_metrics, tb_tag

REPO = pathlib.Path(__file__).resolve().parents[1]
# absl's line prefix: level letter, date, time, thread id, file:line]
ABSL_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+ +\d+ ([^:\s]+):(\d+)\] (.*)$")
# tiny's PFT stage alone (one compiled step) with one transformer block, evaluated on the toy MTEB task
# at its end.
ONE_STAGE_TINY = """
from configs import tiny


def get_config(arg=None):
  c = tiny.get_config("pft_steps=2,every=100,eval=mteb_retrieval,layers=1")
  c.stages = [c.stages[0]]
  return c
"""
WORDS = ("tar zip json socket thread queue heap csv path glob regex hash random math time date "
         "locale codec pickle shelve email mime http url cookie struct array").split()


def _own_log_calls() -> set[tuple[str, int]]:
  """(basename, line) of every `logging.` call in embed2 and data_pipelines: the lines a quiet run may
  print at INFO."""
  calls = set()
  for pkg in ("embed2", "data_pipelines"):
    for path in (REPO / pkg).rglob("*.py"):
      for n, line in enumerate(path.read_text().splitlines(), 1):
        if "logging." in line:
          calls.add((path.name, n))
  return calls


def _write_beir_task(root: pathlib.Path, rng) -> None:
  """A toy MTEB retrieval task (BEIR layout) under root/mteb_retrieval/toy: documents of random words,
  each query a few words of one document."""
  task = root / "mteb_retrieval" / "toy"
  (task / "qrels").mkdir(parents=True)
  docs = [" ".join(rng.choice(WORDS, size=8)) for _ in range(12)]
  with open(task / "corpus.jsonl", "w") as f:
    for i, d in enumerate(docs):
      f.write(json.dumps({"_id": f"d{i}", "title": "", "text": d}) + "\n")
  with open(task / "queries.jsonl", "w") as f:
    for i, d in enumerate(docs):
      f.write(json.dumps({"_id": f"q{i}", "text": " ".join(d.split()[:3])}) + "\n")
  (task / "qrels" / "test.tsv").write_text(
      "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(len(docs))))


def _tensorboard_tags(logdir: pathlib.Path) -> set[str]:
  """Scalar tags of every event file under `logdir` (TFRecord framing read by hand: no TensorFlow)."""
  from tensorboardX.proto import event_pb2  # tensorboardX's own protobufs; heavy, only here
  tags = set()
  for path in logdir.rglob("events.out.tfevents.*"):
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
      (n,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])  # after length and its crc
      tags.update(v.tag for v in event.summary.value)
      pos += 12 + n + 4
  return tags


def test_main_job_stderr_has_only_embed2_lines_and_legal_tensorboard_tags(tmp_path, rng):
  _write_beir_task(tmp_path / "data", rng)
  workdir = tmp_path / "run"
  (tmp_path / "one_stage_tiny.py").write_text(ONE_STAGE_TINY)
  env = dict(os.environ, XLA_FLAGS=f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu", EMBED2_DATA_DIR=str(tmp_path / "data"),
             PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
  cmd = [sys.executable, "-m", "embed2.main", f"--config={tmp_path / 'one_stage_tiny.py'}",
         f"--workdir={workdir}"]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]

  own = _own_log_calls()
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  parsed = [ABSL_LINE.match(line) for line in lines]
  strays = [line for line, m in zip(lines, parsed) if m is None]
  assert not strays, "stderr lines not from logging:\n" + "\n".join(strays[:20])
  foreign = [m.group(0) for m in parsed if m.group(1) == "I" and (m.group(2), int(m.group(3))) not in own]
  assert not foreign, "INFO lines from other libraries:\n" + "\n".join(foreign[:20])
  assert "Summary name" not in proc.stderr and "is illegal" not in proc.stderr

  # What a person reads: one line per stage, per checkpoint, per evaluation; the table on stdout.
  infos = [m.group(4) for m in parsed if m.group(1) == "I"]
  assert [s for s in infos if s.startswith("stage ")] == ["stage pft: 2 steps"]
  assert sum(s.startswith("checkpoint: saving step 2") for s in infos) == 2  # the stage export + ckpt
  evals = [s for s in infos if s.startswith("evaluation at step")]
  assert len(evals) == 1 and evals[0].startswith("evaluation at step 2 (pft): ndcg@10 at dim 64: toy ")
  assert re.search(r"^toy +ndcg@10 +[\d.]+", proc.stdout, re.M), proc.stdout

  tags = _tensorboard_tags(workdir / "tensorboard")
  assert "eval/mteb_retrieval/toy/ndcg_at_10/dim_64" in tags and "loss/dim_16" in tags, sorted(tags)
  assert all(re.fullmatch(r"[-/\w.]+", t) for t in tags), sorted(tags)
  keys = {k for row in read_metrics(workdir) for k in row}
  assert "eval/mteb_retrieval/toy/ndcg@10/dim_64" in keys  # the JSON keeps the metric's own name


def test_tensorboard_tags():
  assert tb_tag("eval/demo/code_search/ndcg@10/dim_128") == "eval/demo/code_search/ndcg_at_10/dim_128"
  assert tb_tag("loss/dim_16") == "loss/dim_16"
  assert tb_tag("/a b:c@1") == "a_b_c_at_1"


def test_libraries_log_at_warning_embed2_at_info():
  keep = main_lib.LibrariesAtWarning()

  def record(level, path):
    return logging.LogRecord("absl", level, path, 1, "msg", None, None)

  orbax = "/site-packages/orbax/checkpoint/_src/path/atomicity.py"
  own = os.path.join(os.path.dirname(main_lib.__file__), "checkpoint.py")
  data = os.path.join(REPO, "data_pipelines", "media_datasets.py")
  assert not keep.filter(record(logging.INFO, orbax))
  assert not keep.filter(record(logging.DEBUG, orbax))
  assert keep.filter(record(logging.WARNING, orbax)) and keep.filter(record(logging.ERROR, orbax))
  assert keep.filter(record(logging.INFO, own)) and keep.filter(record(logging.INFO, data))
