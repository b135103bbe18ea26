// dinokit serve: the page talks to the JSON API only; text from the server is set as text, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
let queryUrl = null; // object URL of the current uploaded query, revoked when replaced

function setStatus(el, text, isError = false) {
  el.textContent = text;
  el.classList.toggle("error", isError);
}

async function api(url, options) {
  const response = await fetch(url, options);
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error || message; } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

function basename(path) {
  return path.split(/[\\/]/).pop();
}

function card(item, { onClick, keep = false } = {}) {
  const li = document.createElement("li");
  li.className = "result" + (keep ? " keep" : "");
  li.dataset.id = item.id;
  li.dataset.path = item.path;
  li.tabIndex = 0;
  li.title = `${item.path} (${item.width}×${item.height})`;
  const img = document.createElement("img");
  img.src = item.thumbnail;
  img.alt = basename(item.path);
  img.loading = "lazy";
  const meta = document.createElement("div");
  meta.className = "meta";
  const score = document.createElement("div");
  score.className = "score";
  if (item.selected !== undefined) {
    li.classList.toggle("selected", item.selected > 0);
    score.textContent = item.selected > 0 ? `selected${item.selected > 1 ? ` ×${item.selected}` : ""}` : "not selected";
  } else {
    score.textContent = keep ? "kept" : item.score.toFixed(4);
  }
  const name = document.createElement("div");
  name.className = "name";
  name.textContent = basename(item.path);
  meta.append(score, name);
  li.append(img, meta);
  if (onClick) {
    li.addEventListener("click", () => onClick(item));
    li.addEventListener("keydown", (e) => { if (e.key === "Enter") onClick(item); });
  }
  return li;
}

function showResults(results) {
  const list = $("results");
  list.replaceChildren(...results.map((r) => card(r, { onClick: searchById })));
}

function showQuery(imageUrl, caption, pcaUrl) {
  $("query").hidden = false;
  $("query-image").src = imageUrl;
  $("query-caption").textContent = caption;
  $("query-pca").removeAttribute("src");
  if (pcaUrl) $("query-pca").src = pcaUrl;
}

async function pcaOf(request) {
  try {
    const blob = await (await api(...request)).blob();
    $("query-pca").src = URL.createObjectURL(blob);
  } catch (e) {
    $("query-pca").alt = `PCA picture unavailable: ${e.message}`;
  }
}

async function searchUpload(file) {
  if (!file) return;
  showTab("search");
  if (queryUrl) URL.revokeObjectURL(queryUrl);
  queryUrl = URL.createObjectURL(file);
  showQuery(queryUrl, file.name || "pasted image");
  setStatus($("status"), "searching…");
  const form = new FormData();
  form.append("image", file, file.name || "pasted.png");
  form.append("k", "24");
  const pcaForm = new FormData();
  pcaForm.append("image", file, file.name || "pasted.png");
  pcaOf(["/api/pca", { method: "POST", body: pcaForm }]);
  const started = performance.now();
  try {
    const data = await (await api("/api/search", { method: "POST", body: form })).json();
    showResults(data.results);
    setStatus($("status"), `${data.results.length} results in ${Math.round(performance.now() - started)} ms`);
  } catch (e) {
    $("results").replaceChildren();
    setStatus($("status"), e.message, true);
  }
}

async function searchById(item) {
  showTab("search");
  showQuery(item.image, item.path);
  pcaOf([`/api/pca/${item.id}`]);
  setStatus($("status"), "searching…");
  const started = performance.now();
  try {
    const data = await (await api("/api/search", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ id: item.id, k: 24 }),
    })).json();
    showResults(data.results);
    setStatus($("status"), `${data.results.length} results in ${Math.round(performance.now() - started)} ms`);
    window.scrollTo({ top: 0, behavior: "smooth" });
  } catch (e) {
    setStatus($("status"), e.message, true);
  }
}

async function findDuplicates(event) {
  event.preventDefault();
  const threshold = $("threshold").value;
  setStatus($("dup-status"), "grouping…");
  try {
    const data = await (await api(`/api/duplicates?threshold=${encodeURIComponent(threshold)}`)).json();
    const groups = data.groups.map((g, n) => {
      const box = document.createElement("div");
      box.className = "group";
      const title = document.createElement("h2");
      title.textContent = `group ${n + 1}: keep ${basename(g.keep.path)}, ${g.duplicates.length} duplicate(s)`;
      const list = document.createElement("ol");
      list.className = "grid";
      list.append(card(g.keep, { onClick: searchById, keep: true }),
        ...g.duplicates.map((d) => card(d, { onClick: searchById })));
      box.append(title, list);
      return box;
    });
    $("groups").replaceChildren(...groups);
    setStatus($("dup-status"), `${data.num_groups} group(s), ${data.num_duplicates} duplicate(s) at similarity ≥ ${data.threshold}`);
  } catch (e) {
    setStatus($("dup-status"), e.message, true);
  }
}

