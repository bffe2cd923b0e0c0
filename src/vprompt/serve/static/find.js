/* find.js: find mode (docs/serve-api.md, POST api/images/{id}/find), shown only when the server
 * has a detector (api/models): the "find" box takes comma-separated words or phrases (Enter
 * runs), the Example tool draws example boxes on the open image (positive, or negative where the
 * detector takes them) and "Find similar" finds every object like them. Found objects are drawn
 * on the image (box, query and score, mask when the server made one) and listed in the panel;
 * "Add as objects" turns them into ordinary objects (one undo step) for editing and export.
 */
import { postJson, uploadFile } from "./api.js";
import { changePending } from "./busy.js";
import { clearError, el, fmtScore, setStatus, showError } from "./dom.js";
import { pushSnapshot } from "./history.js";
import { renderLabels } from "./labels.js";
import { bitsResult } from "./masks.js";
import { promptLayers, renderPrompts } from "./overlay.js";
import { renderAll } from "./render.js";
import { decodeRle } from "./rle.js";
import { segmentPending } from "./segment.js";
import { current, displayed, emptyRecord, hasPrompt, image, state } from "./state.js";

const COLORS = [
  [255, 196, 0], [0, 200, 255], [255, 64, 160], [120, 230, 60], [180, 120, 255], [255, 120, 40],
];
const POSITIVE_COLOR = "#00b4d8";
const NEGATIVE_COLOR = "#d62828";
const MASK_ALPHA = 110;
// One segment request carries at most the server's max_objects (32 by default) box prompts.
const MAX_BOX_OBJECTS = 32;

/** Example boxes and the last result, both for the image whose File is `owner`. */
const find = { owner: null, examples: [], result: null, maskCanvas: null };

const detector = () => (state.models && state.models.detector) || null;
export const hasDetector = () => detector() !== null;

/** Forget the examples and results when another image is shown. */
function own() {
  if (find.owner === image.file) return;
  Object.assign(find, { owner: image.file, examples: [], result: null, maskCanvas: null });
  renderResults();
}

/** Show the panel (and the negative-example switch, the masks option) as the detector allows. */
export function setupFind() {
  const info = detector();
  el.findPanel.hidden = !info;
  if (!info) return;
  const caps = info.capabilities || {};
  el.findForm.hidden = !caps.text;
  for (const node of [el.findExamples, document.getElementById("tool-example"), el.clearExamples]) {
    node.hidden = !caps.exemplars;
  }
  el.exampleNegativeLabel.hidden = !caps.negative_exemplars;
  el.findMasks.hidden = el.findMasksLabel.hidden = !caps.masks;
  el.findThreshold.placeholder = String(info.score_threshold);
  el.modelInfo.append(` Detector: ${info.name}${info.weights ? ` (${info.weights})` : ""}.`);
}

export function addExample(box) {
  own();
  find.examples.push({ box, positive: !el.exampleNegative.checked });
  renderPrompts();
  renderControls();
  const n = find.examples.length;
  setStatus(`Example ${n} marked: press "Find similar" (more boxes add up)`);
}

export function clearExamples() {
  find.examples = [];
  renderPrompts();
  renderControls();
}

export function clearResults() {
  find.result = null;
  find.maskCanvas = null;
  renderResults();
  renderPrompts();
}

function numberField(input) {
  const v = Number(input.value);
  return input.value !== "" && Number.isFinite(v) ? v : null;
}

/** The request's options from the panel (empty fields: the detector's defaults). */
function options() {
  const out = { format: "rle" };
  const threshold = numberField(el.findThreshold);
  if (threshold !== null) out.score_threshold = threshold;
  const topk = numberField(el.findTopk);
  if (topk !== null) out.top_k = Math.round(topk);
  const caps = (detector() && detector().capabilities) || {};
  out.masks = Boolean(caps.masks) && el.findMasks.checked;
  return out;
}

/** The "find" box submitted: every comma-separated query. */
export async function findFromText(event) {
  if (event) event.preventDefault();
  const queries = el.findQueries.value.split(",").map((q) => q.trim()).filter(Boolean);
  if (!queries.length) {
    showError("Type what to find, e.g. “a red mug, a spoon” (commas separate queries)");
    return;
  }
  await runFind(() => ({ queries }), queries.map((q) => `“${q}”`).join(", "), queries.length);
}

