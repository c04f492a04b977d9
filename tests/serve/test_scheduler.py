"""The scheduler on its own: continuous batching gives each request exactly its output alone, a
cancelled row leaves within one step, the queue is bounded, jobs batch by size or wait, timeouts end
requests, and shutdown drains."""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import pytest

from tests.tiny_recipes import build_tiny, images, save_tokenizer
from vlforge.config.serve import BatchingConfig
from vlforge.models.layers.sampling import SamplingParams
from vlforge.serve.metrics import ServeMetrics
from vlforge.serve.scheduler import Delta, Finished, Generation, Job, QueueFull, Scheduler


class Collector:
    def __init__(self) -> None:
        self.deltas: list[str] = []
        self.finished: Finished | None = None
        self.done = threading.Event()

    def __call__(self, event) -> None:
        if isinstance(event, Delta):
            self.deltas.append(event.text)
        else:
            self.finished = event
            self.done.set()


class SlowModel:
    """A stepwise model whose steps take `delay` seconds, and which counts the rows of each step."""

    def __init__(self, model, delay: float) -> None:
        self.model, self.delay, self.step_rows_seen = model, delay, []

    def vocabulary(self):
        return self.model.vocabulary()

    def start_rows(self, image, prompts):
        return self.model.start_rows(image, prompts)

    def step_rows(self, rows, next_ids):
        self.step_rows_seen.append(rows.size)
        time.sleep(self.delay)
        return self.model.step_rows(rows, next_ids)


@pytest.fixture(scope="module")
def llava(tmp_path_factory: pytest.TempPathFactory):
    model, _ = build_tiny("llava_finetune_demo", save_tokenizer(tmp_path_factory.mktemp("tok")))
    return model


def _generation(image, prompt, max_new, sink, **kwargs) -> Generation:
    return Generation(image=image, prompt=prompt, params=kwargs.pop("params", SamplingParams()), max_new_tokens=max_new,
                      sink=sink, **kwargs)


def _run_alone(model, image, prompt, max_new, params=SamplingParams(), seed=None) -> Collector:
    scheduler = Scheduler(model, BatchingConfig(), ServeMetrics())
    scheduler.start()
    out = Collector()
    scheduler.submit(_generation(image, prompt, max_new, out, params=params, seed=seed))
    assert out.done.wait(30)
    scheduler.shutdown(1)
    return out


PROMPTS = ["what colour is the shape ?", "what shape is on the left ?", "a", "is it red ?", None,
           "the small blue square and the large red circle"]


def test_32_requests_joining_a_running_batch_each_get_their_output_alone(llava) -> None:
    slow = SlowModel(llava, delay=0.01)
    metrics = ServeMetrics()
    scheduler = Scheduler(slow, BatchingConfig(max_running=32, max_batch_size=8), metrics)
    scheduler.start()
    image = images(32)
    collectors, specs = [], []
    for i in range(32):
        spec = (PROMPTS[i % len(PROMPTS)], 4 + (i * 7) % 13)
        specs.append(spec)
        collectors.append(Collector())
        scheduler.submit(_generation(image[i], spec[0], spec[1], collectors[i]))
        if i % 4 == 3:
            time.sleep(0.01)  # later requests arrive while earlier ones decode
    for c in collectors:
        assert c.done.wait(60)
    scheduler.shutdown(1)
    assert metrics.joined_running._value.get() > 0  # requests joined a batch that was running
    assert max(slow.step_rows_seen) > 8  # decode steps ran many rows together
    for i, (prompt, max_new) in enumerate(specs):
        alone = _run_alone(llava, image[i], prompt, max_new)
        assert collectors[i].finished.text == alone.finished.text, i
        assert "".join(collectors[i].deltas) == collectors[i].finished.text
        assert collectors[i].finished.completion_tokens == alone.finished.completion_tokens


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(llava) -> None:
    params = SamplingParams(do_sample=True, temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.1)
    image = images(4)
    scheduler = Scheduler(llava, BatchingConfig(), ServeMetrics())
    scheduler.start()
    outs = [Collector() for _ in range(4)]
    for i in range(4):
        scheduler.submit(_generation(image[i], PROMPTS[i], 10, outs[i], params=params, seed=100 + i))
    for out in outs:
        assert out.done.wait(30)
    scheduler.shutdown(1)
    for i in range(4):
        assert outs[i].finished.text == _run_alone(llava, image[i], PROMPTS[i], 10, params, seed=100 + i).finished.text


def test_a_cancelled_row_leaves_within_one_step(llava) -> None:
    slow = SlowModel(llava, delay=0.02)
    scheduler = Scheduler(slow, BatchingConfig(), ServeMetrics())
    scheduler.start()
    try:
        image = images(2)
        endless = SamplingParams(min_new_tokens=150)  # no end token: both rows run until stopped
        keep, gone = Collector(), Collector()
        scheduler.submit(_generation(image[0], "a", 150, keep, params=endless))
        leaving = _generation(image[1], "a", 150, gone, params=endless)
        scheduler.submit(leaving)
        while len(slow.step_rows_seen) < 3:
            time.sleep(0.005)
        assert slow.step_rows_seen[-1] == 2
        steps_before = len(slow.step_rows_seen)
        leaving.cancel()
        assert gone.done.wait(5)
        assert gone.finished.reason == "cancelled"
        while len(slow.step_rows_seen) < steps_before + 4:
            time.sleep(0.005)
        # At most the step under way when it was cancelled still carried it; every later one is 1 row.
        assert all(rows == 1 for rows in slow.step_rows_seen[steps_before + 1:])
        assert keep.finished is None
    finally:
        scheduler.shutdown(0)


