// overdue dashboard: plain JavaScript, no framework, no network beyond this server's own API.
// Every action calls the same /v1 routes (and gets the same validation) as curl would.
"use strict";

const POLL_MS = 2000;
const SPARK_POINTS = 60; // 2 minutes at one poll every 2 s
const TOKEN_KEY = "overdue.token";

const $ = (sel) => document.querySelector(sel);

// ---------------------------------------------------------------------------------------------
// API access, with the bearer token kept in sessionStorage (this tab only)

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

let tokenWaiters = null;

function askToken(why) {
  if (!tokenWaiters) {
    tokenWaiters = [];
    $("#token-error").textContent = why || "";
    $("#token-input").value = "";
    $("#token-dialog").showModal();
  }
  return new Promise((resolve) => tokenWaiters.push(resolve));
}

// Escape would close the prompt with the calls waiting on it forever; the page needs a token.
$("#token-dialog").addEventListener("cancel", (ev) => ev.preventDefault());

$("#token-form").addEventListener("submit", () => {
  sessionStorage.setItem(TOKEN_KEY, $("#token-input").value.trim());
  const waiters = tokenWaiters || [];
  tokenWaiters = null;
  waiters.forEach((w) => w());
});

async function api(path, options = {}) {
  for (let attempt = 0; attempt < 5; attempt++) {
    const headers = { accept: "application/json" };
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.authorization = `Bearer ${token}`;
    let body;
    if (options.json !== undefined) {
      headers["content-type"] = "application/json";
      body = JSON.stringify(options.json);
    }
    const resp = await fetch(path, { method: options.method || "GET", headers, body });
    if (resp.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      await askToken(token ? "That token was refused." : "");
      continue;
    }
    const text = await resp.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch (_) {
      throw new ApiError(resp.status, "bad_response", `not JSON (HTTP ${resp.status})`);
    }
    if (!resp.ok) {
      const e = (data && data.error) || {};
      throw new ApiError(resp.status, e.code || "http_" + resp.status, e.message || `HTTP ${resp.status}`);
    }
    return data;
  }
  throw new ApiError(401, "unauthorized", "no accepted token");
}

const enc = encodeURIComponent;

// ---------------------------------------------------------------------------------------------
// small DOM and formatting helpers (text only: nothing from the server is parsed as HTML)

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null) continue;
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(e.dataset, v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c === undefined || c === null ? "" : String(c)));
  return e;
}

function svg(tag, attrs = {}, text) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function setNum(sel, n) {
  const e = $(sel);
  e.dataset.value = String(n);
  e.textContent = typeof n === "number" ? n.toLocaleString("en-US") : n;
}

function ago(ms, now) {
  const d = Math.round((ms - now) / 1000);
  const a = Math.abs(d);
  let s;
  if (a < 60) s = `${a}s`;
  else if (a < 3600) s = `${Math.floor(a / 60)}m ${a % 60}s`;
  else if (a < 86400) s = `${Math.floor(a / 3600)}h ${Math.floor((a % 3600) / 60)}m`;
  else s = `${Math.floor(a / 86400)}d ${Math.floor((a % 86400) / 3600)}h`;
  if (a === 0) return "now";
  return d > 0 ? `in ${s}` : `${s} ago`;
}

function when(ms, now) {
  return el("span", { title: new Date(ms).toISOString(), dataset: { ms: String(ms) } }, `${new Date(ms).toLocaleString()} (${ago(ms, now)})`);
}

function stateOf(t) {
  return t.state === "in_flight" ? `in flight (${t.owner})` : t.state;
}

function showMessage(sel, text, isError) {
  const e = $(sel);
  e.textContent = text;
  e.classList.toggle("error", !!isError);
}

function errorText(e) {
  return e instanceof ApiError ? `${e.code}: ${e.message}` : String(e);
}

let serverNow = Date.now();

// ---------------------------------------------------------------------------------------------
// confirmation dialog

function confirmBox(text) {
  const d = $("#confirm-dialog");
  $("#confirm-text").textContent = text;
  d.returnValue = "";
  d.showModal();
  return new Promise((resolve) => d.addEventListener("close", () => resolve(d.returnValue === "yes"), { once: true }));
}

