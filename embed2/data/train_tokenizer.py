r"""Trains the small sentencepiece model that ships with embed2.

The model is trained offline on text mined from the installed Python standard
library: module / class / function docstrings, source comments, and the source
of functions (code). The corpus is gathered with `ast` and `tokenize` from the
`.py` files under `sysconfig.get_paths()['stdlib']` in sorted path order, so two
runs on the same Python install produce byte-identical models. No network.

Conventions follow Gemma's tokenizer: BPE, pad=0 eos=1 bos=2 unk=3, byte
fallback, digits split one per token, whitespace kept verbatim (identity
normalisation, no dummy prefix, whitespace-only pieces allowed, so code
indentation survives a round trip), and the modality boundary tokens of
`embed2.data.tokenizer.SPECIAL_TOKENS` reserved as user-defined symbols (ids
4, 5, ... inside the vocab).

Run:
  python -m embed2.data.train_tokenizer --out=embed2/assets/tokenizer.model
"""
import ast
import collections.abc
import io
import os
import pathlib
import sysconfig
import textwrap
import time
import tokenize

import sentencepiece as spm
from absl import flags

from embed2 import cli
from embed2.data import tokenizer as tokenizer_lib

# Directories skipped under the stdlib: third-party packages (site-packages is
# under the stdlib path on most installs) and test suites (mostly fixtures).
_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
# Longer texts are cut into chunks of at most this many characters at line
# boundaries; sentencepiece silently drops sentences longer than
# `max_sentence_length` bytes.
_MAX_CHUNK_CHARS = 2000
_MAX_SENTENCE_BYTES = 4 * _MAX_CHUNK_CHARS + 16


def stdlib_files(stdlib_dir: str | os.PathLike[str] | None = None) -> list[pathlib.Path]:
  """Lists the standard library's `.py` files in a deterministic order.

  Args:
    stdlib_dir: root to search; defaults to `sysconfig.get_paths()['stdlib']`.

  Returns:
    Paths sorted by their POSIX path relative to the root, without files under
    site-packages, dist-packages or test directories.
  """
  root = pathlib.Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
  files = []
  for path in root.rglob("*.py"):
    rel = path.relative_to(root)
    if _SKIP_DIRS.isdisjoint(rel.parts[:-1]) and path.is_file():
      files.append((rel.as_posix(), path))
  return [path for _, path in sorted(files)]


def _chunks(text: str) -> list[str]:
  """Splits text into chunks of <= _MAX_CHUNK_CHARS characters at line ends."""
  text = text.strip("\n")
  if not text.strip():
    return []
  if len(text) <= _MAX_CHUNK_CHARS:
    return [text]
  chunks, current, size = [], [], 0
  for line in text.split("\n"):
    line = line[:_MAX_CHUNK_CHARS]
    if current and size + len(line) + 1 > _MAX_CHUNK_CHARS:
      chunks.append("\n".join(current))
      current, size = [], 0
    current.append(line)
    size += len(line) + 1
  if current:
    chunks.append("\n".join(current))
  return [c for c in chunks if c.strip()]


def _paragraphs(text: str) -> list[str]:
  """Splits prose at blank lines; each paragraph becomes one sentence."""
  out = []
  for para in text.split("\n\n"):
    out.extend(_chunks(para))
  return out


def _definitions(node: ast.AST) -> collections.abc.Iterator[ast.AST]:
  """Yields the module, class and function nodes under `node`, in source order.

  Descends through statements only (functions can sit inside `if` / `try`
  blocks); skipping expressions makes this several times faster than ast.walk.
  """
  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
    yield node
  for child in ast.iter_child_nodes(node):
    if isinstance(child, (ast.stmt, ast.excepthandler, ast.match_case)):
      yield from _definitions(child)


def texts_from_source(source: str, *, include_code: bool = True) -> list[str]:
  """Extracts docstrings, comments and (optionally) function sources.

  Args:
    source: the text of one Python module.
    include_code: also return the dedented source of every function, so the
      tokenizer learns code (indentation runs, operators, identifiers).

  Returns:
    Texts in source order: docstring paragraphs, comment blocks (the `#` and
    one following space removed, consecutive comment lines joined), then
    function sources. Raises SyntaxError / ValueError for unparsable sources.
  """
  tree = ast.parse(source)
  # Sliced by line numbers: ast.get_source_segment re-splits the whole source on
  # every call, which is quadratic in the file size.
  lines = source.splitlines(keepends=True)
  texts = []
  code = []
  for node in _definitions(tree):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      doc = ast.get_docstring(node, clean=True)
      if doc:
        texts.extend(_paragraphs(doc))
    if include_code and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      first = min([node.lineno] + [d.lineno for d in node.decorator_list])
      segment = "".join(lines[first - 1:node.end_lineno])
      code.extend(_chunks(textwrap.dedent(segment)))

  # Comments are not in the AST; `tokenize` yields them with their line, so
  # consecutive whole-line comments can form one block of prose. A comment
  # after code on its line stands alone.
  block, last_line = [], -2
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type != tokenize.COMMENT:
      continue
    body = tok.string[1:]
    body = body[1:] if body.startswith(" ") else body
    whole_line = tok.line.lstrip().startswith("#")
    if block and not (whole_line and tok.start[0] == last_line + 1):
      texts.extend(_chunks("\n".join(block)))
      block = []
    if body.strip() and not body.startswith("!"):  # Skip shebang-like lines.
      block.append(body.rstrip())
    last_line = tok.start[0] if whole_line else -2
  if block:
    texts.extend(_chunks("\n".join(block)))
  return texts + code


