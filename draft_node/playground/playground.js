// The playground: one prompt, streamed through the speculative pair (every token coloured by where
// it came from, rounds and acceptance live), and the same prompt through the target alone.
import { NodeError, getJSON, streamCompletion } from "./stream.js";

const $ = (id) => document.getElementById(id);
const SOURCES = { accepted: "accepted draft token", recovered: "target correction", bonus: "target bonus token", target: "target only (nothing drafted)" };
let controller = null;

function apiKey() {
  const key = $("api_key").value.trim();
  sessionStorage.setItem("specwire-api-key", key);
  return key;
}

function requestBody(targetOnly) {
  const number = (id) => ($(id).value === "" ? undefined : Number($(id).value));
  const body = {
    max_tokens: number("max_tokens"), temperature: number("temperature"), top_p: number("top_p"),
    seed: number("seed"), num_speculative_tokens: number("k"), num_candidates: number("n"),
    strategy: $("strategy").value, target_only: targetOnly,
  };
  const chat = document.querySelector("input[name=mode]:checked").value === "chat";
  if (chat) body.messages = [{ role: "user", content: $("prompt").value }];
  else body.prompt = $("prompt").value;
  return { path: chat ? "/v1/chat/completions" : "/v1/completions", body, chat };
}

function showError(err) {
  const box = $("error");
  if (!err) { box.hidden = true; box.textContent = ""; return; }
  let text = err.message;
  if (err instanceof NodeError && err.status) text = `HTTP ${err.status}: ${err.message}`;
  if (err.status === 401) text += "\nThis node needs an API key: enter it above.";
  box.textContent = text;
  box.hidden = false;
}

function escapeText(text) {
  const span = document.createElement("span");
  span.textContent = text;
  return span.innerHTML;
}

class Run {
  // One generation rendered into a panel.
  constructor(panel) {
    this.panel = panel;
    this.text = panel.querySelector(".text");
    this.stats = panel.querySelector(".stats");
    this.strip = panel.querySelector(".strip");
    this.positions = panel.querySelector(".positions");
    this.text.textContent = "";
    this.stats.textContent = "";
    if (this.strip) this.strip.textContent = "";
    if (this.positions) this.positions.textContent = "";
    this.tokens = 0;
    this.plain = "";
    this.rounds = [];
    this.started = performance.now();
    this.firstAt = null;
  }

  add(chunk, chat) {
    const choice = chunk.choices[0];
    const text = chat ? choice.delta.content ?? "" : choice.text ?? "";
    const ext = chunk.specwire;
    if (!ext) { this.append(text, null, null); return; }
    const round = ext.round ?? null;
    if (round) this.addRound(round);
    let shown = "";
    for (const token of ext.tokens) {
      this.append(token.text, token, round);
      shown += token.text;
      this.tokens += 1;
    }
    if (text.length > shown.length) this.append(text.slice(shown.length), null, null);  // held-back text
    if (this.firstAt === null && this.tokens) this.firstAt = performance.now();
    this.updateStats();
  }

  append(text, token, round) {
    if (!text && !token) return;
    this.plain += text;
    const span = document.createElement("span");
    span.textContent = text;
    if (token) {
      span.className = `tok ${token.source}`;
      span.dataset.source = token.source;
      span.tip = { token, round };
    }
    this.text.appendChild(span);
  }

  addRound(round) {
    this.rounds.push(round);
    if (!this.strip) return;
    const column = document.createElement("div");
    column.className = `round ${round.pipeline}`;
    const scale = 80 / Math.max(...this.rounds.map((r) => r.round_s), 1e-6);
    for (const phase of ["draft", "network", "verify"]) {
      const part = document.createElement("div");
      part.className = phase;
      part.style.height = `${Math.max(1, round[`${phase}_s`] * scale)}px`;
      column.appendChild(part);
    }
    column.title = `round ${round.round}: draft ${ms(round.draft_s)}, network ${ms(round.network_s)}, verify ${ms(round.verify_s)}` +
      (round.pipeline ? `, look-ahead ${round.pipeline}` : "");
    this.strip.appendChild(column);
    this.strip.scrollLeft = this.strip.scrollWidth;
    this.drawPositions();
  }

  drawPositions() {
    if (!this.positions) return;
    const drafted = [], accepted = [];
    for (const r of this.rounds) {
      for (let p = 0; p < r.drafted; p++) {
        drafted[p] = (drafted[p] ?? 0) + 1;
        accepted[p] = (accepted[p] ?? 0) + (p < r.accepted ? 1 : 0);
      }
    }
    // columns share the card's width; past 12 the rates move to the titles and every 4th position is numbered
    const dense = drafted.length > 12;
    this.positions.style.setProperty("--positions", drafted.length);
    this.positions.classList.toggle("dense", dense);
    this.positions.innerHTML = drafted.map((count, p) => {
      const rate = accepted[p] / count;
      const label = !dense || p === 0 || (p + 1) % 4 === 0 ? p + 1 : "";
      return `<div class="position" title="position ${p + 1}: ${accepted[p]} of ${count} accepted (${Math.round(rate * 100)}%)">` +
        `<span class="rate">${Math.round(rate * 100)}%</span>` +
        `<div class="bar" style="height:${Math.max(2, rate * 46)}px"></div><span>${label}</span></div>`;
    }).join("");
  }

