// M-TOR dashboard. Everything shown from the realm (node names, events, model output)
// goes in with textContent: nothing a node or a model says can become markup.
"use strict";

const TOKEN_KEY = "mtor.token";
const $ = (id) => document.getElementById(id);
const state = { me: null, nodes: new Map(), cameras: new Map(), tasks: new Map(), caps: new Set(), stats: null,
  history: [], ws: null, retry: 500, events: 0, eventsWindow: [] };

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

function toast(text) {
  const t = $("toast");
  t.textContent = text;
  t.classList.add("show");
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => t.classList.remove("show"), 3500);
}

// ------------------------------------------------------------------ auth

function token() { return localStorage.getItem(TOKEN_KEY); }

function takeTokenFromUrl() {
  // `mtor up` prints http://host:port/#token=...: the fragment never reaches a server.
  const m = /(?:^#|&)token=([^&]+)/.exec(location.hash);
  if (m) {
    localStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname);
  }
}

async function api(path, options = {}) {
  const headers = Object.assign({ Authorization: "Bearer " + token() }, options.headers || {});
  if (options.json !== undefined) {
    headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(options.json);
  }
  const r = await fetch(path, Object.assign({}, options, { headers }));
  if (r.status === 401) { logout("Your token is not valid (any more)."); throw new Error("unauthorized"); }
  if (!r.ok) {
    let msg = r.status + " " + r.statusText;
    try { const e = (await r.json()).error; msg = e.code + ": " + e.message; } catch (_) { /* not JSON */ }
    throw new Error(msg);
  }
  return r;
}

function logout(why) {
  localStorage.removeItem(TOKEN_KEY);
  if (state.ws) state.ws.close();
  $("app").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = why || "";
}

async function login() {
  try {
    state.me = await (await api("/api/whoami")).json();
  } catch (err) {
    if (err.message !== "unauthorized") $("login-error").textContent = String(err.message);
    return;
  }
  $("login").hidden = true;
  $("app").hidden = false;
  $("me").textContent = state.me.name + " · " + state.me.role;
  document.querySelectorAll(".sysop-only").forEach((n) => { n.hidden = state.me.role !== "sysop"; });
  connect();
  refreshTasks();
}

// ------------------------------------------------------------- websocket

function connect() {
  const ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/api/ws");
  state.ws = ws;
  ws.onopen = () => ws.send(JSON.stringify({ token: token() }));
  ws.onmessage = (m) => {
    let msg;
    try { msg = JSON.parse(m.data); } catch (_) { return; }
    handle(msg);
  };
  ws.onclose = (e) => {
    setLink(false);
    if (e.code === 4401) { logout("The realm refused the token."); return; }
    if (!token()) return;
    setTimeout(connect, state.retry);
    state.retry = Math.min(state.retry * 2, 15000);
  };
}

function setLink(up) {
  const pill = $("link-state");
  pill.textContent = up ? "live" : "reconnecting…";
  pill.className = "pill " + (up ? "ok" : "bad");
}

function handle(msg) {
  const d = msg.data;
  switch (msg.kind) {
    case "snapshot":
      state.retry = 500;
      setLink(true);
      state.nodes.clear();
      for (const n of d.nodes) state.nodes.set(n.node_id, n);
      $("events").replaceChildren();
      for (const e of d.events) addEvent(e, false);
      for (const snap of d.snapshots || []) showSnapshot(snap);
      if (d.stats) setStats(d.stats);
      if (d.orchestrator) setOrchestrator(d.orchestrator);
      renderNodes();
      break;
    case "node": state.nodes.set(d.node_id, d); renderNodes(); break;
    case "node_removed": state.nodes.delete(d.node_id); renderNodes(); break;
    case "event": addEvent(d, true); break;
    case "camera": showSnapshot(d); break;
    case "camera_removed": dropSnapshot(d); break;
    case "stats": setStats(d); break;
    case "orchestrator": setOrchestrator(d); break;
    case "task": updateTask(d); break;
    default: break;
  }
}

// ----------------------------------------------------------------- nodes

