"""The worker that owns the model: one thread runs every forward, so the event loop never blocks.

Generation is continuously batched: a request waits in a bounded queue, is encoded (images of the
requests admitted together in one batch) and prefilled by the model's `start_rows`, and joins the
running batch at the next decode step; a row that finishes (end token, stop string, max_tokens, the
model's length) or is cancelled (client gone, timeout) leaves at once and frees its KV-cache slot.
Other work (embeddings, classification, matching, beam search) comes as `Job`s, batched with the jobs
of the same key up to `max_batch_size` or until the oldest has waited `max_wait_ms`.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from vlforge.config.serve import BatchingConfig
from vlforge.models.layers.decode_rows import DecodeRows
from vlforge.models.layers.sampling import SamplingParams, next_tokens
from vlforge.models.protocols import StepwiseGenerator
from vlforge.serve.metrics import ServeMetrics
from vlforge.serve.text_stream import TextStream
from vlforge.serve.threads import own_cpu_threads

log = logging.getLogger("vlforge.serve")


class QueueFull(Exception):
    """The bounded queue is full: the caller answers 503 with Retry-After."""


class ShuttingDown(Exception):
    """The server is draining: no new work is accepted."""


@dataclass
class Delta:
    text: str


@dataclass
class Finished:
    """The end of one generation: `reason` is OpenAI's finish_reason ("stop" or "length"), or
    "cancelled" / "timeout"; `error` is set when the model failed on this request."""

    reason: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    status: int = 400  # with an error: 400 for input the model refused, 500 / 503 for the server's own failures


Event = Delta | Finished


@dataclass
class Generation:
    """One sequence to decode. `sink` receives its events from the worker thread (it must hand them
    to the event loop thread-safely); `cancel()` may be called from any thread."""

    image: torch.Tensor  # uint8 [3, H, W], as the recipe's eval image transform gives it
    prompt: str | None
    params: SamplingParams
    max_new_tokens: int
    sink: Callable[[Event], None]
    stop: Sequence[str] = ()
    seed: int | None = None
    timeout_s: float = 120.0
    arrived: float = field(default_factory=time.monotonic)
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def expired(self) -> bool:
        return time.monotonic() - self.arrived > self.timeout_s


@dataclass
class _Row:
    request: Generation
    stream: TextStream
    history: list[int]
    generator: torch.Generator | None
    prompt_tokens: int
    new_tokens: int = 0
    first_token_at: float | None = None


@dataclass
class Job:
    """Work run in batches: `run(payloads) -> results` (one per payload, in order) is called with the
    payloads of up to max_batch_size jobs of the same `key`."""

    key: Any
    payload: Any
    run: Callable[[list[Any]], list[Any]]
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)


class Scheduler:
    """Start with `start()`; submit from any thread; `shutdown(drain_s)` finishes what is in flight."""

    def __init__(self, model: StepwiseGenerator | None, config: BatchingConfig, metrics: ServeMetrics,
                 device: torch.device | str = "cpu") -> None:
        self.model, self.config, self.metrics = model, config, metrics
        self.device = torch.device(device)
        self.cpu_threads = torch.get_num_threads()  # the creating thread's: the worker takes it over
        self.vocabulary = model.vocabulary() if model is not None else None
        self._intake: queue.Queue[Generation | Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0  # submitted, not yet admitted or run
        self._pending: list[Generation] = []
        self._jobs: list[Job] = []
        self._rows: list[_Row] = []
        self._batch: DecodeRows | None = None
        self._logits: torch.Tensor | None = None
        self._accepting = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="vlforge-scheduler", daemon=True)
        self.fatal: BaseException | None = None

    # ---- any thread ----
    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        return self._waiting

    @property
    def running(self) -> int:
        return len(self._rows)

    def _enqueue(self, item: Generation | Job) -> None:
        with self._lock:
            if self.fatal is not None:
                raise ShuttingDown(f"the model worker stopped ({type(self.fatal).__name__}: {self.fatal})")
            if not self._accepting:
                raise ShuttingDown("the server is shutting down")
            if self._waiting >= self.config.max_queue:
                raise QueueFull(f"{self._waiting} requests are waiting (serve.batching.max_queue={self.config.max_queue})")
            self._waiting += 1
        self.metrics.queue_depth.set(self._waiting)
        self._intake.put(item)

    def submit(self, generation: Generation) -> None:
        if self.model is None:
            raise TypeError("this model does not decode stepwise")
        self._enqueue(generation)

    def submit_job(self, job: Job) -> Future:
        self._enqueue(job)
        return job.future

    def shutdown(self, drain_s: float = 30.0) -> None:
        """Refuse new work, let what is queued and running finish (up to `drain_s`), then stop."""
        with self._lock:
            self._accepting = False
        deadline = time.monotonic() + drain_s
        while time.monotonic() < deadline and (self._waiting or self._rows or self._jobs) and self.alive:
            time.sleep(0.01)
        self._stop.set()
        self._intake.put(None)
        self._thread.join(timeout=5)

    # ---- the worker thread ----
    def _taken(self, count: int = 1) -> None:
        with self._lock:
            self._waiting -= count
        self.metrics.queue_depth.set(self._waiting)

    def _drain_intake(self, timeout: float | None) -> None:
        try:
            item = self._intake.get(timeout=timeout) if timeout != 0 else self._intake.get_nowait()
        except queue.Empty:
            return
        while True:
            if isinstance(item, Generation):
                self._pending.append(item)
            elif isinstance(item, Job):
                self._jobs.append(item)
            try:
                item = self._intake.get_nowait()
            except queue.Empty:
                return

    def _wait_time(self) -> float | None:
        """How long the worker may block for new work: not at all with rows to decode or prefill."""
        if self._rows or (self._pending and len(self._rows) < self.config.max_running):
            return 0
        if self._jobs:
            oldest = min(job.arrived for job in self._jobs)
            return max(0.0, oldest + self.config.max_wait_ms / 1000 - time.monotonic())
        return 0.1

    def _loop(self) -> None:
        own_cpu_threads(self.cpu_threads)
        if self.device.type == "cpu":
            torch.set_flush_denormal(True)  # denormals slow CPU matmuls many-fold; the setting is per thread
        try:
            while not self._stop.is_set():
                self._drain_intake(self._wait_time())
                for phase in (self._run_due_jobs, self._admit, self._step):
                    try:
                        phase()
                    except Exception as err:  # e.g. out of memory: the rows in flight fail, the server goes on
                        log.exception("vlforge serve: %s failed", phase.__name__)
                        self._fail_running(f"the server failed on this request: {type(err).__name__}: {err}")
        except BaseException as err:  # a crash of the worker must not leave requests hanging
            with self._lock:
                self.fatal = err
            self._fail_everything(f"the model worker stopped: {type(err).__name__}: {err}")
            raise
        # Stopped: what the drain did not finish in time ends with an answer, not silence.
        self._fail_everything("the server shut down before this request finished")

    def _fail_running(self, message: str) -> None:
        for row in self._rows:
            row.request.sink(Finished("error", row.stream.text, row.prompt_tokens, row.new_tokens, message, 500))
        self._rows, self._batch, self._logits = [], None, None
        self.metrics.running.set(0)

    def _fail_everything(self, message: str) -> None:
        with self._lock:
            self._accepting = False
        self._drain_intake(0)  # what was queued meanwhile is answered too
        for row in self._rows:
            row.request.sink(Finished("error", row.stream.text, row.prompt_tokens, row.new_tokens, message, 503))
        for request in self._pending:
            request.sink(Finished("error", "", 0, 0, message, 503))
        for job in self._jobs:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(ShuttingDown(message))
        self._rows, self._pending, self._jobs = [], [], []

    def _run_due_jobs(self) -> None:
        if not self._jobs:
            return
        now = time.monotonic()
        by_key: dict[Any, list[Job]] = {}
        for job in self._jobs:
            by_key.setdefault(job.key, []).append(job)
        for jobs in by_key.values():
            due = (len(jobs) >= self.config.max_batch_size or not self._accepting
                   or now - jobs[0].arrived >= self.config.max_wait_ms / 1000)
            if not due:
                continue
            batch = jobs[: self.config.max_batch_size]
            self._taken(len(batch))
            for job in batch:
                self._jobs.remove(job)
            # Running futures cannot be cancelled: a client that leaves now cannot race the result in.
            live = [job for job in batch if job.future.set_running_or_notify_cancel()]
            if not live:
                continue
            self.metrics.batch_size.labels(kind="job").observe(len(live))
            try:
                results = live[0].run([job.payload for job in live])
            except Exception as err:  # a bad request in the batch: answer each alone, so one fails, not all
                if len(live) == 1:
                    live[0].future.set_exception(err)
                    continue
                results = []
                for job in live:
                    try:
                        results.append(job.run([job.payload])[0])
                    except Exception as single:
                        results.append(single)
            for job, result in zip(live, results):
                if isinstance(result, Exception):
                    job.future.set_exception(result)
                elif not job.future.done():
                    job.future.set_result(result)

    def _admit(self) -> None:
        room = self.config.max_running - len(self._rows)
        if not self._pending or room <= 0 or (self.config.policy == "request" and self._rows):
            return
        taken, self._pending = self._pending[:room], self._pending[room:]
        try:
            live = []
            for request in taken:
                if request.cancelled:
                    request.sink(Finished("cancelled", "", 0, 0))
                elif request.expired:
                    request.sink(Finished("timeout", "", 0, 0, "timed out waiting in the queue"))
                else:
                    live.append(request)
            for start in range(0, len(live), self.config.max_batch_size):
                self._start(live[start:start + self.config.max_batch_size])
        finally:  # counted as waiting until they are rows: a draining shutdown sees them all along
            self._taken(len(taken))

    def _start(self, requests: list[Generation]) -> None:
        assert self.model is not None and self.vocabulary is not None
        image = torch.stack([r.image for r in requests]).to(self.device)
        try:
            started = self.model.start_rows(image, [r.prompt for r in requests])
        except Exception as err:
            if len(requests) > 1:  # find the request that cannot start; start the others
                for request in requests:
                    self._start([request])
                return
            status = 400 if isinstance(err, ValueError) else 500
            requests[0].sink(Finished("error", "", 0, 0, f"{type(err).__name__}: {err}", status))
            return
        self.metrics.batch_size.labels(kind="prefill").observe(len(requests))
        rows = []
        for request, history in zip(requests, started.histories):
            generator = None
            if request.params.do_sample:
                generator = torch.Generator(device=started.logits.device)
                generator.manual_seed(request.seed if request.seed is not None else int(torch.randint(0, 2**62, (1,))))
            stream = TextStream(self.vocabulary.tokenizer, self.vocabulary.eos_id, request.stop)
            prompt_tokens = int(started.rows.positions[len(rows)])
            rows.append(_Row(request, stream, list(history), generator, prompt_tokens))
        keep_old = bool(self._rows)
        if keep_old:
            self.metrics.joined_running.inc(len(rows))
        self._batch = DecodeRows.concat([self._batch, started.rows]) if keep_old else started.rows
        self._logits = torch.cat([self._logits, started.logits]) if keep_old else started.logits
        self._rows = self._rows + rows

    def _step(self) -> None:
        if not self._rows:
            return
        assert self.model is not None and self._batch is not None and self._logits is not None
        rows = self._rows
        chosen = next_tokens(self._logits, [r.history for r in rows], [r.new_tokens for r in rows],
                             [r.request.params for r in rows], [r.generator for r in rows], self.vocabulary.eos_id)
        keep: list[int] = []
        now = time.monotonic()
        positions = self._batch.positions.tolist()  # one host sync a step, not one a row
        for index, (row, token) in enumerate(zip(rows, chosen)):
            request = row.request
            if request.cancelled:
                request.sink(Finished("cancelled", row.stream.text, row.prompt_tokens, row.new_tokens))
                continue
            if request.expired:
                request.sink(Finished("timeout", row.stream.text, row.prompt_tokens, row.new_tokens,
                                      f"the request took longer than {request.timeout_s:g} s"))
                continue
            row.new_tokens += 1
            row.history.append(token)
            if row.first_token_at is None:
                row.first_token_at = now
                self.metrics.time_to_first_token.observe(now - request.arrived)
            delta = row.stream.push(token)
            if delta:
                request.sink(Delta(delta))
            position = positions[index] + 1
            at_length = row.new_tokens >= request.max_new_tokens or (
                self.vocabulary.max_positions is not None and position >= self.vocabulary.max_positions)
            if row.stream.stopped or at_length:
                rest = row.stream.finish()
                if rest:
                    request.sink(Delta(rest))
                reason = "stop" if row.stream.stopped else "length"
                request.sink(Finished(reason, row.stream.text, row.prompt_tokens, row.new_tokens))
                continue
            keep.append(index)
        self.metrics.tokens.inc(len(rows))
        self.metrics.batch_size.labels(kind="decode").observe(len(rows))
        if len(keep) < len(rows):
            self._rows = [rows[i] for i in keep]
            if not keep:
                self._batch, self._logits = None, None
                self.metrics.running.set(0)
                return
            index = torch.tensor(keep)
            self._batch = self._batch.select(index)
            chosen = [chosen[i] for i in keep]
        self.metrics.running.set(len(self._rows))
        next_ids = torch.tensor(chosen, device=self._batch.key_mask.device)
        self._logits = self.model.step_rows(self._batch, next_ids)
