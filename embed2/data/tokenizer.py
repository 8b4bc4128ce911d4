"""Sentencepiece tokenizer with Gemma's id conventions and modality tokens.

One wrapper loads both the small model shipped in `embed2/assets/` (trained by
`python -m embed2.data.train_tokenizer`) and a real Gemma `tokenizer.model`:

- ids: pad=0, eos=1, bos=2, unk=3 (checked at load time); byte fallback, so no
  text maps to unk.
- special tokens (`SPECIAL_TOKENS`) mark modality boundaries in a packed
  sequence. A token the sentencepiece model holds (as a user-defined or control
  piece, e.g. Gemma's `<start_of_image>` = 255999) keeps its id; one it lacks
  gets an id appended after the sentencepiece vocab, in `SPECIAL_TOKENS` order,
  and `vocab_size` grows to cover it. `<soft_token>` comes first in that order,
  so on Gemma 3 (262144 pieces, no soft token) it gets 262144, the id of the
  HF processor's `<image_soft_token>`.
- special tokens are inserted by id (`special_id`) by the data pipeline, never
  parsed from user text: `encode("<start_of_image>")` spells the string with
  ordinary pieces, even when the model holds it as a user-defined piece that
  sentencepiece alone would match. A document cannot forge a modality
  boundary. `decode` renders every special id as its name.

A `Tokenizer` pickles as its serialized model bytes, so grain worker processes
can receive transforms that hold one.
"""
import collections.abc
import os
import pathlib
from typing import Any

import sentencepiece as spm

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


class Tokenizer:
  """Text <-> token ids, with Gemma conventions and modality special tokens.

  Build with `Tokenizer.from_file(path)` or `Tokenizer.default()`.
  """

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
    path = pathlib.Path(path)
    if not path.is_file():
      raise FileNotFoundError(f"No tokenizer model at {str(path)!r}. {_HOW_TO_GET}")
    return cls(path.read_bytes(), special_tokens=special_tokens, source=str(path))

  @classmethod
  def default(cls) -> "Tokenizer":
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
    return f"Tokenizer({self._source!r}, vocab_size={self.vocab_size})"

  # --- vocabulary -----------------------------------------------------------

  @property
  def vocab_size(self) -> int:
    """Ids are in [0, vocab_size): sentencepiece pieces + appended specials."""
    return self._sp_size + len(self._appended)

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
      text: any unicode string; special-token names in it are spelled as text.
      add_bos: prepend bos_id.
      add_eos: append eos_id.
      max_length: keep at most this many ids in all. The text is truncated
        first, so bos and eos survive whenever max_length >= 2.

    Returns:
      A list of ints in [0, vocab_size).
    """
    if not isinstance(text, str):
      raise TypeError(f"text must be str, got {type(text).__name__}.")
    return self._finish(self._sp.EncodeAsIds(text), add_bos, add_eos, max_length)

  def encode_batch(
      self,
      texts: collections.abc.Sequence[str],
      *,
      add_bos: bool = False,
      add_eos: bool = False,
      max_length: int | None = None,
      num_threads: int | None = None,
  ) -> list[list[int]]:
    """Encodes many texts in one multithreaded sentencepiece call.

    Args:
      texts: unicode strings.
      add_bos, add_eos, max_length: as in `encode`, applied to each text.
      num_threads: sentencepiece threads; None lets it pick (all cores).

    Returns:
      One list of ids per text, equal to `encode` of that text.
    """
    texts = list(texts)
    for i, text in enumerate(texts):
      if not isinstance(text, str):
        raise TypeError(f"texts[{i}] must be str, got {type(text).__name__}.")
    if not texts:
      return []
    kwargs = {} if num_threads is None else {"num_threads": num_threads}
    ids_batch = self._sp.Encode(texts, out_type=int, **kwargs)
    return [self._finish(ids, add_bos, add_eos, max_length) for ids in ids_batch]

  def _finish(
      self, ids: list[int], add_bos: bool, add_eos: bool, max_length: int | None
  ) -> list[int]:
    """Re-spells special ids matched in text, then adds bos/eos and truncates."""
    if max_length is not None and max_length < 1:
      raise ValueError(f"max_length={max_length} must be >= 1 (or None for no limit).")
    if self._escapes and not self._escapes.keys().isdisjoint(ids):
      spelled = []
      for i in ids:
        spelled.extend(self._escapes.get(i, (i,)))
      ids = spelled
    n_extra = int(add_bos) + int(add_eos)
    if max_length is not None:
      ids = ids[:max(max_length - n_extra, 0)]
    ids = ([BOS_ID] if add_bos else []) + ids + ([EOS_ID] if add_eos else [])
    return ids if max_length is None else ids[:max_length]

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

  def _check_ids(self, ids: list[int]) -> None:
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise ValueError(
          f"ids {bad[:5]} are outside [0, vocab_size={self.vocab_size}) of {self._source}.")
