// The episode pages' script: renders the JSON routes with textContent only, so nothing the
// sandboxed code printed can become markup. Served from /web/static (no inline script: see the CSP).
const ROOT = document.getElementById("root");
const MODE = ROOT.dataset.mode, EPISODE = ROOT.dataset.episode || "";
function el(tag, text, cls) { const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text); if (cls) e.className = cls; return e; }
function table(rows, cols) { const t = el("table"), h = el("tr");
  cols.forEach(c => h.appendChild(el("th", c))); t.appendChild(h);
  rows.forEach(r => { const tr = el("tr"); cols.forEach(c => { const td = el("td");
    if (c === "id") { const a = el("a", r[c]); a.href = "/web/episodes/" + encodeURIComponent(r[c]); td.appendChild(a); }
    else td.textContent = r[c] === undefined || r[c] === null ? "" : String(r[c]);
    tr.appendChild(td); }); t.appendChild(tr); }); return t; }
async function renderList(root) {
  const data = await (await fetch("/episodes")).json();
  document.getElementById("title").textContent = `${data.active}/${data.capacity} sessions`;
  // A farm (replicas behind a gateway): each replica's load and capacity, and who holds what.
  const farm = (data.replicas || []).length > 1 || (data.replica && data.replica.replica !== "local");
  const cols = ["id","owner","backend","policy","step_count","last_status","last_exit_code","busy","age_s","idle_s"];
  const parts = [];
  if (farm) { const f = table(data.replicas, ["replica","status","active","capacity"]); f.id = "replicas";
    parts.push(el("h2", `${data.replicas.length} replicas`), f, el("h2", "Episodes")); cols.splice(1, 0, "replica"); }
  parts.push(table(data.episodes, cols));
  root.replaceChildren(...parts);
  if (!data.episodes.length) root.appendChild(el("p", "No live episodes.", "muted"));
}
async function renderDetail(root) {
  const resp = await fetch("/episodes/" + encodeURIComponent(EPISODE));
  if (!resp.ok) { root.replaceChildren(el("p", "Episode " + EPISODE + " is not live.")); return; }
  const data = await resp.json(), k = data.kernel || {}, s = data.summary;
  document.getElementById("title").textContent = "episode " + EPISODE;
  const parts = [el("h2", "State"), table([s], ["backend","policy","step_count","last_status","busy","age_s","idle_s"]),
    el("h2", "Resources"), table([{memory_mb: k.memory_mb, cpu_time_s: k.cpu_time_s,
      processes: k.processes, limits: k.limits}], ["memory_mb","cpu_time_s","processes","limits"]),
    el("h2", "Variables"), table(k.variables || [], ["name","type","repr"]), el("h2", "History")];
  (data.history || []).forEach(h => { const r = h.result || {}, box = el("div", null, "step " + r.status);
    box.appendChild(el("div", `#${h.step}  ${r.status}  exit ${r.exit_code}  ${(r.wall_time_s||0).toFixed(3)} s`, "badge"));
    box.appendChild(el("pre", h.code));
    if (r.stdout) box.appendChild(el("pre", r.stdout));
    if (r.stderr) box.appendChild(el("pre", r.stderr, "muted"));
    if (r.exception && !r.stderr) box.appendChild(el("pre", r.exception.traceback || (r.exception.type + ": " + r.exception.message)));
    parts.push(box); });
  root.replaceChildren(...parts);
}
async function tick() { const root = ROOT;
  try { await (MODE === "list" ? renderList(root) : renderDetail(root)); }
  catch (e) { root.replaceChildren(el("p", "Server unreachable: " + e)); } }
tick(); setInterval(tick, 2000);
