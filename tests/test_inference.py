"""Embedder: equals the training encoder, MRL renormalises, buckets compile once, packed == unpacked,
bad input is refused."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from embed2 import inference
from embed2.data import packing, pipeline
from embed2.data import tokenizer as tokenizer_lib
from embed2.data.tokenizer import Tokenizer
from embed2.inference import Audio, Embedder, Image, InvalidTextError, MissingFrontendError, Text, Video
from embed2.checkpoint import Checkpointer
from embed2.model import EmbeddingModel, ModelConfig
from embed2.model.presets import MediaConfig

TASK = "search"
TASK_STRING = "task: search result | query: "
WORDS = ("tar archive gzip file read write socket server client thread lock queue parse json "
         "decode encode path directory copy remove stream buffer bytes string format date time").split()


def sentence(rng, n_words):
  return " ".join(rng.choice(WORDS, n_words))


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory, request, fixture_rng, save_random_checkpoint):
  d = tmp_path_factory.mktemp("ckpt")
  save_random_checkpoint(d, fixture_rng(request), step=3, task_strings={TASK: TASK_STRING, "empty": ""})
  return d


@pytest.fixture(scope="module")
def embedder(ckpt_dir):
  return Embedder.from_checkpoint(ckpt_dir, batch_size=8)


@pytest.fixture(scope="module")
def local_embedder(request, fixture_rng, random_tiny_model):
  """Single device, small buckets, one input per row: for counting compilations."""
  return Embedder(random_tiny_model(fixture_rng(request)), Tokenizer.default(),
                  task_strings={TASK: TASK_STRING}, batch_size=4, buckets=(16, 32, 64),
                  max_length=64, segments=1)


def test_from_checkpoint_equals_training_encoder(embedder, rng):
  """Both sides of a packed training batch (task string on queries) == Embedder.embed."""
  # Queries of <= 15 tokens (task string included): two fit in every 32-token row.
  examples = [{"query": sentence(rng, int(rng.integers(1, 6))),
               "positive": sentence(rng, int(rng.integers(3, 30))),  # <= 60 tokens: untruncated
               "negatives": [], "query_id": i, "positive_id": 1000 + i} for i in range(16)]
  spec = pipeline.BatchSpec(batch_size=8, query_len=32, positive_len=64, segments=4,
                            query_rows=4, positive_rows=6)
  task = pipeline.TaskSpec(name=TASK, examples=examples, task_string=TASK_STRING, p_drop=0.0,
                           batch=spec)
  it = pipeline.build_ft_iterator([task], tokenizer=embedder.tokenizer, num_groups=1, seed=0)
  batch = packing.model_inputs(next(it))
  assert batch["query_segment_ids"].max() > 1, "the batch should pack several queries per row"
  # The train step's path (model(batch, num_groups, prefix)), jitted as the train step is.
  train_embed = nnx.jit(lambda m, b, prefix: m(b, 1, prefix=prefix), static_argnames="prefix")
  q_bd = np.asarray(train_embed(embedder.model, batch, prefix="query_"))
  p_bd = np.asarray(train_embed(embedder.model, batch, prefix="positive_"))
  valid = np.asarray(batch["example_valid"])
  ids = np.asarray(batch["query_ids"])[valid]
  assert len(ids) >= 4
  want_q = embedder.embed([examples[i]["query"] for i in ids], task=TASK)
  want_p = embedder.embed([examples[i]["positive"] for i in ids], is_query=False)
  np.testing.assert_allclose(q_bd[valid], want_q, atol=2e-5)
  np.testing.assert_allclose(p_bd[valid], want_p, atol=2e-5)
  # The task string matters: without it the queries embed differently.
  plain = embedder.embed([examples[i]["query"] for i in ids])
  assert np.abs(plain - want_q).max() > 1e-3


def test_tokens_match_training_tokenizer(embedder, rng):
  text = sentence(rng, 5)
  toks = embedder.tokenize([text], task=TASK)[0]
  want = [2] + embedder.tokenizer.encode(TASK_STRING + text) + [1]
  np.testing.assert_array_equal(toks, want)
  np.testing.assert_array_equal(embedder.tokenize([text], task=TASK, is_query=False)[0],
                                [2] + embedder.tokenizer.encode(text) + [1])


def test_mrl_truncation_renormalises(embedder, rng):
  texts = [sentence(rng, int(n)) for n in rng.integers(1, 20, 11)]
  full = embedder.embed(texts)
  assert full.dtype == np.float32 and full.shape == (11, embedder.embed_dim)
  np.testing.assert_allclose(np.linalg.norm(full, axis=1), 1.0, atol=1e-5)
  for dim in embedder.config.resolved_mrl_dims:
    e = embedder.embed(texts, dim=dim)
    assert e.shape == (11, dim)
    ref = full[:, :dim].astype(np.float64)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(e, ref, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)


def test_buckets_compile_once_and_order_is_kept(local_embedder, rng):
  e = local_embedder
  short = [sentence(rng, int(n)) for n in rng.integers(1, 4, 6)]  # <= 16 tokens
  before = e.num_compilations
  a = e.embed(short)  # a call of 4 rows, then one of 2 (the last call: the rows it fills)
  assert e.num_compilations == before + 2
  e.embed([sentence(rng, 2) for _ in range(10)])  # the same bucket: 4 + 4 + 2 rows
  assert e.num_compilations == before + 2
  long = sentence(rng, 20)
  while len(e.tokenize([long])[0]) <= 40:  # > 32 tokens: the 64 bucket
    long += " " + sentence(rng, 1)
  assert 32 < len(e.tokenize([long])[0]) <= 64
  mixed = e.embed([short[0], long, short[1], short[2]])  # 4 rows of 64
  assert e.num_compilations == before + 3
  e.embed([long, short[2], long, short[3]])
  assert e.num_compilations == before + 3
  if hasattr(e._forward, "_cache_size"):  # jax's own count of compiled executables agrees
    assert e._forward._cache_size() == e.num_compilations
  # Sorting by length is undone, and padding to a longer bucket does not change a vector.
  np.testing.assert_allclose(mixed[[0, 2, 3]], a[:3], atol=1e-5)
  np.testing.assert_allclose(mixed[1], e.embed([long])[0], atol=1e-5)


def _rel_err(got, want):
  """max |got - want| / max |want|, in float64."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / np.abs(want).max())


