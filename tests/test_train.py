"""The training system: two stages end to end (from the builders and from prepared sources), frozen
parameters, SIGTERM, guard rails, bad config.

Runs that only read a finished run share one (`finished_run`, copied before anything changes it); faults
(non-finite batches, SIGTERM) come from the trainer's test seam, embed2/train/faults.py.
"""

import io
import json
import os
import shutil
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest
import sentencepiece as spm
from flax import nnx
from PIL import Image as PILImage

from configs import tiny
from embed2 import checkpoint as ckpt_lib
from embed2 import prepare
from embed2.data import tfds_source
from embed2.data import tokenizer as tokenizer_lib
from embed2.main import resolve_tasks
from embed2.train import faults
from embed2.train import trainer
from embed2.train.metrics_writer import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(arg="", **overrides):
  c = tiny.get_config(arg)
  for k, v in overrides.items():
    c[k] = v
  return c


@pytest.fixture(scope="module")
def data():
  return resolve_tasks(config())


def run_main(workdir, arg="", *flags, check=True, env_devices=4, extra_env=None):
  env = dict(os.environ, XLA_FLAGS=f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count={env_devices}",
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  env.pop(faults.ENV, None)
  env.update(extra_env or {})
  cmd = [sys.executable, "-m", "embed2.main", f"--config={REPO}/configs/tiny.py" + (f":{arg}" if arg else ""),
         f"--workdir={workdir}", *flags]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  if check and proc.returncode != 0:
    raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-3000:]}")
  return proc


# ------------------------------------------------------------------------------ smoke

# The one finished run the tests below read: two stages, FT with the embedder and the first block frozen.
FINISHED = "pft_steps=3,ft_steps=8,every=100"
FROZEN = ("transformer/embedder", "transformer/blocks/0/")


def finished_config(arg="", **overrides):
  c = config(FINISHED + (f",{arg}" if arg else ""), **overrides)
  c.stages[1].freeze = FROZEN
  return c


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data):
  """(workdir, TrainResult) of `finished_config()`; a test that writes to it works on a copy (`copy_of`)."""
  workdir = tmp_path_factory.mktemp("finished")
  return workdir, trainer.train(finished_config(), str(workdir), data)


def copy_of(finished_run, where):
  shutil.copytree(finished_run[0], where)
  return where


def test_two_stages_end_to_end(finished_run):
  workdir, result = finished_run
  assert result.global_step == 11 and not result.preempted
  rows = read_metrics(workdir)
  pft = [r for r in rows if r["stage"] == "pft"]
  ft = [r for r in rows if r["stage"] == "ft"]
  assert len(pft) == 3 and all(r["task"] == "mixture" for r in pft)
  assert {r["task"] for r in ft} == {"pairs", "labels"}  # single-task batches, both sampled
  # Two different per-task batch sizes in FT: the examples of each task's batches differ.
  n_valid = {r["task"]: r["num_valid"] for r in ft}
  assert n_valid["pairs"] > n_valid["labels"]
  # One compiled step for PFT, one per FT task shape: compiled once and cached.
  assert result.compiled_steps == 3
  for r in rows:
    for key in ("loss", "loss/dim_16", "temperature", "grad_norm", "examples_per_s", "tokens_per_s",
                "nonpad_fraction"):
      assert key in r and np.isfinite(r[key]), (key, r)
  assert os.path.isdir(workdir / "tensorboard") and os.listdir(workdir / "tensorboard")
  # Stage ends are always checkpointed.
  assert ckpt_lib.Checkpointer(workdir / "checkpoints", read_only=True).all_steps() == [3, 11]


