"""The task endpoints with no chat shape: `/v1/vqa`, `/v1/classify`, `/v1/embeddings` (OpenAI's
response shape) and `/v1/match`. Each request is a scheduler Job, batched with others of its kind."""
from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Request

from vlforge.serve.auth import check_api_key
from vlforge.serve.errors import APIError
from vlforge.serve.scheduler import Job
from vlforge.serve.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    Embedding,
    EmbeddingImage,
    EmbeddingsRequest,
    EmbeddingsResponse,
    LabelScore,
    MatchRequest,
    MatchResponse,
    MatchScore,
    VQARequest,
    VQAResponse,
)
from vlforge.serve.service import encode_embedding
from vlforge.serve.state import (
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


async def _run(request: Request, state: ServerState, key: Any, payload: Any, run: Any) -> Any:
    try:
        future = state.scheduler.submit_job(Job(key, payload, run))
    except Exception as err:
        raise overloaded(state, err) from None
    return await await_job(request, state, future)


def _texts(state: ServerState, texts: list[str], param: str) -> None:
    if len(texts) > state.config.limits.max_texts:
        raise APIError(400, f"{param}: {len(texts)} texts, over serve.limits.max_texts={state.config.limits.max_texts}",
                       param)
    for i, text in enumerate(texts):
        if not text.strip():
            raise APIError(400, f"{param}[{i}]: an empty text", f"{param}[{i}]")
        if len(text) > 16 * state.config.limits.max_prompt_tokens:
            raise APIError(400, f"{param}[{i}]: the text is {len(text)} characters long, over this server's limit",
                           f"{param}[{i}]")


@router.post("/v1/vqa", response_model=VQAResponse)
async def vqa(body: VQARequest, request: Request) -> Any:
    state = server_of(request)
    check_model(state, body.model)
    check_capability(state, "vqa", "/v1/vqa")
    _texts(state, [body.question], "question")
    image = await request_image(state, body.image, "image")
    rid, model = request_id("vqa"), state.service.name
    if body.mode == "rank":
        if state.service.ranker is None:
            raise APIError(400, f"{model} cannot rank answers; use mode: generate", "mode")
        if not body.answers:
            raise APIError(400, "answers: mode rank needs the candidate answers", "answers")
        _texts(state, body.answers, "answers")
        index = await _run(request, state, ("rank",), (image, body.question, body.answers), state.service.run_ranking)
        return VQAResponse(id=rid, model=model, answer=body.answers[index], answer_index=index)
    if state.service.answerer is None:
        raise APIError(400, f"{model} cannot generate answers; use mode: rank with answers", "mode")
    max_tokens = body.max_tokens or 10
    if max_tokens > state.config.limits.max_tokens:
        raise APIError(400, f"max_tokens={max_tokens} is over this server's limit {state.config.limits.max_tokens}",
                       "max_tokens")
    answer = await _run(request, state, ("answer", max_tokens, body.num_beams),
                        (image, body.question, max_tokens, body.num_beams), state.service.run_answers)
    return VQAResponse(id=rid, model=model, answer=answer)


@router.post("/v1/classify", response_model=ClassifyResponse)
async def classify(body: ClassifyRequest, request: Request) -> Any:
    state = server_of(request)
    check_model(state, body.model)
    check_capability(state, "classify", "/v1/classify")
    _texts(state, body.labels, "labels")
    for i, template in enumerate(body.templates):
        try:
            fits = "{}" in template and template.format("label") != template
        except (IndexError, KeyError, ValueError):
            fits = False
        if not fits:
            raise APIError(400, f"templates[{i}]: a template needs one '{{}}' where the label goes (and no other "
                                "braces)", f"templates[{i}]")
    _texts(state, body.templates, "templates")
    image = await request_image(state, body.image, "image")
    probabilities = await _run(request, state, ("classify",), (image, body.labels, body.templates),
                               state.service.run_classify)
    ranked = sorted(zip(body.labels, probabilities), key=lambda pair: pair[1], reverse=True)
    if body.top_k is not None:
        ranked = ranked[: body.top_k]
    return ClassifyResponse(id=request_id("classify"), model=state.service.name,
                            labels=[LabelScore(label=label, score=score) for label, score in ranked])


@router.post("/v1/embeddings", response_model=EmbeddingsResponse)
async def embeddings(body: EmbeddingsRequest, request: Request) -> Any:
    state = server_of(request)
    check_model(state, body.model)
    check_capability(state, "embeddings", "/v1/embeddings")
    items = [body.input] if isinstance(body.input, str) else list(body.input)
    if not items:
        raise APIError(400, "input: at least one text or image is needed", "input")
    texts = [(i, item) for i, item in enumerate(items) if isinstance(item, str)]
    images = [(i, item) for i, item in enumerate(items) if isinstance(item, EmbeddingImage)]
    if len(images) > state.config.limits.max_images:
        raise APIError(400, f"input: {len(images)} images, over serve.limits.max_images={state.config.limits.max_images}",
                       "input")
    if len(texts) > state.config.limits.max_texts:
        raise APIError(400, f"input: {len(texts)} texts, over serve.limits.max_texts={state.config.limits.max_texts}",
                       "input")
    for i, text in texts:
        if not text.strip():
            raise APIError(400, f"input[{i}]: an empty text", f"input[{i}]")
    tensors = [await request_image(state, item.image_url.url, f"input[{i}].image_url.url") for i, item in images]
    jobs = [_run(request, state, ("image_embeddings",), tensor, state.service.run_image_embeddings) for tensor in tensors]
    jobs += [_run(request, state, ("text_embeddings",), text, state.service.run_text_embeddings) for _, text in texts]
    vectors = await asyncio.gather(*jobs)
    order = [i for i, _ in images] + [i for i, _ in texts]
    data = sorted((Embedding(index=i, embedding=encode_embedding(v, body.encoding_format)) for i, v in zip(order, vectors)),
                  key=lambda e: e.index)
    tokens = sum(state.service.count_tokens(t) for _, t in texts)
    return EmbeddingsResponse(data=data, model=state.service.name, usage={"prompt_tokens": tokens, "total_tokens": tokens})


@router.post("/v1/match", response_model=MatchResponse)
async def match(body: MatchRequest, request: Request) -> Any:
    state = server_of(request)
    check_model(state, body.model)
    check_capability(state, "match", "/v1/match")
    _texts(state, body.texts, "texts")
    image = await request_image(state, body.image, "image")
    scores = await _run(request, state, ("match",), (image, body.texts), state.service.run_match)
    return MatchResponse(id=request_id("match"), model=state.service.name,
                         scores=[MatchScore(text=t, match_logit=logit, similarity=sim)
                                 for t, (logit, sim) in zip(body.texts, scores)])
