"""embed2.convert: parity with `transformers` / `sentence-transformers`, exact round trips, refusals.

Every model here is a small random one built in the test (no downloads). The parity tests need the
`parity` extra (torch, transformers, sentence-transformers); without it they skip, except under CI=true,
where a missing extra is a failure (CI installs it).
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from absl import app
from flax import nnx

from embed2 import convert
from embed2.convert import hf_import
from embed2 import sharding
from embed2.data import tokenizer as tokenizer_lib
from embed2.data.tokenizer import DEFAULT_MODEL_PATH, Tokenizer
from embed2.inference import Embedder
from embed2.model import EmbeddingModel, ModelConfig
from embed2.model.vision import VisionConfig, VisionEncoder
from embed2 import checkpoint as ckpt_lib

REPO = pathlib.Path(__file__).resolve().parent.parent

# Conversions in the parity tests place tensors on one device: on the 8 simulated devices Orbax
# writes replicated arrays slice by slice, compiling a small program per shape (seconds per save).
# The round-trip test converts on all 8 devices.
ONE_DEVICE = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])


def _parity_libs():
  """(torch, transformers, sentence_transformers); skip without them, fail under CI=true."""
  try:
    import sentence_transformers  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    if os.environ.get("CI", "").lower() in ("1", "true"):
      raise
    pytest.skip(f"parity tests need the parity extra (pip install -e '.[parity]'): {e}")
  torch.set_num_threads(2)
  return torch, transformers, sentence_transformers


def rel_err(a, b):
  return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(np.asarray(b, np.float64)))


def randomize(torch, module, seed, std=0.3):
  """Every parameter random (HF initialises norms and the projector at zero, which would hide layouts)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.copy_(torch.randn(p.shape, generator=g) * std)


def blank(factory):
  """A module with the right tree and zeros (cheaper than running every initialiser), to restore into."""
  model = nnx.eval_shape(factory)
  state = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), state))
  return model


def loaded_model(path):
  meta = ckpt_lib.Checkpointer(path, read_only=True).read_meta(0)
  cfg = ModelConfig.from_dict(meta["model_config"])
  model = blank(lambda: EmbeddingModel(cfg, rngs=nnx.Rngs(0)))
  ckpt_lib.load_model_params(model, path)
  return model, meta


def params_of(path):
  model, meta = loaded_model(path)
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param))), meta


def padded_batch(vocab, lengths, length, left=(), *, rng):
  """Random ids with an attention mask (right padding; rows in `left` left-padded)."""
  ids = rng.integers(3, vocab, (len(lengths), length))
  mask = np.zeros((len(lengths), length), np.int64)
  for b, n in enumerate(lengths):
    if b in left:
      mask[b, length - n:] = 1
    else:
      mask[b, :n] = 1
  return ids, mask


def _inputs(ids, mask):
  """(tokens, segment_ids = attention_mask, positions = cumsum - 1) as int32."""
  pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  return tuple(jnp.asarray(x, jnp.int32) for x in (ids, mask, pos))


# One compiled program per call site (eager dispatch would compile every primitive separately).
_hidden = nnx.jit(lambda model, *args: model.transformer(*args))
_embed = nnx.jit(lambda model, *args: model.encode_rows(*args)[:, 0])
_patches = nnx.jit(lambda model, images: model.encode_patches(images))
_soft = nnx.jit(lambda model, images: model(images))


def embed2_hidden(model, ids, mask):
  return np.asarray(_hidden(model, *_inputs(ids, mask)))


def embed2_embed(model, ids, mask):
  return np.asarray(_embed(model, *_inputs(ids, mask)))


# ------------------------------------------------------------------------------- published configs


