"""Parallel decoding that keeps the stream exact: ordered read-ahead on a thread pool, and one batch
assembled ahead of the train step.

  DecodePool(N)                     N daemon threads computing stream elements (FIFO)
  Window(pool, stream, depth)       one pack group's next `depth` elements, asked for ahead of the
                                    packer and taken strictly in index order
  Prefetcher(produce)               one background thread running produce() one call ahead

Every element of a task stream is a pure function of its index (the epoch shuffle, the task-string
draw and the tokenize / decode transforms are seeded per index), so any thread may compute it at any
time; the packer still takes stream[i] for i = next_index, next_index + 1, ... The batches are
therefore the same for every worker count, 0 included, and an iterator state saved with N workers
restores with M (`embed2.data.pipeline`).

Threads, not processes: the decoders hold the GIL for a few percent of their time at most (Pillow's
JPEG decode and resize, soundfile, scipy's resampler, numpy's FFT and matmul, PyAV and sentencepiece
all release it; measured with a GIL probe on 1024x768 / 3000x2000 JPEGs resized to 896, 10 s 48 kHz
FLAC to 16 kHz log-mel and an 8-frame mp4), so threads scale like processes without pickling
decoded arrays back or starting interpreters (spawn, as JAX is multithreaded). None of the decoders
calls a multithreaded BLAS (the log-mel product is cut below OpenBLAS's threading size,
`embed2.data.media.audio`), so the workers do not oversubscribe the cores.
"""

from __future__ import annotations

import collections
import concurrent.futures
import queue
import sys
import threading
import weakref
from typing import Any, Callable, Iterable, Sequence


class _Tasks:
  """The queue the pool's threads read, and the flag that closes it (shared with the finalizer,
  which must not hold the pool itself)."""

  def __init__(self):
    self.queue: queue.SimpleQueue = queue.SimpleQueue()  # (future, fn, args) or None: stop
    self.lock = threading.Lock()
    self.closed = False
    self.threads: list[threading.Thread] = []

  def shutdown(self) -> None:
    """Cancels what no thread has started, stops the threads and waits for them (each finishes the
    element it is on: a fraction of a second)."""
    with self.lock:
      if self.closed:
        return
      self.closed = True
    while True:
      try:
        item = self.queue.get_nowait()
      except queue.Empty:
        break
      if item is not None:
        item[0].cancel()
    for _ in self.threads:
      self.queue.put(None)
    # At interpreter shutdown the (daemon) threads may already be gone; joining could hang there.
    if not sys.is_finalizing():
      for t in self.threads:
        if t is not threading.current_thread():
          t.join()


def _work(tasks: _Tasks) -> None:
  while True:
    item = tasks.queue.get()
    if item is None:
      return
    future, fn, args = item
    if not future.set_running_or_notify_cancel():  # cancelled while queued
      continue
    try:
      future.set_result(fn(*args))
    except BaseException as e:  # pylint: disable=broad-except  # re-raised as is by future.result()
      future.set_exception(e)


class DecodePool:
  """N threads that compute stream elements, first asked first computed.

  Closed by `close()`, when garbage collected, or at interpreter exit (the threads are daemons and a
  finalizer cancels what is queued), so an unclosed pool never holds the interpreter up.

  Args:
    workers: N >= 1.
    name: thread name prefix (seen in stack dumps).
  """

  def __init__(self, workers: int, name: str = "embed2-decode"):
    if int(workers) < 1:
      raise ValueError(f"workers={workers} must be >= 1 for a decode pool (0 = decode in the calling "
                       "thread: build no pool)")
    self.workers = int(workers)
    self._tasks = _Tasks()
    self._tasks.threads = [threading.Thread(target=_work, args=(self._tasks,), name=f"{name}-{k}",
                                            daemon=True) for k in range(self.workers)]
    for t in self._tasks.threads:
      t.start()
    self._finalizer = weakref.finalize(self, self._tasks.shutdown)

  @property
  def closed(self) -> bool:
    return self._tasks.closed

  def submit(self, fn: Callable[..., Any], *args) -> concurrent.futures.Future:
    """fn(*args) on a pool thread; its exception, if any, is raised as is by `.result()`."""
    future = concurrent.futures.Future()
    with self._tasks.lock:  # never queued behind the stop marks of a concurrent close
      if self._tasks.closed:
        raise RuntimeError("the decode pool is closed (its stage iterator was closed); build a new "
                           "iterator")
      self._tasks.queue.put((future, fn, args))
    return future

  def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
    """[fn(x) for x in items], computed on the pool, in order; the first error is raised (what was
    still queued is cancelled)."""
    futures = [self.submit(fn, x) for x in items]
    try:
      return [f.result() for f in futures]
    finally:
      for f in futures:
        f.cancel()

  def close(self) -> None:
    """Cancels queued work and stops the threads (idempotent)."""
    self._finalizer()


