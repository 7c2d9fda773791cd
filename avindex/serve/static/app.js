// The search page: upload a query or ask for "more like this", show the hits (frames for
// picture results, playable sounds with spectrograms for sound results), play a hit's video
// from its start time. Plain DOM code over the JSON API; no build step, nothing from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { file: null, k: 12 };

// Which kind of query a file is, from its type or, when the browser does not know it, its name.
function guessKind(file) {
  const type = file.type || "";
  if (type.startsWith("image/")) return "image";
  if (type.startsWith("video/")) return "video";
  if (type.startsWith("audio/")) return "audio";
  const ext = (file.name.split(".").pop() || "").toLowerCase();
  if (["png", "jpg", "jpeg", "webp", "gif", "bmp", "tif", "tiff"].includes(ext)) return "image";
  if (["mp4", "mkv", "webm", "mov", "avi", "m4v"].includes(ext)) return "video";
  return "audio";
}

function setStatus(text, isError = false) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

function seconds(t) {
  return `${Number(t).toFixed(t % 1 ? 1 : 0)} s`;
}

async function api(url, options = {}) {
  const response = await fetch(url, options);
  const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

async function loadFacts() {
  try {
    const info = await api("/api/info");
    const recall = Object.entries(info.indexes)
      .map(([m, e]) => `${m} ${e.factory} (recall ${Object.values(e.recall).map((r) => r.toFixed(2)).join("/")})`)
      .join(", ");
    $("facts").textContent =
      `${info.clips} clips of ${info.videos} videos · model ${info.model.source} ` +
      `(${info.model.head}, width ${info.model.width}) · ${recall}`;
    $("notes").replaceChildren(...info.notes.map((n) => Object.assign(document.createElement("li"), { textContent: n })));
    state.k = info.limits.k;
    $("k").value = info.limits.k;
    $("k").max = info.limits.max_k;
  } catch (err) {
    $("facts").textContent = err.message;
    $("facts").classList.add("error");
  }
}

function showKindOptions() {
  const video = $("kind").value === "video";
  document.querySelectorAll(".video-only").forEach((el) => el.classList.toggle("off", !video));
  const preview = $("preview");
  if (video && state.file && !preview.src) preview.src = URL.createObjectURL(state.file);
  preview.hidden = !video || !state.file;
}

function chooseFile(file) {
  if (!file) return;
  state.file = file;
  $("kind").value = guessKind(file);
  $("at").value = 0;
  const preview = $("preview");
  if (preview.src) {
    URL.revokeObjectURL(preview.src);
    preview.removeAttribute("src");
  }
  showKindOptions();
  $("search").disabled = false;
  searchUpload();
}

function showQueryPicture(src, caption, spectrogram) {
  const figure = $("query-picture");
  figure.hidden = !src;
  figure.classList.toggle("spectrogram", spectrogram);
  if (!src) return;
  figure.querySelector("img").src = src;
  figure.querySelector("img").alt = caption;
  figure.querySelector("figcaption").textContent = caption;
}

async function searchUpload() {
  if (!state.file) return;
  const form = new FormData();
  const kind = $("kind").value;
  form.append("file", state.file, state.file.name);
  form.append("kind", kind);
  if (kind === "video") {
    form.append("at", $("at").value || "0");
    form.append("by", $("by").value);
  }
  if ($("in").value) form.append("in", $("in").value);
  form.append("k", $("k").value);
  form.append("picture", "true");
  await run(`searching with ${state.file.name}…`, () => api("/api/search", { method: "POST", body: form }));
}

async function searchSimilar(hit, modality) {
  const params = new URLSearchParams({ by: modality, in: modality, k: $("k").value });
  await run(`finding more like clip ${hit.clip}…`, () => api(`${hit.similar_url}?${params}`));
}

async function run(message, request) {
  setStatus(message);
  document.body.classList.add("busy");
  try {
    const result = await request();
    render(result);
  } catch (err) {
    setStatus(err.message, true);
  } finally {
    document.body.classList.remove("busy");
  }
}

function render(result) {
  const q = result.query;
  const what = q.kind === "clip" ? `${q.name} (${q.clip.video.name} at ${seconds(q.clip.t0)})` : q.name;
  const sound = q.by === "audio";
  if (q.clip) {
    const src = sound ? q.clip.spectrogram_url : q.clip.frame_url;
    showQueryPicture(src, `query: ${what}, its ${sound ? "sound" : "picture"}`, sound);
  } else {
    showQueryPicture(result.picture, `query: ${what} (${sound ? "its spectrogram" : "what the model saw"})`, sound);
  }
  const sounds = q.searched === "audio";
  $("results-title").textContent = `${result.hits.length} ${sounds ? "sounds" : "pictures"} for ${what}`;
  setStatus(`${result.hits.length} results in ${result.seconds.toFixed(2)} s`);
  const container = document.createElement(sounds ? "ol" : "div");
  container.className = sounds ? "list" : "grid";
  container.replaceChildren(...result.hits.map((hit) => (sounds ? soundHit(hit) : pictureHit(hit))));
  $("hits").replaceChildren(container);
}

function hitMeta(hit) {
  const meta = document.createElement("p");
  meta.className = "meta";
  meta.innerHTML = '<span class="score"></span> <span class="name"></span> <span class="time"></span>';
  meta.querySelector(".score").textContent = hit.score.toFixed(3);
  meta.querySelector(".name").textContent = hit.video.name;
  meta.querySelector(".time").textContent = `at ${seconds(hit.t0)}`;
  if (!hit.has_audio) meta.append(" (no sound)");
  return meta;
}

function similarButton(hit, modality) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "similar";
  button.textContent = "More like this";
  button.addEventListener("click", (event) => {
    event.stopPropagation();
    searchSimilar(hit, modality);
  });
  return button;
}

