// The page of `rwkv-lora serve`: four views over the server's routes.
//   Chat      POST /v1/chat/completions, stream: true (OpenAI's server-sent events, read with fetch + ReadableStream)
//   Compare   POST /v1/completions once per model, same prompt, seed and sampling settings, streamed into columns
//   Adapters  GET /v1/adapters (the gallery), POST /v1/adapters (upload, when the server allows it)
//   Runs      GET /api/runs, /api/runs/{name} (metrics drawn on a canvas), POST /api/runs and /api/runs/{name}/stop
// Every fetch carries the API key from localStorage as `Authorization: Bearer` when one is set. Text from the
// server (model output, adapter descriptions, errors) is always put in with textContent, never parsed as HTML.
"use strict";

const KEY_STORE = "rwkv-lora.api-key";
const CHAT_STORE = "rwkv-lora.chat";
const REFRESH_MS = 3000;  // the runs view while a run trains

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function show(node, text) {
  node.textContent = text || "";
  node.hidden = !text;
}

// ---- the server --------------------------------------------------------------------------------------------------

function headers(extra = {}) {
  const key = localStorage.getItem(KEY_STORE);
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

// The server's one-line error from a failed response: OpenAI's {"error": {"message"}}, FastAPI's {"detail"} (a
// string, or pydantic's list of problems), or the text itself.
async function errorText(resp) {
  const text = await resp.text();
  try {
    const body = JSON.parse(text);
    if (body.error) return typeof body.error === "string" ? body.error : body.error.message;
    if (typeof body.detail === "string") return body.detail;
    if (Array.isArray(body.detail)) return body.detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ");
  } catch (e) { /* not JSON */ }
  return text.trim().split("\n")[0] || `${resp.status} ${resp.statusText}`;
}

async function api(path, options = {}) {
  const opts = { ...options, headers: headers(options.headers || {}) };
  if (opts.json !== undefined) {
    opts.body = JSON.stringify(opts.json);
    opts.headers["Content-Type"] = "application/json";
    delete opts.json;
  }
  const resp = await fetch(path, opts);
  if (!resp.ok) {
    const err = new Error(await errorText(resp));
    err.status = resp.status;
    throw err;
  }
  return resp;
}

async function getJSON(path) {
  return (await api(path)).json();
}

// OpenAI's streaming: `data: {json}` events separated by blank lines, ending with `data: [DONE]`. Calls onEvent with
// each parsed event; an event carrying `error` ends the stream with that message.
async function readSSE(resp, onEvent) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
    const events = buffer.split(/\r?\n\r?\n/);
    buffer = done ? "" : events.pop();
    for (const event of events) {
      const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const obj = JSON.parse(data);
      if (obj.error) throw new Error(typeof obj.error === "string" ? obj.error : obj.error.message);
      onEvent(obj);
    }
    if (done) return;
  }
}

function numberOf(id) {
  return Number($(id).value);
}

// ---- models --------------------------------------------------------------------------------------------------------

let models = [];  // ids from /v1/models: the base first, then the adapters

async function loadModels() {
  const body = await getJSON("/v1/models");
  models = (body.data || []).map((m) => m.id);
  const select = $("chat-model");
  const chosen = select.value;
  select.replaceChildren(...models.map((id) => el("option", { value: id }, id)));
  if (models.includes(chosen)) select.value = chosen;
  const checks = $("cmp-models");
  const ticked = new Set([...checks.querySelectorAll("input:checked")].map((i) => i.value));
  checks.replaceChildren(...models.map((id, i) => {
    const box = el("input", { type: "checkbox", value: id });
    box.checked = ticked.size ? ticked.has(id) : i < 3;
    return el("label", {}, box, id);
  }));
}

// ---- chat ----------------------------------------------------------------------------------------------------------

let conversation = JSON.parse(localStorage.getItem(CHAT_STORE) || "[]");

