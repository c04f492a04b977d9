"""Request and response bodies: OpenAI's chat completions and embeddings, and the task endpoints.

Fields OpenAI clients send that do not change the output here (`user`, `logprobs: false`, ...) are
accepted and ignored, as vLLM does; fields that would change it and are not supported are refused.
"""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Body):
    url: str
    detail: str | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingFields(_Body):
    """The sampling controls every generating endpoint shares (OpenAI's, and vLLM's extensions)."""

    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    n: int = Field(1, ge=1)
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(None, ge=0, le=2**62)
    repetition_penalty: float = Field(1.0, ge=0.01, le=10.0)
    no_repeat_ngram_size: int = Field(0, ge=0)
    min_tokens: int = Field(0, ge=0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)


class ChatCompletionRequest(SamplingFields):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # OpenAI fields this server does not implement: accepted at their defaults, refused otherwise.
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    tools: list[dict] | None = None
    tool_choice: Union[str, dict, None] = None
    response_format: dict | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    finish_reason: str
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CaptionRequest(SamplingFields):
    model: str | None = None
    image: str = Field(description="a data: URI (data:image/png;base64,...) or bare base64")
    prompt: str | None = Field(None, description="the text the caption continues (default: the model's prompt)")
    num_beams: int = Field(1, ge=1, le=16)
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0: greedy (the default here, unlike chat)")
    stream: bool = False


class CaptionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str


class CaptionResponse(BaseModel):
    id: str
    object: Literal["caption"] = "caption"
    created: int
    model: str
    choices: list[CaptionChoice]
    usage: Usage


class VQARequest(_Body):
    model: str | None = None
    image: str
    question: str = Field(min_length=1)
    mode: Literal["generate", "rank"] = "generate"
    answers: list[str] | None = Field(None, description="the candidate answers (mode: rank)")
    max_tokens: int | None = Field(None, ge=1)
    num_beams: int = Field(1, ge=1, le=16)


class VQAResponse(BaseModel):
    id: str
    object: Literal["vqa"] = "vqa"
    model: str
    answer: str
    answer_index: int | None = None


class ClassifyRequest(_Body):
    model: str | None = None
    image: str
    labels: list[str] = Field(min_length=1)
    templates: list[str] = Field(default_factory=lambda: ["a photo of a {}."], min_length=1)
    top_k: int | None = Field(None, ge=1)


class LabelScore(BaseModel):
    label: str
    score: float


class ClassifyResponse(BaseModel):
    id: str
    object: Literal["classification"] = "classification"
    model: str
    labels: list[LabelScore]


class EmbeddingImage(_Body):
    type: Literal["image_url"]
    image_url: ImageURL


class EmbeddingsRequest(_Body):
    model: str | None = None
    input: Union[str, list[Union[str, EmbeddingImage]]]
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[list[float], str]


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: dict[str, int]


class MatchRequest(_Body):
    model: str | None = None
    image: str
    texts: list[str] = Field(min_length=1)


class MatchScore(BaseModel):
    text: str
    match_logit: float = Field(description="the ITM head's 'match' logit")
    similarity: float | None = Field(None, description="cosine of the image and text embeddings, where the model has both")


class MatchResponse(BaseModel):
    id: str
    object: Literal["match"] = "match"
    model: str
    scores: list[MatchScore]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "vlforge"
    capabilities: list[str]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
