"""Offline text/code tasks mined from the installed Python standard library.

The demo must train with no network, so its text data comes from the one corpus every Python install
has: the standard library source. Three tasks are mined from it with `ast`:

  code_search            function docstring (first paragraph) -> the function's source without its
                         docstring. Hard negative: another function of the same module.
  doc_retrieval          docstring summary (first paragraph of a module / class / function
                         docstring) -> the rest of that docstring (its body paragraphs). Hard
                         negative: the body of another docstring of the same module.
  module_classification  function docstring -> the label text of its topic family (`FAMILIES`:
                         "archives and compression: tar and zip archives, ...", each spanning
                         several top-level modules). 10-20 targets shared by many queries, so the
                         loss's duplicate-positive mask matters.

Every example is a plain dict:

  {"query": str, "positive": str, "negatives": [str, ...] (maybe empty), "query_id": int,
   "positive_id": int, "group": str (dotted module name)}

Ids are content hashes (`content_id`): equal texts get equal ids across roles and tasks, which is
what the NCE mask compares. The train/eval split is by module (a hash of the module name), so no
function, class or module contributes to both sides; eval examples whose query (or, for the
retrieval tasks, positive) text also occurs in train are dropped as well. Every drop is counted in
`task_stats()`; nothing disappears silently.

Mining is deterministic (sorted directory walk, fixed hashes) and cached in-process; it takes a few
seconds (mostly `ast.parse`). The data depends on the Python version that is installed (e.g. 3.12
has no `distutils`), so counts differ between interpreters; runs on one interpreter are repeatable.

Usage:
  from data_pipelines import stdlib_tasks
  train = stdlib_tasks.load_task("code_search", "train")   # list[dict]
  stdlib_tasks.task_counts()   # {"code_search": {"train": ..., "eval": ...}, ...}

  python -m data_pipelines.stdlib_tasks   # the mining statistics (`task_stats()`) as JSON
"""
from __future__ import annotations

import ast
import collections
import dataclasses
import functools
import hashlib
import inspect
import json
import os
import re
import sysconfig
import time
import tokenize
import warnings
from typing import Any, Sequence

from absl import app

TASK_NAMES = ("code_search", "doc_retrieval", "module_classification")
SPLITS = ("train", "eval")

# Directories never mined: tests (their docstrings describe tests, not APIs, and would leak near
# copies of library code), IDLE / lib2to3 / turtledemo (apps and their fixtures), installed
# third-party packages, bundled wheels, generated data.
_EXCLUDED_DIRS = frozenset({
    "test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "idlelib",
    "lib2to3", "turtledemo", "ensurepip", "pydoc_data", "lib-dynload", "__phello__",
})