function renderMessage(msg) {
  const text = el("span", { class: "text" }, msg.content);
  const node = el("p", { class: `msg ${msg.role}` }, el("span", { class: "who" }, msg.role === "user" ? "You" : "Model"), text);
  $("chat-log").append(node);
  $("chat-log").scrollTop = $("chat-log").scrollHeight;
  return text;
}

function renderConversation() {
  $("chat-log").replaceChildren();
  conversation.forEach(renderMessage);
}

async function sendChat(event) {
  event.preventDefault();
  const content = $("chat-input").value.trim();
  if (!content) return;
  show($("chat-error"), "");
  $("chat-input").value = "";
  $("chat-send").disabled = true;
  conversation.push({ role: "user", content });
  renderMessage(conversation[conversation.length - 1]);
  const reply = { role: "assistant", content: "" };
  const text = renderMessage(reply);
  try {
    const resp = await api("/v1/chat/completions", {
      method: "POST",
      json: { model: $("chat-model").value, messages: conversation, stream: true, temperature: numberOf("chat-temperature"),
              top_p: numberOf("chat-top-p"), max_tokens: numberOf("chat-max-tokens") },
    });
    await readSSE(resp, (chunk) => {
      const delta = (chunk.choices && chunk.choices[0] && chunk.choices[0].delta) || {};
      if (delta.content) {
        reply.content += delta.content;
        text.textContent = reply.content;
        $("chat-log").scrollTop = $("chat-log").scrollHeight;
      }
    });
    conversation.push(reply);
    localStorage.setItem(CHAT_STORE, JSON.stringify(conversation));
  } catch (e) {
    conversation.pop();  // the question stays on screen; it is asked again with the next message
    text.parentNode.remove();
    show($("chat-error"), e.message);
  } finally {
    $("chat-send").disabled = false;
  }
}

// ---- compare -------------------------------------------------------------------------------------------------------

async function streamColumn(model, params, out) {
  const resp = await api("/v1/completions", { method: "POST", json: { ...params, model, stream: true } });
  await readSSE(resp, (chunk) => {
    const choice = chunk.choices && chunk.choices[0];
    if (choice && choice.text) out.textContent += choice.text;
  });
}

async function runCompare(event) {
  event.preventDefault();
  show($("cmp-error"), "");
  const chosen = [...$("cmp-models").querySelectorAll("input:checked")].map((i) => i.value);
  if (chosen.length < 2) {
    show($("cmp-error"), "compare: tick two or more models");
    return;
  }
  const prompt = $("cmp-prompt").value;
  const params = { prompt, seed: numberOf("cmp-seed"), temperature: numberOf("cmp-temperature"),
                   top_p: numberOf("cmp-top-p"), max_tokens: numberOf("cmp-max-tokens") };
  $("cmp-run").disabled = true;
  const columns = chosen.map((model) => {
    const out = el("span", { class: "gen" });
    const status = el("p", { class: "error", hidden: "" });
    const col = el("div", { class: "column", "data-model": model }, el("h3", {}, model),
                   el("div", { class: "out" }, el("span", { class: "prompt" }, prompt), out), status);
    return { model, col, out, status };
  });
  $("cmp-columns").replaceChildren(...columns.map((c) => c.col));
  // one request per model, all at once: the server answers them in turn or together, each column fills as it streams
  await Promise.all(columns.map((c) => streamColumn(c.model, params, c.out)
    .then(() => c.col.classList.add("done"))
    .catch((e) => show(c.status, e.message))));
  $("cmp-run").disabled = false;
}

// ---- adapters ------------------------------------------------------------------------------------------------------

