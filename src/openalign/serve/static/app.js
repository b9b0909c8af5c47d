// The search page of `openalign serve`: talks to the same server's /knn-service; loads nothing from elsewhere.
"use strict";

const MAX_UPLOAD_BYTES = 8 * 1024 * 1024;
const state = { name: null, modalities: ["image"], latest: 0, shownItem: null };
const byId = (id) => document.getElementById(id);

function setStatus(text, isError = false) {
  byId("status").textContent = text;
  byId("status").classList.toggle("error", isError);
}

function currentModality() {
  const select = byId("modality");
  return select.hidden ? state.modalities[0] : select.value;
}

function resultCount() {
  const count = parseInt(new URLSearchParams(location.search).get("n") || "40", 10);
  return Number.isFinite(count) && count > 0 ? Math.min(count, 1000) : 40;
}

// The address holds the query (text or item id), so a search can be shared; an uploaded image cannot be.
function addressFor(query) {
  const params = new URLSearchParams();
  if (query.text !== undefined) params.set("q", query.text);
  if (query.id !== undefined) params.set("id", String(query.id));
  if (state.modalities.length > 1) params.set("modality", currentModality());
  const count = new URLSearchParams(location.search).get("n");
  if (count) params.set("n", count);
  const text = params.toString();
  return text ? `?${text}` : location.pathname;
}

function showQuery(imageUrl, label) {
  const view = byId("query-view");
  const image = byId("query-image");
  view.hidden = !imageUrl && !label;
  image.hidden = !imageUrl;
  if (imageUrl) image.src = imageUrl;
  else image.removeAttribute("src");
  byId("query-label").textContent = label || "";
  state.shownItem = null;
}

function itemLabel(id, caption) {
  return caption ? `Items like “${caption}” (item ${id})` : `Items like item ${id}`;
}

// An item searched from the address comes without its caption: ask for it, and show it if still relevant.
async function describeItem(id, modality) {
  try {
    const response = await fetch("/metadata", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ ids: [Number(id)], modality, indice_name: state.name }),
    });
    const entries = response.ok ? await response.json() : [];
    const caption = entries.length ? entries[0].metadata.caption : null;
    if (caption && state.shownItem === String(id)) byId("query-label").textContent = itemLabel(id, caption);
  } catch (error) {
    // The label keeps the id alone.
  }
}

function tile(result, rank, modality) {
  const item = document.createElement("li");
  item.className = "tile";
  const link = document.createElement("a");
  link.href = addressFor({ id: result.id });
  link.dataset.id = String(result.id);
  const describedAs = result.caption || result.source || `item ${result.id}`;
  link.title = `search for items like this one (#${rank}, id ${result.id})`;
  const thumb = document.createElement("div");
  thumb.className = "thumb";
  const image = document.createElement("img");
  image.loading = "lazy";
  image.alt = describedAs;
  image.src = result.url;
  image.addEventListener("error", () => {
    const missing = document.createElement("span");
    missing.className = "missing";
    missing.textContent = "no image";
    image.replaceWith(missing);
  });
  thumb.append(image);
  const info = document.createElement("div");
  info.className = "info";
  const rankLabel = document.createElement("span");
  rankLabel.className = "rank";
  rankLabel.textContent = `#${rank}`;
  const similarity = document.createElement("span");
  similarity.className = "similarity";
  similarity.title = "cosine similarity to the query";
  similarity.textContent = `similarity ${result.similarity.toFixed(3)}`;
  const caption = document.createElement("span");
  caption.className = "caption";
  caption.textContent = describedAs;
  info.append(rankLabel, similarity, caption);
  link.append(thumb, info);
  link.addEventListener("click", (event) => {
    if (event.ctrlKey || event.metaKey || event.shiftKey || event.button !== 0) return;  // new tab: the browser's
    event.preventDefault();
    searchItem(result.id, modality, false, result.caption || null);
  });
  item.append(link);
  return item;
}

async function search(body, address, replace = false) {
  const request = ++state.latest;
  const modality = currentModality();
  const payload = { ...body, modality, num_images: resultCount(), indice_name: state.name, deduplicate: false };
  if (address !== null) {
    if (replace) history.replaceState(null, "", address);
    else if (location.search !== address) history.pushState(null, "", address);
  }
  setStatus("Searching…");
  const started = performance.now();
  let results;
  try {
    const response = await fetch("/knn-service", { method: "POST", headers: { "Content-Type": "application/json" },
                                                   body: JSON.stringify(payload) });
    results = await response.json();
    if (!response.ok) throw new Error(results.error || `the server answered ${response.status}`);
  } catch (error) {
    if (request === state.latest) setStatus(`Search failed: ${error.message}`, true);
    return;
  }
  if (request !== state.latest) return;  // a newer search has started
  const list = byId("results");
  list.replaceChildren(...results.map((result, index) => tile(result, index + 1, modality)));
  const milliseconds = Math.round(performance.now() - started);
  setStatus(`${results.length} result${results.length === 1 ? "" : "s"} in ${milliseconds} ms`);
}

