"""Real-dataset builders (data_pipelines.media_datasets) on tiny stand-ins in the published
formats: the same json / csv layouts, small PNG and WAV files, and .mp4 names (never decoded)."""
import collections.abc
import csv
import hashlib
import json
import logging
import os
import pathlib
import pickle

import numpy as np
import pytest

from data_pipelines import media_datasets as md
from embed2.data.segments import Audio, Image, Video
from embed2.eval import metrics

PIL = pytest.importorskip("PIL.Image")
sf = pytest.importorskip("soundfile")


# ----------------------------------------------------------------------------------- stand-ins


def _png(path: pathlib.Path, rng):
  path.parent.mkdir(parents=True, exist_ok=True)
  PIL.fromarray(rng.integers(0, 256, (8, 6, 3), dtype=np.uint8)).save(path)


def _wav(path: pathlib.Path, rng):
  path.parent.mkdir(parents=True, exist_ok=True)
  sf.write(str(path), (0.1 * rng.standard_normal(400)).astype(np.float32), 8000)


def _mp4(path: pathlib.Path, rng):
  # The builders never decode, so any bytes under the right name stand in for a video.
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + rng.bytes(32))


def _json(path: pathlib.Path, data):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(data), encoding="utf-8")


def _csv(path: pathlib.Path, header, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", encoding="utf-8", newline="") as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)


# (file name, captions) per image; "A red bus." describes two images.
COCO_VAL = [("000000000139.jpg", ["A red bus.", "a bus  on a road \n"]),
            ("000000000285.jpg", ["A red bus.", "Two dogs play."]),
            ("000000000632.jpg", ["A cat sleeps."])]
COCO_TRAIN = [("000000000009.jpg", ["Food on a plate.", "A lunch box."]),
              ("000000000025.jpg", ["A giraffe eats.", "Tall giraffe."])]


def _coco_official(root: pathlib.Path, rng):
  for native, images in (("val2017", COCO_VAL), ("train2017", COCO_TRAIN)):
    ims, anns = [], []
    for k, (name, caps) in enumerate(images):
      image_id = 1000 + 7 * k
      ims.append({"id": image_id, "file_name": name, "height": 8, "width": 6})
      anns += [{"image_id": image_id, "id": len(anns) + 1, "caption": c} for c in caps]
      _png(root / native / name, rng)
    ims.append({"id": 5, "file_name": "uncaptioned.jpg"})  # an image without captions: no example
    rng.shuffle(anns)  # real files are not grouped by image
    _json(root / "annotations" / f"captions_{native}.json",
          {"info": {}, "licenses": [], "images": ims, "annotations": anns})


def _coco_karpathy(root: pathlib.Path, rng):
  images = []
  for k, split in enumerate(["train", "restval", "val", "test", "test", "train"]):
    folder = "val2014" if split != "train" else "train2014"
    name = f"COCO_{folder}_{k:012d}.jpg"
    _png(root / folder / name, rng)
    images.append({"filepath": folder, "filename": name, "split": split, "cocoid": k, "imgid": k,
                   "sentences": [{"raw": f"karpathy {split} image {k} caption {j} ",
                                  "tokens": ["x"], "sentid": 3 * k + j} for j in range(3)]})
  _json(root / "dataset_coco.json", {"images": images, "dataset": "coco"})


@pytest.fixture
def rng():
  return np.random.default_rng(7)


def _check_example(ex, kind):
  assert set(ex) == {"query", "positive", "negatives", "query_id", "positive_id", "group"}
  assert isinstance(ex["query"], str) and ex["query"] == " ".join(ex["query"].split())
  assert isinstance(ex["positive"], kind) and os.path.isabs(ex["positive"].path)
  assert ex["negatives"] == []
  assert ex["query_id"] == md.text_id(ex["query"])
  assert ex["positive_id"] == md.media_id(ex["positive"].path)
  assert 0 <= ex["query_id"] < 2**63 and 0 <= ex["positive_id"] < 2**63


def _check_retrieval(ds, kind):
  """`retrieval_problem` merges by ids: one query per distinct caption, one document per file,
  and every (caption, file) pair of the data relevant."""
  examples = list(ds)
  for ex in examples:
    _check_example(ex, kind)
  queries, corpus, relevance = metrics.retrieval_problem(examples)
  assert sorted(queries) == sorted({ex["query"] for ex in examples})
  assert sorted(d.path for d in corpus) == sorted({ex["positive"].path for ex in examples})
  assert len(corpus) == ds.num_media
  pairs = {(q, corpus[c].path) for q, rel in zip(queries, relevance) for c in rel}
  assert pairs == {(ex["query"], ex["positive"].path) for ex in examples}
  return queries, corpus, relevance


# -------------------------------------------------------------------------------------- ids


def test_ids_are_stable_63_bit_blake2b(tmp_path):
  for text in ["A red bus.", "", "ünïcode caption"]:
    ref = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
    assert md.text_id(text) == ref & (2**63 - 1)
  assert md.text_id("A red bus.") != md.text_id("A red bus")
  p = tmp_path / "a" / "x.jpg"
  digest = hashlib.blake2b(str(p).encode(), digest_size=8, person=b"embed2.media").digest()
  ref = int.from_bytes(digest, "little") & (2**63 - 1)
  assert md.media_id(p) == md.media_id(str(tmp_path / "a" / ".." / "a" / "x.jpg")) == ref
  assert md.media_id(p) != md.media_id(tmp_path / "a" / "y.jpg")
  assert md.media_id("caption") != md.text_id(os.path.abspath("caption"))


# ------------------------------------------------------------------------------------- COCO


def test_coco_official_examples_ids_and_splits(tmp_path, rng):
  root = tmp_path / "mscoco"
  _coco_official(root, rng)
  val = md.coco_captions("eval", root=root)
  assert isinstance(val, collections.abc.Sequence)
  assert len(val) == 5 and val.num_media == 3 and val.skipped == 0
  assert val.source == str(root / "annotations" / "captions_val2017.json")
  got = collections.defaultdict(set)
  for ex in val:
    got[ex["positive"].path].add(ex["query"])
    assert ex["group"] == "val2017/" + os.path.basename(ex["positive"].path)
  assert got == {str(root / "val2017" / n): {" ".join(c.split()) for c in caps}
                 for n, caps in COCO_VAL}
  by_text = collections.defaultdict(set)
  by_path = collections.defaultdict(set)
  for ex in val:
    by_text[ex["query"]].add((ex["query_id"], ex["positive_id"]))
    by_path[ex["positive"].path].add(ex["positive_id"])
  # The caption shared by two images: one query id, two positive ids.
  assert len({q for q, _ in by_text["A red bus."]}) == 1
  assert len({p for _, p in by_text["A red bus."]}) == 2
  assert all(len(ids) == 1 for ids in by_path.values())
  assert len({next(iter(ids)) for ids in by_path.values()}) == 3

  train = md.coco_captions("train", root=root)
  assert len(train) == 4
  assert {ex["query"] for ex in train} == {c for _, cs in COCO_TRAIN for c in cs}
  assert all("/train2017/" in ex["positive"].path for ex in train)

  queries, corpus, relevance = _check_retrieval(val, Image)
  bus = queries.index("A red bus.")
  assert sorted(corpus[c].path for c in relevance[bus]) == [
      str(root / "val2017" / COCO_VAL[0][0]), str(root / "val2017" / COCO_VAL[1][0])]


def test_coco_karpathy_wins_and_maps_splits(tmp_path, rng):
  root = tmp_path / "mscoco"
  _coco_official(root, rng)
  _coco_karpathy(root, rng)
  train = md.coco_captions("train", root=root)
  assert train.source == str(root / "dataset_coco.json")
  assert len(train) == 9 and train.num_media == 3  # train (2 images) + restval (1), 3 captions each
  assert {ex["query"].split()[1] for ex in train} == {"train", "restval"}
  test = md.coco_captions("eval", root=root)
  assert len(test) == 6 and {ex["query"].split()[1] for ex in test} == {"test"}
  assert all(ex["positive"].path.startswith(str(root / "val2014")) for ex in test)
  assert len(md.coco_captions("val", root=root)) == 3
  # The official layout on request; a native year split goes there on its own.
  official = md.coco_captions("eval", root=root, layout="official")
  assert official.source.endswith("captions_val2017.json")
  assert len(md.coco_captions("val2017", root=root)) == 5
  _check_retrieval(train, Image)


def test_coco_manifest_first_and_paths(tmp_path, rng):
  root = tmp_path / "mscoco"
  _coco_official(root, rng)
  _png(root / "imgs" / "a.png", rng)
  _png(tmp_path / "elsewhere" / "b.png", rng)
  with open(root / "test.jsonl", "w") as f:  # the eval suites' file serves "eval"
    f.write(json.dumps({"image": "imgs/a.png", "captions": ["first", "second"]}) + "\n\n")
    b_abs = str(tmp_path / "elsewhere" / "b.png")
    f.write(json.dumps({"image": b_abs, "captions": ["third"]}) + "\n")
  ds = md.coco_captions("eval", root=root)
  assert ds.source == str(root / "test.jsonl")
  assert [ex["query"] for ex in ds] == ["first", "second", "third"]
  assert [ex["positive"].path for ex in ds] == [str(root / "imgs" / "a.png")] * 2 + [
      str(tmp_path / "elsewhere" / "b.png")]
  assert ds[0]["positive_id"] == ds[1]["positive_id"] != ds[2]["positive_id"]
  assert md.coco_captions("eval", root=root, layout="official").num_media == 3
  _check_retrieval(ds, Image)
  with open(root / "train.jsonl", "w") as f:
    f.write(json.dumps({"image": "imgs/a.png", "caption": "no list"}) + "\n")
  with pytest.raises(ValueError, match=r"train.jsonl:1 needs the field 'captions'"):
    md.coco_captions("train", root=root)


def test_missing_media_skipped_counted_and_bounded(tmp_path, rng, caplog):
  root = tmp_path / "mscoco"
  _coco_official(root, rng)
  gone = root / "val2017" / COCO_VAL[2][0]
  gone.unlink()  # 1 of 5 examples
  with pytest.raises(FileNotFoundError) as e:
    md.coco_captions("eval", root=root)
  msg = str(e.value)
  assert "1 of 5 examples" in msg and str(gone) in msg and "max_missing_fraction=0.01" in msg
  with caplog.at_level(logging.WARNING):
    ds = md.coco_captions("eval", root=root, max_missing_fraction=0.2)
  assert len(ds) == 4 and ds.skipped == 1 and ds.num_media == 2
  assert "1 of 5 examples skipped" in caplog.text
  assert all(os.path.exists(ex["positive"].path) for ex in ds)
  unchecked = md.coco_captions("eval", root=root, check_files=False)
  assert len(unchecked) == 5 and unchecked.skipped == 0
  # A fraction just under the share missing still raises; everything missing always raises.
  with pytest.raises(FileNotFoundError, match="1 of 5"):
    md.coco_captions("eval", root=root, max_missing_fraction=0.19)
  for name, _ in COCO_VAL[:2]:
    (root / "val2017" / name).unlink()
  with pytest.raises(FileNotFoundError, match="5 of 5"):
    md.coco_captions("eval", root=root, max_missing_fraction=1.0)


def test_missing_annotations_name_layout_and_env(tmp_path, monkeypatch):
  monkeypatch.delenv(md.DATA_DIR_ENV, raising=False)
  with pytest.raises(FileNotFoundError) as e:
    md.coco_captions("train", root=tmp_path / "nothing")
  msg = str(e.value)
  for part in ["train.jsonl", "dataset_coco.json", "captions_train2017.json", "EMBED2_DATA_DIR",
               "root=", "unset"]:
    assert part in msg, part
  monkeypatch.setenv(md.DATA_DIR_ENV, str(tmp_path / "data"))
  for name, fn in md.DATASETS.items():
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "data")):
      fn("train")
  with pytest.raises(ValueError, match="split='dev' is unknown"):
    md.coco_captions("dev", root=tmp_path)
  with pytest.raises(ValueError, match="layout='tfds' is unknown"):
    md.coco_captions("train", root=tmp_path, layout="tfds")


