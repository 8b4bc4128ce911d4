"""notebooks/explore_embeddings.ipynb: committed clean, its Colab set-up, and every cell run headless
against a tiny multimodal checkpoint trained here (each figure drawn, each modality embedded); plus
`embed2.explore`, the helpers it draws with, against float64 references.

Executing the notebook needs the `notebook` extra (nbclient, ipykernel, matplotlib); without it that
test is skipped, the rest run.
"""

import hashlib
import json
import math
import os
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest

from embed2 import explore
from embed2.inference import Audio, Image, MissingFrontendError, Text, Video

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "explore_embeddings.ipynb"


def _tag(cell, tag):
  return tag in cell.get("metadata", {}).get("tags", [])


# ---------------------------------------------------------------------------- the notebook file


def test_committed_notebook_is_clean_and_runs_in_colab():
  nb = json.loads(NOTEBOOK.read_text())  # plain json: no notebook extra needed
  assert nb["nbformat"] == 4
  assert nb["metadata"]["kernelspec"]["name"] == "python3"
  code = [c for c in nb["cells"] if c["cell_type"] == "code"]
  dirty = [c["id"] for c in code if c["outputs"] or c["execution_count"] is not None]
  assert not dirty, f"cells {dirty} have outputs; clear them before committing"
  setup = "".join(code[0]["source"])
  assert '"google.colab" in sys.modules' in setup and "pip" in setup
  # The repository is a form field at the top (Colab's `# @param`), not a placeholder.
  assert setup.index('REPO_URL = ""  # @param') < setup.index("import")
  assert setup.index('REPO_REF = ""  # @param') < setup.index("import")
  params = [c for c in code if _tag(c, "parameters")]
  assert len(params) == 1 and "EMBED2_CHECKPOINT" in "".join(params[0]["source"])
  text = "".join("".join(c["source"]) for c in nb["cells"])
  assert "<org>" not in text and "embed2.export" not in text and "python -m embed2.convert" in text
  assert "frontends land" not in text


def test_colab_setup_takes_the_repository_from_the_form_or_the_environment(monkeypatch):
  """The set-up cell as Colab runs it (google.colab imported), its commands recorded, not run."""
  nb = json.loads(NOTEBOOK.read_text())
  setup = "".join(nb["cells"][1]["source"])
  monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
  calls = []
  monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd))
  monkeypatch.delenv("EMBED2_REPO", raising=False)
  monkeypatch.delenv("EMBED2_REF", raising=False)
  with pytest.raises(ValueError, match="REPO_URL is empty.*set-up form, or set EMBED2_REPO"):
    exec(setup, {})
  assert not calls

  monkeypatch.setenv("EMBED2_REPO", "https://example.org/me/embed2.git")
  monkeypatch.setenv("EMBED2_REF", "v1.2")
  exec(setup, {})
  where = "/content/embed2"
  assert calls == [["git", "clone", "-q", "https://example.org/me/embed2.git", where],
                   ["git", "-C", where, "fetch", "-q", "origin", "v1.2"],
                   ["git", "-C", where, "checkout", "-q", "--detach", "FETCH_HEAD"],
                   [sys.executable, "-m", "pip", "install", "-q", where]]
  calls.clear()
  monkeypatch.delenv("EMBED2_REF")  # the form wins over the environment; no ref: the default branch
  exec(setup.replace('REPO_URL = ""  # @param', 'REPO_URL = "https://example.org/form.git"  # @param'), {})
  assert calls == [["git", "clone", "-q", "https://example.org/form.git", where],
                   [sys.executable, "-m", "pip", "install", "-q", where]]


# --------------------------------------------------------------------------- executing it headless


# A config file beside the run: tiny's PFT stage alone (3 steps of text tasks: one compiled step) with
# the demo's image and audio frontends and media preprocessing, at the tiny size.
MEDIA_TINY = """
from configs import demo, tiny


def get_config(arg=None):
  c = tiny.get_config("pft_steps=3,every=100")
  model = demo.get_config("layers=1,dim=32").model
  model.max_segments = c.model.max_segments  # tiny's batches' segments per row
  c.model = model
  c.stages = [c.stages[0]]
  return c
"""