const PCT = (v) => (typeof v === "number" ? Math.max(0, Math.min(100, v)) : null);

function meter(label, value, shown) {
  const m = el("div", "meter", label + " " + (shown ?? "–"));
  const bar = el("div", "bar" + (value !== null && value > 80 ? " hot" : ""));
  const fill = el("span");
  fill.style.width = (value ?? 0) + "%";
  bar.append(fill);
  m.append(bar);
  return m;
}

function renderNodes() {
  const box = $("nodes");
  const nodes = [...state.nodes.values()].sort((a, b) => (b.online - a.online) || a.node_id.localeCompare(b.node_id));
  state.caps = new Set();
  const flags = (state.stats && state.stats.peers) || {};
  const cards = nodes.map((n) => {
    for (const c of n.capabilities || []) if (n.online) state.caps.add(c.name);
    const card = el("article", "node " + (n.online ? "online" : "offline"));
    card.dataset.node = n.node_id;
    const head = el("div", "node-head");
    const name = el("div", "node-name");
    name.append(el("span", "dot"), document.createTextNode(n.node_id));
    head.append(name, el("span", "muted", [n.area, n.hostname].filter(Boolean).join(" · ") || n.state));
    card.append(head);
    const chips = el("div", "chips");
    for (const c of n.capabilities || []) {
      chips.append(el("span", "chip", c.name + (c.model ? " · " + c.model : "")));
    }
    const peer = flags[n.node_id] || {};
    if (peer.drained) chips.append(el("span", "chip flag", "drained"));
    if (peer.blacklisted) chips.append(el("span", "chip flag", "blacklisted"));
    card.append(chips);
    const h = n.health || {};
    const cores = (n.hardware && n.hardware.cpu_count) || 1;
    const load = h.load ? PCT((h.load[0] / cores) * 100) : null;
    const meters = el("div", "meters");
    meters.append(
      meter("cpu", PCT(h.cpu_percent), h.cpu_percent != null ? Math.round(h.cpu_percent) + "%" : null),
      meter("load", load, h.load ? h.load[0].toFixed(2) : null),
      meter("mem", PCT(h.mem_percent), h.mem_percent != null ? Math.round(h.mem_percent) + "%" : null),
      meter("temp", PCT(h.temperature_c), h.temperature_c != null ? Math.round(h.temperature_c) + "°C" : null),
    );
    card.append(meters);
    if (state.me && state.me.role === "sysop") {
      const actions = el("div", "node-actions");
      const ops = [[peer.drained ? "undrain" : "drain"], [peer.blacklisted ? "unblacklist" : "blacklist"]];
      for (const [op] of ops) {
        const b = el("button", "small ghost", op);
        b.type = "button";
        b.addEventListener("click", () => adminOp(op, { node: n.node_id }));
        actions.append(b);
      }
      card.append(actions);
    }
    return card;
  });
  box.replaceChildren(...cards);
  const online = nodes.filter((n) => n.online).length;
  $("node-count").textContent = online + " online / " + nodes.length;
  $("chat-cap").textContent = state.caps.has("chat") ? "chat" : (state.caps.has("echo") ? "echo (no chat peer)" : "no peer");
  $("talk").disabled = !state.caps.has("stt");
}

function setOrchestrator(o) {
  const pill = $("orch-state");
  pill.textContent = "orchestrator " + o.state;
  pill.className = "pill " + (o.state === "online" ? "ok" : "bad");
}

// ---------------------------------------------------------------- events

