"""Decoding images in the background, batch by batch, in a fixed order.

Decoding and resizing JPEGs dominates calibration time on CPU, and Pillow releases the GIL while it
decodes and resamples, so a thread pool gives real parallelism without the pickling cost and
start-up time of processes. The pool works a bounded distance ahead of the consumer so that a
calibration set of any size never sits in memory at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import weakref
from collections import deque
from collections.abc import Generator, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np

from calibration import preprocess
from calibration.datasets import Sample, Spares
from calibration.errors import DatasetError, RqInputError
from calibration.preprocess import ImageDecodeError, PreprocessSpec
from calibration.progress import NO_PROGRESS, Progress

logger = logging.getLogger(__name__)

#: Prefix of the decode threads' names (lets tests and debuggers find them).
THREAD_NAME_PREFIX = "rq-decode"


@dataclass
class Batch:
    """A batch of preprocessed images.

    ``images``: float32 ``[n, …]`` in the spec's layout; ``labels``: int64 ``[n]``, -1 where the
    label is unknown; ``paths``: the files, in the same order.
    """

    images: np.ndarray
    labels: np.ndarray
    paths: list[Path]

    def __len__(self) -> int:
        return len(self.paths)


def _default_workers() -> int:
    # Beyond ~8 threads JPEG decoding is memory-bandwidth bound and just adds contention.
    return max(1, min(8, os.cpu_count() or 1))


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RqInputError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    return value


def pad_batch(images: np.ndarray, batch: int) -> np.ndarray:
    """`images` (at most `batch`) filled up to `batch` by repeating the last one, for a model whose batch
    dimension is fixed; the caller drops the padding's outputs."""
    if len(images) == batch:
        return images
    if not 0 < len(images) < batch:
        raise ValueError(f"cannot pad {len(images)} images to a batch of {batch}")
    return np.concatenate([images, np.repeat(images[-1:], batch - len(images), axis=0)])