// ---------------------------------------------------------------------------------------------
// overview

const series = { t: [], fired: [], rate: [], p99: [] };

function renderNode(o) {
  const n = o.node;
  const box = $("#node");
  box.replaceChildren(
    el("span", { id: "node-store" }, `store ${n.store}`),
    el("span", { id: "node-trigger" }, `trigger ${n.trigger}`),
    el("span", { id: "node-id", title: "this node's id in claims" }, n.id),
    el("span", { id: "node-health", class: n.store_healthy && n.trigger_healthy ? "ok" : "bad" },
      n.store_healthy && n.trigger_healthy ? "healthy" : `unhealthy: ${n.store_error || n.trigger_error || "?"}`),
  );
  const banner = $("#banner");
  const problems = [];
  if (!n.store_healthy) problems.push(`store: ${n.store_error}`);
  if (!n.trigger_healthy) problems.push(`trigger: ${n.trigger_error}`);
  banner.hidden = problems.length === 0;
  banner.textContent = problems.join(" · ");
}

function drawDue(queues) {
  const sums = { overdue: 0, next_minute: 0, next_hour: 0, next_day: 0, later: 0 };
  for (const q of queues) for (const k of Object.keys(sums)) sums[k] += q.due[k];
  const labels = [["overdue", "overdue"], ["next_minute", "≤ 1 min"], ["next_hour", "≤ 1 h"], ["next_day", "≤ 1 day"], ["later", "later"]];
  const chart = $("#due-chart");
  const max = Math.max(1, ...Object.values(sums));
  const w = 420, h = 180, top = 18, bottom = 28, bw = 60, gap = (w - bw * labels.length) / (labels.length + 1);
  const parts = [];
  labels.forEach(([k, label], i) => {
    const x = gap + i * (bw + gap);
    const bh = Math.round(((h - top - bottom) * sums[k]) / max);
    parts.push(svg("rect", { x, y: h - bottom - bh, width: bw, height: Math.max(bh, 1), class: k === "overdue" ? "bar overdue" : "bar", "data-bucket": k, "data-value": sums[k] }));
    parts.push(svg("text", { x: x + bw / 2, y: h - bottom - bh - 4, "text-anchor": "middle", class: "val" }, sums[k].toLocaleString("en-US")));
    parts.push(svg("text", { x: x + bw / 2, y: h - 8, "text-anchor": "middle" }, label));
  });
  chart.replaceChildren(...parts);
}

function drawSpark(sel, values, maxSel) {
  const s = $(sel);
  const w = 420, h = 70;
  const max = Math.max(1, ...values);
  $(maxSel).textContent = Math.round(Math.max(0, ...values)).toLocaleString("en-US");
  if (values.length < 2) return s.replaceChildren();
  const step = w / (SPARK_POINTS - 1);
  const off = (SPARK_POINTS - values.length) * step;
  const pts = values.map((v, i) => `${(off + i * step).toFixed(1)},${(h - 4 - ((h - 8) * v) / max).toFixed(1)}`).join(" ");
  s.replaceChildren(svg("polyline", { points: pts, class: "line" }));
}

