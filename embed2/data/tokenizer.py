"""Tokenizers: text <-> token ids, the framing of a sequence, and modality tokens.

`Tokenizer` is the interface the data pipeline, `InputEncoder` and `Embedder` use; two kinds
implement it, and `Tokenizer.from_file(path)` picks one by the file:

- `SentencePieceTokenizer` (a `tokenizer.model`): the small model shipped in `embed2/assets/`
  (trained by `python -m embed2.data.train_tokenizer`) or a real Gemma one. Gemma's id conventions
  (pad=0, eos=1, bos=2, unk=3, checked at load time) and byte fallback, so no text maps to unk.
  Every sequence is framed as [bos] ids [eos].
- `HFTokenizer` (a Hugging Face `tokenizer.json`, through the `tokenizers` library): the tokenizer
  of a model imported by `embed2.convert`, which writes the file the way `transformers` resolves
  the source folder's tokenizer. Its ids are the `tokenizers` library's, and a sequence is framed
  the way its post-processor frames one (EmbeddingGemma: <bos> ... <eos>), so its ids equal
  `AutoTokenizer(text)["input_ids"]`, truncation included.

Special tokens (`SPECIAL_TOKENS`) mark modality boundaries in a packed sequence:

- sentencepiece: a token the model holds (as a user-defined or control piece, e.g. Gemma's
  `<start_of_image>` = 255999) keeps its id; one it lacks gets an id appended after the
  sentencepiece vocab, in `SPECIAL_TOKENS` order, and `vocab_size` grows to cover it.
  `<soft_token>` comes first in that order, so on Gemma 3 (262144 pieces, no soft token) it gets
  262144, the id of the HF processor's `<image_soft_token>`. Special tokens are inserted by id
  (`special_id`) by the data pipeline, never parsed from user text: `encode("<start_of_image>")`
  spells the string with ordinary pieces, even when the model holds it as a user-defined piece
  that sentencepiece alone would match. A document cannot forge a modality boundary. `decode`
  renders every special id as its name.
- tokenizer.json: a special token is the vocabulary entry of that name (`<soft_token>` may also be
  Gemma 3's `<image_soft_token>`); nothing is appended. A vocabulary with BERT's reserved slots
  (`[unused0]`, `[unused1]`, ...) gives the tokens it lacks the first free ones, in `SPECIAL_TOKENS`
  order (all-MiniLM-L6-v2: `<soft_token>` = `[unused0]` = 1, ..., `<timestamp>` = `[unused7]` = 8);
  BERT's pre-tokenizer splits "[unused0]" in user text at the brackets, so text cannot forge them. A tokenizer without a modality's tokens
  embeds text; `special_id` of a missing one raises KeyError (the encoder turns it into a clear
  error naming the input). User text is tokenized exactly as `transformers` does it, added tokens
  included (unless the folder's tokenizer_config.json sets `split_special_tokens`).

Text must be valid Unicode: a lone surrogate ("abc \\ud800", or `\\ud800` in a JSON file) is refused
by `check_text` with an `InvalidTextError` (a ValueError) naming the input and the character
position; every place text enters (tokenizers, `Embedder`, the training pipeline, manifest
readers) calls it. The training pipeline counts and skips such a record like an undecodable one.

A tokenizer pickles as its serialized model, so grain worker processes can receive transforms that
hold one.
"""
import collections.abc
import json
import os
import pathlib
import re
from typing import Any

import sentencepiece as spm
import tokenizers
from etils import epath
from sentencepiece import sentencepiece_model_pb2

PAD_ID = 0
EOS_ID = 1
BOS_ID = 2
UNK_ID = 3

SOFT_TOKEN = "<soft_token>"
START_OF_IMAGE = "<start_of_image>"
END_OF_IMAGE = "<end_of_image>"
START_OF_AUDIO = "<start_of_audio>"
END_OF_AUDIO = "<end_of_audio>"
START_OF_VIDEO = "<start_of_video>"
END_OF_VIDEO = "<end_of_video>"
TIMESTAMP = "<timestamp>"
# Order matters twice: the shipped model reserves them as ids 4, 5, ... in this
# order, and tokens missing from a model are appended in this order.
SPECIAL_TOKENS = (
    SOFT_TOKEN,
    START_OF_IMAGE,
    END_OF_IMAGE,
    START_OF_AUDIO,
    END_OF_AUDIO,
    START_OF_VIDEO,
    END_OF_VIDEO,
    TIMESTAMP,
)

# The small offline tokenizer that ships with the package.
DEFAULT_MODEL_PATH = pathlib.Path(__file__).resolve().parent.parent / "assets" / "tokenizer.model"
_HOW_TO_GET = (
    "Train the small offline one with `python -m embed2.data.train_tokenizer "
    "--out=embed2/assets/tokenizer.model`, or download Gemma's tokenizer.model "
    "(e.g. from the google/gemma-3-1b-pt repository on Hugging Face or Kaggle) "
    "and pass its path.")


