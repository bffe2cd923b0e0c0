/* labels.js: the class label list (Label Studio / CVAT style): add and rename labels, choose
 * the active one (new objects take it; so does the active object while it has no prompts),
 * and give an object another label (one undo step). Label ids are never reused, so they are
 * the COCO category ids of the export; names come from the list.
 */
import { el } from "./dom.js";
import { pushSnapshot } from "./history.js";
import { renderAll } from "./render.js";
import { activeRecord, changedRecord, current, displayed, hasPrompt, image, state } from "./state.js";

export function addLabel(name) {
  const id = state.nextLabelId++;
  const clean = (name || "").trim();
  state.labels.push({ id, name: clean || `label ${id}` });
  setActiveLabel(id);
  return id;
}

export function renameLabel(id, name) {
  const label = state.labels.find((l) => l.id === id);
  const clean = (name || "").trim();
  if (!label || !clean) {
    renderLabels(); // put the old name back
    return;
  }
  label.name = clean;
  renderAll();
  renderLabels();
}

export function setActiveLabel(id) {
  if (!state.labels.some((l) => l.id === id)) return;
  state.activeLabel = id;
  const rec = image.id && state.history.length ? activeRecord() : null;
  if (rec && !hasPrompt(rec) && !displayed(rec)) rec.label = id; // nothing to undo yet
  renderAll();
  renderLabels();
}

/** Give object `objectId` the label `labelId`, keeping its prompts and mask (undoable). */
export function setObjectLabel(objectId, labelId) {
  const objects = current().objects.slice();
  const index = objects.findIndex((r) => r.id === objectId);
  if (index < 0 || objects[index].label === labelId) return;
  objects[index] = changedRecord(objects[index], { label: labelId });
  pushSnapshot(objects, "label");
  renderAll();
}

export function renderLabels() {
  const focused = document.activeElement;
  const focusKey = focused && focused.dataset ? focused.dataset.focusKey : undefined;
  const items = state.labels.map((label) => {
    const li = document.createElement("li");
    const radio = document.createElement("input");
    radio.type = "radio";
    radio.name = "active-label";
    radio.checked = label.id === state.activeLabel;
    radio.dataset.testid = `label-${label.id}`;
    radio.dataset.focusKey = `label-${label.id}`;
    radio.setAttribute("aria-label", `Use “${label.name}” for new objects`);
    radio.title = "Active label: new objects get it";
    radio.addEventListener("change", () => setActiveLabel(label.id));
    const name = document.createElement("input");
    name.type = "text";
    name.value = label.name;
    name.dataset.testid = `label-name-${label.id}`;
    name.setAttribute("aria-label", `Name of label ${label.id}`);
    name.title = `Rename label ${label.id} (COCO category id ${label.id})`;
    name.addEventListener("change", () => renameLabel(label.id, name.value));
    const id = document.createElement("span");
    id.className = "meta";
    id.textContent = `#${label.id}`;
    id.setAttribute("aria-hidden", "true");
    li.append(radio, name, id);
    return li;
  });
  el.labelList.replaceChildren(...items);
  if (focusKey) {
    const again = el.labelList.querySelector(`[data-focus-key="${focusKey}"]`);
    if (again) again.focus();
  }
}

/** Choose the k-th label (1-based, keys 1-9). */
export function chooseLabelByIndex(k) {
  const label = state.labels[k - 1];
  if (label) setActiveLabel(label.id);
}

export function wireLabels() {
  el.labelForm.addEventListener("submit", (event) => {
    event.preventDefault();
    addLabel(el.newLabel.value);
    el.newLabel.value = "";
  });
  renderLabels();
}
