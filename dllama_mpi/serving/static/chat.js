// The chat page of `python -m dllama_mpi serve`: a conversation with the served model through the server's own
// /v1/chat/completions, streamed. The conversation and the settings live in localStorage, so a reload keeps them.
// Every URL is relative, so the page works behind a proxy that serves it under a path of its own.
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = "dllama-chat";
const SETTINGS = ["system", "temperature", "max-tokens", "api-key"];  // the fields kept across reloads

let messages = [];  // [{role, content, meta}], the conversation sent each turn (meta: what the page shows under it)
let controller = null;  // the AbortController of the answer being streamed
let connected = false;  // the model's name came: the server is ready and takes the key
let retry = null;  // the timer of the next connect() while the server is not ready

function load() {
  let saved = {};
  try {
    saved = JSON.parse(localStorage.getItem(STORE)) || {};
  } catch {
    // a store this page did not write: start afresh
  }
  messages = Array.isArray(saved.messages) ? saved.messages : [];
  for (const id of SETTINGS) $(id).value = saved.settings?.[id] ?? "";
  // a reload while a question was waiting for its answer: the question goes back to the input box
  if (messages.at(-1)?.role === "user") $("message").value = messages.pop().content;
}

function save() {
  const settings = Object.fromEntries(SETTINGS.map((id) => [id, $(id).value]));
  localStorage.setItem(STORE, JSON.stringify({ messages, settings }));
}

function headers() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

/** The message of an error answer in OpenAI's shape ({"error": {"message"}}), or its status line. */
async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body?.error?.message) return body.error.message;
  } catch {
    // not JSON: the status says it
  }
  return `${response.status} ${response.statusText}`;
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

/** Shows an error answer; a 401 (the server has an API key) opens the settings at the key's field. */
async function showErrorOf(response) {
  showError(await errorMessage(response));
  if (response.status === 401) {
    $("settings").open = true;
    $("api-key").focus();
  }
}

function bubble(role, content, meta) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  const who = document.createElement("span");
  who.className = "hidden";
  who.textContent = role === "user" ? "You:" : "Assistant:";
  const text = document.createElement("div");
  text.className = "text";
  text.textContent = content;
  const info = document.createElement("div");
  info.className = "meta";
  info.textContent = meta || "";
  div.append(who, text, info);
  $("log").append(div);
  div.scrollIntoView({ block: "end" });
  return { div, text, info };
}

function render() {
  $("log").replaceChildren();
  for (const m of messages) bubble(m.role, m.content, m.meta);
}

function setBusy(busy) {
  $("send").disabled = busy || !connected;
  $("stop").disabled = !busy;
  $("log").setAttribute("aria-busy", String(busy));
}

/** Waits for the model (GET /health answers 503 while it loads), then shows its name from GET /v1/models. */
async function connect() {
  clearTimeout(retry);
  connected = false;
  setBusy(controller !== null);
  try {
    const health = await fetch("health");
    if (!health.ok) {
      const status = (await health.json().catch(() => ({}))).status;
      $("model").textContent = status === "loading" ? "the model is loading…" : `the server is not ready (${status || health.status})`;
      retry = setTimeout(connect, 1000);
      return;
    }
    const models = await fetch("v1/models", { headers: headers() });
    if (!models.ok) {
      $("model").textContent = "not connected";
      await showErrorOf(models);
      return;
    }
    $("model").textContent = `model: ${(await models.json()).data[0].id}`;
    showError("");
    connected = true;
    setBusy(controller !== null);
  } catch (e) {
    $("model").textContent = `the server does not answer (${e.message}); retrying…`;
    retry = setTimeout(connect, 2000);
  }
}

/** The `data:` payloads of a server-sent event stream, one per event. */
async function* events(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    const lines = buffer.split(/\r\n|\r|\n/);
    buffer = lines.pop();  // a line not ended yet
    for (const line of lines) {
      if (line === "") {
        if (data.length) yield data.join("\n");
        data = [];
      } else if (line.startsWith("data:")) {
        data.push(line.slice(5).replace(/^ /, ""));
      }
    }
  }
}

function requestBody() {
  const system = $("system").value.trim();
  const body = {
    messages: [...(system ? [{ role: "system", content: system }] : []), ...messages.map(({ role, content }) => ({ role, content }))],
    stream: true,
    stream_options: { include_usage: true },
  };
  if ($("temperature").value !== "") body.temperature = Number($("temperature").value);
  if ($("max-tokens").value !== "") body.max_tokens = Number($("max-tokens").value);
  return body;
}

/** What is shown under an answer: its tokens, the speed of those after the first (from the first text's arrival to the
 * last's), and the time to the first. */
function stats(usage, started, first, last, finish) {
  const parts = [];
  if (usage) {
    const n = usage.completion_tokens;
    parts.push(`${n} tokens`);
    if (n > 1 && last > first) parts.push(`${((n - 1) / ((last - first) / 1000)).toFixed(1)} tokens/s`);
  }
  if (first !== null) parts.push(`first token ${((first - started) / 1000).toFixed(2)} s`);
  if (finish === "length") parts.push("cut at max tokens or the end of the context");
  return parts.join(" · ");
}

/** Streams the answer to `messages`, whose last is the user's `question` (its bubble `asked`), into a new bubble; keeps
 * it in the conversation if any text came, else gives the question back to the input box. */
async function answer(question, asked) {
  const conversation = messages;  // "New chat" replaces it while the answer may still be streaming
  controller = new AbortController();
  setBusy(true);
  showError("");
  const view = bubble("assistant", "", "");
  const started = performance.now();
  let text = "";
  let first = null;
  let last = null;
  let usage = null;
  let finish = null;
  let meta = "";
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...headers() },
      body: JSON.stringify(requestBody()),
      signal: controller.signal,
    });
    if (!response.ok) {
      await showErrorOf(response);
      return;
    }
    let ended = false;
    for await (const data of events(response.body)) {
      if (data === "[DONE]") {
        ended = true;
        break;
      }
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices[0];
      if (choice?.delta?.content) {
        last = performance.now();
        first ??= last;
        text += choice.delta.content;
        view.text.textContent = text;
        view.div.scrollIntoView({ block: "end" });
      }
      finish = choice?.finish_reason ?? finish;
      usage = chunk.usage ?? usage;
    }
    if (!ended) throw new Error("the connection closed before the answer ended");
    meta = stats(usage, started, first, last, finish);
  } catch (e) {
    meta = e.name === "AbortError" ? "stopped" : `error: ${e.message}`;
    if (e.name !== "AbortError") showError(e.message);
  } finally {
    controller = null;
    view.info.textContent = meta;
    if (conversation === messages) {
      if (text) {
        messages.push({ role: "assistant", content: text, meta });
      } else {
        messages.pop();
        asked.div.remove();
        view.div.remove();
        if (!$("message").value) $("message").value = question;
      }
      save();
    }
    setBusy(false);
  }
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const content = $("message").value;
  if (controller || !content.trim() || $("send").disabled) return;
  messages.push({ role: "user", content });
  const asked = bubble("user", content, "");
  $("message").value = "";
  save();
  answer(content, asked);
});

$("message").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});

$("stop").addEventListener("click", () => controller?.abort());

$("new-chat").addEventListener("click", () => {
  controller?.abort();
  messages = [];
  save();
  render();
  showError("");
  $("message").focus();
});

for (const id of SETTINGS) $(id).addEventListener("change", save);
$("api-key").addEventListener("change", connect);

load();
render();
connect();
