"""TFDS / ArrayRecord sources without TensorFlow: `python -m embed2.prepare` writes a registered task,
`config.tasks.NAME.source = "tfds:embed2/TASK"` reads it back.

- every stdlib and generated media task, prepared, yields the builder's examples (ids, texts, arrays,
  rates, bytes), and a real dataset's records hold its files' bytes;
- the demo config's switch (`configs/demo.py:prepared=DIR`) reads every task prepared (the tiny
  config's two-stage run from prepared sources has the losses of the same run from the builders:
  tests/test_train.py, beside the run it compares with);
- a missing folder, another version, a missing split and an interrupted preparation are refused, naming
  the task and the fix; prepare refuses to write over another dataset and resumes where it stopped;
- a dataset written the way TensorFlow's TFDS writes one (Image / Audio / Video features) is read
  without TensorFlow through config.tasks.NAME.fields.
"""

import dataclasses
import importlib.util
import io
import json
import os
import pickle
import threading

import numpy as np
import pytest
import soundfile
import tensorflow_datasets as tfds
from google.protobuf import json_format
from PIL import Image as PILImage
from tensorflow_datasets.core.proto import feature_pb2

from configs import demo
from configs import tiny
from data_pipelines import media_datasets
from data_pipelines import media_tasks
from data_pipelines import tasks as task_defs
from embed2 import prepare
from embed2.data import media
from embed2.data import segments
from embed2.data import tfds_source
from embed2.main import resolve_tasks
from embed2.model.presets import MediaConfig
from test_object_store import store  # noqa: F401  (the fixture: a GCS emulator on 127.0.0.1)

LIMIT = 24  # examples per split of each prepared task
STDLIB = ("stdlib_code_search", "stdlib_doc_retrieval", "stdlib_module_cls")
MEDIA = ("shapes_caption", "shapes_caption_reversed", "tone_description", "moving_shapes", "image_edit",
         "tone_spelling")


def _prepare(*flags):
  return prepare.main([*flags, "--noprogress"])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """DATA_DIR holding the first LIMIT examples of every split of the demo's tasks."""
  data_dir = tmp_path_factory.mktemp("tfds")
  _prepare(f"--task={','.join(STDLIB + MEDIA)}", f"--data_dir={data_dir}", f"--limit={LIMIT}", "--workers=2")
  return str(data_dir)


def assert_same(a, b, where):
  """Equal sides: the same types, texts, arrays (bytes, shape, dtype), rates (value and type), bytes."""
  assert type(a) is type(b), (where, type(a), type(b))
  if isinstance(a, dict):
    assert set(a) == set(b), where
    for k in a:
      assert_same(a[k], b[k], f"{where}.{k}")
  elif isinstance(a, (list, tuple)):
    assert len(a) == len(b), where
    for i, (x, y) in enumerate(zip(a, b)):
      assert_same(x, y, f"{where}[{i}]")
  elif isinstance(a, (str, int)):
    assert a == b, where
  elif isinstance(a, segments.Text):
    assert a.text == b.text, where
  else:
    for f in dataclasses.fields(a):
      x, y = getattr(a, f.name), getattr(b, f.name)
      if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
        assert x.shape == y.shape and x.dtype == y.dtype and x.tobytes() == y.tobytes(), (where, f.name)
      elif isinstance(x, segments.Audio) or isinstance(y, segments.Audio):
        assert_same(x, y, f"{where}.{f.name}")
      else:
        assert x == y and type(x) is type(y), (where, f.name, x, y)


def assert_same_examples(want, got, where):
  assert set(want) == set(tfds_source.EXAMPLE_KEYS), where
  assert_same(want, got, where)


# ---------------------------------------------------------------------------- the builders' examples


