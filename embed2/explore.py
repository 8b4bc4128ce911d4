"""Looking at embeddings: what `notebooks/explore_embeddings.ipynb` computes and draws.

  entries = media_entries() + [Entry(item="def f(x): ...", modality="code", label="numeric",
                                     caption="f")]
  e_nd, kept, notes = embed_entries(embedder, entries)    # media without a frontend -> a note
  xy_n2, ratio_2 = pca_2d(e_nd)                            # 2-D map
  curves = mrl_curve(q_qd, corpus_nd, relevance, embedder.dims)
  fig = plot_mrl(embedder.dims, curves)

Four parts, one concept (inspecting a trained model):
  generated media   small images (shapes in colours), tones, moving-shape videos, made with numpy so
                    the notebook works offline; `Entry` pairs each input with its modality and class.
  embedding         `embed_entries` embeds a mixed collection group by group; a modality the model
                    cannot read yet (`MissingFrontendError`) becomes a printed note, not a crash, so
                    the notebook shows more as frontends arrive without being edited.
  analysis          cosine similarity, a PCA 2-D map, the MRL curve (retrieval quality per dim),
                    training curves from a workdir's metrics (`metrics_writer.read_metrics`).
  plots             matplotlib figures of the above (matplotlib is imported only by them: the
                    `notebook` extra).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np
from etils import epath

from embed2 import checkpoint as ckpt_lib
from embed2.eval import bm25
from embed2.eval import metrics as metrics_lib
from embed2.eval import retrieval
from embed2.eval import suites
from embed2.inference import Audio, Image, MissingFrontendError, Text, Video
from embed2.train import metrics_writer

# ------------------------------------------------------------------------------ generated media

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (215, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 215)}
PITCHES = {"low": 220.0, "middle": 440.0, "high": 880.0}  # Hz


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float) -> np.ndarray:
  """Boolean (size, size) mask of a shape centred at (cx, cy) pixels with half-size r."""
  y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
  if shape == "circle":
    return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
  if shape == "square":
    return (np.abs(x - cx) <= r) & (np.abs(y - cy) <= r)
  if shape == "triangle":  # apex up: the half-width grows linearly from 0 at the top to r at the base
    top, bottom = cy - r, cy + r
    return (y >= top) & (y <= bottom) & (np.abs(x - cx) <= (y - top) / 2)
  raise ValueError(f"shape={shape!r} is unknown; choose one of {SHAPES}")


def make_image(shape: str, colour: str, *, size: int = 64, seed: int = 0) -> np.ndarray:
  """A coloured shape on a light, slightly noisy background: uint8 (size, size, 3)."""
  if colour not in COLOURS:
    raise ValueError(f"colour={colour!r} is unknown; choose one of {sorted(COLOURS)}")
  rng = np.random.default_rng(seed)
  img = 235.0 + rng.normal(0.0, 6.0, (size, size, 3))
  img[_shape_mask(shape, size, size / 2, size / 2, size * 0.3)] = COLOURS[colour]
  return np.clip(img, 0, 255).astype(np.uint8)


def make_tone(freq_hz: float, *, seconds: float = 1.0, sample_rate: int = 16000) -> np.ndarray:
  """A sine tone at half amplitude with 10 ms fades (no clicks): float32 (seconds * sample_rate,)."""
  t = np.arange(int(round(seconds * sample_rate))) / sample_rate
  fade = np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.01)
  return (0.5 * fade * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32)


def make_video(shape: str, colour: str, direction: str, *, frames: int = 8, size: int = 48,
               seed: int = 0) -> np.ndarray:
  """A shape crossing the frame left-to-right ("right") or back ("left"): uint8 (T, size, size, 3)."""
  if direction not in ("left", "right"):
    raise ValueError(f"direction={direction!r}; choose 'left' or 'right'")
  rng = np.random.default_rng(seed)
  xs = np.linspace(0.25 * size, 0.75 * size, frames)
  out = np.empty((frames, size, size, 3), np.uint8)
  for t, cx in enumerate(xs if direction == "right" else xs[::-1]):
    img = 235.0 + rng.normal(0.0, 6.0, (size, size, 3))
    img[_shape_mask(shape, size, cx, size / 2, size * 0.2)] = COLOURS[colour]
    out[t] = np.clip(img, 0, 255).astype(np.uint8)
  return out


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Entry:
  """One input of the collection with what we know about it.

  Attributes:
    item: what `Embedder.embed` gets: a str, an inference item, or a list of items (interleaved).
    modality: its kind, used for colouring and grouping ("text", "code", "interleaved" (text
      parts), "image", "audio", "video", "text+image", ...).
    label: its class (a stdlib topic family, a shape, a pitch).
    caption: a few words saying what it is (shown next to hits).
    is_query: embedded as a query (with the task string) rather than as a document.
  """
  item: Any
  modality: str
  label: str
  caption: str
  is_query: bool = False


def media_entries(*, seed: int = 0) -> list[Entry]:
  """Generated images (3 shapes x 3 colours), tones (3 pitches), videos (2 directions) and
  interleaved text+image inputs, each with its caption and class."""
  out = []
  for i, (shape, colour) in enumerate((s, c) for s in SHAPES for c in COLOURS):
    out.append(Entry(item=Image(pixels=make_image(shape, colour, seed=seed + i)), modality="image",
                     label=shape, caption=f"a {colour} {shape}"))
  for name, hz in PITCHES.items():
    out.append(Entry(item=Audio(samples=make_tone(hz), sample_rate=16000), modality="audio",
                     label=f"{name} tone", caption=f"a {name} tone at {hz:.0f} Hz"))
  for i, (shape, direction) in enumerate((("circle", "right"), ("square", "left"))):
    out.append(Entry(item=Video(frames=make_video(shape, "red", direction, seed=seed + i), fps=4.0),
                     modality="video", label=shape, caption=f"a red {shape} moving {direction}"))
  for i, shape in enumerate(SHAPES):
    out.append(Entry(item=[Text(text=f"a picture of a {shape}: "),
                           Image(pixels=make_image(shape, "blue", seed=seed + 100 + i))],
                     modality="text+image", label=shape, caption=f"text + image of a blue {shape}"))
  return out


def has_media(item: Any) -> bool:
  """Whether an input holds an image, audio or video item (directly or inside an interleaved list)."""
  if isinstance(item, (list, tuple)):
    return any(has_media(x) for x in item)
  return isinstance(item, (Image, Audio, Video))


def clip(text: str, width: int) -> str:
  """Whitespace collapsed, cut to `width` characters (an ellipsis marks a cut)."""
  text = " ".join(text.split())
  return text if len(text) <= width else text[:max(width - 1, 0)] + "…"


def describe(item: Any, width: int = 80) -> str:
  """A one-line description of an input: its text (clipped), or the media's kind and size."""
  if isinstance(item, (list, tuple)):
    return clip(" + ".join(describe(x, width) for x in item), width)
  if isinstance(item, (str, Text)):
    return clip(item if isinstance(item, str) else item.text, width) or "''"
  if isinstance(item, Image):
    return (f"[image {'x'.join(map(str, item.pixels.shape[:2]))}]" if item.pixels is not None
            else f"[image {item.path}]")
  if isinstance(item, Audio):
    return (f"[audio {len(item.samples) / item.sample_rate:.1f} s]" if item.samples is not None
            else f"[audio {item.path}]")
  if isinstance(item, Video):
    return f"[video {len(item.frames)} frames]" if item.frames is not None else f"[video {item.path}]"
  return clip(repr(item), width)


