// The embedq console: collections, uploads with live progress (each job's SSE stream), search
// with page thumbnails, and the stack's status. Plain JS against the public API; when keys are
// set, it signs in once (POST /console/session) and the browser then sends an HttpOnly cookie.
"use strict";

const $ = (selector) => document.querySelector(selector);
const state = { collection: null, kind: null };

function element(tag, { dataset = {}, ...props } = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  Object.assign(node.dataset, dataset);
  node.append(...children);
  return node;
}

function notify(message) {
  const box = $("#notice");
  box.textContent = message;
  box.hidden = !message;
}

class SignInNeeded extends Error {}

async function api(path, options = {}) {
  const response = await fetch(path, { credentials: "same-origin", ...options });
  if (response.status === 401) {
    $("#signin").hidden = false;
    $("#api-key").focus();
    throw new SignInNeeded("sign in first");
  }
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      message = (await response.json()).error.message;
    } catch (_) { /* not an error body */ }
    throw new Error(message);
  }
  return response;
}

function guard(work) {
  return async (...args) => {
    try {
      await work(...args);
    } catch (error) {
      if (!(error instanceof SignInNeeded)) notify(error.message);
    }
  };
}

const path = (name) => `/v1/collections/${encodeURIComponent(name)}`;

// Sign-in

$("#signin-form").addEventListener("submit", guard(async (event) => {
  event.preventDefault();
  const input = $("#api-key");
  const response = await fetch("/console/session", {
    method: "POST",
    credentials: "same-origin",
    headers: { Authorization: `Bearer ${input.value}` },
  });
  input.value = "";
  if (!response.ok) {
    notify("That key was not accepted.");
    return;
  }
  notify("");
  $("#signin").hidden = true;
  await refresh();
}));

$("#sign-out").addEventListener("click", guard(async () => {
  await fetch("/console/session", { method: "DELETE", credentials: "same-origin" });
  location.reload();
}));

// Collections

async function loadModels() {
  const models = (await (await api("/v1/models")).json()).data;
  const select = $("#new-model");
  select.replaceChildren(...models.map((m) => element("option", { value: m.id, textContent: m.id })));
}

async function loadCollections() {
  const collections = (await (await api("/v1/collections")).json()).data;
  $("#no-collections").hidden = collections.length > 0;
  $("#collection-table tbody").replaceChildren(...collections.map((c) => {
    const open = element("button", { type: "button", className: "secondary", textContent: "Open" });
    open.setAttribute("aria-label", `Open ${c.name}`);
    open.addEventListener("click", guard(() => openCollection(c.name, c.kind)));
    const drop = element("button", { type: "button", className: "danger", textContent: "Delete" });
    drop.setAttribute("aria-label", `Delete ${c.name}`);
    drop.addEventListener("click", guard(async () => {
      if (!confirm(`Delete collection ${c.name}, its vectors and its page images?`)) return;
      await api(path(c.name), { method: "DELETE" });
      if (state.collection === c.name) closeCollection();
      await loadCollections();
    }));
    return element("tr", { dataset: { name: c.name } },
      element("td", { textContent: c.name }), element("td", { textContent: c.model }),
      element("td", { textContent: c.kind }), element("td", { className: "actions" }, open, " ", drop));
  }));
  if (state.collection && !collections.some((c) => c.name === state.collection)) closeCollection();
}

$("#create-form").addEventListener("submit", guard(async (event) => {
  event.preventDefault();
  const name = $("#new-name").value.trim();
  await api("/v1/collections", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ name, model: $("#new-model").value }),
  });
  $("#new-name").value = "";
  notify("");
  await loadCollections();
  const kind = (await (await api(path(name))).json()).kind;
  await openCollection(name, kind);
}));

function enableWork(enabled) {
  for (const id of ["#file-input", "#query", "#top-k", "#search-button"]) $(id).disabled = !enabled;
}

async function openCollection(name, kind) {
  state.collection = name;
  state.kind = kind;
  $("#current-name").textContent = `in ${name}`;
  $("#pick-hint").hidden = true;
  enableWork(true);
  $("#results").replaceChildren();
  $("#search-summary").textContent = "";
  await loadDocuments();
}