@pytest.fixture(scope="module")
def media_workdir(tmp_path_factory):
  """The main job on MEDIA_TINY, on one device: a checkpoint that reads text, images, audio and video,
  and its metrics.jsonl."""
  root = tmp_path_factory.mktemp("notebook")
  (root / "media_tiny.py").write_text(MEDIA_TINY)
  workdir = root / "run"
  env = dict(os.environ, XLA_FLAGS=f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count=1",
             PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
  cmd = [sys.executable, "-m", "embed2.main", f"--config={root / 'media_tiny.py'}", f"--workdir={workdir}"]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


def test_notebook_executes_every_cell_and_draws_every_modality(media_workdir):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  pytest.importorskip("ipykernel")
  pytest.importorskip("matplotlib")
  workdir = media_workdir

  nb = nbformat.read(NOTEBOOK, as_version=4)
  # As papermill would: a cell after the parameters that forbids training a demo run if the
  # checkpoint were missing (it would take minutes).
  i = next(i for i, c in enumerate(nb.cells) if _tag(c, "parameters"))
  nb.cells.insert(i + 1, nbformat.v4.new_code_cell("TRAIN_IF_MISSING = False"))
  env = dict(os.environ, EMBED2_CHECKPOINT=str(workdir), JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count=1",
             PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
  env.pop("MPLBACKEND", None)  # the kernel's inline backend puts figures in the outputs
  client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=600,
                                   resources={"metadata": {"path": str(NOTEBOOK.parent)}})
  client.execute(env=env)  # raises CellExecutionError (with the traceback) on any cell error
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(c.execution_count is not None for c in code)  # every cell ran
  assert not [o for c in code for o in c.outputs if o.output_type == "error"]

  def outputs(tag):
    cell = next(c for c in nb.cells if _tag(c, tag))
    text = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
    pngs = sum("image/png" in o.get("data", {}) for o in cell.outputs)
    return text, pngs

  # Each figure: images + video frames, text and cross-modal heatmaps, neighbours' pictures, the
  # map, the MRL curve, the training curves.
  figures = {tag: outputs(tag)[1] for tag in ("media", "heatmap", "neighbours", "map", "mrl", "curves")}
  expected = {"media": 2, "heatmap": 2, "map": 1, "mrl": 1, "curves": 1}
  assert {t: figures[t] for t in expected} == expected and figures["neighbours"] >= 1, figures
  media = next(c for c in nb.cells if _tag(c, "media"))
  assert sum("text/html" in o.get("data", {}) for o in media.outputs) == len(explore.PITCHES)

  text, _ = outputs("load")
  assert f"checkpoint: {workdir}" in text and "'image'" in text and "'audio'" in text
  # Every input embedded, every modality among them; no note of a skipped item.
  text, _ = outputs("embed")
  assert "note:" not in text, text
  n = len(explore.media_entries())
  embedded, total = text.split("embedded ")[1].split(" inputs")[0].split(" of ")
  assert embedded == total and int(total) > n
  modalities = text.split("modalities embedded: ")[1]
  for modality in ("text", "code", "interleaved", "image", "audio", "video", "text+image"):
    assert f"'{modality}'" in modalities, text
  text, _ = outputs("heatmap")
  assert "cross-modal heatmap: no" not in text
  text, _ = outputs("neighbours")
  for query in ("[free text]", "[code]", "[image]", "[audio]", "[video]", "[text+image]"):
    assert query in text, text
  text, _ = outputs("mrl")
  dims = [8, 16, 32]  # the demo's MRL dims at dim=32
  assert [int(line.split()[0]) for line in text.splitlines()[1:4]] == dims
  text, _ = outputs("curves")
  assert "3 metric rows" in text and "[(1, 'pft')]" in text


# -------------------------------------------------------------------------------- explore helpers


def test_pca_2d_matches_covariance_eigenvectors():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(40, 12)) * np.linspace(3.0, 0.2, 12) + rng.normal(size=12)
  xy, ratio = explore.pca_2d(x.astype(np.float32))
  xc = x - x.mean(axis=0)
  evals, evecs = np.linalg.eigh(xc.T @ xc)
  ref = xc @ evecs[:, ::-1][:, :2]
  for j in range(2):
    ref[:, j] *= np.sign(ref[np.argmax(np.abs(ref[:, j])), j])  # the documented sign convention
  np.testing.assert_allclose(xy, ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(ratio, evals[::-1][:2] / evals.sum(), rtol=1e-5)
  with pytest.raises(ValueError, match="N >= 2"):
    explore.pca_2d(x[:1])


def test_cosine_matches_formula():
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(5, 7)) * 3.0, rng.normal(size=(4, 7))
  ref = np.array([[u @ v / (np.linalg.norm(u) * np.linalg.norm(v)) for v in b] for u in a])
  np.testing.assert_allclose(explore.cosine(a, b), ref, rtol=1e-5, atol=1e-6)