def thumbnail(item: Any) -> np.ndarray | None:
  """A picture of an input, if it has one: an image's pixels, a video's middle frame, the first
  picture inside an interleaved input; None for text and audio."""
  if isinstance(item, (list, tuple)):
    return next((t for t in map(thumbnail, item) if t is not None), None)
  if isinstance(item, Image) and item.pixels is not None:
    return item.pixels
  if isinstance(item, Video) and item.frames is not None:
    return item.frames[len(item.frames) // 2]
  return None


# ------------------------------------------------------------------------------------ embedding


def pick_task(task_strings: Mapping[str, str], *names: str) -> str | None:
  """The first of `names` the model has a task string for (None: embed without one)."""
  return next((n for n in names if n in task_strings), None)


def embed_entries(embedder, entries: Sequence[Entry], *, dim: int | None = None,
                  task: str | None = None) -> tuple[np.ndarray, list[Entry], list[str]]:
  """Embeds a mixed collection, one `embed` call per (modality, is_query, holds media) group.

  A group the model cannot read (`MissingFrontendError`: no image / audio / video frontend) is
  skipped with a note; everything else is embedded. Queries get `task`'s task string.

  Args:
    embedder: an `embed2.inference.Embedder` (or anything with its `embed` signature).
    entries: the collection.
    dim: MRL dim (None: full).
    task: task name for the queries' task string (None: none).

  Returns:
    e_kd: float32 (K, dim) embeddings of the kept entries, in collection order;
    kept: the K entries embedded;
    notes: one line per modality skipped, saying why.
  """
  # Text-only inputs never share a call with media ones: a missing frontend skips only the latter.
  groups: dict[tuple[str, bool, bool], list[int]] = {}
  for i, e in enumerate(entries):
    groups.setdefault((e.modality, e.is_query, has_media(e.item)), []).append(i)
  rows: dict[int, np.ndarray] = {}
  notes: list[str] = []
  for (modality, is_query, _), idx in groups.items():
    try:
      e_nd = embedder.embed([entries[i].item for i in idx], dim=dim, is_query=is_query,
                            task=task if is_query else None)
    except MissingFrontendError as err:
      note = f"{modality}: {len(idx)} items shown but not embedded: {err}"
      if note not in notes:
        notes.append(note)
      continue
    rows.update(zip(idx, np.asarray(e_nd, np.float32)))
  keep = sorted(rows)
  d = dim or getattr(embedder, "embed_dim", 0)
  e_kd = np.stack([rows[i] for i in keep]) if keep else np.zeros((0, d), np.float32)
  return e_kd, [entries[i] for i in keep], notes


def format_hits(scores_k: np.ndarray, ids_k: np.ndarray, entries: Sequence[Entry],
                width: int = 70) -> str:
  """Search hits as text lines: rank, cosine, modality, class, and what the hit is."""
  lines = []
  for rank, (s, i) in enumerate(zip(np.asarray(scores_k), np.asarray(ids_k)), 1):
    e = entries[int(i)]
    lines.append(f"  {rank}. {float(s):+.3f}  {e.modality:<11} {e.label:<14} "
                 f"{describe(e.item, width)}")
  return "\n".join(lines)


# ------------------------------------------------------------------------------------- analysis


def cosine(a_nd: np.ndarray, b_md: np.ndarray) -> np.ndarray:
  """Cosine similarity of every row of a with every row of b: float32 (N, M)."""
  a = np.asarray(a_nd, np.float64)
  b = np.asarray(b_md, np.float64)
  a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
  b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
  return (a @ b.T).astype(np.float32)


def pca_2d(x_nd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Projection onto the two leading principal components.

  Signs are fixed (each component's largest-magnitude projection is positive) so the same
  embeddings always draw the same map.

  Args:
    x_nd: (N, d) points, N >= 2.

  Returns:
    xy_n2: float64 (N, 2) coordinates (centred); ratio_2: float64 (2,) share of the total
    variance each component explains (0 where the data has no variance).
  """
  x = np.asarray(x_nd, np.float64)
  if x.ndim != 2 or x.shape[0] < 2:
    raise ValueError(f"pca_2d needs (N, d) points with N >= 2; got shape {x.shape}")
  x = x - x.mean(axis=0)
  u, s, _ = np.linalg.svd(x, full_matrices=False)
  k = min(2, s.size)
  xy = np.zeros((x.shape[0], 2))
  xy[:, :k] = u[:, :k] * s[:k]
  for j in range(k):
    if xy[np.argmax(np.abs(xy[:, j])), j] < 0:
      xy[:, j] = -xy[:, j]
  total = float(np.sum(s ** 2))
  ratio = np.zeros(2)
  if total > 0:
    ratio[:k] = s[:k] ** 2 / total
  return xy, ratio


def mrl_curve(q_qd: np.ndarray, corpus_nd: np.ndarray, relevance: metrics_lib.Relevance,
              dims: Sequence[int], names: Sequence[str] = ("recall@1", "ndcg@10")
              ) -> dict[str, np.ndarray]:
  """Retrieval quality at each MRL dim, from full-dim embeddings (`retrieval.retrieval_sweep`).

  Returns:
    {metric name: float64 (len(dims),)}, in the order of `dims`.
  """
  ks = sorted({int(n.split("@")[1]) for n in names if "@" in n} | {1, 10})
  res = retrieval.retrieval_sweep(q_qd, corpus_nd, relevance, dims=dims, ks=ks, names=names)
  return {n: np.asarray([res[f"{n}/dim_{d}"] for d in dims], np.float64) for n in names}


def bm25_scores(queries: Sequence[str], corpus: Sequence[str], relevance: metrics_lib.Relevance,
                names: Sequence[str] = ("recall@1", "ndcg@10")) -> dict[str, float]:
  """The lexical BM25 baseline on the same retrieval problem: {metric name: value}."""
  ks = sorted({int(n.split("@")[1]) for n in names if "@" in n} | {1, 10})
  _, ranked = bm25.BM25(corpus).topk(queries, max(ks))
  m = metrics_lib.retrieval_metrics(ranked, relevance, ks, num_docs=len(corpus))
  return {n: float(m[n]) for n in names}


def find_workdir(path: str | os.PathLike, levels: int = 3) -> epath.Path | None:
  """The training workdir of a checkpoint path (local or gs:// / s3://): the path or its nearest
  parent (up to `levels` above) holding training metrics (`metrics_writer.has_metrics`). Works for a
  workdir, its checkpoints/, a step, or its soup/."""
  p = epath.Path(path)
  if not ckpt_lib.is_remote(p):
    p = p.resolve()
  for cand in [p, *p.parents][:levels + 1]:
    if metrics_writer.has_metrics(cand):
      return cand
  return None


def _number(v: Any) -> float | None:
  """A metrics.jsonl value as a float: numbers, and the strings "nan" / "inf" the writer uses for
  non-finite values; None for anything else."""
  if isinstance(v, bool):
    return None
  if isinstance(v, (int, float)):
    return float(v)
  if isinstance(v, str):
    try:
      return float(v)
    except ValueError:
      return None
  return None


def series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps int64 (n,), values float64 (n,)) of the rows that log `key` as a number."""
  pts = [(int(r["step"]), _number(r[key])) for r in rows if key in r and "step" in r]
  pts = [(s, v) for s, v in pts if v is not None]
  return np.asarray([s for s, _ in pts], np.int64), np.asarray([v for _, v in pts], np.float64)


def stage_starts(rows: Sequence[Mapping[str, Any]]) -> list[tuple[int, str]]:
  """(first logged step, stage name) of each stage, in log order."""
  out, last = [], None
  for r in rows:
    stage = r.get("stage")
    if isinstance(stage, str) and stage != last:
      out.append((int(r["step"]), stage))
      last = stage
  return out


def eval_keys(rows: Sequence[Mapping[str, Any]], metric: str = "ndcg@10") -> list[str]:
  """Logged eval keys ("eval/<suite>/<task>/<metric>/dim_<d>") of `metric` at the largest dim."""
  return suites.full_dim_keys((k for r in rows for k in r if k.startswith("eval/")), metric)


# ---------------------------------------------------------------------------------------- plots


def _plt():
  import matplotlib.pyplot as plt  # the notebook extra; only the plots need it  # pylint: disable=g-import-not-at-top
  return plt


def plot_images(images: Sequence[np.ndarray], titles: Sequence[str], *, title: str = "",
                per_row: int = 6):
  """A grid of uint8 (H, W, 3) images with a title under each: a matplotlib Figure."""
  plt = _plt()
  n = len(images)
  cols = max(1, min(per_row, n))
  rows = max(1, math.ceil(n / cols))
  fig, axes = plt.subplots(rows, cols, figsize=(1.8 * cols, 1.9 * rows), squeeze=False)
  for ax in axes.ravel():
    ax.axis("off")
  for ax, img, t in zip(axes.ravel(), images, titles):
    ax.imshow(img)
    ax.set_title(clip(t, 28), fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return fig


def plot_heatmap(sim_nm: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str], *,
                 title: str = "cosine similarity"):
  """An (N, M) similarity matrix with labelled rows and columns: a matplotlib Figure."""
  plt = _plt()
  n, m = sim_nm.shape
  fig, ax = plt.subplots(figsize=(2.5 + 0.32 * m, 1.5 + 0.3 * n))
  im = ax.imshow(sim_nm, cmap="viridis", aspect="auto")
  ax.set_xticks(range(m), [clip(s, 24) for s in col_labels],
                rotation=60, ha="right", fontsize=7)
  ax.set_yticks(range(n), [clip(s, 40) for s in row_labels], fontsize=7)
  fig.colorbar(im, ax=ax, fraction=0.04)
  ax.set_title(title)
  fig.tight_layout()
  return fig


def plot_map(xy_n2: np.ndarray, colourings: Mapping[str, Sequence[str]], *, title: str = ""):
  """A 2-D map drawn once per colouring ({name: class of each point}), legend beside each."""
  plt = _plt()
  fig, axes = plt.subplots(1, len(colourings), figsize=(6.5 * len(colourings), 5), squeeze=False)
  markers = "osD^v<>Ph*X"
  for ax, (name, labels) in zip(axes[0], colourings.items()):
    classes = sorted(set(labels))
    cmap = plt.get_cmap("tab20" if len(classes) > 10 else "tab10")
    labels = np.asarray(labels)
    for j, c in enumerate(classes):
      sel = labels == c
      ax.scatter(xy_n2[sel, 0], xy_n2[sel, 1], s=28, color=cmap(j % cmap.N),
                 marker=markers[j % len(markers)], label=f"{c} ({int(sel.sum())})", alpha=0.85)
    ax.set_title(f"coloured by {name}")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return fig


def plot_mrl(dims: Sequence[int], curves: Mapping[str, np.ndarray], *,
             baselines: Mapping[str, float] | None = None, title: str = "MRL trade-off"):
  """Retrieval quality against embedding dim (log-2 axis), dashed lines for baselines (BM25)."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6, 4))
  for j, (name, values) in enumerate(curves.items()):
    colour = f"C{j}"
    ax.plot(dims, values, marker="o", color=colour, label=name)
    if baselines and name in baselines:
      ax.axhline(baselines[name], color=colour, linestyle="--", linewidth=1,
                 label=f"{name} (BM25)")
  ax.set_xscale("log", base=2)
  ax.set_xticks(list(dims), [str(d) for d in dims])
  ax.set_xlabel("embedding dim (MRL prefix)")
  ax.set_ylabel("score")
  ax.set_ylim(0, 1)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title(title)
  fig.tight_layout()
  return fig


def plot_training(rows: Sequence[Mapping[str, Any]], *,
                  keys: Sequence[str] = ("loss", "temperature", "learning_rate"),
                  eval_metric: str = "ndcg@10"):
  """Training curves of metrics.jsonl rows: one panel per logged key, plus one of the eval metric
  per task if any evaluation was logged; stage starts as dotted lines. None if nothing is logged."""
  plt = _plt()
  panels = [(k, [k]) for k in keys if series(rows, k)[0].size]
  ev = eval_keys(rows, eval_metric)
  if ev:
    panels.append((f"eval {eval_metric} ({ev[0].rsplit('/', 1)[1]})", ev))
  if not panels:
    return None
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.3), squeeze=False)
  starts = stage_starts(rows)
  for ax, (name, ks) in zip(axes[0], panels):
    for k in ks:
      steps, values = series(rows, k)
      label = k.split("/")[2] if k.startswith("eval/") else None
      ax.plot(steps, values, marker="o" if steps.size < 30 else None, markersize=3, label=label)
    for step, stage in starts:
      ax.axvline(step, color="grey", linestyle=":", linewidth=1)
      ax.annotate(stage, (step, 1.0), xycoords=("data", "axes fraction"), fontsize=7,
                  va="top", ha="left", color="grey")
    ax.set_title(name)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if ks[0].startswith("eval/"):
      ax.legend(fontsize=7)
  fig.tight_layout()
  return fig