# Families for module_classification: a topic of the library, spanning several top-level modules or
# packages, so that holding out whole modules still leaves every family on both sides of the split
# (a family made of one package with three modules often has no eval module at all). The label is
# the positive text; it says in words what the family is about, so an encoder can match docstring
# words against it. Families missing from the installed stdlib, or without enough examples on both
# sides of the split, are left out and listed in the stats, so the task adapts to the interpreter.
FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    # name: (label text, top-level modules / packages)
    "async": ("asynchronous I/O: event loops, coroutines, tasks, futures, streams, transports, "
              "protocols and I/O multiplexing",
              ("asyncio", "asynchat", "asyncore", "selectors")),
    "concurrency": ("concurrency: threads, processes, pools, locks, conditions, queues, pipes, "
                    "shared memory and scheduling",
                    ("multiprocessing", "concurrent", "threading", "queue", "_threading_local",
                     "sched", "subprocess")),
    "email": ("email and mailboxes: email messages, MIME parts, headers, addresses, encodings "
              "and mailbox files",
              ("email", "mailbox", "mailcap", "mimetypes", "quopri", "base64", "uu")),
    "net": ("network clients and sockets: sockets, SSL, IP addresses, socket servers and FTP, "
            "SMTP, POP3, IMAP, NNTP and Telnet clients",
            ("socket", "ssl", "ipaddress", "socketserver", "ftplib", "poplib", "imaplib",
             "smtplib", "smtpd", "nntplib", "telnetlib")),
    "web": ("web: HTTP clients and servers, cookies, URLs, WSGI, CGI, HTML and XML-RPC",
            ("http", "urllib", "wsgiref", "html", "xmlrpc", "cgi", "cgitb", "webbrowser",
             "_markupbase")),
    "xml": ("XML: parsing and building XML documents with DOM, SAX, ElementTree and expat",
            ("xml", "plistlib")),
    "imports": ("imports and packaging: finding, loading and compiling modules, packages, "
                "distribution metadata, building and installing",
                ("importlib", "pkgutil", "zipimport", "runpy", "modulefinder", "imp",
                 "distutils", "venv", "compileall", "py_compile", "sysconfig", "site", "zipapp")),
    "testing": ("testing: unit tests, test cases, suites, runners, assertions, mocks and doctests",
                ("unittest", "doctest")),
    "introspection": ("debugging and introspection: debuggers, breakpoints, stack frames, "
                      "tracebacks, bytecode, profiling, source inspection and documentation",
                      ("pdb", "bdb", "inspect", "traceback", "dis", "trace", "pydoc", "cProfile",
                       "profile", "pstats", "tracemalloc", "code", "codeop", "timeit", "symtable",
                       "pyclbr", "ast", "tokenize", "opcode", "linecache")),
    "gui": ("graphical user interfaces: Tk widgets, windows, canvas drawing, geometry managers, "
            "events, dialogs and turtle graphics",
            ("tkinter", "turtle")),
    "numeric": ("numbers and math: decimal and rational arithmetic, numeric types, statistics "
                "and random numbers",
                ("_pydecimal", "decimal", "fractions", "numbers", "statistics", "random",
                 "colorsys")),
    "datetime": ("dates and times: dates, times, time zones, calendars and time parsing",
                 ("datetime", "calendar", "_strptime", "zoneinfo")),
    "archives": ("archives and compression: tar and zip archives, gzip, bzip2 and lzma "
                 "compressed files",
                 ("tarfile", "zipfile", "gzip", "bz2", "lzma", "_compression")),
    "files": ("files and paths: file system paths, directories, copying, temporary files, "
              "globbing, file comparison and file input",
              ("os", "pathlib", "posixpath", "ntpath", "genericpath", "shutil", "glob",
               "fnmatch", "tempfile", "filecmp", "fileinput", "stat")),
    "text": ("text processing: regular expressions, string formatting, wrapping, differences, "
             "shell-like lexing, codecs and localisation",
             ("re", "sre_compile", "sre_parse", "sre_constants", "string", "textwrap", "difflib",
              "shlex", "stringprep", "codecs", "encodings", "locale", "gettext")),
    "serialization": ("serialization and data formats: pickle, JSON, CSV, INI config files, "
                      "TOML, key-value databases and shelves",
                      ("pickle", "pickletools", "copyreg", "_compat_pickle", "json", "csv",
                       "configparser", "tomllib", "shelve", "dbm", "netrc", "xdrlib")),
    "datatypes": ("data types and functional tools: containers, abstract base classes, enums, "
                  "dataclasses, typing, copying, weak references and functools",
                  ("collections", "_collections_abc", "heapq", "bisect", "functools",
                   "operator", "enum", "dataclasses", "types", "typing", "abc", "_py_abc", "copy",
                   "weakref", "_weakrefset", "reprlib", "contextlib", "graphlib")),
    "cli": ("command line and terminals: argument parsing, option parsing, interactive "
            "command interpreters, curses screens and pseudo-terminals",
            ("argparse", "optparse", "getopt", "cmd", "curses", "getpass", "pty", "tty",
             "rlcompleter")),
    "logging": ("logging: loggers, handlers, formatters, filters, log records and warnings",
                ("logging", "warnings")),
    "media": ("audio and image files: WAV, AIFF and Sun audio files, sound and image type "
              "detection",
              ("wave", "aifc", "sunau", "sndhdr", "imghdr", "chunk")),
}
_FAMILY_OF_TOP = {top: family for family, (_, tops) in FAMILIES.items() for top in tops}
assert len(_FAMILY_OF_TOP) == sum(len(t) for _, t in FAMILIES.values()), "module in 2 families"