def test_mrl_curve_matches_reference():
  rng = np.random.default_rng(2)
  corpus = rng.normal(size=(30, 16))
  rel_q = rng.integers(0, 30, 20)
  q = corpus[rel_q] + rng.normal(size=(20, 16)) * 1.2  # noisy: some queries miss at small dims
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  dims = (4, 8, 16)
  curves = explore.mrl_curve(unit(q), unit(corpus), [{int(r): 1.0} for r in rel_q], dims)
  for j, d in enumerate(dims):
    s = unit(q[:, :d]) @ unit(corpus[:, :d]).T
    rank = 1 + np.sum(s > s[np.arange(20), rel_q][:, None], axis=1)  # 1-based rank of the relevant doc
    assert curves["recall@1"][j] == pytest.approx(np.mean(rank == 1))
    ndcg = np.where(rank <= 10, 1.0 / np.log2(rank + 1), 0.0)
    assert curves["ndcg@10"][j] == pytest.approx(np.mean(ndcg), abs=1e-6)
  assert 0 < curves["recall@1"][0] < 1  # the data can fail the check


def test_bm25_scores_prefers_the_lexical_match():
  corpus = ["tar archive members", "json decoder", "socket server", "zip file reader"]
  queries = ["read tar archive", "decode json text"]
  out = explore.bm25_scores(queries, corpus, [{0: 1.0}, {1: 1.0}])
  assert out == {"recall@1": 1.0, "ndcg@10": 1.0}


class _FakeEmbedder:
  """Embeds by hashing each input's description; refuses media unless `reads_media`."""
  embed_dim = 8

  def __init__(self, reads_media):
    self.reads_media = reads_media
    self.calls = []

  def embed(self, inputs, *, dim=None, task=None, is_query=True):
    self.calls.append((len(inputs), task, is_query))
    if not self.reads_media and any(explore.has_media(x) for x in inputs):
      kind = next(type(y).__name__.lower() for x in inputs for y in (x if isinstance(x, list)
                                                                       else [x])
                  if isinstance(y, (Image, Audio, Video)))
      raise MissingFrontendError(f"this model has no {kind} frontend")
    return np.stack([self.vector(x) for x in inputs])[:, :dim or 8]

  @staticmethod
  def vector(x):
    # A stable digest: hash() of a str changes with each process (PYTHONHASHSEED).
    digest = hashlib.blake2b(explore.describe(x, 200).encode(), digest_size=8).digest()
    v = np.random.default_rng(int.from_bytes(digest, "little")).normal(size=8)
    return (v / np.linalg.norm(v)).astype(np.float32)


def test_embed_entries_notes_missing_frontends_and_keeps_order():
  texts = [explore.Entry(item="find a file", modality="text", label="files", caption="q",
                         is_query=True),
           explore.Entry(item="def find(): pass", modality="code", label="files", caption="c"),
           explore.Entry(item=[Text(text="a "), Text(text="b")], modality="interleaved", label="x",
                         caption="i")]
  media = explore.media_entries()
  entries = [texts[0], media[0], texts[1], *media[1:], texts[2]]

  fake = _FakeEmbedder(reads_media=False)
  e_kd, kept, notes = explore.embed_entries(fake, entries, task="code_search")
  assert kept == texts  # collection order, media left out
  np.testing.assert_array_equal(e_kd, np.stack([fake.vector(e.item) for e in texts]))
  assert {n.split(":")[0] for n in notes} == {"image", "audio", "video", "text+image"}
  assert all("shown but not embedded" in n for n in notes)
  assert (1, "code_search", True) in fake.calls and (1, None, False) in fake.calls  # docs: no task

  fake = _FakeEmbedder(reads_media=True)
  e_kd, kept, notes = explore.embed_entries(fake, entries, dim=4)
  assert kept == entries and not notes and e_kd.shape == (len(entries), 4)

  e_kd, kept, notes = explore.embed_entries(_FakeEmbedder(False), media)
  assert e_kd.shape == (0, 8) and not kept and len(notes) == 4


def test_training_series_stages_and_eval_keys():
  rows = [{"step": 1, "stage": "pft", "loss": 3.0, "temperature": 0.05},
          {"step": 2, "stage": "pft", "loss": "nan", "skipped": True},
          {"step": 3, "stage": "ft", "loss": 1.5, "task": "pairs"},
          {"step": 3, "eval/demo/code_search/ndcg@10/dim_64": 0.4,
           "eval/demo/code_search/ndcg@10/dim_16": 0.2, "eval/demo/doc/ndcg@10/dim_64": 0.3,
           "eval/demo/doc/recall@1/dim_64": 0.1}]
  steps, values = explore.series(rows, "loss")
  np.testing.assert_array_equal(steps, [1, 2, 3])
  assert values[0] == 3.0 and math.isnan(values[1]) and values[2] == 1.5
  assert explore.series(rows, "skipped")[0].size == 0  # booleans are not curves
  assert explore.stage_starts(rows) == [(1, "pft"), (3, "ft")]
  assert explore.eval_keys(rows) == ["eval/demo/code_search/ndcg@10/dim_64",
                                     "eval/demo/doc/ndcg@10/dim_64"]
  assert explore.eval_keys(rows[:3]) == []


