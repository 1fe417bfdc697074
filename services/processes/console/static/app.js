// livepipe console page: plain JS, no build step. The server pushes JSON events over /ws:
//   snap (everything, on connect), lv (levels, 20 Hz), turn, proc (a heartbeat), video, session,
//   mute, rec, typed, note. Controls are POST /api/control {op, ...}.
"use strict";

const TOKEN = new URLSearchParams(location.search).get("token");
const SILENT_MS = 2500;          // two heartbeats (1 s apart) missed: the row turns red
const WINDOW_MS = 30000;         // timeline span
const $ = (id) => document.getElementById(id);

const state = {
  turns: new Map(),              // turn -> turn object from the server
  procs: new Map(),              // key -> {row, seenAt (performance.now())}
  levels: [],                    // lv samples, last 30 s
  clockOffset: 0,                // server ms - Date.now()
  video: null, videoAt: 0,
};

function withToken(url) {
  return TOKEN ? url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(TOKEN) : url;
}

// ------------------------------------------------------------------ websocket
let backoff = 500;
function connect() {
  const proto = location.protocol === "https:" ? "wss://" : "ws://";
  const ws = new WebSocket(withToken(proto + location.host + "/ws"));
  ws.onopen = () => { backoff = 500; setLink(true); };
  ws.onmessage = (ev) => handle(JSON.parse(ev.data));
  ws.onclose = () => {
    setLink(false);
    setTimeout(connect, backoff);
    backoff = Math.min(backoff * 2, 5000);
  };
}

function setLink(ok) {
  const el = $("link");
  el.textContent = ok ? "live" : "disconnected";
  el.className = "badge " + (ok ? "ok" : "bad");
}

function handle(m) {
  switch (m.t) {
    case "snap":
      state.clockOffset = m.now - Date.now();
      state.turns.clear();
      $("conversation").textContent = "";
      for (const t of m.turns) updateTurn(t);
      state.procs.clear();
      const now = performance.now();
      for (const p of m.procs) state.procs.set(p.key, { row: p, seenAt: now - p.age_ms });
      state.levels = m.levels.slice();
      if (m.video) setVideo(m.video);
      if (m.session && m.session.state) setSession(m.session);
      setMute(m.muted);
      renderProcs(); drawLatency(); dirty = true;
      break;
    case "lv":
      state.clockOffset = m.ts - Date.now();
      state.levels.push(m);
      while (state.levels.length && state.levels[0].ts < m.ts - WINDOW_MS) state.levels.shift();
      setMeter("in", m.in); setMeter("out", m.out);
      dirty = true;
      break;
    case "turn": updateTurn(m.turn); drawLatency(); break;
    case "proc": {
      const p = m.p;
      // A restarted process replaces the rows of its earlier instances that went silent.
      for (const [k, v] of state.procs) {
        if (v.row.src === p.src && k !== p.key && performance.now() - v.seenAt > SILENT_MS) state.procs.delete(k);
      }
      state.procs.set(p.key, { row: p, seenAt: performance.now() });
      renderProcs();
      break;
    }
    case "video": setVideo(m); break;
    case "session": setSession(m); break;
    case "mute": setMute(m.muted); break;
    case "rec": setRec(m); break;
    case "typed": notice("text.in: " + m.text); break;
    case "note": notice(m.text); break;
  }
}

// ------------------------------------------------------------------ header
function setSession(s) {
  const el = $("session");
  el.textContent = "model: " + s.state + (s.backend ? " (" + s.backend + ")" : "") + (s.detail ? " · " + s.detail : "");
  el.className = "badge " + (s.state === "connected" ? "ok" : s.state === "error" ? "bad" : "");
}

function setMute(muted) {
  const el = $("mic");
  el.textContent = muted === true ? "mic: muted" : muted === false ? "mic: live" : "mic: ?";
  el.className = "badge " + (muted === true ? "bad" : muted === false ? "ok" : "");
  $("mute").classList.toggle("on", muted === true);
}

function setRec(r) {
  const btn = $("record");
  btn.textContent = r.active ? "Stop recording" : "Record";
  btn.classList.toggle("on", !!r.active);
  btn.dataset.active = r.active ? "1" : "";
  const kb = r.bytes == null ? "" : " " + (r.bytes / 1024).toFixed(0) + " KB";
  $("rec").textContent = r.path ? (r.active ? "● " + r.seconds + " s" : "saved") + kb + " → " + r.path : "";
}

let noticeTimer = 0;
function notice(text) {
  $("notice").textContent = text;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => { $("notice").textContent = ""; }, 6000);
}

// ------------------------------------------------------------------ conversation
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text != null) e.textContent = text;
  return e;
}

