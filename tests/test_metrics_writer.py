"""metrics_writer: rows go into parts written whole (never appended), and `read_metrics` gives one stream
in which a resumed run's replayed steps appear once, as the resumed run wrote them. The same on an
object store is checked by tests/test_object_store.py. TensorBoard events come without importing torch."""

import json
import os
import struct
import subprocess
import sys
import textwrap

from embed2 import explore
from embed2.train import metrics_writer
from embed2.train.metrics_writer import MetricsWriter, read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _session(workdir, steps, losses, *, eval_at=(), rows_per_part=3):
  """One writer session (a process start) logging `steps`; an eval row after the step's row at
  `eval_at`. Returns the rows as they were given (step, values)."""
  w = MetricsWriter(workdir, tensorboard=False, progress=False, rows_per_part=rows_per_part)
  given = []
  for step, loss in zip(steps, losses):
    values = {"loss": float(loss), "stage": "pft"}
    w.write(step, values)
    given.append((step, values))
    if step in eval_at:
      values = {"eval/x": float(loss) / 2}
      w.write(step, values)
      given.append((step, values))
  w.close()
  return given


def _strip(rows):
  return [(r["step"], {k: v for k, v in r.items() if k not in ("step", "time")}) for r in rows]


def test_parts_are_whole_and_bounded(tmp_path, rng):
  given = _session(tmp_path, range(1, 9), rng.normal(size=8), eval_at=(4,), rows_per_part=3)
  parts = sorted((tmp_path / "metrics").iterdir())
  assert [p.name for p in parts] == [f"part-00000-0000{i}.jsonl" for i in range(3)]
  lines = [json.loads(x) for p in parts for x in p.read_text().splitlines()]
  assert [len(p.read_text().splitlines()) for p in parts] == [3, 3, 3]
  assert _strip(lines) == given
  assert _strip(read_metrics(tmp_path)) == given
  assert not (tmp_path / "metrics.jsonl").exists()


def test_resume_replays_steps_once(tmp_path, rng):
  """Killed after step 7, resumed from the checkpoint at 4: steps 5-7 are written again (other values:
  a replay on other hardware may differ in the last bits) and step 4's eval row stays."""
  first = _session(tmp_path, range(1, 8), rng.normal(size=7), eval_at=(4,))
  second = _session(tmp_path, range(5, 11), rng.normal(size=6), eval_at=(8,))
  want = [g for g in first if g[0] <= 4] + second
  got = _strip(read_metrics(tmp_path))
  assert got == want
  steps = [s for s, v in got if "loss" in v]
  assert steps == list(range(1, 11))  # none lost, none twice
  # A second resume, from step 8 (its eval row replaced by the replay's rows, which have none).
  third = _session(tmp_path, range(9, 12), rng.normal(size=3))
  assert _strip(read_metrics(tmp_path)) == [g for g in want if g[0] <= 8] + third
  sessions = {p.name.split("-")[1] for p in (tmp_path / "metrics").iterdir()}
  assert sessions == {"00000", "00001", "00002"}


def test_legacy_metrics_jsonl_then_parts(tmp_path, rng):
  """A workdir from before the parts: one metrics.jsonl a resume appended to (steps go back), then a
  run of this version resumes it."""
  losses = rng.normal(size=9)
  legacy = [{"step": s, "time": 0.0, "loss": float(losses[i])} for i, s in enumerate([1, 2, 3, 4, 3, 4, 5])]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in legacy))
  new = _session(tmp_path, [5, 6], losses[7:])
  got = _strip(read_metrics(tmp_path))
  assert got == _strip(legacy[:2] + legacy[4:6]) + new
  assert explore.find_workdir(tmp_path / "checkpoints" / "4") == tmp_path.resolve()


def test_find_workdir_with_parts(tmp_path, rng):
  (tmp_path / "run" / "checkpoints" / "4").mkdir(parents=True)
  assert explore.find_workdir(tmp_path / "run" / "checkpoints" / "4") is None
  _session(tmp_path / "run", [1], rng.normal(size=1))
  assert explore.find_workdir(tmp_path / "run" / "checkpoints" / "4") == (tmp_path / "run").resolve()
  assert metrics_writer.has_metrics(tmp_path / "run")
  assert not metrics_writer.has_metrics(tmp_path / "run" / "checkpoints")


# What a fresh process logs with TensorBoard on: whether it imported torch, then the scalars of its event
# file (read with tensorboardX's protobufs, imported by then) as "tag step value" lines.
_TENSORBOARD_SCRIPT = textwrap.dedent("""
    import struct, sys
    from embed2.train.metrics_writer import MetricsWriter
    w = MetricsWriter(sys.argv[1], progress=False)
    for i, v in enumerate(sys.argv[2:]):
      w.write(i + 1, {"loss": float(v), "eval/ndcg@10": float(v) / 2, "stage": "pft"})
    w.close()
    print("torch imported:", "torch" in sys.modules)
    from tensorboardX.proto import event_pb2
    from tensorboardX.record_writer import masked_crc32c
    import pathlib
    [path] = (pathlib.Path(sys.argv[1]) / "tensorboard").glob("events.out.tfevents.*")
    data, pos = path.read_bytes(), 0
    while pos < len(data):
      (n,) = struct.unpack("<Q", data[pos:pos + 8])
      record = data[pos + 12:pos + 12 + n]
      assert struct.unpack("<I", data[pos + 12 + n:pos + 16 + n])[0] == masked_crc32c(record)
      event = event_pb2.Event.FromString(record)
      for v in event.summary.value:
        print(v.tag, event.step, repr(v.simple_value))
      pos += 16 + n
    import importlib.util
    print("torch findable:", importlib.util.find_spec("torch") is not None)  # ValueError on a None kept
    """)


def test_tensorboard_events_without_importing_torch(tmp_path, rng):
  """A training process logs TensorBoard scalars without importing torch (tensorboardX imports it when
  it can: ~2 s of CPU per process); the event file holds every scalar (float32) under its legal tag,
  and torch stays importable."""
  losses = [float(x) for x in rng.normal(size=3)]
  proc = subprocess.run([sys.executable, "-c", _TENSORBOARD_SCRIPT, str(tmp_path), *map(repr, losses)],
                        env=dict(os.environ, PYTHONPATH=REPO),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  assert lines[0] == "torch imported: False"
  assert lines[-1] == "torch findable: True"  # `import torch` works later in the process
  f32 = lambda x: float(struct.unpack("<f", struct.pack("<f", x))[0])
  want = [f"{tag} {step} {f32(v)!r}" for step, loss in enumerate(losses, 1)
          for tag, v in (("loss", loss), ("eval/ndcg_at_10", loss / 2))]
  assert lines[1:-1] == want
  assert [r["loss"] for r in read_metrics(tmp_path)] == list(losses)
