// The gallery's upload box: posts the chosen image to v1/search and shows the copies found.
// Served as /gallery.js (the page's Content-Security-Policy allows only its own scripts).
"use strict";

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const c of children) node.append(c);
  return node;
}

function baseName(path) {
  return (path || "").replace(/\/+$/, "").split("/").pop() || path || "";
}

// Renders a SearchResponse (or an error body) into the results box.
function showResults(box, reply, ok) {
  box.replaceChildren();
  box.hidden = false;
  if (!ok) {
    box.append(el("h2", {}, "Search failed"), el("p", {class: "error"}, `${reply.error || "error"}: ${reply.detail || ""}`));
    return;
  }
  const n = reply.matches.length;
  box.append(el("h2", {}, n ? `${n} cop${n === 1 ? "y" : "ies"} found` : "No copy found among the indexed images"));
  const grid = el("div", {class: "grid"});
  for (const m of reply.matches) {
    const img = el("img", {src: `v1/images/${m.image_id}/thumbnail`, alt: m.path || String(m.image_id), loading: "lazy"});
    const link = el("a", {class: "full", href: `v1/images/${m.image_id}/file`, target: "_blank", rel: "noopener"}, img);
    const where = m.cluster_id === null ? "no cluster" : `cluster ${m.cluster_id}`;
    const caption = el("figcaption", {}, baseName(m.path), el("br"), `${m.kind}, ${m.inliers} inliers, ${where}`);
    if (m.cluster_id !== null && document.getElementById(`cluster-${m.cluster_id}`)) {
      caption.append(" ", el("a", {href: `#cluster-${m.cluster_id}`}, "show"));
    }
    grid.append(el("figure", {class: "thumb match", title: m.path || ""}, link, caption));
  }
  box.append(grid);
}

async function search(form, box) {
  const status = form.querySelector(".status");
  const file = form.elements.image.files[0];
  if (!file) return;
  const body = new FormData();
  body.append("image", file);
  const headers = {};
  const token = form.elements.token;
  if (token && token.value) headers.Authorization = `Bearer ${token.value}`;
  status.textContent = "searching…";
  try {
    const resp = await fetch(form.getAttribute("action"), {method: "POST", body, headers});
    showResults(box, await resp.json(), resp.ok);
    status.textContent = "";
  } catch (err) {
    status.textContent = `search failed: ${err}`;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("search");
  const box = document.getElementById("results");
  if (!form || !box) return;
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    search(form, box);
  });
});

window.memetraceGallery = {showResults};