@dataclasses.dataclass(frozen=True, kw_only=True)
class MiningConfig:
  """Knobs of the stdlib mining. Hashable, so mining is cached per config.

  Attributes:
    eval_percent: share of modules (by a hash of the module name, not of examples) that go to the
      eval split, in percent.
    max_query_chars: queries longer than this are cut at a word boundary.
    max_code_chars: function sources longer than this are cut at a line boundary (downstream
      tokenisation truncates to the sequence length anyway; this keeps examples small).
    max_body_chars: docstring bodies longer than this are cut at a word boundary.
    min_query_chars: shorter queries are dropped ("Constructor.", "Return self.").
    min_query_words: queries with fewer words are dropped.
    min_positive_chars: shorter positives are dropped (e.g. a function whose body is only its
      docstring leaves just the `def` line).
    min_family_train: a family joins module_classification only with at least this many train
      examples and at least one eval example.
  """
  eval_percent: int = 15
  max_query_chars: int = 400
  max_code_chars: int = 600
  max_body_chars: int = 600
  min_query_chars: int = 16
  min_query_words: int = 3
  min_positive_chars: int = 40
  min_family_train: int = 20


def content_id(text: str) -> int:
  """Stable 31-bit id of a text (blake2b; never Python's salted `hash`). Equal texts, equal ids."""
  digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
  return int.from_bytes(digest, "little") & 0x7FFFFFFF


def split_of(module: str, eval_percent: int) -> str:
  """'eval' for about `eval_percent`% of module names (stable hash), else 'train'."""
  digest = hashlib.blake2b(module.encode("utf-8"), digest_size=8, person=b"embed2split").digest()
  return "eval" if int.from_bytes(digest, "little") % 10_000 < eval_percent * 100 else "train"


# ------------------------------------------------------------------------------------------------
# Text cleaning.
# ------------------------------------------------------------------------------------------------

def _paragraphs(doc: str) -> list[str]:
  """Cleaned docstring -> its non-empty paragraphs (split on blank lines)."""
  doc = inspect.cleandoc(doc)
  return [p.strip() for p in re.split(r"\n\s*\n", doc) if p.strip()]


def _one_line(text: str) -> str:
  return " ".join(text.split())


def _cut_words(text: str, max_chars: int) -> str:
  """Cut at the last space before max_chars (a hard cut if there is none in the second half)."""
  if len(text) <= max_chars:
    return text
  cut = text.rfind(" ", 0, max_chars)
  return text[:cut if cut > max_chars // 2 else max_chars].rstrip()


def _cut_lines(text: str, max_chars: int) -> str:
  """Cut at the last line break before max_chars, so code is not split mid-line when avoidable."""
  if len(text) <= max_chars:
    return text
  cut = text.rfind("\n", 0, max_chars)
  return text[:cut if cut > max_chars // 2 else max_chars].rstrip()


def _function_code(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str],
                   max_chars: int) -> str | None:
  """Source of a def (from the `def` line, without decorators) with its docstring lines removed.

  Returns None when the docstring shares a line with other code (one-liners), where removing its
  lines would remove code too.
  """
  first, last = node.lineno - 1, node.end_lineno  # 0-based [first, last)
  body = node.body
  drop = range(0)
  if (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
      and isinstance(body[0].value.value, str)):
    doc = body[0]
    code_before = lines[doc.lineno - 1][:doc.col_offset].strip()  # `def f(): "doc"`
    code_after = len(body) > 1 and body[1].lineno == doc.end_lineno  # `"doc"; return 1`
    if code_before or code_after:
      return None
    drop = range(doc.lineno - 1, doc.end_lineno)
  indent = node.col_offset
  out = []
  for i in range(first, last):
    if i in drop:
      continue
    line = lines[i].rstrip()
    # Strip the def's own indentation (methods); continuation lines of strings may be indented
    # less, so only whitespace is removed.
    prefix = line[:indent]
    out.append(line[indent:] if not prefix.strip() else line.lstrip())
  return _cut_lines("\n".join(out).strip("\n"), max_chars)


# ------------------------------------------------------------------------------------------------
# Walking the stdlib.
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Doc:
  """One module / class / function definition (docstring may be empty), in file order."""
  module: str
  kind: str  # "module" | "class" | "function"
  paragraphs: tuple[str, ...]
  code: str | None  # functions only: source without the docstring


def _module_files(root: str) -> list[tuple[str, str]]:
  """Sorted (module name, path) of the .py files to mine under the stdlib root."""
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames
                         if d not in _EXCLUDED_DIRS and not d.startswith("config-"))
    rel = os.path.relpath(dirpath, root)
    package = [] if rel == os.curdir else rel.split(os.sep)
    for name in sorted(filenames):
      if not name.endswith(".py") or name.startswith(("test_", "_test")):
        continue
      if name.startswith("_sysconfigdata"):
        continue
      stem = name[:-3]
      module = ".".join(package + ([] if stem == "__init__" else [stem]))
      found.append((module, os.path.join(dirpath, name)))
  return found