function clock(ts) {
  return new Date(ts * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

function addEvent(e, live) {
  const feed = $("events");
  const li = el("li");
  const what = el("span", "what");
  what.append(el("span", "src", e.node_id + " "), document.createTextNode(e.domain + "/" + e.name));
  let value = e.value;
  if (value !== null && value !== undefined) value = " = " + value + (e.unit ? " " + e.unit : "");
  else if (e.attrs && Object.keys(e.attrs).length) value = " " + JSON.stringify(e.attrs).slice(0, 160);
  what.append(document.createTextNode(value || ""));
  li.append(el("span", "when", clock(e.ts)), what);
  feed.prepend(li);
  while (feed.children.length > 150) feed.lastChild.remove();
  if (live) {
    const now = Date.now();
    state.eventsWindow.push(now);
    state.eventsWindow = state.eventsWindow.filter((t) => now - t < 60000);
    $("event-rate").textContent = state.eventsWindow.length + "/min";
  }
}

// --------------------------------------------------------------- cameras

// An <img> cannot send the Authorization header: fetch the picture, show a blob URL.
async function showSnapshot(s) {
  const key = s.node_id + "/" + s.camera;
  let cam = state.cameras.get(key);
  if (!cam) {
    const fig = el("figure", "camera");
    const img = el("img");
    img.alt = key;
    const cap = el("figcaption");
    const name = el("span", null, key);
    const when = el("span", "muted");
    cap.append(name, when);
    fig.append(img, cap);
    cam = { fig, img, when, url: null };
    state.cameras.set(key, cam);
    $("cameras").append(fig);
  }
  try {
    const blob = await (await api("/api/snapshots/" + encodeURIComponent(s.node_id) + "/" + encodeURIComponent(s.camera))).blob();
    const url = URL.createObjectURL(blob);
    if (cam.url) URL.revokeObjectURL(cam.url);
    cam.url = url;
    cam.img.src = url;
    cam.when.textContent = clock(s.ts);
  } catch (err) { if (err.message !== "unauthorized") cam.when.textContent = err.message; }
  updateCameraPanel();
}

function dropSnapshot(s) {
  const key = s.node_id + "/" + s.camera;
  const cam = state.cameras.get(key);
  if (!cam) return;
  if (cam.url) URL.revokeObjectURL(cam.url);
  cam.fig.remove();
  state.cameras.delete(key);
  updateCameraPanel();
}

function updateCameraPanel() {
  $("cameras-panel").hidden = state.cameras.size === 0;
  $("camera-count").textContent = String(state.cameras.size);
}

// ----------------------------------------------------------------- tasks

function updateTask(u) {
  const prev = state.tasks.get(u.task_id) || {};
  state.tasks.set(u.task_id, Object.assign(prev, {
    task_id: u.task_id, capability: u.capability, user: u.user,
    node: u.node || prev.node, state: u.status,
  }));
  renderTasks();
  scheduleRefresh();
}

let refreshTimer = null;
function scheduleRefresh() {
  if (!refreshTimer) refreshTimer = setTimeout(() => { refreshTimer = null; refreshTasks(); }, 1500);
}

async function refreshTasks() {
  try {
    const live = await (await api("/api/tasks")).json();
    for (const t of live) state.tasks.set(t.task_id, Object.assign(state.tasks.get(t.task_id) || {}, t));
    if (state.me && state.me.role === "sysop") {
      state.history = await (await api("/api/history?limit=20")).json();
      for (const h of state.history) {
        if (!state.tasks.has(h.task_id)) state.tasks.set(h.task_id, { task_id: h.task_id, capability: h.capability,
          user: h.user, node: h.node, state: h.outcome, submitted: h.submitted });
      }
    }
  } catch (err) { if (err.message !== "unauthorized") toast(err.message); }
  renderTasks();
}

function renderTasks() {
  const rows = [...state.tasks.values()].slice(-40).reverse().map((t) => {
    const tr = el("tr");
    tr.dataset.task = t.task_id;
    const finished = ["done", "failed", "cancelled"].includes(t.state);
    tr.append(el("td", "muted", t.task_id.slice(-12)), el("td", null, t.capability), el("td", null, t.user),
      el("td", null, t.node || "–"), el("td", "st-" + t.state, t.state));
    const td = el("td");
    if (!finished && state.me && (state.me.role === "sysop" || t.user === state.me.name)) {
      const b = el("button", "small danger", "cancel");
      b.type = "button";
      b.addEventListener("click", () => cancelTask(t.task_id));
      td.append(b);
    }
    tr.append(td);
    return tr;
  });
  $("tasks").replaceChildren(...rows);
  while (state.tasks.size > 200) state.tasks.delete(state.tasks.keys().next().value);
}

async function cancelTask(id) {
  try { await api("/api/tasks/" + encodeURIComponent(id), { method: "DELETE" }); toast("cancelling " + id.slice(-12)); }
  catch (err) { toast(err.message); }
}

function setStats(s) {
  state.stats = s;
  const done = Object.values(s.completed || {}).reduce((a, b) => a + b, 0);
  const failed = Object.values(s.failed || {}).reduce((a, b) => a + b, 0);
  $("stats-line").textContent = `${s.peers_online} peers online · ${done} done · ${failed} failed · up ${Math.round(s.uptime_s)} s`;
  drawChart(s);
}

function drawChart(s) {
  const c = $("chart");
  const g = c.getContext("2d");
  g.clearRect(0, 0, c.width, c.height);
  const caps = Object.keys(Object.assign({}, s.completed, s.failed, s.queues)).sort().slice(0, 8);
  if (!caps.length) { g.fillStyle = "#8b98a8"; g.font = "14px system-ui"; g.fillText("no tasks yet", 16, 30); return; }
  const max = Math.max(1, ...caps.map((k) => (s.completed[k] || 0) + (s.failed[k] || 0)));
  const w = Math.min(90, (c.width - 20) / caps.length);
  caps.forEach((k, i) => {
    const ok = s.completed[k] || 0, bad = s.failed[k] || 0;
    const h = c.height - 50;
    const x = 12 + i * w;
    g.fillStyle = "#3fb950"; g.fillRect(x, 20 + h - (ok / max) * h, w * 0.6, (ok / max) * h);
    g.fillStyle = "#f85149"; g.fillRect(x, 20 + h - ((ok + bad) / max) * h, w * 0.6, (bad / max) * h);
    g.fillStyle = "#e6edf3"; g.font = "12px system-ui";
    g.fillText(k.slice(0, 12), x, c.height - 14);
    const p50 = s.latency_ms && s.latency_ms[k] && s.latency_ms[k].p50;
    g.fillStyle = "#8b98a8";
    g.fillText(String(ok + bad) + (p50 != null ? " · " + Math.round(p50) + " ms" : ""), x, 14);
  });
}

// ------------------------------------------------------------------ chat

const conversation = [];

function bubble(role, text) {
  const b = el("div", "msg " + role, text);
  $("chat-log").append(b);
  b.scrollIntoView({ block: "end" });
  return b;
}

async function send(text) {
  if (!text.trim()) return;
  bubble("user", text);
  const answer = bubble("assistant streaming", "");
  $("chat-send").disabled = true;
  const started = performance.now();
  try {
    let reply;
    if (state.caps.has("chat")) reply = await streamChat(text, answer);
    else {
      const r = await (await api("/api/tasks", { method: "POST", json: { capability: "echo", input: text, wait: true } })).json();
      reply = typeof r.output === "string" ? r.output : JSON.stringify(r.output);
      answer.textContent = reply;
    }
    answer.classList.remove("streaming");
    answer.append(el("span", "meta", Math.round(performance.now() - started) + " ms"));
    answer.dataset.done = "1";
    return reply;
  } catch (err) {
    answer.className = "msg error";
    answer.textContent = String(err.message);
  } finally {
    $("chat-send").disabled = false;
  }
  return null;
}

async function streamChat(text, answer) {
  conversation.push({ role: "user", content: text });
  while (conversation.length > 12) conversation.shift();
  const r = await api("/v1/chat/completions", { method: "POST", json: { model: "chat", stream: true, messages: conversation } });
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buf = "", full = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const frame = buf.slice(0, i); buf = buf.slice(i + 2);
      if (!frame.startsWith("data: ")) continue;
      const data = frame.slice(6);
      if (data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.code + ": " + chunk.error.message);
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta && chunk.choices[0].delta.content;
      if (delta) { full += delta; answer.textContent = full; answer.scrollIntoView({ block: "end" }); }
    }
  }
  conversation.push({ role: "assistant", content: full });
  return full;
}

