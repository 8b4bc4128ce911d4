"""A media item's encoded source (a file path or bytes), and the error that names the input.

Bad input raises `MediaError` (a ValueError, defined with the items in `embed2.data.segments` so the
pipeline can catch it without importing the decoders) whose message starts with `where` (e.g.
"inputs[3]" or "task 'shapes' example 17 query"), says what is wrong, then the fix.
"""

from __future__ import annotations

import os

from embed2.data import segments

MediaError = segments.MediaError


def error(where: str, problem: str, fix: str) -> MediaError:
  """`MediaError("{where}: {problem}; {fix}")`."""
  return MediaError(f"{where}: {problem}; {fix}")


def check_file(path, where: str, what: str) -> str:
  """An item's `path` as a str, checked to name an existing file (`what`: "image", "audio", ... in errors)."""
  try:
    path = os.fspath(path)
  except TypeError:
    raise error(where, f"{what} path has type {type(path).__name__}", "give a str or os.PathLike path")
  if not os.path.isfile(path):
    raise error(where, f"no such {what} file {path!r}", "check the path (relative paths are resolved "
                f"against the working directory {os.getcwd()!r})")
  return path


def check_bytes(data, where: str, what: str) -> bytes:
  """An item's encoded `data` as non-empty bytes."""
  if not isinstance(data, (bytes, bytearray, memoryview)):
    raise error(where, f"{what} data has type {type(data).__name__}", "give the encoded file as bytes "
                "(e.g. open(path, 'rb').read()) or use path=")
  data = bytes(data)
  if not data:
    raise error(where, f"{what} data is empty (0 bytes)", "give the encoded file's bytes")
  return data
