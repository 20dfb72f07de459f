// Studies: "does distillation pay off on my data, and with which method?" The list with a form that starts one
// (POST /v1/studies: the plain student and each method, each over N seeds, as ordinary jobs), and one study's
// page: its jobs live, then the report: AP as mean ± std per row, the gain over the plain student paired by seed
// and whether it exceeds the noise, figure 4's distances to the teacher, a chart, and the recommended model.
import { api, objectUrl, getKey } from "./api.js";
import { intervals } from "./charts.js";
import { badge, empty, errorBox, facts, fill, h, num, when } from "./dom.js";
import { deleteButton } from "./remove.js";
import { poll } from "./jobs.js";

// The methods a row may name (distill/spec.py's Method), with what each is.
const METHODS = [
  ["ld", "LD + VLR + KD (the paper)", true],
  ["crosskd", "CrossKD", true],
  ["bckd", "BCKD", true],
  ["tbr", "TBR (for comparison)", false],
  ["fitnets", "FitNets (for comparison)", false],
  ["inside_gt", "imitation inside the boxes", false],
  ["main_region", "imitation in the Main region", false],
  ["fine_grained", "Fine-Grained imitation", false],
  ["defeat", "DeFeat imitation", false],
  ["gi", "GI imitation", false],
  ["pkd", "PKD (Pearson imitation)", false],
];
// <family>_<size>, as distill.spec.ARCHITECTURES: suggestions; the server checks.
const FAMILIES = ["gfl", "gflv2", "atss", "fcos", "retina"];
const SIZES = ["tiny", "small", "r18", "r34", "r50", "r101"];
const ARCHS = FAMILIES.flatMap((family) => SIZES.map((size) => `${family}_${size}`));
const PLAIN = "student alone";

export async function render(main, { id, signal }) {
  if (id) return renderOne(main, id, signal);
  const [{ studies }, { datasets }, { models }, { jobs }] = await Promise.all([
    api("/v1/studies?limit=100", { signal }), api("/v1/datasets", { signal }), api("/v1/models", { signal }),
    api("/v1/jobs?state=succeeded&limit=200", { signal })]);
  const count = h("span", { class: "muted" });
  const card = h("div", { class: "card", id: "studies-card" });
  fill(main, h("h1", {}, "Studies", count),
    h("p", { class: "muted" }, "A study trains your student alone and with each distillation method, over several ",
      "seeds, on your data, then tells you which method beats the plain student by more than the noise."),
    card, studyForm(datasets, models, jobs.filter((j) => j.model_id), signal));
  const table = h("tbody");
  let first = true;
  const refresh = async () => {
    const list = first ? studies : (await api("/v1/studies?limit=100", { signal })).studies;
    first = false;
    fill(count, `${list.length} shown, newest first`);
    if (!list.length) {
      fill(card, empty("No study yet. Start one with the form below, or:", "ldd studies submit study.json"));
      return false;
    }
    fill(table, list.map((s) => h("tr", { "data-study": s.id },
      h("td", {}, h("a", { href: `#/studies/${s.id}` }, s.name || s.id), h("div", { class: "muted mono" }, s.id)),
      h("td", {}, badge(s.state)),
      h("td", { style: "width: 34%" }, progressBar(s), h("div", { class: "progress-text" }, progressText(s))),
      h("td", { class: "hide-narrow" }, rowNames(s).join(", ")),
      h("td", { class: "hide-narrow" }, when(s.created_at)))));
    if (!card.contains(table)) {
      fill(card, h("div", { class: "table-wrap" }, h("table", { id: "studies-table" },
        h("thead", {}, h("tr", {}, h("th", {}, "study"), h("th", {}, "state"), h("th", {}, "progress"),
          h("th", { class: "hide-narrow" }, "rows"), h("th", { class: "hide-narrow" }, "created"))), table)));
    }
    return list.some((s) => s.state === "running");
  };
  poll(refresh, await refresh(), signal);
}

function progressBar(s) {
  const p = s.progress || {};
  const f = p.jobs ? p.ended / p.jobs : 0;
  return h("div", { class: `bar${s.state === "succeeded" ? " done" : ""}`, role: "progressbar",
    "aria-valuenow": Math.round(100 * f), "aria-valuemin": 0, "aria-valuemax": 100 },
  h("span", { style: `width: ${(100 * f).toFixed(1)}%` }));
}

