"""Tests for embed2.data.tokenizer and embed2.data.train_tokenizer."""
import io
import json
import pickle
import sysconfig

import numpy as np
import pytest
import sentencepiece as spm

from embed2.data import tokenizer as tokenizer_lib
from embed2.data import train_tokenizer
from embed2.data.tokenizer import SPECIAL_TOKENS, Tokenizer

_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def f(x, *, y=2):\n    \"\"\"Adds.\"\"\"\n    return x + y  # 12345\n\n\tclass A: pass\n",
    "  leading and trailing spaces  ",
    "Grüße aus Zürich, déjà vu, naïve café — “quotes” 世界 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🦜🚀",
    "mixed\r\nline\x0bendings\n\n\n",
    "",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
  return Tokenizer.default()


def _train_tiny(tmp_path, name, **overrides):
  """Trains a tiny model (a fraction of a second) and writes it to tmp_path."""
  sentences = [
      "hello world, this is a tiny corpus for a tiny model",
      "def add(a, b):\n    return a + b",
      "numbers 0123456789 and <start_of_turn>user text<end_of_turn>",
  ] * 30
  kwargs = dict(
      model_type="bpe", vocab_size=400, byte_fallback=True,
      pad_id=0, eos_id=1, bos_id=2, unk_id=3,
      pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
      normalization_rule_name="identity", add_dummy_prefix=False,
      remove_extra_whitespaces=False, hard_vocab_limit=False, num_threads=1,
      minloglevel=2)
  kwargs.update(overrides)
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, **kwargs)
  path = tmp_path / name
  path.write_bytes(model.getvalue())
  return path


# --- the shipped model --------------------------------------------------------


def test_shipped_model_follows_gemma_conventions(tok):
  assert tokenizer_lib.DEFAULT_MODEL_PATH.stat().st_size < 500_000
  assert tok.vocab_size == tok.sp_vocab_size == 8192
  assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
  assert [tok.id_to_piece(i) for i in range(4)] == ["<pad>", "<eos>", "<bos>", "<unk>"]
  # Specials are user-defined pieces inside the vocab, ids 4, 5, ... in order.
  assert [tok.special_id(n) for n in SPECIAL_TOKENS] == list(range(4, 4 + len(SPECIAL_TOKENS)))
  for name in SPECIAL_TOKENS:
    assert tok.id_to_piece(tok.special_id(name)) == name
  with pytest.raises(KeyError, match="<start_of_smell>"):
    tok.special_id("<start_of_smell>")


def test_shipped_model_compresses_text(tok):
  text = "Return a new list containing all items from the iterable in ascending order."
  assert len(tok.encode(text)) < len(text) / 3


@pytest.mark.parametrize("text", _TEXTS)
def test_round_trip(tok, text):
  ids = tok.encode(text)
  assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
  assert tok.unk_id not in ids
  assert tok.decode(ids) == text
  assert tok.decode(np.asarray(ids, np.int32)) == text


def test_round_trip_random_unicode(tok):
  rng = np.random.default_rng(1234)
  for _ in range(50):
    cps = rng.integers(0x20, 0x30000, size=int(rng.integers(1, 40)))
    text = "".join(chr(c) for c in cps if not 0xD800 <= c <= 0xDFFF)
    ids = tok.encode(text)
    assert tok.unk_id not in ids
    assert tok.decode(ids) == text


def test_indentation_is_kept_as_whitespace_pieces(tok):
  ids = tok.encode("if x:\n        return y")
  assert "▁▁▁▁▁▁▁▁" in [tok.id_to_piece(i) for i in ids]


def test_digits_are_split(tok):
  assert [tok.id_to_piece(i) for i in tok.encode("2024")] == ["2", "0", "2", "4"]


def test_byte_fallback_for_unseen_characters(tok):
  for ch in ["世", "🦜", "ꯍ"]:
    assert tok._sp.PieceToId(ch) == tok.unk_id, f"{ch!r} became a piece; pick another"
    ids = tok.encode(ch)
    pieces = [tok.id_to_piece(i) for i in ids]
    assert pieces == [f"<0x{b:02X}>" for b in ch.encode("utf-8")]
    assert tok.decode(ids) == ch


