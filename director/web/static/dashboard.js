// foedus director dashboard: reads the JSON API every POLL_MS and redraws; no build step, no
// library. Charts are SVG drawn here. Text from the API goes in with textContent, never as HTML.
"use strict";

const POLL_MS = 2000;
// In a chart the colour says whose line it is (the weighted means dark, each site its own colour,
// the same in every chart) and the dash which task measured it (solid, dashed, dotted).
const MEAN_COLOR = "#1d2330";
const SITE_COLORS = ["#2f6fdf", "#e07b00", "#2e9d4f", "#9b3fb5", "#d23f6a", "#1a9aa8", "#8a6d1f", "#6b7a99"];
const DASHES = ["none", "6 3", "2 3"];
const SVG = "http://www.w3.org/2000/svg";
// A secure round's steps, in order (foedus.history.rows.SECURE_STEPS).
const SECURE_STEPS = ["KEYS", "SHARES", "UPLOAD", "SURVIVORS", "UNMASK"];

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  for (const child of children) node.append(child);
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
  return node;
}

// A count the site's envoy.yaml leaves out travels as 0: "-", not a site with no data.
function samples(count) {
  return count ? String(count) : "-";
}

function age(seconds) {
  if (seconds < 60) return `${Math.round(seconds)} s`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min`;
  if (seconds < 86400) return `${(seconds / 3600).toFixed(1)} h`;
  return `${(seconds / 86400).toFixed(1)} d`;
}

function progress(e) {
  return `round ${e.rounds_completed} of ${e.rounds}`;
}

async function api(path, options) {
  const response = await fetch(path, Object.assign({ credentials: "same-origin" }, options));
  if (response.status === 401) {
    window.location.assign("/login");
    throw new Error("not logged in");
  }
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

function stateBadge(state) {
  return el("span", { class: `state ${state}` }, state);
}

function bar(e) {
  const fill = el("span");
  const share = e.rounds ? Math.min(1, e.rounds_completed / e.rounds) : 0;
  fill.style.width = `${Math.round(share * 100)}%`;
  return el("span", { class: "bar" }, fill);
}

async function header() {
  const me = await api("/api/me");
  document.getElementById("who").textContent = `${me.name} (${me.role})`;
  document.getElementById("log-out").addEventListener("click", async () => {
    await fetch("/api/session", { method: "DELETE", credentials: "same-origin" });
    window.location.assign("/login");
  });
}

function stamp(error) {
  document.getElementById("error").textContent = error ? String(error.message || error) : "";
  if (!error) document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
}

async function drawIndex() {
  const [{ experiments }, { envoys }] = await Promise.all([api("/api/experiments"), api("/api/envoys")]);
  const rows = experiments.map((e) =>
    el("tr", { "data-id": e.id },
      el("td", {}, el("a", { href: `/experiments/${encodeURIComponent(e.id)}` }, e.name || e.id),
        ...(e.secure ? [" ", el("span", { class: "tag" }, "secure")] : []),
        ...(hasBudget(e) ? [" ", el("span", { class: "tag", title: "differential privacy" }, "DP")] : [])),
      el("td", {}, e.owner),
      el("td", {}, stateBadge(e.state)),
      el("td", { class: "progress" }, progress(e), " ", bar(e)),
      el("td", {}, age(e.age_seconds)),
      el("td", {}, `${e.sites.filter((s) => s.online).length}/${e.sites.length} online`)));
  document.querySelector("#experiments tbody").replaceChildren(...rows);
  document.getElementById("no-experiments").hidden = experiments.length > 0;
  const sites = envoys.map((v) =>
    el("tr", {},
      el("td", {}, v.name),
      el("td", {}, el("span", { class: v.online ? "dot online" : "dot" }), v.online ? "online" : "offline"),
      el("td", {}, v.shard.description),
      el("td", {}, `${samples(v.shard.train_samples)} / ${samples(v.shard.valid_samples)}`),
      el("td", {}, `${age(v.seconds_since_heartbeat)} ago`),
      el("td", {}, v.experiments.length ? v.experiments.join(", ") : "none")));
  document.querySelector("#envoys tbody").replaceChildren(...sites);
  document.getElementById("no-envoys").hidden = envoys.length > 0;
}

// One step of a secure round: its time and who dropped out in it; empty when the round never got there.
function stepCell(step) {
  if (!step) return el("td", {});
  const cell = el("td", { "data-stage": step.stage }, step.seconds === null ? "-" : `${step.seconds.toFixed(2)} s`);
  if (step.dropped.length) cell.append(el("div", { class: "dropped" }, `dropped ${step.dropped.join(", ")}`));
  return cell;
}

function drawSecure(e) {
  document.getElementById("secure").hidden = !e.secure;
  document.getElementById("secure-tag").hidden = !e.secure;
  const rows = e.secure_rounds.map((r) =>
    el("tr", { "data-round": r.round },
      el("td", {}, String(r.round)),
      ...SECURE_STEPS.map((name) => stepCell(r.stages.find((step) => step.stage === name))),
      el("td", { class: "untrained" }, r.untrained)));
  document.querySelector("#secure-rounds tbody").replaceChildren(...rows);
  document.getElementById("no-secure-rounds").hidden = rows.length > 0;
}

// A number as people read it: 8, 0.5, 1e-05 (as the aggregator's lines print them).
function short(value) {
  if (value === 0 || (Math.abs(value) >= 1e-4 && Math.abs(value) < 1e6)) return String(value);
  return value.toExponential().replace(/e([+-])(\d)$/, (_, sign, digit) => `e${sign}0${digit}`); // 1e-05, as :g
}

// A bar of the epsilon spent on a scale up to `full`, the cap drawn on it as a line.
function fillBudget(bar, epsilon, cap, full) {
  const spent = epsilon === null ? "infinite" : epsilon.toFixed(2);
  const share = epsilon === null ? 1 : Math.min(1, epsilon / full);
  bar.querySelector(".spent").style.width = `${(share * 100).toFixed(1)}%`;
  bar.querySelector(".cap").style.left = `${((cap / full) * 100).toFixed(1)}%`;
  bar.title = `epsilon ${spent} spent; the cap is ${short(cap)}`;
}

function budgetBar() {
  return el("span", { class: "budget" }, el("span", { class: "spent" }), el("span", { class: "cap" }));
}

// Whether the federation (DP-FedAvg) or any site (DP-SGD) has a privacy budget.
function hasBudget(e) {
  return Boolean(e.privacy) || e.site_budgets.length > 0;
}

// The privacy budgets: the section and the tag shown when the federation or any site has one.
function drawPrivacy(e) {
  const shown = hasBudget(e);
  document.getElementById("privacy").hidden = !shown;
  document.getElementById("dp-tag").hidden = !shown;
  drawFederationBudget(e);
  drawSiteBudgets(e.site_budgets);
}

// The federation's privacy budget: the epsilon spent, and with a cap a bar of it, the cap drawn
// as a line on it (the federation trains no round past it); no cap: the number alone.
function drawFederationBudget(e) {
  const dp = e.privacy;
  document.getElementById("federation-budget").hidden = !dp;
  if (!dp) return;
  const spent = dp.epsilon === null ? "infinite" : dp.epsilon.toFixed(2);
  const rounds = `after ${e.rounds_completed} round${e.rounds_completed === 1 ? "" : "s"}`;
  const cap = dp.max_epsilon === null ? "" : ` of ${short(dp.max_epsilon)}`;
  document.getElementById("budget-text").textContent =
    `epsilon ${spent}${cap} at delta ${short(dp.delta)} ${rounds}${dp.max_epsilon === null ? " (no cap)" : ""}`;
  const budget = document.getElementById("budget");
  budget.hidden = dp.max_epsilon === null;
  if (dp.max_epsilon !== null) fillBudget(budget, dp.epsilon, dp.max_epsilon, dp.max_epsilon * 1.1); // room after the cap, so its line shows
  document.getElementById("privacy-settings").textContent =
    `DP-FedAvg: each site's update clipped to L2 norm ${short(dp.clip)}; Gaussian noise of ` +
    `standard deviation ${short(dp.noise_multiplier)} x ${short(dp.clip)} (noise multiplier x clip) ` +
    "added to their sum each round. Epsilon adds up round by round; smaller is more private.";
}

