// tdb-agent viewer: one script, routed by the page's path. Every number shown comes from
// the JSON API (/api/...), which returns what the MCP tools return; this file only draws.
"use strict";

// ------------------------------------------------------------------ helpers
const $ = (sel, el = document) => el.querySelector(sel);

/** h("a", {href: "/x", class: "c", onclick: fn}, "text", child, ...) -> element */
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "style") el.style.cssText = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const SVGNS = "http://www.w3.org/2000/svg";
function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function fmt(x, digits = 3) {
  if (x === null || x === undefined) return "—";
  if (typeof x !== "number") return String(x);
  if (x !== 0 && (Math.abs(x) >= 1e5 || Math.abs(x) < 1e-3)) return x.toExponential(2);
  return x.toFixed(digits);
}

const componentHref = (id) => "/component/" + encodeURIComponent(id);
const componentLink = (id) => h("a", {href: componentHref(id), class: "mono"}, id);

// The bearer token (servers that need one): given once as #token=..., kept for this tab.
const TOKEN_KEY = "tdb-agent-token";
(function readToken() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
})();

async function api(path, body) {
  const headers = {};
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = "Bearer " + token;
  const opts = {headers};
  if (body !== undefined) {
    opts.method = "POST";
    headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  let data;
  try { data = await r.json(); } catch (e) { data = {error: `${r.status} ${r.statusText}`}; }
  if (!r.ok) throw new Error(data.error || `${r.status} ${r.statusText}`);
  return data;
}

/** replaceChildren that skips null/false (optional sections). */
const fill = (el, ...children) => el.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));

const errorBox = (e) => h("div", {class: "error"}, String(e.message || e));

// ------------------------------------------------------------------ tooltip
const tip = $("#tip");
function showTip(ev, text) {
  tip.textContent = text;
  tip.hidden = false;
  tip.style.left = Math.min(ev.clientX + 14, window.innerWidth - tip.offsetWidth - 8) + "px";
  tip.style.top = (ev.clientY + 16) + "px";
}
const hideTip = () => { tip.hidden = true; };
document.addEventListener("mouseover", (ev) => {
  const t = ev.target.closest && ev.target.closest("[data-tip]");
  if (t) showTip(ev, t.dataset.tip); else hideTip();
});

// ------------------------------------------------------------------ shared widgets
/** A table whose headers sort it. columns: [{key, label, num, render(row)}]. */
function sortableTable(columns, rows, {rowAttrs, initial} = {}) {
  let key = initial ? initial.key : null, dir = initial ? initial.dir : 1;
  const tbody = h("tbody");
  const heads = columns.map((c) => h("th", {class: c.sort === false ? "" : "sortable", dataset: {key: c.key},
    onclick: () => {
      if (c.sort === false) return;
      dir = key === c.key ? -dir : (c.num ? -1 : 1);
      key = c.key;
      draw();
    }}, c.label));
  function value(row, c) { return c.value ? c.value(row) : row[c.key]; }
  function draw() {
    const sorted = rows.slice();
    if (key) {
      const c = columns.find((x) => x.key === key);
      sorted.sort((a, b) => {
        const x = value(a, c), y = value(b, c);
        return (x < y ? -1 : x > y ? 1 : 0) * dir;
      });
    }
    heads.forEach((th) => th.classList.remove("sorted-asc", "sorted-desc"));
    if (key) heads[columns.findIndex((c) => c.key === key)].classList.add(dir > 0 ? "sorted-asc" : "sorted-desc");
    tbody.replaceChildren(...sorted.map((row) => h("tr", rowAttrs ? rowAttrs(row) : {},
      columns.map((c) => h("td", {class: c.num ? "num" : ""}, c.render ? c.render(row) : fmt(row[c.key]))))));
  }
  draw();
  return h("table", {class: "sortable-table"}, h("thead", {}, h("tr", {}, heads)), tbody);
}

function kvTable(pairs) {
  return h("table", {class: "kv"}, pairs.filter(([, v]) => v !== undefined && v !== null && v !== "")
    .map(([k, v]) => h("tr", {}, h("th", {}, k), h("td", {}, v instanceof Node ? v : String(v)))));
}

/** Background colour for an activation: blue for positive, red for negative. */
function shade(v, scale) {
  const a = Math.min(1, Math.abs(v) / (scale || 1));
  return v >= 0 ? `rgba(37, 99, 235, ${(0.85 * a).toFixed(3)})` : `rgba(220, 38, 38, ${(0.85 * a).toFixed(3)})`;
}

/** One dataset example: tokens shaded by activation; hovering shows the value. */
function exampleLine(ex, scale) {
  const spans = ex.tokens.map((t, i) => {
    const v = ex.activations[i];
    const a = Math.min(1, Math.abs(v) / (scale || 1));
    return h("span", {class: "tok" + (i === ex.position ? " focus" : ""),
      style: `background:${shade(v, scale)};color:${a > 0.55 ? "white" : "inherit"}`,
      dataset: {tip: `${JSON.stringify(t)}  activation ${fmt(v, 4)}`, value: String(v)}}, t);
  });
  const extra = ex.attended_token != null ? ` → attends ${JSON.stringify(ex.attended_token)} (${ex.attended_offset})` : "";
  return h("div", {class: "example"}, h("span", {class: "val", title: "activation at the boxed token"}, `▢ ${fmt(ex.activation, 3)}${extra}`),
    ...spans.flatMap((sp, i) => (i ? [" ", sp] : [sp])));
}

function examplesBlock(result, title) {
  if (!result || !result.examples.length) return null;
  const scale = Math.max(result.stats ? Math.abs(result.stats.max) : 0,
    ...result.examples.map((e) => Math.max(...e.activations.map(Math.abs))), 1e-9);
  return h("div", {class: "examples"}, h("h3", {}, title),
    ...result.examples.map((e) => exampleLine(e, scale)));
}

