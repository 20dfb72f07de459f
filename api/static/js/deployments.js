// Deployments: a stable name for the model that serves it. The list with what each name serves, a form to
// name a model; one deployment's page with its history, a form to switch it to another model (refused, with
// the reason, when the classes or input size differ), a rollback button and a delete action.
import { api } from "./api.js";
import { empty, errorBox, facts, fill, h, when } from "./dom.js";
import { deleteButton } from "./remove.js";

export async function render(main, { id, signal }) {
  if (id) return renderOne(main, id, signal);
  const [{ deployments }, { models }] = await Promise.all([api("/v1/deployments", { signal }),
    api("/v1/models", { signal })]);
  fill(main, h("h1", {}, "Deployments"),
    h("div", { class: "card" }, deployments.length
      ? h("div", { class: "table-wrap" }, h("table", { id: "deployments-table" },
        h("thead", {}, h("tr", {}, h("th", {}, "name"), h("th", { class: "num" }, "version"), h("th", {}, "model"),
          h("th", { class: "hide-narrow" }, "switched"), h("th", { class: "hide-narrow" }, "by"))),
        h("tbody", {}, deployments.map((d) => h("tr", {},
          h("td", {}, h("a", { href: `#/deployments/${encodeURIComponent(d.name)}` }, d.name)),
          h("td", { class: "num" }, `v${d.version}`),
          h("td", {}, h("a", { href: `#/models/${d.model_id}`, class: "mono" }, d.model_id)),
          h("td", { class: "hide-narrow" }, when(d.updated_at)), h("td", { class: "hide-narrow" }, d.updated_by))))))
      : empty("No deployment yet: name a model below, then call POST /v1/deployments/<name>/detect.",
        "ldd deployments create blood-cells mdl_...")),
    createForm(models));
}

function modelSelect(models, id) {
  return h("select", { id, required: true }, models.map((m) =>
    h("option", { value: m.id }, `${m.name || m.id} (${m.format || "fp32"}, ${(m.classes || []).join(", ")})`)));
}

function createForm(models) {
  const name = h("input", { id: "deployment-name", required: true, pattern: "[a-z0-9][a-z0-9._\\-]{0,63}",
    placeholder: "blood-cells", size: 24 });
  const model = modelSelect(models, "deployment-model");
  const result = h("div", {});
  const form = h("form", { class: "row", id: "deployment-form", onsubmit: async (e) => {
    e.preventDefault();
    result.replaceChildren();
    try {
      const d = await api("/v1/deployments", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ name: name.value.trim(), model: model.value }) });
      location.hash = `#/deployments/${encodeURIComponent(d.name)}`;
    } catch (err) {
      result.append(errorBox(err));
    }
  } }, name, model, h("button", { class: "primary", type: "submit" }, "Create"));
  return h("div", { class: "card" }, h("h2", {}, "Name a model"), result,
    models.length ? form : empty("Publish a model first."));
}

async function renderOne(main, name, signal) {
  const path = `/v1/deployments/${encodeURIComponent(name)}`;
  const [d, { models }] = await Promise.all([api(path, { signal }), api("/v1/models", { signal })]);
  const result = h("div", { id: "deployment-result" });
  const act = async (request) => {
    result.replaceChildren();
    try {
      await request();
      await renderOne(main, name, signal);
    } catch (err) {
      result.append(errorBox(err));
    }
  };
  const model = modelSelect(models.filter((m) => m.id !== d.model_id), "switch-model");
  const switchForm = h("form", { class: "row", id: "switch-form", onsubmit: (e) => {
    e.preventDefault();
    act(() => api(path, { method: "PUT", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: model.value }) }));
  } }, model, h("button", { class: "primary", type: "submit", id: "switch" }, "Switch to this model"));
  const earlier = d.history.some((v) => v.version < d.version);
  fill(main,
    h("h1", {}, d.name, h("span", { class: "muted" }, `version ${d.version}`)),
    result,
    h("div", { class: "grid2" },
      h("div", { class: "card" }, h("h2", {}, "Now serving"), facts([
        ["model", h("a", { href: `#/models/${d.model_id}`, class: "mono", id: "current-model" }, d.model_id)],
        ["version", `v${d.version}`], ["switched", when(d.updated_at)], ["by", d.updated_by],
        ["detect", h("code", {}, `POST ${path}/detect`)],
      ]), h("div", { class: "row", style: "margin-top: 12px" },
        h("button", { type: "button", id: "rollback", disabled: !earlier,
          onclick: () => act(() => api(`${path}/rollback`, { method: "POST" })) }, "Roll back to the previous version"),
        deleteButton(path, "deployment", () => { location.hash = "#/deployments"; }))),
      h("div", { class: "card" }, h("h2", {}, "Switch"), h("p", { class: "muted" },
        "The new model is loaded and warmed before the switch; requests in flight finish on the old one."),
      models.length > 1 ? switchForm : empty("No other model to switch to."))),
    h("div", { class: "card" }, h("h2", {}, "History"), h("table", { id: "history-table" },
      h("thead", {}, h("tr", {}, h("th", {}, "version"), h("th", {}, "model"), h("th", {}, "when"),
        h("th", {}, "by"))),
      h("tbody", {}, d.history.map((v) => h("tr", { class: v.version === d.version ? "current" : null },
        h("td", {}, `v${v.version}`, v.version === d.version ? " (current)" : ""),
        h("td", {}, h("a", { href: `#/models/${v.model_id}`, class: "mono" }, v.model_id)),
        h("td", {}, when(v.created_at)), h("td", {}, v.created_by)))))));
}
