"""No test draws from an unseeded random generator: a failure must replay with the same inputs.

Tests take the `rng` fixture (or `fixture_rng` in wider fixtures; tests/conftest.py), seeded from the
test's node id and $EMBED2_TEST_SEED, or a generator seeded with a constant. This scans the test
sources for the ways to get fresh entropy instead.
"""
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

TESTS = pathlib.Path(__file__).resolve().parent

# numpy.random attributes that build a seeded generator (their seed is checked separately).
_NUMPY_SEEDED = ("default_rng", "Generator", "SeedSequence", "PCG64", "PCG64DXSM", "Philox",
                 "SFC64", "MT19937", "BitGenerator")

# (regex, why): each matches one way to draw unseeded or per-process random numbers.
UNSEEDED = [
    (re.compile(r"default_rng\(\s*(None\s*)?\)"), "default_rng() with no seed"),
    (re.compile(r"SeedSequence\(\s*(None\s*)?\)"), "SeedSequence() with no entropy given"),
    (re.compile(r"\bnp\.random\.(?!(?:" + "|".join(_NUMPY_SEEDED) + r")\b)\w+\s*\("),
     "numpy's global generator (np.random.rand / randn / randint / normal / ... / RandomState)"),
    (re.compile(r"\bnumpy\.random\.(?!(?:" + "|".join(_NUMPY_SEEDED) + r")\b)\w+\s*\("),
     "numpy's global generator"),
    (re.compile(r"^\s*(import random\b|from random import)"), "the stdlib random module"),
    (re.compile(r"(?<![\w.])hash\("), "hash(): str hashes change with each process"),
    (re.compile(r"\btorch\.(rand|randn|randint|randperm|normal|bernoulli|multinomial)\((?!.*generator=)"),
     "torch's global generator (pass generator=)"),
    (re.compile(r"\bos\.urandom\(|\bsecrets\.|\buuid\.uuid4\("), "OS entropy"),
]


def unseeded_uses(source: str) -> list[tuple[int, str, str]]:
  """(line number, line, why) for every unseeded draw in `source` (comments ignored)."""
  found = []
  for number, line in enumerate(source.splitlines(), 1):
    code = line.split("#", 1)[0]
    for pattern, why in UNSEEDED:
      if pattern.search(code):
        found.append((number, line.strip(), why))
  return found


def test_no_test_file_draws_unseeded_random_numbers():
  files = sorted(p for p in TESTS.glob("*.py") if p.name != pathlib.Path(__file__).name)
  assert len(files) > 20  # the scan sees the suite
  bad = [f"{path.name}:{number}: {why}: {line}"
         for path in files for number, line, why in unseeded_uses(path.read_text())]
  assert not bad, ("unseeded random numbers (use the `rng` fixture, `fixture_rng(request)` in a "
                   "wider fixture, or a constant seed):\n" + "\n".join(bad))


@pytest.mark.parametrize("line", [
    "RNG = np.random.default_rng()",
    "rng = np.random.default_rng(None)",
    "from numpy.random import default_rng; g = default_rng()",
    "seed = np.random.SeedSequence().entropy % 2**32",
    "x = np.random.rand(3, 4)",
    "x = np.random.randn(3)",
    "i = np.random.randint(0, 9)",
    "np.random.shuffle(a)",
    "np.random.seed(0)",  # reseeds the shared global generator: order-dependent across tests
    "state = numpy.random.RandomState()",
    "import random",
    "from random import choice",
    "g = np.random.default_rng(abs(hash(text)) % 2**32)",
    "t = torch.randn(3, 4)",
    "t = torch.rand(2)",
    "seed = int.from_bytes(os.urandom(4), 'little')",
])
def test_scan_catches(line):
  assert unseeded_uses(line), line


@pytest.mark.parametrize("line", [
    "rng = np.random.default_rng(seed)",
    "rng = np.random.default_rng(7)",
    "ss = np.random.SeedSequence(1234)",
    "p.copy_(torch.randn(p.shape, generator=g) * std)",
    "digest = hashlib.blake2b(name.encode(), digest_size=8).digest()",
    "seed = stable_seed(request.node.nodeid)",
    "x = rng.normal(size=(3, 4))  # not np.random.rand(3)",
    "key = jax.random.key(0)",
])
def test_scan_passes(line):
  assert not unseeded_uses(line), line


def _run_inner(tmp_path, seed_env):
  env = {k: v for k, v in os.environ.items() if k != "EMBED2_TEST_SEED"}
  env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # the inner test needs no plugin (hypothesis alone: ~1 s)
  if seed_env is not None:
    env["EMBED2_TEST_SEED"] = seed_env
  p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_x.py"],
                     cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
  assert p.returncode == 1, p.stdout + p.stderr  # the inner test fails on purpose
  draw = int(re.search(r"^draw (\d+)$", p.stdout, re.M).group(1))
  seed = int(re.search(r"^rng: seed (\d+)$", p.stdout, re.M).group(1))
  fixture_seed = int(re.search(r"^fixture data: seed (\d+)$", p.stdout, re.M).group(1))
  return draw, seed, fixture_seed, p.stdout


def test_rng_fixture_replays_and_reports_its_seed(tmp_path):
  """A failing test's report names its seeds; the same test draws the same numbers on every run
  and other numbers under another EMBED2_TEST_SEED."""
  shutil.copy(TESTS / "conftest.py", tmp_path / "conftest.py")
  (tmp_path / "test_x.py").write_text(
      "import pytest\n\n"
      "@pytest.fixture(scope='module')\n"
      "def data(request, fixture_rng):\n"
      "  return fixture_rng(request).integers(1 << 62)\n\n"
      "def test_draw(rng, data):\n"
      "  print('draw', rng.integers(1 << 62))\n"
      "  assert False\n")
  first = _run_inner(tmp_path, None)
  assert "random seeds" in first[3] and "EMBED2_TEST_SEED=unset" in first[3]
  assert first[:3] == _run_inner(tmp_path, None)[:3]  # replayed
  # The printed seed is the generator's: it reproduces the draw.
  assert np.random.default_rng(first[1]).integers(1 << 62) == first[0]
  other = _run_inner(tmp_path, "7")
  assert "EMBED2_TEST_SEED='7'" in other[3]
  assert other[0] != first[0] and other[1] != first[1] and other[2] != first[2]
