// The episode pages' script. Everything the sandbox produced is rendered with textContent, or as
// an <img> for image/png and image/jpeg (a data: URL) and image/svg+xml (a blob: URL of the text:
// any size, nothing spread on the stack); an image runs no script and loads nothing. HTML and
// JavaScript from the sandbox are shown as text, never parsed. Each output and each step renders
// on its own (a failure shows "[could not render]"): one output never hides what comes after it. Served
// from /web/static (no inline script: see the CSP). The list polls; an episode's page follows the
// server-sent events of /episodes/{id}/events.
const ROOT = document.getElementById("root");
const MODE = ROOT.dataset.mode, EPISODE = ROOT.dataset.episode || "";
const PATH = "/episodes/" + encodeURIComponent(EPISODE);
function el(tag, text, cls) { const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text); if (cls) e.className = cls; return e; }
function table(rows, cols) { const t = el("table"), h = el("tr");
  cols.forEach(c => h.appendChild(el("th", c))); t.appendChild(h);
  rows.forEach(r => { const tr = el("tr"); cols.forEach(c => { const td = el("td");
    if (c === "id" && MODE === "list") { const a = el("a", r[c]); a.href = "/web/episodes/" + encodeURIComponent(r[c]); td.appendChild(a); }
    else td.textContent = r[c] === undefined || r[c] === null ? "" : String(r[c]);
    tr.appendChild(td); }); t.appendChild(tr); }); return t; }
function fmt(x, digits) { return x === null || x === undefined ? "–" : Number(x).toFixed(digits); }

// -- the list of live episodes ---------------------------------------------------------------
async function renderList() {
  const data = await (await fetch("/episodes")).json();
  document.getElementById("title").textContent = `${data.active}/${data.capacity} sessions`;
  // A farm (replicas behind a gateway): each replica's load and capacity, and who holds what.
  const farm = (data.replicas || []).length > 1 || (data.replica && data.replica.replica !== "local");
  const cols = ["id","owner","backend","policy","step_count","last_status","last_exit_code","busy","age_s","idle_s"];
  const parts = [];
  if (farm) { const f = table(data.replicas, ["replica","status","active","capacity"]); f.id = "replicas";
    parts.push(el("h2", `${data.replicas.length} replicas`), f, el("h2", "Episodes")); cols.splice(1, 0, "replica"); }
  parts.push(table(data.episodes, cols));
  ROOT.replaceChildren(...parts);
  if (!data.episodes.length) ROOT.appendChild(el("p", "No live episodes.", "muted"));
}
async function tickList() { try { await renderList(); } catch (e) { ROOT.replaceChildren(el("p", "Server unreachable: " + e)); } }

// -- rich outputs: images only, as images ------------------------------------------------------
const B64 = /^[A-Za-z0-9+/=\s]+$/;
function image(mime, data) {
  const img = el("img", null, "display"); img.alt = mime;
  if (mime === "image/svg+xml") {  // as an image: its scripts never run, nothing it names is loaded
    const text = Array.isArray(data) ? data.join("") : String(data);
    const url = URL.createObjectURL(new Blob([text], {type: "image/svg+xml"}));
    img.onload = img.onerror = () => URL.revokeObjectURL(url);  // decoded (or not): the blob is no longer needed
    img.src = url;
  } else {
    const text = String(data).replace(/\s/g, "");
    if (!B64.test(text)) return el("pre", "[" + mime + ": not base64]", "muted");
    img.src = "data:" + mime + ";base64," + text;
  }
  return img;
}
function guarded(render, what) {  // what render() makes, else a placeholder: never an exception
  try { return render(); } catch (e) { return el("pre", "[could not render " + what + ": " + e + "]", "muted"); }
}
function display(data) {
  for (const mime of ["image/png", "image/jpeg", "image/svg+xml"]) if (data && data[mime]) return image(mime, data[mime]);
  const plain = data && data["text/plain"];  // HTML, JavaScript, markdown: their plain text, as text
  const others = Object.keys(data || {}).filter(k => k !== "text/plain").join(", ");
  return el("pre", (plain ? (Array.isArray(plain) ? plain.join("") : plain) : "") + (others ? `  [${others} not rendered]` : ""), "muted");
}