def test_default_root_from_env(tmp_path, rng, monkeypatch):
  _coco_official(tmp_path / "mscoco", rng)
  monkeypatch.setenv(md.DATA_DIR_ENV, str(tmp_path))
  ds = md.DATASETS["coco_captions"]("eval")
  assert ds.source == str(tmp_path / "mscoco" / "annotations" / "captions_val2017.json")
  assert len(ds) == 5


def test_sequence_protocol_pickle_and_grain(tmp_path, rng):
  root = tmp_path / "mscoco"
  _coco_official(root, rng)
  ds = md.coco_captions("eval", root=root)
  assert ds[-1]["query"] == ds[len(ds) - 1]["query"]
  assert ds[np.int64(2)]["query"] == ds[2]["query"]
  assert [e["query"] for e in ds[1:3]] == [ds[1]["query"], ds[2]["query"]]
  with pytest.raises(IndexError):
    ds[len(ds)]
  again = pickle.loads(pickle.dumps(ds))
  for a, b in zip(ds, again):
    assert (a["query"], a["positive"].path, a["query_id"], a["positive_id"]) == (
        b["query"], b["positive"].path, b["query_id"], b["positive_id"])
  grain = pytest.importorskip("grain")
  mapped = grain.MapDataset.source(ds)
  assert len(mapped) == 5 and mapped[3]["query"] == ds[3]["query"]


