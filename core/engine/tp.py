"""Tensor parallelism across processes: the driver in the engine's process and the worker loop.

With ``--tp-size N`` the engine's process is rank 0 (the engine process of a split server, or the
serving process with ``--engine-in-process``): it keeps the scheduler, the sampler and every LoRA
decision, and runs its own shard of the model. It starts ``N - 1`` worker
processes (ranks 1..N-1, one GPU each, or CPU processes with gloo); all ranks join one
``torch.distributed`` group, and the model's collectives (the all-reduce after each row-parallel
projection, the vocab-parallel embedding and logits) keep them in lock step. Before every step the
driver sends each worker the step's chunks (tokens, positions, block-table row, adapter key) and
the block-table operations since the last step (each worker's device table replays them, so a
running request's block list is never sent or rebuilt). With overlap (the default) a step's ids may
hold placeholders for tokens rank 0 has not read yet: after every step that samples, rank 0
broadcasts the sampled tokens on the device and each worker puts them in a token ring like rank 0's,
from which its runner resolves the placeholders, so no rank waits for the host. Before a
GPU slot is filled or emptied it sends that decision, so every rank's slot pool holds the same
adapters in the same slots (one decision, made once, applied everywhere). Workers read adapter
weights themselves from the adapter's source and keep only their shard on the GPU.

A watchdog thread waits on the workers' process sentinels: a worker that exits unasked takes the
server down with a message naming its rank and exit code, instead of leaving rank 0 blocked in a
collective forever.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from loraserve.errors import ConfigError
from loraserve.lora.composition import compose
from loraserve.sched.scheduler import ScheduledChunk

logger = logging.getLogger("loraserve.tp")

#: exit code of a server taken down by a dead worker
WORKER_DIED_EXIT_CODE = 70


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_group(rank: int, size: int, port: int, device_type: str) -> None:
    """Join the ``size``-rank group (NCCL on CUDA, gloo on CPU) over TCP on localhost."""
    import datetime

    import torch.distributed as dist

    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        if torch.cuda.device_count() < size:
            raise ConfigError(
                f"--tp-size {size} needs {size} CUDA devices, found {torch.cuda.device_count()}; lower --tp-size"
            )
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=size,
        timeout=datetime.timedelta(minutes=10),
    )


def check_before_start(settings: Any, plugins: Any) -> None:
    """What can be refused before any worker starts (a worker failing its start would take the
    server down with its own traceback instead of this process's clear error): the backend and
    eviction names, and the model's sizes against ``--tp-size``, from its config alone (a GGUF
    file is checked when the model is built, since its config comes with the weights)."""
    from loraserve.distributed import check_divisible
    from loraserve.engine.builder import choose_plugins
    from loraserve.model_loader import load_config, resolve_model_source

    choose_plugins(settings, plugins, settings.resolved_device())
    source = resolve_model_source(settings)
    if source.load_format != "gguf":
        check_divisible(load_config(source), settings.tp_size)


# -- what travels from the driver to the workers -------------------------------------------------


@dataclass
class _Request:
    """The parts of a Request a worker's runner reads."""

    ids: list[int]
    first: int  # position of ids[0]
    blocks: list[int]
    num_tokens: int
    adapter_ref: Any = None

    def token_slice(self, start: int, end: int) -> list[int]:
        return self.ids[start - self.first : end - self.first]


def describe_chunks(chunks: list) -> list[tuple]:
    """A step's chunks as plain tuples: ``(ids, start, n, table_row, blocks, samples, adapter_key)``;
    ``blocks`` only for a chunk without a block-table row (the workers' tables replay the driver's
    journal, so a running request's block list is never sent again)."""
    out = []
    for c in chunks:
        r = c.request
        key = r.adapter_ref.key if r.adapter_ref is not None else None
        blocks = None if c.table_row >= 0 else list(r.blocks)
        ids = r.token_slice(c.start, c.start + c.num_tokens)
        out.append((ids, c.start, c.num_tokens, c.table_row, blocks, c.samples, key))
    return out