// An adapter's card from GET /v1/adapters: what it is (kind, rank, alpha, parts), the base it was made for, the
// tokenizer and chat template it brings, and how it was trained (its recipe), all as the server describes it.
function adapterCard(a) {
  const kind = a.kind === "lora" ? "LoRA" : (a.kind || "adapter");
  const about = [kind, a.r !== undefined ? `r=${a.r}` : "", a.alpha !== undefined ? `alpha=${a.alpha}` : "",
                 a.parts && a.parts.length ? `on ${a.parts.join(", ")}` : ""].filter(Boolean).join(" ");
  const facts = [];
  const base = a.base || {};
  if (a.family) facts.push(["family", a.family]);
  if (base.n_layer) facts.push(["base", `${base.n_layer} x ${base.n_embd}, vocab ${base.vocab_size}`]);
  if (base.fingerprint) facts.push(["fingerprint", String(base.fingerprint).slice(0, 16)]);
  if (a.tokenizer) facts.push(["tokenizer", String(a.tokenizer)]);
  if (a.template) facts.push(["template", a.template]);
  if (a.modules) facts.push(["modules", String(a.modules)]);
  const recipe = a.recipe || {};
  const trained = [recipe.max_steps ? `${recipe.max_steps} steps` : "", recipe.lr ? `lr ${recipe.lr}` : "",
                   recipe.data ? `on ${recipe.data}` : ""].filter(Boolean).join(", ");
  if (trained) facts.push(["trained", trained]);
  if (a.path) facts.push([a.packed ? "file" : "directory", a.path]);
  const dl = el("dl");
  for (const [k, v] of facts) dl.append(el("dt", {}, k), el("dd", {}, v.length > 120 ? v.slice(0, 117) + "..." : v));
  return el("article", { class: "card adapter", "data-name": a.name }, el("h2", {}, a.name),
            el("p", { class: "about" }, about), dl);
}

async function loadAdapters() {
  try {
    const body = await getJSON("/v1/adapters");
    const list = body.data || [];
    $("gallery").replaceChildren(...(list.length ? list.map(adapterCard)
                                                 : [el("p", { class: "hint" }, "No adapters on this server.")]));
  } catch (e) {
    $("gallery").replaceChildren(el("p", { class: "error" }, e.message));
  }
}

async function upload(event) {
  event.preventDefault();
  show($("upload-error"), "");
  show($("upload-done"), "");
  const file = $("upload-file").files[0];
  if (!file) {
    show($("upload-error"), "upload: choose a .safetensors file");
    return;
  }
  const form = new FormData();
  form.append("file", file);
  form.append("name", $("upload-name").value.trim() || file.name.replace(/\.safetensors$/, ""));
  try {
    const body = await (await api("/v1/adapters", { method: "POST", body: form })).json();
    show($("upload-done"), `uploaded ${body.name || body.id || file.name}`);
    await Promise.all([loadAdapters(), loadModels()]);
  } catch (e) {
    show($("upload-error"), e.message);
  }
}

// ---- runs ----------------------------------------------------------------------------------------------------------

let selectedRun = null;
let refreshTimer = null;