def test_prepared_tasks_yield_the_builders_examples(prepared):
  config = demo.get_config(f"prepared={prepared}")
  data = resolve_tasks(config)
  assert {t.source for t in config.tasks.values()} == {f"tfds:embed2/{s}" for s in STDLIB + MEDIA}
  for name, tc in config.tasks.items():
    builder = tc.source.split("/", 1)[1]
    for split in ("train", "eval"):
      want, got = task_defs.build_task(builder, split), getattr(data[name], split)
      assert isinstance(got, tfds_source.PreparedExamples) and len(got) == LIMIT
      for i in range(LIMIT):
        assert_same_examples(want[i], got[i], f"{name} {split}[{i}]")
        if builder in MEDIA:  # the content read back hashes to the builder's id
          assert media_tasks.content_id_of(got[i]["query"]) == want[i]["query_id"]
          assert media_tasks.content_id_of(got[i]["positive"]) == want[i]["positive_id"]
  # Arrays are stored as encoded media (PNG, float WAV, a PNG film strip), not as raw arrays.
  records = tfds.data_source("embed2/moving_shapes", data_dir=prepared, split="train")
  formats = {(k, f) for i in range(LIMIT) for k, f in zip(records[i]["items"]["kind"], records[i]["items"]["format"])}
  assert {(b"video", b"png"), (b"video_audio", b"wav"), (b"str", b"")} == formats