def test_flickr30k_karpathy(tmp_path, rng):
  root = tmp_path / "flickr30k"
  images = []
  for k, split in enumerate(["train", "train", "val", "test"]):
    _png(root / "flickr30k-images" / f"{k}.jpg", rng)
    images.append({"filename": f"{k}.jpg", "split": split,
                   "sentences": [{"raw": f"flickr {k} {j}"} for j in range(5)]})
  _json(root / "dataset_flickr30k.json", {"images": images, "dataset": "flickr30k"})
  assert len(md.flickr30k("train", root=root)) == 10
  test = md.flickr30k("eval", root=root)
  assert len(test) == 5 and test[0]["positive"].path == str(root / "flickr30k-images" / "3.jpg")
  _check_retrieval(test, Image)


# ------------------------------------------------------------------------------------- video


def _msrvtt(root: pathlib.Path, rng, *, split_files: bool = False):
  splits = {"video0": "train", "video1": "train", "video2": "validate", "video3": "test",
            "video4": "test"}
  videos = [{"video_id": v, "split": s, "category": 3, "id": int(v[5:]), "url": "u",
             "start time": 1.0, "end time": 9.0} for v, s in splits.items()]
  sentences = [{"video_id": v, "caption": f"{v} clip caption {j}", "sen_id": 2 * int(v[5:]) + j}
               for v in splits for j in range(2)]
  sentences.append({"video_id": "video1", "caption": "a man is talking", "sen_id": 98})
  sentences.append({"video_id": "video3", "caption": "a man is talking", "sen_id": 99})
  for v in splits:  # one test video sits in the original release's TestVideo folder
    _mp4(root / ("TestVideo" if v == "video4" else "videos") / f"{v}.mp4", rng)
  if split_files:
    for part, keep in (("train_val", {"train", "validate"}), ("test", {"test"})):
      vs = [v for v in videos if v["split"] in keep]
      ids = {v["video_id"] for v in vs}
      _json(root / f"{part}_videodatainfo.json",
            {"videos": vs, "sentences": [s for s in sentences if s["video_id"] in ids]})
  else:
    _json(root / "videodatainfo.json", {"info": {}, "videos": videos, "sentences": sentences})


