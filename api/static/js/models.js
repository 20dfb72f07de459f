// Models: the published students (format, backend, metrics, sha256, ONNX download) and "Try it": an image
// sent to POST /v1/models/{id}/detect, its boxes drawn with scores, with the latency of the call.
import { api, getKey, objectUrl } from "./api.js";
import { bytes, empty, errorBox, facts, fill, h, labelColour, pct, when } from "./dom.js";
import { deleteButton } from "./remove.js";

export async function render(main, { id, signal }) {
  if (id) return renderOne(main, id, signal);
  const { models } = await api("/v1/models", { signal });
  fill(main, h("h1", {}, "Models"), h("div", { class: "card" }, models.length
    ? h("div", { class: "table-wrap" }, h("table", { id: "models-table" },
      h("thead", {}, h("tr", {}, h("th", {}, "model"), h("th", {}, "architecture"), h("th", {}, "format"),
        h("th", { class: "num" }, "AP"), h("th", { class: "hide-narrow" }, "classes"),
        h("th", { class: "hide-narrow" }, "published"))),
      h("tbody", {}, models.map((m) => h("tr", {},
        h("td", {}, h("a", { href: `#/models/${m.id}` }, m.name || m.id), h("div", { class: "muted mono" }, m.id)),
        h("td", {}, m.arch || "—"), h("td", {}, m.format || "—"),
        h("td", { class: "num" }, pct(ap(m))),
        h("td", { class: "hide-narrow" }, (m.classes || []).join(", ")),
        h("td", { class: "hide-narrow" }, when(m.created_at)))))))
    : empty("No model is published yet: a train or distill job publishes its student when it succeeds.",
      "ldd jobs submit spec.json")));
}

function ap(m) {
  const metrics = m.metrics || {};
  return (metrics.bbox || metrics).AP ?? (m.training_metrics || {}).AP;
}

async function renderOne(main, id, signal) {
  const m = await api(`/v1/models/${encodeURIComponent(id)}`, { signal });
  const serving = m.serving || {};
  const download = h("a", { href: `/v1/models/${encodeURIComponent(m.id)}/onnx`, id: "onnx-download",
    download: `${m.id}.onnx`, class: "button" }, "Download ONNX");
  download.addEventListener("click", (e) => {
    if (!getKey()) return; // open service: the plain link works
    e.preventDefault(); // a link cannot send the key: fetch the file, then hand it over
    objectUrl(download.getAttribute("href"), signal).then((url) => {
      const a = h("a", { href: url, download: `${m.id}.onnx` });
      a.click();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    }).catch((err) => download.after(errorBox(err)));
  });
  const variants = Object.entries(m.variants || {});
  fill(main,
    h("h1", {}, m.name || m.id, h("span", { class: "muted mono" }, m.id)),
    h("div", { class: "grid2" },
      h("div", { class: "card" }, h("h2", {}, "Model"), facts([
        ["architecture", m.arch], ["format", m.format], ["classes", (m.classes || []).join(", ")],
        ["input size", Array.isArray(m.input_size) ? `${m.input_size.join(" × ")} px` : m.input_size],
        ["backend", `${serving.backend || "—"}${serving.providers ? ` (${serving.providers.join(", ")})` : ""}` +
          (serving.loaded ? "" : ", not loaded yet")],
        ["sha256", h("span", { class: "mono", id: "model-sha" }, m.sha256 || "—")],
        ["source job", m.job_id ? h("a", { href: `#/jobs/${m.job_id}` }, m.job_id) : null],
        ["other formats", variants.length ? h("span", {}, variants.map(([f, v]) =>
          h("a", { href: `#/models/${v}`, style: "margin-right: 8px" }, f))) : undefined],
        ["published", when(m.created_at)],
      ]), h("div", { class: "row", style: "margin-top: 12px" }, download,
        deleteButton(`/v1/models/${encodeURIComponent(m.id)}`, "model", () => { location.hash = "#/models"; }))),
      h("div", { class: "card" }, h("h2", {}, "Metrics"), metrics(m))),
    tryIt(m, signal));
}

function metrics(m) {
  const served = (m.metrics && m.metrics.bbox) || m.metrics || {};
  const training = m.training_metrics || {};
  const keys = ["AP", "AP50", "AP75", "APs", "APm", "APl"].filter((k) => k in served || k in training);
  if (!keys.length) return empty("No metrics were measured for this model.");
  const runtime = served.backend ? `${served.backend}${served.providers ? ` (${served.providers.join(", ")})` : ""}`
    : "the serving runtime";
  return h("div", {},
    m.accuracy_warning ? h("div", { class: "notice" }, m.accuracy_warning) : null,
    h("table", { id: "model-metrics" },
      h("thead", {}, h("tr", {}, h("th", {}, "COCO box"), h("th", { class: "num" }, "measured by the runtime"),
        h("th", { class: "num" }, "at the end of training"))),
      h("tbody", {}, keys.map((k) => h("tr", {}, h("td", {}, k), h("td", { class: "num" }, pct(served[k])),
        h("td", { class: "num" }, pct(training[k])))))),
    h("p", { class: "muted" }, `Measured by ${runtime}`,
      typeof served.images === "number" ? ` on ${served.images} validation images` : "",
      typeof m.size_bytes === "number" ? `; the ONNX file is ${bytes(m.size_bytes)}.` : "."));
}