class BatchStream:
    """Iterate over ``samples`` as :class:`Batch` objects of up to ``batch_size`` images.

    * Order is deterministic: batch *k* holds samples ``k*batch_size … (k+1)*batch_size-1``
      (minus any that failed to decode), whatever the number of workers.
    * Decoding runs in ``workers`` threads, at most ``prefetch_batches`` batches beyond the one the
      consumer currently holds.
    * Unreadable images are skipped, not fatal: ``skipped`` lists ``(path, reason)``; ``used``
      counts images yielded. A batch can be short (skips, last batch) but is never empty. If nothing at
      all could be decoded, the iteration ends with a :class:`DatasetError`.
    * ``spares`` (calibration.datasets.Spares): when given, each unreadable image is replaced in its batch by
      the next readable spare drawn for it (unreadable spares are skipped too), so a pass yields the batches it
      would yield if every image were readable; at most as many spares are tried as samples. ``replaced``
      lists ``(unreadable path, replacement path)``. Without spares, a batch with unreadable images is short.
    * ``progress`` (calibration.progress.Progress): ``total(len(samples))`` when a pass starts, then
      ``advance(k)`` after each chunk of samples with the number of samples it consumed (skipped ones
      included).
    * Iterating again starts a fresh pass (``skipped``/``used``/``replaced`` are reset). Stopping early —
      ``break``, an exception or Ctrl-C in the consumer, :meth:`close`, or leaving a ``with``
      block — cancels the pending decodes and lets the threads exit.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        spec: PreprocessSpec,
        batch_size: int = 8,
        workers: int | None = None,
        prefetch_batches: int = 2,
        *,
        progress: Progress | None = None,
        spares: Spares | None = None,
    ) -> None:
        self.batch_size = _check_int("batch size", batch_size, 1)
        self.workers = _default_workers() if workers is None else _check_int("workers", workers, 1)
        self.prefetch_batches = _check_int("prefetch_batches", prefetch_batches, 0)
        if not isinstance(spec, PreprocessSpec):
            raise RqInputError(f"spec must be a PreprocessSpec, got {type(spec).__name__}")
        self.samples: list[Sample] = list(samples)
        self.spec = spec
        self.progress = progress or NO_PROGRESS
        self.spares = spares
        self.skipped: list[tuple[Path, str]] = []
        self.replaced: list[tuple[Path, Path]] = []
        self.used: int = 0
        # A *weak* reference to the running pass: a strong one would keep an abandoned generator
        # alive, so a consumer's `break` would no longer close it (and stop the threads) at once.
        self._gen: weakref.ref[Generator[Batch, None, None]] | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Number of samples (images attempted), not of batches."""
        return len(self.samples)

    @property
    def num_batches(self) -> int:
        """Batches a pass yields when nothing is skipped (an upper bound otherwise)."""
        return -(-len(self.samples) // self.batch_size)

    # -- iteration -----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        self.close()  # one pass at a time: finish any earlier, abandoned one first
        gen = self._generate()
        self._gen = weakref.ref(gen)
        return gen

    def _decode(self, path: Path) -> np.ndarray:
        # Looked up on the module at call time so tests (and profilers) can wrap load_image.
        return preprocess.load_image(path, self.spec)

    def _generate(self) -> Generator[Batch, None, None]:
        self.skipped = []
        self.replaced = []
        self.used = 0
        total = len(self.samples)
        if total == 0:
            raise DatasetError("no images to read (the sample list is empty)")
        self.progress.total(total)
        pick = self.spares.picker(exclude=[s.path for s in self.samples]) if self.spares is not None else None
        # At most as many spares tried as images sampled: a folder nothing can decode (a missing codec, no
        # permission) fails after twice the sample, not after every file in it.
        spare_budget = total
        chunks = [self.samples[i : i + self.batch_size] for i in range(0, total, self.batch_size)]
        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix=THREAD_NAME_PREFIX)
        # One deque entry per chunk: the futures of its images, in sample order.
        pending: deque[list[Future[np.ndarray]]] = deque()
        next_chunk = 0

        def submit_next() -> None:
            nonlocal next_chunk
            if next_chunk < len(chunks):
                pending.append([pool.submit(self._decode, s.path) for s in chunks[next_chunk]])
                next_chunk += 1

        def replacement(unreadable: Sample) -> tuple[Sample, np.ndarray] | None:
            """The next readable spare for `unreadable` (decoded here: replacements are rare), or None."""
            nonlocal spare_budget
            while pick is not None and spare_budget > 0:
                spare = pick(unreadable)
                if spare is None:
                    return None
                spare_budget -= 1
                try:
                    return spare, self._decode(spare.path)
                except ImageDecodeError as e:
                    logger.debug("skipped spare %s: %s", spare.path, e.reason)
                    self.skipped.append((spare.path, e.reason))
            return None

        try:
            # The chunk about to be assembled plus `prefetch_batches` chunks ahead of it.
            for _ in range(1 + self.prefetch_batches):
                submit_next()
            for chunk in chunks:
                futures = pending.popleft()
                images: list[np.ndarray] = []
                kept: list[Sample] = []
                for sample, fut in zip(chunk, futures, strict=True):
                    try:
                        images.append(fut.result())
                        kept.append(sample)
                    except ImageDecodeError as e:
                        logger.debug("skipped %s: %s", sample.path, e.reason)
                        self.skipped.append((sample.path, e.reason))
                        # In the unreadable image's place: the pass yields the batches it would if every image were readable.
                        found = replacement(sample)
                        if found is not None:
                            kept.append(found[0])
                            images.append(found[1])
                            self.replaced.append((sample.path, found[0].path))
                self.progress.advance(len(chunk))
                if images:
                    self.used += len(images)
                    batch = Batch(
                        images=np.stack(images).astype(np.float32, copy=False),
                        labels=np.array([-1 if s.label is None else s.label for s in kept], dtype=np.int64),
                        paths=[s.path for s in kept],
                    )
                    yield batch
                    del batch, images  # don't keep the consumer's batch alive while prefetching
                # Only now, with the consumer back for more, top the window up again: while the
                # consumer held the batch, at most `prefetch_batches` chunks were being decoded.
                submit_next()
            if self.used == 0:
                path, reason = self.skipped[0]
                tried = total - spare_budget
                spares = f", nor {tried} spare image(s)" if tried else ""
                raise DatasetError(
                    f"none of the {total} images could be decoded{spares} (e.g. {path}: {reason})"
                )
        finally:
            self._shutdown(pool, pending)

    # -- shutdown ------------------------------------------------------------------------------

    @staticmethod
    def _shutdown(pool: ThreadPoolExecutor, pending: deque[list[Future[np.ndarray]]]) -> None:
        for futures in pending:
            for fut in futures:
                fut.cancel()  # queued decodes never start; running ones finish their one image
        pending.clear()
        pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Stop the current pass (if any): cancel queued decodes and release the threads.
        Safe to call repeatedly and from the consumer at any time."""
        with self._lock:
            ref, self._gen = self._gen, None
        gen = ref() if ref is not None else None
        # gen.close() raises GeneratorExit at the paused `yield`, which runs _generate's finally
        # (the pool shutdown). A generator that never started has no pool to shut down; one that
        # is running is the caller itself (close() from inside the pass) and will finish anyway.
        if gen is not None and not gen.gi_running:
            gen.close()

    def __enter__(self) -> BatchStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # Last resort for a stream dropped mid-pass without close(); never raise from __del__.
        with contextlib.suppress(Exception):
            self.close()


__all__ = ["THREAD_NAME_PREFIX", "Batch", "BatchStream"]