@pytest.mark.parametrize("split_files", [False, True])
def test_msrvtt_official(tmp_path, rng, split_files):
  root = tmp_path / "msrvtt"
  _msrvtt(root, rng, split_files=split_files)
  train = md.msrvtt("train", root=root)
  assert len(train) == 5 and train.num_media == 2
  assert {ex["group"] for ex in train} == {"video0", "video1"}
  assert all(isinstance(ex["positive"], Video) for ex in train)
  test = md.msrvtt("eval", root=root)
  assert len(test) == 5 and test.num_media == 2
  paths = {ex["group"]: ex["positive"].path for ex in test}
  assert paths == {"video3": str(root / "videos" / "video3.mp4"),
                   "video4": str(root / "TestVideo" / "video4.mp4")}
  assert [ex["query"] for ex in md.msrvtt("val", root=root)] == [
      "video2 clip caption 0", "video2 clip caption 1"]
  # The same sentence in train and test: the same query id in both.
  qid = {ex["query_id"] for ex in list(train) + list(test) if ex["query"] == "a man is talking"}
  assert len(qid) == 1
  _check_retrieval(test, Video)


def test_msrvtt_jsfusion_and_manifest(tmp_path, rng):
  root = tmp_path / "msrvtt"
  _msrvtt(root, rng)
  _csv(root / "MSRVTT_JSFUSION_test.csv", ["key", "vid_key", "video_id", "sentence"],
       [["ret0", "msr3", "video3", "a man, talking"], ["ret1", "msr4", "video4", "a dog runs"]])
  ds = md.msrvtt("test1k", root=root)
  assert [ex["query"] for ex in ds] == ["a man, talking", "a dog runs"]
  _check_retrieval(ds, Video)
  with pytest.raises(ValueError, match="split='test1k' is unknown"):
    md.vatex("test1k", root=root)
  _mp4(root / "clips" / "c.mp4", rng)
  (root / "train.jsonl").write_text(json.dumps({"video": "clips/c.mp4", "captions": ["x", "y"]}))
  man = md.msrvtt("train", root=root)
  assert len(man) == 2 and man[0]["positive"].path == str(root / "clips" / "c.mp4")
  assert len(md.msrvtt("train", root=root, layout="official")) == 5