// ------------------------------------------------------------ push to talk

const talk = { ctx: null, stream: null, node: null, chunks: [] };

async function startTalking() {
  if (talk.ctx) return;
  try {
    talk.stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1 } });
  } catch (err) { toast("No microphone: " + err.message); return; }
  talk.ctx = new AudioContext();
  const source = talk.ctx.createMediaStreamSource(talk.stream);
  talk.node = talk.ctx.createScriptProcessor(4096, 1, 1);
  talk.chunks = [];
  talk.node.onaudioprocess = (e) => talk.chunks.push(new Float32Array(e.inputBuffer.getChannelData(0)));
  source.connect(talk.node);
  talk.node.connect(talk.ctx.destination);
  $("talk").classList.add("recording");
}

async function stopTalking() {
  if (!talk.ctx) return;
  $("talk").classList.remove("recording");
  const rate = talk.ctx.sampleRate;
  talk.node.disconnect();
  talk.stream.getTracks().forEach((t) => t.stop());
  await talk.ctx.close();
  talk.ctx = null;
  const wav = encodeWav(talk.chunks, rate);
  const form = new FormData();
  form.append("file", new Blob([wav], { type: "audio/wav" }), "speech.wav");
  form.append("model", "stt");
  try {
    const r = await (await api("/v1/audio/transcriptions", { method: "POST", body: form })).json();
    const reply = await send(r.text || "");
    if (reply && state.caps.has("tts")) await speak(reply);
  } catch (err) { toast(err.message); }
}