EMBEDDINGGEMMA_CONFIG = {  # google/embeddinggemma-300m config.json (the fields that matter)
    "architectures": ["Gemma3TextModel"], "model_type": "gemma3_text", "vocab_size": 262144,
    "hidden_size": 768, "intermediate_size": 1152, "num_hidden_layers": 24, "num_attention_heads": 3,
    "num_key_value_heads": 1, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 2048, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-6,
    "rope_local_base_freq": 10000.0, "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": 512,
    "use_bidirectional_attention": True, "attention_bias": False, "attn_logit_softcapping": None,
    "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(24)]}
GEMMA3_1B_CONFIG = {  # google/gemma-3-1b-pt
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 262144,
    "hidden_size": 1152, "intermediate_size": 6912, "num_hidden_layers": 26, "num_attention_heads": 4,
    "num_key_value_heads": 1, "head_dim": 256, "max_position_embeddings": 32768, "query_pre_attn_scalar": 256,
    "rope_local_base_freq": 10000, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 512,
    "sliding_window_pattern": 6, "hidden_activation": "gelu_pytorch_tanh"}
GEMMA3_4B_CONFIG = {  # google/gemma-3-4b-pt: the text config leans on transformers' defaults
    "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "mm_tokens_per_image": 256,
    "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                    "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                    "sliding_window": 1024},
    "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                      "patch_size": 14, "vision_use_head": False}}


def test_published_configs_map_to_the_presets():
  arch = ckpt_lib.architecture
  for hf, preset in ((GEMMA3_1B_CONFIG, "gemma3-1b"), (GEMMA3_4B_CONFIG, "gemma3-4b")):
    cfg = convert.model_config_from_hf(hf)
    assert arch(cfg) == arch(ModelConfig.from_name(preset)), preset
    assert cfg.name == preset and cfg.causal
  assert convert.model_config_from_hf(GEMMA3_4B_CONFIG).rope_global_scale == 8.0
  # EmbeddingGemma: transformers halves the bidirectional window (|i - j| <= 512 // 2), i.e. w = 257.
  cfg = convert.model_config_from_hf(EMBEDDINGGEMMA_CONFIG, head_dims=(3072, 768))
  assert cfg.sliding_window == 257 and not cfg.causal
  want = arch(ModelConfig.from_name("embeddinggemma-300m"))
  assert {k: v for k, v in arch(cfg).items() if k != "sliding_window"} == \
      {k: v for k, v in want.items() if k != "sliding_window"}
  assert convert.vision_config_from_hf(GEMMA3_4B_CONFIG) == VisionConfig()  # So400m/14 @ 896 -> 2560
  # And back: the export's config.json reads as the same model.
  for c in (cfg, ModelConfig.from_name("gemma3-4b", causal=False)):
    back = convert.model_config_from_hf(convert.hf_config_from_model_config(c), head_dims=c.head_dims)
    assert arch(back) == arch(c) and back.causal == c.causal


# ------------------------------------------------------------------------------- text parity


def _tiny_text_config(transformers, *, bidirectional, vocab=96):
  return transformers.Gemma3TextConfig(
      vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
      num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
      # Window 4 (causal) / 6 -> |i - j| <= 3 (bidirectional), against rows of 13 tokens.
      sliding_window=6 if bidirectional else 4,
      layer_types=["sliding_attention", "sliding_attention", "full_attention"],
      rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                       "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}},
      use_bidirectional_attention=bidirectional, max_position_embeddings=64, attn_implementation="eager")


@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
def test_text_hidden_states_match_transformers(tmp_path, bidirectional, rng):
  torch, transformers, _ = _parity_libs()
  hf_cfg = _tiny_text_config(transformers, bidirectional=bidirectional)
  hf = transformers.Gemma3ForCausalLM(hf_cfg).eval()  # saved as model.* + lm_head: prefixes are found
  randomize(torch, hf, seed=1)
  hf.save_pretrained(tmp_path / "hf")
  _word_tokenizer(transformers, hf_cfg.vocab_size).save_pretrained(tmp_path / "hf")  # imports carry one
  meta = convert.convert_hf(tmp_path / "hf", tmp_path / "out", mesh=ONE_DEVICE)
  cfg = ModelConfig.from_dict(meta["model_config"])
  assert cfg.causal is not bidirectional and cfg.num_kv_heads < cfg.num_heads
  assert cfg.sliding_window == 4 and cfg.global_every == 3
  model, _ = loaded_model(tmp_path / "out")

  ids, mask = padded_batch(hf_cfg.vocab_size, [13, 8, 5], 13, left={2}, rng=rng)
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  with torch.no_grad():
    ref = hf.model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                   position_ids=torch.tensor(pos)).last_hidden_state.double().numpy()
    # The window must matter at this length, or the test could not see a wrong one.
    wide = transformers.Gemma3ForCausalLM(_tiny_text_config(transformers, bidirectional=bidirectional)).eval()
    wide.config.sliding_window = 64
    wide.load_state_dict(hf.state_dict())
    ref_wide = wide.model(input_ids=torch.tensor(ids[:1]), attention_mask=torch.tensor(mask[:1]),
                          position_ids=torch.tensor(pos[:1])).last_hidden_state.double().numpy()
  assert rel_err(ref_wide[0], ref[0]) > 1e-2
  ours = embed2_hidden(model, ids, mask)
  for b in range(len(ids)):
    valid = mask[b].astype(bool)
    assert rel_err(ours[b][valid], ref[b][valid]) < 1e-5, b


# ------------------------------------------------------------------------------- vision parity


def test_vision_tower_and_projector_match_transformers(tmp_path, rng):
  torch, transformers, _ = _parity_libs()
  text = _tiny_text_config(transformers, bidirectional=False).to_dict()
  vision = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=3,
                image_size=32, patch_size=4, vision_use_head=False, layer_norm_eps=1e-5)
  hf = transformers.Gemma3ForConditionalGeneration(
      transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=16)).eval()
  randomize(torch, hf, seed=2)
  hf.save_pretrained(tmp_path / "hf")
  _word_tokenizer(transformers, 96).save_pretrained(tmp_path / "hf")
  meta = convert.convert_hf(tmp_path / "hf", tmp_path / "out", mesh=ONE_DEVICE)
  assert meta["source"]["vision"]

  vcfg = VisionConfig.from_dict(
      ckpt_lib.Checkpointer(tmp_path / "out" / "vision", read_only=True).read_meta(0)["vision_config"])
  assert (vcfg.width, vcfg.depth, vcfg.pool, vcfg.text_dim) == (24, 2, 2, 32)
  ours = blank(lambda: VisionEncoder(vcfg, rngs=nnx.Rngs(0)))
  convert.load_vision_params(ours, tmp_path / "out")

  pixels = rng.uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)  # NCHW, as the HF processor gives
  with torch.no_grad():
    tower = hf.model.vision_tower(pixel_values=torch.tensor(pixels)).last_hidden_state
    soft = hf.model.multi_modal_projector(tower).double().numpy()
    tower = tower.double().numpy()
  images = jnp.asarray(pixels.transpose(0, 2, 3, 1))  # NHWC
  got_tower = np.asarray(_patches(ours, images))
  got_soft = np.asarray(_soft(ours, images))
  assert got_tower.shape == tower.shape == (2, 64, 24) and got_soft.shape == soft.shape == (2, 16, 32)
  assert rel_err(got_tower, tower) < 1e-5
  assert rel_err(got_soft, soft) < 1e-5
  # The text half of the multimodal checkpoint is a normal text checkpoint.
  model, _ = loaded_model(tmp_path / "out")
  np.testing.assert_array_equal(
      np.asarray(model.transformer.embedder.embedding[...]),
      hf.model.language_model.embed_tokens.weight.detach().numpy())