def _walk_definitions(tree: ast.Module):
  """Module, then classes and functions at module level or inside classes (not nested in defs:
  a nested helper's source is already part of its parent's), in source order."""
  yield tree
  stack = list(reversed(tree.body))
  while stack:
    node = stack.pop()
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      yield node
    elif isinstance(node, ast.ClassDef):
      yield node
      stack.extend(reversed(node.body))


def _mine_docs(root: str, config: MiningConfig, stats: dict[str, Any]) -> list[_Doc]:
  docs = []
  files = _module_files(root)
  stats["files_found"] = len(files)
  stats["files_failed"] = 0
  stats["files_failed_paths"] = []
  stats["functions_seen"] = 0
  for module, path in files:
    try:
      with tokenize.open(path) as f:  # honours PEP 263 encoding cookies
        source = f.read()
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid-escape SyntaxWarnings in old modules
        tree = ast.parse(source, filename=path)
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
      stats["files_failed"] += 1
      stats["files_failed_paths"].append(path)
      continue
    lines = source.splitlines()
    for node in _walk_definitions(tree):
      is_function = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
      stats["functions_seen"] += is_function
      doc = ast.get_docstring(node, clean=False)
      if not doc or not doc.strip():
        if is_function:  # still usable as a hard negative for code_search
          code = _function_code(node, lines, config.max_code_chars)
          docs.append(_Doc(module, "function", (), code))
        continue
      kind = "function" if is_function else ("class" if isinstance(node, ast.ClassDef)
                                              else "module")
      code = _function_code(node, lines, config.max_code_chars) if is_function else None
      docs.append(_Doc(module, kind, tuple(_paragraphs(doc)), code))
  return docs


# ------------------------------------------------------------------------------------------------
# Building the tasks.
# ------------------------------------------------------------------------------------------------

def _example(query: str, positive: str, negatives: list[str], group: str) -> dict[str, Any]:
  return {"query": query, "positive": positive, "negatives": negatives,
          "query_id": content_id(query), "positive_id": content_id(positive), "group": group}


def _query_text(doc: _Doc, config: MiningConfig) -> str | None:
  if not doc.paragraphs:
    return None
  return _cut_words(_one_line(doc.paragraphs[0]), config.max_query_chars)


def _query_ok(query: str, config: MiningConfig) -> bool:
  return len(query) >= config.min_query_chars and len(query.split()) >= config.min_query_words


def _pick_negative(candidates: list[str], index: int, positive: str, min_chars: int) -> list[str]:
  """The next candidate of the same module after `index` (cyclic) that differs from the positive
  and has at least `min_chars` characters; [] if there is none.

  Deterministic and cheap; neighbours in a module tend to be related (methods of one class),
  which makes them harder negatives than random ones.
  """
  n = len(candidates)
  for step in range(1, n):
    other = candidates[(index + step) % n]
    if other != positive and len(other) >= min_chars:
      return [other]
  return []


def _code_search(docs: list[_Doc], config: MiningConfig, counts: collections.Counter):
  by_module: dict[str, list[_Doc]] = collections.defaultdict(list)
  for d in docs:
    if d.kind == "function" and d.code:
      by_module[d.module].append(d)
  out = []
  for module, funcs in by_module.items():
    codes = [f.code for f in funcs]
    for i, f in enumerate(funcs):
      if not f.paragraphs:
        continue  # undocumented: a negative only
      counts["candidates"] += 1
      query = _query_text(f, config)
      if not _query_ok(query, config):
        counts["dropped_short_query"] += 1
        continue
      if len(f.code) < config.min_positive_chars:
        counts["dropped_short_positive"] += 1
        continue
      negatives = _pick_negative(codes, i, f.code, config.min_positive_chars)
      out.append(_example(query, f.code, negatives, module))
  # Functions whose docstring shares a line with code have code=None and are not candidates.
  counts["dropped_inline_docstring"] = sum(
      1 for d in docs if d.kind == "function" and d.paragraphs and d.code is None)
  return out