def rebuild_chunks(described: list[tuple], host_rows: dict[int, list[int]]) -> list[ScheduledChunk]:
    """The driver's chunks again, on this rank's block-table rows (``host_rows``: row -> blocks, kept
    by :meth:`~loraserve.sched.block_table.BlockTable.replay`); a chunk samples exactly when it reaches
    its request's last known token, so that is what the stand-in request's length says."""
    chunks = []
    for ids, start, n, row, blocks, samples, key in described:
        ref = SimpleNamespace(key=tuple(key)) if key is not None else None
        req = _Request(
            ids=list(ids),
            first=start,
            blocks=host_rows[row] if row >= 0 else blocks,
            num_tokens=start + n + (0 if samples else 1),
            adapter_ref=ref,
        )
        chunks.append(ScheduledChunk(req, start, n, row))
    return chunks


# -- the driver (rank 0, in the engine's process) -------------------------------------------------


class TPDriver:
    """Starts the workers, forwards steps and LoRA slot decisions to them, watches them."""

    def __init__(self, settings: Any, on_worker_death: Callable[[str], None] | None = None):
        self.size = settings.tp_size
        self.port = free_port()
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        self._stopping = False
        self.table: Any = None  # rank 0's block table, once followed
        payload = settings.model_dump()
        for rank in range(1, self.size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=worker_main, args=(payload, rank, self.port, child), name=f"loraserve-tp{rank}", daemon=True
            )
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        self.on_worker_death = on_worker_death or _exit_on_worker_death
        self._watchdog = threading.Thread(target=self._watch, name="loraserve-tp-watchdog", daemon=True)
        self._watchdog.start()

    def _watch(self) -> None:
        from multiprocessing.connection import wait

        sentinels = {p.sentinel: (rank, p) for rank, p in enumerate(self.procs, start=1)}
        while sentinels:
            for s in wait(list(sentinels)):
                rank, proc = sentinels.pop(s)
                proc.join(1)
                if not self._stopping:
                    self.on_worker_death(
                        f"tensor-parallel worker rank {rank} exited with code {proc.exitcode}; "
                        "the server cannot continue without it (see that worker's log above)"
                    )
                    return

    def send(self, message: tuple) -> None:
        for conn in self.conns:
            conn.send(message)

    def attach(self, table: Any, stepper: Any) -> None:
        """Follow rank 0's engine from now on: its block-table operations (each step carries those
        since the last) and, when it overlaps steps, its sampled tokens (:meth:`share_tokens`, into
        worker rings of the same capacity as its own)."""
        table.journal = []
        self.table = table
        if stepper.overlap:
            stepper.share_tokens = self.share_tokens
            self.send(("ring", stepper.future.capacity))

    def send_step(self, chunks: list) -> None:
        journal = self.table.take_journal() if self.table is not None else []
        self.send(("step", journal, describe_chunks(chunks)))

    def share_tokens(self, tokens: torch.Tensor) -> None:
        """A step's sampled tokens (int64, on the device) to every worker's ring: one broadcast,
        enqueued on the current stream (NCCL) without waiting for the device."""
        import torch.distributed as dist

        dist.broadcast(tokens, src=0)

    def mirror_lora(self, event: tuple) -> None:
        self.send(("lora",) + event)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the workers; every rank leaves the process group at the same time."""
        import torch.distributed as dist

        self._stopping = True
        for conn in self.conns:
            try:
                conn.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
        if dist.is_initialized() and all(p.is_alive() for p in self.procs):
            dist.destroy_process_group()
        for proc in self.procs:
            proc.join(timeout)
            if proc.is_alive():
                proc.kill()


def release_graphs(runner: Any) -> None:
    """Drop a runner's captured CUDA graphs before the process group is destroyed: graphs that
    captured NCCL collectives are known to make ``destroy_process_group`` hang while they live
    (pytorch/pytorch#115388)."""
    import gc

    if getattr(runner, "graphs", None) is not None:
        runner.drop_graphs()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.synchronize()


def _exit_on_worker_death(message: str) -> None:
    logger.critical(message)
    os._exit(WORKER_DIED_EXIT_CODE)


# -- the worker (ranks 1..N-1, each in its own process) --------------------------------------------


def worker_main(payload: dict, rank: int, port: int, conn: Any) -> None:
    """Build this rank's shard of every part and follow the driver's messages until told to stop."""
    from loraserve.engine.builder import build_components
    from loraserve.plugin_manager import PluginManager
    from loraserve.settings import Settings

    logging.basicConfig(level=logging.WARNING, format=f"%(levelname)s tp{rank} %(name)s: %(message)s")
    _exit_with_parent()
    settings = Settings.model_validate(payload)
    init_group(rank, settings.tp_size, port, settings.resolved_device())
    plugins = PluginManager(allow=settings.plugins, deny=settings.disable_plugin, trace=settings.trace_plugins)
    plugins.load()
    parts = build_components(settings, plugins, run_in_engine=lambda fn: fn(), tp_rank=rank)
    adapters: dict[tuple, Any] = {}
    lora = parts.lora
    host_rows: dict[int, list[int]] = {}  # this rank's block-table rows as host lists
    ring = None  # with overlap: the sampled tokens of rank 0's steps (FutureTokens)
    while True:
        try:
            message = conn.recv()
        except EOFError:  # rank 0 is gone
            os._exit(1)
        kind = message[0]
        if kind == "stop":
            release_graphs(parts.runner)
            import torch.distributed as dist

            dist.destroy_process_group()  # together with rank 0 (NCCL tears communicators down collectively)
            os._exit(0)
        if kind == "step":
            parts.kv.block_table.replay(message[1], host_rows)
            chunks = rebuild_chunks(message[2], host_rows)
            with torch.inference_mode():
                parts.runner.forward(chunks, resolve=ring.resolve if ring is not None else None)
                receive_tokens(ring, sum(1 for c in chunks if c.samples), parts.device)
        elif kind == "ring":
            from loraserve.engine.overlap import FutureTokens

            ring = FutureTokens(message[1], parts.device)
        elif kind == "lora":
            apply_lora_event(lora, adapters, message[1:])


def receive_tokens(ring: Any, n: int, device: Any) -> None:
    """With overlap: the ``n`` tokens rank 0 sampled in the step just run, from its broadcast
    (:meth:`TPDriver.share_tokens`), into this rank's ring, where the next steps' placeholders point."""
    if ring is None or n == 0:
        return
    import torch.distributed as dist

    tokens = torch.empty(n, dtype=torch.long, device=device)
    dist.broadcast(tokens, src=0)
    ring.put(tokens)


def _exit_with_parent(poll_s: float = 1.0) -> None:
    """Exit when rank 0's process dies, even if this rank is blocked in a collective with it."""
    parent = os.getppid()

    def watch() -> None:
        import time

        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="loraserve-tp-parent-watch", daemon=True).start()


def apply_lora_event(lora: Any, adapters: dict, event: tuple) -> None:
    """Replay one of the driver's slot decisions on this rank's pool (see SlotAdmission's ``mirror``)."""
    kind = event[0]
    if kind == "fill":
        _, slot, key, name, source, components = event
        key = tuple(key)
        adapter = None
        if name is not None:
            adapter = adapters.get(key)
            if adapter is None and components:  # a weighted composition: built here from its components
                parts = [(lora.read_adapter(n, s), w) for n, s, w in components]
                adapter = adapters[key] = compose(name, source, parts)
            elif adapter is None:
                adapter = adapters[key] = lora.read_adapter(name, source)
        lora.pool.load(slot, key, lora.dora.finish(adapter))  # (DoRA: the collective rank 0's fill runs too)
    elif kind == "evict":
        lora.pool.evict(event[1])
    elif kind == "forget":
        adapters.pop(tuple(event[1]), None)
    else:
        raise RuntimeError(f"unknown LoRA event {event!r}")
