"""`python -m embed2.bench.input_pipeline` at toy size (no timing assertions): the pipeline-vs-train-step
run, the real-size run, and the per-host need's arithmetic against a hand computation."""

import io
import json

import numpy as np
import pytest
import soundfile
from PIL import Image

from configs import demo
from embed2.bench import input_pipeline as bench
from embed2.data import interleave
from embed2.data import media as media_lib
from embed2.data import segments
from embed2.data.tokenizer import Tokenizer
from embed2.model.presets import MediaConfig, ModelConfig


@pytest.fixture(scope="module")
def train_step_run(tmp_path_factory):
  """One toy run of the pipeline-vs-train-step mode on a media stream of the demo: (result, JSON)."""
  out = tmp_path_factory.mktemp("bench") / "input_pipeline.json"
  result = bench.main(["--config=demo", "--toy", "--config_arg=layers=1,batch=8", "--streams=a2t",
                       f"--out={out}"])
  return result, json.loads(out.read_text())


def test_train_step_mode_measures_a_media_stream_and_writes_json(train_step_run):
  result, data = train_step_run
  assert data == result
  assert data["benchmark"] == "input_pipeline" and data["mode"] == "train_step"
  assert set(data["streams"]) == {"a2t"}
  r = data["streams"]["a2t"]
  for key in ("pipeline_examples_per_s", "pipeline_tokens_per_s", "step_examples_per_s", "ratio"):
    assert r[key] > 0, key
  assert r["modality"] == "audio" and r["batch_examples"] > 0
  assert data["modalities"]["audio"] == {"min_ratio": r["ratio"], "streams": ["a2t"]}
  for m in ("text", "image", "video"):
    assert data["modalities"][m] == bench.NO_STREAM
  assert set(data["need"]["per_host"]) == set(bench.NEED_PRESETS)


@pytest.fixture(scope="module")
def real_sizes_run(tmp_path_factory):
  """One toy run of --real_sizes (tiny generated media, the real media settings) with the calling
  thread (0 workers) and 2 decode workers."""
  out = tmp_path_factory.mktemp("bench") / "real_sizes.json"
  result = bench.main(["--real_sizes", "--toy", "--workers=0,2", f"--out={out}"])
  return result, json.loads(out.read_text())


def test_real_sizes_mode_reads_every_stream_at_each_worker_count(real_sizes_run):
  result, data = real_sizes_run
  assert data == result and data["mode"] == "real_sizes"
  assert list(data["real_sizes"]) == list(bench.REAL_STREAMS)
  for name, r in data["real_sizes"].items():
    assert r["modality"] == bench.REAL_STREAMS[name][0]
    for w in ("0", "2"):
      assert r["workers"][w]["examples_per_s"] > 0 and r["workers"][w]["examples_per_cpu_s"] > 0, name
    assert r["scaling"] > 0 and r["scaling_reference"] > 0 and r["scaling_workers"] == [0, 2]
    assert r["source"]["files"] == 2 and r["workers"]["2"]["thread_cpu_ms_per_example"]["decode"] >= 0
    assert r["source"]["mean_file_bytes"] > 0
    for preset in bench.NEED_PRESETS:
      for host, _, _ in bench.HOSTS:
        v = r["vs_need"][preset][host]
        assert v["need"] == data["need"]["per_host"][preset][host][r["modality"]]
        np.testing.assert_allclose(v["cores"], v["need"] / r["examples_per_cpu_s"], rtol=1e-12)