def _doc_retrieval(docs: list[_Doc], config: MiningConfig, counts: collections.Counter):
  pairs_by_module: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
  for d in docs:
    if len(d.paragraphs) < 2:
      continue  # needs a summary and a body
    counts["candidates"] += 1
    query = _query_text(d, config)
    body = _cut_words("\n\n".join(d.paragraphs[1:]), config.max_body_chars)
    if not _query_ok(query, config):
      counts["dropped_short_query"] += 1
      continue
    if len(body) < config.min_positive_chars:
      counts["dropped_short_positive"] += 1
      continue
    pairs_by_module[d.module].append((query, body))
  out = []
  for module, pairs in pairs_by_module.items():
    bodies = [b for _, b in pairs]
    for i, (query, body) in enumerate(pairs):
      negatives = _pick_negative(bodies, i, body, config.min_positive_chars)
      out.append(_example(query, body, negatives, module))
  return out


def _module_classification(docs: list[_Doc], config: MiningConfig,
                           counts: collections.Counter, stats: dict[str, Any]):
  raw = []
  for d in docs:
    family = _FAMILY_OF_TOP.get(d.module.split(".")[0])
    if d.kind != "function" or not d.paragraphs:
      continue
    if family is None:
      counts["skipped_module_in_no_family"] += 1
      continue
    counts["candidates"] += 1
    query = _query_text(d, config)
    if not _query_ok(query, config):
      counts["dropped_short_query"] += 1
      continue
    raw.append((query, family, d.module))
  # A docstring that occurs in two families ("Return a copy.") has no single right answer.
  families_of_query = collections.defaultdict(set)
  for query, family, _ in raw:
    families_of_query[query].add(family)
  kept = []
  for query, family, module in raw:
    if len(families_of_query[query]) > 1:
      counts["dropped_ambiguous_family"] += 1
    else:
      kept.append((query, family, module))
  # Only families that can be learned (train) and measured (eval).
  per_split = collections.Counter((f, split_of(m, config.eval_percent)) for _, f, m in kept)
  chosen = [f for f in FAMILIES
            if per_split[(f, "train")] >= config.min_family_train and per_split[(f, "eval")] >= 1]
  stats["module_classification_families"] = chosen
  stats["module_classification_families_left_out"] = [f for f in FAMILIES if f not in chosen]
  out = []
  for query, family, module in kept:
    if family not in chosen:
      counts["dropped_family_left_out"] += 1
      continue
    out.append(_example(query, FAMILIES[family][0], [], module))
  return out


def _finish(examples: list[dict], config: MiningConfig, counts: collections.Counter,
            check_positive_overlap: bool) -> dict[str, list[dict]]:
  """Dedup (query, positive) pairs, split by module, drop eval examples that overlap train."""
  seen = set()
  unique = []
  for ex in examples:
    key = (ex["query"], ex["positive"])
    if key in seen:
      counts["dropped_duplicate_pair"] += 1
      continue
    seen.add(key)
    unique.append(ex)
  splits = {s: [] for s in SPLITS}
  for ex in unique:
    splits[split_of(ex["group"], config.eval_percent)].append(ex)
  train_queries = {ex["query"] for ex in splits["train"]}
  train_positives = {ex["positive"] for ex in splits["train"]}
  honest = []
  for ex in splits["eval"]:
    # A copy-pasted docstring/function in a held-out module would be an answer seen in training.
    positive_seen = check_positive_overlap and ex["positive"] in train_positives
    if ex["query"] in train_queries or positive_seen:
      counts["dropped_eval_overlap_with_train"] += 1
    else:
      honest.append(ex)
  splits["eval"] = honest
  for s in SPLITS:
    counts[s] = len(splits[s])
    counts[f"{s}_modules"] = len({ex["group"] for ex in splits[s]})
  return splits


@dataclasses.dataclass(frozen=True)
class StdlibTasks:
  """All mined tasks: tasks[name][split] -> list of example dicts; stats: counts and timing."""
  tasks: dict[str, dict[str, list[dict]]]
  stats: dict[str, Any]