// Each site's own budget (DP-SGD), a row per site: its line, and with a cap a bar as the
// federation's, every site on one scale (the largest cap, with room after it) so bars compare.
function drawSiteBudgets(budgets) {
  document.getElementById("site-budgets-part").hidden = budgets.length === 0;
  const capped = budgets.filter((b) => b.max_epsilon !== null);
  const full = Math.max(...capped.map((b) => Math.max(b.max_epsilon, b.epsilon))) * 1.1;
  const rows = budgets.map((b) => {
    const cap = b.max_epsilon === null ? " (no cap)" : "";
    const text = `epsilon ${b.epsilon.toFixed(2)}${b.max_epsilon === null ? "" : ` of ${short(b.max_epsilon)}`} at delta ${short(b.delta)}${cap}`;
    const cell = el("td", {});
    if (b.max_epsilon !== null) {
      const bar = budgetBar();
      fillBudget(bar, b.epsilon, b.max_epsilon, full);
      cell.append(bar);
    }
    return el("tr", { "data-site": b.site },
      el("td", {}, b.site), el("td", { class: "budget-text" }, text), cell, el("td", {}, `round ${b.round}`));
  });
  document.querySelector("#site-budgets tbody").replaceChildren(...rows);
}

function lineStyle(line, tasks, sites) {
  const dash = DASHES[tasks.indexOf(line.task) % DASHES.length];
  if (line.site === null) return { stroke: MEAN_COLOR, width: 2.5, dash, r: 3 };
  return { stroke: SITE_COLORS[sites.indexOf(line.site) % SITE_COLORS.length], width: 1.5, dash, r: 2.5 };
}

