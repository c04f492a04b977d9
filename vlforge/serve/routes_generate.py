"""`POST /v1/chat/completions` (OpenAI's) and `POST /v1/caption`: text from an image, streamed or not.

A stepwise model's requests join the scheduler's running batch; a request with `n` > 1 is n rows
(seeds seed, seed+1, ...). A VQA model answers the chat's text as a question, in request-level
batches; beam search (`/v1/caption` num_beams > 1) runs the model's own `generate` likewise.
"""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from vlforge.models.layers.sampling import SamplingParams
from vlforge.serve.auth import check_api_key
from vlforge.serve.errors import APIError, error_body
from vlforge.serve.scheduler import Delta, Finished, Generation, Job
from vlforge.serve.schemas import (
    CaptionChoice,
    CaptionRequest,
    CaptionResponse,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChatResponseMessage,
    ImagePart,
    SamplingFields,
    TextPart,
    Usage,
)
from vlforge.serve.service import CaptionJob
from vlforge.serve.state import (
    EventChannel,
    ServerState,
    await_job,
    check_capability,
    check_model,
    overloaded,
    request_id,
    request_image,
    server_of,
)

router = APIRouter(dependencies=[Depends(check_api_key)])

FINISH_STATUS = {"timeout": 504, "error": 400, "cancelled": 499}
GREEDY_BELOW = 1e-5


def sampling_params(body: SamplingFields) -> SamplingParams:
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise APIError(400, f"{name} is not supported by this server (use repetition_penalty)", name)
    sample = body.temperature >= GREEDY_BELOW  # below it, as vLLM does: greedy (a division by ~0 otherwise)
    return SamplingParams(do_sample=sample, temperature=body.temperature if sample else 1.0, top_k=body.top_k,
                          top_p=body.top_p, repetition_penalty=body.repetition_penalty,
                          no_repeat_ngram_size=body.no_repeat_ngram_size, min_new_tokens=body.min_tokens)


def _limits(state: ServerState, body: SamplingFields, max_tokens: int | None) -> tuple[int, list[str]]:
    limits = state.config.limits
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise APIError(400, f"max_tokens={max_tokens} is over this server's limit {limits.max_tokens}", "max_tokens")
    if body.n > limits.max_n:
        raise APIError(400, f"n={body.n} is over this server's limit {limits.max_n}", "n")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4:
        raise APIError(400, "stop takes at most 4 sequences", "stop")
    tokens = max_tokens or limits.default_max_tokens
    if body.min_tokens > tokens:
        raise APIError(400, f"min_tokens={body.min_tokens} exceeds max_tokens={tokens}", "min_tokens")
    return tokens, stop


def _check_prompt(state: ServerState, prompt: str | None, param: str) -> None:
    if prompt is None or state.service.stepwise is None:
        return
    count = state.service.count_tokens(prompt)
    if count > state.config.limits.max_prompt_tokens:
        raise APIError(400, f"{param}: the prompt is {count} tokens, over serve.limits.max_prompt_tokens="
                            f"{state.config.limits.max_prompt_tokens}", param)


def _refuse_unsupported(body: ChatCompletionRequest) -> None:
    """OpenAI features that would change the answer and that this server does not have: a 400 rather
    than an answer that silently lacks them."""
    unsupported = {"logprobs": bool(body.logprobs), "top_logprobs": body.top_logprobs is not None,
                   "logit_bias": bool(body.logit_bias), "tools": bool(body.tools),
                   "tool_choice": body.tool_choice not in (None, "none"),
                   "response_format": bool(body.response_format) and body.response_format.get("type") != "text"}
    for field, given in unsupported.items():
        if given:
            raise APIError(400, f"{field} is not supported by this server", field)


def chat_inputs(body: ChatCompletionRequest) -> tuple[str, str, str | None]:
    """(image url, its param path, the prompt text) of a chat: one user message, one image in it."""
    users = [i for i, m in enumerate(body.messages) if m.role == "user"]
    others = [i for i, m in enumerate(body.messages) if m.role != "user"]
    if others:
        raise APIError(400, f"messages[{others[0]}]: only a single user message is supported (role "
                            f"'{body.messages[others[0]].role}' given); send the image and text in one user message",
                       f"messages[{others[0]}].role")
    if len(users) != 1:
        raise APIError(400, "messages: send exactly one user message (multi-turn conversations are not supported)",
                       "messages")
    index = users[0]
    content = body.messages[index].content
    if not isinstance(content, list):
        raise APIError(400, f"messages[{index}].content: an image is needed: give content as a list with an "
                            "image_url part (a data: URI)", f"messages[{index}].content")
    images = [(i, p) for i, p in enumerate(content) if isinstance(p, ImagePart)]
    if len(images) != 1:
        raise APIError(400, f"messages[{index}].content: exactly one image_url part is needed, got {len(images)}",
                       f"messages[{index}].content")
    texts = [p.text for p in content if isinstance(p, TextPart)]
    text = "\n".join(texts).strip() or None
    part, image = images[0]
    return image.image_url.url, f"messages[{index}].content[{part}].image_url.url", text