function progressText(s) {
  const p = s.progress || {};
  const running = (s.jobs || []).filter((j) => j.state === "running").length;
  return `${p.ended ?? 0} of ${p.jobs ?? 0} jobs ended` + (running ? ` · ${running} running` : "");
}

function rowNames(s) {
  return [...new Set((s.jobs || []).map((j) => j.row))];
}

// ------------------------------------------------------------------------------------------------------------
// The form: every field the server has a default for may be left empty (the placeholder shows that default).

function studyForm(datasets, models, finished, signal) {
  if (!datasets.length) {
    return h("div", { class: "card" }, h("h2", {}, "Start a study"),
      empty("A study runs on one of your datasets: upload one first.", "ldd datasets upload data.zip"));
  }
  const input = (id, attrs = {}) => h("input", { id, ...attrs });
  const field = (label, control, hint) => h("label", { class: "field" }, h("span", {}, label), control,
    hint ? h("small", { class: "muted" }, hint) : null);
  const name = input("study-name", { type: "text", maxlength: 200, placeholder: "which method on my data" });
  const dataset = h("select", { id: "study-dataset" }, datasets.map((d) => h("option", { value: d.id },
    `${d.name} · ${d.num_images} images`)));
  const teacher = h("select", { id: "study-teacher" },
    models.length ? h("optgroup", { label: "published models" }, models.map((m) => h("option",
      { value: `model:${m.id}` }, `${m.name || m.id} · ${m.arch || "?"} · ${m.format || "fp32"}`))) : null,
    finished.length ? h("optgroup", { label: "finished jobs (their trained model)" }, finished.map((j) =>
      h("option", { value: `job:${j.id}` }, `${j.name || j.id} · ${(j.spec.student || {}).arch || "?"}`))) : null,
    h("option", { value: "" }, "a checkpoint id (type it in the box)"));
  const checkpoint = input("study-teacher-checkpoint", { type: "text", placeholder: "ckpt_… (an uploaded teacher)",
    size: 22 });
  const arch = input("study-arch", { type: "text", list: "study-archs", placeholder: "gfl_r18 (default)", size: 14 });
  const archs = h("datalist", { id: "study-archs" }, ARCHS.map((a) => h("option", { value: a })));
  const methods = METHODS.map(([m, label, on]) => h("label", { class: "check" },
    h("input", { type: "checkbox", name: "method", value: m, checked: on }), ` ${label}`));
  const custom = h("textarea", { id: "study-custom", rows: 3, spellcheck: "false", placeholder:
    '{"name": "crosskd+vlr", "distill": {"method": "crosskd", "weights": {"vlr_ld": 0.25}}}' });
  const seeds = input("study-seeds", { type: "number", value: 3, size: 4 });
  const epochs = input("study-epochs", { type: "number", placeholder: "12", size: 5 });
  const batch = input("study-batch", { type: "number", placeholder: "16", size: 5 });
  const long = input("study-image-long", { type: "number", placeholder: "1333", size: 6 });
  const short = input("study-image-short", { type: "number", placeholder: "800", size: 6 });
  const problem = h("div", { id: "study-error" });
  const button = h("button", { class: "primary", type: "submit", id: "study-submit" }, "Start the study");
  const number = (el) => (el.value.trim() === "" ? undefined : Number(el.value));

  const body = () => {
    const rows = methods.map((l) => l.querySelector("input")).filter((c) => c.checked).map((c) => c.value);
    if (custom.value.trim()) {
      let extra;
      try {
        extra = JSON.parse(custom.value);
      } catch (err) {
        throw new Error(`custom row: not JSON (${err.message})`);
      }
      rows.push(...(Array.isArray(extra) ? extra : [extra]));
    }
    const [kind, ref] = teacher.value.split(":");
    const schedule = { epochs: number(epochs), batch_size: number(batch) };
    if (long.value.trim() || short.value.trim()) schedule.image_size = [number(long), number(short)];
    return {
      name: name.value.trim() || undefined,
      dataset: dataset.value,
      teacher: checkpoint.value.trim() ? { checkpoint: checkpoint.value.trim() } : kind ? { [kind]: ref } : undefined,
      student: arch.value.trim() ? { arch: arch.value.trim() } : undefined,
      methods: rows,
      seeds: number(seeds),
      schedule: Object.values(schedule).some((v) => v !== undefined) ? schedule : undefined,
    };
  };
  // novalidate: the server is the one judge of a study (its 4xx names the field), the page only shows it.
  const form = h("form", { id: "study-form", novalidate: true, onsubmit: async (e) => {
    e.preventDefault();
    fill(problem);
    button.disabled = true;
    try {
      const study = await api("/v1/studies", { method: "POST", signal, headers: { "Content-Type":
        "application/json" }, body: JSON.stringify(body()) });
      location.hash = `#/studies/${study.id}`;
    } catch (err) {
      if (err.name === "AbortError") return;
      fill(problem, errorBox(err));
      button.disabled = false;
    }
  } },
  h("div", { class: "form-grid" },
    field("name", name), field("dataset", dataset),
    field("teacher", h("div", { class: "row" }, teacher, checkpoint),
      "a published model, a finished job's model, or an uploaded checkpoint"),
    field("student architecture", h("span", {}, arch, archs), "the plain student is trained alone as the baseline"),
    field("seeds", seeds, "every row runs once per seed (1 to 10); gains are paired by seed"),
    field("epochs", epochs, "the same schedule for every job"), field("batch size", batch, "images per step"),
    field("image size (long × short side, px)", h("div", { class: "row" }, long, "×", short))),
  h("fieldset", { class: "methods" }, h("legend", {}, "methods (one row each, beside the student alone)"),
    h("div", { class: "row" }, methods),
    field("custom rows (optional JSON: a row, or a list of rows)", custom)),
  problem, h("div", { class: "row" }, button, h("span", { class: "muted" },
    "A study of R rows and S seeds queues (R + 1) × S ordinary jobs.")));
  return h("div", { class: "card" }, h("h2", {}, "Start a study"), form);
}