class InvalidTextError(ValueError):
  """Text that is not valid Unicode (it holds a lone surrogate); the message names the input and the
  character position."""


def check_text(text: str, where: str) -> None:
  """Refuses text that is not valid Unicode: a lone surrogate (U+D800..U+DFFF), which no UTF-8
  encoder, sentencepiece or `tokenizers` accepts.

  Args:
    text: the text.
    where: names the input in the error (e.g. "inputs[3]", "captions.jsonl:17").

  Raises:
    InvalidTextError: at the first lone surrogate, with its character position.
  """
  if text.isascii():
    return
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    raise InvalidTextError(
        f"{where}: character {e.start} is a lone surrogate (U+{ord(text[e.start]):04X}), which is not "
        "valid Unicode; fix the text at its source (bytes decoded with errors='surrogateescape', or "
        "a JSON \\ud800 escape), e.g. decode with errors='replace'") from None


class Tokenizer:
  """The tokenizer interface, and the factories `Tokenizer.from_file(path)` / `Tokenizer.default()`.

  Implemented by `SentencePieceTokenizer` (a tokenizer.model) and `HFTokenizer` (a tokenizer.json).
  Every implementation has:
    kind: "sentencepiece" or "tokenizers".
    source: the file it was loaded from.
    vocab_size: ids are in [0, vocab_size).
    base_vocab_size: the ids a model for this tokenizer must have rows for before any input is
      seen (a Gemma 3 tokenizer.json adds `<image_soft_token>` past the text model's 262144 rows;
      `Embedder` checks each input's ids against the model instead).
    prefix_ids, suffix_ids: the ids that frame every sequence (add_bos / add_eos put them there).
    special_tokens, special_ids, special_id(name): the modality tokens this tokenizer holds.
    encode(text, add_bos=, add_eos=, max_length=), encode_batch(texts, ...), decode(ids),
    id_to_piece(id).
  """

  kind = ""
  _source = "<none>"

  @classmethod
  def from_file(
      cls,
      path: str | os.PathLike[str],
      *,
      special_tokens: collections.abc.Sequence[str] = SPECIAL_TOKENS,
  ) -> "Tokenizer":
    """A `tokenizer.json` (-> HFTokenizer) or a sentencepiece `tokenizer.model` (-> SentencePieceTokenizer).

    Raises:
      FileNotFoundError: no file at `path` (the message says how to get one).
      ValueError: not a tokenizer of that kind, or one embed2 cannot use (the message says why).
    """
    if cls is Tokenizer and pathlib.Path(path).name.endswith(".json"):
      return HFTokenizer.from_file(path, special_tokens=special_tokens)
    return SentencePieceTokenizer.from_file(path, special_tokens=special_tokens)

  @classmethod
  def default(cls) -> "SentencePieceTokenizer":
    """The small tokenizer shipped in `embed2/assets/tokenizer.model`."""
    return SentencePieceTokenizer.default()

  @property
  def source(self) -> str:
    return self._source

  # --- shared by the implementations ------------------------------------------

  @property
  def prefix_ids(self) -> tuple[int, ...]:
    raise NotImplementedError

  @property
  def suffix_ids(self) -> tuple[int, ...]:
    raise NotImplementedError

  def _raw_encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def _raw_encode_batch(self, texts: list[str], num_threads: int | None) -> list[list[int]]:
    return [self._raw_encode(t) for t in texts]

  def encode(
      self,
      text: str,
      *,
      add_bos: bool = False,
      add_eos: bool = False,
      max_length: int | None = None,
  ) -> list[int]:
    """Text -> ids.

    Args:
      text: any valid unicode string (see `check_text`).
      add_bos: put `prefix_ids` in front (sentencepiece: bos_id).
      add_eos: put `suffix_ids` at the end (sentencepiece: eos_id).
      max_length: keep at most this many ids in all. The text is truncated
        first, so the frame survives whenever max_length leaves room for it.

    Returns:
      A list of ints in [0, vocab_size).

    Raises:
      TypeError: text is not a str.
      InvalidTextError: text holds a lone surrogate.
    """
    if not isinstance(text, str):
      raise TypeError(f"text must be str, got {type(text).__name__}.")
    check_text(text, "text")
    return self._finish(self._raw_encode(text), add_bos, add_eos, max_length)

  def encode_batch(
      self,
      texts: collections.abc.Sequence[str],
      *,
      add_bos: bool = False,
      add_eos: bool = False,
      max_length: int | None = None,
      num_threads: int | None = None,
  ) -> list[list[int]]:
    """Encodes many texts in one multithreaded call.

    Args:
      texts: unicode strings.
      add_bos, add_eos, max_length: as in `encode`, applied to each text.
      num_threads: sentencepiece threads; None lets it pick (all cores). `tokenizers` uses its own
        thread pool (RAYON_NUM_THREADS).

    Returns:
      One list of ids per text, equal to `encode` of that text.
    """
    texts = list(texts)
    for i, text in enumerate(texts):
      if not isinstance(text, str):
        raise TypeError(f"texts[{i}] must be str, got {type(text).__name__}.")
      check_text(text, f"texts[{i}]")
    if not texts:
      return []
    ids_batch = self._raw_encode_batch(texts, num_threads)
    return [self._finish(ids, add_bos, add_eos, max_length) for ids in ids_batch]

  def _finish(
      self, ids: list[int], add_bos: bool, add_eos: bool, max_length: int | None
  ) -> list[int]:
    """Adds the frame and truncates (the text first)."""
    if max_length is not None and max_length < 1:
      raise ValueError(f"max_length={max_length} must be >= 1 (or None for no limit).")
    head = list(self.prefix_ids) if add_bos else []
    tail = list(self.suffix_ids) if add_eos else []
    if max_length is not None:
      ids = ids[:max(max_length - len(head) - len(tail), 0)]
    ids = head + ids + tail
    return ids if max_length is None else ids[:max_length]

  def _check_ids(self, ids: list[int]) -> None:
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise ValueError(
          f"ids {bad[:5]} are outside [0, vocab_size={self.vocab_size}) of {self._source}.")