function updateTurn(t) {
  state.turns.set(t.turn, t);
  const box = $("conversation");
  const nearBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  let card = box.querySelector(`.turn[data-turn="${t.turn}"]`);
  if (!card) {
    card = el("div", "turn");
    card.dataset.turn = t.turn;
    card.append(el("div", "hd"), el("div", "typed"), el("div", "user"), el("div", "model"), el("div", "tools"));
    // Keep cards in turn order even if a later turn's first message came first.
    const after = [...box.children].find((c) => Number(c.dataset.turn) > t.turn);
    box.insertBefore(card, after || null);
  }
  card.classList.toggle("interrupted", !!t.interrupted);
  card.dataset.finished = t.finished ? "1" : "";
  const hd = card.querySelector(".hd");
  hd.textContent = "";
  hd.append("turn " + t.turn);
  if (t.v2v_ms != null) {
    let v = " · voice-to-voice " + Math.round(t.v2v_ms) + " ms" + (t.v2v_from === "text" ? " (from text)" : "");
    if (t.budget) v += " (model " + Math.round(t.budget.model_ms) + " + playback " + Math.round(t.budget.playback_ms) + ")";
    hd.append(v);
  }
  const total = (t.audio_ms / 1000).toFixed(2);
  const heard = el("span", "heard");
  heard.textContent = t.played_ms != null ? " · heard " + (t.played_ms / 1000).toFixed(2) + " of " + total + " s"
    : t.first_sample_ts != null ? " · playing (" + total + " s received)" : t.audio_ms > 0 ? " · " + total + " s received" : "";
  hd.append(heard);
  if (t.interrupted) {
    hd.append(" · ", el("span", "tag", "INTERRUPTED" + (t.interrupt_reason ? " (" + t.interrupt_reason + ")" : "")));
    if (t.i2s_ms != null) hd.append(" · silent after " + t.i2s_ms.toFixed(1) + " ms");
  }
  card.querySelector(".typed").textContent = (t.typed || []).join(" / ");
  card.querySelector(".typed").style.display = t.typed && t.typed.length ? "" : "none";
  card.querySelector(".user").textContent = t.user;
  card.querySelector(".model").textContent = t.model;
  const tools = card.querySelector(".tools");
  tools.textContent = "";
  for (const c of t.tools) tools.append(el("div", "tool", c.name + "(" + c.args + ") → " + (c.result ?? "…")));
  if (nearBottom) box.scrollTop = box.scrollHeight;
}

// ------------------------------------------------------------------ meters and timeline
function setMeter(which, db) {
  const bar = $("meter-" + which);
  bar.dataset.db = db;
  const pct = Math.max(0, Math.min(100, (db + 60) / 60 * 100));
  bar.firstElementChild.style.width = pct + "%";
  $("db-" + which).textContent = db <= -119 ? "-inf" : db.toFixed(1) + " dB";
}

let dirty = true;
function drawTimeline() {
  const c = $("timeline"), g = c.getContext("2d");
  const W = c.width, H = c.height, end = Date.now() + state.clockOffset, start = end - WINDOW_MS;
  g.clearRect(0, 0, W, H);
  const x = (ts) => (ts - start) / WINDOW_MS * W;
  const lanes = [["user", "#4cc38a", 8, "u", "in"], ["model", "#4c9be8", 50, "m", "out"]];
  g.font = "11px system-ui"; g.fillStyle = "#8b96a3";
  for (const [name, color, y0, flag, lv] of lanes) {
    g.fillText(name, 4, y0 + 10);
    for (const s of state.levels) {
      const h = Math.max(0, Math.min(1, (s[lv] + 60) / 60)) * 30;
      g.fillStyle = s[flag] ? color : "#2c3540";
      g.fillRect(x(s.ts) - 1.2, y0 + 32 - h, 2.4, Math.max(1, h));
    }
  }
  g.fillStyle = "#e5484d";
  for (const s of state.levels) if (s.i) g.fillRect(x(s.ts) - 1, 0, 2, H);
  g.fillStyle = "#8b96a3";
  for (let sec = 0; sec <= 30; sec += 5) g.fillRect(W - sec / 30 * W, H - 4, 1, 4);
}

function frameLoop() {
  if (dirty) { drawTimeline(); dirty = false; }
  requestAnimationFrame(frameLoop);
}