def test_vatex(tmp_path, rng):
  root = tmp_path / "vatex"
  train = [{"videoID": "Ptf_2VRj-V0_000122_000132", "enCap": ["a man dances ", "dancing"],
            "chCap": ["跳舞"]},
           {"videoID": "abc-DEF_123_000010_000020", "enCap": ["a cat", "a cat", "kitten"],
            "chCap": []}]
  val = [{"videoID": "zzz_000001_000011", "enCap": ["rain falls"], "chCap": []}]
  _json(root / "vatex_training_v1.0.json", train)
  _json(root / "vatex_validation_v1.0.json", val)
  _mp4(root / "videos" / "Ptf_2VRj-V0_000122_000132.mp4", rng)
  _mp4(root / "videos" / "abc-DEF_123_000010_000020.webm", rng)  # downloaders keep the container
  _mp4(root / "videos" / "zzz_000001_000011.mp4", rng)
  ds = md.vatex("train", root=root)
  assert [ex["query"] for ex in ds] == ["a man dances", "dancing", "a cat", "a cat", "kitten"]
  assert ds[2]["positive"].path.endswith(".webm")
  assert ds[2]["query_id"] == ds[3]["query_id"] and ds[2]["positive_id"] == ds[4]["positive_id"]
  _check_retrieval(ds, Video)
  ev = md.vatex("eval", root=root)
  assert len(ev) == 1 and ev.source.endswith("vatex_validation_v1.0.json")
  with pytest.raises(FileNotFoundError, match="vatex_public_test_english_v1.1.json"):
    md.vatex("test", root=root)


# ------------------------------------------------------------------------------------- audio


