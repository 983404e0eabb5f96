"""Running a job's pending records: here (one worker, or a pool of worker processes) or on Ray Data.

Every way of running takes the same spec (a picklable description of the work: `spec.make_worker()`
loads the model, `worker.run(items)` answers a chunk) and hands each finished chunk to `on_chunk`,
which the caller uses to write the chunk's part and move the progress bar. Whatever runs the
chunks, the driver writes the parts, so a worker on another machine needs no shared disk.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterator, Protocol

from llmcli.batch.job import Done, Item
from llmcli.errors import UsageError


class Worker(Protocol):
    def run(self, items: list[Item]) -> list[Done]: ...


class Spec(Protocol):
    kind: str

    def make_worker(self) -> Worker: ...


OnChunk = Callable[[list[Done]], None]


def chunks(items: list[Item], size: int) -> Iterator[list[Item]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def run_local(spec: Spec, items: list[Item], on_chunk: OnChunk, *, workers: int = 1, chunk_size: int = 64, threads: int | None = None) -> None:
    """The chunks in this process (workers=1), or spread over `workers` processes, each with its own model."""
    from llmcli.core.threads import apply_threads

    if not items:
        return
    if workers == 1:
        apply_threads(threads)
        worker = spec.make_worker()
        try:
            for chunk in chunks(items, chunk_size):
                on_chunk(worker.run(chunk))
        finally:
            close = getattr(worker, "close", None)
            if close is not None:
                close()
        return
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    # spawn, not fork: the parent may hold threads (torch's, an engine's), which a fork would copy half-way
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_start_pool_worker, initargs=(spec, threads)) as pool:
        todo = list(chunks(items, chunk_size))
        running = set()
        # two chunks per worker in flight: one running, one waiting, so no worker idles between chunks
        while todo or running:
            while todo and len(running) < 2 * workers:
                running.add(pool.submit(_run_pool_chunk, todo.pop(0)))
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                on_chunk(future.result())


_POOL_WORKER: Any = None


def _start_pool_worker(spec: Spec, threads: int | None) -> None:
    global _POOL_WORKER
    from llmcli.core.threads import apply_threads

    apply_threads(threads)
    _POOL_WORKER = spec.make_worker()


def _run_pool_chunk(items: list[Item]) -> list[Done]:
    return _POOL_WORKER.run(items)


# ---------------------------------------------------------------- Ray Data


class RayWorker:
    """The callable class of `map_batches`: one model per actor, loaded once, answering batches of records."""

    def __init__(self, spec: Spec, threads: int | None):
        from llmcli.core.threads import apply_threads

        apply_threads(threads)
        self.worker = spec.make_worker()

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        items = [Item(int(i), int(n), json.loads(r)) for i, n, r in zip(batch["index"], batch["line"], batch["record"])]
        done = self.worker.run(items)
        return {
            "index": np.array([d.index for d in done], dtype=np.int64),
            "tokens": np.array([d.tokens for d in done], dtype=np.int64),
            "error": np.array([d.error for d in done], dtype=bool),
            "record": np.array([json.dumps(d.record, ensure_ascii=False, separators=(",", ":")) for d in done], dtype=object),
        }


def run_ray(
    spec: Spec,
    items: list[Item],
    on_chunk: OnChunk,
    *,
    address: str,
    staging: "Any",
    workers: int = 1,
    chunk_size: int = 64,
    threads: int | None = None,
    ordered: bool = False,
) -> None:
    """The chunks on a Ray cluster: `read_json` of the pending records -> `map_batches(RayWorker)` on an
    actor pool of `workers` actors with `threads` CPUs each; finished batches come back to this process.

    address: "auto" (the cluster `ray start` made on this machine) or a cluster address. A killed
    actor is restarted and its batch retried by Ray Data; the parts' names and the merge make
    the retry harmless. staging: a folder on this machine for the pending records' file.
    """
    if not items:
        return
    try:
        import ray
        import ray.data
    except ModuleNotFoundError as exc:
        raise UsageError(f"--ray needs Ray Data ({exc.name} is not installed)", "pip install 'llmcli[ray]' (or pip install 'ray[data]')") from None
    pending = staging / "pending.jsonl"
    with open(pending, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps({"index": item.index, "line": item.line, "record": json.dumps(item.record, ensure_ascii=False)}, ensure_ascii=False) + "\n")
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False, configure_logging=False)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise UsageError(f"cannot connect to the Ray cluster at {address!r}: {exc}", "start one with `ray start --head`, or give its address: --ray HOST:6379") from None
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # llmcli's own bar is on stderr
        context.execution_options.preserve_order = ordered
        dataset = ray.data.read_json(f"local://{pending.resolve()}")  # read on this node: the file is here
        dataset = dataset.map_batches(
            RayWorker,
            fn_constructor_args=(spec, threads),
            batch_size=chunk_size,
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=threads or 1,
        )
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            on_chunk(
                [
                    Done(int(i), json.loads(r), int(t), bool(e))
                    for i, r, t, e in zip(batch["index"], batch["record"], batch["tokens"], batch["error"])
                ]
            )
    finally:
        ray.shutdown()
        pending.unlink(missing_ok=True)
