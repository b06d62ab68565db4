"use strict";
const $ = (id) => document.getElementById(id);
let photo = null;
let latest = 0; // only the answer to the newest request is shown, however the answers arrive
let labels = {}; // field or attribute name → what the page calls it ("Base colour" for baseColour)

// What a score means: cosine similarity of two L2-normalised embeddings, in bands. The same
// table draws the legend, so the colours and their explanation cannot drift apart.
const SCORE_BANDS = [
  { min: 0.9, name: "near-identical", css: "band-identical" },
  { min: 0.75, name: "very similar", css: "band-strong" },
  { min: 0.5, name: "similar", css: "band-related" },
  { min: -Infinity, name: "weakly similar", css: "band-weak" },
];
const band = (score) => SCORE_BANDS.find((b) => score >= b.min);
const label = (name) => labels[name] || name;

function drawLegend() {
  $("bands").replaceChildren(...SCORE_BANDS.map((b, i) => {
    const item = document.createElement("li");
    item.className = b.css;
    const upper = i === 0 ? "1.00" : SCORE_BANDS[i - 1].min.toFixed(2);
    item.textContent = b.min === -Infinity ? `below ${upper}: ${b.name}` : `${b.min.toFixed(2)}–${upper}: ${b.name}`;
    return item;
  }));
}

async function loadCatalog() {
  const health = await (await fetch("/health")).json();
  const info = await (await fetch("/attributes")).json();
  const filters = await (await fetch("/filters")).json();
  labels = { ...filters.labels, ...info.labels };
  $("status").textContent = `${health.items} items · model ${health.model || "?"}`;
  if (info.attribute_conditioned) {
    for (const name of info.attributes) $("attribute").add(new Option(label(name), name));
    $("attribute-row").hidden = false;
  }
  // one drop-down per field with a short list of values: category first, then the attributes
  const names = Object.keys(filters.values)
    .filter((name) => Object.keys(filters.values[name]).length > 1 || name === "category")
    .sort((a, b) => (a === "category" ? -1 : b === "category" ? 1 : label(a).localeCompare(label(b))));
  $("filter-fields").replaceChildren(...names.map((name) => filterField(name, filters.values[name])));
  $("filters").hidden = names.length === 0;
}

function filterField(name, counts) {
  const row = document.createElement("label");
  row.append(`${label(name)} `);
  const select = document.createElement("select");
  select.dataset.field = name;
  select.add(new Option("any", ""));
  for (const [value, count] of Object.entries(counts)) select.add(new Option(`${value} (${count})`, value));
  select.addEventListener("change", search);
  row.append(select);
  return row;
}

function choose(file) {
  if (!file) return;
  photo = file;
  $("preview").src = URL.createObjectURL(file);
  $("preview").hidden = false;
  $("drop-text").textContent = "Click or drop another photo to change";
  search();
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  $("summary").textContent = "";
  $("results").replaceChildren();
}

function errorText(answer, status) {
  if (typeof answer.detail === "string") return answer.detail;
  if (Array.isArray(answer.detail) && answer.detail.length) return answer.detail.map((d) => d.msg).join("; ");
  return `error ${status}`;
}

async function search() {
  if (!photo) return;
  const request = ++latest;
  const params = new URLSearchParams({ k: $("k").value });
  if (!$("attribute-row").hidden) params.set("attribute", $("attribute").value);
  const chosen = [...document.querySelectorAll("#filter-fields select")].filter((s) => s.value !== "");
  for (const select of chosen) params.append(select.dataset.field, select.value);
  const body = new FormData();
  body.append("image", photo);
  $("error").hidden = true;
  $("summary").textContent = "Searching…";
  let response, answer;
  try {
    response = await fetch(`/search?${params}`, { method: "POST", body });
    answer = await response.json();
  } catch (error) {
    if (request === latest) showError(response ? `error ${response.status}` : `cannot reach the server (${error})`);
    return;
  }
  if (request !== latest) return;
  if (!response.ok) {
    showError(errorText(answer, response.status));
    return;
  }
  const within = answer.attribute ? ` with the same ${label(answer.attribute).toLowerCase()}` : "";
  const only = chosen.map((s) => `${label(s.dataset.field)}: ${s.value}`).join(", ");
  $("summary").textContent = `${answer.results.length} results${within}${only ? ` among ${only}` : ""} in ${answer.took_ms} ms`;
  $("results").replaceChildren(...answer.results.map((result) => card(result, answer.attribute)));
}

function details(metadata, attribute) {
  // category first, then every attribute; the one being compared is marked
  const value = (v) => (Array.isArray(v) ? v.join(", ") : v);
  const rows = metadata.category ? [["category", metadata.category]] : [];
  for (const [name, v] of Object.entries(metadata.attributes || {})) {
    if (v !== null && v !== "" && !(Array.isArray(v) && v.length === 0)) rows.push([name, value(v)]);
  }
  const list = document.createElement("dl");
  list.className = "attributes";
  for (const [name, v] of rows) {
    const term = document.createElement("dt");
    term.textContent = label(name);
    const description = document.createElement("dd");
    description.textContent = v;
    if (name === attribute) { term.className = "compared"; description.className = "compared"; }
    list.append(term, description);
  }
  return list;
}

function card(result, attribute) {
  const item = document.createElement("li");
  item.dataset.id = result.id;
  if (result.image_url) {
    const img = document.createElement("img");
    img.src = result.image_url;
    img.alt = result.id;
    img.loading = "lazy";
    item.append(img);
  }
  const title = document.createElement("div");
  title.className = "title";
  title.textContent = result.metadata.item_id || result.id;
  const score = document.createElement("div");
  const scoreBand = band(result.score);
  score.className = `score ${scoreBand.css}`;
  score.dataset.band = scoreBand.name;
  score.textContent = `${result.score.toFixed(3)} · ${scoreBand.name}`;
  score.title = "cosine similarity of the embeddings";
  item.append(title, score, details(result.metadata, attribute));
  return item;
}

$("file").addEventListener("change", (event) => choose(event.target.files[0]));
$("attribute").addEventListener("change", search);
$("k").addEventListener("change", search);
const drop = $("drop");
drop.addEventListener("keydown", (event) => {
  if (event.key === "Enter" || event.key === " ") { event.preventDefault(); $("file").click(); }
});
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  choose(event.dataTransfer.files[0]);
});
drawLegend();
loadCatalog().catch((error) => { $("status").textContent = `cannot reach the server: ${error}`; });