def test_a_run_from_prepared_sources_has_the_finished_runs_losses(finished_run, tmp_path):
  """The finished run's tasks prepared whole (`python -m embed2.prepare`: ArrayRecord in a TFDS folder)
  and read back through config.tasks.NAME.source = "tfds:embed2/TASK": the same two stages (PFT mixing,
  FT sampling one task a step) have the same losses at every step as the run from the builders. (The
  sources themselves: tests/test_tfds.py.)"""
  data_dir = str(tmp_path / "tfds")
  prepare.main(["--task=synthetic_pairs,synthetic_labels", f"--data_dir={data_dir}", "--noprogress"])
  c = finished_config()
  for t in c.tasks.values():
    t.source, t.data_dir = f"tfds:embed2/{t.source}", data_dir
  data = resolve_tasks(c)
  assert all(isinstance(d.train, tfds_source.PreparedExamples) for d in data.values())
  trainer.train(c, str(tmp_path / "prepared"), data)
  losses = {}
  for how, workdir in (("builders", finished_run[0]), ("prepared", tmp_path / "prepared")):
    rows = read_metrics(workdir)
    assert [r["step"] for r in rows] == list(range(1, 12))
    losses[how] = [(r["stage"], r["task"], r["loss"], r["num_valid"]) for r in rows]
  assert losses["prepared"] == losses["builders"]
  assert {task for _, task, _, _ in losses["prepared"]} == {"mixture", "pairs", "labels"}


def test_frozen_parameters_do_not_move(finished_run, tmp_path, data, saved_item):
  # PFT's last checkpoint against FT's: FT froze the embedder and block 0.
  a, b = (saved_item(finished_run[0] / "checkpoints" / str(step) / "params") for step in (3, 11))
  np.testing.assert_array_equal(a["transformer"]["embedder"]["embedding"], b["transformer"]["embedder"]["embedding"])
  np.testing.assert_array_equal(a["transformer"]["blocks"]["0"]["attn"]["q"], b["transformer"]["blocks"]["0"]["attn"]["q"])
  assert not np.array_equal(a["transformer"]["blocks"]["1"]["attn"]["q"], b["transformer"]["blocks"]["1"]["attn"]["q"])
  c = config("pft_steps=1,ft_steps=1,every=100")
  c.stages = [c.stages[1]]
  c.stages[0].freeze = ("no_such_param",)
  with pytest.raises(ValueError, match="matches no parameter"):
    trainer.train(c, str(tmp_path / "other"), data)


# ----------------------------------------------------------------------------- resume


# A kill and a resume giving the same bits (params, optimizer and data state, exports, the batch sequence):
# tests/test_crash_safety.py.


def test_sigterm_saves_and_stops(tmp_path, data, monkeypatch):
  # The trainer turns SIGTERM into a flag only in the main thread; elsewhere it would end the test process.
  assert threading.current_thread() is threading.main_thread()
  # Inside PFT (its one compiled step; the stage's end would save anyway).
  monkeypatch.setenv(faults.ENV, "sigterm@1")
  result = trainer.train(finished_config(), str(tmp_path), data)
  assert result.preempted and result.global_step == 2
  ck = ckpt_lib.Checkpointer(tmp_path / "checkpoints", read_only=True)
  assert ck.all_steps() == [2]  # the step in flight when the signal came completes, then saves
  # (The exit code of a preempted `embed2.main`, and resuming a preempted run on another mesh and process
  # count: tests/test_multihost.py.)


def test_leftover_temporary_checkpoint_is_ignored(finished_run, tmp_path, data):
  workdir = copy_of(finished_run, tmp_path / "run")
  # A killed save leaves a temporary directory behind; it must never be restored.
  tmp = workdir / "checkpoints" / "99.orbax-checkpoint-tmp-1234"
  (tmp / "params").mkdir(parents=True)
  (tmp / "meta").mkdir()
  ck = ckpt_lib.Checkpointer(workdir / "checkpoints", read_only=True)
  assert ck.latest_step() == 11
  c = finished_config()
  c.stages[1].steps = 9
  with pytest.raises(ValueError, match="incompatible config"):
    trainer.train(c, str(workdir), data)


# ------------------------------------------------------------------------ guard rails