function renderOverview(o) {
  serverNow = o.now;
  renderNode(o);
  const e = o.engine;
  const pending = o.queues.reduce((a, q) => a + q.pending, 0);
  const inFlight = o.queues.reduce((a, q) => a + q.in_flight, 0);
  const dead = o.queues.reduce((a, q) => a + q.dead, 0);
  setNum("#stat-pending", pending);
  $("#stat-in-flight-line").textContent = `${inFlight.toLocaleString("en-US")} in flight · ${e.resident.toLocaleString("en-US")} held in memory`;
  setNum("#stat-fired", e.fired);
  setNum("#stat-dead", dead);
  setNum("#stat-failures", e.handler_failures);
  setNum("#stat-retried", e.retried);
  setNum("#stat-rescued", e.backstop_rescued);
  $("#card-dead").classList.toggle("warn", dead > 0);
  $("#card-failures").classList.toggle("warn", e.handler_failures > 0);
  $("#card-rescued").classList.toggle("warn", e.backstop_rescued > 0);
  const orderTotal = Object.values(o.orders).reduce((a, n) => a + n, 0);
  setNum("#stat-orders", orderTotal);
  $("#stat-orders-line").textContent = Object.entries(o.orders).filter(([, n]) => n > 0).map(([s, n]) => `${s} ${n}`).join(" · ");
  const r = o.recent_lateness, l = o.lateness;
  $("#recent-window").textContent = `${o.recent_window_secs}–${2 * o.recent_window_secs}`;
  setNum("#lat-recent-p50", r.p50_ms);
  setNum("#lat-recent-p99", r.p99_ms);
  setNum("#lat-recent-max", r.max_ms);
  setNum("#lat-recent-count", r.count);
  setNum("#lat-p50", l.p50_ms);
  setNum("#lat-p99", l.p99_ms);
  setNum("#lat-max", l.max_ms);

  // Fire rate: the change in `fired` between two polls over the time between them.
  const h = series;
  if (h.t.length) {
    const dt = (o.now - h.t[h.t.length - 1]) / 1000;
    const rate = dt > 0 ? Math.max(0, e.fired - h.fired[h.fired.length - 1]) / dt : 0;
    h.rate.push(rate);
    setNum("#stat-fire-rate", Math.round(rate));
  }
  h.t.push(o.now);
  h.fired.push(e.fired);
  h.p99.push(r.p99_ms);
  for (const k of Object.keys(h)) while (h[k].length > SPARK_POINTS) h[k].shift();
  drawSpark("#spark-rate", h.rate, "#spark-rate-max");
  drawSpark("#spark-p99", h.p99, "#spark-p99-max");

  const nodes = o.nodes.map((n) =>
    el("tr", { dataset: { node: n.id, alive: String(n.alive) } },
      el("td", {}, n.id, n.this ? el("span", { class: "badge" }, "this node") : ""),
      el("td", { class: n.alive ? "ok" : "err" }, n.alive ? "alive" : "lease expired"),
      el("td", { class: "num" }, n.partitions === null ? "all (store not partitioned)" : n.partitions),
      el("td", {}, n.lease_until === null ? "—" : when(n.lease_until, o.now))));
  $("#nodes tbody").replaceChildren(...nodes);

  drawDue(o.queues);
  $("#due-inexact").hidden = o.due_exact;
  const rows = o.queues.map((q) =>
    el("tr", { dataset: { queue: q.queue } },
      el("td", {}, el("a", { href: `#/timers?queue=${enc(q.queue)}` }, q.queue)),
      ...[q.pending, q.in_flight, q.dead, q.due.overdue, q.due.next_minute, q.due.next_hour, q.due.next_day, q.due.later].map((v, i) =>
        el("td", { class: "num", dataset: { col: ["pending", "in_flight", "dead", "overdue", "next_minute", "next_hour", "next_day", "later"][i] } }, v.toLocaleString("en-US")))));
  $("#queues tbody").replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: 9 }, "no timers"))]));
}

async function pollOverview() {
  const [o, next] = await Promise.all([api("/v1/overview"), api("/v1/timers?limit=10")]);
  renderOverview(o);
  const rows = next.timers.map((t) =>
    el("tr", { dataset: { queue: t.queue, key: t.key } },
      el("td", {}, when(t.due_at, o.now)),
      el("td", {}, t.queue),
      el("td", {}, el("a", { href: `#/timers?queue=${enc(t.queue)}&key=${enc(t.key)}` }, t.key)),
      el("td", { class: "num" }, t.attempts),
      el("td", {}, stateOf(t))));
  $("#upcoming tbody").replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: 5 }, "nothing waiting"))]));
}

// ---------------------------------------------------------------------------------------------
// timers

let shownTimer = null;

