"""Adapters read from their sources off the engine thread: :class:`BackgroundReads`.

An adapter evicted from the host cache (``--max-loaded-loras`` / ``--max-loaded-lora-gib``) is read
again from its source when a request needs it. That read (a file of megabytes, its checks and its
identity hash: tens of milliseconds, or a network fetch) used to run on the engine thread, so every
running request stalled behind it: on an H100 with 2,000 adapters of a 1B model and a host tier of
two thirds of them, 470 such reads ran inline (4,400 output tokens per second against 22,700 with 5
adapters).

Reads now run on a few worker threads. Slot admission asks :meth:`BackgroundReads.take`; while the
read runs it gets :class:`AdapterReading`, answers the scheduler ``COPYING`` (the request is
overtaken, others join), and asks again next step. Admission starts reads for the waiting queue's
adapters ahead of need (the same window as its prefetches) and moves finished ones into the host
cache before each step. At most ``max_reads`` reads are in flight or waiting to be taken, so a
long queue of new adapters cannot pull unbounded bytes into memory past the host cache's bounds.
A read that fails finishes the waiting requests of its adapter with its error, before the step is
scheduled (inline reads raised it inside scheduling, which failed every queued request). Compositions
are still built on the engine thread (they read the host cache).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

#: worker threads reading adapters (file reads, checks and hashing release the GIL for the most part)
READ_WORKERS = 4
#: reads in flight or finished and not yet taken, at most
MAX_READS = 16


class AdapterReading(Exception):
    """Not an error: the adapter is being read from its source; ask again on a later step."""


class BackgroundReads:
    """Reads adapters with ``read(ref)`` (any thread: it must change no shared state) on worker
    threads; every other method runs on the engine thread."""

    def __init__(self, read: Callable[[Any], Any], workers: int = READ_WORKERS, max_reads: int = MAX_READS):
        self._read, self._workers, self.max_reads = read, workers, max_reads
        self._pool: ThreadPoolExecutor | None = None
        self._reads: dict[tuple, tuple[Any, Future]] = {}  # key -> (ref, future), in start order

    def __len__(self) -> int:
        return len(self._reads)

    def start(self, ref: Any) -> bool:
        """Start reading ``ref`` unless it is being read already; False when ``max_reads`` are taken."""
        if ref.key in self._reads:
            return True
        if len(self._reads) >= self.max_reads:
            return False
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="loraserve-adapter-read")
        self._reads[ref.key] = (ref, self._pool.submit(self._read, ref))
        return True

    def take(self, ref: Any) -> Any:
        """``ref``'s adapter if its read succeeded; else raises :class:`AdapterReading`, after starting
        the read when there is room (a failed read waits for :meth:`failed`)."""
        entry = self._reads.get(ref.key)
        if entry is None or not entry[1].done() or entry[1].exception() is not None:
            self.start(ref)
            raise AdapterReading(ref.name)
        del self._reads[ref.key]
        return entry[1].result()

    def finished(self) -> list[tuple[Any, Any]]:
        """``(ref, adapter)`` of every read that succeeded, removed from the reads (for the host cache)."""
        done = [(key, ref, f) for key, (ref, f) in self._reads.items() if f.done() and f.exception() is None]
        for key, _, _ in done:
            del self._reads[key]
        return [(ref, f.result()) for _, ref, f in done]

    def failed(self) -> list[tuple[Any, BaseException]]:
        """``(ref, error)`` of every read that failed, removed from the reads."""
        bad = [(key, ref, f.exception()) for key, (ref, f) in self._reads.items() if f.done() and f.exception()]
        for key, _, _ in bad:
            del self._reads[key]
        return [(ref, exc) for _, ref, exc in bad]

    def forget(self, key: tuple) -> None:
        """Drop ``key``'s read (its adapter was unloaded); a read still running finishes unseen."""
        entry = self._reads.pop(key, None)
        if entry is not None:
            entry[1].cancel()

    def close(self) -> None:
        """Cancel the reads not started; running ones end on their own (no new ones start)."""
        self._reads.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