class Window:
  """One pack group's read-ahead: the pool computes stream[start : start + depth] while the packer
  takes stream[start], then stream[start + 1], ... (each `take` asks for one more).

  Args:
    pool: the stage's DecodePool.
    stream: the group's stream (random access: `stream[i]`).
    depth: elements asked for ahead of the packer (>= 1).
  """

  def __init__(self, pool: DecodePool, stream, depth: int):
    self._pool = pool
    self._stream = stream
    self.depth = max(int(depth), 1)
    self.start = 0  # the index of self._futures[0]
    self._futures: collections.deque[concurrent.futures.Future] = collections.deque()

  def reset(self, start: int) -> None:
    """Drops what was asked for (computed or not) and starts again at index `start`."""
    for f in self._futures:
      f.cancel()
    self._futures.clear()
    self.start = int(start)

  def fill(self) -> None:
    """Asks the pool for the elements up to start + depth not asked for yet."""
    while len(self._futures) < self.depth:
      self._futures.append(self._pool.submit(self._stream.__getitem__, self.start + len(self._futures)))

  def take(self, index: int) -> Any:
    """stream[index] (which must be `start`: the packer reads in order), waiting for it if needed;
    a worker's exception is raised here, as it was raised."""
    if index != self.start:
      self.reset(index)
    self.fill()
    future = self._futures.popleft()
    self.start += 1
    return future.result()

  def read(self, indices: Sequence[int]) -> list[Any]:
    """stream[i] for i in `indices` (any order, e.g. held-over tuples on restore), on the pool."""
    return self._pool.map(self._stream.__getitem__, indices)


class Prefetcher:
  """Runs `produce()` one call ahead of `next()` in a background (daemon) thread.

  Results come back in order; an exception of `produce` is raised by the `next()` that would have
  returned its result, after the results before it. `stop()` drops a result nobody took, so a caller
  that keeps the state of what it handed out (not of what was produced) can restore exactly.

  Args:
    produce: called in the thread, over and over; must not touch what the caller reads meanwhile.
    name: the thread's name.
  """

  def __init__(self, produce: Callable[[], Any], name: str = "embed2-batch-prefetch"):
    self._produce = produce
    self._name = name
    self._buffer: queue.Queue = queue.Queue(maxsize=1)
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def next(self) -> Any:
    if self._thread is None:
      self._stop.clear()
      self._thread = threading.Thread(target=_prefetch_loop, args=(self._produce, self._buffer, self._stop),
                                      name=self._name, daemon=True)
      self._thread.start()
    ok, value = self._buffer.get()
    if not ok:
      self.stop()
      raise value
    return value

  def stop(self) -> None:
    """Stops the thread (it finishes the call it is in) and drops its unconsumed result."""
    if self._thread is None:
      return
    self._stop.set()
    self._drain()  # unblocks a waiting put
    if not sys.is_finalizing() and self._thread is not threading.current_thread():
      self._thread.join()
    self._thread = None
    self._drain()

  def _drain(self) -> None:
    while True:
      try:
        self._buffer.get_nowait()
      except queue.Empty:
        return


def _prefetch_loop(produce: Callable[[], Any], buffer: queue.Queue, stop: threading.Event) -> None:
  while not stop.is_set():
    try:
      item = (True, produce())
    except BaseException as e:  # pylint: disable=broad-except  # handed to the consumer
      item = (False, e)
    if stop.is_set():
      return
    buffer.put(item)
    if not item[0]:
      return
