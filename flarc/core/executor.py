"""Where independent jobs run: in this process (:class:`LocalExecutor`) or on a Ray cluster
(:class:`RayExecutor`), behind one small interface (polygraphy's pattern: one class per backend).

An executor only decides *where* a job runs. Callers reduce results in a fixed order, and every
job runs with the same number of BLAS threads whatever the executor (LAPACK's Cholesky gives
other bits with other thread counts), so a run gives the same bits on every executor.

Two kinds of work:

- :meth:`Executor.map`: independent jobs (per-target factorizations), submitted largest first,
  results yielded as they complete with their job index.
- :meth:`Executor.stream`: jobs that need an expensive state built once per worker (an
  onnxruntime session over the model: calibration shards), results yielded in job order.
"""

from __future__ import annotations

import logging
import os
import socket
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

from flarc.core.errors import BackendError, FlarcError, OptionError

log = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")
DEVICES = ("auto", "cpu", "cuda")
# Attempts Ray makes after a worker dies (a task re-run, an actor restarted).
RAY_RETRIES = 3
# Jobs queued per worker beyond the running one (bounds the memory of results in flight).
QUEUE_PER_WORKER = 1
CONNECT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class JobHints:
    """What a job costs, for ordering and placement: ``cost`` (any unit, larger first) and
    ``memory`` (bytes it holds at its peak)."""

    cost: float = 1.0
    memory: int = 0


class BlasThreads:
    """BLAS/LAPACK's thread limit, set and read through the libraries found once, when made:
    finding them takes milliseconds per use, and a run limits threads around hundreds of
    products (:func:`flarc.calib.moments.panel_product`). Libraries loaded later are not seen."""

    def __init__(self) -> None:
        from threadpoolctl import ThreadpoolController

        self._controller = ThreadpoolController()

    def count(self) -> int:
        """The threads BLAS may use now (its limit inside :meth:`limit`); 1 if unknown."""
        info = self._controller.info()
        counts = [p["num_threads"] for p in info if p.get("user_api") == "blas"]
        return max(1, min(counts)) if counts else 1

    @contextmanager
    def limit(self, threads: int) -> Iterator[None]:
        """BLAS/LAPACK limited to ``threads`` threads while inside (process-wide)."""
        with self._controller.limit(limits=threads):
            yield


def blas_threads(threads: int) -> AbstractContextManager[None]:
    """BLAS/LAPACK limited to ``threads`` threads while inside (process-wide), the libraries
    loaded now."""
    return BlasThreads().limit(threads)


def _pinned(fn: Callable[..., Any], threads: int, args: tuple) -> Any:
    """``fn(*args)`` with BLAS limited to ``threads``: a Ray task (its worker process runs one
    task at a time, so the process-wide limit is the job's own)."""
    with blas_threads(threads):
        return fn(*args)


def _available_memory() -> int:
    """Bytes of memory available to new allocations (physical pages free or reclaimable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


class Executor:
    """Runs jobs; see the module docstring. Use as a context manager (or call :meth:`close`)."""

    name = ""
    workers = 1  # jobs that may run at once
    job_threads = 1  # BLAS threads of one :meth:`map` job, on every executor

    def map(
        self,
        fn: Callable[..., Any],
        jobs: Sequence[tuple],
        hints: Sequence[JobHints] | None = None,
        gpus: float = 0.0,
    ) -> Iterator[tuple[int, Any]]:
        """``(index, fn(*jobs[index]))`` for every job, as they complete; jobs start largest
        ``hints.cost`` first; ``gpus`` per job on Ray."""
        raise NotImplementedError

    def stream(
        self, setup: Callable[[], Any], fn: Callable[[Any, Any], Any], jobs: Sequence[Any]
    ) -> Iterator[Any]:
        """``fn(state, job)`` for every job, in job order, where each worker builds ``state =
        setup()`` once."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the executor started."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _largest_first(count: int, hints: Sequence[JobHints] | None) -> list[int]:
    """Job indices by descending cost (stable: equal costs keep job order)."""
    if hints is None:
        return list(range(count))
    return sorted(range(count), key=lambda i: -hints[i].cost)