function swatch(style) {
  const root = svg("svg", { class: "swatch", width: 22, height: 8, viewBox: "0 0 22 8" });
  root.append(svg("line", { x1: 1, x2: 21, y1: 4, y2: 4, stroke: style.stroke, "stroke-width": style.width, "stroke-dasharray": style.dash }));
  return root;
}

function chart(spec, sites) {
  const width = 440, height = 220, left = 52, right = 12, top = 10, bottom = 30;
  const points = spec.lines.flatMap((line) => line.points);
  let [x0, x1] = [Math.min(...points.map((p) => p[0])), Math.max(...points.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...points.map((p) => p[1])), Math.max(...points.map((p) => p[1]))];
  if (x0 === x1) x1 = x0 + 1;
  if (y0 === y1) { y0 -= 0.5; y1 += 0.5; }
  const pad = (y1 - y0) * 0.08;
  y0 -= pad; y1 += pad;
  const sx = (x) => left + ((x - x0) / (x1 - x0)) * (width - left - right);
  const sy = (y) => top + (1 - (y - y0) / (y1 - y0)) * (height - top - bottom);
  const root = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img" });
  for (let i = 0; i <= 4; i++) {
    const y = y0 + ((y1 - y0) * i) / 4;
    root.append(svg("line", { class: "grid", x1: left, x2: width - right, y1: sy(y), y2: sy(y) }));
    const label = svg("text", { x: left - 6, y: sy(y) + 4, "text-anchor": "end" });
    label.textContent = Math.abs(y) >= 100 ? y.toFixed(0) : y.toPrecision(3);
    root.append(label);
  }
  const step = Math.max(1, Math.ceil((x1 - x0) / 8));
  for (let x = Math.ceil(x0); x <= x1; x += step) {
    const label = svg("text", { x: sx(x), y: height - bottom + 16, "text-anchor": "middle" });
    label.textContent = String(x);
    root.append(label);
  }
  const caption = svg("text", { x: width - right, y: height - 2, "text-anchor": "end" });
  caption.textContent = "rounds";
  root.append(caption);
  root.append(svg("line", { class: "axis", x1: left, x2: left, y1: top, y2: height - bottom }));
  root.append(svg("line", { class: "axis", x1: left, x2: width - right, y1: height - bottom, y2: height - bottom }));
  const tasks = [...new Set(spec.lines.map((line) => line.task))];
  const legend = el("div", { class: "legend" });
  // Sites' lines first, so the means are drawn over them.
  const drawn = [...spec.lines.filter((line) => line.site !== null), ...spec.lines.filter((line) => line.site === null)];
  for (const line of drawn) {
    const style = lineStyle(line, tasks, sites);
    const who = { "data-task": line.task, "data-site": line.site === null ? "" : line.site };
    const path = line.points.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ");
    root.append(svg("polyline", Object.assign({ points: path, fill: "none", stroke: style.stroke, "stroke-width": style.width, "stroke-dasharray": style.dash }, who)));
    for (const p of line.points) {
      const dot = svg("circle", { class: "point", cx: sx(p[0]), cy: sy(p[1]), r: style.r, fill: style.stroke });
      const tip = svg("title");
      tip.textContent = `${line.label}, round ${p[0]}: ${p[1]}`;
      dot.append(tip);
      root.append(dot);
    }
  }
  for (const line of spec.lines) {
    const who = { "data-task": line.task, "data-site": line.site === null ? "" : line.site };
    legend.append(el("span", who, swatch(lineStyle(line, tasks, sites)), line.label));
  }
  return el("div", { class: "chart", "data-metric": spec.metric }, el("h4", {}, spec.metric), root, legend);
}