def framing(tokenizer, *, add_bos: bool = True, add_eos: bool = True
            ) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(prefix ids, suffix ids) that frame a sequence, [bos] + ids + [eos]: the tokenizer's own, or
  Gemma's (bos,) / (eos,) for a minimal tokenizer that has only `encode(text)` (tests, benchmarks).
  add_bos / add_eos False leave that end unframed (empty)."""
  head = tuple(getattr(tokenizer, "prefix_ids", (BOS_ID,))) if add_bos else ()
  tail = tuple(getattr(tokenizer, "suffix_ids", (EOS_ID,))) if add_eos else ()
  return head, tail


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece `tokenizer.model`, with Gemma conventions and modality special tokens.

  Build with `Tokenizer.from_file(path)` or `Tokenizer.default()`.
  """

  kind = "sentencepiece"

  def __init__(
      self,
      model_proto: bytes,
      *,
      special_tokens: collections.abc.Sequence[str] = SPECIAL_TOKENS,
      source: str = "<bytes>",
  ):
    """Loads a serialized sentencepiece ModelProto.

    Args:
      model_proto: the bytes of a `tokenizer.model` file.
      special_tokens: names of the modality tokens; see the module docstring.
      source: where the bytes came from, for error messages and repr.

    Raises:
      ValueError: the bytes are not a sentencepiece model, or its pad / eos /
        bos / unk ids are not 0 / 1 / 2 / 3.
    """
    self._init(bytes(model_proto), tuple(special_tokens), source)

  def _init(self, model_proto: bytes, special_tokens: tuple[str, ...], source: str) -> None:
    if len(set(special_tokens)) != len(special_tokens):
      raise ValueError(f"special_tokens={special_tokens} has duplicates; names must be unique.")
    sp = spm.SentencePieceProcessor()
    try:
      sp.LoadFromSerializedProto(model_proto)
    except RuntimeError as e:
      raise ValueError(
          f"{source} is not a sentencepiece model ({e}). {_HOW_TO_GET}") from e
    got = {"pad_id": sp.pad_id(), "eos_id": sp.eos_id(), "bos_id": sp.bos_id(),
           "unk_id": sp.unk_id()}
    want = {"pad_id": PAD_ID, "eos_id": EOS_ID, "bos_id": BOS_ID, "unk_id": UNK_ID}
    wrong = [f"{k}={got[k]} (expected {want[k]})" for k in want if got[k] != want[k]]
    if wrong:
      raise ValueError(
          f"{source} does not follow Gemma's id conventions: {', '.join(wrong)} "
          "(-1 means the model has no such piece). Retrain it with pad_id=0 "
          "eos_id=1 bos_id=2 unk_id=3 (see embed2/data/train_tokenizer.py).")

    self._proto = model_proto
    self._sp = sp
    self._source = source
    self._special_tokens = special_tokens
    self._sp_size = sp.GetPieceSize()

    special_ids = {}
    appended = []
    for name in special_tokens:
      piece_id = sp.PieceToId(name)
      if piece_id != UNK_ID and sp.IdToPiece(piece_id) == name:
        special_ids[name] = piece_id
      else:
        special_ids[name] = self._sp_size + len(appended)
        appended.append(name)
    self._special_ids = special_ids
    self._appended = tuple(appended)
    self._special_names = {i: name for name, i in special_ids.items()}

    # Sentencepiece matches user-defined pieces in raw text; those ids are
    # re-spelled after encoding. (Control pieces and appended ids never come
    # out of sentencepiece; their entries are never used.)
    self._escapes = {
        i: self._spell(name) for i, name in self._special_names.items() if i < self._sp_size}

  def _spell(self, name: str) -> list[int]:
    """Ids spelling `name` without producing any special id."""
    specials = set(self._special_names)
    candidate = self._sp.EncodeAsIds(name[:1]) + self._sp.EncodeAsIds(name[1:])
    if self._sp.DecodeIds(candidate) == name and specials.isdisjoint(candidate):
      return candidate
    # Models with a dummy prefix would decode the second half with a leading
    # space; fall back to one piece (or byte pieces) per character.
    ids = []
    for ch in name:
      piece_id = self._sp.PieceToId(ch)
      if piece_id == UNK_ID or piece_id in specials:
        ids.extend(self._sp.PieceToId(f"<0x{b:02X}>") for b in ch.encode("utf-8"))
      else:
        ids.append(piece_id)
    return ids

  # --- construction ---------------------------------------------------------

  @classmethod
  def from_file(
      cls,
      path: str | os.PathLike[str],
      *,
      special_tokens: collections.abc.Sequence[str] = SPECIAL_TOKENS,
  ) -> "Tokenizer":
    """Loads a `tokenizer.model` file (the shipped one or Gemma's).

    Raises:
      FileNotFoundError: no file at `path` (the message says how to get one).
      ValueError: not a sentencepiece model, or wrong pad/eos/bos/unk ids.
    """
    path = epath.Path(path)  # local, or in a gs:// / s3:// checkpoint folder
    if not path.is_file():
      raise FileNotFoundError(f"No tokenizer model at {str(path)!r}. {_HOW_TO_GET}")
    return cls(path.read_bytes(), special_tokens=special_tokens, source=str(path))

  @classmethod
  def default(cls) -> "SentencePieceTokenizer":
    """The small tokenizer shipped in `embed2/assets/tokenizer.model`."""
    # A plain path rather than importlib.resources: `embed2` may be a namespace
    # package, which importlib.resources.files() rejects on Python 3.11.
    path = DEFAULT_MODEL_PATH
    if not path.is_file():
      raise FileNotFoundError(f"The packaged tokenizer {str(path)!r} is missing. {_HOW_TO_GET}")
    return cls(path.read_bytes(), source=str(path))

  # --- pickling (grain workers) ---------------------------------------------

  def __getstate__(self) -> dict[str, Any]:
    return {"model_proto": self._proto, "special_tokens": self._special_tokens,
            "source": self._source}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self._init(state["model_proto"], tuple(state["special_tokens"]), state["source"])

  def __repr__(self) -> str:
    return f"SentencePieceTokenizer({self._source!r}, vocab_size={self.vocab_size})"

  # --- vocabulary -----------------------------------------------------------

  @property
  def vocab_size(self) -> int:
    """Ids are in [0, vocab_size): sentencepiece pieces + appended specials."""
    return self._sp_size + len(self._appended)

  @property
  def base_vocab_size(self) -> int:
    """The appended specials are inserted by the pipeline: a model needs rows for all of them."""
    return self.vocab_size

  @property
  def prefix_ids(self) -> tuple[int, ...]:
    return (BOS_ID,)

  @property
  def suffix_ids(self) -> tuple[int, ...]:
    return (EOS_ID,)

  @property
  def sp_vocab_size(self) -> int:
    """Pieces in the sentencepiece model alone (no appended specials)."""
    return self._sp_size

  @property
  def pad_id(self) -> int:
    return PAD_ID

  @property
  def eos_id(self) -> int:
    return EOS_ID

  @property
  def bos_id(self) -> int:
    return BOS_ID

  @property
  def unk_id(self) -> int:
    return UNK_ID

  @property
  def special_tokens(self) -> tuple[str, ...]:
    return self._special_tokens

  @property
  def special_ids(self) -> dict[str, int]:
    """Name -> id for every special token (a copy)."""
    return dict(self._special_ids)

  def special_id(self, name: str) -> int:
    """The id of a special token, e.g. `special_id(START_OF_IMAGE)`."""
    try:
      return self._special_ids[name]
    except KeyError:
      raise KeyError(
          f"{name!r} is not a special token of this tokenizer; known: "
          f"{list(self._special_tokens)}. Pass special_tokens=... when loading "
          "to add one.") from None

  def id_to_piece(self, token_id: int) -> str:
    """The piece string of one id (special ids give their names)."""
    self._check_ids([token_id])
    if token_id in self._special_names:
      return self._special_names[token_id]
    return self._sp.IdToPiece(token_id)

  # --- encode / decode ------------------------------------------------------

  def _raw_encode(self, text: str) -> list[int]:
    return self._respell(self._sp.EncodeAsIds(text))

  def _raw_encode_batch(self, texts: list[str], num_threads: int | None) -> list[list[int]]:
    kwargs = {} if num_threads is None else {"num_threads": num_threads}
    return [self._respell(ids) for ids in self._sp.Encode(texts, out_type=int, **kwargs)]

  def _respell(self, ids: list[int]) -> list[int]:
    """Re-spells special ids that sentencepiece matched in text (see the module docstring)."""
    if self._escapes and not self._escapes.keys().isdisjoint(ids):
      spelled = []
      for i in ids:
        spelled.extend(self._escapes.get(i, (i,)))
      ids = spelled
    return ids

  def decode(self, ids: collections.abc.Iterable[int]) -> str:
    """Ids -> text. pad/bos/eos vanish; special ids render as their names.

    Args:
      ids: ints in [0, vocab_size); a list or a 1-D integer numpy array.

    Returns:
      The text; `decode(encode(t)) == t` for every string t.
    """
    ids = [int(i) for i in ids]
    self._check_ids(ids)
    parts, run = [], []
    for i in ids:
      name = self._special_names.get(i)
      if name is None:
        run.append(i)
        continue
      if run:
        parts.append(self._sp.DecodeIds(run))
        run = []
      parts.append(name)
    if run:
      parts.append(self._sp.DecodeIds(run))
    return "".join(parts)


