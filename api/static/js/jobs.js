// Jobs: the list (state, progress, ETA; refreshed while jobs are active) and one job's page: live loss and
// learning-rate curves (its history, then server-sent events), evaluations, spec, error, attempts, cancel.
import { api, follow } from "./api.js";
import { Curves } from "./charts.js";
import { badge, duration, empty, errorBox, facts, fill, h, pct, when } from "./dom.js";
import { deleteButton } from "./remove.js";

const ACTIVE = ["queued", "running"];

export function fraction(job) {
  const p = job.progress || {};
  if (job.state === "succeeded") return 1;
  if (p.total_iters) return Math.min(1, (p.iter || 0) / p.total_iters);
  return 0;
}

export function progressText(job) {
  const p = job.progress || {};
  if (job.state === "queued") {
    const gpus = (job.spec.schedule || {}).gpus || 1;
    const where = gpus > 1 ? ` on ${job.queue}: waits for a worker with ${gpus} slots` : "";
    return (job.attempts ? `queued again (attempt ${job.attempts + 1} next)` : "queued") + where;
  }
  const parts = [];
  if (p.phase) parts.push(p.phase);
  if (p.epochs) parts.push(`epoch ${p.epoch}/${p.epochs}`);
  if (p.total_iters) parts.push(`iteration ${p.iter}/${p.total_iters}`);
  if (p.images_per_s) parts.push(`${p.images_per_s.toFixed(1)} images/s`);
  if (job.state === "running" && typeof p.eta_s === "number") parts.push(`ETA ${duration(p.eta_s)}`);
  return parts.join(" · ") || job.state;
}

function bar(job) {
  const f = fraction(job);
  return h("div", { class: `bar${job.state === "succeeded" ? " done" : ""}`, role: "progressbar",
    "aria-valuenow": Math.round(100 * f), "aria-valuemin": 0, "aria-valuemax": 100 },
  h("span", { style: `width: ${(100 * f).toFixed(1)}%` }));
}

export async function render(main, { id, signal }) {
  if (id) return renderOne(main, id, signal);
  const table = h("tbody");
  const count = h("span", { class: "muted" });
  fill(main, h("h1", {}, "Jobs", count), h("div", { class: "card", id: "jobs-card" }, h("p", { class: "muted" },
    "Loading…")));
  const card = document.getElementById("jobs-card");
  const refresh = async () => {
    const { jobs } = await api("/v1/jobs?limit=200", { signal });
    fill(count, `${jobs.length} shown, newest first`);
    if (!jobs.length) {
      fill(card, empty("No job yet. Upload a dataset, then submit a train or distill job:",
        "ldd jobs submit spec.json"));
      return false;
    }
    fill(table, jobs.map((j) => h("tr", { "data-job": j.id },
      h("td", {}, h("a", { href: `#/jobs/${j.id}` }, j.name || j.id), h("div", { class: "muted mono" }, j.id)),
      h("td", {}, j.kind),
      h("td", {}, badge(j.state)),
      h("td", { style: "width: 34%" }, bar(j), h("div", { class: "progress-text" }, progressText(j))),
      h("td", { class: "num hide-narrow" }, j.attempts),
      h("td", { class: "hide-narrow" }, when(j.created_at)))));
    if (!card.contains(table)) {
      fill(card, h("div", { class: "table-wrap" }, h("table", { id: "jobs-table" },
        h("thead", {}, h("tr", {}, h("th", {}, "job"), h("th", {}, "kind"), h("th", {}, "state"),
          h("th", {}, "progress"), h("th", { class: "num hide-narrow" }, "attempts"),
          h("th", { class: "hide-narrow" }, "submitted"))), table)));
    }
    return jobs.some((j) => ACTIVE.includes(j.state));
  };
  const active = await refresh();
  poll(refresh, active, signal);
}

// Refresh every 2 s while something is active, every 10 s otherwise, until the page is left.
export function poll(refresh, active, signal) {
  const timer = setTimeout(async () => {
    if (signal.aborted) return;
    try {
      poll(refresh, await refresh(), signal);
    } catch (err) {
      if (!signal.aborted) poll(refresh, true, signal);
    }
  }, active ? 2000 : 10000);
  signal.addEventListener("abort", () => clearTimeout(timer));
}

