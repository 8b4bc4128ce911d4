"""Interleaving, packing across modalities, the model's soft-token path, Embedder media, bad media."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image as PILImage

from embed2.data import interleave, packing, pipeline, segments, transforms
from embed2.data import tokenizer as tok_lib
from embed2.data.segments import Audio, Image, MediaError, MissingFrontendError, Text, Video
from embed2.data.tokenizer import Tokenizer
from embed2.inference import Embedder
from embed2.model import EmbeddingModel, ModelConfig
from embed2.model.presets import MediaConfig

# config.model.media of these tests
MEDIA = dict(image_frontend="patch", audio_frontend="conv", image_size=16, patch_size=4,
             image_tokens=4, sample_rate=8000, n_mels=16, n_fft=128, hop_length=64,
             audio_chunk_frames=24, max_audio_chunks=3, video_fps=2.0, video_max_frames=3)


@pytest.fixture(scope="module")
def tok():
  return Tokenizer.default()


@pytest.fixture(scope="module")
def cfg(tok):
  return ModelConfig.from_name("tiny", vocab_size=tok.vocab_size, max_length=128, max_segments=4,
                               media=MediaConfig(**MEDIA))


@pytest.fixture(scope="module")
def model(cfg):
  return EmbeddingModel(cfg, rngs=nnx.Rngs(3))


def _image(rng, h=20, w=12):
  return Image(pixels=rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _audio(rng, seconds=0.4):
  return Audio(samples=rng.uniform(-0.5, 0.5, int(8000 * seconds)).astype(np.float32), sample_rate=8000)


def _video(rng, frames=4, audio=True):
  return Video(frames=rng.integers(0, 256, (frames, 16, 16, 3), dtype=np.uint8), fps=2.0,
               audio=_audio(rng, 1.0) if audio else None)


def test_interleaved_layout_order_and_boundaries(tok, cfg):
  rng = np.random.default_rng(0)
  enc = interleave.InputEncoder(tok, cfg)
  e = enc.encode([_image(rng), "make it green", _audio(rng, 0.7), Text(text="done")], max_length=128)
  t = e.tokens.tolist()
  sid = tok.special_id
  assert t[0] == tok_lib.BOS_ID and t[-1] == tok_lib.EOS_ID
  # image: <soi> soft x 4 <eoi> right after bos
  assert t[1] == sid(tok_lib.START_OF_IMAGE) and t[6] == sid(tok_lib.END_OF_IMAGE)
  assert t[2:6] == [sid(tok_lib.SOFT_TOKEN)] * 4
  text_ids = tok.encode("make it green")
  assert t[7:7 + len(text_ids)] == text_ids
  a0 = 7 + len(text_ids)
  assert t[a0] == sid(tok_lib.START_OF_AUDIO)
  # 0.7 s at hop 64 -> 1 + 5600 // 64 = 88 frames -> chunks of 24: 24, 24, 24 (cut: 3 chunks max)
  kinds = [m.kind for m in e.media]
  assert kinds == ["image", "audio", "audio", "audio"]
  assert e.cut and not e.truncated  # the audio had more than max_audio_chunks chunks
  assert e.media[0].offset == 2 and e.media[0].tokens == 4
  a_end = t.index(sid(tok_lib.END_OF_AUDIO))
  assert all(t[m.offset:m.offset + m.tokens] == [sid(tok_lib.SOFT_TOKEN)] * m.tokens for m in e.media)
  assert e.media[1].offset == a0 + 1
  assert sum(m.tokens for m in e.media[1:]) == a_end - a0 - 1
  assert t[a_end + 1:-1] == tok.encode("done")


def test_video_layout_timestamps_frames_and_audio_track(tok, cfg):
  rng = np.random.default_rng(1)
  enc = interleave.InputEncoder(tok, cfg)
  e = enc.encode(_video(rng, frames=4), max_length=128)
  t = e.tokens.tolist()
  sid = tok.special_id
  assert t[1] == sid(tok_lib.START_OF_VIDEO) and t[-2] == sid(tok_lib.END_OF_VIDEO)
  assert t.count(sid(tok_lib.TIMESTAMP)) == 3  # a 2 s clip at 2 fps gives 4 frames; the budget is 3
  assert [m.kind for m in e.media].count("image") == t.count(sid(tok_lib.START_OF_IMAGE))
  assert "audio" in [m.kind for m in e.media]
  first_stamp = t.index(sid(tok_lib.TIMESTAMP))
  assert tok.decode(t[first_stamp + 1:t.index(sid(tok_lib.START_OF_IMAGE))]) == "0.0s"


def test_truncation_keeps_media_whole(tok, cfg):
  rng = np.random.default_rng(2)
  enc = interleave.InputEncoder(tok, cfg)
  e = enc.encode(["word " * 5, _image(rng), _image(rng)], max_length=14)
  # bos + 5 words + <soi> 4 soft <eoi> = 12 fits; a second image (6 more) does not.
  assert e.truncated and e.count("image") == 1 and len(e.tokens) <= 14
  assert e.tokens[-1] == tok_lib.EOS_ID


def test_image_alone_and_interleaved_use_the_same_frontend_path(tok, cfg, model):
  rng = np.random.default_rng(3)
  img = _image(rng)
  emb = Embedder(model, tok, batch_size=4)
  alone, inter = emb.encode([img, ["a caption first", img, "and after"]])
  side = emb._rows([alone, inter], [[0], [1]], 64)  # one input per row, each row its own group
  soft, mask = model.soft_inputs({k: jnp.asarray(v) for k, v in side.items()},
                                 num_groups=side["tokens"].shape[0])
  direct = model.image_frontend(jnp.asarray(alone.media[0].array)[None])[0]
  for row, e in enumerate((alone, inter)):
    m = e.media[0]
    np.testing.assert_array_equal(np.asarray(mask[row]), side["soft_index"][row] >= 0)
    np.testing.assert_allclose(np.asarray(soft[row, m.offset:m.offset + m.tokens]), np.asarray(direct),
                               rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(alone.media[0].array, inter.media[0].array)


def _pack(shape, examples):
  it = iter(list(enumerate(examples)))
  batch, held = packing.pack_group(shape, [], lambda: next(it))
  assert not held
  return batch


def test_packed_multimodal_examples_do_not_attend_to_each_other(tok, cfg, model):
  rng = np.random.default_rng(4)
  enc = interleave.InputEncoder(tok, cfg)
  inputs = [[_image(rng), "red"], _audio(rng, 0.3), ["blue", _image(rng), _audio(rng, 0.2)],
            _video(rng, 2, audio=False)]
  encoded = [enc.encode(x, max_length=128) for x in inputs]
  shape = packing.GroupShape(
      examples=4, segments=4, num_negatives=0,
      query=packing.SideShape(length=128, rows=2, images=sum(e.count("image") for e in encoded),
                              audio=sum(e.count("audio") for e in encoded)),
      positive=packing.SideShape(length=16, rows=1),
      image_shape=(16, 16, 3), image_tokens=4, audio_shape=(24, 16), audio_tokens=6, audio_pad=-1.0)
  exs = [{"query_tokens": e.tokens, "query_media": e.media, "positive_tokens": np.array([2, 5, 1]),
          "query_id": i, "positive_id": i} for i, e in enumerate(encoded)]
  batch = _pack(shape, exs)
  assert int(batch["num_examples"]) == 4
  assert (batch["query_segment_ids"].max(axis=1) >= 2).any()  # at least one row holds 2 examples
  emb = Embedder(model, tok, batch_size=4)
  side = {k[len("query_"):]: jnp.asarray(v) for k, v in batch.items() if k.startswith("query_")}
  packed = np.asarray(model(side, num_groups=1))
  alone = emb.embed_encoded(encoded)
  np.testing.assert_allclose(packed, alone, rtol=2e-5, atol=2e-5)


def test_pipeline_batches_media_sides_and_counts_skips(tok, cfg):
  rng = np.random.default_rng(5)
  bad = Image(data=b"\x89PNG\r\n\x1a\n" + bytes(40))  # a PNG header, then garbage
  examples = []
  for i in range(40):
    q = bad if i % 10 == 3 else [_image(rng), f"shape {i}"]
    examples.append({"query": q, "positive": f"caption {i}", "query_id": i, "positive_id": i})
  task = pipeline.TaskSpec(name="img", examples=examples, task_string="find: ",
                           batch=pipeline.BatchSpec(batch_size=8, query_len=64, positive_len=16,
                                                    segments=4))
  it = pipeline.build_ft_iterator([task], tokenizer=tok, num_groups=2, seed=0,
                                  encoder=interleave.InputEncoder(tok, cfg))
  seen, skipped, ids = 0, 0, set()
  for _ in range(10):
    b = next(it)
    seen += int(b["num_examples"])
    skipped += int(b["num_skipped"])
    ids |= set(int(q) for q, ok in zip(b["query_ids"], b["example_valid"]) if ok)
    assert b["query_images"].shape[1:] == (16, 16, 3) and b["query_images"].dtype == np.uint8
    assert "positive_images" not in b and "positive_soft_index" not in b
    n_soft = (b["query_soft_index"] >= 0).sum()
    assert n_soft == 4 * int(b["query_num_images"])
  # 4 of 40 records are corrupt: every epoch skips them, and only them; every other record arrives.
  assert skipped > 0
  assert abs(skipped / (seen + skipped) - 0.1) < 0.05
  assert ids == {i for i in range(40) if i % 10 != 3}


def test_embedder_embeds_media_and_matches_the_training_path(tok, cfg, model):
  rng = np.random.default_rng(6)
  emb = Embedder(model, tok, batch_size=4, task_strings={"t2i": "find: "})
  assert emb.modalities == ("text", "image", "audio", "video")
  inputs = [_image(rng), _audio(rng), _video(rng, 3), [_image(rng), "edit"], "plain text"]
  e_nd = emb.embed(inputs, task="t2i")
  assert e_nd.shape == (5, cfg.embed_dim) and np.isfinite(e_nd).all()
  np.testing.assert_allclose(np.linalg.norm(e_nd, axis=1), 1.0, rtol=1e-5)
  # The same inputs through the training pipeline's transforms and packer, then the model.
  examples = [{"query": x, "positive": "p", "query_id": i, "positive_id": i} for i, x in enumerate(inputs)]
  spec = pipeline.BatchSpec(batch_size=5, query_len=128, positive_len=8, segments=4, query_rows=5,
                            positive_rows=5)
  task = pipeline.TaskSpec(name="t2i", examples=examples, task_string="find: ", batch=spec)
  ds = pipeline._task_stream(task, 0, spec, tok, 0, interleave.InputEncoder(tok, cfg))
  stream = [ds[i] for i in range(5)]
  shape = pipeline.group_shape(spec, 1, stream, model_cfg=cfg)
  batch = _pack(shape, stream)
  side = {k[len("query_"):]: jnp.asarray(v) for k, v in batch.items() if k.startswith("query_")}
  trained = np.asarray(model(side, num_groups=1))
  order = [int(q) for q in batch["query_ids"]]
  np.testing.assert_allclose(trained, e_nd[order], rtol=2e-5, atol=2e-5)


def _png_bytes(rng, size=(10, 8)):
  buf = io.BytesIO()
  PILImage.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


@pytest.mark.parametrize("name", ["corrupt", "truncated", "unsupported", "too_large", "empty_audio",
                                  "nan_audio", "no_frames"])
def test_embedder_bad_media_names_the_input(tok, cfg, model, name):
  rng = np.random.default_rng(7)
  png = _png_bytes(rng)
  bad = {
      "corrupt": Image(data=png[:16] + bytes(rng.integers(0, 256, 64, dtype=np.uint8))),
      "truncated": Image(data=png[:len(png) // 2]),
      "unsupported": Image(data=b"this is plain text, not an image at all"),
      "too_large": Image(pixels=np.zeros((300, 300, 3), np.uint8) + 7),
      "empty_audio": Audio(samples=np.zeros((0,), np.float32), sample_rate=8000),
      "nan_audio": Audio(samples=np.full((800,), np.nan, np.float32), sample_rate=8000),
      "no_frames": Video(frames=np.zeros((0, 16, 16, 3), np.uint8), fps=2.0),
  }[name]
  m = model
  if name == "too_large":
    small = cfg.replace(media=cfg.media.replace(max_image_pixels=200 * 200))
    m = EmbeddingModel(small, rngs=nnx.Rngs(0))
  emb = Embedder(m, tok, batch_size=4)
  with pytest.raises(MediaError, match=r"inputs\[1\]"):
    emb.embed(["fine", bad, "also fine"])


def test_text_only_model_refuses_media(tok):
  m = EmbeddingModel(ModelConfig.from_name("tiny", vocab_size=tok.vocab_size), rngs=nnx.Rngs(0))
  emb = Embedder(m, tok, batch_size=2)
  assert emb.modalities == ("text",)
  with pytest.raises(MissingFrontendError, match=r"inputs\[0\].*no image frontend"):
    emb.embed([Image(pixels=np.ones((4, 4, 3), np.uint8))])
  with pytest.raises(MissingFrontendError, match="no audio frontend"):
    emb.embed([["hi", Audio(samples=np.ones(100, np.float32), sample_rate=8000)]])


def test_media_config_validation_names_the_field():
  with pytest.raises(ValueError, match=r"config\.model\.media\.image_tokens=5"):
    MediaConfig(image_frontend="patch", image_size=16, patch_size=4, image_tokens=5)
  with pytest.raises(ValueError, match=r"config\.model\.media\.image_frontend='jpeg'"):
    ModelConfig.from_dict(dict(preset="tiny", media=dict(image_frontend="jpeg")))
  with pytest.raises(ValueError, match=r"media\.image_tokens \+ 2 boundary tokens\) but max_length=5"):
    ModelConfig.from_name("tiny", max_length=5, media=MediaConfig(image_frontend="patch", image_tokens=4))


def test_training_stops_when_too_many_records_are_undecodable(tmp_path):
  from configs import tiny
  from embed2.train import trainer

  rng = np.random.default_rng(8)
  png = _png_bytes(rng, (12, 12))
  examples = []
  for i in range(64):
    img = Image(data=png[:30]) if i % 3 == 0 else Image(data=_png_bytes(rng, (12, 12)))
    examples.append({"query": f"picture {i}", "positive": img, "query_id": i, "positive_id": 1000 + i})
  c = tiny.get_config("pft_steps=6,ft_steps=1,layers=1")  # one block: the stop does not depend on depth
  c.model.update(dict(media=MEDIA, max_length=64, max_segments=4))
  c.tasks = {"pics": dict(task_string="find: ", batch_size=8, query_len=16, positive_len=16,
                          segments=4)}
  c.stages[0].tasks = {"pics": 1.0}
  c.stages[0].batch = dict(batch_size=8, query_len=16, positive_len=16, segments=4)
  c.stages[1].tasks = {"pics": 1.0}
  c.max_skipped_fraction = 0.2
  c.skipped_grace_records = 16
  data = {"pics": trainer.TaskData(train=examples)}
  with pytest.raises(trainer.TrainingStopped, match=r"skipped \d+ of \d+ records .*max_skipped_fraction=0.2"):
    trainer.train(c, str(tmp_path), data)


def test_a_stream_of_only_bad_records_yields_counted_batches_not_a_hang(tok, cfg):
  bad = [{"query": Image(path="/nonexistent/x.png"), "positive": "p", "query_id": i, "positive_id": i}
         for i in range(20)]
  spec = pipeline.BatchSpec(batch_size=4, query_len=32, positive_len=8, segments=4, query_rows=2,
                            positive_rows=1, query_images=4, positive_images=0, query_audio=0,
                            positive_audio=0)
  task = pipeline.TaskSpec(name="bad", examples=bad, batch=spec)
  it = pipeline.build_ft_iterator([task], tokenizer=tok, num_groups=1, seed=0,
                                  encoder=interleave.InputEncoder(tok, cfg))
  b = next(it)
  assert int(b["num_examples"]) == 0 and int(b["num_skipped"]) > 0
  # Left to suggest its shapes, the same task fails at build time, quoting why.
  task = pipeline.TaskSpec(name="bad", examples=bad, batch=pipeline.BatchSpec(
      batch_size=4, query_len=32, positive_len=8, segments=4))
  with pytest.raises(ValueError, match=r"task 'bad': 20 of the first 20 records cannot be decoded"):
    pipeline.build_ft_iterator([task], tokenizer=tok, num_groups=1, seed=0,
                               encoder=interleave.InputEncoder(tok, cfg))


def test_a_tuple_with_more_media_than_the_side_holds_is_skipped_and_counted(tok, cfg):
  rng = np.random.default_rng(9)
  enc = interleave.InputEncoder(tok, cfg)
  two = enc.encode([_image(rng), _image(rng)], max_length=64)
  one = enc.encode(_image(rng), max_length=64)
  shape = packing.GroupShape(
      examples=1, segments=4, num_negatives=0,
      query=packing.SideShape(length=64, rows=1, images=1), positive=packing.SideShape(length=8, rows=1),
      image_shape=(16, 16, 3), image_tokens=4)
  exs = [{"query_tokens": e.tokens, "query_media": e.media, "positive_tokens": np.array([2, 5, 1]),
          "query_id": i, "positive_id": i} for i, e in enumerate((two, one))]
  it = iter(list(enumerate(exs)))
  batch, _ = packing.pack_group(shape, [], lambda: next(it))
  assert int(batch["num_skipped"]) == 1 and int(batch["num_examples"]) == 1


def test_an_item_that_cannot_fit_its_side_is_an_error_not_an_empty_sequence(tok, cfg):
  enc = interleave.InputEncoder(tok, cfg)
  with pytest.raises(ValueError, match=r"q: max_length=6 cannot hold even its first image \(8 tokens"):
    enc.encode(Image(pixels=np.ones((4, 4, 3), np.uint8)), max_length=6, where="q")


def test_errors_name_the_callers_index_and_text_items_tokenize_as_in_training(tok, cfg, model):
  emb = Embedder(model, tok, batch_size=2, task_strings={"t": "find: "})
  with pytest.raises(MediaError, match=r"inputs\[0\]: "):
    emb.embed([Image(data=b"not an image")], task="t")
  with pytest.raises(MediaError, match=r"inputs\[1\]\[0\]: "):
    emb.embed(["ok", [Image(data=b"not an image"), "hello"]], task="t")
  # A Text item (or a text-only list) is one text, in Embedder and in the training pipeline alike.
  item = Text(text="red circle")
  tokenize = transforms.Tokenize(tokenizer=tok, in_key="q", out_key="q_tokens", truncated_key="t",
                               max_length=32, encoder=interleave.InputEncoder(tok, cfg))
  prepend = transforms.PrependTaskString(task_string="find: ", key="q")
  trained = tokenize.map(prepend.random_map({"q": [item, " now"]}, np.random.default_rng(0)))
  np.testing.assert_array_equal(trained["q_tokens"], emb.tokenize([[item, " now"]], task="t")[0])
  np.testing.assert_array_equal(trained["q_tokens"], emb.tokenize(["red circle now"], task="t")[0])


def test_sharded_media_batch_equals_single_device(tok, cfg, model):
  from embed2 import sharding
  from embed2.train import step as step_lib

  rng = np.random.default_rng(10)
  examples = []
  for i in range(64):
    q = [_image(rng), f"shape {i}"] if i % 2 else _audio(rng, 0.2 + 0.01 * (i % 7))
    examples.append({"query": q, "positive": _image(rng) if i % 3 else f"caption {i}", "query_id": i,
                     "positive_id": 100 + i})
  spec = pipeline.BatchSpec(batch_size=16, query_len=64, positive_len=32, segments=4)
  task = pipeline.TaskSpec(name="mix", examples=examples, batch=spec)
  it = pipeline.build_ft_iterator([task], tokenizer=tok, num_groups=8, seed=1,
                                  encoder=interleave.InputEncoder(tok, cfg))
  host = next(it)
  arrays = {k: v for k, v in host.items() if np.ndim(v) > 0}
  fn = nnx.jit(lambda m, b: m.embed_sides(b, 8, ("query", "positive")))
  single = fn(model, {k: jnp.asarray(v) for k, v in arrays.items()})
  mesh = sharding.make_mesh({"data": 8})
  batch = step_lib.device_batch(host, mesh)
  assert batch["query_images"].sharding.spec[0] == sharding.BATCH_AXES
  with jax.set_mesh(mesh):
    sharded = fn(model, {k: v for k, v in batch.items() if k in arrays})
  for side in ("query", "positive"):
    np.testing.assert_allclose(np.asarray(sharded[side]), np.asarray(single[side]), rtol=1e-5, atol=1e-5)


def test_a_text_checkpoint_and_gemma_vision_weights_start_a_multimodal_model(tmp_path, tok):
  from embed2.model import vision
  from embed2.model.frontends import ViTImageFrontend
  from embed2 import checkpoint as ckpt_lib
  from embed2.train import trainer

  text_cfg = ModelConfig.from_name("tiny", vocab_size=tok.vocab_size)
  text = EmbeddingModel(text_cfg, rngs=nnx.Rngs(1))
  ck = ckpt_lib.Checkpointer(tmp_path / "text", async_save=False)
  ck.save(0, params=nnx.to_pure_dict(nnx.state(text, nnx.Param)),
          meta={"model_config": text_cfg.to_dict()}, force=True)
  ck.close()
  mm_cfg = text_cfg.replace(media=MediaConfig(image_frontend="vit", image_size=16, patch_size=4,
                                               image_tokens=4, vit_width=32, vit_depth=1, vit_heads=4,
                                               vit_mlp_dim=48))
  mm = EmbeddingModel(mm_cfg, rngs=nnx.Rngs(2))
  before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(mm.image_frontend, nnx.Param)))
  ckpt_lib.load_model_params(mm, tmp_path / "text")
  for a, b in zip(jax.tree.leaves(nnx.state(text.transformer, nnx.Param)),
                  jax.tree.leaves(nnx.state(mm.transformer, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  after = nnx.to_pure_dict(nnx.state(mm.image_frontend, nnx.Param))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), before, after)
  # The converted SigLIP weights (embed2.convert's OUT/vision layout) load into the ViT frontend.
  vcfg = ViTImageFrontend.vision_config(mm_cfg)
  siglip = vision.VisionEncoder(vcfg, rngs=nnx.Rngs(3))
  ck = ckpt_lib.Checkpointer(tmp_path / "conv" / "vision", async_save=False)
  ck.save(0, params=nnx.to_pure_dict(nnx.state(siglip, nnx.Param)),
          meta={"vision_config": vcfg.to_dict()}, force=True)
  ck.close()
  trainer.init_vision(mm, str(tmp_path / "conv"))
  for a, b in zip(jax.tree.leaves(nnx.state(siglip, nnx.Param)),
                  jax.tree.leaves(nnx.state(mm.image_frontend.encoder, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="needs config.model.media.image_frontend='vit'"):
    trainer.init_vision(EmbeddingModel(text_cfg, rngs=nnx.Rngs(0)), str(tmp_path / "conv"))