// ------------------------------------------------------------------------------------------------------------
// One study: its jobs while they run, then its report.

async function renderOne(main, id, signal) {
  const path = `/v1/studies/${encodeURIComponent(id)}`;
  const study = await api(path, { signal });
  const state = h("span", { id: "study-state" });
  const progressLine = h("div", { style: "flex: 1" });
  const progressInfo = h("div", { class: "progress-text", id: "study-progress" });
  const cancel = h("button", { type: "button", class: "danger", id: "cancel-study" }, "Cancel study");
  const problem = h("div", { id: "study-error" });
  const jobsBox = h("div", { id: "study-jobs" });
  const reportBox = h("div", { id: "study-report" });
  fill(main,
    h("h1", {}, study.name || study.id, state, h("span", { class: "muted mono" }, study.id)),
    h("div", { class: "card" }, h("div", { class: "progress-line" }, progressLine, cancel), progressInfo, problem,
      specFacts(study.spec || {})),
    h("div", { class: "card" }, h("h2", {}, "Report"), reportBox),
    h("div", { class: "card" }, h("h2", {}, "Jobs"), jobsBox),
    h("div", { class: "card" }, h("details", {}, h("summary", {}, "Spec (as validated, defaults filled in)"),
      h("pre", { id: "study-spec" }, JSON.stringify(study.spec, null, 2)))),
    h("div", { class: "card" }, deleteButton(path, "study", () => { location.hash = "#/studies"; })));

  let reported = false;
  const show = (s) => {
    fill(state, badge(s.state));
    fill(progressLine, progressBar(s));
    fill(progressInfo, progressText(s));
    cancel.hidden = s.state !== "running";
    fill(jobsBox, jobsTable(s.jobs || []));
    if (s.report && !reported) {
      reported = true; // drawn once: the report does not change, and redrawing would move the page
      fill(reportBox, report(s.report, signal));
    } else if (!s.report) {
      fill(reportBox, empty(s.state === "running"
        ? "The report is written when every job of the study has ended; this page follows the jobs until then."
        : "No report for this study."));
    }
    return s.state === "running" || !s.report;
  };
  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    cancel.textContent = "Cancelling…";
    try {
      show(await api(`${path}/cancel`, { method: "POST", signal }));
    } catch (err) {
      if (err.name !== "AbortError") fill(problem, errorBox(err));
      cancel.disabled = false;
    }
  });
  poll(async () => show(await api(path, { signal })), show(study), signal);
}