# ------------------------------------------------------------------------------- tokenizer.json

# Names a special token may have in a Hugging Face vocabulary besides its own.
_HF_ALIASES = {SOFT_TOKEN: (SOFT_TOKEN, "<image_soft_token>")}
# Reserved vocabulary entries (BERT's WordPiece vocabularies) that modality tokens may take.
_RESERVED_SLOT = "[unused{}]"
# Texts that decide a tokenizer.json's framing (prefix and suffix ids around any text).
_FRAMING_PROBES = ("a", "Hello world, 12 tokens.")


class HFTokenizer(Tokenizer):
  """A Hugging Face `tokenizer.json`, read with the `tokenizers` library.

  The ids are the library's for the file as written, plus the one setting `transformers` applies
  outside it: `split_special_tokens` from the tokenizer_config.json beside it (special tokens in
  user text are then spelled as text). A sequence is framed with what the post-processor puts
  around any text (`prefix_ids` / `suffix_ids`); truncation cuts the text and keeps the frame, as
  `transformers` does. `embed2.convert` writes the file the way `transformers` resolves the source
  folder (tokenizer classes may rebuild parts of it), so for an imported checkpoint the ids equal
  `AutoTokenizer.from_pretrained(source)(text)["input_ids"]`.

  Build with `Tokenizer.from_file("…/tokenizer.json")` or `HFTokenizer.from_str(json_text)`.
  """

  kind = "tokenizers"

  def __init__(self, tokenizer_json: str, *, split_special_tokens: bool = False,
               special_tokens: collections.abc.Sequence[str] = SPECIAL_TOKENS,
               source: str = "<str>"):
    """Loads a serialized tokenizer.json.

    Args:
      tokenizer_json: the file's text.
      split_special_tokens: spell special tokens in user text as text (transformers' setting).
      special_tokens: names of the modality tokens looked up in the vocabulary.
      source: where the text came from, for error messages and repr.

    Raises:
      ImportError: the `tokenizers` package is missing.
      ValueError: not a tokenizer.json, or a post-processor that does not frame every text the same.
    """
    self._init(tokenizer_json, bool(split_special_tokens), tuple(special_tokens), source)

  def _init(self, tokenizer_json: str, split_special_tokens: bool, special_tokens: tuple[str, ...],
            source: str) -> None:
    if len(set(special_tokens)) != len(special_tokens):
      raise ValueError(f"special_tokens={special_tokens} has duplicates; names must be unique.")
    try:
      tk = tokenizers.Tokenizer.from_str(tokenizer_json)
    except Exception as e:  # the library raises its own exception type for a bad file
      raise ValueError(f"{source} is not a tokenizers tokenizer.json ({e})") from None
    # Truncation and padding are the caller's (Tokenize / Embedder cut the text, keep the frame).
    tk.no_truncation()
    tk.no_padding()
    tk.encode_special_tokens = split_special_tokens
    self._json = tokenizer_json
    self._tk = tk
    self._source = source
    self._split_special_tokens = split_special_tokens
    self._special_tokens = special_tokens
    vocab = tk.get_vocab(with_added_tokens=True)
    self._vocab_size = max(vocab.values()) + 1 if vocab else 0
    self._base_vocab_size = tk.get_vocab_size(with_added_tokens=False)
    self._special_ids = {}
    for name in special_tokens:
      for alias in _HF_ALIASES.get(name, (name,)):
        i = tk.token_to_id(alias)
        if i is not None:
          self._special_ids[name] = i
          break
    slot = 0
    for name in special_tokens:  # the ones the vocabulary lacks take its reserved slots, if it has any
      if name in self._special_ids:
        continue
      while (i := tk.token_to_id(_RESERVED_SLOT.format(slot))) is not None and i in self._special_ids.values():
        slot += 1
      if i is None:
        break
      self._special_ids[name] = i
      slot += 1
    self._special_names = {i: name for name, i in self._special_ids.items()}
    self._prefix, self._suffix = self._find_framing()

  def _find_framing(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
    found = None
    for probe in _FRAMING_PROBES:
      plain = self._tk.encode(probe, add_special_tokens=False).ids
      full = self._tk.encode(probe, add_special_tokens=True).ids
      at = next((k for k in range(len(full) - len(plain) + 1) if full[k:k + len(plain)] == plain), None)
      if at is None or not plain:
        raise ValueError(f"{self._source}: its post-processor changes the text's own ids ({probe!r}: "
                         f"{plain} -> {full}); embed2 frames a sequence with fixed ids around the text")
      frame = (tuple(full[:at]), tuple(full[at + len(plain):]))
      if found is not None and frame != found:
        raise ValueError(f"{self._source}: its post-processor frames texts differently ({found} and "
                         f"{frame}); embed2 frames every sequence with the same ids")
      found = frame
    return found

  @classmethod
  def from_file(
      cls,
      path: str | os.PathLike[str],
      *,
      special_tokens: collections.abc.Sequence[str] = SPECIAL_TOKENS,
  ) -> "HFTokenizer":
    """Loads a tokenizer.json, with `split_special_tokens` from the tokenizer_config.json beside it.

    Raises:
      FileNotFoundError: no file at `path`.
      ImportError: the `tokenizers` package is missing.
      ValueError: not a tokenizer.json; a tokenizer_config.json asking for left truncation.
    """
    path = epath.Path(path)  # local, or in a gs:// / s3:// checkpoint folder
    if not path.is_file():
      raise FileNotFoundError(f"No tokenizer.json at {str(path)!r}.")
    split = False
    config_path = path.parent / "tokenizer_config.json"
    if config_path.is_file():
      try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
      except json.JSONDecodeError as e:
        raise ValueError(f"{config_path} is not valid JSON ({e})") from None
      split = bool(config.get("split_special_tokens", False))
      side = config.get("truncation_side", "right")
      if side != "right":
        raise ValueError(f"{config_path} has truncation_side={side!r}; embed2 cuts over-long inputs at "
                         "the end (truncation_side='right')")
    return cls(path.read_text(encoding="utf-8"), split_special_tokens=split,
               special_tokens=special_tokens, source=str(path))

  @classmethod
  def from_str(cls, tokenizer_json: str, **kwargs) -> "HFTokenizer":
    return cls(tokenizer_json, **kwargs)

  def __getstate__(self) -> dict[str, Any]:
    return {"json": self._json, "split_special_tokens": self._split_special_tokens,
            "special_tokens": self._special_tokens, "source": self._source}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self._init(state["json"], state["split_special_tokens"], tuple(state["special_tokens"]),
               state["source"])

  def __repr__(self) -> str:
    return f"HFTokenizer({self._source!r}, vocab_size={self.vocab_size})"

  # --- vocabulary -------------------------------------------------------------

  @property
  def backend(self):
    """The `tokenizers.Tokenizer` (truncation and padding off)."""
    return self._tk

  @property
  def vocab_size(self) -> int:
    return self._vocab_size

  @property
  def base_vocab_size(self) -> int:
    """The model's vocabulary without the added tokens (those are checked per input)."""
    return self._base_vocab_size

  @property
  def prefix_ids(self) -> tuple[int, ...]:
    return self._prefix

  @property
  def suffix_ids(self) -> tuple[int, ...]:
    return self._suffix

  @property
  def split_special_tokens(self) -> bool:
    return self._split_special_tokens

  @property
  def special_tokens(self) -> tuple[str, ...]:
    """The modality tokens this vocabulary holds (a subset of those asked for)."""
    return tuple(n for n in self._special_tokens if n in self._special_ids)

  @property
  def special_ids(self) -> dict[str, int]:
    return dict(self._special_ids)

  def special_id(self, name: str) -> int:
    try:
      return self._special_ids[name]
    except KeyError:
      raise KeyError(
          f"{self._source} has no {name!r} token (it holds {sorted(self._special_ids)}); this "
          "tokenizer cannot mark that modality in a sequence") from None

  def id_to_piece(self, token_id: int) -> str:
    self._check_ids([token_id])
    piece = self._tk.id_to_token(token_id)
    return piece if piece is not None else ""

  # --- encode / decode --------------------------------------------------------

  def _raw_encode(self, text: str) -> list[int]:
    return self._tk.encode(text, add_special_tokens=False).ids

  def _raw_encode_batch(self, texts: list[str], num_threads: int | None) -> list[list[int]]:
    return [e.ids for e in self._tk.encode_batch(texts, add_special_tokens=False)]

  def decode(self, ids: collections.abc.Iterable[int]) -> str:
    """Ids -> text (the tokenizer's decoder); the frame ids vanish, other special ids render as
    their names. Normalizers may lose information, so `decode(encode(t))` need not be t."""
    ids = [int(i) for i in ids]
    self._check_ids(ids)
    frame = set(self._prefix) | set(self._suffix)
    return self._tk.decode([i for i in ids if i not in frame], skip_special_tokens=False)


# -------------------------------------------------------------------- sentencepiece -> tokenizer.json


def sentencepiece_to_hf(tok: SentencePieceTokenizer, *, model_max_length: int | None = None
                        ) -> tuple[str, dict[str, Any]]:
  """The Hugging Face files of a sentencepiece tokenizer: (tokenizer.json text, tokenizer_config).

  The result tokenizes as `tok` does, framing included ([bos] text [eos]): BPE with the merges
  ranked by the score of the piece they make (sentencepiece's BPE merges the best-scoring pair,
  leftmost first), byte fallback, spaces as "▁", and modality-token names in user text spelled the
  way `SentencePieceTokenizer` spells them ("<" apart from the rest). Control tokens are special and
  `split_special_tokens` is set, so "<bos>" in user text is text, as in sentencepiece. Appended
  special tokens become added tokens with the same ids. `embed2.convert` checks the result against
  `tok` on probe texts before it writes an export.

  Raises:
    ValueError: a model this conversion does not reproduce (unigram, a normalization rule, a dummy
      prefix, collapsed whitespace, no byte fallback); the message names the setting.
  """
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(tok._proto)  # pylint: disable=protected-access
  ts, ns = proto.trainer_spec, proto.normalizer_spec
  problems = []
  if ts.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
    problems.append(f"model_type={sentencepiece_model_pb2.TrainerSpec.ModelType.Name(ts.model_type)}")
  if ns.name not in ("identity", "") or ns.precompiled_charsmap:
    problems.append(f"normalization rule {ns.name!r}")
  if ns.add_dummy_prefix:
    problems.append("add_dummy_prefix=true")
  if ns.remove_extra_whitespaces:
    problems.append("remove_extra_whitespaces=true")
  if not ns.escape_whitespaces or ts.treat_whitespace_as_suffix:
    problems.append("whitespace not escaped as a '▁' prefix")
  if not ts.byte_fallback:
    problems.append("byte_fallback=false")
  if problems:
    raise ValueError(f"{tok.source}: cannot be written as a tokenizer.json that tokenizes the same "
                     f"({', '.join(problems)}); embed2 converts Gemma-style BPE models")
  pieces = list(proto.pieces)
  normal = sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL
  user = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
  vocab = {p.piece: i for i, p in enumerate(pieces)}
  mergeable = {p.piece for p in pieces if p.type == normal}
  ranked = []
  for i, p in enumerate(pieces):
    if p.type != normal:
      continue
    for k in range(1, len(p.piece)):
      left, right = p.piece[:k], p.piece[k:]
      if left in mergeable and right in mergeable:
        ranked.append((-p.score, i, vocab[left], vocab[right], left, right))
  ranked.sort()
  merges = [(left, right) for *_, left, right in ranked]
  unk = pieces[UNK_ID].piece
  hf = tokenizers.Tokenizer(tokenizers.models.BPE(
      vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
  hf.normalizer = tokenizers.normalizers.Replace(" ", "▁")
  # Sentencepiece matches a user-defined piece in the text as one unit, which
  # SentencePieceTokenizer then spells as encode("<") + encode(rest): isolate the
  # name, then its "<".
  names = [n for n in tok.special_tokens if n in vocab and pieces[vocab[n]].type == user]
  if names:
    alternation = "|".join(re.escape(n) for n in names)
    rests = "|".join(re.escape(n[1:]) for n in names)
    if any(not n.startswith("<") for n in names) or any(
        tok._escapes.get(vocab[n]) != tok._sp.EncodeAsIds(n[:1]) + tok._sp.EncodeAsIds(n[1:])  # pylint: disable=protected-access
        for n in names):
      raise ValueError(f"{tok.source}: its special tokens {names} are spelled in a way a tokenizer.json "
                       "cannot reproduce")
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Split(tokenizers.Regex(alternation), behavior="isolated"),
        tokenizers.pre_tokenizers.Split(tokenizers.Regex(f"\\A<(?={rests})"), behavior="isolated")])
  other_user = [p.piece for p in pieces if p.type == user and p.piece not in names]
  if other_user:  # matched in the (normalized) text as whole units, as sentencepiece does
    hf.add_tokens([tokenizers.AddedToken(p, normalized=True, special=False) for p in other_user])
  control = [p.piece for p in pieces if p.type in (sentencepiece_model_pb2.ModelProto.SentencePiece.CONTROL,
                                                    sentencepiece_model_pb2.ModelProto.SentencePiece.UNKNOWN)]
  hf.add_special_tokens([tokenizers.AddedToken(p, normalized=False, special=True) for p in control])
  appended = [n for n in tok.special_tokens if tok.special_id(n) >= tok.sp_vocab_size]
  appended.sort(key=tok.special_id)
  hf.add_special_tokens([tokenizers.AddedToken(n, normalized=False, special=True) for n in appended])
  for n in appended:
    if hf.token_to_id(n) != tok.special_id(n):
      raise ValueError(f"{tok.source}: the appended special token {n} got id {hf.token_to_id(n)} in the "
                       f"tokenizer.json, not {tok.special_id(n)}")
  bos, eos = pieces[BOS_ID].piece, pieces[EOS_ID].piece
  hf.post_processor = tokenizers.processors.TemplateProcessing(
      single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {bos} $B {eos}",
      special_tokens=[(bos, BOS_ID), (eos, EOS_ID)])
  hf.decoder = tokenizers.decoders.Sequence([
      tokenizers.decoders.Replace("▁", " "), tokenizers.decoders.ByteFallback(), tokenizers.decoders.Fuse()])
  config = {
      "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
      "unk_token": unk, "pad_token": pieces[PAD_ID].piece, "split_special_tokens": True,
      "padding_side": "right", "truncation_side": "right", "clean_up_tokenization_spaces": False,
      "add_prefix_space": False,
  }
  if model_max_length is not None:
    config["model_max_length"] = int(model_max_length)
  return hf.to_str(), config


# ------------------------------------------------------------------------------- checkpoints


# Texts on which two tokenizers of different kinds must give the same ids to count as one tokenizer
# (`same_tokenizer`), and on which the converter checks what it reads and writes against transformers.
PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "def f(x, *, y=2):\n    \"\"\"Adds.\"\"\"\n    return x + y  # 12345\n\n\tclass A: pass\n",
    "  leading and trailing spaces  ",
    "Grüße aus Zürich, déjà vu, naïve café — “quotes” 世界 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🦜🚀 ꯍ",
    "mixed\r\nline\x0bendings\n\n\n", "", " ", "a", "2024-01-31 12:00:59.5s",
    "see <start_of_image>, then<end_of_image><soft_token> <bos> <eos> <pad> <unk> <timestamp>",
    "<start_of_image<start_of_image>>><<image_soft_token> </s> [CLS] <mask>",
    "▁ ▁▁  \u00a0\u2003\u200b\ufeff tabs\t\tand  \n  newlines",
)


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
  """Whether `a` and `b` are one tokenizer, wherever their files are.

  Of one kind: the same serialized model. Across kinds (a sentencepiece model and its tokenizer.json
  conversion): the same vocabulary size and the same ids on PROBE_TEXTS.
  """
  def content(t):
    return {k: v for k, v in t.__getstate__().items() if k != "source"}
  if type(a) is type(b):
    return content(a) == content(b)
  return a.vocab_size == b.vocab_size and all(a.encode(t) == b.encode(t) for t in PROBE_TEXTS)


