// The dashboard's shell: hash routes (#/datasets, #/jobs/<id>, ...), the navigation and the API key.
import { ApiError, getKey, needsKey, setKey } from "./api.js";
import { errorBox, fill, h } from "./dom.js";
import * as datasets from "./datasets.js";
import * as deployments from "./deployments.js";
import * as distill from "./distill.js";
import * as jobs from "./jobs.js";
import * as models from "./models.js";
import * as studies from "./studies.js";

const PAGES = { datasets, jobs, distill, models, deployments, studies };
const main = document.getElementById("main");
let current = null; // the AbortController of the page on screen: leaving it stops its polls and streams

function parseRoute() {
  const [path, query] = (location.hash.replace(/^#\/?/, "") || "datasets").split("?");
  const [page, id] = path.split("/");
  return { page: PAGES[page] ? page : "datasets", id: id ? decodeURIComponent(id) : null,
    query: new URLSearchParams(query || "") };
}

async function route() {
  if (current) current.abort();
  current = new AbortController();
  const { signal } = current;
  const { page, id, query } = parseRoute();
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.dataset.page === page);
  let keyed;
  try {
    keyed = await needsKey();
  } catch (err) {
    fill(main, errorBox(err));
    return;
  }
  showKeyBox(keyed);
  if (keyed && !getKey()) {
    askKey();
    return;
  }
  try {
    await PAGES[page].render(main, { id, query, signal });
  } catch (err) {
    if (signal.aborted || (err && err.name === "AbortError")) return;
    if (err instanceof ApiError && err.status === 401) {
      setKey("");
      askKey("The service refused that API key (401 unauthorized). Check it and try again.");
      return;
    }
    fill(main, errorBox(err));
  }
}

function showKeyBox(keyed) {
  const box = document.getElementById("key-box");
  box.hidden = !keyed;
  if (!keyed) return;
  const key = getKey();
  fill(box, key ? `API key …${key.slice(-4)}` : "no API key",
    key ? h("button", { type: "button", id: "forget-key", onclick: () => { setKey(""); route(); } }, "change")
      : null);
}

function askKey(problem) {
  showKeyBox(true);
  const input = h("input", { id: "api-key", type: "password", autocomplete: "off", placeholder: "API key",
    size: 36, required: true });
  const form = h("form", { class: "row", onsubmit: (e) => {
    e.preventDefault();
    setKey(input.value.trim());
    route();
  } }, input, h("button", { class: "primary", type: "submit", id: "use-key" }, "Use this key"));
  fill(main, h("div", { class: "card", style: "max-width: 560px" },
    h("h2", {}, "This service needs an API key"),
    problem ? h("div", { class: "error", role: "alert", id: "key-error" }, problem) : null,
    h("p", { class: "muted" }, "Ask whoever runs the service for one (LDD_API_KEYS). It is kept in this browser ",
      "tab only (session storage) and sent as ", h("code", {}, "Authorization: Bearer"), "."),
    form));
  input.focus();
}

window.addEventListener("hashchange", route);
route();
