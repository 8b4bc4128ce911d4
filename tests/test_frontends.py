"""Modality frontends: float64 numpy references, receptive field, shapes, dtypes, grads, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from embed2 import sharding
from embed2.model import vision
from embed2.model.frontends import (ConvAudioFrontend, PatchImageFrontend, ViTImageFrontend,
                                    build_frontends)
from embed2.model.presets import MediaConfig, ModelConfig



def config(dtype="float32", **kw):
  media = dict(image_frontend="patch", image_size=32, patch_size=8, image_tokens=4, audio_frontend="conv",
               n_mels=12, audio_conv_dim=24, vit_width=32, vit_depth=2, vit_heads=4, vit_mlp_dim=48)
  media.update(kw)
  return ModelConfig.from_name("tiny", dtype=dtype, media=MediaConfig(**media))  # model_dim 64


def randomize(rng, model, std=0.3):
  """Fresh random values for every parameter (norm scales and biases start at zero, which hides bugs)."""
  state = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(lambda x: jnp.asarray(rng.normal(0, std, x.shape), x.dtype), state))
  return model


def make(rng, cls, cfg, std=0.3):
  return randomize(rng, cls(cfg, rngs=nnx.Rngs(int(rng.integers(1 << 30)))), std)


def images(rng, cfg, n):
  return rng.integers(0, 256, (n, cfg.media.image_size, cfg.media.image_size, 3), dtype=np.uint8)


def mels(rng, cfg, n, f):
  return rng.normal(-2.0, 2.0, (n, f, cfg.media.n_mels)).astype(np.float32)


def is_var(x):
  return isinstance(x, nnx.Variable)


def dotted(path):
  """A pytree path as ".encoder.tower.blocks.0.attn.q" (the leading dot keeps prefixes simple)."""
  keys = (getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)
  return "".join(f".{k}" for k in keys)


def flat(tree):
  """{dotted path: leaf} over nnx Variables (or the plain arrays of a grads state)."""
  return {dotted(path): (v.get_value() if is_var(v) else v)
          for path, v in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_var)[0]}


def params64(model):
  return {k: np.asarray(v, np.float64) for k, v in flat(nnx.state(model, nnx.Param)).items()}


# One jitted function for the whole file: models of the same config share a graphdef, so they share
# its trace and compile caches (only the parameter values differ).
call = nnx.jit(lambda model, x: model(x))


# --------------------------------------------------------------------------- float64 numpy references


def np_rmsnorm(x, w, eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * (1 + w)


def np_gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def np_patch_frontend(cfg, prm, img):
  p, g = cfg.media.patch_size, cfg.media.image_size // cfg.media.patch_size
  t = int(round(cfg.media.image_tokens ** 0.5))
  k = g // t
  x = img.astype(np.float64) / 127.5 - 1
  n = x.shape[0]
  w = prm[".kernel"].reshape(p * p * 3, -1)  # (i, j, c) flattened, as the patch below
  emb = np.zeros((n, g, g, cfg.model_dim))
  for r in range(g):
    for c in range(g):
      patch = x[:, r * p:(r + 1) * p, c * p:(c + 1) * p, :].reshape(n, -1)
      emb[:, r, c] = patch @ w + prm[".bias"] + prm[".pos_embedding"][r * g + c]
  out = np.zeros((n, t * t, cfg.model_dim))
  for a in range(t):
    for b in range(t):
      out[:, a * t + b] = emb[:, a * k:(a + 1) * k, b * k:(b + 1) * k].mean(axis=(1, 2))
  return np_rmsnorm(out, prm[".norm.scale"], cfg.rms_eps)


def np_conv1d(x, w, b):
  """Kernel 3, stride 2, zero padding 1, by explicit sums: out[i] = b + sum_k x[2i - 1 + k] @ w[k]."""
  n, f, _ = x.shape
  f_out = (f + 2 * 1 - 3) // 2 + 1
  out = np.tile(b, (n, f_out, 1))
  for i in range(f_out):
    for k in range(3):
      src = 2 * i - 1 + k
      if 0 <= src < f:
        out[:, i] += x[:, src] @ w[k]
  return out


def np_audio_frontend(cfg, prm, mel):
  h = np_gelu_tanh(np_conv1d(mel.astype(np.float64), prm[".conv1.kernel"], prm[".conv1.bias"]))
  h = np_gelu_tanh(np_conv1d(h, prm[".conv2.kernel"], prm[".conv2.bias"]))
  return np_rmsnorm(h @ prm[".proj"], prm[".norm.scale"], cfg.rms_eps)


# --------------------------------------------------------------------------------------- patch


@pytest.mark.parametrize("tokens", [4, 16])  # 2x2 pooling of the 4x4 grid; no pooling
def test_patch_frontend_matches_numpy_reference(tokens, rng):
  cfg = config(image_tokens=tokens)
  model = make(rng, PatchImageFrontend, cfg)
  img = images(rng, cfg, 3)
  out = call(model, img)
  assert out.shape == (3, tokens, cfg.model_dim) and out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), np_patch_frontend(cfg, params64(model), img),
                             rtol=1e-5, atol=2e-5)


def test_patch_frontend_bfloat16_computes_in_bfloat16_with_float32_params(rng):
  cfg = config(dtype="bfloat16")
  model = make(rng, PatchImageFrontend, cfg)
  img = images(rng, cfg, 2)
  out = call(model, img)
  assert out.dtype == jnp.bfloat16 and out.shape == (2, cfg.media.image_tokens, cfg.model_dim)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
  ref = np_patch_frontend(cfg, params64(model), img)
  err = np.abs(np.asarray(out, np.float64) - ref)
  assert err.max() < 0.06 and err.mean() < 0.01, (err.max(), err.mean())


def test_patch_and_audio_tokens_have_unit_rms_at_init(rng):
  """Soft tokens must have the scale of text embeddings (Gemma: sqrt(D) * table, ~unit RMS entries)."""
  cfg = config()
  seed = int(rng.integers(1 << 30))
  img_tok = call(PatchImageFrontend(cfg, rngs=nnx.Rngs(seed)), images(rng, cfg, 2))
  aud_tok = call(ConvAudioFrontend(cfg, rngs=nnx.Rngs(seed)), mels(rng, cfg, 2, 20))
  for tok in (img_tok, aud_tok):
    np.testing.assert_allclose(np.sqrt(np.mean(np.square(np.asarray(tok)), -1)), 1.0, rtol=1e-3)
  vit_tok = np.asarray(call(ViTImageFrontend(config(image_frontend="vit"), rngs=nnx.Rngs(seed)),
                            images(rng, cfg, 2)))
  assert 0.5 < np.sqrt(np.mean(np.square(vit_tok))) < 2.0  # projector ~ N(0, 1/Wv): about unit RMS


# ----------------------------------------------------------------------------------------- ViT


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_vit_frontend_is_vision_encoder_on_normalised_pixels(dtype, rng):
  cfg = config(image_frontend="vit", dtype=dtype)
  model = make(rng, ViTImageFrontend, cfg, std=0.1)
  assert model.encoder.cfg == vision.VisionConfig(
      image_size=32, patch_size=8, width=32, depth=2, num_heads=4, mlp_dim=48, mm_tokens_per_image=4,
      text_dim=cfg.model_dim, dtype=dtype)
  img = images(rng, cfg, 3)
  out = call(model, img)
  assert out.shape == (3, cfg.media.image_tokens, cfg.model_dim) and out.dtype == jnp.dtype(dtype)
  pixels = jnp.asarray(img.astype(np.float64) / 127.5 - 1, jnp.float32).astype(dtype)
  want = call(model.encoder, pixels)
  tol = 1e-5 if dtype == "float32" else 0
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)


def test_vit_frontend_keeps_vision_encoder_parameter_layout():
  """convert.load_vision_params(frontend.encoder, ...) fills these: the layout must stay VisionEncoder's."""
  cfg = config(image_frontend="vit")
  model = ViTImageFrontend(cfg, rngs=nnx.Rngs(0))
  paths = set(params64(model))
  encoder = vision.VisionEncoder(ViTImageFrontend.vision_config(cfg), rngs=nnx.Rngs(0))
  assert paths == {".encoder" + p for p in params64(encoder)}
  assert ".encoder.tower.patch.kernel" in paths and ".encoder.projector.projection" in paths