const CLUSTER_PAGE = 24;
let clusterOffset = 0;

function clusterBox(level, cluster) {
  const box = document.createElement("div");
  box.className = "group cluster";
  box.dataset.id = cluster.id;
  const title = document.createElement("h2");
  title.textContent = `cluster ${cluster.id}: ${cluster.images} image(s), ${cluster.selected} selected`;
  const list = document.createElement("ol");
  list.className = "grid";
  list.append(...cluster.members.map((m) => card(m, { onClick: searchById })));
  box.append(title, list);
  if (cluster.images > cluster.members.length) {
    const all = document.createElement("button");
    all.type = "button";
    all.textContent = `Show all ${cluster.images}`;
    all.addEventListener("click", async () => {
      try {
        const data = await (await api(`/api/clusters/${level}/${cluster.id}?limit=1000`)).json();
        list.replaceChildren(...data.members.map((m) => card(m, { onClick: searchById })));
        all.remove();
      } catch (e) {
        setStatus($("cluster-status"), e.message, true);
      }
    });
    box.append(all);
  }
  return box;
}

async function loadClusters(more = false) {
  const level = $("cluster-level").value || "1";
  if (!more) clusterOffset = 0;
  setStatus($("cluster-status"), "loading…");
  try {
    const data = await (await api(
      `/api/clusters?level=${encodeURIComponent(level)}&offset=${clusterOffset}&limit=${CLUSTER_PAGE}`)).json();
    const boxes = data.clusters.map((c) => clusterBox(level, c));
    if (more) $("clusters").append(...boxes); else $("clusters").replaceChildren(...boxes);
    clusterOffset += data.clusters.length;
    $("more-clusters").hidden = clusterOffset >= data.num_clusters;
    setStatus($("cluster-status"), `level ${data.level}: ${data.num_clusters} clusters, largest first ` +
      `(${clusterOffset} shown); images framed in green were selected`);
  } catch (e) {
    setStatus($("cluster-status"), e.message, true);
  }
}

function setupClusters(curate) {
  if (!curate) return;
  $("tab-clusters").hidden = false;
  const select = $("cluster-level");
  select.replaceChildren(...curate.levels.map((k, i) => {
    const option = document.createElement("option");
    option.value = String(i + 1);
    option.textContent = `${i + 1} (${k} clusters)`;
    return option;
  }));
  $("cluster-summary").textContent =
    `${curate.output}: ${curate.clustered.toLocaleString()} images clustered, ${curate.selected.toLocaleString()} selected`;
}

function showTab(name) {
  for (const tab of ["search", "duplicates", "clusters"]) {
    const active = tab === name;
    $(`${tab}-view`).hidden = !active;
    $(`tab-${tab}`).classList.toggle("active", active);
    $(`tab-${tab}`).setAttribute("aria-pressed", String(active));
  }
}

function firstImage(items) {
  for (const item of items || []) {
    if (item.kind === "file" && item.type.startsWith("image/")) return item.getAsFile();
  }
  return null;
}

async function init() {
  $("tab-search").addEventListener("click", () => showTab("search"));
  $("tab-duplicates").addEventListener("click", () => showTab("duplicates"));
  $("dup-form").addEventListener("submit", findDuplicates);
  $("tab-clusters").addEventListener("click", () => {
    showTab("clusters");
    if (!$("clusters").children.length) loadClusters();
  });
  $("cluster-level").addEventListener("change", () => loadClusters());
  $("cluster-form").addEventListener("submit", (e) => { e.preventDefault(); loadClusters(); });
  $("more-clusters").addEventListener("click", () => loadClusters(true));
  $("file").addEventListener("change", (e) => searchUpload(e.target.files[0]));

  const drop = $("drop");
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("file").click(); });
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    searchUpload(e.dataTransfer.files[0] || firstImage(e.dataTransfer.items));
  });
  document.addEventListener("paste", (e) => {
    const file = firstImage(e.clipboardData && e.clipboardData.items);
    if (file) { e.preventDefault(); searchUpload(file); }
  });

  try {
    const info = await (await api("/api/health")).json();
    $("collection").textContent =
      `${info.images.toLocaleString()} images · ${info.dim}-d ${info.pooling} · ${info.model || "model"} · index: ${info.index}`;
    setupClusters(info.curate);
  } catch (e) {
    setStatus($("collection"), `server unavailable: ${e.message}`, true);
  }
}

init();
