"""Every endpoint on tiny models, in-process: chat completions (streamed text equals the whole text),
captions (greedy equals the model's generate; beams too), VQA, zero-shot classification, embeddings
in OpenAI's shape, image-text matching, health, readiness, metrics, models, API keys."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.serve.conftest import chat_body, client_for, png_data_uri
from vlforge.config.serve import LimitsConfig
from vlforge.hub.load import checkpoint_recipe, load_recipe_model, processors
from vlforge.serve.images import decode_image


def _events(text: str) -> list:
    lines = [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def _model_and_image(exports, kind: str, uri: str):
    cfg = checkpoint_recipe(exports(kind))
    model = load_recipe_model(cfg, exports(kind))
    image = processors(cfg)[0]["eval"](decode_image(base64.b64decode(uri.split(",", 1)[1]), "image", LimitsConfig()))
    return model, image[None]


def test_chat_completion_streamed_equals_whole_and_greedy_equals_generate(caption_client, exports) -> None:
    uri = png_data_uri(1)
    body = chat_body(uri, "describe the image", temperature=0, max_tokens=8)
    whole = caption_client.post("/v1/chat/completions", json=body)
    assert whole.status_code == 200, whole.text
    reply = whole.json()
    assert reply["object"] == "chat.completion" and reply["model"] == "blip_caption_demo"
    text = reply["choices"][0]["message"]["content"]
    assert reply["usage"]["completion_tokens"] >= 1
    assert reply["usage"]["total_tokens"] == reply["usage"]["prompt_tokens"] + reply["usage"]["completion_tokens"]

    streamed = caption_client.post("/v1/chat/completions", json={**body, "stream": True,
                                                                 "stream_options": {"include_usage": True}})
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = _events(streamed.text)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]]
    assert "".join(deltas) == text
    assert sum(1 for d in deltas if d) >= 2  # token by token, not one chunk
    assert events[-2]["choices"][0]["finish_reason"] == reply["choices"][0]["finish_reason"]
    assert events[-1]["usage"] == reply["usage"]

    model, image = _model_and_image(exports, "caption", uri)  # the captioner ignores chat text: its prompt
    expected = model.generate({"image": image}, num_beams=1, min_length=0, max_length=len(model.prompt_ids()) + 8)
    assert text == expected[0]


def test_caption_endpoint_greedy_and_beams_equal_generate(caption_client, exports) -> None:
    uri = png_data_uri(2)
    model, image = _model_and_image(exports, "caption", uri)
    prompt_len = len(model.prompt_ids())
    greedy = caption_client.post("/v1/caption", json={"image": uri, "max_tokens": 10}).json()
    assert greedy["choices"][0]["text"] == model.generate({"image": image}, num_beams=1, min_length=0,
                                                          max_length=prompt_len + 10)[0]
    beams = caption_client.post("/v1/caption", json={"image": uri, "max_tokens": 10, "num_beams": 3, "min_tokens": 2})
    assert beams.status_code == 200, beams.text
    assert beams.json()["choices"][0]["text"] == model.generate({"image": image}, num_beams=3, min_length=prompt_len + 2,
                                                                max_length=prompt_len + 10)[0]
    streamed = caption_client.post("/v1/caption", json={"image": uri, "max_tokens": 10, "stream": True})
    events = _events(streamed.text)
    assert "".join(e.get("delta", "") for e in events) == greedy["choices"][0]["text"]
    two = caption_client.post("/v1/caption", json={"image": uri, "max_tokens": 6, "n": 2, "temperature": 1.0, "seed": 3})
    again = caption_client.post("/v1/caption", json={"image": uri, "max_tokens": 6, "n": 2, "temperature": 1.0, "seed": 3})
    assert [c["index"] for c in two.json()["choices"]] == [0, 1]
    assert two.json()["choices"] == again.json()["choices"]  # seeded


def test_stop_strings_cut_the_text(caption_client) -> None:
    uri = png_data_uri(1)
    body = chat_body(uri, temperature=0, max_tokens=8)
    text = caption_client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    words = text.split()
    assert len(words) >= 3
    stopped = caption_client.post("/v1/chat/completions", json={**body, "stop": [words[2]]}).json()
    assert stopped["choices"][0]["message"]["content"] == " ".join(words[:2])
    assert stopped["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("kind, overrides", [("blip2", ()), ("llava", ()),
                                              # the LM placed by accelerate (one device here; GPUs: docs/serving.md)
                                              ("llava", ('serve.device_map={"": cpu}',))])
def test_language_model_families_chat_as_their_generate(exports, kind: str, overrides: tuple[str, ...]) -> None:
    uri = png_data_uri(3)
    model, image = _model_and_image(exports, kind, uri)
    question = "what colour is the shape ?"
    with client_for(exports, kind, *overrides) as client:
        reply = client.post("/v1/chat/completions", json=chat_body(uri, question, temperature=0, max_tokens=6))
        assert reply.status_code == 200, reply.text
        text = reply.json()["choices"][0]["message"]["content"]
        served_lm = client.app.state.server.service.model.language_model
        assert getattr(served_lm, "hf_device_map", None) == ({"": "cpu"} if overrides else None)
    if kind == "llava":
        expected = model.generate({"image": image, "text_input": [question]}, num_beams=1, min_length=0, max_length=6)
    else:  # BLIP-2's prompt is the chat text: generate with it as the model's prompt
        model.prompt, model.prompt_length = question, len(model.prompt_ids(question))
        expected = model.generate({"image": image}, num_beams=1, min_length=0, max_length=6)
    assert text == expected[0]


def test_vqa_generates_and_ranks(exports) -> None:
    uri = png_data_uri(4)
    model, image = _model_and_image(exports, "vqa", uri)
    with client_for(exports, "vqa") as client:
        answer = client.post("/v1/vqa", json={"image": uri, "question": "what colour is the shape ?", "max_tokens": 5})
        assert answer.status_code == 200, answer.text
        expected = model.predict_answers({"image": image, "text_input": ["what colour is the shape ?"]}, max_length=5)
        assert answer.json()["answer"] == expected[0]
        ranked = client.post("/v1/vqa", json={"image": uri, "question": "what colour is it ?", "mode": "rank",
                                              "answers": ["red", "blue", "green"]}).json()
        assert ranked["answer"] == ["red", "blue", "green"][ranked["answer_index"]]
        chat = client.post("/v1/chat/completions", json=chat_body(uri, "what colour is the shape ?", max_tokens=5))
        assert chat.json()["choices"][0]["message"]["content"] == expected[0]
        no_text = client.post("/v1/chat/completions", json=chat_body(uri))
        assert no_text.status_code == 400 and "question" in no_text.json()["error"]["message"]


def test_classify_embeddings_and_match(exports) -> None:
    uri = png_data_uri(5)
    labels = ["red circle", "blue square", "green triangle"]
    model, image = _model_and_image(exports, "clip", uri)
    with client_for(exports, "clip") as client:
        scores = client.post("/v1/classify", json={"image": uri, "labels": labels, "templates": ["a {}", "the {}"]})
        assert scores.status_code == 200, scores.text
        ranked = scores.json()["labels"]
        assert sorted(r["label"] for r in ranked) == sorted(labels)
        assert abs(sum(r["score"] for r in ranked) - 1) < 1e-5
        assert [r["score"] for r in ranked] == sorted((r["score"] for r in ranked), reverse=True)
        top = client.post("/v1/classify", json={"image": uri, "labels": labels, "top_k": 1}).json()["labels"]
        assert len(top) == 1

        items = ["a red circle", {"type": "image_url", "image_url": {"url": uri}}]
        embedded = client.post("/v1/embeddings", json={"input": items})
        assert embedded.status_code == 200, embedded.text
        data = embedded.json()["data"]
        assert [d["index"] for d in data] == [0, 1] and embedded.json()["object"] == "list"
        feats = model.extract_features({"image": image, "text_input": ["a red circle"]})
        torch.testing.assert_close(torch.tensor(data[1]["embedding"]), feats["image_embeds"][0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(torch.tensor(data[0]["embedding"]), feats["text_embeds"][0], atol=1e-5, rtol=1e-4)
        packed = client.post("/v1/embeddings", json={"input": "a red circle", "encoding_format": "base64"}).json()
        unpacked = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), dtype="<f4")
        np.testing.assert_allclose(unpacked, data[0]["embedding"], rtol=1e-6)
        assert client.post("/v1/match", json={"image": uri, "texts": ["a"]}).status_code == 400  # CLIP has no ITM

    with client_for(exports, "retrieval") as client:
        matched = client.post("/v1/match", json={"image": uri, "texts": ["a red circle", "a blue square"]})
        assert matched.status_code == 200, matched.text
        scores = matched.json()["scores"]
        assert [s["text"] for s in scores] == ["a red circle", "a blue square"]
        assert all(s["similarity"] is not None and -1 <= s["similarity"] <= 1 for s in scores)
        retrieval, r_image = _model_and_image(exports, "retrieval", uri)
        tokens, _ = retrieval.image_features(r_image)
        from vlforge.core.tokenizers import tokenize_texts

        ids, mask = tokenize_texts(retrieval.tokenizer_name, ["a red circle"], 32)
        assert abs(scores[0]["match_logit"] - float(retrieval.itm_match_scores(tokens, ids, mask)[0])) < 1e-4


def test_health_ready_models_metrics_and_what_a_model_cannot_do(caption_client) -> None:
    assert caption_client.get("/healthz").json() == {"status": "ok"}
    assert caption_client.get("/readyz").json()["status"] == "ready"
    models = caption_client.get("/v1/models").json()
    assert models["data"][0]["id"] == "blip_caption_demo" and "chat" in models["data"][0]["capabilities"]
    assert caption_client.get("/v1/models/blip_caption_demo").status_code == 200
    assert caption_client.get("/v1/models/other").status_code == 404
    caption_client.post("/v1/caption", json={"image": png_data_uri(0), "max_tokens": 3})
    metrics = caption_client.get("/metrics").text
    for name in ("vlforge_queue_depth", "vlforge_batch_size_bucket", "vlforge_generated_tokens_total",
                 "vlforge_request_latency_seconds_bucket", "vlforge_time_to_first_token_seconds_bucket"):
        assert name in metrics, name
    refused = caption_client.post("/v1/embeddings", json={"input": "a"})
    assert refused.status_code == 400 and "cannot serve /v1/embeddings" in refused.json()["error"]["message"]
    wrong_model = caption_client.post("/v1/caption", json={"model": "gpt-4o", "image": png_data_uri(0)})
    assert wrong_model.status_code == 404 and wrong_model.json()["error"]["param"] == "model"
    schema = caption_client.get("/openapi.json").json()
    assert "/v1/chat/completions" in schema["paths"] and "/v1/match" in schema["paths"]


def test_api_keys_guard_every_endpoint_but_healthz(exports, monkeypatch, tmp_path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nfile-key\n")
    monkeypatch.setenv("TEST_SERVE_KEYS", "env-key, other")
    with client_for(exports, "caption", "serve.api_keys_env=TEST_SERVE_KEYS", f"serve.api_keys_file={keys}") as client:
        assert client.get("/healthz").status_code == 200
        for path in ("/readyz", "/metrics", "/v1/models"):
            assert client.get(path).status_code == 401, path
        denied = client.post("/v1/caption", json={"image": png_data_uri(0)}, headers={"Authorization": "Bearer nope"})
        assert denied.status_code == 401 and denied.json()["error"]["type"] == "authentication_error"
        for key in ("env-key", "other", "file-key"):
            assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        ok = client.post("/v1/caption", json={"image": png_data_uri(0), "max_tokens": 2},
                         headers={"Authorization": "Bearer file-key"})
        assert ok.status_code == 200


def test_edge_inputs_get_4xx_naming_the_field_or_a_sane_answer(caption_client, exports) -> None:
    uri = png_data_uri(1)
    greedy = caption_client.post("/v1/caption", json={"image": uri, "max_tokens": 5}).json()["choices"][0]["text"]
    almost_zero = caption_client.post("/v1/caption", json={"image": uri, "max_tokens": 5, "temperature": 1e-40})
    assert almost_zero.json()["choices"][0]["text"] == greedy  # below 1e-5 is greedy, as in vLLM
    for field, value in (("seed", 2**70), ("repetition_penalty", 1e-40)):
        reply = caption_client.post("/v1/caption", json={"image": uri, field: value, "temperature": 1.0})
        assert reply.status_code == 400 and reply.json()["error"]["param"] == field, reply.text
    buffer = io.BytesIO()
    Image.new("RGB", (4000, 10)).save(buffer, "PNG")
    wide = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    reply = caption_client.post("/v1/caption", json={"image": wide})
    assert reply.status_code == 400 and "max_aspect_ratio" in reply.json()["error"]["message"]
    with client_for(exports, "clip") as client:
        for template in ("{0} {1}", "{x}", "no label"):
            reply = client.post("/v1/classify", json={"image": uri, "labels": ["a"], "templates": [template]})
            assert reply.status_code == 400 and reply.json()["error"]["param"] == "templates[0]", template
    with client_for(exports, "llava") as client:
        long_question = " ".join(["red"] * 300)
        reply = client.post("/v1/chat/completions", json=chat_body(uri, long_question, temperature=0, max_tokens=2))
        assert reply.status_code == 400 and "prompt" in reply.json()["error"]["message"], reply.text


def test_openai_features_not_implemented_are_refused_not_ignored(caption_client) -> None:
    body = chat_body(png_data_uri(0), temperature=0, max_tokens=2)
    assert caption_client.post("/v1/chat/completions", json={**body, "logprobs": False, "user": "u"}).status_code == 200
    for field, value in (("logprobs", True), ("tools", [{"type": "function"}]), ("logit_bias", {"5": 10}),
                         ("response_format", {"type": "json_object"})):
        reply = caption_client.post("/v1/chat/completions", json={**body, field: value})
        assert reply.status_code == 400 and reply.json()["error"]["param"] == field, field