# --------------------------------------------------------------------------------------- audio


def test_audio_frontend_token_count_is_config_audio_tokens():
  cfg = config()
  model = ConvAudioFrontend(cfg, rngs=nnx.Rngs(0))
  for f in range(1, 65):
    shape = jax.eval_shape(model, jax.ShapeDtypeStruct((2, f, cfg.media.n_mels), jnp.float32)).shape
    assert shape == (2, cfg.media.audio_tokens(f), cfg.model_dim) == (2, -(-f // 4), cfg.model_dim), f


def test_audio_frontend_matches_numpy_reference(rng):
  cfg = config()
  model = make(rng, ConvAudioFrontend, cfg)
  prm = params64(model)
  for f in (1, 2, 3, 4, 5, 6, 7, 8, 13):  # every F mod 4, so each edge of the zero padding is hit
    mel = mels(rng, cfg, 2, f)
    out = call(model, mel)
    assert out.shape == (2, cfg.media.audio_tokens(f), cfg.model_dim), f
    np.testing.assert_allclose(np.asarray(out), np_audio_frontend(cfg, prm, mel), rtol=1e-5, atol=2e-5,
                               err_msg=f"F={f}")


def test_audio_token_t_sees_exactly_frames_4t_minus_3_to_4t_plus_3(rng):
  cfg = config()
  model = make(rng, ConvAudioFrontend, cfg)
  f = 24
  base = mels(rng, cfg, 1, f)
  batch = np.repeat(base, f + 1, axis=0)  # row n perturbs frame n; the last row is unperturbed
  for n in range(f):
    batch[n, n] += rng.normal(0, 1, cfg.media.n_mels).astype(np.float32)
  out = np.asarray(call(model, batch))
  changed = np.abs(out[:f] - out[f:]).max(-1) > 1e-5  # (frame, token)
  t = np.arange(cfg.media.audio_tokens(f))
  frame = np.arange(f)[:, None]
  np.testing.assert_array_equal(changed, (frame >= 4 * t - 3) & (frame <= 4 * t + 3))


def test_audio_first_k_tokens_depend_on_frames_before_4k_only(rng):
  cfg = config()
  model = make(rng, ConvAudioFrontend, cfg)
  mel = mels(rng, cfg, 2, 30)
  full = np.asarray(call(model, mel))
  for k in (1, 2, 5, 7):
    prefix = np.asarray(call(model, mel[:, :4 * k]))
    assert prefix.shape[1] == k
    np.testing.assert_allclose(prefix, full[:, :k], rtol=1e-6, atol=1e-6, err_msg=f"k={k}")
  # One frame fewer: the last token then sees a zero frame instead of frame 4k - 1, and changes.
  short = np.asarray(call(model, mel[:, :4 * 5 - 1]))
  assert np.abs(short[:, 4] - full[:, 4]).max() > 1e-3


def test_audio_frontend_bfloat16(rng):
  cfg = config(dtype="bfloat16")
  model = make(rng, ConvAudioFrontend, cfg)
  mel = mels(rng, cfg, 2, 20)
  out = call(model, mel)
  assert out.dtype == jnp.bfloat16 and out.shape == (2, 5, cfg.model_dim)
  err = np.abs(np.asarray(out, np.float64) - np_audio_frontend(cfg, params64(model), mel))
  assert err.max() < 0.1 and err.mean() < 0.012, (err.max(), err.mean())


# ------------------------------------------------------------------------- all frontends alike


def _cases(rng):
  return [(PatchImageFrontend, config(), lambda cfg, n: images(rng, cfg, n)),
          (ViTImageFrontend, config(image_frontend="vit"), lambda cfg, n: images(rng, cfg, n)),
          (ConvAudioFrontend, config(), lambda cfg, n: mels(rng, cfg, n, 17))]


@pytest.mark.parametrize("case", range(3), ids=["patch", "vit", "audio"])
def test_deterministic_row_independent_and_jit_equals_eager(case, rng):
  cls, cfg, inputs = _cases(rng)[case]
  seed = int(rng.integers(1 << 30))
  a, b = cls(cfg, rngs=nnx.Rngs(seed)), cls(cfg, rngs=nnx.Rngs(seed))
  for (pa, va), (pb, vb) in zip(params64(a).items(), params64(b).items()):
    assert pa == pb and np.array_equal(va, vb), pa
  model = randomize(rng, a, 0.1)
  x = inputs(cfg, 5)
  out = np.asarray(call(model, x))
  np.testing.assert_array_equal(out, np.asarray(call(model, x)))  # same input, same bits
  if cls is not ViTImageFrontend:  # eager ViT is slow to dispatch op by op; the others cover eager == jit
    np.testing.assert_allclose(np.asarray(model(x)), out, rtol=1e-5, atol=1e-5)
  alone = np.asarray(call(model, x[2:3]))  # one input alone == the same input inside a batch
  np.testing.assert_allclose(alone[0], out[2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", range(3), ids=["patch", "vit", "audio"])
def test_gradients_reach_every_parameter(case, rng):
  cls, cfg, inputs = _cases(rng)[case]
  model = make(rng, cls, cfg, std=0.1)
  x = inputs(cfg, 3)
  r = jnp.asarray(rng.normal(size=call(model, x).shape), jnp.float32)
  grads = nnx.jit(nnx.grad(lambda m, x: jnp.sum(m(x) * r)))(model, x)
  assert len(flat(grads)) == len(params64(model))
  for name, g in flat(grads).items():
    assert np.all(np.isfinite(np.asarray(g))), name
    if name.endswith("k_bias"):
      # Softmax ignores a shift shared by all keys: q.(k + b) = q.k + q.b adds the same logit to every
      # key of a query, so the key bias has zero gradient (as in SigLIP itself).
      assert np.abs(np.asarray(g)).max() < 1e-4, name
    else:
      assert np.abs(np.asarray(g)).max() > 0, f"no gradient reaches {name}"


@pytest.mark.parametrize("case", range(3), ids=["patch", "vit", "audio"])
def test_parameters_are_float32_with_logical_axes(case, rng):
  cls, cfg, _ = _cases(rng)[case]
  model = cls(cfg, rngs=nnx.Rngs(0))
  known = {name for name, _ in sharding.DEFAULT_RULES}
  found_embed = False
  for path, var in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param), is_leaf=is_var)[0]:
    name, axes, value = dotted(path), var.get_metadata().get("logical_axes"), var.get_value()
    assert value.dtype == jnp.float32, name
    assert axes is not None and len(axes) == value.ndim, (name, axes, value.shape)
    assert all(a is None or a in known for a in axes), (name, axes)
    for a, size in zip(axes, value.shape):
      if a == "embed":
        found_embed = True
        assert size == cfg.model_dim, (name, axes, value.shape)
  assert found_embed


# ------------------------------------------------------------------------------ errors, builder


def test_bad_inputs_name_the_config_field(rng):
  cfg = config()
  patch, vit = PatchImageFrontend(cfg, rngs=nnx.Rngs(0)), ViTImageFrontend(
      config(image_frontend="vit"), rngs=nnx.Rngs(0))
  for model in (patch, vit):
    with pytest.raises(ValueError, match=r"config\.model\.media\.image_size=32"):
      model(rng.integers(0, 256, (1, 48, 48, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8"):
      model(images(rng, cfg, 1).astype(np.float32) / 127.5 - 1)  # already normalised: refused, not re-scaled
  audio = ConvAudioFrontend(cfg, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"config\.model\.media\.n_mels=12"):
    audio(rng.normal(size=(1, 20, 80)).astype(np.float32))
  with pytest.raises(ValueError, match="F >= 1"):
    audio(np.zeros((1, 0, 12), np.float32))


def test_build_frontends_follows_the_config():
  rngs = nnx.Rngs(0)
  image, audio = build_frontends(config(), rngs=rngs)
  assert isinstance(image, PatchImageFrontend) and isinstance(audio, ConvAudioFrontend)
  image, audio = build_frontends(config(image_frontend="vit", audio_frontend="none"), rngs=rngs)
  assert isinstance(image, ViTImageFrontend) and audio is None
  assert build_frontends(config(image_frontend="none", audio_frontend="none"), rngs=rngs) == (None, None)


# ------------------------------------------------------------------------------------- sharded


def test_patch_frontend_sharded_batch_equals_single_device(rng):
  assert jax.device_count() == 8
  cfg = config()
  model = make(rng, PatchImageFrontend, cfg)
  img = images(rng, cfg, 8)
  want = np.asarray(call(model, img))

  mesh = sharding.make_mesh({"data": 4, "fsdp": 2})
  graphdef, state = nnx.split(model)
  state = jax.device_put(state, sharding.param_shardings(state, mesh, sharding.DEFAULT_RULES))
  sharded = nnx.merge(graphdef, state)
  assert sharded.kernel[...].sharding.spec[-1] == "fsdp"  # the "embed" axis really is split
  x = jax.device_put(img, sharding.batch_sharding(mesh, 4))
  with jax.set_mesh(mesh):
    out = call(sharded, x)
  assert len(out.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)
