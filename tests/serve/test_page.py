"""The page at `/` (vlforge/serve/page/): served without a key; and in headless Chromium (Debian's
`chromium`, driven by playwright) an uploaded image gets its caption streamed into the page token by
token, a question gets its answer, and zero-shot labels show with their scores, each exactly what the
API answers. Screenshots go to the test's tmp dir (and to $VLFORGE_SCREENSHOT_DIR when set)."""
from __future__ import annotations

import base64
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.serve.conftest import LiveServer, chat_body, png_data_uri
from vlforge.serve.server import ServeRequest, build_app

CHROMIUM = Path("/usr/bin/chromium")


def test_the_page_and_its_assets_are_served_without_a_key(caption_client, monkeypatch) -> None:
    monkeypatch.setattr(caption_client.app.state.server, "api_keys", (b"secret",))
    assert caption_client.get("/v1/models").status_code == 401  # the API still needs the key
    page = caption_client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/page/page.js" defer></script>' in page.text and 'id="api-key"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    script = caption_client.get("/page/page.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert "getReader()" in script.text or "events(response)" in script.text
    style = caption_client.get("/page/page.css")
    assert style.status_code == 200 and style.headers["content-type"].startswith("text/css")
    missing = caption_client.get("/page/nope.js")
    assert missing.status_code == 404 and "no such file" in missing.json()["error"]["message"]
    assert "/" not in caption_client.get("/openapi.json").json()["paths"]


@pytest.fixture(scope="module")
def browser() -> Iterator:
    missing = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "playwright is not installed (pip install -e '.[dev]')"
    if missing is None and not CHROMIUM.exists():
        missing = f"no {CHROMIUM} (Debian's chromium package: apt-get install chromium; .ci/run installs it)"
    if missing:
        if os.environ.get("VLFORGE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"VLFORGE_REQUIRE_BROWSER=1 but {missing}")
        pytest.skip(missing)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def llava_server(exports) -> Iterator[LiveServer]:
    app, _ = build_app(ServeRequest(checkpoint=str(exports("llava"))))
    with LiveServer(app) as server:
        yield server


@pytest.fixture(scope="module")
def clip_server(exports) -> Iterator[LiveServer]:
    app, _ = build_app(ServeRequest(checkpoint=str(exports("clip"))))
    with LiveServer(app) as server:
        yield server


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, str]:
    """A PNG file and the data: URI the page's FileReader makes of it."""
    uri = png_data_uri(5, size=96)
    path = tmp_path / "photo.png"
    path.write_bytes(base64.b64decode(uri.split(",", 1)[1]))
    return path, uri