# ------------------------------------------------------------------------------- EmbeddingGemma


def _word_tokenizer(transformers, vocab):
  """A tiny fast tokenizer: 'w17' -> id 17, whitespace-split, right padding, no special tokens added."""
  from tokenizers import Tokenizer as HFTokenizer  # pylint: disable=g-import-not-at-top
  from tokenizers import models, pre_tokenizers  # pylint: disable=g-import-not-at-top
  words = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, vocab)}}
  tok = HFTokenizer(models.WordLevel(words, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


PROMPTS = {"query": "w5 w6 ", "document": "w7 "}


def _st_modules():
  """(Pooling module namespace, Dense, Normalize, Transformer) of the installed sentence-transformers."""
  try:  # sentence-transformers >= 6 moved the modules; 5.x has only the old path
    from sentence_transformers.sentence_transformer import modules as st_models  # pylint: disable=g-import-not-at-top
    from sentence_transformers.base.modules import Dense, Normalize, Transformer  # pylint: disable=g-import-not-at-top
  except ImportError:
    from sentence_transformers import models as st_models  # pylint: disable=g-import-not-at-top
    Dense, Normalize, Transformer = st_models.Dense, st_models.Normalize, st_models.Transformer
  return st_models, Dense, Normalize, Transformer


@pytest.fixture(scope="module")
def embeddinggemma(tmp_path_factory):
  """A random tiny EmbeddingGemma as a sentence-transformers folder, and its conversion."""
  torch, transformers, st = _parity_libs()
  st_models, Dense, Normalize, Transformer = _st_modules()
  base = tmp_path_factory.mktemp("embeddinggemma")
  hf_cfg = _tiny_text_config(transformers, bidirectional=True)
  backbone = transformers.Gemma3TextModel(hf_cfg).eval()
  randomize(torch, backbone, seed=3)
  backbone.save_pretrained(base / "backbone")
  _word_tokenizer(transformers, hf_cfg.vocab_size).save_pretrained(base / "backbone")
  dense = [Dense(32, 48, bias=False, activation_function=torch.nn.Identity()),
           Dense(48, 40, bias=False, activation_function=torch.nn.Identity())]
  for j, layer in enumerate(dense):
    randomize(torch, layer, seed=10 + j)
  model = st.SentenceTransformer(
      modules=[Transformer(str(base / "backbone")), st_models.Pooling(32, "mean"), *dense, Normalize()],
      prompts=PROMPTS, device="cpu")
  model.save(str(base / "st"))
  convert.convert_hf(base / "st", base / "out", mesh=ONE_DEVICE)
  return base, model


def _texts(vocab, lengths, *, rng):
  return [" ".join(f"w{i}" for i in rng.integers(4, vocab, n)) for n in lengths]


def _st_ids(st_model, texts):
  """The ids and attention mask sentence-transformers feeds its Transformer module (right padding)."""
  preprocess = getattr(st_model, "preprocess", None) or st_model.tokenize
  feats = preprocess(texts)
  return feats["input_ids"].numpy(), feats["attention_mask"].numpy()


def test_embeddinggemma_pipeline_matches_sentence_transformers(embeddinggemma, rng):
  base, st_model = embeddinggemma
  model, meta = loaded_model(base / "out")
  assert model.cfg.head_dims == (48, 40) and not model.cfg.causal
  assert meta["task_strings"] == PROMPTS
  # Rows of 13, 9, 4 and 1 words; the last two with the query prompt, whose tokens are part of the
  # mean (include_prompt), as EmbeddingGemma is used.
  texts = _texts(96, [13, 9, 4, 1], rng=rng)
  want = np.concatenate([st_model.encode(texts[:2], convert_to_numpy=True),
                         st_model.encode(texts[2:], prompt_name="query", convert_to_numpy=True)])
  ids, mask = _st_ids(st_model, texts[:2] + [PROMPTS["query"] + t for t in texts[2:]])
  assert ids.shape[1] == 13 and mask.sum(1).tolist() == [13, 9, 6, 3]
  got = embed2_embed(model, ids, mask)
  assert got.shape == want.shape == (4, 40)
  for b in range(4):
    assert rel_err(got[b], want[b]) < 1e-5, b


def test_export_loads_in_sentence_transformers_and_round_trips_exactly(embeddinggemma, tmp_path, rng):
  _, _, st = _parity_libs()
  base, st_model = embeddinggemma
  convert.main(["--to_safetensors", f"--ckpt={base / 'out'}", f"--out={tmp_path / 'st'}",
                f"--hf_tokenizer={base / 'backbone'}"])
  exported = st.SentenceTransformer(str(tmp_path / "st"), device="cpu", local_files_only=True)
  assert exported.prompts["query"] == PROMPTS["query"]
  texts = _texts(96, [11, 6, 2], rng=rng)
  np.testing.assert_allclose(exported.encode(texts, convert_to_numpy=True),
                             st_model.encode(texts, convert_to_numpy=True), atol=2e-6, rtol=0)
  # embed2 -> safetensors -> embed2 is bit-exact.
  convert.main([f"--hf_dir={tmp_path / 'st'}", f"--out={tmp_path / 'back'}"])
  p0, m0 = params_of(base / "out")
  p1, m1 = params_of(tmp_path / "back")
  jax.tree.map(np.testing.assert_array_equal, p0, p1)
  assert ckpt_lib.architecture(ModelConfig.from_dict(m0["model_config"])) == \
      ckpt_lib.architecture(ModelConfig.from_dict(m1["model_config"]))
  assert m1["task_strings"] == m0["task_strings"]


# ------------------------------------------------------------------------------- round trip (no torch)


def random_checkpoint(directory, cfg, task_strings=None, *, rng, tokenizer=""):
  shapes = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: EmbeddingModel(cfg, rngs=nnx.Rngs(0))), nnx.Param))
  params = jax.tree.map(lambda x: rng.normal(0, 0.5, x.shape).astype(np.float32), shapes)
  ck = ckpt_lib.Checkpointer(directory, keep=None, async_save=False)
  ck.save(7, params=jax.tree.map(jnp.asarray, params), force=True,
          meta={"model_config": cfg.to_dict(), "tokenizer": tokenizer, "task_strings": task_strings or {}})
  ck.close()
  return params


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_round_trip_is_bit_exact(tmp_path, causal, rng):
  # A run on the packaged tokenizer (meta tokenizer ""): the export writes it as a tokenizer.json.
  cfg = ModelConfig.from_name("tiny", vocab_size=8192, num_layers=3, global_every=3, sliding_window=5,
                              head_dims=(48, 24), mrl_dims=(), rope_global_scale=2.0, causal=causal,
                              query_pre_attn_scalar=12.0, rope_local_base=500.0)
  params = random_checkpoint(tmp_path / "ckpt", cfg, {"search": "task: search | query: "}, rng=rng)
  res = convert.export_sentence_transformers(tmp_path / "ckpt", tmp_path / "st")
  assert res["modules"][-1].endswith("Normalize") and len(res["modules"]) == 5
  hf_cfg = json.loads((tmp_path / "st" / "config.json").read_text())
  assert hf_cfg["use_bidirectional_attention"] is (not causal)
  assert hf_cfg["sliding_window"] == (5 if causal else 8)
  meta = convert.convert_hf(tmp_path / "st", tmp_path / "back")
  got, _ = params_of(tmp_path / "back")
  jax.tree.map(np.testing.assert_array_equal, got, params)
  back = ModelConfig.from_dict(meta["model_config"])
  assert ckpt_lib.architecture(back) == ckpt_lib.architecture(cfg) and back.causal == causal
  assert meta["task_strings"] == {"search": "task: search | query: "}
  # The packaged tokenizer went out as a tokenizer.json and came back as one that tokenizes the same.
  assert meta["tokenizer"] == str(tmp_path / "back" / "tokenizer.json")
  back_tok, default = Tokenizer.from_file(meta["tokenizer"]), Tokenizer.default()
  assert back_tok.vocab_size == default.vocab_size
  for t in tokenizer_lib.PROBE_TEXTS:
    assert back_tok.encode(t, add_bos=True, add_eos=True) == default.encode(t, add_bos=True, add_eos=True)
  if not causal:  # bfloat16 storage: the float32 values rounded to nearest, restored into float32
    convert.convert_hf(tmp_path / "st", tmp_path / "bf16", dtype="bfloat16")
    got16, _ = params_of(tmp_path / "bf16")
    want16 = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32), params)
    jax.tree.map(np.testing.assert_array_equal, got16, want16)