async function drawExperiment() {
  const id = decodeURIComponent(window.location.pathname.split("/").pop());
  const e = await api(`/api/experiments/${encodeURIComponent(id)}`);
  document.title = `foedus director: ${e.name || e.id}`;
  document.getElementById("title").textContent = `${e.name || "Experiment"} (${e.id})`;
  document.getElementById("state").replaceWith(Object.assign(stateBadge(e.state), { id: "state" }));
  document.getElementById("progress").textContent = progress(e);
  document.getElementById("bar").replaceWith(Object.assign(bar(e), { id: "bar" }));
  document.getElementById("age").textContent = `submitted ${age(e.age_seconds)} ago`;
  document.getElementById("owner").textContent = `by ${e.owner}`;
  document.getElementById("reason").textContent = e.reason;
  document.getElementById("sites").replaceChildren(...e.sites.map((s) =>
    el("li", { "data-site": s.site },
      el("span", { class: s.online ? "dot online" : "dot" }), s.site,
      el("span", { class: "hint" }, ` ${s.online ? "online" : "offline"}${s.state ? ", " + s.state.replaceAll("_", " ") : ""}`))));
  // Every site keeps one colour across the charts.
  const sites = [...new Set(e.charts.flatMap((c) => c.lines.map((line) => line.site)))].filter((site) => site !== null).sort();
  document.getElementById("charts").replaceChildren(...e.charts.map((spec) => chart(spec, sites)));
  document.getElementById("no-charts").hidden = e.charts.length > 0;
  drawPrivacy(e);
  drawSecure(e);
  const log = document.getElementById("log");
  const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
  log.textContent = e.log_tail.join("\n");
  if (atEnd) log.scrollTop = log.scrollHeight;
}

function poll(draw) {
  const tick = async () => {
    try {
      await draw();
      stamp(null);
    } catch (error) {
      stamp(error);
    }
    window.setTimeout(tick, POLL_MS);
  };
  tick();
}

function login() {
  document.getElementById("login").addEventListener("submit", async (event) => {
    event.preventDefault();
    const token = document.getElementById("token").value;
    const response = await fetch("/api/session", {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ token }),
    });
    if (response.ok) {
      window.location.assign("/");
    } else {
      const body = await response.json().catch(() => ({}));
      document.getElementById("error").textContent = body.error || `HTTP ${response.status}`;
    }
  });
}

const page = document.body.dataset.page;
if (page === "login") {
  login();
} else {
  header().catch(stamp);
  poll(page === "experiment" ? drawExperiment : drawIndex);
}