function encodeWav(chunks, rate) {
  const n = chunks.reduce((a, c) => a + c.length, 0);
  const buf = new ArrayBuffer(44 + n * 2);
  const v = new DataView(buf);
  const str = (o, s) => { for (let i = 0; i < s.length; i++) v.setUint8(o + i, s.charCodeAt(i)); };
  str(0, "RIFF"); v.setUint32(4, 36 + n * 2, true); str(8, "WAVE"); str(12, "fmt ");
  v.setUint32(16, 16, true); v.setUint16(20, 1, true); v.setUint16(22, 1, true);
  v.setUint32(24, rate, true); v.setUint32(28, rate * 2, true); v.setUint16(32, 2, true);
  v.setUint16(34, 16, true); str(36, "data"); v.setUint32(40, n * 2, true);
  let o = 44;
  for (const c of chunks) for (const s of c) { v.setInt16(o, Math.max(-1, Math.min(1, s)) * 0x7fff, true); o += 2; }
  return buf;
}

async function speak(text) {
  const r = await api("/v1/audio/speech", { method: "POST", json: { model: "tts", input: text.slice(0, 5000) } });
  const url = URL.createObjectURL(await r.blob());
  const player = new Audio(url);
  player.onended = () => URL.revokeObjectURL(url);
  await player.play();
}

// ----------------------------------------------------------------- sysop

async function adminOp(op, args) {
  try {
    const r = await (await api("/api/admin/" + op, { method: "POST", json: { args } })).json();
    $("sysop-result").textContent = op + ": " + JSON.stringify(r);
    toast(op + " done");
  } catch (err) { toast(err.message); }
}

// ------------------------------------------------------------------ start

document.addEventListener("DOMContentLoaded", () => {
  takeTokenFromUrl();
  $("login-form").addEventListener("submit", (e) => {
    e.preventDefault();
    localStorage.setItem(TOKEN_KEY, $("login-token").value.trim());
    login();
  });
  $("logout").addEventListener("click", () => logout(""));
  $("chat-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const input = $("chat-input");
    const text = input.value;
    input.value = "";
    send(text);
  });
  const t = $("talk");
  t.addEventListener("pointerdown", startTalking);
  t.addEventListener("pointerup", stopTalking);
  t.addEventListener("pointerleave", stopTalking);
  $("ban-form").addEventListener("submit", (e) => {
    e.preventDefault();
    adminOp("ban", { name: $("ban-name").value, reason: $("ban-reason").value || null });
  });
  $("unban").addEventListener("click", () => adminOp("unban", { name: $("ban-name").value }));
  const tick = () => { $("clock").textContent = new Date().toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }); };
  tick(); setInterval(tick, 10000);
  if (token()) login(); else logout("");
});