def test_real_sizes_rows_hold_what_the_need_counts(real_sizes_run):
  """The media side of the image and audio streams is as long as `item_counts` says (the 16 tokens of
  slack the bench adds aside): the need's token arithmetic is what the pipeline encodes from the files."""
  _, data = real_sizes_run
  media = bench.need_media(data["need"])
  tok = Tokenizer.default()
  image = data["real_sizes"]["image_1024x768"]["batch"]  # t2i: the positive is the image
  assert image["positive_len"] == 2 + bench.item_counts(bench.IMAGE, media)[0] + 16
  audio = data["real_sizes"]["audio_10s_48k"]["batch"]  # a2t: task string + the clip as the query
  task_string = len(tok.encode(demo.media_tasks(8)["a2t"]["task_string"]))
  seconds = bench.TOY_SIZES["audio_10s_48k"]
  assert audio["query_len"] == 2 + task_string + bench.item_counts(("audio", seconds), media)[0] + 16


def test_an_unknown_stream_is_refused_naming_the_streams():
  with pytest.raises(ValueError, match=r"--streams names \['nope'\].*'a2t'"):
    bench.main(["--config=demo", "--toy", "--streams=nope", "--out=/dev/null"])


def test_parameter_counts_from_the_shapes_match_the_published_ones():
  # tests/test_presets.py counts the built models' parameters; these are the same totals.
  assert bench.text_params_total(ModelConfig.from_name("gemma3-1b")) == 999_885_952
  assert bench.text_params_total(ModelConfig.from_name("gemma3-4b")) == 3_880_263_168


def test_need_matches_a_hand_computation(rng):
  """One task with text, an image, a 10 s clip, an 8 s video and a hard negative, next to a text task,
  on gemma3-1b and one TPU v5e host: every count by hand from the published shapes, in float64."""
  q, p, n, t = (int(x) for x in rng.integers(5, 200, 4))
  r_media, r_text = (float(x) for x in rng.uniform(0.1, 1.0, 2))
  tasks = {"mm": ("image", ((q, (bench.IMAGE, ("audio", 10.0))), (p, (("video", 8.0),)), (n, ()))),
           "txt": ("text", ((t, ()), (t + 1, ())))}
  need = bench.per_host_need(tasks, {"mm": r_media, "txt": r_text}, media=bench.real_media(),
                             presets=("gemma3-1b",), hosts=(("v5e", "TPU v5e", 4),), mfu=0.45,
                             timestamp_tokens=4)
  # gemma3-1b: D 1152, 26 layers, 4 heads, 1 kv head, head dim 256, MLP 6912; no dense head.
  n_text = 26 * (1152 * 4 * 256 + 2 * 1152 * 1 * 256 + 4 * 256 * 1152 + 3 * 1152 * 6912)
  image_tokens = 256 + 2  # <start_of_image> 256 soft tokens <end_of_image>
  # 10 s at 16 kHz, hop 160: 1001 frames = 5 chunks of 200 (50 tokens each) + 1 frame (1 token).
  audio_tokens, audio_chunks = 2 + 5 * 50 + 1, 6
  # 8 s at 1 fps: 8 frames of <timestamp> 4 tokens + an image; the 8 s track: 801 frames = 4 x 50 + 1.
  video_tokens, video_images, video_chunks = 2 + 8 * (1 + 4 + image_tokens) + (2 + 4 * 50 + 1), 8, 5
  tokens = q + image_tokens + audio_tokens + p + video_tokens + n
  # SigLIP So400m/14 at 896: 64 x 64 = 4096 patches, width 1152, 27 blocks, MLP 4304; 256 soft tokens
  # projected to D = 1152.
  vit = (14 * 14 * 3 * 1152 + 27 * (4 * 1152 ** 2 + 2 * 1152 * 4304)) * 4096 + 1152 * 1152 * 256
  # Conv audio frontend on a 200-frame chunk: 100 positions of 3 x 64 mel x 256, 50 of 3 x 256 x 256
  # and the projection 256 x 1152.
  conv = 100 * 3 * 64 * 256 + 50 * (3 * 256 * 256 + 256 * 1152)
  f_media = np.float64(6) * (n_text * tokens + vit * (1 + video_images)
                             + conv * (audio_chunks + video_chunks))
  f_text = np.float64(6) * n_text * (2 * t + 1)  # the two sides: t and t + 1 tokens
  host = np.float64(4) * 197e12 * 0.45
  got = need["per_host"]["gemma3-1b"]["v5e"]
  np.testing.assert_allclose(got["image"], host / f_media, rtol=1e-12)
  np.testing.assert_allclose(got["text"], host / f_text, rtol=1e-12)
  np.testing.assert_allclose(got["mix"], host * (r_media + r_text) / (r_media * f_media + r_text * f_text),
                             rtol=1e-12)
  assert need["tasks"]["mm"]["tokens"] == tokens
  assert need["tasks"]["mm"]["images"] == 9 and need["tasks"]["mm"]["audio_chunks"] == 11
  assert need["with_attention"]["gemma3-1b"]["v5e"]["image"] < got["image"]
  with pytest.raises(ValueError, match=r"no rate for tasks \['txt'\]"):
    bench.per_host_need(tasks, {"mm": 1.0})