  updateStats() {
    const seconds = (performance.now() - this.started) / 1000;
    const parts = [`${this.tokens} tokens`, `${(this.tokens / seconds).toFixed(2)} tok/s`];
    const drafting = this.rounds.filter((r) => r.drafted > 0);
    if (drafting.length) {
      const drafted = drafting.reduce((s, r) => s + r.drafted, 0);
      const accepted = drafting.reduce((s, r) => s + r.accepted, 0);
      parts.push(`acceptance ${(accepted / drafted * 100).toFixed(0)}%`);
      parts.push(`mean acceptance length ${((accepted + drafting.length) / drafting.length).toFixed(2)}`);
    }
    this.stats.textContent = parts.join(" · ");
    this.tokensPerSecond = this.tokens / seconds;
  }
}

function ms(seconds) { return `${(seconds * 1000).toFixed(0)} ms`; }

async function generate(panel, targetOnly, signal) {
  const { path, body, chat } = requestBody(targetOnly);
  const run = new Run(panel);
  panel.hidden = false;
  for await (const chunk of streamCompletion(path, body, { apiKey: apiKey(), signal })) run.add(chunk, chat);
  run.updateStats();
  return run;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("compare").disabled = busy;
  $("stop").disabled = !busy;
}

async function start(compare) {
  showError(null);
  controller = new AbortController();
  setBusy(true);
  $("alone").hidden = !compare;
  $("alone").querySelector(".verdict").textContent = "";
  try {
    const speculative = await generate($("speculative"), false, controller.signal);
    if (compare) {
      const alone = await generate($("alone"), true, controller.signal);
      const verdict = $("alone").querySelector(".verdict");
      const speedup = speculative.tokensPerSecond / alone.tokensPerSecond;
      const same = speculative.plain === alone.plain;
      verdict.className = `verdict ${same ? "same" : "differs"}`;
      verdict.textContent = `${same ? "identical text" : "the texts differ (sampling without a shared seed, or a lossy strategy)"} · speculative ${speedup.toFixed(2)}x the target alone`;
    }
  } catch (err) {
    if (err.name === "AbortError") showError(new Error("stopped"));
    else showError(err);
  } finally {
    setBusy(false);
    controller = null;
  }
}

function showTip(event) {
  const tip = $("tip");
  const info = event.target.tip;
  if (!info) { tip.hidden = true; return; }
  const { token, round } = info;
  const lines = [`<b>${SOURCES[token.source] ?? token.source}</b> <code>${escapeText(JSON.stringify(token.text))}</code> (id ${token.id})`];
  if (token.logprob !== null && token.logprob !== undefined) lines.push(`target logprob ${token.logprob.toFixed(3)} (p = ${Math.exp(token.logprob).toFixed(3)})`);
  if (round) {
    lines.push(`round ${round.round}: ${round.accepted} of ${round.drafted} accepted${round.pipeline ? `, look-ahead ${round.pipeline}` : ""}`);
    for (const c of round.candidates) {
      const shown = c.tokens.map((t, i) => `<code${i < c.accepted ? ' class="ok"' : ""}>${escapeText(JSON.stringify(t))}</code>`);
      lines.push(`tried: ${shown.join(" ")}`);
    }
  } else lines.push("the target's token after the prompt");
  tip.innerHTML = lines.join("<br>");
  tip.hidden = false;
  tip.style.left = `${Math.min(event.clientX + 12, window.innerWidth - 380)}px`;
  tip.style.top = `${event.clientY + 14}px`;
}

async function loadModel() {
  try {
    const models = await getJSON("/v1/models", apiKey());
    $("model").textContent = `model: ${models.data[0].id}`;
  } catch (err) {
    $("model").textContent = err.status === 401 ? "enter the API key to use this node" : `node: ${err.message}`;
  }
}

$("api_key").value = sessionStorage.getItem("specwire-api-key") ?? "";
$("api_key").addEventListener("change", loadModel);
$("form").addEventListener("submit", (event) => { event.preventDefault(); start(false); });
$("compare").addEventListener("click", () => start(true));
$("stop").addEventListener("click", () => controller?.abort());
document.addEventListener("mouseover", showTip);
document.body.dataset.ready = "1";
loadModel();