def test_nan_batches_are_skipped_counted_and_stop_the_run_in_a_row(tmp_path, data, monkeypatch):
  """A non-finite step is skipped and counted, and the run goes on; three in a row stop it (max_consecutive_skips
  of the tiny config), counted from the last good step."""
  # Steps 5, 7, 8 and 9 (1-based) read token ids out of vocabulary: their loss is NaN.
  monkeypatch.setenv(faults.ENV, "nan@4,nan@6,nan@7,nan@8")
  with pytest.raises(trainer.TrainingStopped, match="3 consecutive steps had a non-finite loss .* at step 9"):
    trainer.train(finished_config("every=2"), str(tmp_path), data)
  rows = read_metrics(tmp_path)
  # Each skipped step writes its running count; step 9's stopped the run before its metrics row.
  assert [(r["step"], r["skipped_total"]) for r in rows if "loss" not in r] == [(5, 1), (7, 2), (8, 3), (9, 4)]
  assert {r["step"]: r["skipped"] for r in rows if "loss" in r} == {
      1: 0, 2: 0, 3: 0, 4: 0, 5: 1, 6: 0, 7: 1, 8: 1}
  # The last checkpoint, written before the streak ended the run, is intact and restorable (finite, as
  # every skipped update left the parameters as they were), and counts the skipped steps that a resumed
  # run goes on from.
  ck = ckpt_lib.Checkpointer(tmp_path / "checkpoints", read_only=True)
  assert ck.latest_step() == 8 and ck.read_meta(8)["skipped_total"] == 3
  model, meta = ckpt_lib.load_model(tmp_path)
  assert meta["step"] == 8
  assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_sampler_frequencies_match_rates_across_resume(data):
  c = trainer.normalize(config("pft_steps=2,ft_steps=3000"))
  tok = tokenizer_lib.Tokenizer.default()
  it = trainer.stage_iterator(c, c.stages[1], data, tok, 4, 1)
  n = 3000
  tasks = [it.task_at(s) for s in range(n)]
  # Realised frequency of "pairs" (rate 0.6): within 4 standard errors.
  p = 0.6
  freq = np.mean(np.array(tasks) == list(it.task_names).index("pairs"))
  assert abs(freq - p) < 4 * np.sqrt(p * (1 - p) / n), freq
  # Across a resume the same sequence continues (state restored into a new iterator).
  for _ in range(7):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(3)]
  it2 = trainer.stage_iterator(c, c.stages[1], data, tok, 4, 1)
  it2.set_state(state)
  for e in expected:
    got = next(it2)
    assert int(got["task_index"]) == int(e["task_index"])
    np.testing.assert_array_equal(got["query_tokens"], e["query_tokens"])


# -------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("mutate,match", [
    (lambda c: c.stages[1].tasks.update(nope=1.0), "unknown task 'nope'"),
    (lambda c: c.stages[0].tasks.update(pairs=-1.0), "negative or not finite"),
    (lambda c: c.stages[1].tasks.update(pairs=0.0, labels=0.0), "rates are all zero"),
    (lambda c: c.tasks.pairs.update(batch_size=6), "batch_size=6 is not divisible by the 8 data shards"),
    (lambda c: c.tasks.labels.update(source="synthetic_empty"), "task 'labels' has zero training examples"),
    (lambda c: c.stages[0].update(mode="mixed"), "choose 'pft'"),
    (lambda c: c.tasks.labels.update(segments=2), "segments=2 differs from config.model.max_segments=4"),
    # Regression (issue 16.7): -8 % 8 == 0 passed, and the FT batch failed only after PFT had trained.
    (lambda c: c.tasks.labels.update(batch_size=-8), r"config.tasks.labels.batch_size=-8 must be a positive"),
    (lambda c: c.tasks.pairs.update(batch_size=0), r"config.tasks.pairs.batch_size=0 must be a positive"),
    (lambda c: c.stages[0].batch.update(positive_len=0), r"\.batch.positive_len=0 must be a positive"),
    (lambda c: c.tasks.pairs.update(num_negatives=-1), "num_negatives=-1 must be a non-negative"),
    (lambda c: c.tasks.labels.update(query_lenn=64), r"unknown keys 'query_lenn' \(did you mean 'query_len'\?\)"),
    (lambda c: c.stages[0].batch.update(segmnets=4), r"batch has unknown keys 'segmnets'"),
    (lambda c: c.stages[1].optim.update(learnig_rate=1e-3), r"optim has unknown keys 'learnig_rate'"),
    (lambda c: c.stages[1].update(grad_cache=2), r"unknown keys 'grad_cache' \(did you mean 'grad_cache_chunks'"),
    (lambda c: c.tasks.labels.update(p_drop=1.5), "p_drop=1.5 must be in"),
])
def test_bad_config_is_refused_before_training(tmp_path, mutate, match):
  c = trainer.normalize(config("pft_steps=1,ft_steps=1"))
  mutate(c)
  data = resolve_tasks(c)
  with pytest.raises(ValueError, match=match):
    trainer.train(c, str(tmp_path / "w"), data, )
  assert not (tmp_path / "w").exists()  # nothing was written