// -- one episode, live ---------------------------------------------------------------------------
const view = { history: [], samples: [], state: null };
function section(id, title) { const s = el("section"); s.id = id; if (title) s.appendChild(el("h2", title)); return s; }
function layout() {
  const links = el("p");
  for (const [label, suffix] of [["Download notebook (.ipynb)", "/notebook"], ["Download trace (JSONL)", "/trace"]]) {
    const a = el("a", label, "button"); a.href = PATH + suffix; a.download = ""; links.appendChild(a); }
  ROOT.replaceChildren(links, section("state"), section("running", "Running step"), section("timeline", "Steps"),
    section("charts", "Memory and CPU"), section("variables", "Variables"), section("history", "History"));
  const live = el("pre", "", "live"); live.id = "live";
  document.getElementById("running").append(el("div", "idle", "muted"), el("pre", "", "code"), live);
  const canvas = document.createElement("canvas"); canvas.id = "chart"; canvas.width = 720; canvas.height = 180;
  document.getElementById("charts").appendChild(canvas);
}
function renderState(data) {
  const s = data.summary, k = data.kernel || {};
  document.getElementById("title").textContent = "episode " + EPISODE + (s.busy ? " (running)" : "");
  document.getElementById("state").replaceChildren(table([{...s, memory_mb: k.memory_mb, cpu_time_s: fmt(k.cpu_time_s, 2)}],
    ["backend","policy","step_count","last_status","busy","memory_mb","cpu_time_s","age_s"]));
  const vars = document.getElementById("variables"); vars.replaceChildren(el("h2", "Variables"));
  vars.appendChild(el("p", data.snapshot_step ? `after step ${data.snapshot_step} (${data.variables_total} in all)` : "no snapshot yet", "muted"));
  vars.appendChild(table(k.variables || [], ["name","type","len","repr"]));
  const run = document.getElementById("running"), r = data.running;
  run.children[1].textContent = r ? `#${r.step}  running for ${fmt(r.elapsed_s, 1)} s` : "idle";
  run.children[2].textContent = r ? r.code : "";
  if (!r) document.getElementById("live").textContent = "";
  else if (r.output) document.getElementById("live").textContent = (r.output.stdout || "") + (r.output.stderr || "");
  if (data.fresh) { view.history = []; document.getElementById("history").replaceChildren(el("h2", "History")); }
  (data.history || []).forEach(h => { const r = (h && h.result) || {};
    view.history.push({step: h && h.step, status: r.status, wall: r.wall_time_s, peak: r.peak_memory_mb});
    document.getElementById("history").appendChild(guarded(() => step(h), "step " + (h && h.step))); });
  view.samples = data.samples || [];
  guarded(renderTimeline, "the timeline"); guarded(renderChart, "the chart");
}
function step(h) {
  const r = h.result || {}, box = el("div", null, "step " + r.status);
  box.appendChild(el("div", `#${h.step}  ${r.status}  exit ${r.exit_code}  ${fmt(r.wall_time_s, 3)} s` +
    (r.peak_memory_mb ? `  peak ${fmt(r.peak_memory_mb, 1)} MB` : ""), "badge"));
  box.appendChild(el("pre", h.code, "code"));
  if (r.stdout) box.appendChild(el("pre", r.stdout));
  if (r.stderr) box.appendChild(el("pre", r.stderr, "muted"));
  if (r.exception && !r.stderr) box.appendChild(el("pre", r.exception.traceback || (r.exception.type + ": " + r.exception.message)));
  (r.displays || []).forEach(d => box.appendChild(guarded(() => display(d.data), "an output")));
  return box;
}
function renderTimeline() {
  const t = document.getElementById("timeline"); t.replaceChildren(el("h2", "Steps"));
  const bar = el("div", null, "bar"), top = Math.max(0.001, ...view.history.map(h => h.wall || 0));
  view.history.forEach(h => { const b = el("span", h.step, "tick " + h.status);
    b.title = `#${h.step} ${h.status}: ${fmt(h.wall, 3)} s, peak ${fmt(h.peak, 1)} MB`;
    b.style.height = (8 + 40 * (h.wall || 0) / top).toFixed(0) + "px"; bar.appendChild(b); });
  t.appendChild(bar);
}
function renderChart() {
  const c = document.getElementById("chart"), g = c.getContext("2d"), pts = view.samples;
  g.clearRect(0, 0, c.width, c.height);
  if (pts.length < 2) { g.fillStyle = "#777"; g.fillText("no samples yet", 10, 20); return; }
  const t0 = pts[0].t, t1 = pts[pts.length - 1].t || t0 + 1;
  const mem = pts.map(p => p.memory_mb || 0), cpu = pts.map(p => p.cpu_time_s || 0);
  const rate = cpu.map((v, i) => i && pts[i].t > pts[i - 1].t ? Math.max(0, (v - cpu[i - 1]) / (pts[i].t - pts[i - 1].t)) : 0);
  const line = (vals, color, label, row) => { const top = Math.max(...vals, 1e-9);
    g.strokeStyle = color; g.beginPath();
    vals.forEach((v, i) => { const x = 40 + (c.width - 50) * (pts[i].t - t0) / Math.max(1e-9, t1 - t0);
      const y = c.height - 15 - (c.height - 30) * v / top; i ? g.lineTo(x, y) : g.moveTo(x, y); });
    g.stroke(); g.fillStyle = color; g.fillText(`${label} (max ${top.toFixed(2)})`, 45, 12 + 12 * row); };
  line(mem, "#36c", "memory MB", 0); line(rate, "#c63", "CPU cores", 1);
  g.fillStyle = "#777"; g.fillText(`${(t1 - t0).toFixed(1)} s`, c.width - 50, c.height - 2);
}
function appendOutput(data) {
  const live = document.getElementById("live");
  if (data.skipped) live.appendChild(el("span", "[… earlier output not kept …]\n", "muted"));
  data.items.forEach(item => live.appendChild(guarded(() => item.display ? display(item.display) :
    el("span", item.text, item.stream === "stderr" ? "muted" : null), "an output")));
}
function follow() {
  layout();
  const events = new EventSource(PATH + "/events");
  events.addEventListener("state", e => renderState(JSON.parse(e.data)));
  events.addEventListener("output", e => appendOutput(JSON.parse(e.data)));
  events.addEventListener("usage", e => { const u = JSON.parse(e.data), run = document.getElementById("running");
    if (u.elapsed_s !== null) run.children[1].textContent = run.children[1].textContent.replace(/running for [0-9.]+ s/, `running for ${u.elapsed_s} s`);
    if (u.sample && (!view.samples.length || view.samples[view.samples.length - 1].t < u.sample.t)) { view.samples.push(u.sample); renderChart(); } });
  events.addEventListener("end", () => { events.close(); document.getElementById("title").textContent = "episode " + EPISODE + " (closed)"; });
  events.onerror = () => { if (events.readyState === EventSource.CLOSED) ROOT.prepend(el("p",
    "Not following episode " + EPISODE + ": it is not live, or this token already follows too many (close a page, reload).")); };
}
if (MODE === "list") { tickList(); setInterval(tickList, 2000); } else follow();