/** "Find similar": every object like the example boxes of the open image. */
export async function findFromExamples() {
  own();
  const examples = find.examples.slice();
  if (!examples.length) {
    showError("Draw a box around an example object first (the Example tool, G)");
    return;
  }
  await runFind(
    () => ({
      exemplars: examples.map((e) => ({ image_id: image.id, box: e.box.slice(), positive: e.positive })),
    }),
    `${examples.length} example(s)`,
    0
  );
}

/** POST the request built by `what()` (again, with the new id, if the server lost the image). */
async function runFind(what, description, textCount) {
  if (!image.id) {
    showError("Open an image first");
    return;
  }
  own();
  clearError();
  const generation = image.generation;
  const url = () => `api/images/${encodeURIComponent(image.id)}/find`;
  changePending(+1);
  setStatus(`Finding ${description}…`);
  try {
    let response;
    try {
      response = await postJson(url(), { ...what(), ...options() });
    } catch (err) {
      if (err.code !== "image_not_found" || !image.file) throw err;
      const info = await uploadFile(image.file);
      if (generation !== image.generation) return;
      image.id = info.image_id;
      response = await postJson(url(), { ...what(), ...options() });
    }
    if (generation !== image.generation) return;
    const detections = (response.detections || []).map((d) => ({
      ...d,
      bits: d.mask ? decodeRle(d.mask, image.width, image.height) : null,
    }));
    find.result = { queries: response.queries || [], detections, textCount, description };
    find.maskCanvas = composeMasks(detections);
    renderResults();
    renderPrompts();
    setStatus(
      detections.length
        ? `Found ${detections.length} object(s) for ${description}; best ${fmtScore(detections[0].score)}`
        : `Nothing found for ${description} above the score threshold (lower "min score")`
    );
  } catch (err) {
    showError(err.message);
    setStatus("Find failed");
  } finally {
    changePending(-1);
  }
}

const colorOf = (label) => COLORS[label % COLORS.length];

/** Every returned mask at image resolution in its label's colour, composed once. */
function composeMasks(detections) {
  const withMasks = detections.filter((d) => d.bits);
  if (!withMasks.length) return null;
  const canvas = document.createElement("canvas");
  canvas.width = image.width;
  canvas.height = image.height;
  const ctx = canvas.getContext("2d");
  const data = ctx.createImageData(image.width, image.height);
  const px = data.data;
  // Worst first, so the best detections end up on top.
  for (const d of withMasks.slice().reverse()) {
    const [r, g, b] = colorOf(d.label);
    for (let i = 0; i < d.bits.length; i++) {
      if (!d.bits[i]) continue;
      px[i * 4] = r;
      px[i * 4 + 1] = g;
      px[i * 4 + 2] = b;
      px[i * 4 + 3] = MASK_ALPHA;
    }
  }
  ctx.putImageData(data, 0, 0);
  return canvas;
}

/** The prompt-canvas layer: example boxes, found boxes with their query and score, masks. */
function drawFind(ctx, u, px) {
  if (find.owner !== image.file) {
    if (find.result || find.examples.length) own(); // another image is shown: start afresh
    return;
  }
  const result = find.result;
  if (find.maskCanvas) {
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(find.maskCanvas, 0, 0, image.width, image.height);
  }
  if (result) {
    const size = 11 * px * u;
    const pad = 3 * px * u;
    ctx.font = `${size}px system-ui, sans-serif`;
    ctx.textBaseline = "top";
    // Worst first, so the best boxes and their tags end up on top.
    for (const d of result.detections.slice().reverse()) {
      const [x0, y0, x1, y1] = d.box;
      const color = colorOf(d.label);
      ctx.lineWidth = 2 * px * u;
      ctx.strokeStyle = `rgb(${color.join(", ")})`;
      ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
      const text = `${d.query} ${fmtScore(d.score)}`;
      const w = ctx.measureText(text).width + 2 * pad;
      const h = size + 2 * pad;
      const tx = Math.min(Math.max(0, x0), Math.max(0, image.width - w));
      const ty = y0 >= h ? y0 - h : y0;
      ctx.fillStyle = "rgba(0, 0, 0, 0.7)";
      ctx.fillRect(tx, ty, w, h);
      ctx.fillStyle = `rgb(${color.join(", ")})`;
      ctx.fillText(text, tx + pad, ty + pad);
    }
  }
  ctx.lineWidth = 3 * px * u;
  ctx.setLineDash([5 * px * u, 3 * px * u]);
  for (const e of find.examples) {
    const [x0, y0, x1, y1] = e.box;
    ctx.strokeStyle = e.positive ? POSITIVE_COLOR : NEGATIVE_COLOR;
    ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
  }
}
promptLayers.push(drawFind);

