// Datasets: the list (with an upload form), and one dataset's counts, classes, splits, problems and a grid of
// its images with their ground-truth boxes (drawn by the server: GET /v1/datasets/{id}/samples/{i}).
import { api, objectUrl } from "./api.js";
import { empty, errorBox, facts, fill, h, when } from "./dom.js";
import { deleteButton } from "./remove.js";

const PAGE = 12;

export async function render(main, { id, signal }) {
  if (id) return renderOne(main, id, signal);
  const { datasets } = await api("/v1/datasets", { signal });
  const rows = datasets.map((d) => h("tr", {},
    h("td", {}, h("a", { href: `#/datasets/${d.id}` }, d.name), h("div", { class: "muted mono" }, d.id)),
    h("td", {}, d.classes.join(", ")),
    h("td", { class: "num" }, d.num_images),
    h("td", { class: "num" }, d.num_boxes),
    h("td", { class: "hide-narrow" }, parts(d)),
    h("td", { class: "num" }, (d.problems || []).length),
    h("td", { class: "hide-narrow" }, when(d.created_at))));
  fill(main,
    h("h1", {}, "Datasets"),
    h("div", { class: "card" }, datasets.length
      ? h("div", { class: "table-wrap" }, h("table", { id: "datasets-table" },
        h("thead", {}, h("tr", {}, h("th", {}, "name"), h("th", {}, "classes"), h("th", { class: "num" }, "images"),
          h("th", { class: "num" }, "boxes"), h("th", { class: "hide-narrow" }, "splits"),
          h("th", { class: "num" }, "problems"), h("th", { class: "hide-narrow" }, "uploaded"))),
        h("tbody", {}, rows)))
      : empty("No dataset yet. Upload a zip (COCO JSON or Pascal VOC XML, with its images) below, or:",
        "ldd datasets upload data.zip")),
    uploadForm(signal));
}

function splits(s) {
  const entries = Object.entries(s || {});
  return entries.length ? entries.map(([k, v]) => `${k} ${v}`).join(" · ") : "none";
}

function parts(d) {
  const s = d.split;
  if (!s || s.train === null) return splits(d.splits);
  return `train ${s.train} · val ${s.val}` + (s.test ? ` · test ${s.test}` : "");
}

// The split every job on the data set uses (fixed at upload): how it was made and the images in each part.
function split(d) {
  const s = d.split;
  if (!s) return splits(d.splits);
  const how = s.source === "drawn" ? `drawn at upload: val_split ${s.val_split}, split_seed ${s.split_seed}`
    : s.source === "own" ? "the images' own split" : "not recorded";
  return `${parts(d)} (${how}; the same for every job and seed)`;
}

function uploadForm(signal) {
  const file = h("input", { type: "file", id: "dataset-file", accept: ".zip,application/zip", required: true });
  const name = h("input", { type: "text", id: "dataset-name", placeholder: "name (optional)", maxlength: 200 });
  // Used only when the images name no validation or test split: the draw made once, here, for every job.
  const valSplit = h("input", { type: "number", id: "dataset-val-split", min: 0, max: 0.95, step: 0.05, value: 0.2,
    title: "validation share, drawn once at upload when the images name no split" });
  const splitSeed = h("input", { type: "number", id: "dataset-split-seed", min: 0, step: 1, value: 0,
    title: "seed of that draw" });
  const status = h("div", { class: "progress-text", id: "upload-status" });
  const button = h("button", { class: "primary", type: "submit", id: "upload-button" }, "Upload");
  const form = h("form", { onsubmit: async (e) => {
    e.preventDefault();
    if (!file.files.length) return;
    const body = new FormData();
    body.append("file", file.files[0]);
    if (name.value.trim()) body.append("name", name.value.trim());
    body.append("val_split", valSplit.value || "0.2");
    body.append("split_seed", splitSeed.value || "0");
    button.disabled = true;
    fill(status, `uploading ${file.files[0].name}… (checked on arrival: images, boxes, classes)`);
    try {
      const d = await api("/v1/datasets", { method: "POST", body, signal });
      location.hash = `#/datasets/${d.id}`;
    } catch (err) {
      if (err.name === "AbortError") return;
      fill(status, errorBox(err));
      button.disabled = false;
    }
  } }, h("div", { class: "row" }, file, name, h("label", {}, "val_split ", valSplit),
    h("label", {}, "split_seed ", splitSeed), button), status);
  return h("div", { class: "card" }, h("h2", {}, "Upload a dataset"), form);
}

async function renderOne(main, id, signal) {
  const d = await api(`/v1/datasets/${encodeURIComponent(id)}`, { signal });
  const grid = h("div", { class: "samples", id: "samples" });
  const more = h("button", { type: "button", id: "more-samples" }, "more images");
  const problems = d.problems || [];
  fill(main,
    h("h1", {}, d.name, h("span", { class: "muted mono" }, d.id)),
    h("div", { class: "grid2" },
      h("div", { class: "card" }, h("h2", {}, "Contents"), facts([
        ["images", d.num_images], ["boxes", d.num_boxes],
        ["boxes per image", d.num_images ? (d.num_boxes / d.num_images).toFixed(2) : "—"],
        ["classes", `${d.classes.length}: ${d.classes.join(", ")}`], ["split", split(d)],
        ["uploaded", when(d.created_at)]]), h("div", { style: "margin-top: 12px" },
        deleteButton(`/v1/datasets/${encodeURIComponent(d.id)}`, "dataset", () => { location.hash = "#/datasets"; }))),
      h("div", { class: "card", id: "problems" }, h("h2", {}, `Problems found at upload (${problems.length})`),
        problems.length
          ? h("ul", { class: "problems" }, problems.map((p) => h("li", {}, p)))
          : h("p", { class: "muted" }, "None: every image and box passed the checks."))),
    h("div", { class: "card" },
      h("h2", {}, "Images with their ground-truth boxes"),
      d.num_images ? grid : empty("This dataset has no usable image."),
      h("div", { class: "row", style: "margin-top: 10px" }, d.num_images > PAGE ? more : null,
        h("span", { class: "muted", id: "samples-count" }))));
  let shown = 0;
  const showMore = async () => {
    const upto = Math.min(d.num_images, shown + PAGE);
    const figures = [];
    for (let i = shown; i < upto; i++) {
      const img = h("img", { alt: `${d.name} image ${i} with its boxes`, "data-index": i });
      figures.push([i, img]);
      grid.append(h("figure", {}, img));
    }
    shown = upto;
    fill(document.getElementById("samples-count") || h("span"), `${shown} of ${d.num_images} shown`);
    if (shown >= d.num_images) more.remove();
    await Promise.all(figures.map(async ([i, img]) => {
      img.src = await objectUrl(`/v1/datasets/${encodeURIComponent(d.id)}/samples/${i}?max_side=400`, signal);
    }));
  };
  more.addEventListener("click", () => showMore().catch((err) => {
    if (err.name !== "AbortError") grid.after(errorBox(err));
  }));
  if (d.num_images) await showMore();
}
