// tinylm serve: the page's behaviour. Plain JavaScript, no framework, no build step.
//
// The page talks to the JSON API of tinylm/serve/server.py (docs/serve.md):
//   GET  /api/info       the model, to fill the header and the layer/head menus
//   POST /api/generate   a stream of JSON lines: start, one token event per token, done
//   POST /api/stop       ends the running generation after its current step
//   POST /api/attention  the attention behind one token, fetched when it is selected
//
// Stable hooks that tests and users rely on: #prompt, #generate, #output with one
// .token element per generated token (data-prob: its probability when drawn), and
// #candidates with one .candidate row per candidate of the selected token.

"use strict";

const $ = (id) => document.getElementById(id);

const state = {
  info: null,
  ids: [],            // every token id of the text: the prompt's, then the generated ones
  elements: [],       // elements[pos]: the span showing token `pos` (prompt or generated)
  promptLength: 0,
  steps: [],          // steps[i]: the token event of generated token i
  genId: null,        // the running generation's id, for /api/stop
  controller: null,   // aborts the running fetch
  running: false,
  selected: null,     // index (into steps) of the selected token
  attention: null,    // the /api/attention answer for the selected token
  attentionWanted: null, // a token whose attention waits for the model to be free
};

// -- small helpers ---------------------------------------------------------------

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

// A token's text made visible: newline, tab and space would be invisible in a table.
function visible(text) {
  if (text === "") return "(part of a character)";
  return text.replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/ /g, "␣");
}

function percent(p) {
  if (p === 0) return "0";
  if (p < 0.001) return "<0.1%";
  return (100 * p).toFixed(p < 0.1 ? 1 : 0) + "%";
}

function numberField(id) {
  const text = $(id).value.trim();
  return text === "" ? null : Number(text);
}

async function postJSON(path, body, signal) {
  return fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
    signal,
  });
}