function fmt(x, digits = 3) {
  return x === null || x === undefined ? "" : Number(x).toFixed(digits);
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "";
  const s = Math.round(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
}

function runRow(r) {
  const stop = el("button", { type: "button", class: "stop" }, "Stop");
  stop.hidden = !r.stoppable;
  stop.addEventListener("click", async (e) => {
    e.stopPropagation();
    stop.disabled = true;
    try { await api(`/api/runs/${encodeURIComponent(r.name)}/stop`, { method: "POST" }); } catch (err) { show($("notice"), err.message); }
    refreshRuns();
  });
  const tr = el("tr", { "data-run": r.name },
    el("td", {}, r.name), el("td", { class: `status-${r.status}`, title: r.error || "" }, r.status),
    el("td", {}, r.max_steps ? `${r.step} / ${r.max_steps}` : String(r.step)),
    el("td", {}, fmt(r.train_loss)), el("td", {}, fmt(r.val_loss)), el("td", {}, fmt(r.tokens_per_s, 0)),
    el("td", {}, duration(r.eta_s)), el("td", {}, stop));
  if (r.name === selectedRun) tr.classList.add("selected");
  tr.addEventListener("click", () => { selectedRun = r.name; refreshRuns(); });
  return tr;
}

async function refreshRuns() {
  clearTimeout(refreshTimer);
  let runs = [];
  try {
    runs = await getJSON("/api/runs");
    show($("runs-none"), runs.length ? "" : "No training runs in the runs directory yet.");
  } catch (e) {
    show($("runs-none"), e.message);
  }
  if (!runs.some((r) => r.name === selectedRun)) selectedRun = runs.length ? runs[0].name : null;
  document.querySelector("#runs-table tbody").replaceChildren(...runs.map(runRow));
  if (selectedRun) await showRun(selectedRun); else $("run-detail").hidden = true;
  // every few seconds while something trains (and the view is open); a finished list stays still
  if (runs.some((r) => r.status === "running") && $("view-runs").classList.contains("active")) {
    refreshTimer = setTimeout(refreshRuns, REFRESH_MS);
  }
}

async function showRun(name) {
  try {
    const run = await getJSON(`/api/runs/${encodeURIComponent(name)}`);
    $("run-detail").hidden = false;
    $("run-title").textContent = `${run.name}: ${run.status}` + (run.max_steps ? `, step ${run.step} of ${run.max_steps}` : "");
    // the trainer's last stderr line: its one-line error for a failed run, where it saved for a stopped one
    show($("run-error"), run.status === "failed" ? run.error || "failed before its first save point" : "");
    show($("run-note"), run.status === "stopped" ? run.error || "stopped: last.ckpt resumes it (--resume true)" : "");
    const points = (key) => run.rows.filter((r) => r[key] !== null).map((r) => [r.step, r[key]]);
    drawChart($("run-chart"), [
      { label: "train loss", color: "#2f6fdb", points: points("train_loss") },
      { label: "validation loss", color: "#d9480f", points: points("val_loss"), dots: true },
    ], "optimizer step", "loss (nats/token)");
  } catch (e) {
    show($("run-error"), e.message);
  }
}

// A small line chart on a <canvas>, written here because every charting library would have to come from a CDN or
// be vendored into the package, and the page must work offline with nothing but this file: axes with round ticks,
// one polyline per series (dots for sparse ones such as the validation loss), a legend.
function niceTicks(lo, hi, count) {
  if (!(hi > lo)) { hi = lo + 1; }
  const raw = (hi - lo) / count;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw);
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(+t.toPrecision(12));
  return ticks;
}