def test_bad_batch_size_from_the_command_line_writes_nothing(tmp_path):
  """Regression (issue 16.7), through the CLI: the error names the field, and the workdir stays unmade
  (before, PFT trained and checkpointed, and the corrected config was then refused as incompatible)."""
  proc = run_main(tmp_path / "w", "pft_steps=1,ft_steps=1", "--config.tasks.labels.batch_size=-8", check=False)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "error: config.tasks.labels.batch_size=-8 must be a positive integer" in proc.stderr
  assert not (tmp_path / "w").exists()


def _coco_manifest(root, rng, missing: int):
  """A generic mscoco manifest (train and test) of 4 PNGs, the first `missing` of them not on disk."""
  root.mkdir(parents=True)
  lines = []
  for i in range(4):
    if i >= missing:
      PILImage.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / f"{i}.png")
    lines.append(json.dumps({"image": f"{i}.png", "captions": [f"picture number {i}"]}))
  for split in ("train", "test"):
    (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


def test_missing_media_files_obey_max_skipped_fraction(tmp_path, monkeypatch, rng):
  """Regression (issue 16.8): missing media beyond the limit ended in a FileNotFoundError traceback, and
  the limit could not be set from the config. config.max_skipped_fraction is the one knob."""
  _coco_manifest(tmp_path / "data" / "mscoco", rng, missing=2)
  monkeypatch.setenv("EMBED2_DATA_DIR", str(tmp_path / "data"))
  c = config("pft_steps=1,ft_steps=1")
  c.tasks.labels.source = "coco_captions"
  with pytest.raises(FileNotFoundError, match="config.max_skipped_fraction"):
    resolve_tasks(c)
  c.max_skipped_fraction = 0.5
  data = resolve_tasks(c)
  assert len(data["labels"].train) == 2 and data["labels"].train.skipped == 2
  assert data["labels"].eval.skipped == 2
  # Through the CLI: a clear error line, no traceback, nothing written.
  proc = run_main(tmp_path / "w", "pft_steps=1,ft_steps=1", "--config.tasks.labels.source=coco_captions",
                  check=False, extra_env={"EMBED2_DATA_DIR": str(tmp_path / "data")})
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert "error: coco_captions/train: 2 of 4 examples (50.0%) have no media file" in proc.stderr
  assert not (tmp_path / "w").exists()


def _other_tokenizer(path):
  """A small sentencepiece model that is not the packaged one (same conventions, other vocabulary)."""
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(["another corpus entirely, for another tokenizer", "def mul(x, y): return x * y"] * 30),
      model_writer=model, model_type="bpe", vocab_size=300, byte_fallback=True, pad_id=0, eos_id=1, bos_id=2,
      unk_id=3, hard_vocab_limit=False, num_threads=1, minloglevel=2)
  path.write_bytes(model.getvalue())
  return path


