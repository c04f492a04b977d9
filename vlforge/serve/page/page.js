// The page at `/`: pick an image, caption it (streamed), ask a question, score zero-shot labels.
// Plain JS, no build step; it calls this server's API (docs/serving.md).
"use strict";

const $ = (id) => document.getElementById(id);
let image = null;        // the chosen image as a data: URI
let capabilities = [];   // from GET /v1/models

function headers() {
  const key = $("api-key").value.trim();
  return key ? { "Content-Type": "application/json", Authorization: `Bearer ${key}` }
             : { "Content-Type": "application/json" };
}

// The message of an error response: OpenAI's {"error": {"message"}} shape, else the status and body.
async function errorMessage(response) {
  const text = await response.text();
  try {
    const message = JSON.parse(text).error.message;
    if (message) return message;
  } catch (_) { /* not the error shape */ }
  return `${response.status} ${response.statusText} ${text}`.trim();
}

async function call(path, body) {
  const init = body === undefined ? { headers: headers() }
                                  : { method: "POST", headers: headers(), body: JSON.stringify(body) };
  const response = await fetch(path, init);
  if (!response.ok) throw new Error(await errorMessage(response));
  return response;
}

// The JSON payloads of a Server-Sent Events response, each as soon as its `data:` line has arrived.
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, end).replace(/\r$/, "");
      buffer = buffer.slice(end + 1);
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") return;
      const payload = JSON.parse(data);
      if (payload.error) throw new Error(payload.error.message);
      yield payload;
    }
  }
}

function showError(id, error) {
  $(id).textContent = error ? String(error.message || error) : "";
  $(id).hidden = !error;
}

// Run `task` for a form: its button disabled and its output marked busy meanwhile, errors shown.
function onSubmit(formId, outputId, errorId, task) {
  $(formId).addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = $(formId).querySelector("button");
    const output = $(outputId);
    button.disabled = true;
    output.setAttribute("aria-busy", "true");
    showError(errorId, null);
    try {
      await task(output);
    } catch (error) {
      showError(errorId, error);
    } finally {
      output.setAttribute("aria-busy", "false");
      button.disabled = image === null;
    }
  });
}

async function connect() {
  showError("status", null);
  try {
    const card = (await (await call("/v1/models")).json()).data[0];
    capabilities = card.capabilities;
    $("model").textContent = `Model: ${card.id} (${capabilities.join(", ")})`;
  } catch (error) {
    capabilities = [];
    $("model").textContent = "Not connected.";
    showError("status", error);
  }
  $("caption-panel").hidden = !capabilities.includes("caption");
  $("question-panel").hidden = !(capabilities.includes("vqa") || capabilities.includes("chat"));
  $("labels-panel").hidden = !capabilities.includes("classify");
  $("no-tasks").hidden = capabilities.length === 0 ||
    ["caption", "vqa", "chat", "classify"].some((c) => capabilities.includes(c));
}

function chooseImage(file) {
  showError("image-error", null);
  if (!file) return;
  if (!file.type.startsWith("image/")) {
    showError("image-error", `${file.name} is not an image`);
    return;
  }
  const reader = new FileReader();
  reader.onload = () => {
    image = reader.result;
    $("preview").src = image;
    $("preview").hidden = false;
    for (const id of ["caption-run", "ask", "classify"]) $(id).disabled = false;
  };
  reader.onerror = () => showError("image-error", reader.error);
  reader.readAsDataURL(file);
}

const maxTokens = () => Number($("max-tokens").value) || undefined;

async function caption(output) {
  output.textContent = "";
  const response = await call("/v1/caption", { image, max_tokens: maxTokens(), stream: true });
  for await (const event of events(response)) {
    if (event.delta) output.append(event.delta);  // each token as it arrives
  }
}

async function ask(output) {
  output.textContent = "";
  const question = $("question").value.trim();
  if (capabilities.includes("vqa")) {
    output.textContent = (await (await call("/v1/vqa", { image, question })).json()).answer;
    return;
  }
  const content = [{ type: "text", text: question }, { type: "image_url", image_url: { url: image } }];
  const body = { messages: [{ role: "user", content }], temperature: 0, max_tokens: maxTokens() };
  output.textContent = (await (await call("/v1/chat/completions", body)).json()).choices[0].message.content;
}

async function classify(list) {
  list.replaceChildren();
  const labels = $("labels").value.split(",").map((label) => label.trim()).filter(Boolean);
  const result = await (await call("/v1/classify", { image, labels })).json();
  const ranked = result.labels.slice().sort((a, b) => b.score - a.score);
  for (const { label, score } of ranked) {
    const item = document.createElement("li");
    item.dataset.score = String(score);
    const name = document.createElement("span");
    name.className = "label";
    name.textContent = label;
    const bar = document.createElement("meter");
    Object.assign(bar, { min: 0, max: 1, value: score });
    bar.setAttribute("aria-label", `score of ${label}`);
    const value = document.createElement("span");
    value.className = "score";
    value.textContent = `${(100 * score).toFixed(1)}%`;
    item.append(name, bar, value);
    list.append(item);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = sessionStorage.getItem("vlforge-api-key") || "";
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem("vlforge-api-key", $("api-key").value.trim());
    connect();
  });
  $("file").addEventListener("change", () => chooseImage($("file").files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    chooseImage(event.dataTransfer.files[0]);
  });
  onSubmit("caption-form", "caption-text", "caption-error", caption);
  onSubmit("question-form", "answer", "question-error", ask);
  onSubmit("labels-form", "label-list", "labels-error", classify);
  connect();
});