async function renderOne(main, id, signal) {
  const path = `/v1/jobs/${encodeURIComponent(id)}`;
  const [job, hist] = await Promise.all([api(path, { signal }), api(`${path}/history`, { signal })]);
  const state = h("span", { id: "job-state" });
  const progressLine = h("div", { style: "flex: 1" });
  const progressInfo = h("div", { class: "progress-text", id: "job-progress" });
  const cancel = h("button", { type: "button", class: "danger", id: "cancel-job" }, "Cancel job");
  const problem = h("div", { id: "job-error" });
  const details = h("div", { id: "job-facts" });
  const evals = h("div", { id: "evaluations" });
  const lossBox = h("div", { class: "chart", id: "loss-chart" });
  const lrBox = h("div", { class: "chart", id: "lr-chart" });
  const lrNote = h("p", { class: "muted", id: "lr-note" });
  fill(main,
    h("h1", {}, job.name || job.id, state, h("span", { class: "muted mono" }, job.id)),
    h("div", { class: "card" }, h("div", { class: "progress-line" }, progressLine, cancel), progressInfo,
      problem, details),
    h("div", { class: "grid2" },
      h("div", { class: "card" }, lossBox),
      h("div", { class: "card" }, lrBox, lrNote)),
    h("div", { class: "card" }, h("h2", {}, "Evaluations (COCO box AP on the validation images)"), evals),
    h("div", { class: "card" }, h("details", {}, h("summary", {}, "Spec (as validated, defaults filled in)"),
      h("pre", { id: "job-spec" }, JSON.stringify(job.spec, null, 2)))),
    h("div", { class: "card" }, deleteButton(path, "job", () => { location.hash = "#/jobs"; })));

  const losses = new Curves(lossBox, "Training losses", "loss");
  const lr = new Curves(lrBox, "Learning rate", "lr");
  signal.addEventListener("abort", () => { losses.destroy(); lr.destroy(); });
  const addRecord = (r) => {
    if (r.phase !== "train" || typeof r.iter !== "number" || !r.losses || !Object.keys(r.losses).length) return;
    losses.add(r.iter, r.losses);
    if (typeof r.lr === "number") lr.add(r.iter, { lr: r.lr });
  };
  for (const r of hist.records) addRecord(r);

  const show = (j) => {
    fill(state, badge(j.state));
    fill(progressLine, bar(j));
    fill(progressInfo, progressText(j), ` · ${losses.points} points on the curve`);
    cancel.hidden = !ACTIVE.includes(j.state);
    cancel.disabled = j.cancel_requested;
    if (j.cancel_requested && ACTIVE.includes(j.state)) cancel.textContent = "Cancelling…";
    fill(problem, j.error ? h("div", { class: "error", role: "alert" }, j.error) : null,
      j.last_error && j.state !== "succeeded"
        ? h("div", { class: "notice" }, `Previous attempt ended: ${j.last_error}`) : null);
    fill(details, facts([
      ["kind", j.kind], ["attempts", j.attempts], ["submitted", when(j.created_at)],
      ["started", when(j.started_at)], ["finished", when(j.finished_at)],
      ["model", j.model_id ? h("a", { href: `#/models/${j.model_id}` }, j.model_id) : null],
      ["study", j.study_id ? h("a", { href: `#/studies/${j.study_id}`, id: "job-study" }, j.study_id) : undefined],
      ["distillation", j.kind === "distill" && j.state === "succeeded"
        ? h("a", { href: `#/distill?job=${j.id}` }, "teacher vs students, figure 4") : undefined],
    ]));
    fill(lrNote, lr.points ? "" : "This run's progress records carry no learning rate (yet).");
    showEvaluations(evals, hist.evaluations, j);
  };
  show(job);
  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    try {
      show(await api(`${path}/cancel`, { method: "POST", signal }));
    } catch (err) {
      if (err.name !== "AbortError") problem.append(errorBox(err));
    }
  });
  if (!ACTIVE.includes(job.state)) return;
  // Live: each change of the job arrives as an event; its progress record extends the curves.
  // Events are throttled, so some records never arrive live; at the end the stored history redraws the curves.
  follow(`${path}/events`, async (name, j) => {
    if (j.progress) addRecord({ ...j.progress });
    if (name === "end") {
      try {
        const full = await api(`${path}/history`, { signal });
        losses.reset();
        lr.reset();
        for (const r of full.records) addRecord(r);
        hist.evaluations = full.evaluations;
      } catch (err) {
        if (signal.aborted) return;
      }
      if (j.metrics && j.metrics.bbox && !hist.evaluations.length) {
        hist.evaluations = [{ iter: j.progress?.iter, attempt: j.attempts, bbox: j.metrics.bbox }];
      }
    }
    show(j);
  }, signal).catch((err) => {
    if (!signal.aborted && err.name !== "AbortError") problem.append(errorBox(err));
  });
}

function showEvaluations(box, evaluations, job) {
  const rows = [...evaluations];
  if (!rows.length && job.metrics && job.metrics.bbox) rows.push({ iter: null, attempt: job.attempts,
    bbox: job.metrics.bbox });
  if (!rows.length) {
    fill(box, empty(ACTIVE.includes(job.state) ? "The model is evaluated when training ends."
      : "This run has no evaluation."));
    return;
  }
  const keys = ["AP", "AP50", "AP75", "APs", "APm", "APl"].filter((k) => rows.some((r) => k in r.bbox));
  fill(box, h("div", { class: "table-wrap" }, h("table", { id: "evaluations-table" },
    h("thead", {}, h("tr", {}, h("th", {}, "iteration"), h("th", {}, "attempt"),
      keys.map((k) => h("th", { class: "num" }, k)))),
    h("tbody", {}, rows.map((r) => h("tr", {}, h("td", {}, r.iter ?? "—"), h("td", {}, r.attempt),
      keys.map((k) => h("td", { class: "num" }, pct(r.bbox[k])))))))));
}