def test_source_is_random_access_thread_safe_and_picklable(prepared):
  got = tfds_source.load("tfds:embed2/image_edit:1.0.0", "train", data_dir=prepared, where="config.tasks.edit")
  want = [got[i] for i in range(LIMIT)]
  copy = pickle.loads(pickle.dumps(got))
  assert_same(want[::-1], [copy[-1 - i] for i in range(LIMIT)], "pickled, negative indices")
  out = [None] * LIMIT
  fresh = pickle.loads(pickle.dumps(got))  # nothing opened yet: the threads race to open it

  def read(j):
    for i in range(j, LIMIT, 4):
      out[i] = fresh[i]

  threads = [threading.Thread(target=read, args=(j,)) for j in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert_same(want, out, "threads")
  with pytest.raises(IndexError):
    got[LIMIT]


def test_real_dataset_records_hold_the_files_bytes(tmp_path, rng):
  root = tmp_path / "mscoco"
  root.mkdir()
  lines = []
  for i in range(5):
    PILImage.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)).save(root / f"{i}.png")
    lines.append(json.dumps({"image": f"{i}.png", "captions": [f"picture {i}", f"image {i}"]}))
  for split in ("train", "test"):
    (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
  out = _prepare("--task=coco_captions", f"--root={root}", f"--data_dir={tmp_path / 'tfds'}")
  assert out["coco_captions"]["examples"] == {"train": 10, "eval": 10}
  cfg = MediaConfig(image_frontend="patch", image_size=8, patch_size=4, image_tokens=4)
  for split in ("train", "eval"):
    want = media_datasets.coco_captions(split, root=root)
    got = tfds_source.load("tfds:embed2/coco_captions", split, data_dir=str(tmp_path / "tfds"), where="x")
    for i in range(len(want)):
      w, g = want[i], got[i]
      assert {k: w[k] for k in w if k != "positive"} == {k: g[k] for k in g if k != "positive"}
      assert g["positive"].data == open(w["positive"].path, "rb").read()
      np.testing.assert_array_equal(media.load_image(g["positive"], cfg, "g"), media.load_image(w["positive"], cfg, "w"))


# ------------------------------------------------------------------------------------------ errors


def _tiny_config(source, data_dir, **extra):
  c = tiny.get_config()
  c.tasks.pairs.source, c.tasks.pairs.data_dir = source, data_dir
  for k, v in extra.items():
    c.tasks.pairs[k] = v
  return c


def test_missing_wrong_version_missing_split_and_incomplete_name_the_task_and_fix(prepared, tmp_path):
  fix = r"python -m embed2\.prepare --task=synthetic_pairs --data_dir="
  with pytest.raises(FileNotFoundError, match=rf"config\.tasks\.pairs: data_dir {tmp_path}/nowhere does not exist; .*{fix}"):
    resolve_tasks(_tiny_config("tfds:embed2/synthetic_pairs", str(tmp_path / "nowhere")))
  with pytest.raises(FileNotFoundError, match=rf"config\.tasks\.pairs: tfds:embed2/synthetic_pairs is not in .*{fix}"):
    resolve_tasks(_tiny_config("tfds:embed2/synthetic_pairs", prepared))
  with pytest.raises(ValueError, match=r"config\.tasks\.pairs\.source='tfds:embed2/x:1' is not tfds:NAME"):
    resolve_tasks(_tiny_config("tfds:embed2/x:1", prepared))
  with pytest.raises(ValueError, match=r"config\.tasks\.pairs\.source=.* needs config\.tasks\.pairs\.data_dir"):
    resolve_tasks(_tiny_config("tfds:embed2/shapes_caption", ""))

  data_dir = str(tmp_path / "tfds")
  _prepare("--task=synthetic_pairs", f"--data_dir={data_dir}", "--limit=8", "--splits=train", "--version=1.2.0")
  with pytest.raises(ValueError, match=r"config\.tasks\.pairs: tfds:embed2/synthetic_pairs:1\.0\.0 has no version "
                     r"1\.0\.0 in .*; versions there: \['1\.2\.0'\]\. Set config\.tasks\.pairs\.source"):
    resolve_tasks(_tiny_config("tfds:embed2/synthetic_pairs:1.0.0", data_dir))
  with pytest.raises(ValueError, match=r"config\.tasks\.pairs: tfds:embed2/synthetic_pairs at .* has splits "
                     rf"\['train'\], no 'eval' split; prepare it again with that split, after deleting .*1\.2\.0 \(or with another "
                     rf"--version\): {fix}.* --version=1\.2\.0 --splits=train,eval"):
    resolve_tasks(_tiny_config("tfds:embed2/synthetic_pairs", data_dir))
  with pytest.raises(ValueError, match=r"config\.tasks\.pairs\.data_dir is for tfds: sources"):
    resolve_tasks(_tiny_config("synthetic_pairs", data_dir))
  with pytest.raises(ValueError, match=r"config\.tasks\.pairs\.fields is for datasets prepared elsewhere"):
    tfds_source.load("tfds:embed2/synthetic_pairs", "train", data_dir=data_dir, where="config.tasks.pairs",
                     fields={"query": "a", "positive": "b"})


PAIRS = task_defs.TASKS["synthetic_pairs"]


def assert_prepared_is_the_builder(task, data_dir, n):
  """config.tasks.pairs read from tfds:embed2/TASK in data_dir: the builder's first n examples."""
  data = resolve_tasks(_tiny_config(f"tfds:embed2/{task}:1.0.0", data_dir))["pairs"]
  for split in ("train", "eval"):
    want, got = task_defs.build_task(task, split), getattr(data, split)
    assert len(got) == n
    for i in range(n):
      assert_same_examples(want[i], got[i], f"{split}[{i}]")


def _failing(split_to_fail, index, calls):
  """TASKS["synthetic_pairs"] with example `index` of `split_to_fail` raising, counting reads per split."""

  class Wrapped:

    def __init__(self, split):
      self.split, self.examples = split, PAIRS(split)

    def __len__(self):
      return len(self.examples)

    def __getitem__(self, i):
      calls[self.split] = calls.get(self.split, 0) + 1
      if self.split == split_to_fail and i == index:
        raise RuntimeError("injected failure")
      return self.examples[i]

  return Wrapped


def test_prepare_resumes_where_it_stopped_and_never_reads_as_complete_before(tmp_path, monkeypatch):
  data_dir = str(tmp_path / "tfds")
  flags = ["--task=synthetic_pairs", f"--data_dir={data_dir}", "--limit=40", "--examples_per_shard=10"]
  calls = {}
  monkeypatch.setitem(task_defs.TASKS, "synthetic_pairs", _failing("train", 25, calls))
  with pytest.raises(RuntimeError, match="injected failure"):
    _prepare(*flags)
  with pytest.raises(ValueError, match=r"config\.tasks\.pairs: .* is incomplete .*rerun the same prepare command"):
    resolve_tasks(_tiny_config("tfds:embed2/synthetic_pairs", data_dir))
  out = tmp_path / "tfds" / "embed2" / "synthetic_pairs" / "1.0.0"
  shards = sorted(p.name for p in out.glob("embed2-train.array_record-*"))
  assert len(shards) == 2 and all(s.endswith("-of-00004") for s in shards)
  stamps = {s: os.stat(out / s).st_mtime_ns for s in shards}

  calls.clear()
  monkeypatch.setitem(task_defs.TASKS, "synthetic_pairs", _failing("eval", 12, calls))
  with pytest.raises(RuntimeError, match="injected failure"):
    _prepare(*flags)  # finishes train, fails in eval's second shard
  assert calls["train"] == 8 + 20  # the fingerprint's 8, then shards 2 and 3 only
  monkeypatch.setitem(task_defs.TASKS, "synthetic_pairs", _failing("none", -1, calls))
  result = _prepare(*flags)["synthetic_pairs"]
  assert result["written"] == {"train": 0, "eval": 3}
  assert {s: os.stat(out / s).st_mtime_ns for s in shards} == stamps
  assert not (out / prepare.STATE_FILE).exists()
  monkeypatch.undo()
  assert_prepared_is_the_builder("synthetic_pairs", data_dir, 40)
  assert _prepare(*flags)["synthetic_pairs"]["written"] == {"train": 0, "eval": 0}  # already complete


def test_prepare_refuses_to_write_over_another_dataset(tmp_path):
  data_dir = str(tmp_path / "tfds")
  _prepare("--task=synthetic_pairs", f"--data_dir={data_dir}", "--limit=8", "--config=small")
  out = tmp_path / "tfds" / "embed2" / "small" / "1.0.0"
  before = {p.name: p.read_bytes() for p in out.iterdir()}
  for flags in (["--task=synthetic_labels", "--limit=8"], ["--task=synthetic_pairs", "--limit=9"],
                ["--task=synthetic_pairs", "--limit=8", "--splits=train"]):
    with pytest.raises(ValueError, match=rf"{out} holds another dataset \(task 'synthetic_pairs', limit 8, "
                       r"splits \['train', 'eval'\], .*\), not this one .*Give another --config or --version"):
      _prepare(*flags, f"--data_dir={data_dir}", "--config=small")
  assert {p.name: p.read_bytes() for p in out.iterdir()} == before
  # A folder with files that are not an unfinished embed2 preparation is not written to either.
  other = tmp_path / "tfds" / "embed2" / "synthetic_pairs" / "1.0.0"
  other.mkdir(parents=True)
  (other / "notes.txt").write_text("mine")
  with pytest.raises(ValueError, match=r"holds another dataset \(a dataset embed2.prepare did not write\)"):
    _prepare("--task=synthetic_pairs", f"--data_dir={data_dir}", "--limit=8")
  assert os.listdir(other) == ["notes.txt"]
  with pytest.raises(ValueError, match=r"--task='nope' is unknown; known tasks: \["):
    _prepare("--task=nope", f"--data_dir={data_dir}")


def test_prepare_and_read_on_gcs(store, monkeypatch):  # pylint: disable=redefined-outer-name
  """gs:// end to end: prepare writes through epath (gcsfs), the source reads through ArrayRecord's own
  GCS client (pointed at the emulator by $CLOUD_STORAGE_EMULATOR_ENDPOINT)."""
  endpoint, bucket = store
  monkeypatch.setenv("CLOUD_STORAGE_EMULATOR_ENDPOINT", endpoint["STORAGE_EMULATOR_HOST"])
  data_dir = f"{bucket}/tfds"
  _prepare("--task=synthetic_labels", f"--data_dir={data_dir}", "--limit=12", "--examples_per_shard=5")
  assert_prepared_is_the_builder("synthetic_labels", data_dir, 12)
  with pytest.raises(ValueError, match=r"holds another dataset"):
    _prepare("--task=synthetic_pairs", f"--data_dir={data_dir}", "--limit=12", "--config=synthetic_labels")


# ------------------------------------------------------------------------- prepared elsewhere, by TF


def _png(a):
  buf = io.BytesIO()
  PILImage.fromarray(a).save(buf, format="PNG")
  return buf.getvalue()


def _tf_feature_json(cls, **content):
  """features.json's entry for an Audio / Video feature, as TFDS writes it with TensorFlow installed
  (feature proto -> JSON); TFDS cannot build these features here without TensorFlow."""
  kind = cls.lower()
  proto = feature_pb2.Feature(python_class_name=f"tensorflow_datasets.core.features.{kind}_feature.{cls}",
                              **{kind: getattr(feature_pb2, f"{cls}Feature")(**content)})
  return json_format.MessageToDict(proto)


def test_a_dataset_prepared_with_tf_features_reads_without_tensorflow(tmp_path, rng):
  """A captions dataset in array_record as TFDS writes it: Image (PNG), Sequence({text, id}), Audio
  stored lazily (encoded file bytes) and eagerly (int PCM samples), Video (encoded frames). TFDS writes
  the same tf.train.Example for a bytes / int64 tensor as for those Audio and Video features, so the
  records come from tensors and features.json then says what TFDS would have said."""
  images = [rng.integers(0, 256, (6, 5, 3), dtype=np.uint8) for _ in range(4)]
  waves = [(0.2 * rng.standard_normal(160)).astype(np.float32) for _ in range(4)]
  pcm = [rng.integers(-30000, 30000, 120).astype(np.int64) for _ in range(4)]
  clips = [rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8) for _ in range(4)]

  def wav(w):
    buf = io.BytesIO()
    soundfile.write(buf, w, 8000, format="WAV", subtype="FLOAT")
    return buf.getvalue()

  f = tfds.features

  class CocoLike(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.1.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, disable_shuffling=True, features=f.FeaturesDict({
          "image": f.Image(encoding_format="png"), "image/id": np.int64,
          "captions": f.Sequence({"id": np.int64, "text": f.Text()}),
          "clip": f.Tensor(shape=(), dtype=np.object_), "pcm": f.Tensor(shape=(None,), dtype=np.int64),
          "video": f.Sequence(f.Image(encoding_format="png"))}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(4):
        yield i, {"image": _png(images[i]), "image/id": 100 + i,
                  "captions": [{"id": 10 * i + k, "text": f"caption {i}.{k}"} for k in range(2)],
                  "clip": wav(waves[i]), "pcm": pcm[i], "video": [_png(fr) for fr in clips[i]]}

  builder = CocoLike(data_dir=str(tmp_path), file_format="array_record")
  builder.download_and_prepare()
  path = builder.data_path
  feats = json.loads((path / "features.json").read_text())
  top = feats["featuresDict"]["features"]
  top["clip"] = _tf_feature_json("Audio", dtype="int64", file_format="wav", sample_rate=8000, lazy_decode=True,
                                 encoding="none")
  top["pcm"] = _tf_feature_json("Audio", dtype="int64", sample_rate=8000, encoding="none")
  top["video"] = _tf_feature_json("Video", dtype="uint8", encoding_format="png")
  (path / "features.json").write_text(json.dumps(feats))
  if importlib.util.find_spec("tensorflow") is None:  # why embed2 reads the records itself
    with pytest.raises(ModuleNotFoundError, match="tensorflow"):
      tfds.builder_from_directory(path)

  source = "tfds:coco_like:1.1.0"
  with pytest.raises(ValueError, match=r"config\.tasks\.c: tfds:coco_like:1\.1\.0 was not written by "
                     r"embed2\.prepare, so config\.tasks\.c\.fields must say .*; its features: captions/id "
                     r"\(Tensor\), captions/text \(Text\), clip \(Audio\), image \(Image\)"):
    tfds_source.load(source, "train", data_dir=str(tmp_path), where="config.tasks.c")
  with pytest.raises(ValueError, match=r"config\.tasks\.c\.fields\['positive'\]='video' is a Video, .* give "
                     r"config\.tasks\.c\.fields\['fps'\]"):
    tfds_source.load(source, "train", data_dir=str(tmp_path), where="config.tasks.c",
                     fields={"query": "captions/text", "positive": "video"})
  cfg = MediaConfig(image_frontend="patch", image_size=8, patch_size=4, image_tokens=4, audio_frontend="conv",
                    sample_rate=8000, video_fps=2.0, video_max_frames=3)
  read = {}
  for positive in ("image", "clip", "pcm", "video"):
    fields = {"query": "captions/text", "positive": positive, "group": "image/id", "fps": 2}
    ds = tfds_source.load(source, "train", data_dir=str(tmp_path), where="config.tasks.c", fields=fields)
    read[positive] = [ds[i] for i in range(len(ds))]
  for i in range(4):
    ex = read["image"][i]
    assert ex["query"] == f"caption {i}.0" and ex["group"] == str(100 + i) and ex["negatives"] == []
    assert ex["query_id"] == tfds_source.content_id(f"caption {i}.0")
    np.testing.assert_array_equal(media.load_image(ex["positive"], cfg, "x"),
                                  media.load_image(segments.Image(pixels=images[i]), cfg, "y"))
    np.testing.assert_array_equal(media.load_audio(read["clip"][i]["positive"], cfg, "x"),
                                  media.load_audio(segments.Audio(samples=waves[i], sample_rate=8000), cfg, "y"))
    a = read["pcm"][i]["positive"]
    assert a.sample_rate == 8000 and a.samples.dtype == np.int16
    np.testing.assert_array_equal(a.samples, pcm[i])
    v = read["video"][i]["positive"]
    assert v.fps == 2.0
    np.testing.assert_array_equal(v.frames, clips[i])
  assert len({ex["positive_id"] for ex in read["image"]}) == 4
