// Charts: live line curves (uPlot, vendored), grouped bars and bars with error bars (plain SVG, for a handful
// of values).
import { h } from "./dom.js";

const COLOURS = ["#2f6fed", "#e8590c", "#12805c", "#ae3ec9", "#c0362c", "#0b7285", "#5c940d", "#862e9c"];
const HEIGHT = 260;

// Curves over iterations whose series (loss names) may appear as the run goes. `add` appends one point;
// the chart keeps its size, so the page does not move while points arrive.
export class Curves {
  constructor(container, title, yLabel, { log = false } = {}) {
    this.container = container;
    this.title = title;
    this.yLabel = yLabel;
    this.log = log;
    this.names = [];
    this.xs = [];
    this.ys = {};
    this.plot = null;
    this.observer = new ResizeObserver(() => this.resize());
    this.observer.observe(container);
  }

  get points() {
    return this.xs.length;
  }

  add(x, values) {
    if (!Number.isFinite(x)) return;
    const last = this.xs.length ? this.xs[this.xs.length - 1] : -Infinity;
    if (x <= last) return; // SSE repeats the last record; history and events overlap
    let rebuild = !this.plot;
    for (const [k, v] of Object.entries(values)) {
      if (typeof v !== "number" || !Number.isFinite(v)) continue;
      if (!(k in this.ys)) {
        this.names.push(k);
        this.ys[k] = this.xs.map(() => null);
        rebuild = true;
      }
    }
    this.xs.push(x);
    for (const k of this.names) {
      const v = values[k];
      this.ys[k].push(typeof v === "number" && Number.isFinite(v) && (!this.log || v > 0) ? v : null);
    }
    if (rebuild) this.build();
    else this.plot.setData(this.data());
  }

  // Start again from these records (the history is the whole truth; events may skip some points).
  reset() {
    this.names = [];
    this.xs = [];
    this.ys = {};
    if (this.plot) this.plot.destroy();
    this.plot = null;
    this.container.replaceChildren();
  }

  data() {
    return [this.xs, ...this.names.map((k) => this.ys[k])];
  }

  width() {
    return Math.max(260, this.container.clientWidth - 4);
  }

  build() {
    if (this.plot) this.plot.destroy();
    const opts = {
      title: this.title,
      width: this.width(),
      height: HEIGHT,
      scales: { x: { time: false }, y: this.log ? { distr: 3 } : {} },
      axes: [{ label: "iteration" }, { label: this.yLabel, size: 60 }],
      series: [{ label: "iteration" },
        ...this.names.map((name, i) => ({ label: name, stroke: COLOURS[i % COLOURS.length], width: 1.6,
          spanGaps: true, points: { show: this.xs.length < 40 } }))],
      legend: { live: true },
    };
    this.container.replaceChildren();
    this.plot = new uPlot(opts, this.data(), this.container);
  }

  resize() {
    if (this.plot) this.plot.setSize({ width: this.width(), height: HEIGHT });
  }

  destroy() {
    this.observer.disconnect();
    if (this.plot) this.plot.destroy();
  }
}

// Grouped bars: categories along x, one bar per group in each; values null are left out (and said so).
export function bars(title, categories, groups, yLabel) {
  const W = 560, H = 280, left = 64, right = 12, top = 54, bottom = 44;
  const values = groups.flatMap((g) => g.values).filter((v) => typeof v === "number" && Number.isFinite(v));
  const max = values.length ? Math.max(...values) * 1.12 || 1 : 1;
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title });
  svg.append(el("text", { x: left, y: 18, "font-weight": "600" }, title));
  const plotW = W - left - right, plotH = H - top - bottom;
  for (let t = 0; t <= 4; t++) {
    const v = (max * t) / 4, y = top + plotH - (plotH * t) / 4;
    svg.append(el("line", { x1: left, x2: W - right, y1: y, y2: y, stroke: "#e3e6eb" }));
    svg.append(el("text", { x: left - 6, y: y + 4, "text-anchor": "end" }, tick(v, max)));
  }
  svg.append(el("text", { x: 12, y: top + plotH / 2, transform: `rotate(-90 12 ${top + plotH / 2})`,
    "text-anchor": "middle" }, yLabel));
  const slot = plotW / Math.max(1, categories.length);
  const barW = Math.min(34, (slot * 0.8) / groups.length);
  categories.forEach((cat, i) => {
    const x0 = left + i * slot + (slot - barW * groups.length) / 2;
    groups.forEach((g, j) => {
      const v = g.values[i];
      if (typeof v !== "number" || !Number.isFinite(v)) return;
      const bh = (plotH * v) / max;
      const bar = el("rect", { x: x0 + j * barW, y: top + plotH - bh, width: barW - 2, height: bh, fill: g.colour,
        class: "bar-rect" });
      bar.append(el("title", {}, `${g.label}, ${cat}: ${v.toFixed(4)}`));
      svg.append(bar);
    });
    svg.append(el("text", { x: left + i * slot + slot / 2, y: H - bottom + 18, "text-anchor": "middle" }, cat));
  });
  let lx = left; // the legend, on its own line under the title
  for (const g of groups) {
    svg.append(el("rect", { x: lx, y: 28, width: 10, height: 10, fill: g.colour }));
    svg.append(el("text", { x: lx + 14, y: 37 }, g.label));
    lx += 14 + g.label.length * 7 + 18;
  }
  return h("div", { class: "bars" }, svg);
}