class LocalExecutor(Executor):
    """Jobs in this process: :meth:`map` on a thread pool (numpy and LAPACK release the GIL),
    at most ``workers`` at once and at most half the available memory by the jobs' hints;
    :meth:`stream` one job after the other with one state."""

    name = "local"

    def __init__(self, workers: int | None = None, job_threads: int = 1) -> None:
        self.workers = workers or os.cpu_count() or 1
        self.job_threads = job_threads

    def map(self, fn, jobs, hints=None, gpus=0.0):
        order = deque(_largest_first(len(jobs), hints))
        budget = _available_memory() // 2
        running: dict[Future, int] = {}
        # One limit around the pool: BLAS's thread count is process-wide, so limits entered and
        # left by each job would race each other.
        with blas_threads(self.job_threads), ThreadPoolExecutor(self.workers) as pool:

            def fill() -> None:
                held = sum(hints[i].memory for i in running.values()) if hints else 0
                while order and len(running) < self.workers:
                    need = hints[order[0]].memory if hints else 0
                    if running and held + need > budget:
                        break  # wait for memory to free up; a job alone always runs
                    i = order.popleft()
                    running[pool.submit(fn, *jobs[i])] = i
                    held += need

            fill()
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                finished = [(running.pop(future), future) for future in done]
                # The next jobs start before the results are handed over: the workers never
                # wait while the caller stores a result.
                fill()
                for i, future in finished:
                    yield i, future.result()

    def stream(self, setup, fn, jobs):
        state = setup()
        for job in jobs:
            yield fn(state, job)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise BackendError(
            "--executor ray needs the 'ray' package, which is not installed (pip install ray)"
        ) from None
    return ray


def _check_reachable(address: str) -> None:
    """BackendError when ``address`` is a ``host:port`` nothing listens on (Ray itself would
    retry for minutes); ``auto`` and ``ray://`` addresses are left to Ray."""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise BackendError(f"--ray-address {address}: no Ray cluster there ({exc})") from None