/** A [query, key] attention pattern as a canvas heatmap; hover shows the weight. */
function heatmap(att, {highlight} = {}) {
  if (!att.pattern) {
    return h("table", {}, h("tr", {}, h("th", {}, "query"), h("th", {}, "top keys")),
      att.queries.map((q) => h("tr", {}, h("td", {class: "mono"}, `${q.position} ${q.token}`),
        h("td", {class: "mono"}, q.top_keys.map((k) => `${k.position} ${k.token} ${fmt(k.weight, 2)}`).join(", ")))));
  }
  const n = att.tokens.length, cell = Math.max(10, Math.min(26, Math.floor(520 / n)));
  const label = (i) => `${i} ${att.tokens[i]}`.slice(0, 16);
  const probe = document.createElement("canvas").getContext("2d");
  probe.font = "11px ui-monospace, Menlo, monospace";
  const margin = Math.ceil(Math.max(...att.tokens.map((t, i) => probe.measureText(label(i)).width))) + 10;
  const W = margin + n * cell + 4, H = margin + n * cell + 4, dpr = window.devicePixelRatio || 1;
  const canvas = h("canvas", {class: "heatmap", width: W * dpr, height: H * dpr, style: `width:${W}px;height:${H}px`,
    dataset: {head: att.head}});
  const ctx = canvas.getContext("2d");
  ctx.scale(dpr, dpr);
  ctx.fillStyle = "white";
  ctx.fillRect(0, 0, W, H);
  for (let q = 0; q < n; q++) {
    for (let k = 0; k < n; k++) {
      const p = Math.max(0, Math.min(1, att.pattern[q][k]));
      ctx.fillStyle = `rgb(${255 - 225 * p | 0}, ${255 - 160 * p | 0}, ${255 - 40 * p | 0})`;  // pattern_png's colours
      ctx.fillRect(margin + k * cell, margin + q * cell, cell, cell);
    }
  }
  if (highlight !== undefined && highlight !== null) {
    ctx.strokeStyle = "#f59e0b";
    ctx.lineWidth = 2;
    ctx.strokeRect(margin, margin + highlight * cell, n * cell, cell);
  }
  ctx.fillStyle = "#111827";
  ctx.font = "11px ui-monospace, Menlo, monospace";
  ctx.textBaseline = "middle";
  for (let i = 0; i < n; i++) {
    ctx.textAlign = "right";
    ctx.fillText(label(i), margin - 4, margin + i * cell + cell / 2);
    ctx.save();
    ctx.translate(margin + i * cell + cell / 2, margin - 4);
    ctx.rotate(-Math.PI / 2);
    ctx.textAlign = "left";
    ctx.fillText(label(i), 0, 0);
    ctx.restore();
  }
  canvas.addEventListener("mousemove", (ev) => {
    const r = canvas.getBoundingClientRect();
    const k = Math.floor((ev.clientX - r.left - margin) / cell), q = Math.floor((ev.clientY - r.top - margin) / cell);
    if (q >= 0 && q < n && k >= 0 && k < n) {
      showTip(ev, `query ${q} ${JSON.stringify(att.tokens[q])} → key ${k} ${JSON.stringify(att.tokens[k])}: ` +
        fmt(att.pattern[q][k], 4));
    } else hideTip();
  });
  canvas.addEventListener("mouseleave", hideTip);
  return h("div", {}, h("div", {class: "muted"}, `${att.head}: rows = queries, columns = keys (white 0, blue 1)`),
    canvas);
}

// ------------------------------------------------------------------ model page
async function modelPage(app) {
  const d = await api("/api/model");
  const sp = d.info.spec;
  document.title = `${d.info.name} — tdb-agent`;
  const grid = h("div", {class: "grid"});
  for (let l = 0; l < sp.n_layers; l++) {
    const heads = Array.from({length: sp.n_heads}, (_, i) => `L${l}.H${i}`);
    grid.append(h("div", {class: "row"}, h("span", {class: "lab"}, `L${l}`),
      ...heads.concat([`L${l}.ATTN`, `L${l}.MLP`, `L${l}.N0`]).map((id) => h("a", {href: componentHref(id)}, id))));
  }
  grid.append(h("div", {class: "row"}, h("span", {class: "lab"}, ""), h("a", {href: componentHref("EMB")}, "EMB"),
    h("a", {href: componentHref("LOGITS")}, "LOGITS")));
  const explore = (ex) => "/prompt?" + new URLSearchParams({prompt: ex.prompt, target: ex.target,
    distractor: ex.distractor || "", corrupted: ex.corrupted_prompt || ""});
  fill(app, 
    h("h1", {}, d.info.name),
    h("p", {class: "muted"}, `${sp.architecture}: ${sp.n_layers} layers × ${sp.n_heads} heads, d_model ${sp.d_model}, ` +
      `${d.info.n_params.toLocaleString()} parameters on ${d.info.device} (${d.info.dtype})`),
    h("div", {class: "cols"},
      h("div", {}, h("h2", {}, "Architecture"), kvTable([
        ["family", sp.family], ["layers", sp.n_layers], ["heads (kv heads)", `${sp.n_heads} (${sp.n_kv_heads})`],
        ["d_model / d_head / d_mlp", `${sp.d_model} / ${sp.d_head} / ${sp.d_mlp}`], ["vocabulary", sp.vocab_size],
        ["context", sp.n_ctx], ["norm", sp.norm], ["hook sites", d.info.hook_sites],
        ["components", Object.entries(d.info.n_components).map(([k, v]) => `${v} ${k}`).join(", ")]])),
      h("div", {}, h("h2", {}, "SAEs and datasets"),
        d.info.saes.length ? h("ul", {}, d.info.saes.map((x) => h("li", {class: "mono"}, x))) : h("p", {class: "muted"}, "no SAEs"),
        d.info.datasets.length ? h("p", {}, "activation dataset: ", h("code", {}, d.info.datasets.join(", ")))
          : h("p", {class: "muted"}, "no activation dataset (component pages show weights only)"),
        h("p", {class: "muted mono"}, d.info.component_ids))),
    h("h2", {}, "Components"), grid,
    h("h2", {}, "Runs"),
    d.runs.length ? sortableTable([
      {key: "name", label: "run", render: (r) => h("a", {href: "/run/" + encodeURIComponent(r.name)}, r.name)},
      {key: "task", label: "task", render: (r) => r.task || "—"}, {key: "planner", label: "planner", render: (r) => r.planner || "—"},
      {key: "faithfulness", label: "faithfulness", num: true}, {key: "n_nodes", label: "nodes", num: true, render: (r) => String(r.n_nodes)},
      {key: "tool_calls", label: "tool calls", num: true, render: (r) => String(r.tool_calls)}], d.runs)
      : h("p", {class: "muted"}, "no run folders (tdb-agent discover --task ioi --out runs/ioi; tdb-agent view runs/ioi)"),
    d.circuits.length ? h("div", {}, h("h2", {}, "Circuits of this session"),
      h("ul", {}, d.circuits.map((c) => h("li", {}, h("a", {href: "/circuit/" + encodeURIComponent(c.name)}, c.name),
        ` ${c.nodes} nodes, ${c.edges} edges`)))) : null,
    d.graphs && d.graphs.length ? h("div", {}, h("h2", {}, "Attribution graphs"),
      h("ul", {}, d.graphs.map((n) => h("li", {}, h("a", {href: "/graph/" + encodeURIComponent(n)}, n))))) : null,
    h("h2", {}, "Tasks"),
    ...d.tasks.tasks.map((t) => h("div", {class: "card"}, h("b", {}, t.name), ` (${t.metric}) `,
      h("span", {class: "muted"}, t.description),
      h("ul", {}, t.examples.map((ex) => h("li", {}, h("code", {}, ex.prompt), ` → ${ex.target}`,
        ex.distractor ? ` vs ${ex.distractor} ` : " ", h("a", {href: explore(ex), class: "explore"}, "explore")))))),
  );
}