def test_encode_batch_matches_encode(tok):
  texts = _TEXTS + ["<start_of_image> in text", "x" * 3000]
  for kwargs in [{}, {"add_bos": True, "add_eos": True, "max_length": 7}]:
    want = [tok.encode(t, **kwargs) for t in texts]
    assert tok.encode_batch(texts, **kwargs) == want
    assert tok.encode_batch(texts, num_threads=1, **kwargs) == want
  assert tok.encode_batch([]) == []


def test_bos_eos_and_max_length(tok):
  body = tok.encode("one two three four five six seven")
  assert len(body) > 6
  assert tok.encode("one two three four five six seven", add_bos=True, add_eos=True) == (
      [tok.bos_id] + body + [tok.eos_id])
  # The text is cut first, so both markers survive truncation.
  got = tok.encode("one two three four five six seven", add_bos=True, add_eos=True, max_length=5)
  assert got == [tok.bos_id] + body[:3] + [tok.eos_id]
  assert tok.encode("one two three four five six seven", max_length=4) == body[:4]
  assert tok.encode("one two", add_bos=True, add_eos=True, max_length=1) == [tok.bos_id]
  assert tok.decode([tok.bos_id] + body + [tok.eos_id, tok.pad_id, tok.pad_id]) == (
      "one two three four five six seven")
  for bad in [0, -3]:
    with pytest.raises(ValueError, match=f"max_length={bad}"):
      tok.encode("hi", max_length=bad)
    with pytest.raises(ValueError, match=f"max_length={bad}"):
      tok.encode_batch(["hi"], max_length=bad)
  with pytest.raises(TypeError, match="str"):
    tok.encode(b"bytes")
  with pytest.raises(TypeError, match=r"texts\[1\]"):
    tok.encode_batch(["ok", 3])


# --- special tokens -----------------------------------------------------------


def test_special_token_names_in_user_text_stay_text(tok):
  raw = spm.SentencePieceProcessor(model_proto=tokenizer_lib.DEFAULT_MODEL_PATH.read_bytes())
  special_ids = set(tok.special_ids.values())
  assert len(special_ids) == len(SPECIAL_TOKENS)
  for name in SPECIAL_TOKENS:
    # Sentencepiece alone would turn the string into the control token...
    assert raw.EncodeAsIds(name) == [tok.special_id(name)]
    # ...the wrapper spells it with ordinary pieces and decodes it back.
    text = f"see {name}, then{name}{name}."
    ids = tok.encode(text)
    assert special_ids.isdisjoint(ids)
    assert tok.decode(ids) == text


def test_special_ids_decode_to_names(tok):
  a, b = tok.encode("a photo"), tok.encode("of a cat")
  ids = ([tok.special_id("<start_of_image>")] + [tok.special_id("<soft_token>")] * 2
         + [tok.special_id("<end_of_image>")] + a + [tok.special_id("<timestamp>")] + b)
  assert tok.decode(ids) == (
      "<start_of_image><soft_token><soft_token><end_of_image>a photo<timestamp>of a cat")
  with pytest.raises(ValueError, match="outside"):
    tok.decode([tok.vocab_size])
  with pytest.raises(ValueError, match="outside"):
    tok.decode([-1])