class _StatefulWorker:
    """A Ray actor's body: ``fn(state, job)`` per call, ``state = setup()`` built on the first
    call (and again on the first call after a restart). ``setup`` comes with every call as a
    reference in a list, so Ray passes the reference, not the object: one stored copy serves
    every actor and every call."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.state: Any = None

    def run(self, setup: list, fn: Callable[[Any, Any], Any], job: Any) -> Any:
        import ray

        with blas_threads(self.threads):
            if self.state is None:
                self.state = ray.get(setup[0])()
            return fn(self.state, job)


class RayExecutor(Executor):
    """Jobs on Ray: a local cluster started here (``workers`` CPUs, shut down by :meth:`close`),
    or the running cluster at ``address`` (joined, never shut down). :meth:`map` runs tasks with
    ``num_cpus=job_threads`` (and ``num_gpus``), retried when their worker dies; :meth:`stream`
    runs one actor per worker, restarted (its state rebuilt) and its calls retried likewise."""

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        workers: int | None = None,
        job_threads: int = 1,
        retries: int = RAY_RETRIES,
    ) -> None:
        self.ray = ray = _import_ray()
        self.job_threads = job_threads
        self.retries = retries
        self.started = False
        self._pool: tuple[Any, Any, list] | None = None  # the last stream's setup and actors
        if not ray.is_initialized():
            if address:
                _check_reachable(address)
            try:
                if address:
                    ray.init(address=address, logging_level=logging.WARNING)
                else:
                    ray.init(
                        num_cpus=workers or os.cpu_count() or 1,
                        include_dashboard=False,
                        logging_level=logging.WARNING,
                    )
            except ConnectionError as exc:
                raise BackendError(f"--ray-address {address}: cannot connect ({exc})") from None
            self.started = True
            log.info("Ray: %s", f"joined {address}" if address else "started a local cluster")
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.workers = max(1, min(workers or cpus, cpus) // job_threads)

    def _get(self, ref: Any) -> Any:
        """``ray.get``, re-raising a worker's flarc error as itself (one line, no Ray wrapper)."""
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, FlarcError):
                raise exc.cause from None
            raise

    def map(self, fn, jobs, hints=None, gpus=0.0):
        ray = self.ray
        self._release()  # calibration sessions are done with by now: free their memory
        task = ray.remote(_pinned)
        order = deque(_largest_first(len(jobs), hints))
        running: dict[Any, int] = {}
        limit = self.workers * (1 + QUEUE_PER_WORKER)
        # Ray places a job only where its memory fits (a 70B down_proj holds ~17 GB); a job
        # larger than every node's memory is left to run unreserved rather than never run.
        room = max(
            (n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0
        )
        while order or running:
            while order and len(running) < limit:
                i = order.popleft()
                memory = hints[i].memory if hints and 0 < hints[i].memory <= room else None
                ref = task.options(
                    num_cpus=self.job_threads,
                    num_gpus=gpus,
                    max_retries=self.retries,
                    memory=memory,
                ).remote(fn, self.job_threads, jobs[i])
                running[ref] = i
            (ready,), _ = ray.wait(list(running), num_returns=1)
            yield running.pop(ready), self._get(ready)

    def stream(self, setup, fn, jobs):
        jobs = list(jobs)
        if not jobs:
            return
        shared, actors = self._actors(setup, min(self.workers, len(jobs)))
        pending: deque = deque()
        try:
            for i, job in enumerate(jobs):
                pending.append(actors[i % len(actors)].run.remote([shared], fn, job))
                if len(pending) >= len(actors) * (1 + QUEUE_PER_WORKER):
                    yield self._get(pending.popleft())
            while pending:
                yield self._get(pending.popleft())
        except BaseException:  # an error, or the caller stopped early: nothing to keep
            self._release()
            raise

    def _actors(self, setup: Any, count: int) -> tuple[Any, list]:
        """The stored setup and ``count`` actors for it: those of the last stream when it had
        the same setup (calibration, then held-out batches: their sessions are kept), else new
        ones in place of the old."""
        if self._pool is not None and self._pool[0] is setup and len(self._pool[2]) >= count:
            return self._pool[1], self._pool[2][:count]
        self._release()
        actor = self.ray.remote(_StatefulWorker).options(
            num_cpus=self.job_threads,
            max_restarts=self.retries,
            max_task_retries=self.retries,
        )
        shared = self.ray.put(setup)  # one copy of the setup (it may hold the model's graph)
        actors = [actor.remote(self.job_threads) for _ in range(count)]
        self._pool = (setup, shared, actors)
        return shared, actors

    def _release(self) -> None:
        """End the actors of the last stream (their sessions)."""
        if self._pool is not None:
            for a in self._pool[2]:
                self.ray.kill(a)
            self._pool = None

    def close(self) -> None:
        if self.ray.is_initialized():
            self._release()
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()
        self.started = False


@dataclass
class Compute:
    """Where the heavy work of an analysis runs: the executor of its jobs (calibration shards,
    per-target factorizations) and the device of its math (``cpu`` or ``cuda``)."""

    executor: Executor = field(default_factory=LocalExecutor)
    device: str = "cpu"


def make_executor(
    name: str = "local", address: str | None = None, workers: int | None = None
) -> Executor:
    """The executor called ``name`` (:data:`EXECUTORS`); ``address`` joins a running Ray cluster."""
    if name not in EXECUTORS:
        raise OptionError(f"--executor {name}: expected one of {', '.join(EXECUTORS)}")
    if address and name != "ray":
        raise OptionError("--ray-address goes with --executor ray")
    if name == "ray":
        return RayExecutor(address, workers)
    return LocalExecutor(workers)


def resolve_device(device: str = "auto") -> str:
    """``cpu`` or ``cuda`` for the heavy math: ``auto`` is CUDA when torch sees a GPU."""
    if device not in DEVICES:
        raise OptionError(f"--device {device}: expected one of {', '.join(DEVICES)}")
    if device == "cpu":
        return "cpu"
    try:
        import torch
    except ImportError:
        if device == "cuda":
            raise BackendError("--device cuda needs torch (pip install torch)") from None
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if device == "cuda":
        raise BackendError("--device cuda: torch sees no CUDA GPU here")
    return "cpu"
