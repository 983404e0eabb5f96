"""Running a job's pending records: here (one worker, or a pool of worker processes) or on Ray Data.

Every way of running takes the same spec (a picklable description of the work: `spec.make_worker()`
loads the model, `worker.run(items)` answers a chunk) and hands each finished chunk to `on_chunk`,
which the caller uses to write the chunk's part and move the progress bar. Whatever runs the
chunks, the driver writes the parts, so a worker on another machine needs no shared disk.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any, Callable, Iterator, Protocol

from llmcli.batch.job import Done, Item
from llmcli.errors import LlmcliError, UsageError


class Worker(Protocol):
    def run(self, items: list[Item]) -> list[Done]: ...


class Spec(Protocol):
    kind: str

    def make_worker(self) -> Worker: ...


OnChunk = Callable[[list[Done]], None]


def worker_name() -> str:
    """host:pid of this process, stamped on the records it runs."""
    return f"{socket.gethostname()}:{os.getpid()}"


def run_stamped(worker: Worker, items: list[Item]) -> list[Done]:
    done = worker.run(items)
    name = worker_name()
    for d in done:
        d.worker = name
    return done


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
                on_chunk(run_stamped(worker, chunk))
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
    return run_stamped(_POOL_WORKER, items)


# ---------------------------------------------------------------- Ray Data


def worker_error(exc: BaseException) -> LlmcliError | None:
    """The LlmcliError a worker raised, from the chain Ray or the process pool wraps it in."""
    for _ in range(10):
        if isinstance(exc, LlmcliError):
            return exc
        cause = getattr(exc, "cause", None)  # Ray's RayTaskError and ActorDiedError keep the worker's exception here
        nxt = cause if isinstance(cause, BaseException) else (exc.__cause__ or exc.__context__)
        if nxt is None:
            return None
        exc = nxt
    return None


class RayWorker:
    """The callable class of `map_batches`: one model per actor, loaded once, answering batches of records.

    An LlmcliError (a model that does not load, a bad record) is not raised in the actor, where Ray
    would retry it and wrap it in its own traceback: it comes back as the batch's `failure`
    column, and the driver raises it as the one-line error it is.
    """

    def __init__(self, spec: Spec, threads: int | None) -> None:
        from llmcli.core.threads import apply_threads

        self.worker: Worker | None = None
        self.failure = ""
        try:
            apply_threads(threads)
            self.worker = spec.make_worker()
        except LlmcliError as exc:
            self.failure = describe_failure(exc)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        done: list[Done] = []
        failure = self.failure
        if not failure and self.worker is not None:
            items = [Item(int(i), int(n), json.loads(r)) for i, n, r in zip(batch["index"], batch["line"], batch["record"])]
            try:
                done = run_stamped(self.worker, items)
            except LlmcliError as exc:
                failure = describe_failure(exc)
        if failure:  # one row that carries it: the driver stops at the first
            return {"index": np.array([-1]), "tokens": np.array([0]), "error": np.array([True]), "worker": np.array([""], dtype=object), "record": np.array(["null"], dtype=object), "failure": np.array([failure], dtype=object)}
        return {
            "index": np.array([d.index for d in done], dtype=np.int64),
            "tokens": np.array([d.tokens for d in done], dtype=np.int64),
            "error": np.array([d.error for d in done], dtype=bool),
            "worker": np.array([d.worker for d in done], dtype=object),
            "record": np.array([json.dumps(d.record, ensure_ascii=False, separators=(",", ":")) for d in done], dtype=object),
            "failure": np.array([""] * len(done), dtype=object),
        }


def describe_failure(exc: LlmcliError) -> str:
    return json.dumps({"type": type(exc).__name__, "message": exc.message, "hint": exc.hint, "str": str(exc)})


def raise_failure(text: str) -> None:
    """The LlmcliError a worker described, raised here (as its own class when llmcli.errors has it)."""
    from llmcli import errors

    value = json.loads(text)
    kind = getattr(errors, value["type"], None)
    if isinstance(kind, type) and issubclass(kind, LlmcliError) and kind is not errors.InputError and not issubclass(kind, errors.InputError):
        raise kind(value["message"], value["hint"])
    raise LlmcliError(value["str"])


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
    import logging
    import warnings

    # Ray's C++ core writes its warnings to stderr, where llmcli's bar and error lines go (it still says, once, that it was told so)
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")

    try:
        import ray
        import ray.data
    except ModuleNotFoundError as exc:
        raise UsageError(f"--ray needs Ray Data ({exc.name} is not installed)", "pip install 'llmcli[ray]' (or pip install 'ray[data]')") from None
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.CRITICAL)  # a failure reaches the user as llmcli's own error line
    # local:// (read the pending records on this node) is deprecated for 2027; from_items would replace it
    warnings.filterwarnings("ignore", message=".*local://.*")
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
        # an actor that cannot even start (llmcli missing on a node, a model it cannot load) fails the job
        # at the second try instead of being replaced forever; a killed actor is restarted by Ray all the same
        context.max_consecutive_actor_init_deaths = 1
        # read on this node (the file is here), with no CPU reserved: the actors may hold every CPU of the cluster
        source = f"local://{pending.resolve()}"
        try:
            dataset = ray.data.read_json(source, num_cpus=0)
        except TypeError:  # a Ray Data without the named parameter (it came after ray_remote_args, now deprecated)
            dataset = ray.data.read_json(source, ray_remote_args={"num_cpus": 0})
        dataset = dataset.map_batches(
            RayWorker,
            fn_constructor_args=(spec, threads),
            batch_size=chunk_size,
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=threads or 1,
        )
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            failures = [f for f in batch["failure"] if f]
            if failures:
                raise_failure(failures[0])
            on_chunk(
                [
                    Done(int(i), json.loads(r), int(t), bool(e), str(w))
                    for i, r, t, e, w in zip(batch["index"], batch["record"], batch["tokens"], batch["error"], batch["worker"])
                ]
            )
    except ray.exceptions.RayError as exc:
        cause = worker_error(exc)
        if cause is not None:
            raise cause from None
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"the Ray job failed: {first}", "llmcli (with its extras) must be installed on every node; see the workers' logs in the Ray session folder") from None
    finally:
        ray.shutdown()
        pending.unlink(missing_ok=True)