// ------------------------------------------------------------------ component page
function componentBody(d, {compact} = {}) {
  const p = d.page, sec = p.sections || {};
  const out = [];
  const ex = sec.explanation;
  if (ex) {
    out.push(h("div", {class: "card explanation"}, h("div", {}, h("b", {}, "Explanation: "), ex.explanation),
      h("div", {class: "muted"}, "simulation score ", h("b", {class: "score"}, fmt(ex.score, 3)), ` (${ex.method})`)));
  }
  const top = sec.top_examples;
  if (top && top.stats) {
    out.push(h("div", {class: "stats"}, h("span", {class: "pill"}, `mean ${fmt(top.stats.mean)}`),
      h("span", {class: "pill"}, `max ${fmt(top.stats.max)}`),
      h("span", {class: "pill"}, `active ${(100 * top.stats.frac_active).toFixed(1)}% of tokens`),
      h("span", {class: "muted"}, ` dataset ${top.dataset}`)));
  }
  out.push(examplesBlock(top, "Top examples"));
  if (!compact) out.push(examplesBlock(d.random, "Random examples"));
  if (d.attention) {
    out.push(h("h3", {}, "Attention pattern on the top example"), heatmap(d.attention, {highlight: d.attention_query}));
  }
  if (!compact && p.weights.length) {
    out.push(h("h3", {}, "Weights"), h("table", {},
      h("tr", {}, ["matrix", "norm", "layer mean", "rank in layer", "bias norm"].map((x) => h("th", {}, x))),
      p.weights.map((w) => h("tr", {}, h("td", {class: "mono"}, w.matrix), h("td", {class: "num"}, fmt(w.norm)),
        h("td", {class: "num"}, fmt(w.layer_mean_norm)),
        h("td", {class: "num"}, w.rank_in_layer == null ? "—" : `${w.rank_in_layer} of ${w.units_in_layer}`),
        h("td", {class: "num"}, fmt(w.bias_norm))))));
    for (const w of p.weights) {
      if (w.promotes) {
        out.push(h("p", {}, h("b", {}, "promotes: "), w.promotes.map((t) => `${t.token} (${fmt(t.score, 2)})`).join(", "),
          h("br"), h("b", {}, "suppresses: "), w.suppresses.map((t) => `${t.token} (${fmt(t.score, 2)})`).join(", ")));
      }
    }
  }
  if (!sec.top_examples) {
    out.push(h("p", {class: "muted"}, "No dataset examples for this kind of component (datasets cover heads, " +
      "neurons and SAE latents)" + (compact ? "; its page shows its weights." : ".")));
  }
  return out.filter(Boolean);
}

async function componentPage(app, id) {
  const d = await api("/api/component/" + encodeURIComponent(id));
  const p = d.page;
  document.title = `${p.id} — tdb-agent`;
  const nav = [];
  if (p.kind === "head" || p.kind === "neuron") {
    const unit = p.kind === "head" ? "H" : "N";
    if (p.index > 0) nav.push(componentLink(`L${p.layer}.${unit}${p.index - 1}`));
    nav.push(componentLink(`L${p.layer}.${unit}${p.index + 1}`));
  }
  fill(app, 
    h("h1", {class: "component-id"}, p.id),
    h("p", {class: "muted"}, `${p.kind}`, p.layer != null ? ` in layer ${p.layer}` : "",
      p.hook_site ? ` · reads ${p.hook_site}` : "", nav.length ? " · neighbours " : "", ...nav.flatMap((a) => [a, " "])),
    ...componentBody(d),
    p.related_tools.length ? h("p", {class: "muted"}, "MCP tools for it: ", p.related_tools.join(", ")) : null,
  );
}

// ------------------------------------------------------------------ prompt explorer
async function promptPage(app) {
  const q = new URLSearchParams(location.search);
  const info = await api("/api/model");
  const sp = info.info.spec;
  const heads = [];
  for (let l = 0; l < sp.n_layers; l++) for (let i = 0; i < sp.n_heads; i++) heads.push(`L${l}.H${i}`);
  const field = (name, value, textarea) => textarea
    ? h("textarea", {name, id: "f-" + name}, value || "")
    : h("input", {type: "text", name, id: "f-" + name, value: value || ""});
  const kinds = (q.get("kinds") || "head,neuron,mlp").split(",");
  const form = h("form", {class: "explorer", id: "explorer"},
    h("label", {for: "f-prompt"}, "prompt"), field("prompt", q.get("prompt"), true),
    h("label", {for: "f-target"}, "target"), field("target", q.get("target")),
    h("label", {for: "f-distractor"}, "distractor"), field("distractor", q.get("distractor")),
    h("label", {for: "f-corrupted"}, "corrupted prompt"), field("corrupted", q.get("corrupted")),
    h("label", {}, "attribution"), h("div", {},
      h("select", {name: "method", id: "f-method"}, ["direct_effect", "act_times_grad"].map((m) =>
        h("option", {value: m, selected: q.get("method") === m}, m))), " kinds ",
      ["head", "neuron", "mlp", "attn", "emb", "sae"].map((k) => h("label", {},
        h("input", {type: "checkbox", name: "kind", value: k, checked: kinds.includes(k)}), k + " ")),
      " · ablation mode ",
      h("select", {name: "mode", id: "f-mode"}, ["zero", "mean", "resample"].map((m) =>
        h("option", {value: m, selected: q.get("mode") === m}, m)))),
    h("span"), h("div", {}, h("button", {type: "submit", id: "run"}, "Run"),
      h("span", {class: "muted"}, "  the prediction, the attribution of the metric, and a head's attention")));
  const out = h("div", {id: "results"});
  fill(app, h("h1", {}, "Prompt explorer"),
    h("p", {class: "muted"}, "Why does the model say the target rather than the distractor? Tick components in " +
      "the attribution table to ablate them together and watch the metric."), form, out);

  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const f = new FormData(form);
    const params = {prompt: f.get("prompt"), target: f.get("target"), distractor: f.get("distractor"),
      corrupted: f.get("corrupted"), method: f.get("method"), mode: f.get("mode"), kinds: f.getAll("kind").join(",")};
    history.replaceState(null, "", "/prompt?" + new URLSearchParams(params));
    explore(params, out, heads, info.limits).catch((e) => fill(out, errorBox(e)));
  });
  if (q.get("prompt") && q.get("target")) form.requestSubmit();
}