function searchText(text, replace = false) {
  byId("query").value = text;
  showQuery(null, "");
  return search({ text }, addressFor({ text }), replace);
}

function searchItem(id, modality, replace = false, caption = null) {
  if (modality && !byId("modality").hidden) byId("modality").value = modality;
  byId("query").value = "";
  showQuery(`/thumbnail/${currentModality()}/${id}`, itemLabel(id, caption));
  state.shownItem = String(id);
  if (!caption) describeItem(id, currentModality());
  window.scrollTo(0, 0);
  return search({ id: Number(id) }, addressFor({ id }), replace);
}

function searchFile(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) return setStatus(`${file.name} is not an image`, true);
  if (file.size > MAX_UPLOAD_BYTES) return setStatus(`${file.name} is larger than 8 MB`, true);
  const reader = new FileReader();
  reader.addEventListener("load", () => {
    byId("query").value = "";
    showQuery(URL.createObjectURL(file), `Images like ${file.name} (an upload is not kept in the address)`);
    search({ image: reader.result }, location.pathname);
  });
  reader.addEventListener("error", () => setStatus(`cannot read ${file.name}`, true));
  reader.readAsDataURL(file);
}

function searchFromAddress(replace = true) {
  const params = new URLSearchParams(location.search);
  const modality = params.get("modality");
  if (modality && state.modalities.includes(modality)) byId("modality").value = modality;
  if (params.get("id") !== null) return searchItem(params.get("id"), modality, replace);
  if (params.get("q")) return searchText(params.get("q"), replace);
  byId("results").replaceChildren();
  showQuery(null, "");
  setStatus("Type a description, or search by an image: choose a file or drop it on the page.");
}

function bindEvents() {
  byId("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = byId("query").value.trim();
    if (text) searchText(text);
  });
  byId("upload").addEventListener("change", (event) => {
    searchFile(event.target.files[0]);
    event.target.value = "";
  });
  byId("upload-label").addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      byId("upload").click();
    }
  });
  byId("modality").addEventListener("change", () => {
    const text = byId("query").value.trim();
    if (text) searchText(text);
  });
  document.addEventListener("keydown", (event) => {
    const typing = ["INPUT", "SELECT", "TEXTAREA"].includes(document.activeElement.tagName);
    if (event.key === "/" && !typing) {
      event.preventDefault();
      byId("query").focus();
    }
  });
  let depth = 0;  // dragenter/dragleave fire for every child element crossed
  document.addEventListener("dragenter", (event) => {
    event.preventDefault();
    depth += 1;
    document.body.classList.add("dragging");
  });
  document.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (depth === 0) document.body.classList.remove("dragging");
  });
  document.addEventListener("dragover", (event) => event.preventDefault());
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    depth = 0;
    document.body.classList.remove("dragging");
    searchFile(event.dataTransfer.files[0]);
  });
  window.addEventListener("popstate", () => searchFromAddress(true));
}

async function start() {
  bindEvents();
  try {
    const health = await (await fetch("/healthz")).json();
    state.name = health.name;
    state.modalities = Object.keys(health.indexes);
    const sizes = state.modalities.map((m) => `${health.indexes[m].vectors.toLocaleString()} ${m}s`);
    byId("collection").textContent = `· ${health.name} (${sizes.join(", ")})`;
    if (!health.model) {
      byId("query").disabled = true;
      byId("upload").disabled = true;
      byId("query").placeholder = "started without a model: click a result to search by it";
    }
  } catch (error) {
    setStatus(`The server does not answer: ${error.message}`, true);
    return;
  }
  const select = byId("modality");
  if (state.modalities.length > 1) {
    for (const modality of state.modalities) {
      const option = document.createElement("option");
      option.value = modality;
      option.textContent = modality === "image" ? "images" : "captions";
      select.append(option);
    }
    select.hidden = false;
  }
  searchFromAddress(true);
}

document.addEventListener("DOMContentLoaded", start);