def mine_stdlib(stdlib_dir: str | None = None,
                config: MiningConfig = MiningConfig()) -> StdlibTasks:
  """Mines all tasks from the stdlib at `stdlib_dir` (default: this interpreter's).

  Cached per (folder, config) in-process. Callers must not mutate the returned lists;
  `load_task` hands out copies.
  """
  if not 0 < config.eval_percent < 100:
    raise ValueError(f"MiningConfig.eval_percent={config.eval_percent} must be in (0, 100).")
  root = os.path.realpath(stdlib_dir or sysconfig.get_paths()["stdlib"])
  if not os.path.isdir(root):
    raise ValueError(f"stdlib_dir={root!r} is not a directory; pass the folder holding os.py.")
  return _mine_cached(root, config)


@functools.cache
def _mine_cached(root: str, config: MiningConfig) -> StdlibTasks:
  """Uncached mining is `_mine_cached.__wrapped__(root, config)`."""
  start = time.perf_counter()
  stats: dict[str, Any] = {"stdlib_dir": root, "config": dataclasses.asdict(config)}
  docs = _mine_docs(root, config, stats)
  stats["parse_seconds"] = time.perf_counter() - start
  tasks = {}
  builders = {
      "code_search": (lambda c: _code_search(docs, config, c), True),
      "doc_retrieval": (lambda c: _doc_retrieval(docs, config, c), True),
      "module_classification": (lambda c: _module_classification(docs, config, c, stats), False),
  }
  for name, (build, check_positive) in builders.items():
    counts = collections.Counter()
    examples = build(counts)
    counts["mined"] = len(examples)
    tasks[name] = _finish(examples, config, counts, check_positive)
    stats[name] = dict(counts)
  # 31-bit ids can collide (birthday bound: ~0.1-0.2 expected among tens of thousands of texts);
  # a collision only masks one extra in-batch negative, but it is counted, not hidden.
  text_of_id: dict[int, str] = {}
  collisions = 0
  for splits in tasks.values():
    for examples in splits.values():
      for ex in examples:
        for text in (ex["query"], ex["positive"], *ex["negatives"]):
          previous = text_of_id.setdefault(content_id(text), text)
          collisions += previous != text
  stats["distinct_texts"] = len(text_of_id)
  stats["id_collisions"] = collisions
  stats["mining_seconds"] = time.perf_counter() - start
  return StdlibTasks(tasks=tasks, stats=stats)


def load_task(name: str, split: str, *, stdlib_dir: str | None = None,
              config: MiningConfig = MiningConfig()) -> list[dict[str, Any]]:
  """Examples of one stdlib task and split, as fresh dicts (safe to mutate).

  Args:
    name: one of TASK_NAMES.
    split: "train" or "eval".
    stdlib_dir: stdlib folder to mine; default this interpreter's.
    config: mining knobs; the default is what the demo uses.

  Returns:
    list of {"query", "positive", "negatives", "query_id", "positive_id", "group"} dicts, in a
    deterministic order (sorted module paths, then source order).
  """
  if name not in TASK_NAMES:
    raise ValueError(f"stdlib task name={name!r} is unknown; pick one of {TASK_NAMES}.")
  if split not in SPLITS:
    raise ValueError(f"split={split!r} is unknown; pick one of {SPLITS}.")
  mined = mine_stdlib(stdlib_dir, config)
  return [dict(ex, negatives=list(ex["negatives"])) for ex in mined.tasks[name][split]]


def task_stats(*, stdlib_dir: str | None = None, config: MiningConfig = MiningConfig()) -> dict:
  """Mining statistics: files, per-task candidates / drops by reason / split sizes, timing."""
  return dict(mine_stdlib(stdlib_dir, config).stats)


def task_counts(*, stdlib_dir: str | None = None,
                config: MiningConfig = MiningConfig()) -> dict[str, dict[str, int]]:
  """{task name: {"train": n, "eval": n}}."""
  tasks = mine_stdlib(stdlib_dir, config).tasks
  return {name: {s: len(tasks[name][s]) for s in SPLITS} for name in TASK_NAMES}


def main(argv: Sequence[str]) -> None:
  """Prints `task_stats()` (without the failed files' paths) as JSON."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}: this program takes none")
  print(json.dumps({k: v for k, v in task_stats().items() if k != "files_failed_paths"},
                   indent=1, default=str))


if __name__ == "__main__":
  app.run(main)