async function explore(p, out, heads, limits) {
  fill(out, h("p", {class: "muted"}, "running…"));
  const base = {prompt: p.prompt, target: p.target, distractor: p.distractor || null};
  const corrupted = p.corrupted || null;
  const pred = await api("/api/predict", {prompt: p.prompt, target: p.target, distractor: p.distractor || null,
    top_k: Math.min(10, limits.max_top_k)});
  const attr = await api("/api/attribute", {...base, method: p.method, corrupted_prompt: corrupted,
    kinds: p.kinds ? p.kinds.split(",") : null, top_k: Math.min(40, limits.max_top_k)});
  const m = pred.metric;
  const ablated = new Set();
  const metricAfter = h("span", {class: "big", id: "metric-after"}, "—");
  const metricDelta = h("span", {class: "big", id: "metric-delta"}, "");
  const ablationNote = h("span", {class: "muted", id: "ablation-note"}, "no components ablated");
  const topAfter = h("div", {class: "muted", id: "top-after"});
  let seq = 0;

  async function reAblate() {
    const mine = ++seq;
    table.querySelectorAll("tbody tr").forEach((tr) => tr.classList.toggle("ablated", ablated.has(tr.dataset.id)));
    if (!ablated.size) {
      metricAfter.textContent = "—";
      metricDelta.textContent = "";
      ablationNote.textContent = "no components ablated";
      topAfter.textContent = "";
      return;
    }
    ablationNote.textContent = "ablating…";
    try {
      const r = await api("/api/ablate", {...base, components: [...ablated], mode: p.mode, corrupted_prompt: corrupted});
      if (mine !== seq) return;
      metricAfter.textContent = fmt(r.after, 4);
      metricAfter.dataset.value = r.after;
      metricDelta.textContent = (r.delta >= 0 ? "+" : "") + fmt(r.delta, 4);
      metricDelta.dataset.value = r.delta;
      metricDelta.className = "big " + (r.delta < 0 ? "delta-neg" : "delta-pos");
      ablationNote.textContent = `${r.mode}-ablated: ${r.components.join(", ")}`;
      topAfter.textContent = "top after: " + r.top_after.map((t) => `${t.token} ${fmt(t.prob, 3)}`).join(", ");
    } catch (e) {
      if (mine === seq) ablationNote.replaceChildren(errorBox(e));
    }
  }

  const topHead = ((attr.rows.find((r) => r.kind === "head") || {}).id || heads[heads.length - 1]).split("@")[0];
  const headSelect = h("select", {id: "head-select"}, heads.map((x) => h("option", {value: x, selected: x === topHead}, x)));
  const attBox = h("div", {id: "attention"});
  async function showAttention() {
    attBox.replaceChildren(h("p", {class: "muted"}, "…"));
    try {
      const att = await api("/api/attention_pattern", {prompt: p.prompt, component: headSelect.value, top_k: 3});
      attBox.replaceChildren(heatmap(att, {highlight: att.tokens.length - 1}));
    } catch (e) { attBox.replaceChildren(errorBox(e)); }
  }
  headSelect.addEventListener("change", showAttention);

  const rows = attr.rows;
  const maxAbs = Math.max(...rows.map((r) => Math.abs(r.effect)), 1e-9);
  const table = sortableTable([
    {key: "ablate", label: "ablate", sort: false, render: (r) => h("input", {type: "checkbox", class: "ablate",
      dataset: {id: r.id}, checked: ablated.has(r.id), title: `ablate ${r.id}`,
      onchange: (ev) => { if (ev.target.checked) ablated.add(r.id); else ablated.delete(r.id); reAblate(); }})},
    {key: "id", label: "component", render: (r) => componentLink(r.id)},
    {key: "kind", label: "kind", render: (r) => r.kind === "head"
      ? h("span", {}, "head ", h("button", {class: "show-pattern", title: `show ${r.id}'s attention pattern below`,
        onclick: () => { headSelect.value = r.id.split("@")[0]; showAttention(); attBox.scrollIntoView(); }}, "pattern"))
      : r.kind},
    {key: "effect", label: "effect", num: true, render: (r) => fmt(r.effect, 4)},
    {key: "share", label: "share", num: true, render: (r) => fmt(r.share, 3)},
    {key: "bar", label: "", sort: false, render: (r) => h("span", {class: "bar",
      style: `width:${(80 * Math.abs(r.effect) / maxAbs).toFixed(1)}px;background:${r.effect >= 0 ? "#2563eb" : "#dc2626"}`})},
  ], rows, {rowAttrs: (r) => ({dataset: {id: r.id}, class: ablated.has(r.id) ? "ablated" : ""})});
  table.id = "attribution";

  fill(out, 
    h("h2", {}, "Prediction"),
    h("div", {class: "cols"},
      h("div", {}, h("table", {id: "prediction"}, h("tr", {}, h("th", {}, "next token"), h("th", {}, "prob"), h("th", {}, "logit")),
        pred.top.map((t) => h("tr", {}, h("td", {class: "mono"}, JSON.stringify(t.token)), h("td", {class: "num"}, fmt(t.prob, 4)),
          h("td", {class: "num"}, fmt(t.logit, 3)))))),
      m ? h("div", {class: "card"},
        h("div", {class: "metricbox"},
          h("div", {}, h("div", {class: "muted"}, m.name), h("span", {class: "big", id: "metric-before",
            dataset: {value: m.value}}, fmt(m.value, 4))),
          h("div", {}, h("div", {class: "muted"}, "with ablation"), metricAfter),
          h("div", {}, h("div", {class: "muted"}, "change"), metricDelta)),
        h("div", {}, ablationNote), topAfter,
        h("div", {class: "muted"}, `p(${m.target}) = ${fmt(m.target_prob, 4)}, rank ${m.target_rank}`)) : null),
    h("h2", {}, `Attribution (${attr.method}${attr.reference ? ", reference " + attr.reference : ""})`),
    h("p", {class: "muted"}, `metric ${fmt(attr.metric, 4)}; ${attr.n_ranked} components ranked, top ${rows.length} shown; ` +
      `sum of all effects ${fmt(attr.total_effect, 4)} + remainder ${fmt(Object.values(attr.remainder).reduce((a, b) => a + b, 0), 4)}` +
      ` = ${fmt(attr.sum_check, 4)}. Click a header to sort, an id to open its page, a box to ablate.`),
    table,
    h("h2", {}, "Attention pattern"), h("div", {}, "head ", headSelect), attBox,
  );
  await showAttention();
}

