"""The encoder: a float64 numpy reference, masks, packing, pooling, MRL, sharding, bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from embed2 import sharding
from embed2.model import EmbeddingModel, ModelConfig, gather_slots, mean_pool, mrl_truncate



def tiny(**kw):
  return ModelConfig.from_name("tiny", **kw)


def rows(rng, cfg, b, l):
  tok = rng.integers(4, cfg.vocab_size, (b, l)).astype(np.int32)
  seg = np.ones((b, l), np.int32)
  pos = np.tile(np.arange(l, dtype=np.int32), (b, 1))
  return tok, seg, pos


def randomize(rng, model):
  """Fresh random values for every parameter (norm scales start at zero, which would hide bugs)."""
  state = nnx.state(model, nnx.Param)
  new = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype), state)
  nnx.update(model, new)
  return model


def make(rng, cfg, seed=None):
  seed = int(rng.integers(1 << 30)) if seed is None else seed
  return randomize(rng, EmbeddingModel(cfg, rngs=nnx.Rngs(seed)))


# ------------------------------------------------------------------ float64 numpy reference


def np_rmsnorm(x, w, eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * (1 + w)


def np_rope(x, pos, base, scale=1.0):
  hd = x.shape[-1]
  inv = 1.0 / base ** (np.arange(0, hd, 2) / hd) / scale
  ang = pos[:, :, None] * inv  # (B, L, hd/2)
  sin, cos = np.sin(ang)[:, :, None], np.cos(ang)[:, :, None]
  x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def np_gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def np_forward(params, cfg, tok, seg, pos):
  """Gemma 3 encoder written from the architecture description, loops over heads, float64."""
  p = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
  d, hd = cfg.model_dim, cfg.resolved_head_dim
  x = p["transformer"]["embedder"]["embedding"][tok] * np.sqrt(d)
  b, l = tok.shape
  for i in range(cfg.num_layers):
    blk = p["transformer"]["blocks"][i]
    is_global = cfg.is_global_layer(i)
    base = cfg.rope_global_base if is_global else cfg.rope_local_base
    scale = cfg.rope_global_scale if is_global else 1.0
    h = np_rmsnorm(x, blk["pre_attn_norm"]["scale"], cfg.rms_eps)
    a = blk["attn"]
    q = np.einsum("bld,dhk->blhk", h, a["q"])
    k = np.einsum("bld,dhk->blhk", h, a["k"])
    v = np.einsum("bld,dhk->blhk", h, a["v"])
    q = np_rope(np_rmsnorm(q, a["q_norm"]["scale"], cfg.rms_eps), pos, base, scale)
    k = np_rope(np_rmsnorm(k, a["k_norm"]["scale"], cfg.rms_eps), pos, base, scale)
    out = np.zeros_like(q)
    group = cfg.num_heads // cfg.num_kv_heads
    for bi in range(b):
      for qi in range(l):
        for hi in range(cfg.num_heads):
          allowed = [j for j in range(l)
                     if seg[bi, j] == seg[bi, qi] != 0
                     and (not cfg.causal or pos[bi, j] <= pos[bi, qi])
                     and (is_global or abs(pos[bi, qi] - pos[bi, j]) < cfg.sliding_window)]
          if not allowed:
            continue
          kv = hi // group
          logits = np.array([q[bi, qi, hi] @ k[bi, j, kv] for j in allowed]) / np.sqrt(
              cfg.query_pre_attn_scalar or hd)
          w = np.exp(logits - logits.max())
          w /= w.sum()
          out[bi, qi, hi] = sum(wj * v[bi, j, kv] for wj, j in zip(w, allowed))
    x = x + np_rmsnorm(np.einsum("blhk,hkd->bld", out, a["o"]), blk["post_attn_norm"]["scale"], cfg.rms_eps)
    h = np_rmsnorm(x, blk["pre_ffw_norm"]["scale"], cfg.rms_eps)
    m = blk["mlp"]
    h = (np_gelu_tanh(h @ m["gate"]) * (h @ m["up"])) @ m["down"]
    x = x + np_rmsnorm(h, blk["post_ffw_norm"]["scale"], cfg.rms_eps)
  x = np_rmsnorm(x, p["transformer"]["final_norm"]["scale"], cfg.rms_eps)
  # Mean pool per segment, head, L2 normalise.
  pooled = np.zeros((b, cfg.max_segments, d))
  for bi in range(b):
    for s in range(1, cfg.max_segments + 1):
      sel = seg[bi] == s
      if sel.any():
        pooled[bi, s - 1] = x[bi, sel].mean(0)
  for i in range(len(cfg.head_dims)):
    pooled = pooled @ p["head"][i]
  norm = np.linalg.norm(pooled, axis=-1, keepdims=True)
  return x, pooled / np.maximum(norm, 1e-12)


def param_tree(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@pytest.mark.parametrize("causal", [False, True])
def test_matches_float64_reference(causal, rng):
  cfg = tiny(num_layers=3, causal=causal, sliding_window=3, global_every=3, rope_global_scale=2.0,
             query_pre_attn_scalar=24.0)
  model = make(rng, cfg)
  tok, seg, pos = rows(rng, cfg, 2, 10)
  # Row 0: two packed examples and padding; row 1: one example.
  seg[0] = [1, 1, 1, 1, 2, 2, 2, 0, 0, 0]
  pos[0] = [0, 1, 2, 3, 0, 1, 2, 0, 0, 0]
  h = model.transformer(tok, seg, pos)
  e = model.encode_rows(tok, seg, pos)
  h_ref, e_ref = np_forward(param_tree(model), cfg, tok, seg, pos)
  valid = seg > 0
  np.testing.assert_allclose(np.asarray(h)[valid], h_ref[valid], rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(np.asarray(e), e_ref, rtol=2e-5, atol=2e-5)


def test_forward_shapes_and_dtypes(rng):
  for dtype in ("float32", "bfloat16"):
    cfg = tiny(dtype=dtype)
    model = make(rng, cfg)
    tok, seg, pos = rows(rng, cfg, 3, 12)
    h = model.transformer(tok, seg, pos)
    assert h.shape == (3, 12, cfg.model_dim) and h.dtype == jnp.dtype(dtype)
    e = model.encode_rows(tok, seg, pos)
    assert e.shape == (3, cfg.max_segments, cfg.embed_dim) and e.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(e)))


def _states(model, tok, seg, pos):
  return np.asarray(model.transformer(tok, seg, pos))


def test_bidirectional_vs_causal(rng):
  for causal in (False, True):
    cfg = tiny(causal=causal, sliding_window=64)
    model = make(rng, cfg)
    tok, seg, pos = rows(rng, cfg, 1, 12)
    tok2 = tok.copy()
    tok2[0, 9] = (tok[0, 9] + 1) % cfg.vocab_size  # change a late token
    delta = np.abs(_states(model, tok, seg, pos) - _states(model, tok2, seg, pos)).max(-1)[0]
    if causal:
      assert np.all(delta[:9] == 0) and delta[9] > 0
    else:
      assert np.all(delta[:9] > 1e-6), delta  # an earlier token sees the later change


def test_sliding_window_respected(rng):
  w = 3
  # One local layer only, so the receptive field is exactly the window.
  cfg = tiny(num_layers=1, sliding_window=w, global_every=100)
  model = make(rng, cfg)
  tok, seg, pos = rows(rng, cfg, 1, 12)
  j = 6
  tok2 = tok.copy()
  tok2[0, j] = (tok[0, j] + 7) % cfg.vocab_size
  delta = np.abs(_states(model, tok, seg, pos) - _states(model, tok2, seg, pos)).max(-1)[0]
  for i in range(12):
    if abs(i - j) < w:
      assert delta[i] > 1e-6, (i, delta)
    else:
      assert delta[i] == 0, (i, delta)


def test_packed_examples_equal_alone(rng):
  cfg = tiny(max_segments=3)
  model = make(rng, cfg)
  lens = [5, 3, 6]
  exs = [rng.integers(4, cfg.vocab_size, n).astype(np.int32) for n in lens]
  L = 16
  # Packed: all three in one row, then padding.
  tok = np.zeros((1, L), np.int32)
  seg = np.zeros((1, L), np.int32)
  pos = np.zeros((1, L), np.int32)
  o = 0
  for s, ex in enumerate(exs, 1):
    tok[0, o:o + len(ex)] = ex
    seg[0, o:o + len(ex)] = s
    pos[0, o:o + len(ex)] = np.arange(len(ex))
    o += len(ex)
  packed = np.asarray(model.encode_rows(tok, seg, pos))[0]
  for s, ex in enumerate(exs):
    # Alone: the example at the start of a padded row of the same length.
    t1 = np.zeros((1, L), np.int32)
    t1[0, :len(ex)] = ex
    s1 = (np.arange(L) < len(ex)).astype(np.int32)[None]
    p1 = np.where(s1 > 0, np.arange(L), 0).astype(np.int32)
    alone = np.asarray(model.encode_rows(t1, s1, p1))[0, 0]
    np.testing.assert_allclose(packed[s], alone, rtol=1e-5, atol=1e-6)
    # Garbage in the padding positions changes nothing.
    t2 = t1.copy()
    t2[0, len(ex):] = rng.integers(4, cfg.vocab_size, L - len(ex))
    np.testing.assert_allclose(np.asarray(model.encode_rows(t2, s1, p1))[0, 0], alone, rtol=1e-6,
                               atol=1e-7)


def test_mean_pool_ignores_padding(rng):
  h = rng.normal(size=(3, 7, 5)).astype(np.float32)
  seg = np.array([[1, 1, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0]], np.int32)
  out = np.asarray(mean_pool(jnp.asarray(h), jnp.asarray(seg), 3))
  h64 = h.astype(np.float64)
  ref = np.zeros((3, 3, 5))
  ref[0, 0] = h64[0, :2].mean(0)
  ref[0, 1] = h64[0, 2:5].mean(0)
  ref[1, 0] = h64[1].mean(0)
  np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-7)


def test_gather_slots_stays_in_group(rng):
  g, rg, s, d = 2, 3, 2, 4
  pooled = rng.normal(size=(g * rg, s, d)).astype(np.float32)
  slot = np.array([5, 0, 2, 1], np.int32)  # B = 4, B_g = 2
  out = np.asarray(gather_slots(jnp.asarray(pooled), jnp.asarray(slot), g))
  flat = pooled.reshape(g, rg * s, d)
  np.testing.assert_array_equal(out, np.stack([flat[0, 5], flat[0, 0], flat[1, 2], flat[1, 1]]))


def test_mrl_prefixes_unit_norm_and_renormalised(rng):
  cfg = tiny()
  model = make(rng, cfg)
  e = model.encode_rows(*rows(rng, cfg, 4, 9))[:, 0]
  for dim in cfg.mrl_dims:
    t = np.asarray(mrl_truncate(e, dim))
    np.testing.assert_allclose(np.linalg.norm(t, axis=-1), 1.0, rtol=1e-6)
    ref = np.asarray(e, np.float64)[:, :dim]
    np.testing.assert_allclose(t, ref / np.linalg.norm(ref, axis=-1, keepdims=True), rtol=1e-5,
                               atol=1e-6)
  with pytest.raises(ValueError, match="larger than the embedding dim"):
    mrl_truncate(e, cfg.embed_dim + 1)


def test_attention_impls_agree_on_cpu(rng):
  cfg = tiny(sliding_window=4)
  model = make(rng, cfg)
  tok, seg, pos = rows(rng, cfg, 2, 12)
  seg[1, 8:] = 0
  ref = np.asarray(model.encode_rows(tok, seg, pos))
  model2 = EmbeddingModel(dataclasses.replace(cfg, attention_impl="dot_product_attention"),
                          rngs=nnx.Rngs(0))
  nnx.update(model2, nnx.state(model, nnx.Param))
  np.testing.assert_allclose(np.asarray(model2.encode_rows(tok, seg, pos)), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mesh_shape", [dict(data=8), dict(data=2, fsdp=2, tensor=2),
                                        dict(data=1, fsdp=4, tensor=2)])
def test_sharded_forward_equals_single_device(mesh_shape, rng):
  cfg = tiny(num_heads=4, num_kv_heads=2, mlp_dim=128, vocab_size=512)
  rules = sharding.DEFAULT_RULES
  model = make(rng, cfg)
  params = nnx.state(model, nnx.Param)
  tok, seg, pos = rows(rng, cfg, 8, 16)
  seg[3, 10:] = 0
  ref = np.asarray(model.encode_rows(tok, seg, pos))

  mesh = sharding.make_mesh(mesh_shape)
  sharded = sharding.create_sharded(lambda: EmbeddingModel(cfg, rules=rules, rngs=nnx.Rngs(0)),
                                    mesh, rules)
  with jax.set_mesh(mesh):
    nnx.update(sharded, jax.device_put(params, jax.tree.map(lambda v: v.sharding,
                                                              nnx.state(sharded, nnx.Param))))
    batch = [jax.device_put(x, sharding.batch_sharding(mesh, 2)) for x in (tok, seg, pos)]

    @nnx.jit
    def fwd(m, t, s, p):
      return m.encode_rows(t, s, p)

    out = np.asarray(fwd(sharded, *batch))
  rel = np.abs(out - ref).max() / np.abs(ref).max()
  assert rel < 1e-5, rel


def test_every_parameter_sharding_matches_rules():
  cfg = tiny(num_heads=4, num_kv_heads=1, vocab_size=512)  # one kv head: cannot split over tensor=2
  rules = sharding.DEFAULT_RULES
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  model = sharding.create_sharded(lambda: EmbeddingModel(cfg, rules=rules, rngs=nnx.Rngs(0)), mesh, rules)
  table = {name: (axes,) if isinstance(axes, str) else tuple(axes or ()) for name, axes in rules}
  checked = 0
  for path, var in jax.tree_util.tree_flatten_with_path(
      nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
    names = var.get_metadata()["logical_axes"]
    spec = var.get_value().sharding.spec
    spec = tuple(spec) + (None,) * (len(names) - len(spec))
    for dim, (name, got) in enumerate(zip(names, spec)):
      want = tuple(a for a in table[name] if mesh.shape[a] > 1)
      if want and var.get_value().shape[dim] % np.prod([mesh.shape[a] for a in want]):
        want = ()  # documented fallback: not divisible -> replicated
      got = () if got is None else (got,) if isinstance(got, str) else tuple(got)
      assert got == want, (jax.tree_util.keystr(path), dim, name, got, want)
    # Each device holds only its shard.
    shard_shape = var.get_value().sharding.shard_shape(var.get_value().shape)
    assert np.prod(shard_shape) * np.prod([mesh.shape[a] for s in spec if s
                                           for a in ((s,) if isinstance(s, str) else s)]) == var.get_value().size
    checked += 1
  assert checked > 10
  k = model.transformer.blocks[0].attn.k.get_value()
  assert k.sharding.spec[1] is None  # kv_heads=1 replicated over tensor
  assert model.transformer.blocks[0].attn.q.get_value().sharding.spec[1] == "tensor"


# ------------------------------------------------------------------------- bad input


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="num_heads=6 does not divide model_dim=256"):
    ModelConfig(model_dim=256, num_heads=6)
  with pytest.raises(ValueError, match="num_kv_heads=3 does not divide num_heads=4"):
    ModelConfig(num_heads=4, num_kv_heads=3)
  with pytest.raises(ValueError, match="MRL dim 128 .* larger than the embedding dim 64"):
    tiny(mrl_dims=(32, 128))
  with pytest.raises(ValueError, match="attention_impl"):
    tiny(attention_impl="flash")
  with pytest.raises(ValueError, match="unknown model preset"):
    ModelConfig.from_name("gemma9")
  with pytest.raises(ValueError, match="unknown config.model fields"):
    ModelConfig.from_dict(dict(preset="tiny", num_layer=3))


def test_mesh_errors():
  with pytest.raises(ValueError, match="product of mesh axes is 6 but there are 8 devices"):
    sharding.make_mesh(dict(data=3, fsdp=2))
  with pytest.raises(ValueError, match="does not divide"):
    sharding.make_mesh(dict(data=-1, fsdp=3))
  with pytest.raises(ValueError, match="unknown axes"):
    sharding.make_mesh(dict(model=8))
  assert dict(sharding.make_mesh(dict(data=-1, tensor=2)).shape) == dict(data=4, fsdp=1, tensor=2)


def test_input_errors(rng):
  cfg = tiny(max_length=16)
  model = make(rng, cfg)
  tok, seg, pos = rows(rng, cfg, 2, 8)
  bad = tok.copy()
  bad[1, 3] = cfg.vocab_size + 5
  with pytest.raises(ValueError, match=f"token id {cfg.vocab_size + 5} is out of vocabulary"):
    model.encode_rows(bad, seg, pos)
  with pytest.raises(ValueError, match="longer than config.model.max_length=16"):
    model.encode_rows(*rows(rng, cfg, 1, 20))
  with pytest.raises(ValueError, match="segment_ids has shape"):
    model.encode_rows(tok, seg[:, :4], pos)