def test_packed_equals_unpacked_text(local_embedder, rng):
  """Several inputs per row (segment ids, restarting positions) embed as each alone in a row."""
  e = local_embedder
  packed = Embedder(e.model, e.tokenizer, task_strings={TASK: TASK_STRING}, batch_size=4,
                    buckets=(16, 32, 64), max_length=64, segments=4, pack_length=64)
  texts = [sentence(rng, int(n)) for n in rng.integers(1, 14, 23)]
  encoded = packed.encode(texts, task=TASK)
  plan = packed.plan(encoded)
  assert max(len(row) for _, rows in plan for row in rows) > 1, "nothing was packed"
  assert sorted(k for _, rows in plan for row in rows for k in row) == list(range(len(texts)))
  for length, rows in plan:
    assert len(rows) <= 4 and all(len(r) <= 4 and sum(len(encoded[k].tokens) for k in r) <= length
                                  for r in rows)
  got = packed.embed(texts, task=TASK)
  want = e.embed(texts, task=TASK)
  assert _rel_err(got, want) < 1e-6
  np.testing.assert_allclose(packed.embed(texts[5:6], task=TASK), want[5:6], rtol=0, atol=1e-6)
  with pytest.raises(ValueError, match="segments=0 must be an integer >= 1"):
    Embedder(e.model, e.tokenizer, segments=0)


def test_default_buckets_are_four_per_octave():
  assert inference.default_buckets(512) == (32, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)
  assert inference.default_buckets(100) == (32, 64, 96, 100)
  assert inference.default_buckets(32) == (32,)
  b = inference.default_buckets(8192)
  assert b[-5:] == (4096, 5120, 6144, 7168, 8192) and len(b) == 28  # 32, 64, 96, then 4 an octave
  assert all(0 < (y - x) <= x / 4 or x < 128 for x, y in zip(b, b[1:]))  # pads at most a quarter


def test_default_packing_equals_unpacked(local_embedder, rng):
  """The defaults (DEFAULT_SEGMENTS inputs per row, rows of pack_length, default buckets) put many
  short queries into one row, and each embeds as it does alone in a row."""
  e = local_embedder
  packed = Embedder(e.model, e.tokenizer, task_strings={TASK: TASK_STRING}, batch_size=4,
                    max_length=64)
  assert packed.segments == inference.DEFAULT_SEGMENTS == 16
  assert packed.buckets == (32, 64)
  texts = [sentence(rng, int(n)) for n in rng.integers(1, 3, 40)]  # 3-4 tokens each
  plan = packed.plan(packed.encode(texts))
  assert max(len(row) for _, rows in plan for row in rows) == 16
  got = packed.embed(texts)
  assert _rel_err(got, e.embed(texts)) < 1e-6