def test_media_token_counts_are_what_the_encoder_writes(rng):
  """`item_counts` (the need's tokens) against `InputEncoder` on random media at small settings."""
  media = MediaConfig(image_frontend="patch", image_size=28, patch_size=14, image_tokens=4,
                      audio_frontend="conv", sample_rate=8000, n_fft=160, hop_length=80,
                      audio_chunk_frames=20, max_audio_chunks=3, video_fps=2.0, video_max_frames=3)
  tok = Tokenizer.default()
  enc = interleave.InputEncoder(tok, ModelConfig.from_name("small", max_length=4096, media=media))

  def encoded(item):
    e = enc.encode(item, max_length=4096)
    return e.tokens.size - 2, e.count("image"), e.count("audio")  # bos / eos are the side's text

  pixels = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
  assert bench.item_counts(("image",), media) == encoded(segments.Image(pixels=pixels))
  for samples in rng.integers(1, 8000 * 8, 4):  # cut to 3 chunks beyond 0.6 s
    wave = rng.uniform(-0.5, 0.5, int(samples)).astype(np.float32)
    assert bench.item_counts(("audio", samples / 8000), media) == encoded(
        segments.Audio(samples=wave, sample_rate=8000)), samples
  for frames in (1, 3, 4, 9):  # at 4 fps: 0.25 s to 2.25 s; at most 3 kept
    seconds = frames / 4
    clip = segments.Video(frames=rng.integers(0, 256, (frames, 16, 16, 3), dtype=np.uint8), fps=4.0,
                          audio=segments.Audio(samples=rng.uniform(-0.5, 0.5, frames * 2000)
                                               .astype(np.float32), sample_rate=8000))
    tokens, images, chunks = bench.item_counts(("video", seconds), media, timestamp_tokens=0)
    stamps, _ = media_lib.sample_times(np.arange(frames) / 4.0, seconds, media)
    stamp_tokens = sum(len(tok.encode(f"{s:.1f}s")) for s in stamps)
    assert (tokens + stamp_tokens, images, chunks) == encoded(clip), frames


def test_generated_media_are_deterministic_and_not_flat(tmp_path, rng):
  for folder in ("a", "b"):
    (tmp_path / folder).mkdir()
  for stream in bench.REAL_STREAMS:
    a, b = (bench.write_media(stream, str(tmp_path / f), 1, seed=3, toy=True)[0] for f in ("a", "b"))
    assert open(a, "rb").read() == open(b, "rb").read(), stream
  x, rate = soundfile.read(str(tmp_path / "a" / "audio_10s_48k_0.flac"))
  assert rate == 48_000 and x.shape == (24_000, 2) and x.std() > 0.05
  # A photo-like JPEG: ~2 bits a pixel at quality 90 (a flat colour takes ~0.1).
  buf = io.BytesIO()
  Image.fromarray(bench.natural_image(rng, 256, 192)).save(buf, "JPEG", quality=90)
  assert buf.tell() * 8 / (256 * 192) > 1.0