async function lookupTimer(queue, key) {
  shownTimer = { queue, key };
  $("#lookup-queue").value = queue;
  $("#lookup-key").value = key;
  try {
    const t = await api(`/v1/timers/${enc(queue)}/${enc(key)}`);
    const d = $("#timer-detail");
    d.hidden = false;
    $("#timer-id").textContent = `${t.queue} / ${t.key}`;
    $("#timer-status").textContent = stateOf(t);
    $("#timer-status").dataset.value = t.state;
    $("#timer-due").replaceChildren(when(t.due_at, serverNow));
    $("#timer-due").dataset.value = String(t.due_at);
    setNum("#timer-generation", t.generation);
    setNum("#timer-attempts", t.attempts);
    $("#timer-error").textContent = t.last_error || "—";
    $("#timer-callback").textContent = t.callback_url || "—";
    $("#timer-payload").textContent =
      t.payload !== undefined ? JSON.stringify(t.payload, null, 2) : t.payload_base64 !== undefined ? `base64: ${t.payload_base64}` : "—";
    return t;
  } catch (e) {
    $("#timer-detail").hidden = true;
    showMessage("#timer-message", e instanceof ApiError && e.status === 404 ? `no timer ${queue} / ${key} (fired, cancelled, or never scheduled)` : errorText(e), true);
    return null;
  }
}

async function timerAction(label, call) {
  if (!shownTimer) return;
  const { queue, key } = shownTimer;
  let msg, isError = false;
  try {
    const r = await call(queue, key);
    msg = `${label}: ${queue} / ${key}${r && r.generation ? ` (generation ${r.generation})` : ""}`;
  } catch (e) {
    msg = errorText(e);
    isError = true;
  }
  // Show the timer as it is now (gone, once cancelled or fired), then what the action did.
  await lookupTimer(queue, key);
  showMessage("#timer-message", msg, isError);
}

$("#lookup").addEventListener("submit", (ev) => {
  ev.preventDefault();
  showMessage("#timer-message", "", false);
  location.hash = `#/timers?queue=${enc($("#lookup-queue").value.trim())}&key=${enc($("#lookup-key").value)}`;
});
$("#timer-fire-now").addEventListener("click", () =>
  timerAction("fired now", (q, k) => api(`/v1/timers/${enc(q)}/${enc(k)}/fire-now`, { method: "POST" })));
$("#timer-reschedule").addEventListener("click", () => {
  const secs = Number($("#reschedule-secs").value);
  if (!Number.isFinite(secs) || secs < 0) return showMessage("#timer-message", "seconds must be a number ≥ 0", true);
  timerAction("rescheduled", (q, k) => api(`/v1/timers/${enc(q)}/${enc(k)}/reschedule`, { method: "POST", json: { delay_ms: Math.round(secs * 1000) } }));
});
$("#timer-cancel").addEventListener("click", async () => {
  if (!shownTimer || !(await confirmBox(`Cancel timer ${shownTimer.queue} / ${shownTimer.key}? It will not fire.`))) return;
  timerAction("cancelled", (q, k) => api(`/v1/timers/${enc(q)}/${enc(k)}`, { method: "DELETE" }));
});

let timerCursor = null;

async function listTimers(more) {
  const queue = $("#timer-list-queue").value.trim();
  let q = "limit=50" + (queue ? `&queue=${enc(queue)}` : "");
  if (more && timerCursor) q += `&after_due=${timerCursor.after_due}&after_queue=${enc(timerCursor.after_queue)}&after_key=${enc(timerCursor.after_key)}`;
  const page = await api(`/v1/timers?${q}`);
  timerCursor = page.next;
  const rows = page.timers.map((t) =>
    el("tr", { dataset: { queue: t.queue, key: t.key } },
      el("td", {}, when(t.due_at, serverNow)), el("td", {}, t.queue),
      el("td", {}, el("a", { href: `#/timers?queue=${enc(t.queue)}&key=${enc(t.key)}` }, t.key)),
      el("td", { class: "num" }, t.generation), el("td", { class: "num" }, t.attempts), el("td", {}, stateOf(t))));
  if (more) $("#timer-list tbody").append(...rows);
  else $("#timer-list tbody").replaceChildren(...rows);
  $("#timer-list-more").hidden = !timerCursor;
}
$("#timer-list-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  listTimers(false).catch((e) => showMessage("#timer-message", errorText(e), true));
});
$("#timer-list-more").addEventListener("click", () => listTimers(true));

// ---------------------------------------------------------------------------------------------
// orders

let orderCursor = null;
let shownOrder = null;