def test_safetensors_reader_reads_bfloat16_and_what_it_writes(tmp_path, rng):
  a = rng.normal(size=(3, 5)).astype(ml_dtypes.bfloat16)
  b = rng.normal(size=(7,)).astype(np.float32)
  convert.write_safetensors(tmp_path / "x.safetensors", [("a", a.shape, a.dtype), ("b", b.shape, b.dtype)],
                            iter([a, b]))
  infos = convert.read_safetensors_header(tmp_path / "x.safetensors")
  assert infos["a"].dtype == "BF16" and infos["b"].shape == (7,)
  np.testing.assert_array_equal(convert.load_tensor(infos["a"]), a)
  np.testing.assert_array_equal(convert.load_tensor(infos["b"]), b)


# ------------------------------------------------------------------------------- bad input


def _numpy_hf_dir(directory, cfg=None, mutate=None, config_edit=None, *, rng, tokenizer=True):
  """A Gemma3TextModel folder written without torch: config.json + random model.safetensors."""
  cfg = cfg or ModelConfig.from_name("tiny", vocab_size=8192, num_layers=2, head_dims=(), mrl_dims=())
  directory.mkdir(parents=True)
  if tokenizer:  # the packaged sentencepiece model (8192 ids): an import must carry its tokenizer
    shutil.copyfile(DEFAULT_MODEL_PATH, directory / "tokenizer.model")
  hf_cfg = convert.hf_config_from_model_config(cfg)
  if config_edit:
    config_edit(hf_cfg)
  (directory / "config.json").write_text(json.dumps(hf_cfg))
  tensors = {e.hf_name: rng.normal(size=e.hf_shape).astype(np.float32) for e in convert.text_entries(cfg)}
  if mutate:
    mutate(tensors)
  convert.write_safetensors(directory / "model.safetensors",
                            [(n, t.shape, t.dtype) for n, t in tensors.items()], iter(tensors.values()))
  return directory


