"use strict";
const $ = (id) => document.getElementById(id);
let photo = null;
let latest = 0; // only the answer to the newest request is shown, however the answers arrive

async function loadCatalog() {
  const health = await (await fetch("/health")).json();
  const info = await (await fetch("/attributes")).json();
  $("status").textContent = `${health.items} items · model ${health.model || "?"}`;
  if (info.attribute_conditioned) {
    for (const name of info.attributes) $("attribute").add(new Option(name, name));
    $("attribute-row").hidden = false;
  }
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

async function search() {
  if (!photo) return;
  const request = ++latest;
  const params = new URLSearchParams({ k: $("k").value });
  if (!$("attribute-row").hidden) params.set("attribute", $("attribute").value);
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
    const detail = typeof answer.detail === "string" ? answer.detail : `error ${response.status}`;
    showError(detail);
    return;
  }
  const within = answer.attribute ? ` with the same ${answer.attribute}` : "";
  $("summary").textContent = `${answer.results.length} results${within} in ${answer.took_ms} ms`;
  $("results").replaceChildren(...answer.results.map((result) => card(result, answer.attribute)));
}

function describe(metadata, attribute) {
  // the category and the value of the attribute being compared; every attribute in the tooltip
  const value = (v) => (Array.isArray(v) ? v.join(", ") : v);
  const attributes = Object.entries(metadata.attributes || {}).filter(([, v]) => v !== null && v !== "");
  const parts = metadata.category ? [metadata.category] : [];
  const compared = attributes.find(([name]) => name === attribute);
  if (compared) parts.push(`${compared[0]}: ${value(compared[1])}`);
  return { text: parts.join(" · "), all: attributes.map(([name, v]) => `${name}: ${value(v)}`).join("\n") };
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
  score.className = "score";
  score.textContent = `similarity ${result.score.toFixed(3)}`;
  const meta = document.createElement("div");
  meta.className = "meta";
  const description = describe(result.metadata, attribute);
  meta.textContent = description.text;
  if (description.all) item.title = description.all;
  item.append(title, score, meta);
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
loadCatalog().catch((error) => { $("status").textContent = `cannot reach the server: ${error}`; });