def stdlib_corpus(
    *,
    stdlib_dir: str | os.PathLike[str] | None = None,
    include_code: bool = True,
    max_files: int | None = None,
    max_chars: int = 12_000_000,
) -> list[str]:
  """Gathers the training corpus from the installed standard library.

  Args:
    stdlib_dir: root of the standard library; defaults to this interpreter's.
    include_code: include function sources as well as docstrings / comments.
    max_files: read at most this many files (in sorted order); None for all.
    max_chars: stop once this many characters are gathered, which bounds the
      training time; the cut is deterministic (sorted file order).

  Returns:
    Unique texts (first occurrence kept) in deterministic order.
  """
  if max_chars < 1:
    raise ValueError(f"max_chars={max_chars} must be >= 1.")
  seen = set()
  out, total = [], 0
  files = stdlib_files(stdlib_dir)
  if max_files is not None:
    files = files[:max_files]
  for path in files:
    try:
      with tokenize.open(path) as f:  # Honours PEP 263 encoding cookies.
        source = f.read()
      texts = texts_from_source(source, include_code=include_code)
    except (SyntaxError, ValueError, UnicodeDecodeError, tokenize.TokenError, RecursionError):
      continue  # Python 2 fixtures and the like; skipping them is harmless.
    for text in texts:
      if text in seen:
        continue
      seen.add(text)
      out.append(text)
      total += len(text)
      if total >= max_chars:
        return out
  return out


def train(
    sentences: collections.abc.Iterable[str],
    *,
    vocab_size: int = 8192,
    model_type: str = "bpe",
    special_tokens: collections.abc.Sequence[str] = tokenizer_lib.SPECIAL_TOKENS,
    character_coverage: float = 1.0,
) -> bytes:
  """Trains a Gemma-convention sentencepiece model.

  Deterministic: one training thread, no input shuffling or sampling (the
  caller bounds the corpus instead), so equal inputs give equal bytes.

  Args:
    sentences: training texts; each may span several lines.
    vocab_size: number of pieces, including pad/eos/bos/unk, the
      special tokens and the 256 byte-fallback pieces.
    model_type: "bpe" (as Gemma) or "unigram".
    special_tokens: reserved as user-defined symbols, ids 4, 5, ... in order.
    character_coverage: fraction of characters that get their own piece; the
      rarest rest are spelled with byte pieces.

  Returns:
    The serialized ModelProto (the content of a `tokenizer.model` file).
  """
  min_vocab = 4 + len(special_tokens) + 256
  if vocab_size <= min_vocab:
    raise ValueError(
        f"vocab_size={vocab_size} must be > {min_vocab} (4 reserved ids, "
        f"{len(special_tokens)} special tokens and 256 byte pieces).")
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences),
      model_writer=model,
      model_type=model_type,
      vocab_size=vocab_size,
      character_coverage=character_coverage,
      byte_fallback=True,
      split_digits=True,
      pad_id=0, eos_id=1, bos_id=2, unk_id=3,
      pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
      user_defined_symbols=list(special_tokens),
      # Gemma-style verbatim whitespace: code indentation must round-trip.
      normalization_rule_name="identity",
      add_dummy_prefix=False,
      remove_extra_whitespaces=False,
      allow_whitespace_only_pieces=True,
      max_sentence_length=_MAX_SENTENCE_BYTES,
      input_sentence_size=0,
      shuffle_input_sentence=False,
      num_threads=1,
      minloglevel=2,
  )
  return model.getvalue()


FLAGS = flags.FlagValues()  # this program's own flags (embed2/cli.py says why)
flags.DEFINE_string("out", None, "where to write tokenizer.model", flag_values=FLAGS)
flags.DEFINE_integer("vocab_size", 8192, "pieces in the model, special tokens included",
                     flag_values=FLAGS)
flags.DEFINE_enum("model_type", "bpe", ("bpe", "unigram"), "sentencepiece model type",
                  flag_values=FLAGS)
flags.DEFINE_integer("max_chars", 12_000_000, "corpus size bound (characters); bounds training time",
                     flag_values=FLAGS)
flags.DEFINE_integer("max_files", None, "read at most this many stdlib files (default: all)",
                     flag_values=FLAGS)
flags.DEFINE_bool("no_code", False, "train on docstrings and comments only", flag_values=FLAGS)
flags.mark_flag_as_required("out", flag_values=FLAGS)


def main(argv: collections.abc.Sequence[str]) -> None:
  """Trains and writes the model: the command line `argv` (after the program name)."""
  args = cli.parse(FLAGS, argv)

  start = time.perf_counter()
  corpus = stdlib_corpus(
      include_code=not args.no_code, max_files=args.max_files, max_chars=args.max_chars)
  gathered = time.perf_counter()
  proto = train(corpus, vocab_size=args.vocab_size, model_type=args.model_type)
  trained = time.perf_counter()
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_bytes(proto)

  tok = tokenizer_lib.Tokenizer.from_file(out)
  n_chars = sum(len(t) for t in corpus)
  n_tokens = sum(len(ids) for ids in tok.encode_batch(corpus))
  print(f"corpus: {len(corpus)} texts, {n_chars} chars from {sysconfig.get_paths()['stdlib']} "
        f"({gathered - start:.1f}s)")
  print(f"trained {args.model_type} vocab_size={tok.vocab_size} in {trained - gathered:.1f}s; "
        f"{n_chars / max(n_tokens, 1):.2f} chars/token on the training corpus")
  print(f"wrote {out} ({len(proto)} bytes)")


if __name__ == "__main__":
  cli.run(main, FLAGS)