// Horizontal bars with error bars: one bar per item (`mean`, whiskers at mean ± `std`), labels on the left so
// long row names stay readable; the item with `highlight` is drawn in green. Values are in the caller's unit.
export function intervals(title, items, xLabel) {
  const W = 560, row = 30, top = 34, bottom = 40, right = 96;
  const left = Math.min(190, 16 + 7 * Math.max(6, ...items.map((it) => it.label.length)));
  const H = top + row * items.length + bottom;
  const ends = items.flatMap((it) => [it.mean, it.mean + (it.std || 0)]).filter(Number.isFinite);
  const step = niceStep((ends.length ? Math.max(...ends) : 1) / 4 || 0.25);
  const max = step * Math.ceil((ends.length ? Math.max(...ends) : 1) / step || 1);
  const plotW = W - left - right;
  const x = (v) => left + (plotW * Math.max(0, v)) / max;
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title });
  svg.append(el("text", { x: 8, y: 18, "font-weight": "600" }, title));
  for (let v = 0; v <= max + step / 2; v += step) {
    svg.append(el("line", { x1: x(v), x2: x(v), y1: top - 4, y2: H - bottom, stroke: "#e3e6eb" }));
    svg.append(el("text", { x: x(v), y: H - bottom + 16, "text-anchor": "middle" }, String(+v.toFixed(3))));
  }
  svg.append(el("text", { x: left + plotW / 2, y: H - 6, "text-anchor": "middle" }, xLabel));
  items.forEach((it, i) => {
    const y = top + i * row, mid = y + row / 2;
    svg.append(el("text", { x: left - 8, y: mid + 4, "text-anchor": "end",
      "font-weight": it.highlight ? "600" : "400" }, it.label));
    if (!Number.isFinite(it.mean)) {
      svg.append(el("text", { x: left + 4, y: mid + 4, fill: "#667085" }, "no result"));
      return;
    }
    const bar = el("rect", { x: left, y: y + 6, width: Math.max(1, x(it.mean) - left), height: row - 12,
      fill: it.highlight ? "#12805c" : it.colour || "#2f6fed", class: "bar-rect" });
    bar.append(el("title", {}, `${it.label}: ${it.mean.toFixed(2)} ± ${(it.std || 0).toFixed(2)}`));
    svg.append(bar);
    const lo = x(it.mean - (it.std || 0)), hi = x(it.mean + (it.std || 0));
    const whisker = el("g", { class: "error-bar", stroke: "#1d2330", "stroke-width": 1.4 });
    whisker.append(el("line", { x1: lo, x2: hi, y1: mid, y2: mid }),
      el("line", { x1: lo, x2: lo, y1: mid - 6, y2: mid + 6 }),
      el("line", { x1: hi, x2: hi, y1: mid - 6, y2: mid + 6 }));
    svg.append(whisker);
    svg.append(el("text", { x: hi + 6, y: mid + 4 }, `${it.mean.toFixed(1)} ± ${(it.std || 0).toFixed(1)}`));
  });
  return h("div", { class: "bars" }, svg);
}

// The smallest of 1, 2, 2.5, 5 times a power of ten that is at least `raw`: round tick steps.
function niceStep(raw) {
  const power = 10 ** Math.floor(Math.log10(raw));
  return [1, 2, 2.5, 5, 10].map((m) => m * power).find((s) => s >= raw);
}

function el(tag, attrs, text) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function tick(v, max) {
  if (v === 0) return "0";
  return max < 0.01 ? v.toExponential(1) : v.toFixed(max < 0.1 ? 3 : 2);
}