function drawChart(canvas, series, xLabel, yLabel) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || canvas.width;
  const height = canvas.clientHeight || canvas.height;
  canvas.width = width * ratio;
  canvas.height = height * ratio;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, width, height);
  ctx.font = "12px system-ui, sans-serif";
  const all = series.flatMap((s) => s.points);
  if (!all.length) {
    ctx.fillStyle = "#667085";
    ctx.fillText("no metrics yet", 20, 30);
    return;
  }
  const pad = { left: 58, right: 16, top: 28, bottom: 42 };
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const yPad = (y1 - y0) * 0.05;
  y0 -= yPad; y1 += yPad;
  const px = (x) => pad.left + (x - x0) / (x1 - x0) * (width - pad.left - pad.right);
  const py = (y) => height - pad.bottom - (y - y0) / (y1 - y0) * (height - pad.top - pad.bottom);
  ctx.strokeStyle = "#e4e7ec";
  ctx.fillStyle = "#667085";
  ctx.lineWidth = 1;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (const t of niceTicks(y0, y1, 5)) {
    ctx.beginPath(); ctx.moveTo(pad.left, py(t)); ctx.lineTo(width - pad.right, py(t)); ctx.stroke();
    ctx.fillText(String(+t.toFixed(4)), pad.left - 6, py(t));
  }
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  for (const t of niceTicks(x0, x1, 6).filter((t) => Number.isInteger(t))) {
    ctx.beginPath(); ctx.moveTo(px(t), pad.top); ctx.lineTo(px(t), height - pad.bottom); ctx.stroke();
    ctx.fillText(String(t), px(t), height - pad.bottom + 6);
  }
  ctx.strokeStyle = "#98a2b3";
  ctx.strokeRect(pad.left, pad.top, width - pad.left - pad.right, height - pad.top - pad.bottom);
  ctx.fillText(xLabel, (pad.left + width - pad.right) / 2, height - 18);
  ctx.save();
  ctx.translate(14, (pad.top + height - pad.bottom) / 2);
  ctx.rotate(-Math.PI / 2);
  ctx.textBaseline = "middle";
  ctx.fillText(yLabel, 0, 0);
  ctx.restore();
  let legendX = pad.left;
  for (const s of series) {
    if (!s.points.length) continue;
    ctx.strokeStyle = ctx.fillStyle = s.color;
    ctx.lineWidth = 2;
    ctx.beginPath();
    s.points.forEach(([x, y], i) => (i ? ctx.lineTo(px(x), py(y)) : ctx.moveTo(px(x), py(y))));
    ctx.stroke();
    if (s.dots || s.points.length === 1) {
      for (const [x, y] of s.points) { ctx.beginPath(); ctx.arc(px(x), py(y), 3.5, 0, 2 * Math.PI); ctx.fill(); }
    }
    ctx.fillRect(legendX, 10, 14, 3);
    ctx.textAlign = "left";
    ctx.textBaseline = "middle";
    ctx.fillText(s.label, legendX + 18, 11);
    legendX += 30 + ctx.measureText(s.label).width;
  }
}

async function startRun(event) {
  event.preventDefault();
  show($("train-error"), "");
  const name = $("train-name").value.trim();
  const overrides = $("train-overrides").value.split("\n").map((l) => l.trim()).filter(Boolean);
  try {
    await api("/api/runs", { method: "POST", json: { name, recipe: $("train-recipe").value, overrides } });
    selectedRun = name;
    await refreshRuns();
  } catch (e) {
    show($("train-error"), e.message);
  }
}

// ---- the page ------------------------------------------------------------------------------------------------------

function openView(view) {
  for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("active", b.dataset.view === view);
  for (const s of document.querySelectorAll(".view")) s.classList.toggle("active", s.id === `view-${view}`);
  location.hash = view;
  if (view === "adapters") loadAdapters();
  if (view === "runs") refreshRuns(); else clearTimeout(refreshTimer);
}

async function loadConfig() {
  const cfg = await getJSON("/api/config");
  $("upload-form").hidden = !cfg.allow_upload;
  $("train-form").hidden = !cfg.allow_train;
  $("train-recipe").replaceChildren(...cfg.recipes.map((r) => el("option", { value: r.name, title: r.about }, r.name)));
}

async function start() {
  show($("notice"), "");
  try {
    await Promise.all([loadModels(), loadConfig()]);
  } catch (e) {
    show($("notice"), e.status === 401 || e.status === 403 ? `${e.message} (set the API key above)` : e.message);
  }
  const view = location.hash.slice(1);
  openView(["chat", "compare", "adapters", "runs"].includes(view) ? view : "chat");
}

document.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = localStorage.getItem(KEY_STORE) || "";
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const key = $("api-key").value.trim();
    if (key) localStorage.setItem(KEY_STORE, key); else localStorage.removeItem(KEY_STORE);
    start();
  });
  for (const b of document.querySelectorAll("#tabs button")) b.addEventListener("click", () => openView(b.dataset.view));
  $("chat-form").addEventListener("submit", sendChat);
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("chat-form").requestSubmit(); }
  });
  $("chat-clear").addEventListener("click", () => {
    conversation = [];
    localStorage.removeItem(CHAT_STORE);
    renderConversation();
  });
  $("cmp-form").addEventListener("submit", runCompare);
  $("upload-form").addEventListener("submit", upload);
  $("train-form").addEventListener("submit", startRun);
  renderConversation();
  start();
});
