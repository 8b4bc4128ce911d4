"""The module layout: imports flow one way, and every import is at the top of its module.

Read from the source (ast), nothing imported:
- no import cycle between embed2's modules, nor between its packages (embed2/data, embed2/model,
  embed2/eval, embed2/train, embed2/bench, and each top-level module of embed2/ on its own);
- no function-level import outside embed2/bench/, except the optional heavy dependencies listed in
  OPTIONAL, each with a comment on its line saying why it is imported there.
"""

from __future__ import annotations

import ast
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "embed2"

# Imported inside functions on purpose: optional extras (parity, mteb, video, notebook), imports
# that cost seconds and serve one path, and data_pipelines (DESIGN.md: embed2 imports it only where a
# task name is resolved). Anything else belongs at the top of its module.
OPTIONAL = ("data_pipelines", "torch", "transformers", "sentence_transformers", "mteb", "av", "matplotlib", "pyarrow",
            "scipy", "tensorboardX", "safetensors", "onnxruntime", "optimum")


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str, modules) -> str | None:
  """The embed2 module an import of `name` loads (the longest known prefix), else None."""
  while name:
    if name in modules:
      return name
    name = name.rpartition(".")[0]
  return None


def _imports(tree: ast.Module, here: str, modules, *, top_level_only: bool):
  """(line, imported embed2 module) of the module's imports; top_level_only skips function bodies."""
  out = []

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
      if isinstance(child, ast.Import) and not (top_level_only and in_function):
        for a in child.names:
          out.append((child.lineno, a.name))
      elif isinstance(child, ast.ImportFrom) and not (top_level_only and in_function):
        assert not child.level, f"{here}: relative imports are not used in embed2"
        base = child.module or ""
        for a in child.names:
          full = f"{base}.{a.name}"
          out.append((child.lineno, full if _resolve(full, modules) == full else base))
      visit(child, inside)

  visit(tree, False)
  return [(line, m) for line, name in out if (m := _resolve(name, modules)) and m != here]


def _graph(group) -> dict[str, set[str]]:
  modules = _modules()
  graph: dict[str, set[str]] = {}
  for name, path in modules.items():
    tree = ast.parse(path.read_text(), str(path))
    for _, dep in _imports(tree, name, modules, top_level_only=True):
      a, b = group(name), group(dep)
      if a != b:
        graph.setdefault(a, set()).add(b)
  return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state: dict[str, int] = {}
  stack: list[str] = []

  def dfs(n):
    state[n] = 1
    stack.append(n)
    for m in sorted(graph.get(n, ())):
      if state.get(m) == 1:
        return stack[stack.index(m):] + [m]
      if m not in state:
        found = dfs(m)
        if found:
          return found
    stack.pop()
    state[n] = 2
    return None

  for n in sorted(graph):
    if n not in state:
      found = dfs(n)
      if found:
        return found
  return None


def _package_of(module: str) -> str:
  """embed2.data.x -> embed2.data; a top-level module of embed2/ is a node of its own."""
  parts = module.split(".")
  return ".".join(parts[:2])


def test_no_import_cycle_between_modules():
  cycle = _cycle(_graph(lambda m: m))
  assert cycle is None, " -> ".join(cycle)


def test_no_import_cycle_between_packages():
  cycle = _cycle(_graph(_package_of))
  assert cycle is None, " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": {"c"}}) is None


def _has_reason(line: str) -> bool:
  """A comment on the line that says something besides a pylint pragma."""
  comment = line.partition("#")[2]
  return bool(comment.split("pylint:")[0].strip(" ;(),"))


def _function_level_imports():
  found = []
  for path in sorted(PACKAGE.rglob("*.py")):
    if "bench" in path.relative_to(PACKAGE).parts:
      continue
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source, str(path))
    for fn in ast.walk(tree):
      if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        continue
      for node in ast.walk(fn):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
          names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
          found.append((path.relative_to(ROOT), node.lineno, names, lines[node.lineno - 1]))
  return found


def test_function_level_imports_are_optional_heavy_dependencies_with_a_reason():
  bad = []
  for path, line, names, text in _function_level_imports():
    optional = all(n.split(".")[0] in OPTIONAL for n in names)
    if not optional or not _has_reason(text):
      bad.append(f"{path}:{line}: {text.strip()}")
  assert not bad, ("imports inside functions (move them to the top of the module, or, for an optional "
                   "heavy dependency, say why on the line):\n" + "\n".join(bad))


@pytest.mark.parametrize("source, want", [
    ("import os\ndef f():\n  import torch  # parity extra\n", []),
    ("def f():\n  import json\n", ["json"]),
    ("def f():\n  import torch\n", ["torch"]),
    ("def f():\n  import torch  # pylint: disable=g-import-not-at-top\n", ["torch"]),
    ("def f():\n  import av  # video extra; pylint: disable=g-import-not-at-top\n", []),
])
def test_function_level_import_rule_flags_what_it_should(tmp_path, monkeypatch, source, want):
  pkg = tmp_path / "embed2"
  pkg.mkdir()
  (pkg / "m.py").write_text(source)
  monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
  monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
  flagged = [n for p, _, names, text in _function_level_imports() for n in names
             if not (all(x.split(".")[0] in OPTIONAL for x in names) and _has_reason(text))]
  assert flagged == want