def test_gemma_like_model_appends_missing_specials(tmp_path):
  # Like Gemma: some modality tokens exist (one user-defined, one control),
  # others do not, plus an unrelated user-defined piece.
  path = _train_tiny(
      tmp_path, "gemma_like.model",
      user_defined_symbols=["<start_of_turn>", "<end_of_turn>", "<start_of_image>"],
      control_symbols=["<end_of_image>"])
  raw = spm.SentencePieceProcessor(model_file=str(path))
  n = raw.GetPieceSize()
  tok = Tokenizer.from_file(path)
  assert tok.sp_vocab_size == n
  assert tok.special_id("<start_of_image>") == raw.PieceToId("<start_of_image>") < n
  assert tok.special_id("<end_of_image>") == raw.PieceToId("<end_of_image>") < n
  missing = [s for s in SPECIAL_TOKENS if s not in ("<start_of_image>", "<end_of_image>")]
  assert missing[0] == "<soft_token>"  # So Gemma 3 gets 262144, HF's <image_soft_token>.
  assert [tok.special_id(s) for s in missing] == list(range(n, n + len(missing)))
  assert tok.vocab_size == n + len(missing)

  # No special id is ever produced from text, whatever its kind.
  text = " ".join(SPECIAL_TOKENS) + " hello <start_of_turn>"
  ids = tok.encode(text)
  assert set(tok.special_ids.values()).isdisjoint(ids)
  assert tok.decode(ids) == text
  # Non-modality user-defined pieces behave as sentencepiece makes them.
  assert raw.PieceToId("<start_of_turn>") in ids

  # Appended and control ids decode to their names, mixed with text.
  soft, eoi = tok.special_id("<soft_token>"), tok.special_id("<end_of_image>")
  assert tok.decode(tok.encode("hi") + [soft, eoi] + tok.encode(" 42")) == (
      "hi<soft_token><end_of_image> 42")
  assert tok.id_to_piece(soft) == "<soft_token>"
  with pytest.raises(ValueError, match="outside"):
    tok.decode([tok.vocab_size])

  # Pickling keeps the appended ids.
  again = pickle.loads(pickle.dumps(tok))
  assert again.special_ids == tok.special_ids and again.vocab_size == tok.vocab_size


def test_escape_with_dummy_prefix_model(tmp_path):
  # Models with add_dummy_prefix (sentencepiece's default) need the
  # per-character spelling of a special name found in text.
  path = _train_tiny(tmp_path, "dummy.model", add_dummy_prefix=True,
                     user_defined_symbols=list(SPECIAL_TOKENS))
  tok = Tokenizer.from_file(path)
  text = "x<start_of_image>y<timestamp>"
  ids = tok.encode(text)
  assert set(tok.special_ids.values()).isdisjoint(ids)
  assert tok.decode(ids) == text


def test_custom_special_tokens(tmp_path):
  path = _train_tiny(tmp_path, "custom.model")
  tok = Tokenizer.from_file(path, special_tokens=["<a>", "<b>"])
  assert tok.special_ids == {"<a>": tok.sp_vocab_size, "<b>": tok.sp_vocab_size + 1}
  with pytest.raises(ValueError, match="duplicates"):
    Tokenizer.from_file(path, special_tokens=["<a>", "<a>"])


# --- errors -------------------------------------------------------------------


def test_missing_file_error_says_how_to_get_one(tmp_path):
  missing = tmp_path / "nope" / "tokenizer.model"
  with pytest.raises(FileNotFoundError, match="train_tokenizer") as info:
    Tokenizer.from_file(missing)
  assert str(missing) in str(info.value)


def test_not_a_model_error(tmp_path):
  path = tmp_path / "junk.model"
  path.write_bytes(b"\x08\x96\x01 definitely not a proto" * 10)
  with pytest.raises(ValueError, match="not a sentencepiece model"):
    Tokenizer.from_file(path)