def _no_output_left(tmp_path):
  left = sorted(p.name for p in tmp_path.iterdir() if p.name not in ("hf",))
  assert left == [], left


def _drop(name):
  return lambda t: t.pop(name)


def _add(name, shape):
  return lambda t: t.__setitem__(name, np.ones(shape, np.float32))


def _reshape(name, shape):
  return lambda t: t.__setitem__(name, np.ones(shape, np.float32))


@pytest.mark.parametrize("mutate,match", [
    (_drop("layers.1.mlp.up_proj.weight"), r"missing tensors.*'layers\.1\.mlp\.up_proj\.weight'"),
    (_add("layers.0.self_attn.q_proj.bias", (64,)), r"unexpected tensors.*'layers\.0\.self_attn\.q_proj\.bias'"),
    (_reshape("layers.0.self_attn.k_proj.weight", (16, 64)),
     r"shape mismatches.*layers\.0\.self_attn\.k_proj\.weight has \(16, 64\), config implies \(32, 64\)"),
], ids=["missing", "extra", "shape"])
def test_bad_tensors_are_named_and_nothing_is_written(tmp_path, mutate, match, rng):
  hf = _numpy_hf_dir(tmp_path / "hf", mutate=mutate, rng=rng)
  with pytest.raises(ValueError, match=match):
    convert.convert_hf(hf, tmp_path / "out")
  _no_output_left(tmp_path)
  with pytest.raises(SystemExit, match="embed2.convert: checkpoint .* does not match"):
    convert.main([f"--hf_dir={hf}", f"--out={tmp_path / 'out'}"])
  _no_output_left(tmp_path)


def _set_key(key, value):
  return lambda c: c.__setitem__(key, value)


@pytest.mark.parametrize("edit,match", [
    (_set_key("model_type", "llama"), r"model_type='llama'"),
    (_set_key("rope_scaling", {"rope_type": "yarn", "factor": 4.0}), r"rope_type='yarn'"),
    (_set_key("attn_logit_softcapping", 50.0), r"soft-capping"),
    (_set_key("layer_types", ["full_attention", "sliding_attention"]), r"every k-th layer global"),
    (_set_key("hidden_activation", "silu"), r"hidden_activation='silu'"),
], ids=["model_type", "rope", "softcap", "layer_pattern", "activation"])
def test_unsupported_architectures_are_refused(tmp_path, edit, match, rng):
  hf = _numpy_hf_dir(tmp_path / "hf", config_edit=edit, rng=rng)
  with pytest.raises(convert.UnsupportedArchitecture, match="unsupported architecture: .*" + match):
    convert.convert_hf(hf, tmp_path / "out")
  _no_output_left(tmp_path)


def test_unsupported_sentence_transformers_heads_are_refused(tmp_path, monkeypatch, rng):
  cfg = ModelConfig.from_name("tiny", vocab_size=8192, num_layers=2, head_dims=(16,), mrl_dims=())
  random_checkpoint(tmp_path / "ckpt", cfg, rng=rng)
  monkeypatch.chdir(tmp_path)  # paths relative to the working directory, as typed in a shell
  convert.main(["--to_safetensors", "--ckpt=ckpt", "--out=hf"])
  pooling = tmp_path / "hf" / "1_Pooling" / "config.json"
  good = pooling.read_text()
  pooling.write_text(json.dumps({"pooling_mode": "cls", "include_prompt": True}))
  with pytest.raises(convert.UnsupportedArchitecture, match=r"pooling \['cls'\]"):
    convert.convert_hf(tmp_path / "hf", tmp_path / "out")
  pooling.write_text(good)
  dense = tmp_path / "hf" / "2_Dense" / "config.json"
  dense.write_text(json.dumps({**json.loads(dense.read_text()), "activation_function": "torch.nn.modules.activation.Tanh"}))
  with pytest.raises(convert.UnsupportedArchitecture, match=r"2_Dense: Dense with .*Tanh"):
    convert.convert_hf(tmp_path / "hf", tmp_path / "out")
  assert not (tmp_path / "out").exists()