function closeCollection() {
  state.collection = null;
  $("#current-name").textContent = "";
  $("#pick-hint").hidden = false;
  $("#document-table").hidden = true;
  enableWork(false);
}

async function loadDocuments() {
  if (!state.collection) return;
  const name = state.collection;
  const documents = (await (await api(`${path(name)}/documents`)).json()).data;
  $("#document-table").hidden = false;
  $("#document-table tbody").replaceChildren(...documents.map((d) => {
    const drop = element("button", { type: "button", className: "danger", textContent: "Delete" });
    drop.setAttribute("aria-label", `Delete document ${d.filename}`);
    drop.addEventListener("click", guard(async () => {
      if (!confirm(`Delete ${d.filename} from ${name}?`)) return;
      await api(`${path(name)}/documents/${encodeURIComponent(d.doc_id)}`, { method: "DELETE" });
      await loadDocuments();
    }));
    const added = new Date(d.created * 1000).toLocaleString();
    return element("tr", { dataset: { docId: d.doc_id } },
      element("td", { textContent: d.filename }), element("td", { textContent: d.pages ?? `${d.chunks} chunks` }),
      element("td", { textContent: added }), element("td", { className: "actions" }, drop));
  }));
}

// Uploads: one card per job, its bars moved by the job's SSE stream

const zone = $("#drop-zone");
zone.addEventListener("dragover", (event) => {
  event.preventDefault();
  zone.classList.add("over");
});
zone.addEventListener("dragleave", () => zone.classList.remove("over"));
zone.addEventListener("drop", (event) => {
  event.preventDefault();
  zone.classList.remove("over");
  if (state.collection) guard(upload)(event.dataTransfer.files);
});
$("#file-input").addEventListener("change", guard(async (event) => {
  await upload(event.target.files);
  event.target.value = "";
}));

function percent(done, total) {
  return total ? Math.round((100 * done) / total) : 0;
}

async function upload(files) {
  if (!files.length) return;
  const form = new FormData();
  for (const file of files) form.append("files", file);
  const job = await (await api(`${path(state.collection)}/documents`, { method: "POST", body: form })).json();
  followJob(job);
}

function followJob(job) {
  const bar = element("progress", { max: 100, value: 0, id: `job-${job.id}-bar` });
  const label = element("label", { htmlFor: bar.id, textContent: `Job of ${job.files.length} file(s): queued` });
  const cancel = element("button", { type: "button", className: "danger", textContent: "Cancel" });
  const files = job.files.map((file) => {
    const fileBar = element("progress", { max: 100, value: 0, id: `job-${job.id}-file-${file.index}` });
    const fileLabel = element("label", { htmlFor: fileBar.id, textContent: file.filename });
    const error = element("p", { className: "error", hidden: true });
    return { row: element("div", { className: "file" }, fileLabel, fileBar, error), fileBar, fileLabel, error };
  });
  const card = element("div", { className: "job", dataset: { job: job.id } },
    element("div", { className: "job-head" }, label, cancel), bar, ...files.map((f) => f.row));
  $("#jobs").prepend(card);

  let fetching = false;
  let again = false;
  async function showFiles() {
    if (fetching) {
      again = true;
      return;
    }
    fetching = true;
    try {
      const current = await (await api(`/v1/jobs/${job.id}`)).json();
      current.files.forEach((file, index) => {
        const view = files[index];
        const done = (file.processed || 0) + (file.failed || 0) + (file.skipped || 0);
        const ended = ["completed", "failed", "cancelled"].includes(file.status);
        view.fileBar.value = ended ? 100 : percent(done, file.total);
        view.fileBar.classList.toggle("failed", file.status === "failed");
        view.fileLabel.textContent = `${file.filename}: ${file.status}`;
        view.error.hidden = !file.error;
        view.error.textContent = file.error || "";
      });
    } finally {
      fetching = false;
      if (again) {
        again = false;
        showFiles();
      }
    }
  }

  const source = new EventSource(`/v1/jobs/${job.id}/events`);
  const onEvent = (event) => {
    const data = JSON.parse(event.data);
    const final = ["completed", "failed", "cancelled"].includes(event.type);
    const done = data.processed + data.failed + data.skipped;
    bar.value = final ? 100 : percent(done, data.total);
    label.textContent = `Job of ${files.length} file(s): ${data.status}, ${done} of ${data.total || "?"} done`;
    guard(showFiles)();
    if (final) {
      source.close();
      cancel.disabled = true;
      card.dataset.status = event.type;
      guard(loadDocuments)();
    }
  };
  for (const name of ["progress", "waiting", "completed", "failed", "cancelled"]) source.addEventListener(name, onEvent);
  cancel.addEventListener("click", guard(async () => {
    const cancelled = await (await api(`/v1/jobs/${job.id}`, { method: "DELETE" })).json();
    // Its final event follows once the work in flight has drained.
    label.textContent = `Job of ${files.length} file(s): ${cancelled.status}`;
    cancel.disabled = true;
  }));
}