def test_wrong_special_ids_error(tmp_path):
  # Sentencepiece's own defaults: unk=0, bos=1, eos=2, no pad.
  path = _train_tiny(tmp_path, "default_ids.model", pad_id=-1, unk_id=0, bos_id=1, eos_id=2,
                     pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>")
  with pytest.raises(ValueError) as info:
    Tokenizer.from_file(path)
  msg = str(info.value)
  for part in ["pad_id=-1 (expected 0)", "eos_id=2 (expected 1)", "bos_id=1 (expected 2)",
               "unk_id=0 (expected 3)", str(path)]:
    assert part in msg


# --- pickling -----------------------------------------------------------------


def test_pickle_round_trip(tok):
  again = pickle.loads(pickle.dumps(tok))
  assert again is not tok
  assert again.vocab_size == tok.vocab_size and again.special_ids == tok.special_ids
  assert again.encode_batch(_TEXTS) == tok.encode_batch(_TEXTS)
  assert again.decode(tok.encode(_TEXTS[3])) == _TEXTS[3]
  assert len(pickle.dumps(tok)) < 1.1 * tokenizer_lib.DEFAULT_MODEL_PATH.stat().st_size + 1000


# --- training -----------------------------------------------------------------


def test_texts_from_source():
  source = (
      '"""Module doc.\n\nSecond paragraph."""\n'
      "# A comment\n# that continues.\n"
      "x = 1  # trailing\n"
      "if True:\n"
      "  @staticmethod\n"
      "  def f(a):\n"
      "    '''F doc.'''\n"
      "    return a  # why\n")
  texts = train_tokenizer.texts_from_source(source)
  assert texts[:3] == ["Module doc.", "Second paragraph.", "F doc."]
  assert "A comment\nthat continues." in texts
  assert texts[-1] == "@staticmethod\ndef f(a):\n  '''F doc.'''\n  return a  # why"
  assert "x = 1" not in "".join(train_tokenizer.texts_from_source(source, include_code=False))


def test_stdlib_files_are_sorted_and_skip_third_party():
  files = train_tokenizer.stdlib_files()
  root = sysconfig.get_paths()["stdlib"]
  rel = [f.relative_to(root).as_posix() for f in files]
  assert rel == sorted(rel) and len(rel) > 100
  assert not any("site-packages/" in r or "/test/" in r or r.startswith("test/") for r in rel)
  assert "os.py" in rel


def test_training_is_deterministic(tmp_path):
  # Same command twice on a slice of the stdlib: byte-identical models.
  outs = [tmp_path / "a.model", tmp_path / "b.model"]
  for out in outs:
    train_tokenizer.main([f"--out={out}", "--vocab_size=700", "--max_files=25"])
  assert outs[0].read_bytes() == outs[1].read_bytes()
  tok = Tokenizer.from_file(outs[0])
  assert tok.vocab_size == 700
  assert [tok.special_id(n) for n in SPECIAL_TOKENS] == list(range(4, 4 + len(SPECIAL_TOKENS)))
  assert tok.decode(tok.encode(_TEXTS[1])) == _TEXTS[1]
  # A different corpus gives a different model (the comparison can fail).
  other = train_tokenizer.train(train_tokenizer.stdlib_corpus(max_files=12), vocab_size=700)
  assert other != outs[0].read_bytes()


def test_train_rejects_tiny_vocab():
  with pytest.raises(ValueError, match="vocab_size=100"):
    train_tokenizer.train(["a b c"], vocab_size=100)


# --- tokenizer.json (HFTokenizer) ---------------------------------------------


def _gemma_like_json(*, media=("<start_of_image>", "<end_of_image>", "<image_soft_token>"),
                     frame="<bos> $A <eos>"):
  """A small tokenizer.json in Gemma's conventions (words "w4".."w49", pad/eos/bos/unk = 0..3), its
  post-processor framing every text with `frame`, and `media` as added special tokens."""
  from tokenizers import Tokenizer as TK  # pylint: disable=g-import-not-at-top
  from tokenizers import AddedToken, models, pre_tokenizers, processors  # pylint: disable=g-import-not-at-top
  vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, 50)}}
  tk = TK(models.WordLevel(vocab, unk_token="<unk>"))
  tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<pad>", "<eos>", "<bos>")])
  if frame:
    tk.post_processor = processors.TemplateProcessing(single=frame, special_tokens=[("<bos>", 2), ("<eos>", 1)])
  tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in media])
  return tk