def test_a_failure_while_writing_leaves_nothing_behind(tmp_path, monkeypatch, rng):
  hf = _numpy_hf_dir(tmp_path / "hf", rng=rng)
  real = hf_import._save_params

  def save_then_fail(directory, params, meta):
    real(directory, params, meta)  # the checkpoint is complete in the temporary directory...
    raise OSError("disk full")  # ...and then something else fails

  monkeypatch.setattr(hf_import, "_save_params", save_then_fail)
  with pytest.raises(OSError, match="disk full"):
    convert.convert_hf(hf, tmp_path / "out")
  _no_output_left(tmp_path)
  (tmp_path / "taken").mkdir()
  (tmp_path / "taken" / "x").write_text("")
  monkeypatch.undo()
  with pytest.raises(FileExistsError, match="not empty"):
    convert.convert_hf(hf, tmp_path / "taken")


# ------------------------------------------------------------------------------- a folder saved today
#
# What current sentence-transformers (6.x) / transformers (5.x) save for an EmbeddingGemma-shaped
# model: tokenizer.json + tokenizer_config.json only (no tokenizer.model), max_seq_length below the
# position limit (as tokenizer_config's model_max_length), and prompts per side. Import and export
# must reproduce encode_query / encode_document, or refuse.

ST_PROMPTS = {"query": "task: search result | query: ", "document": "title: none | text: ",
              "STS": "task: sentence similarity | query: "}
ST_MAX_SEQ = 24  # the model has 64 positions
_ALPHABET = list("abcdefghijklmnopqrstuvwxyzäéß世界")
_UNSEEN = ("Ωμέγα", "2024", "🦜", "x\ty", "a\nb", "<start_of_image>", "<bos>")  # byte fallback, specials


def _gemma_style_tokenizer(transformers, rng):
  """A Gemma-style fast tokenizer trained here, and its words: BPE with byte fallback, spaces as "▁",
  <pad> <eos> <bos> <unk> = 0..3, <bos> ... <eos> around every text (as EmbeddingGemma's), Gemma 3's
  image tokens as added special tokens. transformers 5's GemmaTokenizer (which rebuilds parts of the
  tokenizer when it loads) where it takes a vocabulary, else a PreTrainedTokenizerFast."""
  import inspect  # pylint: disable=g-import-not-at-top
  from tokenizers import Tokenizer as HFTokenizer  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, normalizers, processors, trainers  # pylint: disable=g-import-not-at-top
  words = ["".join(rng.choice(_ALPHABET, int(rng.integers(1, 8)))) for _ in range(150)]
  corpus = [" ".join(rng.choice(words, 12)) for _ in range(300)]
  specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
  trained = HFTokenizer(models.BPE(unk_token="<unk>"))
  trained.normalizer = normalizers.Replace(" ", "▁")
  trained.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=specials,
                                                          show_progress=False))
  learned = json.loads(trained.to_str())["model"]
  pieces = specials + [f"<0x{b:02X}>" for b in range(256)] + [
      p for p, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]) if p not in specials]
  vocab = {p: i for i, p in enumerate(pieces)}
  merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
  media = ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]
  gemma = getattr(transformers, "GemmaTokenizer", None)
  if gemma is not None and "vocab" in inspect.signature(gemma.__init__).parameters:
    tok = gemma(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=True,
                extra_special_tokens=media)
  else:
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True,
                                byte_fallback=True))
    tk.normalizer = normalizers.Replace(" ", "▁")
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>",
                                                      special_tokens=[("<bos>", 2), ("<eos>", 1)])
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=media)
  return tok, words


def _sentences(words, n_words, *, rng):
  """Random sentences of the tokenizer's words, with now and then something it never saw."""
  out = []
  for n in n_words:
    ws = list(rng.choice(words, n))
    for _ in range(int(rng.integers(0, 3))):
      ws.insert(int(rng.integers(0, len(ws) + 1)), _UNSEEN[int(rng.integers(len(_UNSEEN)))])
    out.append(" ".join(ws))
  return out