def checkpoint_tokenizer(meta: dict[str, Any], directory: str | os.PathLike[str]) -> Tokenizer:
  """The tokenizer a checkpoint was trained or imported with (never another one).

  `meta["tokenizer"]` names it: a file path, or "" for the packaged default (what embed2's trainer
  and soups write for a run on it). An import (`embed2.convert`, meta holds "source") and a soup
  (meta holds "soup") carry their own copy in their folder; a path that moved is looked up there.

  Args:
    meta: the checkpoint's meta.
    directory: the checkpoint's directory (its copy of the tokenizer sits there).

  Raises:
    ValueError: the meta names no tokenizer, or an import names none.
    FileNotFoundError: the named tokenizer is missing.
  """
  directory = epath.Path(directory)
  if "tokenizer" not in meta:
    raise ValueError(f"checkpoint {directory} names no tokenizer in its meta; embed2 embeds a "
                     "checkpoint only with the tokenizer it was trained with")
  name = meta["tokenizer"] or ""
  if not name:
    if "source" in meta:
      raise ValueError(
          f"checkpoint {directory} was imported from {meta['source'].get('hf_dir', '?')} without its "
          "tokenizer (an older embed2.convert); re-import it: python -m embed2.convert "
          "--hf_dir=... --out=... (the folder must hold tokenizer.json or tokenizer.model)")
    return Tokenizer.default()
  path = epath.Path(name)
  if not path.is_file():
    moved = directory / path.name
    if ("source" in meta or "soup" in meta) and moved.is_file():  # imports and soups carry a copy
      path = moved
    else:
      raise FileNotFoundError(
          f"checkpoint {directory} was made with the tokenizer {name}, which is missing; put it back "
          "(embed2 never embeds a checkpoint with another tokenizer)")
  return Tokenizer.from_file(path)