// ------------------------------------------------------------------ circuits and runs
const ROLE_COLOURS = ["#bfdbfe", "#bbf7d0", "#fde68a", "#fecaca", "#ddd6fe", "#fbcfe8", "#a5f3fc", "#fed7aa"];
const BOX_W = 118, BOX_H = 40, GAP_X = 16, ROW_H = 84, LEFT = 86, TOP = 20;

function drawGraph(view, onSelect) {
  const g = view.graph, nodes = g.nodes, links = g.links || g.edges || [];
  const rowOf = Object.fromEntries(view.rows.map((r) => [r.id, r]));
  const byRow = new Map();
  for (const n of nodes) {
    const r = rowOf[n.id] ? rowOf[n.id].row : 0;
    if (!byRow.has(r)) byRow.set(r, []);
    byRow.get(r).push(n);
  }
  const nRows = Math.max(0, ...byRow.keys()) + 1;
  const widest = Math.max(1, ...[...byRow.values()].map((v) => v.length));
  const W = LEFT + widest * (BOX_W + GAP_X) + GAP_X, H = TOP + nRows * ROW_H;
  const pos = {};
  for (const [r, ns] of byRow) {
    const x0 = LEFT + (widest - ns.length) * (BOX_W + GAP_X) / 2 + GAP_X;
    ns.forEach((n, i) => { pos[n.id] = [x0 + i * (BOX_W + GAP_X), TOP + r * ROW_H]; });
  }
  const roles = [...new Set(nodes.map((n) => n.role).filter(Boolean))];
  const colour = (n) => n.kind === "logits" ? "#fde68a" : n.role ? ROLE_COLOURS[roles.indexOf(n.role) % ROLE_COLOURS.length] : "#f3f4f6";
  const svg = s("svg", {class: "graph", width: W, height: H, viewBox: `0 0 ${W} ${H}`, id: "graph"});
  const labels = new Map(view.rows.map((r) => [r.row, r.label]));
  for (const [r, lab] of labels) {
    svg.append(s("text", {x: 10, y: TOP + r * ROW_H + BOX_H / 2 + 4, "font-size": 12, fill: "#6b7280"}, lab));
  }
  const wmax = Math.max(1e-9, ...links.map((e) => Math.abs(e.weight || 0)));
  const edgeEls = [];
  links.forEach((e, i) => {
    if (!pos[e.source] || !pos[e.target]) return;
    const [xs, ys] = pos[e.source], [xt, yt] = pos[e.target];
    const x1 = xs + BOX_W / 2, x2 = xt + BOX_W / 2, below = ys >= yt;
    const y1 = below ? ys : ys + BOX_H, y2 = below ? yt + BOX_H : yt, my = (y1 + y2) / 2;
    const w = e.weight;
    const col = w == null ? "#9ca3af" : w >= 0 ? "#2b6cb0" : "#c53030";
    const path = s("path", {class: "edge", d: `M${x1},${y1} C${x1},${my} ${x2},${my} ${x2},${y2}`, fill: "none",
      stroke: col, "stroke-width": w == null ? 1 : (1 + 6 * Math.abs(w) / wmax).toFixed(2), "stroke-opacity": 0.7,
      "stroke-dasharray": w == null ? "4 3" : null, "data-source": e.source, "data-target": e.target,
      "data-tip": `${e.source} → ${e.target} via ${e.via || "direct"}, weight ${fmt(w, 4)}`,
      onclick: () => onSelect({edge: e, el: path})});
    edgeEls.push(path);
    svg.append(path);
    if (e.via && e.via !== "direct") svg.append(s("text", {x: (x1 + x2) / 2 + 4, y: my, "font-size": 11, fill: col}, e.via));
  });
  const nodeEls = {};
  for (const n of nodes) {
    const [x, y] = pos[n.id];
    const gEl = s("g", {class: "node", "data-id": n.id, "data-tip": [n.id, n.role, n.explanation].filter(Boolean).join("\n"),
      onclick: () => onSelect({node: n, el: gEl})},
      s("rect", {x, y, width: BOX_W, height: BOX_H, rx: 8, fill: colour(n)}),
      s("text", {x: x + BOX_W / 2, y: y + 17, "font-size": 12, "font-weight": "bold", "text-anchor": "middle"}, n.id),
      n.role ? s("text", {x: x + BOX_W / 2, y: y + 32, "font-size": 10, "text-anchor": "middle", fill: "#374151"},
        n.role.length > 20 ? n.role.slice(0, 19) + "…" : n.role) : null);
    nodeEls[n.id] = gEl;
    svg.append(gEl);
  }
  const legend = h("div", {class: "legend"}, roles.map((r) => h("span", {}, h("i", {style: `background:${colour({role: r})}`}), r)),
    h("span", {}, h("i", {style: "background:#f3f4f6"}), "no role"),
    h("span", {class: "muted"}, "edges: width ∝ |weight|, blue positive, red negative, dashed unmeasured"));
  return {svg, legend, nodeEls, edgeEls};
}

function evidenceList(ev) {
  if (!ev || !ev.length) return h("span", {class: "muted"}, "no evidence recorded");
  return h("ul", {class: "evidence"}, ev.map((e) => h("li", {}, h("code", {}, e.tool || "?"), " ",
    h("span", {class: "mono muted"}, JSON.stringify(e.args || {})), " → ", h("b", {}, typeof e.value === "number" ? fmt(e.value, 4) : JSON.stringify(e.value)),
    e.note ? ` (${e.note})` : "")));
}