@pytest.fixture(scope="module")
def st_today(tmp_path_factory, fixture_rng, request):
  """A random tiny EmbeddingGemma saved by SentenceTransformer.save, reloaded as users load it, and
  imported: (folder, reloaded SentenceTransformer, words, embed2 checkpoint dir)."""
  torch, transformers, st = _parity_libs()
  st_models, Dense, Normalize, Transformer = _st_modules()
  rng = fixture_rng(request)
  base = tmp_path_factory.mktemp("st_today")
  tok, words = _gemma_style_tokenizer(transformers, rng)
  hf_cfg = _tiny_text_config(transformers, bidirectional=True, vocab=len(tok))
  backbone = transformers.Gemma3TextModel(hf_cfg).eval()
  randomize(torch, backbone, seed=int(rng.integers(1 << 30)))
  backbone.save_pretrained(base / "backbone")
  tok.save_pretrained(base / "backbone")
  dense = Dense(32, 48, bias=False, activation_function=torch.nn.Identity())
  randomize(torch, dense, seed=int(rng.integers(1 << 30)))
  model = st.SentenceTransformer(
      modules=[Transformer(str(base / "backbone"), max_seq_length=ST_MAX_SEQ),
               st_models.Pooling(32, "mean"), dense, Normalize()],
      prompts=ST_PROMPTS, device="cpu")
  folder = base / "st"
  model.save(str(folder))
  (folder / "tokenizer.model").unlink(missing_ok=True)
  assert (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file()
  saved = st.SentenceTransformer(str(folder), device="cpu", local_files_only=True)
  assert saved.max_seq_length == ST_MAX_SEQ < hf_cfg.max_position_embeddings
  convert.convert_hf(folder, base / "out", mesh=ONE_DEVICE)
  return folder, saved, words, base / "out"


def _rows_close(got, want, tol=1e-5):
  assert got.shape == want.shape
  errs = [rel_err(g, w) for g, w in zip(got, want)]
  assert max(errs) < tol, errs


def _quiet_embed(emb, texts, **kwargs):
  with warnings.catch_warnings():  # inputs over max_length are cut, as sentence-transformers cuts them
    warnings.simplefilter("ignore", UserWarning)
    return emb.embed(texts, **kwargs)


def test_import_of_tokenizer_json_only_gives_the_ids_of_transformers(st_today, rng):
  """Defect 4: the import records tokenizer.json (it held no tokenizer.model) and embeds with it."""
  _, transformers, _ = _parity_libs()
  folder, _, words, out = st_today
  meta = ckpt_lib.Checkpointer(out, read_only=True).read_meta(0)
  assert meta["tokenizer"] == str(out / "tokenizer.json") and meta["tokenizer_kind"] == "tokenizers"
  hf = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
  ours = Tokenizer.from_file(meta["tokenizer"])
  texts = _sentences(words, rng.integers(1, 40, 30), rng=rng) + list(tokenizer_lib.PROBE_TEXTS)
  for t in texts:
    assert ours.encode(t, add_bos=True, add_eos=True) == hf(t)["input_ids"], t
  emb = Embedder.from_checkpoint(out, batch_size=8)
  assert emb.tokenizer.source == meta["tokenizer"]
  # What the Embedder feeds the model: sentence-transformers' ids, prompt in front, cut at the limit.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    got = [list(t) for t in emb.tokenize(texts[:12], is_query=False)]
  want = hf([ST_PROMPTS["document"] + t for t in texts[:12]], truncation=True, max_length=ST_MAX_SEQ)
  assert got == want["input_ids"]
  # Gemma 3's image tokens are in the vocabulary; audio ones are not.
  assert emb.tokenizer.special_id("<soft_token>") == hf.convert_tokens_to_ids("<image_soft_token>")
  with pytest.raises(KeyError, match="<start_of_audio>"):
    emb.tokenizer.special_id("<start_of_audio>")


def test_import_cuts_inputs_at_max_seq_length(st_today, rng):
  """Defect 5: sentence-transformers cuts inputs at its max_seq_length (24), not at the 64 positions."""
  folder, model, words, out = st_today
  meta = ckpt_lib.Checkpointer(out, read_only=True).read_meta(0)
  assert meta["max_seq_length"] == ST_MAX_SEQ
  emb = Embedder.from_checkpoint(out, batch_size=8)
  assert emb.max_length == ST_MAX_SEQ
  texts = _sentences(words, rng.integers(30, 60, 6), rng=rng)
  assert min(len(model.tokenizer(t)["input_ids"]) for t in texts) > ST_MAX_SEQ  # all over the limit
  _rows_close(_quiet_embed(emb, texts, prefix=""), model.encode(texts, prompt=""))


def test_import_applies_the_prompts_per_side(st_today, rng):
  """Defect 6: queries get the "query" prompt and documents the "document" prompt, as
  encode_query / encode_document apply them; task= picks a prompt as prompt_name= does."""
  _, model, words, out = st_today
  meta = ckpt_lib.Checkpointer(out, read_only=True).read_meta(0)
  assert meta["prompts"] == ST_PROMPTS and meta["default_prompt_name"] is None
  emb = Embedder.from_checkpoint(out, batch_size=8)
  texts = _sentences(words, list(rng.integers(1, 12, 7)) + [40, 55], rng=rng)  # the last two are cut
  docs = _quiet_embed(emb, texts, is_query=False)
  _rows_close(docs, model.encode_document(texts))
  _rows_close(_quiet_embed(emb, texts), model.encode_query(texts))
  _rows_close(_quiet_embed(emb, texts, task="STS"), model.encode_query(texts, prompt_name="STS"))
  _rows_close(_quiet_embed(emb, texts, is_query=False, task="STS"),
              model.encode_document(texts, prompt_name="STS"))
  # The document prompt matters: without it the embeddings are far apart (the test can fail).
  assert rel_err(docs, model.encode(texts, prompt="")) > 1e-2
  with pytest.raises(ValueError, match="not a prompt of this model"):
    emb.embed(texts[:1], task="search")


def test_export_of_the_import_loads_in_sentence_transformers(st_today, tmp_path, rng):
  """embed2 checkpoint -> folder -> sentence-transformers equals embed2's Embedder (and the source)."""
  _, _, st = _parity_libs()
  folder, model, words, out = st_today
  convert.main(["--to_safetensors", f"--ckpt={out}", f"--out={tmp_path / 'st'}"])
  assert json.loads((tmp_path / "st" / "sentence_bert_config.json").read_text())["max_seq_length"] == ST_MAX_SEQ
  exported = st.SentenceTransformer(str(tmp_path / "st"), device="cpu", local_files_only=True)
  assert exported.max_seq_length == ST_MAX_SEQ
  assert {k: v for k, v in exported.prompts.items() if v} == ST_PROMPTS
  emb = Embedder.from_checkpoint(out, batch_size=8)
  texts = _sentences(words, list(rng.integers(1, 12, 6)) + [35, 50], rng=rng)
  for got, want in ((exported.encode_query(texts), _quiet_embed(emb, texts)),
                    (exported.encode_document(texts), _quiet_embed(emb, texts, is_query=False)),
                    (exported.encode_query(texts, prompt_name="STS"), _quiet_embed(emb, texts, task="STS"))):
    _rows_close(got, want)
  _rows_close(exported.encode_document(texts), model.encode_document(texts))


def test_export_writes_the_checkpoints_own_sentencepiece_tokenizer(tmp_path, rng):
  """Defect 3: a run on the packaged tokenizer exports a tokenizer that sentence-transformers loads and
  that tokenizes as embed2 does (no --hf_tokenizer); embeddings equal both ways."""
  _, transformers, st = _parity_libs()
  cfg = ModelConfig.from_name("tiny", vocab_size=8192, max_length=40, head_dims=(24,), mrl_dims=())
  random_checkpoint(tmp_path / "ckpt", cfg, {"search": "task: search | query: "}, rng=rng)
  convert.main(["--to_safetensors", f"--ckpt={tmp_path / 'ckpt'}", f"--out={tmp_path / 'st'}"])
  assert (tmp_path / "st" / "tokenizer.json").is_file()
  words = ("read write the file socket server thread lock queue parse json decode encode path copy "
           "déjà vu 世界 🦜 <start_of_image> <bos> def f(x):\n\treturn x + 1  # 2024").split(" ")
  texts = [" ".join(rng.choice(words, int(n))) for n in rng.integers(1, 15, 8)]
  texts += [" ".join(rng.choice(words, 60)) for _ in range(2)] + list(tokenizer_lib.PROBE_TEXTS[:4])
  emb = Embedder.from_checkpoint(tmp_path / "ckpt", batch_size=8)
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "st"), local_files_only=True)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    ours = [list(t) for t in emb.tokenize(texts, is_query=False)]
  assert ours == hf(texts, truncation=True, max_length=cfg.max_length)["input_ids"]
  assert max(len(t) for t in ours) == cfg.max_length  # some were cut
  exported = st.SentenceTransformer(str(tmp_path / "st"), device="cpu", local_files_only=True)
  _rows_close(exported.encode_query(texts), _quiet_embed(emb, texts))
  _rows_close(exported.encode_document(texts), _quiet_embed(emb, texts, is_query=False))
  _rows_close(exported.encode_query(texts, prompt_name="search"), _quiet_embed(emb, texts, task="search"))