@pytest.fixture(scope="module")
def media_model(request, fixture_rng):
  """A tiny model with image (patch) and audio (conv) frontends, every parameter random."""
  rng = fixture_rng(request)
  media = MediaConfig(image_frontend="patch", audio_frontend="conv", image_size=16, patch_size=4,
                      image_tokens=4, sample_rate=8000, n_mels=16, n_fft=128, hop_length=64,
                      audio_chunk_frames=24, max_audio_chunks=3)
  cfg = ModelConfig.from_name("tiny", vocab_size=Tokenizer.default().vocab_size, max_length=128,
                              media=media)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: EmbeddingModel(cfg, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, jax.tree.map(
      lambda x: jnp.asarray(rng.normal(0, 0.3, x.shape).astype(x.dtype)), state))


def test_packed_equals_unpacked_media(media_model, rng):
  """Images and audio chunks of packed inputs go to their own row's slots: the same vectors."""
  tok = Tokenizer.default()

  def image():
    return Image(pixels=rng.integers(0, 256, (int(rng.integers(8, 24)), 12, 3), dtype=np.uint8))

  def audio():
    return Audio(samples=rng.uniform(-0.5, 0.5, int(rng.integers(800, 3000))).astype(np.float32),
                 sample_rate=8000)

  inputs = [image(), sentence(rng, 3), [image(), "and", audio()], audio(), [sentence(rng, 2), image()],
            sentence(rng, 6), [audio(), image(), image()], image()]
  one = Embedder(media_model, tok, batch_size=4, segments=1)
  packed = Embedder(media_model, tok, batch_size=4, segments=4, pack_length=128)
  plan = packed.plan(packed.encode(inputs))
  assert max(len(row) for _, rows in plan for row in rows) > 1, "nothing was packed"
  assert _rel_err(packed.embed(inputs), one.embed(inputs)) < 1e-6


def test_bad_inputs(local_embedder, rng):
  e = local_embedder
  assert e.embed([]).shape == (0, e.embed_dim)
  assert e.embed([], dim=16).shape == (0, 16)
  for bad in ([b"bytes"], [3], [{"text": "x"}], [None]):
    with pytest.raises(TypeError, match="unsupported type"):
      e.embed(bad)
  with pytest.raises(TypeError, match="wrap a single input"):
    e.embed("a lone string")
  for item, name in ((Image(pixels=np.zeros((4, 4, 3), np.uint8)), "image"),
                     (Audio(samples=np.zeros(10), sample_rate=16000), "audio"),
                     (Video(path="clip.mp4"), "video")):
    with pytest.raises(MissingFrontendError, match=f"no {name} frontend"):
      e.embed([item])
    with pytest.raises(MissingFrontendError, match=f"no {name} frontend"):
      e.embed([[Text(text="caption"), item]])
  with pytest.raises(ValueError, match=r"dim=17 is not a trained MRL dim.*\(16, 32, 64\)"):
    e.embed(["x"], dim=17)
  with pytest.raises(ValueError, match="not a task this model was trained with"):
    e.embed(["x"], task="nope")
  with pytest.raises(ValueError, match="empty interleaved"):
    e.embed([[]])
  # Too long: truncated (bos and eos kept) with a warning, or refused.
  long = sentence(rng, 80)
  with pytest.warns(UserWarning, match="longer than max_length=64"):
    got = e.embed(["ok", long])
  ids = e.tokenizer.encode(long)
  want = e.embed_tokens([np.asarray([2] + ids[:62] + [1], np.int32)])
  np.testing.assert_allclose(got[1], want[0], atol=1e-6)
  strict = Embedder(e.model, e.tokenizer, max_length=64, buckets=(64,), on_overflow="error")
  with pytest.raises(ValueError, match=r"indices \[1\]"):
    strict.embed(["ok", long])
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert np.isfinite(e.embed(["still works"])).all()  # nothing above broke the embedder


def test_interleaved_text_items_and_prefix(local_embedder):
  e = local_embedder
  np.testing.assert_allclose(e.embed([[Text(text="read a "), "tar file"]]),
                             e.embed(["read a tar file"]), atol=1e-6)
  np.testing.assert_allclose(e.embed(["x y"], task=TASK), e.embed(["x y"], prefix=TASK_STRING),
                             atol=1e-6)
  # Documents never get a task string; an explicit prefix applies to them too.
  np.testing.assert_allclose(e.embed(["x y"], task=TASK, is_query=False), e.embed(["x y"]),
                             atol=1e-6)
  np.testing.assert_allclose(e.embed(["x y"], prefix="p: ", is_query=False), e.embed(["p: x y"]),
                             atol=1e-6)