async function showNode(detail, n, links) {
  const incoming = links.filter((e) => e.target === n.id), outgoing = links.filter((e) => e.source === n.id);
  const edgeRows = (es) => es.length ? h("table", {}, h("tr", {}, ["source", "target", "via", "weight", "evidence"].map((x) => h("th", {}, x))),
    es.map((e) => h("tr", {}, h("td", {}, componentLink(e.source)), h("td", {}, componentLink(e.target)), h("td", {}, e.via || "direct"),
      h("td", {class: "num"}, fmt(e.weight, 4)), h("td", {}, evidenceList(e.evidence))))) : h("p", {class: "muted"}, "none");
  const page = h("div", {class: "node-page"}, h("p", {class: "muted"}, "loading the component page…"));
  fill(detail, 
    h("h2", {}, h("span", {class: "mono", id: "detail-id"}, n.id), " ",
      h("a", {href: componentHref(n.id), class: "open-page", style: "font-size:13px;font-weight:normal"}, "open its component page →")),
    kvTable([["kind", n.kind], ["role", n.role], ["explanation", n.explanation], ["effect", n.effect == null ? null : fmt(n.effect, 4)],
      ["necessity (faithfulness drop)", n.necessity == null ? null : fmt(n.necessity, 4)]]),
    h("h3", {}, "Evidence for the node"), evidenceList(n.evidence),
    h("h3", {}, "Edges in"), edgeRows(incoming), h("h3", {}, "Edges out"), edgeRows(outgoing),
    h("h3", {}, "Component page"), page);
  try {
    const d = await api("/api/component/" + encodeURIComponent(n.id));
    fill(page, ...componentBody(d, {compact: true}));
  } catch (e) { fill(page, errorBox(e)); }
}

function showEdge(detail, e) {
  fill(detail, h("h2", {}, h("span", {class: "mono"}, `${e.source} → ${e.target}`)),
    kvTable([["via", e.via || "direct"], ["weight", fmt(e.weight, 4)]]),
    h("h3", {}, "Evidence"), evidenceList(e.evidence),
    h("p", {}, componentLink(e.source), " · ", componentLink(e.target)));
}

/** Faithfulness and validation; `middle()` (the graph) goes between the summary and the necessity table. */
function validationBlock(g, middle) {
  const v = g.validation || {}, f = g.faithfulness ?? v.faithfulness;
  const out = [h("div", {class: "cols"},
    h("div", {class: "card"}, h("div", {class: "muted"}, "faithfulness"), h("div", {class: "big", id: "faithfulness"}, fmt(f, 3)),
      h("div", {class: "muted"}, "(m(C) − m(∅)) / (m(full) − m(∅))")),
    kvTable([["behaviour", v.behaviour || JSON.stringify(g.behaviour)], ["metric", v.metric_name || g.metric], ["model", g.model],
      ["ablation", v.mode ? `${v.mode}, ${v.positions}` : null], ["pairs", v.n_pairs],
      ["metric full / empty / circuit", v.metric_full != null ? `${fmt(v.metric_full)} / ${fmt(v.metric_empty)} / ${fmt(v.metric_circuit)}` : null],
      ["kept of universe", v.n_kept != null ? `${v.n_kept} of ${v.n_universe}` : null],
      ["pruned", g.prune ? `${g.prune.method.split(":")[0]} to threshold ${g.prune.threshold}: faithfulness ${fmt(g.prune.start_faithfulness)} → ${fmt(g.prune.faithfulness)}` : null]])),
    ...middle()];
  if (v.necessity && v.necessity.length) {
    out.push(h("h3", {}, "Necessity (faithfulness without each node)"), sortableTable([
      {key: "id", label: "node", render: (r) => componentLink(r.id)},
      {key: "faithfulness_without", label: "faithfulness without", num: true},
      {key: "drop", label: "drop", num: true}], v.necessity, {initial: {key: "drop", dir: -1}}));
  }
  if (v.universe) out.push(h("p", {class: "muted"}, "universe: ", v.universe));
  return out;
}

// transcript.jsonl events: tool_call {tool, arguments, result | error}, message {message: an
// OpenAI chat message}, tool_result {tool, message}, note {text}
const isError = (e) => Boolean(e.is_error || e.error || e.ok === false);

function stepSummary(e) {
  const m = e.message || {};
  if (e.kind === "tool_call") return `${e.tool}${isError(e) ? " (error)" : ""}`;
  if (e.kind === "message") {
    const calls = (m.tool_calls || []).map((c) => c.function && c.function.name).filter(Boolean);
    return `${m.role || "message"}: ` + (calls.length ? "calls " + calls.join(", ") : String(m.content || "").slice(0, 50));
  }
  if (e.kind === "tool_result") return `result of ${e.tool || "?"}`;
  if (e.kind === "note") return `note: ${String(e.text || "").slice(0, 50)}`;
  return e.kind;
}

function transcriptBlock(events, highlight) {
  if (!events.length) return [h("p", {class: "muted"}, "empty transcript")];
  let cur = 0;
  const items = events.map((e, i) => h("li", {class: isError(e) ? "err" : "", value: e.step ?? i, onclick: () => go(i)},
    stepSummary(e), e.seconds != null ? h("span", {class: "muted"}, ` ${fmt(e.seconds, 2)} s`) : null));
  const list = h("ol", {class: "steps", id: "steps"}, items);
  const view = h("div", {class: "stepview", id: "step-view"});
  const counter = h("span", {id: "step-counter"});
  function go(i) {
    cur = Math.max(0, Math.min(events.length - 1, i));
    items.forEach((li, j) => li.classList.toggle("current", j === cur));
    const li = items[cur];  // scroll the list only, never the page
    if (li.offsetTop < list.scrollTop || li.offsetTop + li.offsetHeight > list.scrollTop + list.clientHeight) {
      list.scrollTop = li.offsetTop - list.clientHeight / 2;
    }
    const e = events[cur];
    counter.textContent = `step ${cur + 1} of ${events.length}`;
    const { step, time, kind, tool, arguments: args, result, message, text: note, error, ...rest } = e;
    const text = (x) => { const t = JSON.stringify(x, null, 1); return t.length > 20000 ? t.slice(0, 20000) + "\n…" : t; };
    fill(view, h("h3", {}, `#${step ?? cur} ${kind}${tool ? ": " + tool : ""}`),
      args ? h("div", {}, h("b", {}, "arguments"), h("pre", {class: "json"}, text(args))) : null,
      message && message.content ? h("div", {}, h("b", {}, message.role || "message"), h("pre", {class: "json"}, String(message.content))) : null,
      message && message.tool_calls ? h("div", {}, h("b", {}, "tool calls"), h("pre", {class: "json"}, text(message.tool_calls))) : null,
      note ? h("pre", {class: "json"}, String(note)) : null,
      error ? h("div", {class: "error"}, String(error)) : null,
      result !== undefined ? h("div", {}, h("b", {}, "result"), h("pre", {class: "json"}, text(result))) : null,
      Object.keys(rest).length ? h("pre", {class: "json muted"}, text(rest)) : null);
    highlight(JSON.stringify(args || (message && (message.tool_calls || message.content)) || note || ""));
  }
  const controls = h("div", {class: "stepper"}, h("button", {id: "step-prev", onclick: () => go(cur - 1)}, "◀ previous"),
    h("button", {id: "step-next", onclick: () => go(cur + 1)}, "next ▶"), counter,
    h("span", {class: "muted"}, "  nodes named in the step are outlined in the graph"));
  setTimeout(() => go(0), 0);
  return [controls, h("div", {class: "cols"}, list, view)];
}