def test_find_workdir(tmp_path):
  (tmp_path / "run" / "checkpoints" / "4").mkdir(parents=True)
  (tmp_path / "run" / "soup").mkdir()
  (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
  for p in ("run", "run/checkpoints", "run/checkpoints/4", "run/soup"):
    assert explore.find_workdir(tmp_path / p) == (tmp_path / "run").resolve()
  (tmp_path / "imported").mkdir()
  assert explore.find_workdir(tmp_path / "imported") is None


def test_generated_media():
  img = explore.make_image("triangle", "blue", size=64, seed=3)
  assert img.shape == (64, 64, 3) and img.dtype == np.uint8
  blue = np.all(img == explore.COLOURS["blue"], axis=-1)
  assert blue[32, 32] and not blue[0, 0] and not blue[63, 63]
  rows = np.flatnonzero(blue.any(axis=1))
  assert blue[rows[0]].sum() < blue[rows[-1]].sum() / 4  # apex narrow, base wide
  with pytest.raises(ValueError, match="shape='hexagon'"):
    explore.make_image("hexagon", "red")

  tone = explore.make_tone(440.0, seconds=0.5, sample_rate=8000)
  assert tone.shape == (4000,) and tone.dtype == np.float32
  assert np.abs(tone).max() <= 0.5 + 1e-6 and abs(tone[0]) < 1e-3 and abs(tone[-1]) < 1e-3
  assert np.argmax(np.abs(np.fft.rfft(tone))) * 8000 / 4000 == pytest.approx(440.0)

  for direction, sign in (("right", 1), ("left", -1)):
    video = explore.make_video("square", "red", direction, frames=6, size=32)
    assert video.shape == (6, 32, 32, 3)
    red = np.all(video == explore.COLOURS["red"], axis=-1)  # (T, H, W)
    cx = [np.flatnonzero(f.any(axis=0)).mean() for f in red]
    assert np.all(sign * np.diff(cx) > 0)

  entries = explore.media_entries()
  assert [sum(e.modality == m for e in entries) for m in ("image", "audio", "video", "text+image")
          ] == [9, 3, 2, 3]
  assert all(explore.has_media(e.item) for e in entries)
  assert explore.thumbnail(entries[-1].item) is entries[-1].item[1].pixels
  assert explore.thumbnail(entries[9].item) is None  # audio


def test_describe_and_format_hits():
  assert explore.describe("a  b\n c") == "a b c"
  assert explore.describe("x" * 100, 10) == "x" * 9 + "\u2026"
  assert explore.describe(Image(pixels=np.zeros((4, 5, 3), np.uint8))) == "[image 4x5]"
  assert explore.describe(Audio(samples=np.zeros(8000), sample_rate=16000)) == "[audio 0.5 s]"
  assert explore.describe([Text(text="hi"), Video(frames=np.zeros((3, 2, 2, 3)), fps=2.0)]) == \
      "hi + [video 3 frames]"
  entries = [explore.Entry(item="alpha", modality="text", label="a", caption=""),
             explore.Entry(item="beta", modality="code", label="b", caption="")]
  lines = explore.format_hits(np.array([0.9, -0.25]), np.array([1, 0]), entries).splitlines()
  assert lines[0].split() == ["1.", "+0.900", "code", "b", "beta"]
  assert lines[1].split() == ["2.", "-0.250", "text", "a", "alpha"]
  assert explore.pick_task({"pairs": "q: "}, "code_search", "pairs") == "pairs"
  assert explore.pick_task({}, "code_search") is None


def test_plots_return_figures():
  matplotlib = pytest.importorskip("matplotlib")
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rng = np.random.default_rng(4)
  figs = [
      explore.plot_images([explore.make_image("circle", "red")] * 3, ["a", "b", "c"], per_row=2),
      explore.plot_heatmap(rng.normal(size=(3, 4)), list("abc"), list("wxyz")),
      explore.plot_map(rng.normal(size=(10, 2)), {"modality": ["t"] * 5 + ["c"] * 5,
                                                  "class": list("ababababab")}),
      explore.plot_mrl((16, 32, 64), {"recall@1": np.array([0.1, 0.2, 0.3])},
                       baselines={"recall@1": 0.25}),
      explore.plot_training([{"step": 1, "stage": "pft", "loss": 2.0, "temperature": 0.05},
                             {"step": 2, "stage": "ft", "loss": 1.0, "temperature": 0.04,
                              "eval/demo/t/ndcg@10/dim_8": 0.5}]),
  ]
  assert [len(f.axes) for f in figs] == [4, 2, 2, 1, 3]  # heatmap: + colorbar; training: 2 + eval
  assert explore.plot_training([{"step": 1, "stage": "pft"}]) is None
  for f in figs:
    plt.close(f)