async function listOrders(more) {
  const status = $("#order-status").value;
  let q = "limit=50" + (status ? `&status=${enc(status)}` : "");
  if (more && orderCursor) q += `&before=${enc(orderCursor)}`;
  const page = await api(`/v1/orders?${q}`);
  orderCursor = page.next_before;
  const rows = page.orders.map((o) =>
    el("tr", { dataset: { orderId: o.id, status: o.status } },
      el("td", {}, el("a", { href: `#/orders/${enc(o.id)}` }, o.id)), el("td", {}, o.buyer),
      el("td", {}, el("span", { class: `badge s-${o.status}` }, o.status)),
      el("td", { class: "num" }, (o.total_cents / 100).toFixed(2)),
      el("td", {}, when(o.created_at, serverNow)),
      el("td", {}, o.status === "pending_payment" ? when(o.pay_deadline, serverNow) : "—")));
  if (more) $("#orders-table tbody").append(...rows);
  else $("#orders-table tbody").replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: 6 }, "no orders"))]));
  $("#orders-more").hidden = !orderCursor;
}

async function showOrder(id) {
  shownOrder = id;
  const d = await api(`/v1/orders/${enc(id)}`);
  const o = d; // the order, with its events and timers beside its fields
  $("#order-detail").hidden = false;
  $("#order-detail-id").textContent = o.id;
  $("#order-detail-status").textContent = o.status;
  $("#order-detail-status").className = `badge s-${o.status}`;
  $("#order-detail-line").textContent =
    `buyer ${o.buyer} · ${(o.total_cents / 100).toFixed(2)} · ${o.items.map((i) => `${i.quantity}× ${i.product_id}`).join(", ")}` +
    (o.close_reason ? ` · closed: ${o.close_reason}` : "") + ` · pay deadline ${new Date(o.pay_deadline).toLocaleString()}`;
  const items = d.events.map((ev) =>
    el("li", { dataset: { kind: ev.kind, source: ev.source } },
      el("span", { class: "t" }, when(ev.at, serverNow)), " ",
      el("strong", {}, ev.kind), " ",
      ev.source === "api" ? el("span", { class: "src" }, "by the API") : el("span", { class: "src timer" }, `by timer ${ev.source}`),
      ev.detail ? el("span", { class: "detail" }, ` — ${ev.detail}`) : ""));
  $("#order-timeline").replaceChildren(...items);
  const timers = d.timers.map((t) =>
    el("tr", { dataset: { queue: t.queue } },
      el("td", {}, el("a", { href: `#/timers?queue=${enc(t.queue)}&key=${enc(o.id)}` }, t.queue)),
      el("td", {}, when(t.due_at, serverNow)), el("td", { class: "num" }, t.generation), el("td", { class: "num" }, t.attempts), el("td", {}, t.state)));
  $("#order-timers tbody").replaceChildren(...(timers.length ? timers : [el("tr", {}, el("td", { colspan: 5 }, "none"))]));
}

$("#orders-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const id = $("#order-id-input").value.trim();
  if (id) location.hash = `#/orders/${enc(id)}`;
  else listOrders(false).catch((e) => alertBanner(e));
});
$("#order-status").addEventListener("change", () => listOrders(false).catch((e) => alertBanner(e)));
$("#orders-more").addEventListener("click", () => listOrders(true));

// ---------------------------------------------------------------------------------------------
// dead letters

let dlCursor = null;

async function listDeadLetters(more) {
  let q = "limit=100";
  if (more && dlCursor) q += `&after_id=${dlCursor}`;
  const page = await api(`/v1/dead-letters?${q}`);
  dlCursor = page.next_after_id;
  const rows = page.dead_letters.map((d) =>
    el("tr", { dataset: { dlId: String(d.id), queue: d.queue, key: d.key } },
      el("td", { class: "num" }, d.id), el("td", {}, d.queue),
      el("td", {}, d.key), el("td", { class: "num" }, d.attempts), el("td", {}, when(d.failed_at, serverNow)),
      el("td", { class: "err" }, d.error),
      el("td", {}, el("button", { type: "button", class: "dl-replay", onclick: () => replayOne(d) }, "Replay"))));
  if (more) $("#dl-table tbody").append(...rows);
  else $("#dl-table tbody").replaceChildren(...rows);
  const n = $("#dl-table tbody").children.length;
  $("#dl-count").textContent = `(${n}${dlCursor ? "+" : ""})`;
  $("#dl-more").hidden = !dlCursor;
  $("#dl-replay-all").disabled = n === 0;
}