def _submit_generations(state: ServerState, channel: EventChannel, image, prompt: str | None, params: SamplingParams,
                        max_tokens: int, stop: list[str], n: int, seed: int | None) -> list[Generation]:
    generations = [Generation(image=image, prompt=prompt, params=params, max_new_tokens=max_tokens,
                              sink=channel.sink(i), stop=stop, seed=None if seed is None else seed + i,
                              timeout_s=state.config.batching.request_timeout_s) for i in range(n)]
    submitted = []
    try:
        for generation in generations:
            state.scheduler.submit(generation)
            submitted.append(generation)
    except Exception as err:
        for generation in submitted:
            generation.cancel()
        raise overloaded(state, err) from None
    return generations


async def _collect(request: Request, channel: EventChannel, generations: list[Generation]) -> list[Finished]:
    """Every generation's end; cancels them all if the client goes away."""
    done: dict[int, Finished] = {}
    # The scheduler ends a request at its timeout; this is the backstop should the worker itself stall.
    deadline = time.monotonic() + generations[0].timeout_s + 5
    checked = time.monotonic()
    try:
        while len(done) < len(generations):
            try:
                index, event = await _next_event(channel, 0.25)
                if isinstance(event, Finished):
                    done[index] = event
            except TimeoutError:
                pass
            if time.monotonic() - checked >= 0.25:  # events may flow without pause: check by the clock
                checked = time.monotonic()
                if await request.is_disconnected():
                    raise APIError(499, "the client closed the request", None) from None
                if checked > deadline:
                    raise APIError(504, f"no answer within {generations[0].timeout_s:g} s", None) from None
    finally:
        for generation in generations:
            generation.cancel()
    return [done[i] for i in range(len(generations))]


async def _next_event(channel: EventChannel, timeout: float):
    try:
        return await asyncio.wait_for(channel.queue.get(), timeout)
    except asyncio.TimeoutError:
        raise TimeoutError from None


def _status(end: Finished) -> int:
    return end.status if end.reason == "error" else FINISH_STATUS[end.reason]


def _raise_failure(finished: list[Finished]) -> None:
    for end in finished:
        if end.reason in FINISH_STATUS:
            raise APIError(_status(end), end.error or end.reason, None)


def _usage(finished: list[Finished]) -> Usage:
    prompt = finished[0].prompt_tokens if finished else 0
    completion = sum(f.completion_tokens for f in finished)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def _stream(request: Request, channel: EventChannel, generations: list[Generation],
                  chunk: Any, final: Any, usage_chunk: Any | None) -> AsyncIterator[str]:
    """SSE of every generation's deltas as they come, each one's end, then `[DONE]`. Leaving (the
    client disconnected: the response is cancelled) cancels every generation: their slots free at
    the next step."""
    finished: dict[int, Finished] = {}
    deadline = time.monotonic() + generations[0].timeout_s + 5  # a backstop, as in _collect
    try:
        for index in range(len(generations)):
            first = chunk(index, None)
            if first is not None:
                yield _sse(first)
        while len(finished) < len(generations):
            try:
                index, event = await _next_event(channel, 0.25)
            except TimeoutError:
                if await request.is_disconnected():
                    return
                if time.monotonic() > deadline:
                    yield _sse(error_body(504, f"no answer within {generations[0].timeout_s:g} s"))
                    break
                continue
            if isinstance(event, Delta):
                yield _sse(chunk(index, event.text))
            else:
                finished[index] = event
                if event.reason in FINISH_STATUS:
                    yield _sse(error_body(_status(event), event.error or event.reason))
                else:
                    yield _sse(final(index, event.reason))
        if usage_chunk is not None:
            yield _sse(usage_chunk(_usage([finished[i] for i in sorted(finished)])))
        yield "data: [DONE]\n\n"
    finally:
        for generation in generations:
            generation.cancel()