def test_hf_tokenizer_frames_and_special_tokens_follow_the_file(tmp_path):
  tk = _gemma_like_json()
  (tmp_path / "tokenizer.json").write_text(tk.to_str())
  tok = Tokenizer.from_file(tmp_path / "tokenizer.json")
  assert isinstance(tok, tokenizer_lib.HFTokenizer) and tok.kind == "tokenizers"
  assert (tok.prefix_ids, tok.suffix_ids) == ((2,), (1,))
  assert (tok.vocab_size, tok.base_vocab_size) == (53, 50)
  text = "w5 w6 w7 w99"
  assert tok.encode(text) == tk.encode(text, add_special_tokens=False).ids == [5, 6, 7, 3]
  assert tok.encode(text, add_bos=True, add_eos=True) == tk.encode(text).ids == [2, 5, 6, 7, 3, 1]
  assert tok.encode(text, add_bos=True, add_eos=True, max_length=4) == [2, 5, 6, 1]  # the frame survives
  assert tok.encode_batch([text, "w4"], add_bos=True) == [[2, 5, 6, 7, 3], [2, 4]]
  # <soft_token> is Gemma 3's <image_soft_token>; a tokenizer without audio tokens says so.
  assert tok.special_id(tokenizer_lib.SOFT_TOKEN) == 52 and tok.special_id("<start_of_image>") == 50
  assert set(tok.special_tokens) == {"<soft_token>", "<start_of_image>", "<end_of_image>"}
  with pytest.raises(KeyError, match="no '<start_of_audio>' token"):
    tok.special_id("<start_of_audio>")
  # The file's decoder (none here: tokens joined by spaces); the frame ids vanish.
  assert tok.decode([2, 50, 52, 51, 5, 1]) == "<start_of_image> <image_soft_token> <end_of_image> w5"
  back = pickle.loads(pickle.dumps(tok))
  assert back.encode(text, add_bos=True) == tok.encode(text, add_bos=True) and back.source == tok.source
  # Special tokens in user text: matched, as transformers does, unless split_special_tokens is set.
  assert tok.encode("w5 <start_of_image>") == [5, 50]
  (tmp_path / "tokenizer_config.json").write_text('{"split_special_tokens": true}')
  assert Tokenizer.from_file(tmp_path / "tokenizer.json").encode("w5 <start_of_image>") == [5, 3]
  (tmp_path / "tokenizer_config.json").write_text('{"truncation_side": "left"}')
  with pytest.raises(ValueError, match="truncation_side='left'"):
    Tokenizer.from_file(tmp_path / "tokenizer.json")
  # Any fixed frame works: none at all, or bos only (a Gemma LM's tokenizer).
  for frame, want in ((None, ((), ())), ("<bos> $A", ((2,), ()))):
    t = tokenizer_lib.HFTokenizer(_gemma_like_json(frame=frame).to_str())
    assert (t.prefix_ids, t.suffix_ids) == want
  with pytest.raises(ValueError, match="not a tokenizers tokenizer.json"):
    tokenizer_lib.HFTokenizer("{}")


def test_encoder_with_a_tokenizer_without_audio_tokens_embeds_text_and_images_only(tmp_path):
  from embed2.data import interleave, segments  # pylint: disable=g-import-not-at-top
  from embed2.model import ModelConfig  # pylint: disable=g-import-not-at-top
  tok = tokenizer_lib.HFTokenizer(_gemma_like_json().to_str(), source="gemma3/tokenizer.json")
  cfg = ModelConfig.from_dict(dict(preset="tiny", vocab_size=64, media=dict(
      image_frontend="patch", audio_frontend="conv", image_size=16, patch_size=8, image_tokens=4)))
  enc = interleave.InputEncoder(tok, cfg)
  assert enc.encode("w5 w6", max_length=8).tokens.tolist() == [2, 5, 6, 1]
  e = enc.encode([segments.Image(pixels=np.full((16, 16, 3), 7, np.uint8)), "w9"], max_length=16)
  assert e.tokens.tolist() == [2, 50, 52, 52, 52, 52, 51, 9, 1] and e.media[0].offset == 2
  with pytest.raises(segments.MissingFrontendError,
                     match=r"inputs\[3\]: the tokenizer \(gemma3/tokenizer.json\) has no <start_of_audio>"):
    enc.encode(segments.Audio(samples=np.ones(1600), sample_rate=16000), max_length=64, where="inputs[3]")


def test_sentencepiece_model_as_tokenizer_json_tokenizes_the_same(tok, rng):
  """The export's conversion (sentencepiece -> tokenizer.json) gives the same ids, framing included."""
  text, config = tokenizer_lib.sentencepiece_to_hf(tok, model_max_length=77)
  assert config["split_special_tokens"] and config["model_max_length"] == 77
  hf = tokenizer_lib.HFTokenizer(text, split_special_tokens=True)
  assert hf.special_ids == tok.special_ids and (hf.prefix_ids, hf.suffix_ids) == ((2,), (1,))
  source = "".join(p.read_text(encoding="utf-8") for p in sorted(train_tokenizer.stdlib_files())[:20])
  texts = list(_TEXTS)
  for _ in range(300):  # stdlib snippets, cut anywhere
    a = int(rng.integers(0, len(source) - 300))
    texts.append(source[a:a + int(rng.integers(1, 300))])
  pieces = list("ab <>_/\n\t  ▁é世🦜12") + list(SPECIAL_TOKENS) + ["<bos>", "<eos>", "<pad>", "<unk>", "<<"]
  texts += ["".join(rng.choice(pieces, int(rng.integers(0, 20)))) for _ in range(500)]
  for _ in range(200):
    cps = rng.integers(1, 0x30000, size=int(rng.integers(1, 30)))
    texts.append("".join(chr(c) for c in cps if not 0xD800 <= c <= 0xDFFF))
  for t in texts:
    assert hf.encode(t, add_bos=True, add_eos=True) == tok.encode(t, add_bos=True, add_eos=True), t
  assert hf.decode(hf.encode("Grüße 世界 🦜 <bos>")) == "Grüße 世界 🦜 <bos>"


