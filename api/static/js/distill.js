// Distillation: what distillation changed. Teacher, plain student (a train job the user picks) and distilled
// student side by side (AP, AP50, AP75), and the paper's figure 4: per FPN level, the student's distance to the
// teacher (classification and box-distribution L1) before and after distillation.
import { api, objectUrl } from "./api.js";
import { bars } from "./charts.js";
import { empty, fill, h, num, pct } from "./dom.js";

const KEYS = ["AP", "AP50", "AP75"];

export async function render(main, { query, signal }) {
  const { jobs } = await api("/v1/jobs?state=succeeded&limit=1000", { signal });
  const distilled = jobs.filter((j) => j.kind === "distill" && j.metrics);
  const plain = jobs.filter((j) => j.kind === "train" && j.metrics);
  if (!distilled.length) {
    fill(main, h("h1", {}, "Distillation"), h("div", { class: "card" }, empty(
      "No distillation job has finished yet. Submit one (kind \"distill\", a teacher model) and its plain twin " +
      "(kind \"train\", the same student and schedule) to compare them here:", "ldd jobs submit distill.json")));
    return;
  }
  const chosen = distilled.find((j) => j.id === query.get("job")) || distilled[0];
  const same = (j) => j.spec.dataset === chosen.spec.dataset &&
    (j.spec.student || {}).arch === (chosen.spec.student || {}).arch;
  const twin = plain.find((j) => j.id === query.get("plain")) || plain.find(same) || null;
  const go = (job, twinId) => { location.hash = `#/distill?job=${job}${twinId ? `&plain=${twinId}` : ""}`; };
  const pickJob = h("select", { id: "pick-distill", onchange: (e) => go(e.target.value, twin && twin.id) },
    distilled.map((j) => h("option", { value: j.id, selected: j.id === chosen.id }, label(j))));
  const pickPlain = h("select", { id: "pick-plain", onchange: (e) => go(chosen.id, e.target.value) },
    h("option", { value: "" }, "— none —"),
    plain.map((j) => h("option", { value: j.id, selected: twin && j.id === twin.id },
      `${label(j)}${same(j) ? "" : " (other dataset or student)"}`)));
  const m = chosen.metrics;
  fill(main,
    h("h1", {}, "Distillation"),
    h("div", { class: "card row" },
      h("label", {}, "distilled student ", pickJob), h("label", {}, "plain student ", pickPlain)),
    h("div", { class: "card" }, h("h2", {}, "Box AP on the validation images"), table(m, twin)),
    h("div", { class: "card" }, h("h2", {}, "Figure 4: the student's distance to the teacher, per FPN level"),
      figure4(m.diagnostics)),
    h("div", { class: "card" }, h("h2", {}, "Figure 5: where the student's box logits are far from the teacher's"),
      figure5(chosen, m.diagnostics, signal)),
    m.class_map ? h("div", { class: "card" }, h("details", {}, h("summary", {}, "Classes paired for KD"),
      h("pre", {}, JSON.stringify(m.class_map, null, 2)))) : null);
}

function label(j) {
  const student = (j.spec.student || {}).arch || "?";
  return `${j.name || j.id} · ${student} · ${pct((j.metrics.bbox || {}).AP)} AP`;
}

function table(m, twin) {
  const base = twin ? twin.metrics.bbox || {} : null;
  const rows = [
    ["teacher", m.teacher_bbox, "teacher" in m || "teacher_bbox" in m ? null : "—"],
    ["plain student", base, twin ? null : "pick a train job"],
    ["distilled student", m.bbox || {}, null],
  ];
  const delta = (v, k) => {
    if (!base || typeof v !== "number" || typeof base[k] !== "number") return null;
    const d = 100 * (v - base[k]);
    return h("span", { class: `delta ${d > 0 ? "up" : d < 0 ? "down" : ""}` }, ` (${d >= 0 ? "+" : ""}${d.toFixed(1)})`);
  };
  return h("div", { class: "table-wrap" }, h("table", { id: "ap-table" },
    h("thead", {}, h("tr", {}, h("th", {}, "model"), KEYS.map((k) => h("th", { class: "num" }, k)))),
    h("tbody", {}, rows.map(([name, bbox, note]) => h("tr", { "data-row": name }, h("td", {}, name),
      KEYS.map((k) => h("td", { class: "num" }, bbox ? pct(bbox[k]) : note || "n/a (teacher knows no class)",
        name === "distilled student" && bbox ? delta(bbox[k], k) : null))))),
    h("caption", { class: "muted", style: "caption-side: bottom; text-align: left; padding-top: 6px" },
      "In brackets: the distilled student's gain over the plain student, in AP points.")));
}

function figure4(diag) {
  if (!diag || !diag.after) return empty("This run has no teacher-student diagnostics.");
  const before = diag.before || {}, after = diag.after;
  const levels = (after.strides || []).map((s, i) => `P${i + 3} (/${s})`);
  const charts = [];
  for (const [key, title] of [["cls_l1", "Classification L1 |σ(student) − σ(teacher)|"],
    ["box_l1", "Box L1 between edge distributions"]]) {
    if (!after[key]) {
      charts.push(h("p", { class: "muted" }, `${title}: not measured (no class pairs the teacher and student).`));
      continue;
    }
    charts.push(h("div", { class: "fig4", "data-metric": key }, bars(title, levels, [
      { label: "before distillation", values: before[key] || [], colour: "#9aa5b8" },
      { label: "after distillation", values: after[key], colour: "#2f6fed" },
    ], "mean L1"), h("p", { class: "muted" }, `mean over levels: ${num(before[`${key}_mean`], 4)} before → `,
      `${num(after[`${key}_mean`], 4)} after`)));
  }
  return h("div", {}, h("div", { class: "grid2" }, charts), h("p", { class: "muted" },
    `Measured on ${after.images ?? "?"} validation images. Lower is closer to the teacher; "before" is the `,
    "student as initialised, before its first step."));
}

function figure5(job, diag, signal) {
  if (!diag || !diag.figure5 || !diag.figure5.after) return empty("This run has no figure 5 (it ran before figure 5 was recorded).");
  const img = h("img", { id: "figure5", alt: "box-logit error maps at P5 and P6, before and after distillation",
    style: "max-width: 100%" });
  objectUrl(`/v1/jobs/${encodeURIComponent(job.id)}/figure5.png`, signal).then((url) => { img.src = url; })
    .catch(() => { img.alt = "figure 5 could not be drawn"; });
  return h("div", {}, img, h("p", { class: "muted" },
    "Per location of P5 and P6 on the first validation image: the L1 distance between the student's and the ",
    "teacher's box logits (per edge as log-probabilities, summed over the bins and the four edges), for the ",
    "student as initialised (top) and after distillation (bottom). Brighter is farther; each column has one scale."));
}
