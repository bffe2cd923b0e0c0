/* render.js: redraws the page from the state: renderAll (canvases, object list, controls),
 * the object list in the side panel (selecting the active object) and which controls are
 * enabled.
 */
import { el, fmtScore } from "./dom.js";
import { renderImage, renderOverlay, renderPrompts } from "./overlay.js";
import { current, displayed, image, isEmptyState, packs, state } from "./state.js";

export function renderAll() {
  if (!state.history.length) {
    updateControls();
    return;
  }
  renderImage();
  renderOverlay();
  renderPrompts();
  renderObjectList();
  updateControls();
}

function selectObject(id) {
  state.activeId = id;
  renderAll();
}

export function renderObjectList() {
  const focused = document.activeElement;
  const focusedId = focused && focused.dataset ? focused.dataset.objectId : undefined;
  const items = current().objects.map((rec, index) => {
    const li = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.objectId = String(rec.id);
    button.dataset.testid = `object-${rec.id}`;
    button.setAttribute("aria-pressed", String(rec.id === state.activeId));
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = `rgb(${rec.color.join(",")})`;
    swatch.setAttribute("aria-hidden", "true");
    const name = document.createElement("span");
    name.textContent = `Object ${rec.id}`;
    const meta = document.createElement("span");
    meta.className = "meta";
    const res = displayed(rec);
    if (rec.pendingRequest) meta.textContent = "segmenting…";
    else if (rec.failed) meta.textContent = "failed";
    else if (res) {
      meta.textContent =
        `${res.area.toLocaleString()} px` +
        (typeof res.score === "number" ? ` · ${fmtScore(res.score)}` : "");
    } else meta.textContent = "no prompts";
    button.title = `Select object ${rec.id} (label ${index + 1} in the exported label image)`;
    button.append(swatch, name, meta);
    button.addEventListener("click", () => selectObject(rec.id));
    li.append(button);
    return li;
  });
  el.objectList.replaceChildren(...items);
  if (focusedId !== undefined) {
    const again = el.objectList.querySelector(`[data-object-id="${focusedId}"]`);
    if (again) again.focus();
  }
}

export function updateControls() {
  const { history, historyIndex, models } = state;
  const ready = Boolean(image.id) && history.length > 0;
  const anyMask = ready && current().objects.some((r) => displayed(r));
  el.undo.disabled = !ready || historyIndex <= 0;
  el.redo.disabled = !ready || historyIndex >= history.length - 1;
  el.clear.disabled = !ready || isEmptyState();
  el.automatic.disabled = !ready;
  el.exportPng.disabled = !anyMask;
  el.exportCoco.disabled = !anyMask;
  el.newObject.disabled = !ready;
  el.deleteObject.disabled = !ready || (current().objects.length === 1 && isEmptyState());
  const canClassify =
    Boolean(image.file) && Boolean(models) && (Boolean(models.classifier) || packs().length > 0);
  el.classifyButton.disabled = !canClassify;
}