function tryIt(m, signal) {
  const input = h("input", { type: "file", id: "try-file", accept: "image/*", hidden: true });
  const drop = h("div", { class: "drop", id: "drop-zone", tabindex: 0 },
    "Drop an image here, or click to choose one");
  const threshold = h("input", { type: "range", min: 0, max: 1, step: 0.05, value: 0.3, id: "try-threshold" });
  const thresholdText = h("span", { class: "mono" }, "0.30");
  const canvas = h("canvas", { id: "try-canvas", width: 640, height: 360 });
  const list = h("div", { class: "dets", id: "try-detections" });
  const status = h("div", { class: "progress-text", id: "try-status" }, "No image yet.");
  let last = null; // {image, result}
  const redraw = () => {
    thresholdText.textContent = Number(threshold.value).toFixed(2);
    if (last) draw(canvas, list, last.image, last.result, Number(threshold.value));
  };
  threshold.addEventListener("input", redraw);
  const run = async (file) => {
    if (!file) return;
    fill(status, `detecting in ${file.name}…`);
    const image = await loadImage(file);
    const body = new FormData();
    body.append("file", file);
    const t0 = performance.now();
    try {
      const result = await api(`/v1/models/${encodeURIComponent(m.id)}/detect`, { method: "POST", body, signal });
      const roundTrip = performance.now() - t0;
      last = { image, result };
      redraw();
      fill(status, `${result.detections.length} detections · ${result.latency_ms.toFixed(1)} ms in the server · `,
        `${roundTrip.toFixed(0)} ms round trip from this browser · image ${result.image_size.join(" × ")} px`);
    } catch (err) {
      if (err.name !== "AbortError") fill(status, errorBox(err));
    }
  };
  drop.addEventListener("click", () => input.click());
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter") input.click(); });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    run(e.dataTransfer.files[0]);
  });
  input.addEventListener("change", () => run(input.files[0]));
  return h("div", { class: "card" }, h("h2", {}, "Try it"), drop, input,
    h("div", { class: "row", style: "margin-top: 10px" }, h("label", {}, "show scores ≥ ", threshold), thresholdText),
    status, h("div", { class: "try-out" }, h("div", {}, canvas), list));
}

function loadImage(file) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error(`${file.name}: this browser cannot show the image`));
    img.src = URL.createObjectURL(file);
  });
}

// The detections on the image, in the image's pixels (the browser applies EXIF orientation as the server does).
function draw(canvas, list, image, result, minScore) {
  const [w, h0] = result.image_size;
  const scale = Math.min(4, 900 / w); // small images drawn larger, so boxes and labels stay legible
  canvas.width = Math.round(w * scale);
  canvas.height = Math.round(h0 * scale);
  const ctx = canvas.getContext("2d");
  ctx.drawImage(image, 0, 0, canvas.width, canvas.height);
  const shown = result.detections.filter((d) => d.score >= minScore).sort((a, b) => a.score - b.score);
  const line = Math.max(2, Math.round(Math.min(canvas.width, canvas.height) / 200));
  ctx.font = `${Math.max(11, Math.round(canvas.height / 32))}px system-ui, sans-serif`;
  ctx.textBaseline = "top";
  for (const d of shown) {
    const [x1, y1, x2, y2] = d.box.map((v) => v * scale);
    const colour = labelColour(d.label);
    ctx.lineWidth = line;
    ctx.strokeStyle = colour;
    ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
    const text = `${d.class_name} ${d.score.toFixed(2)}`;
    const tw = ctx.measureText(text).width + 6, th = parseInt(ctx.font, 10) + 4;
    const ty = y1 - th >= 0 ? y1 - th : y1;
    ctx.fillStyle = colour;
    ctx.fillRect(x1, ty, tw, th);
    ctx.fillStyle = "#000";
    ctx.fillText(text, x1 + 3, ty + 2);
  }
  canvas.dataset.boxes = String(shown.length);
  fill(list, shown.length ? h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "class"),
    h("th", { class: "num" }, "score"), h("th", {}, "box (px)"))),
  h("tbody", {}, [...shown].reverse().map((d) => h("tr", {},
    h("td", {}, h("span", { class: "swatch", style: `background: ${labelColour(d.label)}` }), d.class_name),
    h("td", { class: "num" }, d.score.toFixed(2)),
    h("td", { class: "mono" }, d.box.map((v) => Math.round(v)).join(", "))))))
    : h("p", { class: "muted" }, `No detection scores ≥ ${minScore.toFixed(2)}.`));
}