function specFacts(spec) {
  const t = spec.teacher || {};
  const teacher = t.model ? h("a", { href: `#/models/${t.model}` }, t.model)
    : t.job ? h("a", { href: `#/jobs/${t.job}` }, t.job) : t.checkpoint || null;
  const sch = spec.schedule || {};
  return h("div", { id: "study-facts", style: "margin-top: 12px" }, facts([
    ["dataset", spec.dataset ? h("a", { href: `#/datasets/${spec.dataset}` }, spec.dataset) : null],
    ["teacher", teacher],
    ["student", (spec.student || {}).arch],
    ["methods", (spec.methods || []).map((m) => (typeof m === "string" ? m : m.name)).join(", ")],
    ["seeds", spec.seeds],
    ["schedule", sch.epochs ? `${sch.epochs} epoch${sch.epochs === 1 ? "" : "s"} · batch ${sch.batch_size} · ` +
      `${(sch.image_size || []).join(" × ")} px` : null],
  ]));
}

function jobsTable(jobs) {
  if (!jobs.length) return empty("This study has no job.");
  return h("div", { class: "table-wrap" }, h("table", { id: "study-jobs-table" },
    h("thead", {}, h("tr", {}, h("th", {}, "row"), h("th", { class: "num" }, "seed"), h("th", {}, "state"),
      h("th", { class: "num" }, "AP"), h("th", {}, "job"))),
    h("tbody", {}, jobs.map((j) => h("tr", { "data-job": j.job_id },
      h("td", {}, j.row), h("td", { class: "num" }, j.seed), h("td", {}, badge(j.state)),
      h("td", { class: "num" }, percent(j.AP)),
      h("td", {}, h("a", { href: `#/jobs/${j.job_id}`, class: "mono" }, j.job_id)))))));
}

// ------------------------------------------------------------------------------------------------------------
// The report

function percent(v) {
  return typeof v === "number" && Number.isFinite(v) ? `${(100 * v).toFixed(1)} %` : "—";
}

function spread(stat) {
  if (!stat || typeof stat.mean !== "number") return "—";
  return `${(100 * stat.mean).toFixed(1)} ± ${(100 * (stat.std || 0)).toFixed(1)} %`;
}

function signed(v) {
  return `${v >= 0 ? "+" : "−"}${Math.abs(v).toFixed(1)}`;
}

// The gain as the server judged it (core/stats.py): mean ± the half-width of its 95% interval from Student's t on
// the per-seed differences, and the interval itself; one pair has a mean but no interval.
function gain(row) {
  const g = row.gain;
  if (!g || typeof g.mean !== "number") return row.row === PLAIN ? "baseline" : "—";
  const d = 100 * g.mean;
  const half = typeof g.half_width === "number" ? ` ± ${(100 * g.half_width).toFixed(1)}` : "";
  const range = typeof g.low === "number" && typeof g.high === "number"
    ? ` 95% interval [${signed(100 * g.low)}, ${signed(100 * g.high)}],` : "";
  return h("span", { class: `delta ${d > 0 ? "up" : d < 0 ? "down" : ""}` }, `${signed(d)}${half}`,
    h("span", { class: "muted interval" }, `${range} ${g.pairs} pair${g.pairs === 1 ? "" : "s"}`));
}

function verdict(row) {
  if (row.significant === true) return h("span", { class: "verdict significant" }, "significant (interval excludes 0)");
  if (row.significant === false) return h("span", { class: "verdict noise" }, "inside noise (interval includes 0)");
  if (row.gain) return h("span", { class: "verdict noise" }, "one pair: no interval to judge by");
  return "";
}