// A result is one focusable element: click, Enter or Space plays its video from t0.
function playable(element, hit) {
  element.classList.add("hit");
  element.tabIndex = 0;
  element.dataset.clip = hit.clip;
  element.dataset.t0 = hit.t0;
  element.dataset.video = hit.video.id;
  element.setAttribute("aria-label", `${hit.video.name} at ${seconds(hit.t0)}, score ${hit.score.toFixed(3)}: play`);
  element.addEventListener("click", (event) => {
    if (event.target.closest("button, audio")) return;
    play(hit);
  });
  element.addEventListener("keydown", (event) => {
    if (event.target !== element || (event.key !== "Enter" && event.key !== " ")) return;
    event.preventDefault();
    play(hit);
  });
  return element;
}

function pictureHit(hit) {
  const card = document.createElement("article");
  const img = document.createElement("img");
  img.src = hit.frame_url;
  img.alt = `frame of ${hit.video.name} at ${seconds(hit.t0)}`;
  img.loading = "lazy";
  card.append(img, hitMeta(hit), similarButton(hit, "visual"));
  return playable(card, hit);
}

function soundHit(hit) {
  const row = document.createElement("li");
  const spec = document.createElement("img");
  spec.className = "spectrogram";
  spec.alt = `spectrogram of ${hit.video.name} at ${seconds(hit.t0)}`;
  if (hit.spectrogram_url) spec.src = hit.spectrogram_url;
  const audio = document.createElement("audio");
  audio.controls = true;
  audio.preload = "none";
  if (hit.audio_url) audio.src = hit.audio_url;
  row.append(spec, audio, hitMeta(hit), similarButton(hit, "audio"));
  return playable(row, hit);
}

// Load the hit's video (range requests let the browser fetch only what it needs), seek to the
// clip's start and play with sound.
async function play(hit) {
  const video = $("video");
  $("player").hidden = false;
  $("now-playing").textContent = `${hit.video.name} from ${seconds(hit.t0)}`;
  document.querySelectorAll(".hit.playing").forEach((el) => el.classList.remove("playing"));
  document.querySelector(`.hit[data-clip="${hit.clip}"]`)?.classList.add("playing");
  if (video.dataset.video !== hit.video.id) {
    video.dataset.video = hit.video.id;
    video.src = hit.video_url;
    await new Promise((resolve, reject) => {
      video.addEventListener("loadedmetadata", resolve, { once: true });
      video.addEventListener("error", () => reject(new Error(`cannot play ${hit.video.name}`)), { once: true });
    }).catch((err) => setStatus(err.message, true));
  }
  video.currentTime = hit.t0;
  video.muted = false;
  try {
    await video.play();
  } catch (err) {
    setStatus(`press play: ${err.message}`, true);
  }
  $("player").scrollIntoView({ block: "nearest" });
}

function setUp() {
  const drop = $("drop");
  $("file").addEventListener("change", (event) => chooseFile(event.target.files[0]));
  ["dragenter", "dragover"].forEach((name) =>
    drop.addEventListener(name, (event) => {
      event.preventDefault();
      drop.classList.add("over");
    }),
  );
  ["dragleave", "drop"].forEach((name) => drop.addEventListener(name, () => drop.classList.remove("over")));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    chooseFile(event.dataTransfer.files[0]);
  });
  $("kind").addEventListener("change", showKindOptions);
  // Pausing or scrubbing the preview of a video query picks the moment to search with.
  $("preview").addEventListener("seeked", () => ($("at").value = $("preview").currentTime.toFixed(1)));
  $("preview").addEventListener("pause", () => ($("at").value = $("preview").currentTime.toFixed(1)));
  $("options").addEventListener("submit", (event) => {
    event.preventDefault();
    searchUpload();
  });
  showKindOptions();
  loadFacts();
}

document.addEventListener("DOMContentLoaded", setUp);
