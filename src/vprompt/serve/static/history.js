/* history.js: undo/redo and every undoable edit: editing the active object, clear, new and
 * delete object. Each edit pushes a snapshot (state.js), redraws and segments what changed.
 */
import { clearError, setStatus } from "./dom.js";
import { renderAll } from "./render.js";
import { segmentPending } from "./segment.js";
import { current, editedRecord, emptyRecord, image, isEmptyState, state } from "./state.js";

const HISTORY_LIMIT = 200;

export function resetHistory() {
  state.nextObjectId = 1;
  const first = emptyRecord(state.nextObjectId++);
  state.history = [{ objects: [first] }];
  state.historyIndex = 0;
  state.activeId = first.id;
}

export function pushSnapshot(objects, label) {
  state.history = state.history.slice(0, state.historyIndex + 1);
  state.history.push({ objects, label });
  if (state.history.length > HISTORY_LIMIT) state.history.shift();
  state.historyIndex = state.history.length - 1;
  fixActive();
}

function fixActive() {
  const objects = current().objects;
  if (!objects.some((r) => r.id === state.activeId)) state.activeId = objects[objects.length - 1].id;
}

/** Apply `mutate` to a copy of the active object's record, as one undoable step. */
export function editActive(mutate, label) {
  if (!image.id) return;
  const objects = current().objects.slice();
  const index = objects.findIndex((r) => r.id === state.activeId);
  if (index < 0) return;
  const rec = editedRecord(objects[index]);
  mutate(rec);
  objects[index] = rec;
  pushSnapshot(objects, label);
  clearError();
  renderAll();
  segmentPending();
}

export function undo() {
  if (state.historyIndex <= 0 || state.drag) return;
  state.historyIndex -= 1;
  afterHistoryMove("Undo");
}

export function redo() {
  if (state.historyIndex >= state.history.length - 1 || state.drag) return;
  state.historyIndex += 1;
  afterHistoryMove("Redo");
}

function afterHistoryMove(what) {
  fixActive();
  for (const rec of current().objects) rec.failed = null; // retry what failed before
  renderAll();
  setStatus(`${what}: step ${state.historyIndex} of ${state.history.length - 1}`);
  segmentPending();
}

export function clearAll() {
  if (!image.id || isEmptyState()) return;
  state.nextObjectId = Math.max(state.nextObjectId, 2);
  const fresh = emptyRecord(1);
  pushSnapshot([fresh], "clear");
  state.activeId = fresh.id;
  clearError();
  renderAll();
  setStatus("Cleared all prompts and masks (Ctrl+Z brings them back)");
}

export function newObject() {
  if (!image.id) return;
  const rec = emptyRecord(state.nextObjectId++);
  pushSnapshot([...current().objects, rec], "new object");
  state.activeId = rec.id;
  renderAll();
  setStatus(`Object ${rec.id} is active: add prompts for it`);
}

export function deleteObject() {
  if (!image.id) return;
  let objects = current().objects.filter((r) => r.id !== state.activeId);
  if (objects.length === current().objects.length) return;
  if (objects.length === 0) {
    if (isEmptyState()) return;
    objects = [emptyRecord(state.nextObjectId++)];
  }
  pushSnapshot(objects, "delete object");
  renderAll();
}
