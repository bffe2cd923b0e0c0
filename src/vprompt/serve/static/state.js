/* state.js: the page's shared state: the open image, the undo history of snapshots, the
 * active object, the drag in progress and the server's models; object records and the pure
 * queries on them.
 *
 * State: an undo history of immutable snapshots {objects: [record…]}. A record holds one
 * object's prompts; editing an object makes a new record, so records are shared between
 * snapshots and a segmentation result attached to a record is valid wherever it appears.
 * Undo/redo just move through the history (masks come back instantly); only records without
 * a result are sent to the server.
 */

// Same palette as vprompt.segment.outputs.PALETTE, so page and CLI overlays agree.
const PALETTE = [
  [230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180],
  [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 190], [0, 128, 128],
  [170, 110, 40], [128, 0, 0], [170, 255, 195], [128, 128, 0], [0, 0, 128], [255, 225, 25],
];

export const image = {
  id: null, // server image_id
  width: 0,
  height: 0,
  bitmap: null,
  file: null,
  name: "",
  generation: 0, // bumps on every new image so late responses for an old one are dropped
};

// Module bindings cannot be reassigned by importers, so the mutable session lives in one object.
export const state = {
  nextObjectId: 1,
  history: [],
  historyIndex: -1,
  activeId: null,
  drag: null, // in-progress box or scribble
  models: null, // GET api/models
  // Class labels (labels.js): ids are never reused, so COCO category ids stay stable.
  labels: [{ id: 1, name: "object" }],
  nextLabelId: 2,
  activeLabel: 1,
  // How each object is drawn (appearance.js), by object id: {opacity, hidden}; not undoable.
  look: new Map(),
  preview: null, // {id, result}: a mask candidate shown while hovered (candidates.js)
  // Inspect mode (inspect.js): defect boxes marked on one image, kept with its File.
  inspect: { owner: null, boxes: [] },
};

let nextRev = 1;

export function emptyRecord(id, label = state.activeLabel) {
  return {
    id,
    label, // a state.labels id
    color: PALETTE[(id - 1) % PALETTE.length],
    points: [], // [x, y, label]
    box: null, // [x0, y0, x1, y1]
    scribbles: [], // {points: [[x, y]…], positive, width}
    mask: null, // COCO RLE prompt (objects that came from "Everything")
    prev: null, // logits token to send as `previous`
    result: null, // {uid, bits, area, bbox, score, stability, logits}
    shown: null, // result shown while this record's own result is on its way
    pendingRequest: false,
    failed: null,
    rev: nextRev++,
  };
}

export function editedRecord(old) {
  return {
    ...old,
    points: old.points.slice(),
    scribbles: old.scribbles.slice(),
    prev: old.result ? old.result.logits || null : old.prev,
    result: null,
    shown: old.result || old.shown,
    pendingRequest: false,
    failed: null,
    rev: nextRev++,
  };
}

/** The same object with another result or label, keeping its prompts (a new undo step). */
export function changedRecord(old, changes) {
  return { ...old, ...changes, rev: nextRev++ };
}

export const labelName = (id) => {
  const found = state.labels.find((l) => l.id === id);
  return found ? found.name : `label ${id}`;
};

export const hasPrompt = (rec) =>
  rec.points.length > 0 || rec.box !== null || rec.scribbles.length > 0 || rec.mask !== null;
export const displayed = (rec) => rec.result || (hasPrompt(rec) ? rec.shown : null);
/** What the overlay shows for a record: a hovered candidate, else its result. */
export const shownResult = (rec) =>
  state.preview && state.preview.id === rec.id ? state.preview.result : displayed(rec);
export const lookOf = (id) => state.look.get(id) || { opacity: 1, hidden: false };
export const current = () => state.history[state.historyIndex];
export const activeRecord = () => current().objects.find((r) => r.id === state.activeId) || null;

export function isEmptyState() {
  const objects = current().objects;
  return objects.length === 1 && !hasPrompt(objects[0]) && !displayed(objects[0]);
}

export const packs = () => (state.models && Array.isArray(state.models.packs) ? state.models.packs : []);

/** The prompts of one record as the API's object request (docs/serve-api.md). */
export function objectRequest(rec, withPrevious) {
  const out = {};
  if (rec.points.length) out.points = rec.points.map((p) => p.slice());
  if (rec.box) out.box = rec.box.slice();
  if (rec.scribbles.length) {
    out.scribbles = rec.scribbles.map((s) => ({
      points: s.points.map((p) => p.slice()),
      positive: s.positive,
      width: s.width,
    }));
  }
  if (rec.mask) out.mask = rec.mask;
  if (withPrevious && rec.prev) out.previous = rec.prev;
  return out;
}