async function errorText(response) {
  try {
    return (await response.json()).error || response.statusText;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

// -- the model's description -----------------------------------------------------

async function loadInfo() {
  const response = await fetch("/api/info");
  const info = await response.json();
  state.info = info;
  const cfg = info.model.config;
  $("model-info").textContent =
    `${info.model.source || "model"} · ${info.model.parameters.toLocaleString("en")} parameters` +
    ` · ${cfg.n_layers} layers × ${cfg.n_heads} heads · context ${cfg.context_length}` +
    ` · ${info.tokenizer.kind}, ${info.tokenizer.vocab_size} tokens`;
  $("max_new_tokens").max = info.limits.max_new_tokens;
  $("n_candidates").max = info.limits.max_candidates;
  for (let l = 0; l < cfg.n_layers; l++) $("layer").add(new Option(`${l + 1}`, l));
  $("layer").value = cfg.n_layers - 1; // the last layer: closest to the choice
  $("head").add(new Option("mean", -1));
  for (let h = 0; h < cfg.n_heads; h++) $("head").add(new Option(`${h + 1}`, h));
}

// -- generating ------------------------------------------------------------------

function settings() {
  return {
    prompt: $("prompt").value,
    temperature: numberField("temperature") ?? 1.0,
    top_k: numberField("top_k"),
    top_p: numberField("top_p"),
    min_p: numberField("min_p"),
    repetition_penalty: numberField("repetition_penalty") ?? 1.0,
    max_new_tokens: numberField("max_new_tokens") ?? 200,
    seed: numberField("seed"),
    candidates: numberField("n_candidates") ?? 10,
  };
}

function reset() {
  Object.assign(state, {
    ids: [], elements: [], promptLength: 0, steps: [], genId: null,
    selected: null, attention: null, attentionWanted: null,
  });
  $("output").replaceChildren();
  $("candidates").replaceChildren();
  $("attention").replaceChildren();
  $("selected-title").textContent = "No token selected";
  $("selected-summary").textContent = "Click a token to see why it was chosen.";
}

function setRunning(running) {
  state.running = running;
  $("generate").disabled = running;
  $("stop").disabled = !running;
}

async function generate() {
  if (state.running) return;
  reset();
  setRunning(true);
  setStatus("generating…");
  state.controller = new AbortController();
  try {
    const response = await postJSON("/api/generate", settings(), state.controller.signal);
    if (!response.ok) {
      setStatus(await errorText(response), true); // 400/413 name the field or limit; 503 busy
      return;
    }
    await readLines(response, handleEvent);
  } catch (err) {
    if (err.name === "AbortError") setStatus("stopped");
    else setStatus(`connection lost: ${err.message}`, true);
  } finally {
    setRunning(false);
    state.controller = null;
    // a token selected while the model was busy gets its attention now
    if (state.attentionWanted !== null && state.attentionWanted === state.selected) {
      loadAttention(state.selected);
    }
  }
}

// The answer is newline-delimited JSON: split the byte stream into lines as it arrives.
async function readLines(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let newline;
    while ((newline = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, newline);
      buffer = buffer.slice(newline + 1);
      if (line.trim()) onEvent(JSON.parse(line));
    }
  }
}

function handleEvent(event) {
  if (event.type === "start") {
    state.genId = event.id;
    for (const token of event.prompt) addToken(token.id, token.text, "ptoken");
    state.promptLength = event.prompt.length;
  } else if (event.type === "token") {
    const el = addToken(event.id, event.text, "token");
    el.dataset.index = state.steps.length;
    el.dataset.prob = event.prob;
    el.style.setProperty("--p", event.prob);
    el.title = `p = ${event.prob.toFixed(4)}`;
    state.steps.push(event);
    setStatus(`generating… ${state.steps.length} tokens`);
  } else if (event.type === "done") {
    const why = { length: "max new tokens reached", eos: "end-of-text token",
                  stopped: "stopped" }[event.reason] || event.reason;
    const speed = event.tokens_per_second ? `, ${event.tokens_per_second} tokens/s` : "";
    setStatus(`done: ${event.new_tokens} tokens (${why}${speed})`);
  } else if (event.type === "error") {
    setStatus(`error: ${event.error}`, true);
  }
}

// One span per token. A newline shows as a faint ↵ before the line break.
function addToken(id, text, className) {
  const el = document.createElement("span");
  el.className = className;
  el.dataset.pos = state.ids.length;
  text.split("\n").forEach((part, k) => {
    if (k > 0) {
      const mark = document.createElement("span");
      mark.className = "nl";
      mark.textContent = "↵";
      el.append(mark, "\n");
    }
    if (part) el.append(part);
  });
  if (text === "") el.classList.add("partial");
  const output = $("output");
  const atBottom = output.scrollTop + output.clientHeight >= output.scrollHeight - 30;
  output.append(el);
  if (atBottom) output.scrollTop = output.scrollHeight; // follow the text, unless scrolled up
  state.ids.push(id);
  state.elements.push(el);
  return el;
}

async function stop() {
  if (!state.running) return;
  if (state.genId !== null) {
    try {
      await postJSON("/api/stop", { id: state.genId }); // the stream then ends with "stopped"
    } catch { /* the abort below still ends it */ }
  }
  // closing the connection stops the server's loop too; give the polite way a moment first
  setTimeout(() => state.controller && state.controller.abort(), state.genId ? 2000 : 0);
}

// -- the selected token ----------------------------------------------------------

function select(index) {
  if (index < 0 || index >= state.steps.length) return;
  document.querySelectorAll("#output .selected").forEach((el) => el.classList.remove("selected"));
  state.selected = index;
  const step = state.steps[index];
  state.elements[state.promptLength + index].classList.add("selected");
  $("selected-title").textContent = `Token ${index + 1}: “${visible(step.token)}”`;
  $("selected-summary").textContent =
    `Drawn with probability ${percent(step.prob)} ` +
    `(${percent(step.prob_before)} before top-k / top-p / min-p).`;
  renderCandidates(step);
  loadAttention(index);
}

function renderCandidates(step) {
  const rows = step.candidates.map((c) => {
    const tr = document.createElement("tr");
    tr.className = "candidate";
    if (c.id === step.id) tr.classList.add("chosen");
    if (c.cut_by) tr.classList.add("cut");
    tr.dataset.id = c.id;
    const tok = document.createElement("td");
    tok.className = "tok";
    tok.textContent = visible(c.text);
    const badge = document.createElement("span");
    badge.className = "badge";
    if (c.id === step.id) {
      badge.classList.add("drawn");
      badge.textContent = "drawn";
    } else if (c.cut_by) {
      badge.textContent = `cut by ${c.cut_by}`;
    }
    const last = document.createElement("td");
    last.append(badge);
    tr.append(tok, barCell(c.before), barCell(c.after), last);
    return tr;
  });
  $("candidates").replaceChildren(...rows);
}

function barCell(p) {
  const td = document.createElement("td");
  const bar = document.createElement("div");
  bar.className = "bar";
  const b = document.createElement("b");
  b.style.width = `${Math.round(60 * p)}px`;
  const label = document.createElement("span");
  label.textContent = percent(p);
  bar.append(b, label);
  td.append(bar);
  return td;
}

// -- attention -------------------------------------------------------------------

async function loadAttention(index) {
  state.attention = null;
  clearAttentionMarks();
  $("attention").replaceChildren();
  const ids = state.ids.slice(0, state.promptLength + index); // the tokens before it
  const response = await postJSON("/api/attention", { ids });
  if (state.selected !== index) return; // another token was selected meanwhile
  if (response.status === 503) {
    state.attentionWanted = index;
    $("attention").textContent = "The model is busy generating; the attention appears when it " +
      "finishes (or press Stop).";
    return;
  }
  if (!response.ok) {
    $("attention").textContent = await errorText(response);
    return;
  }
  state.attentionWanted = null;
  state.attention = await response.json();
  renderAttention();
}

function clearAttentionMarks() {
  document.querySelectorAll("#output .attended").forEach((el) => {
    el.classList.remove("attended");
    el.style.removeProperty("--a");
  });
}

// The selected layer's weights for one head, or the mean over the heads.
function attentionRow(att) {
  const layer = att.weights[Number($("layer").value)];
  const head = Number($("head").value);
  if (head >= 0) return layer[head];
  return layer[0].map((_, j) => layer.reduce((sum, row) => sum + row[j], 0) / layer.length);
}

function renderAttention() {
  const att = state.attention;
  if (!att) return;
  clearAttentionMarks();
  const row = attentionRow(att);
  const strongest = Math.max(...row);
  // in the text: an orange underline, thicker where the weight is larger
  row.forEach((w, j) => {
    const el = state.elements[att.start + j];
    if (!el || w < 0.01 * strongest) return;
    el.classList.add("attended");
    el.style.setProperty("--a", (w / strongest).toFixed(3));
  });
  // in the panel: the 12 positions with the most weight
  const top = row.map((w, j) => [w, j]).sort((a, b) => b[0] - a[0]).slice(0, 12);
  $("attention").replaceChildren(...top.map(([w, j]) => {
    const div = document.createElement("div");
    div.className = "row";
    const pos = document.createElement("span");
    pos.className = "pos";
    pos.textContent = `#${att.start + j}`;
    const tok = document.createElement("span");
    tok.className = "tok";
    tok.textContent = visible(att.tokens[j]);
    const bar = document.createElement("b");
    bar.style.width = `${(100 * w / strongest).toFixed(1)}%`;
    const pct = document.createElement("span");
    pct.className = "pct";
    pct.textContent = percent(w);
    div.append(pos, tok, bar, pct);
    return div;
  }));
}

// -- wiring ----------------------------------------------------------------------

$("controls").addEventListener("submit", (e) => {
  e.preventDefault();
  generate();
});
$("stop").addEventListener("click", stop);
$("output").addEventListener("click", (e) => {
  const el = e.target.closest(".token");
  if (el) select(Number(el.dataset.index));
});
$("layer").addEventListener("change", renderAttention);
$("head").addEventListener("change", renderAttention);
document.addEventListener("keydown", (e) => {
  if (state.selected === null || ["INPUT", "TEXTAREA", "SELECT"].includes(e.target.tagName)) {
    return;
  }
  if (e.key === "ArrowRight") select(state.selected + 1);
  if (e.key === "ArrowLeft") select(state.selected - 1);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) generate(); // Ctrl-Enter generates
});

loadInfo().catch((err) => setStatus(`cannot reach the server: ${err.message}`, true));