async function circuitPage(app, kind, name) {
  const d = await api(`/api/${kind}/` + encodeURIComponent(name));
  const g = d.graph, links = g.links || g.edges || [];
  document.title = `${name} — tdb-agent`;
  const detail = h("div", {id: "detail"}, h("p", {class: "muted"}, "Click a node for its evidence and component page, or an edge for its evidence."));
  let selected = null;
  const {svg, legend, nodeEls} = drawGraph(d, (sel) => {
    if (selected) selected.classList.remove("selected");
    selected = sel.el;
    selected.classList.add("selected");
    if (sel.node) showNode(detail, sel.node, links); else showEdge(detail, sel.edge);
  });
  const highlight = (text) => {
    for (const [id, el] of Object.entries(nodeEls)) {
      const re = new RegExp(`(^|[^\\w.])${id.replace(/\./g, "\\.")}(?![\\w.])`);
      el.classList.toggle("hl", re.test(text));
    }
  };
  const cfg = d.config || null;
  fill(app, 
    h("h1", {}, kind === "run" ? `Run ${name}` : `Circuit ${name}`),
    cfg ? h("p", {class: "muted"}, [cfg.task ? `task ${cfg.task}` : `prompt ${JSON.stringify(cfg.prompt)}`,
      `planner ${cfg.planner}`, cfg.model ? `model ${cfg.model}` : "bundled model", d.path].filter(Boolean).join(" · ")) : null,
    g.graph && g.graph.description ? h("p", {}, g.graph.description) : null,
    ...validationBlock(g.graph || {}, () => [h("h2", {}, "Circuit graph"), legend, h("div", {class: "graphwrap"}, svg, detail)]),
    d.events ? h("h2", {}, "Transcript") : null,
    ...(d.events ? transcriptBlock(d.events, highlight) : []),
    d.report ? h("details", {}, h("summary", {}, "report.md"), h("pre", {class: "json"}, d.report)) : null,
  );
}

// ------------------------------------------------------------------ attribution graphs
// Layers × positions: one row per layer (embeddings at the bottom, the targets on top), one
// column per prompt token; nodes sharing a (layer, position) cell sit side by side.
const AG = {cell: 18, pad: 14, rowH: 46, left: 90, top: 18, bottom: 70};
const isFeature = (n) => n.feature_type === "cross layer transcoder" || n.feature_type === "sae latent";
// circuit-tracer puts the targets at layer n_layers + 1: right above the last layer (row n_layers)
const agRow = (n) => n.layer === "E" ? 0 : n.feature_type === "logit" ? Number(n.layer) : Number(n.layer) + 1;
const agLabel = (n) => n.tdb_id || n.node_id;
const agKind = (n) => isFeature(n) ? "feature" : n.feature_type === "embedding" ? "embedding"
  : n.feature_type === "logit" ? "logit" : "error";

function layoutAttributionGraph(g) {
  const nodes = g.nodes, tokens = (g.metadata && g.metadata.prompt_tokens) || [];
  const nPos = Math.max(tokens.length, 1 + Math.max(0, ...nodes.map((n) => n.ctx_idx)));
  const cells = new Map();
  for (const n of nodes) {
    const key = `${agRow(n)},${n.ctx_idx}`;
    if (!cells.has(key)) cells.set(key, []);
    cells.get(key).push(n);
  }
  const width = new Array(nPos).fill(1);
  for (const [key, ns] of cells) {
    const p = Number(key.split(",")[1]);
    width[p] = Math.max(width[p], ns.length);
  }
  const x0 = [AG.left];
  for (let p = 0; p < nPos; p++) x0.push(x0[p] + width[p] * AG.cell + AG.pad);
  const maxRow = Math.max(1, ...nodes.map(agRow));
  const y = (r) => AG.top + (maxRow - r) * AG.rowH + AG.cell / 2;
  const pos = {};
  for (const [key, ns] of cells) {
    const [r, p] = key.split(",").map(Number);
    ns.sort((a, b) => (b.influence || 0) - (a.influence || 0) || agLabel(a).localeCompare(agLabel(b)));
    const start = x0[p] + (width[p] - ns.length) * AG.cell / 2 + AG.cell / 2;
    ns.forEach((n, i) => { pos[n.node_id] = [start + i * AG.cell, y(r)]; });
  }
  return {pos, x0, width, maxRow, y, nPos, tokens, W: x0[nPos] + AG.pad, H: y(0) + AG.bottom};
}

