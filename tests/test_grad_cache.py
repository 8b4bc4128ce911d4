"""GradCache (embed2.train.grad_cache) == the full-batch gradient, on one and on 8 devices."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from embed2 import losses
from embed2.model.presets import MediaConfig
from embed2.train.grad_cache import grad_cache_value_and_grad

AUTO = jax.sharding.AxisType.Auto
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # compiles dominate; no float changes


class TinyEncoder(nnx.Module):
  """Per-token MLP -> one single-head bidirectional attention layer -> masked mean pool -> proj."""

  def __init__(self, din, dmodel, dout, *, rngs):
    self.inp = nnx.Linear(din, dmodel, rngs=rngs)
    self.qkv = nnx.Linear(dmodel, 3 * dmodel, rngs=rngs)
    self.mlp = nnx.Linear(dmodel, dmodel, rngs=rngs)
    self.out = nnx.Linear(dmodel, dout, rngs=rngs)

  def __call__(self, batch):
    x_bld, mask_bl = batch["x"], batch["mask"]
    h = jax.nn.gelu(self.inp(x_bld))
    q, k, v = jnp.split(self.qkv(h), 3, axis=-1)
    s_bll = jnp.einsum("bld,bmd->blm", q, k) / jnp.sqrt(q.shape[-1])
    s_bll = jnp.where(mask_bl[:, None, :], s_bll, -1e9)
    h = h + jnp.einsum("blm,bmd->bld", jax.nn.softmax(s_bll, -1), v)
    h = h + jax.nn.gelu(self.mlp(h))
    w = mask_bl[..., None].astype(h.dtype)
    return self.out(jnp.sum(h * w, 1) / jnp.maximum(jnp.sum(w, 1), 1.0))


def _batch(rng, n, length=5, din=6):
  lengths = rng.integers(1, length + 1, n)
  return {"x": jnp.asarray(rng.normal(size=(n, length, din)), jnp.float32),
          "mask": jnp.asarray(np.arange(length)[None, :] < lengths[:, None])}


def _setup(b=16, k=2, seed=0):
  rng = np.random.default_rng(seed)
  model = TinyEncoder(6, 16, 12, rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(model)
  embed_fn = lambda params, batch: nnx.merge(graphdef, params)(batch)
  inputs = {"query": _batch(rng, b), "positive": _batch(rng, b), "negative": _batch(rng, b * k)}
  loss_inputs = {"q_ids_b": jnp.asarray(rng.integers(0, b // 2, b), jnp.int32),
                 "valid_b": jnp.asarray(rng.random(b) > 0.1)}
  return embed_fn, params, inputs, loss_inputs


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _full_batch(embed_fn, loss_fn):
  def fn(params, loss_params, inputs, loss_inputs):
    f = lambda p, lp: loss_fn({k: embed_fn(p, x) for k, x in inputs.items()}, lp, loss_inputs)
    return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(params, loss_params)
  return fn


def _check_equal(got, want):
  (loss, aux), grads = got
  (want_loss, want_aux), want_grads = want
  assert _rel_err(loss, want_loss) < 1e-6
  for key in want_aux:
    assert _rel_err(aux[key], want_aux[key]) < 1e-6, key
  leaves, want_leaves = jax.tree.leaves(grads), jax.tree.leaves(want_grads)
  assert len(leaves) == len(want_leaves) == 9  # 4 kernels + 4 biases + log_scale
  for a, b in zip(leaves, want_leaves):
    assert a.dtype == b.dtype
    assert np.max(np.abs(np.asarray(b))) > 0  # every parameter really gets a gradient
    assert _rel_err(a, b) < 1e-5


def _loss_fn(loss, b, k):
  def loss_fn(embs, loss_params, loss_inputs):
    neg_bkd = embs["negative"].reshape(b, k, -1)
    return loss(embs["query"], embs["positive"], neg_bkd=neg_bkd, **loss_params, **loss_inputs)
  return loss_fn


def test_single_device_equals_full_batch():
  b, k = 16, 2
  embed_fn, params, inputs, loss_inputs = _setup(b, k)
  cfg = losses.LossConfig(learnable_temperature=True, mrl_dims=(6, 12), block_size=5,
                          symmetric=True)
  loss_fn = _loss_fn(lambda *a, **kw: losses.contrastive_loss(*a, **kw, cfg=cfg), b, k)
  loss_params = losses.init_loss_params(cfg)
  want = jax.jit(_full_batch(embed_fn, loss_fn), compiler_options=FAST_COMPILE)(
      params, loss_params, inputs, loss_inputs)
  step = grad_cache_value_and_grad(embed_fn, loss_fn, num_chunks=4, has_aux=True)
  got = jax.jit(step, compiler_options=FAST_COMPILE)(params, loss_params, inputs, loss_inputs)
  _check_equal(got, want)


@pytest.mark.parametrize("shape,names", [((2, 4), ("data", "fsdp")), ((4, 2), ("data", "tensor"))])
def test_sharded_equals_full_batch(shape, names):
  b, k = 32, 2
  embed_fn, params, inputs, loss_inputs = _setup(b, k, seed=1)
  mesh = jax.make_mesh(shape, names, axis_types=(AUTO,) * len(names))
  batch_axes = tuple(n for n in names if n != "tensor")
  n_shards = int(np.prod([mesh.shape[a] for a in batch_axes]))
  batch = NamedSharding(mesh, P(batch_axes))
  put = lambda tree: jax.tree.map(lambda a: jax.device_put(a, batch), tree)
  inputs, loss_inputs = put(inputs), put(loss_inputs)
  params = jax.device_put(params, NamedSharding(mesh, P()))
  cfg = losses.LossConfig(learnable_temperature=True, block_size=3, mrl_dims=(4, 12))
  loss_fn = _loss_fn(losses.sharded_contrastive_loss(mesh, cfg=cfg), b, k)
  loss_params = losses.init_loss_params(cfg)

  # The reference: one unsharded full-batch step with the dense single-device loss.
  dense = losses.LossConfig(learnable_temperature=True, blockwise=False, mrl_dims=(4, 12))
  dense_loss_fn = _loss_fn(lambda *a, **kw: losses.contrastive_loss(*a, **kw, cfg=dense), b, k)
  host = lambda tree: jax.tree.map(np.asarray, tree)
  want = jax.jit(_full_batch(embed_fn, dense_loss_fn), compiler_options=FAST_COMPILE)(
      host(params), loss_params, host(inputs), host(loss_inputs))

  # Each chunk takes 2 rows from each of the batch shards (32 = n_shards * 2 chunks * rows).
  step = grad_cache_value_and_grad(embed_fn, loss_fn, num_chunks=2, num_groups=n_shards,
                                   has_aux=True)
  got = jax.jit(step, compiler_options=FAST_COMPILE)(params, loss_params, inputs, loss_inputs)
  _check_equal(got, want)


def test_multi_output_rows_keep_full_batch_layout():
  """An embed_fn giving S outputs per input row (packed segments) reassembles in full-batch order."""
  rng = np.random.default_rng(3)
  w = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
  embed_fn = lambda w, x: jnp.tanh(x @ w).reshape(-1, 3)  # (r, 4) -> (2r, 3)
  x = jnp.asarray(rng.normal(size=(12, 4)), jnp.float32)
  target = jnp.asarray(rng.normal(size=(24, 3)), jnp.float32)
  # A loss that depends on the order of the embeddings (each row against its own target).
  loss_fn = lambda e, lp, li: jnp.sum(jnp.sin(e["x"] * li)) * lp
  want = jax.value_and_grad(lambda w, lp: loss_fn({"x": embed_fn(w, x)}, lp, target),
                            argnums=(0, 1))(w, 2.0)
  for groups, chunks in ((1, 3), (2, 2), (3, 2), (2, 6)):
    step = grad_cache_value_and_grad(embed_fn, loss_fn, num_chunks=chunks, num_groups=groups)
    got = jax.jit(step)(w, 2.0, {"x": x}, target)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    np.testing.assert_allclose(got[1][0], want[1][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1][1], want[1][1], rtol=1e-5)


def test_traces_embed_fn_once_per_group_whatever_the_number_of_chunks():
  embed_fn, params, inputs, loss_inputs = _setup(16, 2)
  calls = []

  def counting_embed_fn(p, x):
    calls.append(1)
    return embed_fn(p, x)

  loss_fn = _loss_fn(lambda *a, **kw: losses.contrastive_loss(*a, **kw, cfg=losses.LossConfig()),
                     16, 2)
  counts = []
  for chunks in (2, 8):
    calls.clear()
    step = grad_cache_value_and_grad(counting_embed_fn, loss_fn, num_chunks=chunks, has_aux=True)
    jax.eval_shape(step, params, {}, inputs, loss_inputs)
    counts.append(len(calls))
  assert counts[0] == counts[1] <= 2 * len(inputs), counts  # lax.map + lax.scan: one trace each


def test_bad_inputs():
  embed_fn, params, inputs, loss_inputs = _setup(16, 2)
  loss_fn = _loss_fn(lambda *a, **kw: losses.contrastive_loss(*a, **kw, cfg=losses.LossConfig()),
                     16, 2)
  step = grad_cache_value_and_grad(embed_fn, loss_fn, num_chunks=3, has_aux=True)
  with pytest.raises(ValueError, match=r"inputs\['query'\].*num_chunks=3"):
    step(params, {}, inputs, loss_inputs)
  step = grad_cache_value_and_grad(embed_fn, loss_fn, num_chunks=2, has_aux=True)
  bad_params = {"w": params, "step": jnp.int32(3)}
  with pytest.raises(ValueError, match="params leaf .*step.* int32"):
    grad_cache_value_and_grad(lambda p, x: embed_fn(p["w"], x), loss_fn, num_chunks=2,
                              has_aux=True)(bad_params, {}, inputs, loss_inputs)
  with pytest.raises(ValueError, match="inputs must be a dict"):
    step(params, {}, [inputs["query"]], loss_inputs)
  with pytest.raises(ValueError, match="num_chunks"):
    grad_cache_value_and_grad(embed_fn, loss_fn, num_chunks=0)


# ------------------------------------------------------------------ the train step on a media batch

MEDIA = dict(max_length=64, max_segments=4, media=MediaConfig(
    image_frontend="patch", audio_frontend="conv", image_size=16, patch_size=4, image_tokens=4,
    sample_rate=8000, n_mels=16, n_fft=128, hop_length=64, audio_chunk_frames=24, max_audio_chunks=3))


def _media_batch(rng, tok, cfg, num_groups):
  """One packed FT batch from the pipeline: images and audio on the query side (3 image and 5 audio
  slots a group, so GradCache's slot chunks need padding), images on the positive side, text hard
  negatives."""
  from embed2.data import interleave, pipeline
  from embed2.data.segments import Audio, Image

  image = lambda: Image(pixels=rng.integers(0, 256, (20, 12, 3), dtype=np.uint8))
  audio = lambda s: Audio(samples=rng.uniform(-0.5, 0.5, int(8000 * s)).astype(np.float32),
                          sample_rate=8000)
  examples = []
  for i in range(48):
    q = ([image(), f"shape {i}"], audio(0.2 + 0.01 * (i % 5)), [f"both {i}", image(), audio(0.1)])[i % 3]
    examples.append({"query": q, "positive": image() if i % 4 else f"caption {i}",
                     "negatives": [f"other {i}"], "query_id": i, "positive_id": 100 + i})
  g = num_groups
  spec = pipeline.BatchSpec(batch_size=2 * g, query_len=64, positive_len=16, negative_len=16,
                            num_negatives=1, segments=4, query_rows=2 * g, positive_rows=2 * g,
                            negative_rows=2 * g, query_images=3 * g, query_audio=5 * g,
                            positive_images=2 * g, negative_images=0, negative_audio=0,
                            positive_audio=0)
  task = pipeline.TaskSpec(name="mix", examples=examples, batch=spec)
  it = pipeline.build_ft_iterator([task], tokenizer=tok, num_groups=g, seed=int(rng.integers(1 << 30)),
                                  encoder=interleave.InputEncoder(tok, cfg))
  host = next(it)
  assert int(host["query_num_images"]) > 0 and int(host["query_num_audio"]) > 0
  assert int(host["positive_num_images"]) > 0 and int(host["num_examples"]) > g
  return host


def _step_grads(graphdef, loss_fn, num_groups, chunks):
  from embed2.train import step as step_lib

  def fn(state, batch):
    trainee = nnx.merge(graphdef, state)
    if chunks:
      (loss, aux), grads = step_lib.grad_cache_loss_and_grads(
          trainee, batch, loss_fn=loss_fn, num_groups=num_groups, num_chunks=chunks)
    else:
      (loss, aux), grads = nnx.value_and_grad(
          lambda t: step_lib.batch_loss(t, batch, loss_fn=loss_fn, num_groups=num_groups),
          has_aux=True)(trainee)
    return loss, aux, nnx.to_pure_dict(grads)

  return jax.jit(fn, compiler_options=FAST_COMPILE)


def test_media_batch_step_equals_full_batch_on_one_and_on_8_devices(rng):
  """GradCache on a packed media batch: the frontends' soft tokens reach the rows (same loss as the
  full-batch step) and the frontends get their gradient, on one device and sharded over 8."""
  from embed2 import sharding
  from embed2.data.tokenizer import Tokenizer
  from embed2.model import EmbeddingModel, ModelConfig
  from embed2.train import step as step_lib

  tok = Tokenizer.default()
  # One transformer block: the check is about the soft tokens and the chunks, not the depth (each
  # block is in the three programs compiled here several times over).
  cfg = ModelConfig.from_name("tiny", vocab_size=tok.vocab_size, num_layers=1, **MEDIA)
  g = 8
  host = _media_batch(rng, tok, cfg, g)
  arrays = {k: v for k, v in host.items() if np.ndim(v) > 0}
  lcfg = losses.LossConfig(learnable_temperature=True, mrl_dims=(16, 64), blockwise=False)
  trainee = step_lib.Trainee(EmbeddingModel(cfg, rngs=nnx.Rngs(int(rng.integers(1 << 30)))),
                             losses.init_loss_params(lcfg))
  graphdef, state = nnx.split(trainee)
  dense = lambda *a, **kw: losses.contrastive_loss(*a, **kw, cfg=lcfg)
  batch = {k: jnp.asarray(v) for k, v in arrays.items()}

  want_loss, want_aux, want = _step_grads(graphdef, dense, g, 0)(state, batch)
  got = {"1 device": _step_grads(graphdef, dense, g, 2)(state, batch)}
  mesh = sharding.make_mesh({"data": 8})
  sharded_batch = step_lib.device_batch(host, mesh)
  with jax.set_mesh(mesh):
    loss_fn = losses.sharded_contrastive_loss(mesh, cfg=dataclasses.replace(lcfg, blockwise=True,
                                                                            block_size=4))
    got["8 devices"] = _step_grads(graphdef, loss_fn, g, 2)(
        jax.device_put(state, NamedSharding(mesh, P())), sharded_batch)

  # The frontends matter for this batch, and get a gradient in the reference.
  for part in ("image_frontend", "audio_frontend"):
    for leaf in jax.tree.leaves(want["model"][part]):
      assert np.max(np.abs(np.asarray(leaf))) > 0, part
  flat_want = jax.tree_util.tree_flatten_with_path(want)[0]
  for where, (loss, aux, grads) in got.items():
    assert _rel_err(loss, want_loss) < 1e-5, where
    for key in want_aux:
      assert _rel_err(aux[key], want_aux[key]) < 1e-5, (where, key)
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    assert [p for p, _ in flat] == [p for p, _ in flat_want]
    for (path, a), (_, b) in zip(flat, flat_want):
      name = f"{where} {jax.tree_util.keystr(path)}"
      assert np.max(np.abs(np.asarray(a))) > 0, name
      assert _rel_err(a, b) < 1e-5, (name, _rel_err(a, b))


def test_media_slots_without_soft_index_are_refused(rng):
  """Media the rows cannot read is an error, never dropped."""
  from embed2.model import EmbeddingModel, ModelConfig

  cfg = ModelConfig.from_name("tiny", **MEDIA)
  model = EmbeddingModel(cfg, rngs=nnx.Rngs(0))
  side = {"tokens": jnp.asarray(rng.integers(3, 100, (2, 8)), jnp.int32),
          "segment_ids": jnp.ones((2, 8), jnp.int32), "positions": jnp.tile(jnp.arange(8), (2, 1)),
          "slot": jnp.asarray([0, 4], jnp.int32),
          "images": jnp.asarray(rng.integers(0, 256, (2, 16, 16, 3)), jnp.uint8)}
  with pytest.raises(ValueError, match=r"\['images'\] are given but no soft_index"):
    model(side, num_groups=2)
  with pytest.raises(ValueError, match=r"\['query_images'\] are given but no query_soft_index"):
    model.embed_sides({f"query_{k}": v for k, v in side.items()}, 2, ["query"])