def test_the_queue_is_bounded_and_timeouts_end_requests(llava) -> None:
    slow = SlowModel(llava, delay=0.05)
    scheduler = Scheduler(slow, BatchingConfig(max_running=1, max_queue=2), ServeMetrics())
    scheduler.start()
    image = images(1)[0]
    first = Collector()
    scheduler.submit(_generation(image, "a", 100, first, params=SamplingParams(min_new_tokens=100), timeout_s=0.3))
    while scheduler.running < 1 or scheduler.queue_depth:  # admitted: the queue is empty again
        time.sleep(0.005)
    waiting = [Collector(), Collector()]
    for out in waiting:
        scheduler.submit(_generation(image, "a", 2, out))
    with pytest.raises(QueueFull, match="max_queue=2"):
        scheduler.submit(_generation(image, "a", 2, Collector()))
    assert first.done.wait(5) and first.finished.reason == "timeout"
    for out in waiting:
        assert out.done.wait(5) and out.finished.reason in ("stop", "length")
    scheduler.shutdown(1)


def test_jobs_batch_by_size_or_wait_and_fail_alone() -> None:
    batches: list[list[int]] = []

    def run(payloads: list[int]) -> list[int]:
        if -1 in payloads:
            raise ValueError("negative")
        batches.append(list(payloads))
        return [p * 10 for p in payloads]

    scheduler = Scheduler(None, BatchingConfig(max_batch_size=4, max_wait_ms=200), ServeMetrics())
    scheduler.start()
    futures: list[Future] = [scheduler.submit_job(Job("k", i, run)) for i in range(6)]
    bad = scheduler.submit_job(Job("k", -1, run))
    assert [f.result(5) for f in futures] == [0, 10, 20, 30, 40, 50]
    with pytest.raises(ValueError, match="negative"):
        bad.result(5)
    scheduler.shutdown(1)
    assert batches[0] == [0, 1, 2, 3]  # a full batch runs at once
    assert sorted(p for b in batches[1:] for p in b) == [4, 5]  # the rest after max_wait, without the bad one


def test_shutdown_finishes_what_is_in_flight_and_refuses_new_work(llava) -> None:
    slow = SlowModel(llava, delay=0.01)
    scheduler = Scheduler(slow, BatchingConfig(), ServeMetrics())
    scheduler.start()
    out = Collector()
    scheduler.submit(_generation(images(1)[0], "a", 20, out))
    time.sleep(0.05)
    scheduler.shutdown(30)
    assert out.finished is not None and out.finished.reason in ("stop", "length")
    with pytest.raises(Exception, match="shutting down"):
        scheduler.submit(_generation(images(1)[0], "a", 2, Collector()))


def test_request_level_batching_admits_only_between_batches(llava) -> None:
    slow = SlowModel(llava, delay=0.01)
    metrics = ServeMetrics()
    scheduler = Scheduler(slow, BatchingConfig(policy="request"), metrics)
    image = images(3)
    endless = SamplingParams(min_new_tokens=10)
    outs = [Collector() for _ in range(3)]
    scheduler.submit(_generation(image[0], "a", 10, outs[0], params=endless))
    scheduler.submit(_generation(image[1], "a", 10, outs[1], params=endless))
    scheduler.start()  # after both are queued: they start as one batch
    try:
        while len(slow.step_rows_seen) < 2:
            time.sleep(0.002)
        scheduler.submit(_generation(image[2], "a", 10, outs[2], params=endless))  # arrives mid-batch
        for out in outs:
            assert out.done.wait(10)
    finally:
        scheduler.shutdown(1)
    assert metrics.joined_running._value.get() == 0
    assert slow.step_rows_seen[:9] == [2] * 9 and slow.step_rows_seen[9:] == [1] * 9  # after the first batch


def test_a_failing_step_fails_its_rows_and_the_worker_goes_on(llava) -> None:
    class Failing(SlowModel):
        fail = True

        def step_rows(self, rows, next_ids):
            if Failing.fail:
                Failing.fail = False
                raise RuntimeError("out of memory")
            return super().step_rows(rows, next_ids)

    scheduler = Scheduler(Failing(llava, delay=0.0), BatchingConfig(), ServeMetrics())
    scheduler.start()
    try:
        first, second = Collector(), Collector()
        scheduler.submit(_generation(images(1)[0], "a", 5, first, params=SamplingParams(min_new_tokens=5)))
        assert first.done.wait(10)
        assert first.finished.reason == "error" and "out of memory" in first.finished.error
        scheduler.submit(_generation(images(1)[0], "a", 5, second, params=SamplingParams(min_new_tokens=5)))
        assert second.done.wait(10) and second.finished.reason == "length"
        assert scheduler.alive
    finally:
        scheduler.shutdown(1)
