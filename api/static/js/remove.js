// The delete action of a resource page: one click arms it, a second deletes (no modal dialog to dismiss). A
// refusal (409: something still uses it) is shown beside the button with the holders, each linked when the
// dashboard has a page for it.
import { api } from "./api.js";
import { errorBox, h } from "./dom.js";

const PAGE_OF = { job: "jobs", dep: "deployments", ds: "datasets", mdl: "models", study: "studies" };

function holderLink(holder) {
  const name = holder.includes("/") ? holder.split("/")[1] : holder; // deployments: tenant/name
  const page = holder.includes("/") ? "deployments" : PAGE_OF[holder.split("_")[0]];
  return page ? h("a", { href: `#/${page}/${encodeURIComponent(name)}` }, holder) : holder;
}

// A "Delete" button for DELETE `path`; `done()` runs once it is gone (e.g. back to the list).
export function deleteButton(path, what, done) {
  const box = h("div", { class: "delete-result" });
  let armed = false;
  const button = h("button", { type: "button", class: "danger", id: "delete-button", onclick: async () => {
    if (!armed) {
      armed = true;
      button.textContent = `Really delete this ${what}?`;
      return;
    }
    button.disabled = true;
    box.replaceChildren();
    try {
      await api(path, { method: "DELETE" });
      done();
    } catch (err) {
      const holders = (err.details && err.details.holders) || [];
      box.append(errorBox(err));
      if (holders.length) {
        box.append(h("p", { id: "delete-holders" }, "Still used by: ",
          holders.flatMap((x, i) => (i ? [", ", holderLink(x)] : [holderLink(x)]))));
      }
      armed = false;
      button.disabled = false;
      button.textContent = `Delete ${what}`;
    }
  } }, `Delete ${what}`);
  return h("div", { class: "delete-action" }, button, box);
}
