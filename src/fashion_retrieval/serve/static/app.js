"use strict";
const $ = (id) => document.getElementById(id);
let photo = null;

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
  $("drop-text").hidden = true;
  search();
}

async function search() {
  if (!photo) return;
  const params = new URLSearchParams({ k: $("k").value });
  if (!$("attribute-row").hidden) params.set("attribute", $("attribute").value);
  const body = new FormData();
  body.append("image", photo);
  $("error").hidden = true;
  $("summary").textContent = "Searching…";
  const response = await fetch(`/search?${params}`, { method: "POST", body });
  const answer = await response.json();
  if (!response.ok) {
    $("error").textContent = answer.detail || `error ${response.status}`;
    $("error").hidden = false;
    $("summary").textContent = "";
    $("results").replaceChildren();
    return;
  }
  const within = answer.attribute ? ` with the same ${answer.attribute}` : "";
  $("summary").textContent = `${answer.results.length} results${within} in ${answer.took_ms} ms`;
  $("results").replaceChildren(...answer.results.map(card));
}

function card(result) {
  const item = document.createElement("li");
  item.dataset.id = result.id;
  if (result.image_url) {
    const img = document.createElement("img");
    img.src = result.image_url;
    img.alt = result.id;
    img.loading = "lazy";
    item.append(img);
  }
  const score = document.createElement("div");
  score.className = "score";
  score.textContent = `${result.id} · ${result.score.toFixed(3)}`;
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.textContent = Object.entries(result.metadata)
    .filter(([key, value]) => value && typeof value !== "object").map(([, value]) => value).join(" · ");
  item.append(score, meta);
  return item;
}

$("file").addEventListener("change", (event) => choose(event.target.files[0]));
$("attribute").addEventListener("change", search);
$("k").addEventListener("change", search);
const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  choose(event.dataTransfer.files[0]);
});
loadCatalog().catch((error) => { $("status").textContent = `cannot reach the server: ${error}`; });