def test_search_sharded_and_local(embedder, rng):
  q = embedder.embed([sentence(rng, 3) for _ in range(5)], dim=32)
  c = embedder.embed([sentence(rng, 6) for _ in range(37)], dim=32, is_query=False)
  ref = np.argsort(-(q.astype(np.float64) @ c.T.astype(np.float64)), axis=1, kind="stable")[:, :7]
  for mesh in (None, embedder.mesh):
    s, i = inference.search(q, c, 7, mesh=mesh, chunk=8)
    np.testing.assert_array_equal(i, ref)
    np.testing.assert_allclose(s, np.take_along_axis(q @ c.T, ref, axis=1), atol=1e-5)
  with pytest.raises(ValueError, match="same d"):
    inference.search(q, c[:, :16], 3)


def test_lone_surrogates_are_refused_naming_the_input(local_embedder):
  """Text that is not valid Unicode is a ValueError naming inputs[i] and the character position (it
  used to be sentencepiece's RuntimeError, naming nothing)."""
  e = local_embedder
  with pytest.raises(InvalidTextError, match=r"inputs\[1\]: character 4 is a lone surrogate \(U\+D800\)"):
    e.embed(["fine", "abc \ud800 def"])
  with pytest.raises(ValueError, match=r"inputs\[0\]\[1\]: character 1 is a lone surrogate \(U\+DFFF\)"):
    e.embed([["read a ", Text(text="x\udfff")]], is_query=False)
  with pytest.raises(ValueError, match=r"prefix: character 2 is a lone surrogate"):
    e.embed(["fine"], prefix="p:\udc80")
  with pytest.raises(ValueError, match=r"inputs\[0\]: character 0"):
    e.tokenize(["\ud83d"])  # half of an emoji's surrogate pair
  assert np.isfinite(e.embed(["fine", "déjà vu 🦜"])).all()


def _save(directory, model, meta):
  ck = Checkpointer(directory, keep=None, async_save=False)
  ck.save(1, params=nnx.to_pure_dict(nnx.state(model, nnx.Param)), force=True,
          meta={"model_config": model.cfg.to_dict(), **meta})
  ck.close()
  return directory


def test_from_checkpoint_embeds_only_with_the_checkpoints_own_tokenizer(local_embedder, tmp_path):
  """No fallback to the packaged tokenizer: a checkpoint names its tokenizer, or is refused."""
  model = local_embedder.model
  source = {"hf_dir": "/models/x", "format": "sentence-transformers"}
  with pytest.raises(ValueError, match="names no tokenizer"):
    Embedder.from_checkpoint(_save(tmp_path / "none", model, {}))
  with pytest.raises(ValueError, match="imported from /models/x without its tokenizer.*re-import"):
    Embedder.from_checkpoint(_save(tmp_path / "old_import", model, {"tokenizer": "", "source": source}))
  gone = str(tmp_path / "gone" / "tokenizer.model")
  with pytest.raises(FileNotFoundError, match="gone/tokenizer.model, which is missing"):
    Embedder.from_checkpoint(_save(tmp_path / "trained", model, {"tokenizer": gone}))
  # An import carries its copy: moved elsewhere, the copy beside its checkpoint is the one used.
  moved = _save(tmp_path / "moved", model, {"tokenizer": gone, "source": source})
  (moved / "tokenizer.model").write_bytes(tokenizer_lib.DEFAULT_MODEL_PATH.read_bytes())
  emb = Embedder.from_checkpoint(moved, mesh=None, batch_size=4, buckets=(16, 32, 64), max_length=64)
  assert emb.tokenizer.source == str(moved / "tokenizer.model")
  np.testing.assert_allclose(emb.embed(["read a tar file"]), local_embedder.embed(["read a tar file"]),
                             atol=1e-6)
  # A run on the packaged tokenizer says so with "" (what the trainer writes).
  assert Embedder.from_checkpoint(_save(tmp_path / "run", model, {"tokenizer": ""}),
                                  batch_size=4).tokenizer.source == str(tokenizer_lib.DEFAULT_MODEL_PATH)


def test_from_checkpoint_takes_another_attention_kernel(ckpt_dir, embedder, rng):
  """attention_impl overrides the checkpoint's kernel (long inputs: blockwise, memory linear in the
  row); the embeddings are the same function of the input."""
  blockwise = Embedder.from_checkpoint(ckpt_dir, batch_size=8, attention_impl="blockwise")
  assert blockwise.config.attention_impl == "blockwise" and embedder.config.attention_impl != "blockwise"
  texts = [sentence(rng, int(n)) for n in rng.integers(1, 25, size=6)]
  np.testing.assert_allclose(blockwise.embed(texts), embedder.embed(texts), rtol=1e-5, atol=1e-6)