// ------------------------------------------------------------------ latency chart
function drawLatency() {
  const c = $("latchart"), g = c.getContext("2d"), W = c.width, H = c.height;
  g.clearRect(0, 0, W, H);
  const turns = [...state.turns.values()].filter((t) => t.v2v_ms != null || t.i2s_ms != null).slice(-20);
  const maxMs = Math.max(1000, ...turns.map((t) => t.v2v_ms || 0)) * 1.1;
  const bw = W / 20, y = (ms) => H - 14 - ms / maxMs * (H - 26);
  g.font = "11px system-ui";
  turns.forEach((t, i) => {
    const x0 = i * bw + 4, w = bw * 0.6;
    if (t.v2v_ms != null) {
      const model = t.budget ? t.budget.model_ms : t.v2v_ms;
      g.fillStyle = "#4c9be8"; g.fillRect(x0, y(model), w, H - 14 - y(model));
      if (t.budget) { g.fillStyle = "#a07be8"; g.fillRect(x0, y(t.v2v_ms), w, y(model) - y(t.v2v_ms)); }
      g.fillStyle = "#dde3ea"; g.fillText(Math.round(t.v2v_ms), x0, y(t.v2v_ms) - 2);
    }
    if (t.i2s_ms != null) {
      g.fillStyle = "#e5484d"; g.fillRect(x0 + w + 1, y(t.i2s_ms), 4, H - 14 - y(t.i2s_ms));
    }
    g.fillStyle = "#8b96a3"; g.fillText("t" + t.turn, x0, H - 2);
  });
  if (!turns.length) { g.fillStyle = "#8b96a3"; g.fillText("no replies yet", 8, H / 2); }
}

// ------------------------------------------------------------------ video
function setVideo(v) {
  state.video = v;
  $("frame").src = withToken("/frame.jpg?n=" + v.seq);
  showVideoInfo();
}

function showVideoInfo() {
  const v = state.video;
  if (!v) return;
  const age = (Date.now() + state.clockOffset - v.capture_ts / 1e6) / 1000;
  $("frame-info").textContent = v.w + "×" + v.h + " · " + (v.bytes / 1024).toFixed(1) + " KB · frame " + v.seq +
    " · age " + age.toFixed(1) + " s";
}

// ------------------------------------------------------------------ processes
function fmt(v, d = 0) { return v == null ? "-" : Number(v).toFixed(d); }

function renderProcs() {
  const body = document.querySelector("#procs tbody");
  const now = performance.now();
  const keys = [...state.procs.keys()].sort();
  const rows = new Map([...body.children].map((tr) => [tr.dataset.key, tr]));
  for (const k of keys) {
    const { row: p, seenAt } = state.procs.get(k);
    let tr = rows.get(k);
    if (!tr) {
      tr = document.createElement("tr");
      tr.dataset.key = k; tr.dataset.src = p.src;
      for (let i = 0; i < 12; i++) tr.append(document.createElement("td"));
      tr.children[11].append(el("div", "metrics"));
    }
    body.append(tr);   // keeps sorted order
    rows.delete(k);
    const age = now - seenAt, silent = age > SILENT_MS;
    tr.classList.toggle("silent", silent);
    const drops = p.dropped == null ? null : p.dropped + (p.stale_dropped || 0);
    const metrics = Object.entries(p.metrics || {}).map(([a, b]) => a + "=" + b).join(" ");
    const cells = [p.src + " " + p.inst.slice(0, 4), silent ? "SILENT" : "alive", fmt(p.cpu, 1), fmt(p.rss == null ? null : p.rss / 1e6, 1),
      fmt(p.in_per_s, 1), fmt(p.out_per_s, 1), fmt(drops), fmt(p.rejected), fmt(p.gaps), fmt(p.handler_errors),
      (age / 1000).toFixed(1) + " s", metrics];
    const targets = [...tr.children].slice(0, 11).concat([tr.children[11].firstElementChild]);
    cells.forEach((text, i) => { if (targets[i].textContent !== text) targets[i].textContent = text; });
    tr.children[11].title = metrics;
  }
  for (const tr of rows.values()) tr.remove();
}

// ------------------------------------------------------------------ controls
async function control(body) {
  const headers = { "Content-Type": "application/json" };
  if (TOKEN) headers["X-Livepipe-Token"] = TOKEN;
  try {
    const r = await fetch("/api/control", { method: "POST", headers, body: JSON.stringify(body) });
    const j = await r.json().catch(() => ({ ok: false, error: "HTTP " + r.status }));
    if (!j.ok) notice(body.op + ": " + (j.error || "refused"));
    else if (body.op === "interrupt") notice("interrupt sent for turn " + j.turn);
    return j;
  } catch (e) {
    notice(body.op + ": " + e);
    return { ok: false };
  }
}

function init() {
  $("mute").onclick = () => control({ op: "mute" });
  $("unmute").onclick = () => control({ op: "unmute" });
  $("interrupt").onclick = () => control({ op: "interrupt" });
  $("record").onclick = async () => {
    const r = await control({ op: $("record").dataset.active ? "record_stop" : "record_start" });
    if (r.ok) setRec(r);
  };
  $("say").onsubmit = async (ev) => {
    ev.preventDefault();
    const text = $("text").value.trim();
    if (!text) return;
    const r = await control({ op: "text", text });
    if (r.ok) $("text").value = "";
  };
  setInterval(() => { renderProcs(); showVideoInfo(); dirty = true; }, 250);
  drawLatency();
  requestAnimationFrame(frameLoop);
  connect();
}

init();