def test_audiocaps_naming_and_clips(tmp_path, rng):
  root = tmp_path / "audiocaps"
  header = ["audiocap_id", "youtube_id", "start_time", "caption"]
  _csv(root / "dataset" / "train.csv", header,
       [[91139, "r1nicOVtvkQ", 130, "A woman talks nearby"],
        [58146, "UDGBjjwyaqE", 20, "Rain, then thunder"],
        [11, "zzzzzzzzzzz", 0, "Gone clip"]])
  _wav(root / "audio" / "train" / "r1nicOVtvkQ_130.wav", rng)  # <youtube_id>_<start>
  _wav(root / "audio" / "train" / "58146.wav", rng)            # <audiocap_id>
  with pytest.raises(FileNotFoundError, match=r"1 of 3 examples.*zzzzzzzzzzz_0\.wav"):
    md.audiocaps("train", root=root)
  train = md.audiocaps("train", root=root, max_missing_fraction=0.5)
  assert train.skipped == 1 and train.source == str(root / "dataset" / "train.csv")
  assert [(ex["query"], os.path.basename(ex["positive"].path)) for ex in train] == [
      ("A woman talks nearby", "r1nicOVtvkQ_130.wav"), ("Rain, then thunder", "58146.wav")]
  # Eval clips carry five captions, each with its own audiocap_id: one file, one positive id.
  _csv(root / "test.csv", header,
       [[100 + j, "CLIPaaaaaaa", "30", f"a dog barks {j}"] for j in range(5)]
       + [[200 + j, "CLIPbbbbbbb", "0", f"an engine idles {j}"] for j in range(5)])
  _wav(root / "test" / "102.wav", rng)
  _wav(root / "test" / "CLIPbbbbbbb_0.flac", rng)
  test = md.audiocaps("eval", root=root)
  assert len(test) == 10 and test.num_media == 2
  assert len({ex["positive_id"] for ex in test[:5]}) == 1
  assert all(isinstance(ex["positive"], Audio) for ex in test)
  queries, corpus, relevance = _check_retrieval(test, Audio)
  assert len(queries) == 10 and len(corpus) == 2
  with pytest.raises(FileNotFoundError, match="val.csv"):
    md.audiocaps("val", root=root)


def test_clotho_and_audio_manifest(tmp_path, rng):
  root = tmp_path / "clotho"
  header = ["file_name"] + [f"caption_{i}" for i in range(1, 6)]
  _csv(root / "clotho_captions_development.csv", header,
       [["rain, heavy.wav", "rain falls", "heavy rain", "water, drops", "a storm", "rain falls"],
        ["birds.wav", "birds sing", "chirping", "morning birds", "a bird", "birds at dawn"]])
  _csv(root / "clotho_captions_evaluation.csv", header,
       [["bell.wav", "a bell rings", "ringing", "church bell", "bells", "a bell"]])
  _wav(root / "development" / "rain, heavy.wav", rng)
  _wav(root / "audio" / "development" / "birds.wav", rng)
  _wav(root / "evaluation" / "bell.wav", rng)
  train = md.clotho("train", root=root)
  assert len(train) == 10 and train.num_media == 2
  assert train[0]["group"] == "rain, heavy.wav"
  assert train[0]["query_id"] == train[4]["query_id"]  # "rain falls" twice for one file
  assert train[5]["positive"].path == str(root / "audio" / "development" / "birds.wav")
  queries, _, relevance = _check_retrieval(train, Audio)
  assert len(queries) == 9 and len(relevance[queries.index("rain falls")]) == 1
  ev = md.clotho("eval", root=root)
  assert len(ev) == 5 and ev.source.endswith("clotho_captions_evaluation.csv")
  assert len(md.clotho("development", root=root)) == 10
  _wav(root / "x" / "s.wav", rng)
  (root / "eval.jsonl").write_text(json.dumps({"audio": "x/s.wav", "captions": ["a hum"]}) + "\n")
  man = md.clotho("eval", root=root)
  assert len(man) == 1 and isinstance(man[0]["positive"], Audio)
  _check_retrieval(man, Audio)


def test_bad_annotation_files_name_the_problem(tmp_path):
  root = tmp_path / "clotho"
  _csv(root / "clotho_captions_development.csv", ["file", "caption"], [["a.wav", "x"]])
  with pytest.raises(ValueError, match=r"needs the columns .*file_name"):
    md.clotho("train", root=root)
  root = tmp_path / "vatex"
  root.mkdir()
  (root / "vatex_training_v1.0.json").write_text("{not json")
  with pytest.raises(ValueError, match="not valid JSON"):
    md.vatex("train", root=root)
  _json(root / "vatex_training_v1.0.json", [{"videoID": "a", "enCap": "one string"}])
  with pytest.raises(ValueError, match="list of caption strings"):
    md.vatex("train", root=root)
  _json(tmp_path / "msrvtt" / "videodatainfo.json", {"videos": [], "sentences": []})
  with pytest.raises(ValueError, match="holds no captions"):
    md.msrvtt("train", root=tmp_path / "msrvtt")