def _screenshot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("VLFORGE_SCREENSHOT_DIR"):
        target = Path(os.environ["VLFORGE_SCREENSHOT_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        path = Path(shutil.copy(path, target / name))
    print(f"screenshot: {path}")
    return path


# Records the caption element's text at every DOM change (each token the page appends).
OBSERVE = """() => {
  window.captionTexts = [];
  const output = document.getElementById("caption-text");
  new MutationObserver(() => window.captionTexts.push(output.textContent))
    .observe(output, {childList: true, characterData: true, subtree: true});
}"""


def test_caption_streams_token_by_token_and_a_question_gets_its_answer(browser, llava_server: LiveServer, image,
                                                                       tmp_path: Path) -> None:
    path, uri = image
    expected = httpx.post(f"{llava_server.url}/v1/caption", json={"image": uri, "max_tokens": 20},
                          timeout=60).json()["choices"][0]["text"]
    question = "what is in the picture ?"
    answer = httpx.post(f"{llava_server.url}/v1/chat/completions", timeout=60,
                        json=chat_body(uri, question, temperature=0, max_tokens=20)).json()
    answer = answer["choices"][0]["message"]["content"]
    assert len(expected.split()) >= 3 and answer

    model = llava_server.state.service.stepwise
    original = model.step_rows

    def slow_step(rows, next_ids):  # a tiny model decodes far faster than a real one: pace it
        time.sleep(0.03)
        return original(rows, next_ids)

    page = browser.new_page(viewport={"width": 1100, "height": 760})
    model.step_rows = slow_step
    try:
        page.goto(llava_server.url)
        page.wait_for_selector("#caption-panel:not([hidden])")
        assert page.text_content("#model") == "Model: llava_finetune_demo (chat, caption)"
        assert page.is_hidden("#labels-panel") and page.is_visible("#question-panel")
        page.set_input_files("#file", str(path))
        page.wait_for_selector("#caption-run:enabled")
        assert page.get_attribute("#preview", "src") == uri
        page.fill("#max-tokens", "20")
        page.evaluate(OBSERVE)
        page.click("#caption-run")
        page.wait_for_selector("#caption-text[aria-busy='false']", timeout=30_000)
        texts = page.evaluate("window.captionTexts")
        assert page.text_content("#caption-text") == expected
        assert page.is_hidden("#caption-error")
    finally:
        del model.step_rows
    partial = [t for t in dict.fromkeys(texts) if t and t != expected]
    assert len(partial) >= 2, texts  # the caption grew in the page before it was whole
    assert all(expected.startswith(t) for t in partial) and texts[-1] == expected
    print(f"caption: {len(partial)} partial texts in the page before the whole {len(expected.split())} words")

    page.fill("#question", question)
    page.click("#ask")
    page.wait_for_selector("#answer[aria-busy='false']", timeout=30_000)
    assert page.is_hidden("#question-error"), page.text_content("#question-error")
    assert page.text_content("#answer") == answer
    _screenshot(page, tmp_path, "page_caption_question.png")

    broken = tmp_path / "broken.png"  # an image/png by its name that no decoder reads: the API's 400, shown
    broken.write_bytes(b"not a png")
    page.set_input_files("#file", str(broken))
    # An attribute selector, not wait_for_function: a string predicate is eval'd in the page, which the
    # page's Content-Security-Policy (no 'unsafe-eval') refuses once the first check comes back false.
    page.wait_for_selector("#preview[src^='data:image/png;base64,bm90']", state="attached")
    page.click("#caption-run")
    page.wait_for_selector("#caption-error:not([hidden])", timeout=30_000)
    assert page.text_content("#caption-error") == "image: not a readable image (no image format recognised in its bytes)"
    page.close()


def test_labels_with_their_scores_and_an_api_key(browser, clip_server: LiveServer, image, tmp_path: Path,
                                                 monkeypatch) -> None:
    path, uri = image
    labels = ["cat", "dog", "red car", "tree"]
    monkeypatch.setattr(clip_server.state, "api_keys", (b"secret",))
    expected = httpx.post(f"{clip_server.url}/v1/classify", json={"image": uri, "labels": labels},
                          headers={"Authorization": "Bearer secret"}, timeout=60).json()["labels"]
    page = browser.new_page(viewport={"width": 1100, "height": 640})
    page.goto(clip_server.url)
    page.wait_for_selector("#status:not([hidden])")  # the API's own 401 message, shown
    assert "API key is required" in page.text_content("#status")
    assert page.is_hidden("#labels-panel")
    page.fill("#api-key", "secret")
    page.click("#connect")
    page.wait_for_selector("#labels-panel:not([hidden])")
    assert page.is_hidden("#status") and page.is_hidden("#caption-panel") and page.is_hidden("#question-panel")
    page.set_input_files("#file", str(path))
    page.wait_for_selector("#classify:enabled")
    page.fill("#labels", ", ".join(labels))
    page.click("#classify")
    page.wait_for_selector("#label-list[aria-busy='false']", timeout=30_000)
    assert page.is_hidden("#labels-error"), page.text_content("#labels-error")
    shown = page.eval_on_selector_all("#label-list li", """items => items.map(item => [
        item.querySelector('.label').textContent, Number(item.dataset.score), item.querySelector('.score').textContent])""")
    assert [(label, score) for label, score, _ in shown] == [(e["label"], e["score"]) for e in expected]
    assert [s for _, s, _ in shown] == sorted((s for _, s, _ in shown), reverse=True)
    for (_, score, text), e in zip(shown, expected):
        assert text.endswith("%") and abs(float(text[:-1]) - 100 * e["score"]) <= 0.05 + 1e-9, (text, e)
    _screenshot(page, tmp_path, "page_labels.png")
    page.close()