function drawAttributionGraph(g, onSelect) {
  const L = layoutAttributionGraph(g), links = g.links || [];
  const svg = s("svg", {class: "graph agraph", width: L.W, height: L.H, viewBox: `0 0 ${L.W} ${L.H}`, id: "agraph"});
  for (let r = 0; r <= L.maxRow; r++) {
    const lab = r === 0 ? "embed" : r === L.maxRow && g.nodes.some((n) => agRow(n) === r && n.feature_type === "logit")
      ? "target" : `L${r - 1}`;
    svg.append(s("line", {x1: AG.left - 4, x2: L.W - 4, y1: L.y(r), y2: L.y(r), class: "row-line"}));
    svg.append(s("text", {x: 8, y: L.y(r) + 4, "font-size": 11, fill: "#6b7280"}, lab));
  }
  for (let p = 0; p < L.nPos; p++) {
    const cx = (L.x0[p] + L.x0[p + 1] - AG.pad) / 2, tok = L.tokens[p] === undefined ? "" : String(L.tokens[p]);
    svg.append(s("text", {x: cx, y: L.y(0) + 22, "font-size": 11, "text-anchor": "end", class: "mono",
      transform: `rotate(-40 ${cx} ${L.y(0) + 22})`, "data-tip": `position ${p}: ${JSON.stringify(tok)}`},
      tok.length > 12 ? tok.slice(0, 11) + "…" : tok));
  }
  const wmax = Math.max(1e-12, ...links.map((e) => Math.abs(e.weight)));
  const edgeEls = [];
  for (const e of links) {
    if (!L.pos[e.source] || !L.pos[e.target]) continue;
    const [x1, y1] = L.pos[e.source], [x2, y2] = L.pos[e.target];
    const el = s("line", {x1, y1, x2, y2, class: "edge", stroke: e.weight >= 0 ? "#2b6cb0" : "#c53030",
      "stroke-width": (0.4 + 4 * Math.abs(e.weight) / wmax).toFixed(2), "data-source": e.source, "data-target": e.target});
    edgeEls.push(el);
    svg.append(el);
  }
  const nodeEls = {};
  for (const n of g.nodes) {
    const [x, y] = L.pos[n.node_id], k = agKind(n), r = AG.cell / 2 - 2;
    const shape = k === "feature" ? s("circle", {cx: x, cy: y, r})
      : s("rect", {x: x - r, y: y - r, width: 2 * r, height: 2 * r, rx: k === "error" ? 1 : 4});
    const el = s("g", {class: `node ag-${k}`, "data-id": n.node_id,
      "data-tip": [agLabel(n), n.clerp, n.influence != null ? `influence ${fmt(n.influence)}` : null].filter(Boolean).join("\n"),
      onclick: () => onSelect(n)}, shape);
    nodeEls[n.node_id] = el;
    svg.append(el);
  }
  const legend = h("div", {class: "legend"},
    [["feature", "circle: feature"], ["error", "square: error node"], ["embedding", "embedding"], ["logit", "target"]]
      .map(([k, t]) => h("span", {}, h("i", {class: `ag-${k}`}), t)),
    h("span", {class: "muted"}, "edges: width ∝ |weight|, blue positive, red negative; rows = layers, columns = token positions"));
  return {svg, legend, nodeEls, edgeEls};
}

function showGraphNode(detail, n, g, select) {
  const byId = Object.fromEntries(g.nodes.map((x) => [x.node_id, x]));
  const links = g.links || [];
  const sorted = (es) => es.slice().sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight));
  const edgeTable = (es, end, title) => [h("h3", {}, `${title} (${es.length})`), es.length
    ? h("table", {class: `edges-${title.toLowerCase().replace(/ /g, "-")}`},
      h("tr", {}, h("th", {}, end === "source" ? "from" : "to"), h("th", {}, "weight")),
      sorted(es).map((e) => {
        const other = byId[e[end]];
        return h("tr", {}, h("td", {}, h("a", {href: "#", class: "mono", onclick: (ev) => { ev.preventDefault(); select(other); }},
          agLabel(other))), h("td", {class: "num"}, fmt(e.weight, 4)));
      }))
    : h("p", {class: "muted"}, "none")];
  const tokens = (g.metadata && g.metadata.prompt_tokens) || [];
  const comp = isFeature(n) && n.tdb_id ? n.tdb_id.split("@")[0] : null;
  fill(detail,
    h("h2", {}, h("span", {class: "mono", id: "detail-id"}, agLabel(n))),
    kvTable([["node", h("span", {class: "mono"}, n.node_id)], ["type", n.feature_type], ["layer", n.layer],
      ["position", `${n.ctx_idx} ${JSON.stringify(tokens[n.ctx_idx] === undefined ? "" : tokens[n.ctx_idx])}`],
      ["activation", n.activation == null ? null : fmt(n.activation, 4)],
      ["influence", n.influence == null ? null : fmt(n.influence, 4)],
      ["probability", n.feature_type === "logit" ? fmt(n.token_prob, 4) : null], ["label", n.clerp],
      ["explanation, top examples", comp ? h("a", {href: componentHref(comp), class: "open-page"}, `${comp} component page →`) : null]]),
    ...edgeTable(links.filter((e) => e.target === n.node_id), "source", "Edges in"),
    ...edgeTable(links.filter((e) => e.source === n.node_id), "target", "Edges out"));
}

async function graphPage(app, name) {
  const d = await api("/api/graph/" + encodeURIComponent(name));
  const g = d.graph, meta = g.metadata || {};
  document.title = `graph ${name} — tdb-agent`;
  const detail = h("div", {id: "detail"}, h("p", {class: "muted"}, "Click a node for its incoming and outgoing edges."));
  let selected = null, drawn;
  const select = (n) => {
    if (!n) return;
    if (selected) selected.classList.remove("selected");
    selected = drawn.nodeEls[n.node_id];
    selected.classList.add("selected");
    for (const el of drawn.edgeEls) {
      const on = el.dataset.source === n.node_id || el.dataset.target === n.node_id;
      el.classList.toggle("on", on);
      el.classList.toggle("off", !on);
    }
    showGraphNode(detail, n, g, select);
  };
  drawn = drawAttributionGraph(g, select);
  fill(app,
    h("h1", {}, `Attribution graph ${name}`),
    h("p", {class: "muted"}, [meta.scan ? `model ${meta.scan}` : null, meta.mode, `${g.nodes.length} nodes`,
      `${(g.links || []).length} edges`, d.path].filter(Boolean).join(" · ")),
    meta.prompt ? h("p", {}, "Prompt: ", h("span", {class: "mono"}, JSON.stringify(meta.prompt))) : null,
    kvTable([["replacement score", meta.replacement_score == null ? null : fmt(meta.replacement_score)],
      ["completeness score", meta.completeness_score == null ? null : fmt(meta.completeness_score)]]),
    drawn.legend, h("div", {class: "graphwrap"}, h("div", {class: "agraph-scroll"}, drawn.svg), detail));
}

// ------------------------------------------------------------------ router
async function route() {
  const app = $("#app");
  const path = location.pathname;
  let m;
  try {
    if (path === "/" || path === "") await modelPage(app);
    else if (path === "/prompt") await promptPage(app);
    else if ((m = path.match(/^\/component\/(.+)$/))) await componentPage(app, decodeURIComponent(m[1]));
    else if ((m = path.match(/^\/run\/(.+)$/))) await circuitPage(app, "run", decodeURIComponent(m[1]));
    else if ((m = path.match(/^\/circuit\/(.+)$/))) await circuitPage(app, "circuit", decodeURIComponent(m[1]));
    else if ((m = path.match(/^\/graph\/(.+)$/))) await graphPage(app, decodeURIComponent(m[1]));
    else fill(app, h("p", {}, "No such page. ", h("a", {href: "/"}, "Back to the model.")));
  } catch (e) {
    fill(app, errorBox(e));
  }
  document.body.dataset.ready = "1";  // tests wait for this
}

$("#jump").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const id = $("#jump-id").value.trim();
  if (id) location.href = componentHref(id);
});

route();