async function replayOne(d) {
  if (!(await confirmBox(`Replay dead letter ${d.id} (${d.queue} / ${d.key})? It becomes a timer due now.`))) return;
  try {
    const r = await api(`/v1/dead-letters/${d.id}/replay`, { method: "POST" });
    showMessage("#dl-message", `replayed ${d.id}: ${d.queue} / ${d.key} is due now (generation ${r.generation})`, false);
  } catch (e) {
    showMessage("#dl-message", errorText(e), true);
  }
  await listDeadLetters(false);
}

$("#dl-replay-all").addEventListener("click", async () => {
  if (!(await confirmBox("Replay every dead letter? Each becomes a timer due now."))) return;
  let done = 0, failed = 0, after = null;
  for (;;) {
    const page = await api(`/v1/dead-letters?limit=1000${after ? `&after_id=${after}` : ""}`);
    for (const d of page.dead_letters) {
      try {
        await api(`/v1/dead-letters/${d.id}/replay`, { method: "POST" });
        done++;
      } catch (_) {
        failed++;
      }
      showMessage("#dl-message", `replaying… ${done} done${failed ? `, ${failed} failed` : ""}`, false);
    }
    after = page.next_after_id;
    if (!after) break;
  }
  showMessage("#dl-message", `replayed ${done}${failed ? `, ${failed} failed` : ""}`, failed > 0);
  await listDeadLetters(false);
});
$("#dl-more").addEventListener("click", () => listDeadLetters(true));

// ---------------------------------------------------------------------------------------------
// routing and the poll loop

function alertBanner(e) {
  const b = $("#banner");
  b.hidden = false;
  b.textContent = errorText(e);
}

function route() {
  const [path, query] = (location.hash.slice(1) || "/overview").split("?");
  const parts = path.split("/").filter(Boolean);
  const tab = ["overview", "timers", "orders", "dead-letters"].includes(parts[0]) ? parts[0] : "overview";
  document.querySelectorAll(".tab").forEach((s) => (s.hidden = s.id !== `tab-${tab}`));
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.tab === tab));
  const params = new URLSearchParams(query || "");
  if (tab === "timers") {
    if (params.get("queue") !== null) $("#timer-list-queue").value = params.get("queue");
    if (params.get("queue") && params.get("key") !== null) lookupTimer(params.get("queue"), params.get("key"));
    else {
      shownTimer = null;
      $("#timer-detail").hidden = true;
    }
    listTimers(false).catch(alertBanner);
  } else if (tab === "orders") {
    if (parts[1]) showOrder(decodeURIComponent(parts[1])).catch(alertBanner);
    else {
      shownOrder = null;
      $("#order-detail").hidden = true;
    }
    listOrders(false).catch(alertBanner);
  } else if (tab === "dead-letters") {
    listDeadLetters(false).catch(alertBanner);
  }
  return tab;
}

let current = "overview";
window.addEventListener("hashchange", () => {
  current = route();
  tick();
});

let ticking = false;
async function tick() {
  if (ticking) return;
  ticking = true;
  try {
    if (current === "overview") await pollOverview();
    else {
      const o = await api("/v1/overview");
      serverNow = o.now;
      renderNode(o);
      if (current === "orders" && shownOrder) await showOrder(shownOrder);
      if (current === "dead-letters" && !dlCursor) await listDeadLetters(false);
    }
    if ($("#banner").dataset.poll) {
      $("#banner").hidden = true;
      delete $("#banner").dataset.poll;
    }
    document.body.dataset.updated = String(Date.now());
  } catch (e) {
    const b = $("#banner");
    b.hidden = false;
    b.dataset.poll = "1";
    b.textContent = `cannot reach the server: ${errorText(e)}`;
  } finally {
    ticking = false;
  }
}

current = route();
tick();
setInterval(tick, POLL_MS);