@router.post("/v1/chat/completions", response_model=ChatCompletion,
             responses={400: {"description": "a malformed request, named by its field"}})
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    state = server_of(request)
    check_model(state, body.model)
    check_capability(state, "chat", "/v1/chat/completions")
    _refuse_unsupported(body)
    max_tokens, stop = _limits(state, body, body.max_completion_tokens or body.max_tokens)
    params = sampling_params(body)
    url, param, text = chat_inputs(body)
    _check_prompt(state, text, param.rsplit(".image_url", 1)[0].rsplit("[", 1)[0])
    image = await request_image(state, url, param)
    rid, created, model = request_id("chatcmpl"), int(time.time()), state.service.name
    start = time.monotonic()
    if state.service.stepwise is None:  # a VQA model: the text is the question
        if text is None:
            raise APIError(400, f"{param.split('.content')[0]}.content: a question (a text part) is needed", param)
        future = _submit_job(state, Job(("answer", max_tokens, 1), (image, text, max_tokens, 1),
                                        state.service.run_answers))
        answer = await await_job(request, state, future)
        ends = [Finished("stop", answer, state.service.count_tokens(text), state.service.count_tokens(answer))] * body.n
        if body.stream:
            return _single_shot_stream(rid, created, model, ends)
        return _chat_response(rid, created, model, ends, start, state)
    channel = EventChannel()
    prompt = state.service.stepwise.chat_prompt(text)
    generations = _submit_generations(state, channel, image, prompt, params, max_tokens, stop, body.n, body.seed)

    def chunk(index: int, text_delta: str | None) -> dict[str, Any]:
        delta = {"role": "assistant", "content": ""} if text_delta is None else {"content": text_delta}
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": index, "delta": delta, "finish_reason": None, "logprobs": None}]}

    def final(index: int, reason: str) -> dict[str, Any]:
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": index, "delta": {}, "finish_reason": reason, "logprobs": None}]}

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        usage_chunk = (lambda usage: {"id": rid, "object": "chat.completion.chunk", "created": created,
                                      "model": model, "choices": [], "usage": usage.model_dump()}) if include_usage else None
        return _streaming_response(state, start, "chat", _stream(request, channel, generations, chunk, final, usage_chunk))
    ends = await _collect(request, channel, generations)
    _raise_failure(ends)
    return _chat_response(rid, created, model, ends, start, state)


def _streaming_response(state: ServerState, start: float, endpoint: str, body: AsyncIterator[str]) -> StreamingResponse:
    async def timed() -> AsyncIterator[str]:
        try:
            async for part in body:
                yield part
        finally:
            state.metrics.latency.labels(endpoint=endpoint).observe(time.monotonic() - start)

    return StreamingResponse(timed(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _single_shot_stream(rid: str, created: int, model: str, ends: list[Finished]) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        for index, end in enumerate(ends):
            base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
            yield _sse({**base, "choices": [{"index": index, "delta": {"role": "assistant", "content": end.text},
                                             "finish_reason": None, "logprobs": None}]})
            yield _sse({**base, "choices": [{"index": index, "delta": {}, "finish_reason": end.reason,
                                             "logprobs": None}]})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def _chat_response(rid: str, created: int, model: str, ends: list[Finished], start: float,
                   state: ServerState) -> ChatCompletion:
    state.metrics.latency.labels(endpoint="chat").observe(time.monotonic() - start)
    choices = [ChatChoice(index=i, message=ChatResponseMessage(content=end.text), finish_reason=end.reason)
               for i, end in enumerate(ends)]
    return ChatCompletion(id=rid, created=created, model=model, choices=choices, usage=_usage(ends))


def _submit_job(state: ServerState, job: Job):
    try:
        return state.scheduler.submit_job(job)
    except Exception as err:
        raise overloaded(state, err) from None


@router.post("/v1/caption", response_model=CaptionResponse)
async def caption(body: CaptionRequest, request: Request) -> Any:
    state = server_of(request)
    check_model(state, body.model)
    check_capability(state, "caption", "/v1/caption")
    max_tokens, stop = _limits(state, body, body.max_tokens)
    params = sampling_params(body)
    _check_prompt(state, body.prompt, "prompt")
    image = await request_image(state, body.image, "image")
    rid, created, model = request_id("caption"), int(time.time()), state.service.name
    start = time.monotonic()
    beams = body.num_beams > 1 or state.service.stepwise is None
    if beams:
        if body.stream or body.n > 1 or params.do_sample:
            raise APIError(400, "num_beams > 1 takes neither stream, n > 1 nor temperature > 0", "num_beams")
        job = CaptionJob(image, body.prompt, body.num_beams, max_tokens, body.min_tokens, body.repetition_penalty)
        key = ("caption", body.num_beams, max_tokens, body.min_tokens, body.repetition_penalty, body.prompt)
        text = (await await_job(request, state, _submit_job(state, Job(key, job, state.service.run_captions))))
        ends = [Finished("stop", text, 0, state.service.count_tokens(text))]
    else:
        channel = EventChannel()
        generations = _submit_generations(state, channel, image, body.prompt, params, max_tokens, stop, body.n, body.seed)
        if body.stream:
            return _streaming_response(state, start, "caption", _stream(
                request, channel, generations,
                lambda index, delta: None if delta is None else {"index": index, "delta": delta},
                lambda index, reason: {"index": index, "finish_reason": reason}, None))
        ends = await _collect(request, channel, generations)
        _raise_failure(ends)
    state.metrics.latency.labels(endpoint="caption").observe(time.monotonic() - start)
    return CaptionResponse(id=rid, created=created, model=model, usage=_usage(ends),
                           choices=[CaptionChoice(index=i, text=e.text, finish_reason=e.reason) for i, e in enumerate(ends)])