// Search

$("#search-form").addEventListener("submit", guard(async (event) => {
  event.preventDefault();
  const name = state.collection;
  const started = performance.now();
  const found = await (await api(`${path(name)}/search`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ query: $("#query").value, top_k: Number($("#top-k").value) }),
  })).json();
  const seconds = ((performance.now() - started) / 1000).toFixed(2);
  $("#search-summary").textContent = `${found.data.length} result(s) in ${seconds} s`;
  $("#results").replaceChildren(...found.data.map((hit, rank) => {
    const caption = `${hit.filename}, page ${hit.page ?? hit.chunk}, score ${hit.score.toFixed(3)}`;
    if (!hit.image_url) {
      return element("li", { className: "text-hit" }, element("strong", { textContent: caption }),
        element("p", { textContent: hit.text }));
    }
    const open = element("button", { type: "button" },
      element("img", { src: `${hit.image_url}?size=thumb`, alt: `Page ${hit.page} of ${hit.filename}`, loading: "lazy" }),
      element("div", { className: "caption", textContent: `${rank + 1}. ${caption}` }));
    open.addEventListener("click", () => openPage(hit));
    return element("li", {}, open);
  }));
}));

function openPage(hit) {
  $("#viewer-title").textContent = `${hit.filename}, page ${hit.page}`;
  const image = $("#viewer-image");
  image.alt = `Page ${hit.page} of ${hit.filename}, full size`;
  image.src = hit.image_url;
  $("#viewer").showModal();
}

$("#viewer-close").addEventListener("click", () => $("#viewer").close());

// Status: /health/ready and the queue depths of /metrics

async function loadStatus() {
  const ready = await (await fetch("/health/ready")).json(); // 503 while starting, with the same body
  const metrics = await (await api("/metrics")).text();
  const depth = {};
  for (const match of metrics.matchAll(/^embedq_queue_depth\{([^}]*)\} (\S+)$/gm)) {
    const labels = Object.fromEntries([...match[1].matchAll(/(\w+)="([^"]*)"/g)].map((m) => [m[1], m[2]]));
    depth[`${labels.model}/${labels.modality}`] = Number(match[2]);
  }
  const badge = $("#ready");
  badge.textContent = ready.status;
  badge.className = `badge ${ready.status === "ready" ? "ready" : ""}`;
  $("#status-table tbody").replaceChildren(...Object.entries(ready.workers || {}).map(([key, count]) => {
    const [model, modality] = key.split("/");
    return element("tr", {}, element("td", { textContent: model }), element("td", { textContent: modality }),
      element("td", { textContent: count }), element("td", { textContent: depth[key] ?? 0 }));
  }));
  $("#worker-counts").textContent =
    `Ingestion workers: ${ready.ingest_workers ?? 0}. Search workers: ${ready.search_workers ?? 0}.`;
}

async function refresh() {
  await Promise.all([loadModels(), loadCollections(), loadStatus()]);
  const session = await (await fetch("/console/session", { credentials: "same-origin" })).json();
  $("#sign-out").hidden = !session.auth; // signed in: the calls above passed
}

guard(refresh)();
setInterval(guard(loadStatus), 5000);