function report(r, signal) {
  const rows = r.rows || [];
  const rec = r.recommended;
  const table = h("div", { class: "table-wrap" }, h("table", { id: "study-table" },
    h("thead", {}, h("tr", {}, h("th", {}, "row"), ["AP", "AP50", "AP75"].map((k) => h("th", { class: "num" }, k)),
      h("th", { class: "num" }, "gain in AP points (95% interval)"), h("th", {}, "verdict"),
      h("th", { class: "num hide-narrow" }, "cls L1 / box L1"), h("th", { class: "hide-narrow" }, "best run"))),
    h("tbody", {}, rows.map((row) => h("tr", { "data-row": row.row,
      class: rec && rec.row === row.row ? "recommended" : null },
    h("td", {}, row.row, rec && rec.row === row.row ? h("span", { class: "badge succeeded" }, "recommended") : null),
    ["AP", "AP50", "AP75"].map((k) => h("td", { class: "num" }, spread(row[k]))),
    h("td", { class: "num" }, gain(row)), h("td", {}, verdict(row)),
    h("td", { class: "num hide-narrow" }, row.diagnostics
      ? `${num(row.diagnostics.cls_l1_mean, 4)} / ${num(row.diagnostics.box_l1_mean, 4)}` : "—"),
    h("td", { class: "hide-narrow" }, row.best ? h("a", { href: `#/jobs/${row.best.job_id}` },
      `seed ${row.best.seed}: ${percent(row.best.AP)}`) : "—")))),
    h("caption", { class: "muted", style: "caption-side: bottom; text-align: left; padding-top: 6px" },
      "Mean ± std over seeds. Gain: each seed's AP minus the student alone's with the same seed, mean ± the ",
      "half-width of its 95% interval from Student's t on those differences. Significant when the interval ",
      "excludes 0. cls L1 / box L1: ",
      "the student's mean distance to the teacher after distillation (the paper's figure 4), lower is closer.")));
  const chart = h("div", { id: "study-chart", class: "study-chart" }, intervals("AP per row, mean ± std over seeds",
    rows.map((row) => ({ label: row.row, mean: row.AP && typeof row.AP.mean === "number" ? 100 * row.AP.mean : NaN,
    std: row.AP ? 100 * (row.AP.std || 0) : 0, highlight: rec && rec.row === row.row,
    colour: row.row === PLAIN ? "#9aa5b8" : undefined })), "AP (%)"));
  const failures = r.failures || [];
  return h("div", {},
    recommended(rec), teacherNote(r),
    table, chart,
    failures.length ? h("div", { id: "study-failures", class: "error", role: "alert" },
      h("strong", {}, `${failures.length} job${failures.length === 1 ? "" : "s"} did not succeed; `,
        "the rows above hold what the others measured."),
      h("ul", { class: "problems" }, failures.map((f) => h("li", {}, `${f.row}, seed ${f.seed}: ${f.state}`,
        f.error ? ` (${f.error})` : "", " · ", h("a", { href: `#/jobs/${f.job_id}` }, f.job_id))))) : null,
    h("div", { class: "row", style: "margin-top: 12px" },
      reportLink(r.report_md, "report.md", "report-md", signal),
      reportLink(r.report_png, "report.png", "report-png", signal)));
}

// The teacher's AP on the students' validation split (the data set's one split), and whether it trained on any of
// those images (allowed only with distill.allow_teacher_overlap: then its AP and the gains are inflated).
function teacherNote(r) {
  const o = r.teacher_overlap;
  const ap = typeof r.teacher_AP === "number"
    ? `Teacher AP on the students' validation split: ${percent(r.teacher_AP)}. ` : "";
  if (o && o.seen) {
    return h("div", { class: "error", role: "alert", id: "study-teacher" }, ap, h("strong", {},
      `The teacher (${o.teacher}) was trained on ${o.seen} of these ${o.val_images} validation images`),
      " (run with distill.allow_teacher_overlap): its AP and the distilled rows' gains are inflated.");
  }
  return ap ? h("p", { class: "muted", id: "study-teacher" }, ap) : null;
}

function recommended(rec) {
  if (!rec) {
    return h("div", { class: "notice", id: "study-recommended" },
      "No model to recommend: no job of this study published one.");
  }
  const model = `#/models/${rec.model_id}`;
  return h("div", { class: "recommend", id: "study-recommended" },
    h("div", {}, "Recommended: ", h("strong", {}, rec.row), `, seed ${rec.seed}, ${percent(rec.AP)} AP`,
      rec.row === PLAIN ? " (no method beat the student alone on this data)" : ""),
    h("div", { class: "row" },
      h("a", { href: model, id: "recommended-model", class: "button" }, `Model ${rec.model_id}`),
      h("a", { href: model, id: "recommended-try" }, "try it on an image"),
      h("code", {}, `POST /v1/models/${rec.model_id}/detect`)));
}

// A link to a report file. With an API key, a plain link cannot send it: fetch the file, then hand it over (a
// download started from the click; a window opened after the fetch would meet the pop-up blocker).
function reportLink(href, text, id, signal) {
  if (!href) return null;
  const a = h("a", { href, id, target: "_blank", rel: "noopener", class: "button" }, text);
  a.addEventListener("click", (e) => {
    if (!getKey()) return;
    e.preventDefault();
    objectUrl(href, signal).then((url) => {
      h("a", { href: url, download: text }).click();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    }).catch((err) => a.after(errorBox(err)));
  });
  return a;
}
