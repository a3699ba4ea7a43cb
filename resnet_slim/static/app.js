// Upload one image to /predict; show its preview, the top-3 classes as bars, and the latency.
"use strict";

const maxUploadBytes = Number(document.body.dataset.maxUploadBytes);
const maxUploadMb = document.body.dataset.maxUploadMb;
const input = document.getElementById("file");
const drop = document.getElementById("drop");
const preview = document.getElementById("preview");
const hint = document.getElementById("hint");
const filename = document.getElementById("filename");
const statusLine = document.getElementById("status");
const errorLine = document.getElementById("error");
const predictions = document.getElementById("predictions");
const latency = document.getElementById("latency");

function formatSize(bytes) {
  return bytes < 1024 * 1024 ? `${(bytes / 1024).toFixed(1)} KB` : `${(bytes / 1024 / 1024).toFixed(1)} MB`;
}

function showPreview(file) {
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  hint.hidden = true;
  filename.textContent = `${file.name} · ${formatSize(file.size)}`;
}

// Files the browser cannot draw (TIFF, or not an image at all) keep the drop hint instead.
preview.addEventListener("error", () => {
  preview.hidden = true;
  hint.hidden = false;
});

function clearResults(message) {
  predictions.replaceChildren();
  latency.hidden = true;
  errorLine.hidden = true;
  statusLine.textContent = message;
  statusLine.hidden = !message;
}

function showError(message) {
  clearResults("");
  errorLine.textContent = message;
  errorLine.hidden = false;
}

function predictionRow({ class: name, probability }) {
  // Built with textContent, never innerHTML: class names come from the dataset's folder names.
  const row = document.createElement("li");
  const label = document.createElement("span");
  label.className = "label";
  label.textContent = name;
  const bar = document.createElement("span");
  bar.className = "bar";
  const fill = document.createElement("span");
  fill.style.width = `${(probability * 100).toFixed(1)}%`;
  bar.append(fill);
  const percent = document.createElement("span");
  percent.className = "percent";
  percent.textContent = `${(probability * 100).toFixed(1)} %`;
  row.append(label, bar, percent);
  return row;
}

function showPredictions(result) {
  clearResults("");
  predictions.append(...result.predictions.map(predictionRow));
  const { width, height, format } = result.image;
  latency.textContent = `Inference ${result.inference_ms.toFixed(2)} ms · ${format} ${width}×${height}`;
  latency.hidden = false;
}

async function classify(file) {
  showPreview(file);
  if (file.size > maxUploadBytes) {
    showError(`upload is larger than the ${maxUploadMb} MB limit`);
    return;
  }
  clearResults("Classifying…");
  const form = new FormData();
  form.append("image", file);
  try {
    const response = await fetch("predict", { method: "POST", body: form });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      showError(body.error || `the server answered HTTP ${response.status}`);
      return;
    }
    showPredictions(body);
  } catch (err) {
    showError(`upload failed: ${err.message}`);
  }
}

input.addEventListener("change", () => {
  const file = input.files[0];
  input.value = "";  // choosing the same file again fires "change" again
  if (file) classify(file);
});
for (const type of ["dragenter", "dragover"]) {
  drop.addEventListener(type, (event) => {
    event.preventDefault();
    drop.classList.add("dragging");
  });
}
for (const type of ["dragleave", "drop"]) {
  drop.addEventListener(type, () => drop.classList.remove("dragging"));
}
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  if (event.dataTransfer.files.length) classify(event.dataTransfer.files[0]);
});