def test_sentencepiece_models_a_tokenizer_json_cannot_reproduce_are_refused(tmp_path):
  path = _train_tiny(tmp_path, "dummy.model", add_dummy_prefix=True)
  with pytest.raises(ValueError, match="add_dummy_prefix=true"):
    tokenizer_lib.sentencepiece_to_hf(Tokenizer.from_file(path))


# --- text that is not valid Unicode -------------------------------------------


def test_lone_surrogates_are_refused_naming_the_text_and_position(tok):
  """One policy (`check_text`): a lone surrogate is invalid Unicode, refused with its position."""
  with pytest.raises(tokenizer_lib.InvalidTextError, match=r"text: character 4 is a lone surrogate \(U\+D800\)"):
    tok.encode("abc \ud800")
  with pytest.raises(ValueError, match=r"texts\[1\]: character 0 .*U\+DC80"):
    tok.encode_batch(["fine", "\udc80x"])
  hf = tokenizer_lib.HFTokenizer(_gemma_like_json().to_str())
  with pytest.raises(ValueError, match=r"text: character 3 is a lone surrogate \(U\+DFFF\)"):
    hf.encode("w5 \udfff")
  tokenizer_lib.check_text("déjà vu 🦜 \U0010ffff", "ok")  # valid text, astral planes included
  with pytest.raises(ValueError, match=r"where: character 2 "):
    tokenizer_lib.check_text("ab\ud83d\ude00"[:3], "where")  # half of a surrogate pair


def test_a_record_with_a_lone_surrogate_is_skipped_and_counted(tok):
  """In training such a record is an unreadable one: skipped and counted in num_skipped, never a
  crash of the input pipeline."""
  from embed2.data import pipeline  # pylint: disable=g-import-not-at-top
  examples = [{"query": f"read file {i}" + (" \ud800" if i % 10 == 3 else ""),
               "positive": f"open the file number {i}" + (" \udfff" if i % 10 == 7 else ""),
               "query_id": i, "positive_id": i} for i in range(40)]
  task = pipeline.TaskSpec(name="txt", examples=examples, task_string="find: ",
                           batch=pipeline.BatchSpec(batch_size=8, query_len=16, positive_len=16,
                                                    segments=4))
  it = pipeline.build_ft_iterator([task], tokenizer=tok, num_groups=2, seed=0)
  seen = skipped = 0
  ids = set()
  for _ in range(10):
    b = next(it)
    seen += int(b["num_examples"])
    skipped += int(b["num_skipped"])
    ids |= {int(q) for q, ok in zip(b["query_ids"], b["example_valid"]) if ok}
  assert ids == {i for i in range(40) if i % 10 not in (3, 7)}  # every good record, no bad one
  assert skipped > 0 and seen > 0


def test_a_manifest_caption_with_a_lone_surrogate_names_file_and_line(tmp_path):
  from data_pipelines import media_datasets  # pylint: disable=g-import-not-at-top
  root = tmp_path / "mscoco"
  root.mkdir()
  for name in ("a.png", "b.png"):
    (root / name).write_bytes(b"")  # only their existence is checked here
  # json.dumps writes the lone surrogate as the escape \ud800, as a broken exporter would.
  lines = [{"image": "a.png", "captions": ["a cat"]}, {"image": "b.png", "captions": ["ok", "dog \ud800"]}]
  (root / "test.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
  with pytest.raises(ValueError, match=r"test\.jsonl:2 'captions'\[1\]: character 4 is a lone surrogate"):
    media_datasets.coco_captions("test", root=root, layout="manifest")
