/* render.js: redraws the page from the state: renderAll (canvases, object list, candidates,
 * controls), the object list in the side panel (selecting the active object; each row with
 * its label, hide / show and opacity) and which controls are enabled.
 */
import { setHidden, setOpacity } from "./appearance.js";
import { renderCandidates } from "./candidates.js";
import { el, fmtScore } from "./dom.js";
import { setObjectLabel } from "./labels.js";
import { renderImage, renderOverlay, renderPrompts } from "./overlay.js";
import { current, displayed, image, isEmptyState, labelName, lookOf, packs, state } from "./state.js";

export function renderAll() {
  if (!state.history.length) {
    updateControls();
    return;
  }
  renderImage();
  renderOverlay();
  renderPrompts();
  renderObjectList();
  renderCandidates();
  updateControls();
}

function selectObject(id) {
  state.activeId = id;
  renderAll();
}

export function renderObjectList() {
  const focused = document.activeElement;
  const focusKey = focused && focused.dataset ? focused.dataset.focusKey : undefined;
  const items = current().objects.map((rec, index) => {
    const li = document.createElement("li");
    const look = lookOf(rec.id);
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.objectId = String(rec.id);
    button.dataset.testid = `object-${rec.id}`;
    button.dataset.focusKey = `object-${rec.id}`;
    button.setAttribute("aria-pressed", String(rec.id === state.activeId));
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = `rgb(${rec.color.join(",")})`;
    swatch.setAttribute("aria-hidden", "true");
    const name = document.createElement("span");
    name.textContent = `Object ${rec.id}`;
    const tag = document.createElement("span");
    tag.className = "tag";
    tag.dataset.testid = `object-label-${rec.id}`;
    tag.textContent = labelName(rec.label);
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
    button.append(swatch, name, tag, meta);
    button.addEventListener("click", () => selectObject(rec.id));

    const controls = document.createElement("div");
    controls.className = "object-controls";
    const select = document.createElement("select");
    select.dataset.testid = `object-label-select-${rec.id}`;
    select.dataset.focusKey = `label-select-${rec.id}`;
    select.setAttribute("aria-label", `Label of object ${rec.id}`);
    select.title = `Label of object ${rec.id}`;
    for (const label of state.labels) {
      const option = document.createElement("option");
      option.value = String(label.id);
      option.textContent = label.name;
      option.selected = label.id === rec.label;
      select.append(option);
    }
    select.addEventListener("change", () => setObjectLabel(rec.id, Number(select.value)));
    const hide = document.createElement("button");
    hide.type = "button";
    hide.className = "small";
    hide.dataset.testid = `object-hide-${rec.id}`;
    hide.dataset.focusKey = `hide-${rec.id}`;
    hide.setAttribute("aria-pressed", String(look.hidden));
    hide.setAttribute("aria-label", `Hide object ${rec.id}`);
    hide.title = `Hide object ${rec.id} on the image (exports keep it)`;
    hide.textContent = look.hidden ? "Hidden" : "Hide";
    hide.addEventListener("click", () => {
      setHidden(rec.id, !lookOf(rec.id).hidden);
      renderObjectList();
    });
    const opacity = document.createElement("input");
    opacity.type = "range";
    opacity.min = "0";
    opacity.max = "1";
    opacity.step = "0.05";
    opacity.value = String(look.opacity);
    opacity.dataset.testid = `object-opacity-${rec.id}`;
    opacity.dataset.focusKey = `opacity-${rec.id}`;
    opacity.setAttribute("aria-label", `Mask opacity of object ${rec.id}`);
    opacity.title = `Mask opacity of object ${rec.id}`;
    opacity.addEventListener("input", () => setOpacity(rec.id, opacity.value));
    controls.append(select, hide, opacity);
    li.append(button, controls);
    return li;
  });
  el.objectList.replaceChildren(...items);
  if (focusKey !== undefined) {
    const again = el.objectList.querySelector(`[data-focus-key="${focusKey}"]`);
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
  // Session save and the per-image exports cover every queued image (exporters.js checks masks).
  el.saveSession.disabled = !ready;
  el.exportYolo.disabled = !ready;
  el.exportVoc.disabled = !ready;
  el.newObject.disabled = !ready;
  el.deleteObject.disabled = !ready || (current().objects.length === 1 && isEmptyState());
  const canClassify =
    Boolean(image.file) && Boolean(models) && (Boolean(models.classifier) || packs().length > 0);
  el.classifyButton.disabled = !canClassify;
  // Inspect mode (inspect.js): marks belong to the open image's file.
  el.findSimilar.disabled = !ready;
  el.clearMarks.disabled = !(state.inspect.owner === image.file && state.inspect.boxes.length);
}