function renderControls() {
  el.clearExamples.disabled = !find.examples.length || find.owner !== image.file;
  const has = Boolean(find.result && find.result.detections.length) && find.owner === image.file;
  el.findToObjects.disabled = !has;
  el.findClear.disabled = !find.result;
}

/** The side panel's list of the found objects, best first. */
function renderResults() {
  const result = find.owner === image.file ? find.result : null;
  const rows = (result ? result.detections : []).map((d, k) => {
    const li = document.createElement("li");
    li.dataset.testid = `find-result-${k}`;
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = `rgb(${colorOf(d.label).join(",")})`;
    swatch.setAttribute("aria-hidden", "true");
    const [x0, y0, x1, y1] = d.box.map((v) => Math.round(v));
    li.append(swatch, ` ${d.query} — ${fmtScore(d.score)}`);
    li.title = `box ${x0}, ${y0} – ${x1}, ${y1}${d.bits ? `, mask ${d.area} px` : ""}`;
    return li;
  });
  el.findResults.replaceChildren(...rows);
  renderControls();
}

/** The label for a found object: the text query's own (created if new), else the active one. */
function labelFor(d, textCount) {
  if (d.label >= textCount) return state.activeLabel;
  const name = d.query.trim();
  const found = state.labels.find((l) => l.name.toLowerCase() === name.toLowerCase());
  if (found) return found.id;
  const id = state.nextLabelId++;
  state.labels.push({ id, name });
  return id;
}

/** "Add as objects": each found object becomes an object with its mask, or with its box as
 * the prompt (segmented by the server like any box). One undo step. */
export function addAsObjects() {
  own();
  const result = find.result;
  if (!result || !result.detections.length || !state.history.length) return;
  const withMask = result.detections.filter((d) => d.bits);
  const boxesOnly = result.detections.filter((d) => !d.bits).slice(0, MAX_BOX_OBJECTS);
  const kept = current().objects.filter((r) => hasPrompt(r) || displayed(r));
  const firstId = state.nextObjectId;
  const added = [...withMask, ...boxesOnly].map((d) => {
    const rec = emptyRecord(state.nextObjectId++, labelFor(d, result.textCount));
    if (d.bits) {
      rec.mask = d.mask;
      rec.result = { ...bitsResult(d.bits), score: d.score };
    } else {
      rec.box = d.box.slice();
    }
    return rec;
  });
  pushSnapshot([...kept, ...added], "find");
  state.activeId = firstId;
  renderLabels();
  renderAll();
  const skipped = result.detections.length - added.length;
  setStatus(
    `Added ${added.length} object(s) from ${result.description} (Ctrl+Z to undo)` +
      (skipped ? `; the ${skipped} weakest were left out (at most ${MAX_BOX_OBJECTS} boxes at once)` : "")
  );
  clearResults();
  segmentPending(); // objects from boxes alone get their masks from the segmenter
}

/** What is found and marked, for tests: {examples, queries, detections: [{box, score, label,
 * query, mask}]} (mask: whether one came back), or null before any find. */
export function findSummary() {
  if (find.owner !== image.file) return null;
  const result = find.result;
  return {
    examples: find.examples.map((e) => ({ box: e.box.slice(), positive: e.positive })),
    queries: result ? result.queries.slice() : null,
    detections: result
      ? result.detections.map((d) => ({ box: d.box, score: d.score, label: d.label, query: d.query, mask: Boolean(d.bits) }))
      : null,
  };
}

export function wireFind() {
  el.findForm.addEventListener("submit", findFromText);
  el.findExamples.addEventListener("click", findFromExamples);
  el.clearExamples.addEventListener("click", clearExamples);
  el.findToObjects.addEventListener("click", addAsObjects);
  el.findClear.addEventListener("click", clearResults);
}