def test_import_and_export_refuse_without_the_models_own_tokenizer(tmp_path, rng):
  """Defect 4: a folder with no tokenizer is refused (nothing written) instead of importing a
  checkpoint that would embed with another tokenizer; an export refuses a checkpoint whose
  tokenizer is gone, or is larger than the model."""
  hf = _numpy_hf_dir(tmp_path / "hf", rng=rng, tokenizer=False)
  with pytest.raises(FileNotFoundError, match="holds no tokenizer"):
    convert.convert_hf(hf, tmp_path / "out")
  _no_output_left(tmp_path)
  cfg = ModelConfig.from_name("tiny", vocab_size=8192, num_layers=2, head_dims=(), mrl_dims=())
  random_checkpoint(tmp_path / "ckpt", cfg, rng=rng, tokenizer=str(tmp_path / "gone" / "tokenizer.model"))
  with pytest.raises(SystemExit, match="tokenizer .*gone.*missing"):
    convert.main(["--to_safetensors", f"--ckpt={tmp_path / 'ckpt'}", f"--out={tmp_path / 'st'}"])
  assert not (tmp_path / "st").exists()
  small = ModelConfig.from_name("tiny", vocab_size=512, num_layers=2, head_dims=(), mrl_dims=())
  random_checkpoint(tmp_path / "small", small, rng=rng)
  with pytest.raises(ValueError, match="8192 ids but the model's vocab_size is 512"):
    convert.export_sentence_transformers(tmp_path / "small", tmp_path / "st")


def test_command_line_flags_and_refusals(tmp_path):
  """`python -m embed2.convert` (absl flags, embed2/cli.py; the round trips above run it in process): a
  usage error names what is missing or malformed, and from a subprocess a refusal exits non-zero with
  the reason and writes nothing."""
  with pytest.raises(app.UsageError, match="--to_safetensors needs --ckpt"):
    convert.main(["--to_safetensors", f"--out={tmp_path / 'x'}"])
  with pytest.raises(app.UsageError, match="give --hf_dir=DIR to import"):
    convert.main([f"--out={tmp_path / 'x'}"])
  with pytest.raises(app.UsageError, match="--mesh"):
    convert.main([f"--hf_dir={tmp_path}", f"--out={tmp_path / 'x'}", "--mesh=fsdp"])
  with pytest.raises(app.UsageError, match="--dtype"):
    convert.main([f"--hf_dir={tmp_path}", f"--out={tmp_path / 'x'}", "--dtype=float16"])
  proc = subprocess.run([sys.executable, "-m", "embed2.convert", f"--hf_dir={tmp_path / 'nowhere'}",
                         f"--out={tmp_path / 'x'}"], cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and "embed2.convert: --hf_dir=" in proc.stderr and "is not a directory" in \
      proc.stderr, proc.stderr[-2000:]
  assert not (tmp_path / "x").exists()