def test_init_from_trains_with_the_checkpoints_own_tokenizer(finished_run, tmp_path, data):
  """Regression (issue 16.4, training side): a run from a checkpoint took config.tokenizer, or the packaged
  default, whatever the checkpoint was made with. Now config.tokenizer='' takes the checkpoint's own, an
  equivalent file (the tokenizer.json of the same model) is accepted, and another tokenizer is refused."""
  a = copy_of(finished_run, tmp_path / "a")  # trained with the packaged tokenizer
  # Its sentencepiece model as a tokenizer.json: the same ids, so the same tokenizer.
  text, tok_config = tokenizer_lib.sentencepiece_to_hf(tokenizer_lib.Tokenizer.default())
  (tmp_path / "tok").mkdir()
  (tmp_path / "tok" / "tokenizer.json").write_text(text)
  (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps(tok_config))
  child = finished_config(init_from=str(a), tokenizer=str(tmp_path / "tok" / "tokenizer.json"))
  child.stages = [child.stages[1]]  # (the finished run's FT stage: its compiled steps are cached)
  trainer.train(child, str(tmp_path / "b"), data)
  meta = ckpt_lib.Checkpointer(tmp_path / "b" / "checkpoints", read_only=True).read_meta()
  assert meta["tokenizer"] == str(tmp_path / "tok" / "tokenizer.json")
  # A run from b with config.tokenizer='' trains with b's tokenizer and records it.
  grandchild = config("pft_steps=1,ft_steps=1", init_from=str(tmp_path / "b"), tokenizer="")
  tok, path = trainer.resolve_tokenizer(grandchild)
  assert path == str(tmp_path / "tok" / "tokenizer.json") and tok.kind == "tokenizers"
  # Another tokenizer is refused before anything is written.
  other = config("pft_steps=1,ft_steps=1", init_from=str(a),
                 tokenizer=str(_other_tokenizer(tmp_path / "other.model")))
  with pytest.raises(ValueError, match="is not the tokenizer of config.init_from"):
    trainer.train(other, str(tmp_path / "c"), data)
  assert not (tmp_path / "c").exists()
  # Resuming a workdir with another tokenizer is refused too (the same file elsewhere is not another).
  again = finished_config(tokenizer=str(tmp_path / "other.model"))
  with pytest.raises(ValueError, match="was trained with the tokenizer packaged with embed2"):
    trainer.train(again, str(a), data)
  shutil.copy(tokenizer_lib.DEFAULT_MODEL_PATH, tmp_path / "copy.model")
  result = trainer.train(finished_config(tokenizer=str(tmp_path / "copy.model")), str(a), data)
  assert result.global_step == 11  # finished: resumed, nothing left to train


def test_incompatible_workdir_is_refused_and_untouched(finished_run, tmp_path, data):
  workdir = copy_of(finished_run, tmp_path / "run")
  before = {p: os.path.getmtime(p) for p in map(str, workdir.rglob("*"))}
  with pytest.raises(ValueError, match="incompatible config: config.model differs"):
    trainer.train(finished_config("dim=32"), str(workdir), data)
  assert before == {p: os.path.getmtime(p) for p in map(str, workdir.rglob("*"))}


def test_grad_cache_stage_matches_full_batch(finished_run, tmp_path, data):
  """A PFT stage with GradCache in 2 chunks against the finished run's PFT stage (the same config and rows
  otherwise): the same losses and gradient norms, step by step."""
  c = finished_config()
  c.stages = [c.stages[0]]
  c.stages[0].grad_cache_chunks = 2
  trainer.train(c, str(tmp_path), data)
  got = [r for r in read_metrics(tmp_path) if "loss" in r]
  want = [r for r in read_metrics(finished_run[0]) if "loss" in r and r["stage"] == "pft"]
  assert len(got) == len(want) == 3
  for a, b in zip(want, got):
    assert a["data/batch_crc"] == b["data/batch_crc"]
    for key in ("loss", "grad_norm", "loss/dim_16"):
      assert abs(a[key] - b[key]) <= 1e-4 * abs(a[key]), (key, a[key], b[key])


def test_grad_cache_chunks_that_do_not_divide_the_suggested_rows(tmp_path, data):
  """GradCache cuts every pack group's rows into equal chunks. Suggested rows are rounded up to fit (before,
  the first GradCache step failed after the workdir was written); rows set by hand that cannot be cut are
  refused before anything is written."""
  c = config("pft_steps=1,ft_steps=1,every=100")
  c.stages = [c.stages[1]]  # FT alone: 1 row a pack group suggested for either task, 3 after rounding
  c.stages[0].grad_cache_chunks = 3
  result = trainer.train(c, str(tmp_path / "a"), data)
  assert result.global_step == 1
  c.tasks.pairs.query_rows = 16  # 2 rows a group of 8: not 3 chunks
  with pytest.raises(ValueError, match=r"query_rows=16 gives 2 rows per pack group, not divisible by "
                                       r"config.stages\[0\] \(ft\).grad_cache_chunks=3"):
    trainer.train(c, str(tmp_path / "b"), data)
  assert not (tmp_path / "b").exists()
