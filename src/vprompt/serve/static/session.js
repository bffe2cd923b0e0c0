/* session.js: the whole labelling session as one COCO JSON file. Save: every queued image
 * (`images`: id, file_name, width, height), every object with a mask (`annotations`: RLE
 * segmentation, bbox, area, category_id) and the label list (`categories`). Restore: a COCO
 * file's annotations go back onto the queued images with the same file_name, as editable
 * objects whose masks are their mask prompts (one undo step per image), and its categories
 * become the label list. A file that is not valid COCO changes nothing and says why.
 */
import { whenIdle } from "./busy.js";
import { clearError, el, setStatus, showError } from "./dom.js";
import { download } from "./exporters.js";
import { renderLabels } from "./labels.js";
import { bitsResult } from "./masks.js";
import { renderAll } from "./render.js";
import { decodeRle, encodeRle } from "./rle.js";
import { displayed, emptyRecord, state } from "./state.js";
import { itemObjects, queue, renderQueue, withItemState } from "./upload.js";

export const SESSION_FILE = "vprompt_session_coco.json";

/** The session as a COCO object (images without masks are listed with no annotations). */
export function sessionCoco() {
  const images = [];
  const annotations = [];
  queue.items.forEach((item, k) => {
    const imageId = k + 1;
    images.push({ id: imageId, file_name: item.name, width: item.width, height: item.height });
    for (const rec of itemObjects(item)) {
      const res = displayed(rec);
      if (!res || !res.area) continue;
      const ann = {
        id: annotations.length + 1,
        image_id: imageId,
        category_id: rec.label,
        segmentation: encodeRle(res.bits, item.width, item.height),
        area: res.area,
        bbox: res.bbox,
        iscrowd: 0,
        vprompt_object: rec.id,
      };
      if (typeof res.score === "number") ann.score = res.score;
      annotations.push(ann);
    }
  });
  return {
    info: { description: "vprompt serve session", date_created: new Date().toISOString() },
    images,
    categories: state.labels.map((l) => ({ id: l.id, name: l.name, supercategory: "object" })),
    annotations,
  };
}

export async function saveSession() {
  if (!queue.items.length) return;
  clearError();
  await whenIdle();
  const coco = sessionCoco();
  download(new Blob([JSON.stringify(coco)], { type: "application/json" }), SESSION_FILE);
  setStatus(
    `Saved the session: ${coco.images.length} image(s), ${coco.annotations.length} ` +
      `annotation(s), ${coco.categories.length} categories (COCO JSON, RLE masks)`
  );
}

// ------------------------------------------------------------------------------ restore

const isPosInt = (v) => Number.isInteger(v) && v > 0;

function fail(message) {
  throw new Error(message);
}

/** A polygon segmentation ([[x, y, x, y…]…], image pixels) -> row-major 0/1 bits. */
function polygonBits(polygons, width, height) {
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.fillStyle = "#fff";
  ctx.beginPath();
  for (const poly of polygons) {
    ctx.moveTo(poly[0], poly[1]);
    for (let i = 2; i + 1 < poly.length; i += 2) ctx.lineTo(poly[i], poly[i + 1]);
    ctx.closePath();
  }
  ctx.fill("evenodd");
  const data = ctx.getImageData(0, 0, width, height).data;
  const bits = new Uint8Array(width * height);
  for (let i = 0, o = 3; i < bits.length; i++, o += 4) bits[i] = data[o] > 127 ? 1 : 0;
  return bits;
}

function segmentationBits(seg, width, height, where) {
  if (Array.isArray(seg)) {
    const ok = seg.length > 0 && seg.every(
      (p) => Array.isArray(p) && p.length >= 6 && p.length % 2 === 0 && p.every(Number.isFinite)
    );
    if (!ok) fail(`${where}: a polygon segmentation must be lists of at least 3 x, y pairs`);
    return polygonBits(seg, width, height);
  }
  if (!seg || typeof seg !== "object" || !Array.isArray(seg.size) || seg.counts === undefined) {
    fail(`${where}: segmentation is neither RLE ({size, counts}) nor polygons`);
  }
  if (seg.size[0] !== height || seg.size[1] !== width) {
    fail(`${where}: an RLE of size ${seg.size.join("×")} for a ${height}×${width} (h×w) image`);
  }
  const countsOk =
    typeof seg.counts === "string" ||
    (Array.isArray(seg.counts) && seg.counts.every((c) => Number.isInteger(c) && c >= 0));
  if (!countsOk) fail(`${where}: RLE counts must be a string or a list of run lengths`);
  try {
    return decodeRle(seg, width, height);
  } catch (err) {
    return fail(`${where}: bad RLE (${err.message.replace("the server sent ", "")})`);
  }
}

/** Check a parsed file; {categories, images: [{entry, anns}]} or an Error thrown. */
function validate(coco) {
  if (!coco || typeof coco !== "object" || Array.isArray(coco)) fail("the file holds no JSON object");
  for (const key of ["images", "annotations", "categories"]) {
    if (!Array.isArray(coco[key])) fail(`"${key}" is missing or not a list`);
  }
  const categories = new Map();
  coco.categories.forEach((c, k) => {
    if (!c || !isPosInt(c.id)) fail(`categories[${k}]: id must be a positive integer`);
    if (typeof c.name !== "string" || !c.name.trim()) fail(`categories[${k}]: name must be a non-empty string`);
    if (categories.has(c.id)) fail(`categories[${k}]: id ${c.id} appears twice`);
    categories.set(c.id, c.name.trim());
  });
  const images = new Map();
  coco.images.forEach((im, k) => {
    if (!im || (typeof im.id !== "number" && typeof im.id !== "string")) fail(`images[${k}]: no id`);
    if (typeof im.file_name !== "string" || !im.file_name) fail(`images[${k}]: no file_name`);
    if (!isPosInt(im.width) || !isPosInt(im.height)) fail(`images[${k}]: width and height must be positive integers`);
    if (images.has(im.id)) fail(`images[${k}]: id ${im.id} appears twice`);
    images.set(im.id, { entry: im, anns: [] });
  });
  coco.annotations.forEach((a, k) => {
    if (!a || typeof a !== "object") fail(`annotations[${k}] is not an object`);
    const target = images.get(a.image_id);
    if (!target) fail(`annotations[${k}]: image_id ${a.image_id} is not in "images"`);
    if (!categories.has(a.category_id)) fail(`annotations[${k}]: category_id ${a.category_id} is not in "categories"`);
    if (a.segmentation === undefined) fail(`annotations[${k}]: no segmentation`);
    target.anns.push({ ann: a, where: `annotations[${k}]` });
  });
  return { categories, images: Array.from(images.values()) };
}

/** Restore a session file (a File) onto the queued images; nothing changes on any error. */
export async function restoreSession(file) {
  if (!file) return;
  clearError();
  await whenIdle();
  try {
    if (!queue.items.length) {
      fail("open the session's images first (annotations go to the queued images with the same file name)");
    }
    let coco;
    try {
      coco = JSON.parse(await file.text());
    } catch (err) {
      fail(`not JSON (${err.message})`);
    }
    const { categories, images } = validate(coco);

    // Match by file_name (each queued image once), decode every mask before changing anything.
    const used = new Set();
    const plans = [];
    const missing = [];
    for (const { entry, anns } of images) {
      const item = queue.items.find((it) => !used.has(it) && it.name === entry.file_name);
      if (!item) {
        missing.push(entry.file_name);
        continue;
      }
      if (item.width !== entry.width || item.height !== entry.height) {
        fail(
          `${entry.file_name} is ${entry.width}×${entry.height} in the file but ` +
            `${item.width}×${item.height} in the queue`
        );
      }
      used.add(item);
      anns.sort((a, b) => (Number(a.ann.id) || 0) - (Number(b.ann.id) || 0));
      const masks = anns.map(({ ann, where }) => ({
        label: ann.category_id,
        bits: segmentationBits(ann.segmentation, item.width, item.height, where),
      }));
      plans.push({ item, masks });
    }
    if (!plans.length) {
      fail(`none of its ${images.length} image(s) (${missing.slice(0, 3).join(", ")}) is in the queue`);
    }

    // Labels: the file's categories, plus the labels that objects elsewhere still use.
    const usedLabels = new Set();
    for (const item of queue.items) {
      if (plans.some((p) => p.item === item)) continue;
      for (const rec of itemObjects(item)) usedLabels.add(rec.label);
    }
    const labels = Array.from(categories, ([id, name]) => ({ id, name }));
    for (const l of state.labels) if (!categories.has(l.id) && usedLabels.has(l.id)) labels.push(l);
    state.labels = labels;
    state.nextLabelId = Math.max(state.nextLabelId, ...labels.map((l) => l.id + 1));
    if (!labels.some((l) => l.id === state.activeLabel)) state.activeLabel = labels[0].id;

    let restored = 0;
    for (const { item, masks } of plans) {
      withItemState(item, (st) => {
        let nextId = Math.max(1, st.nextObjectId);
        const objects = masks.map(({ label, bits }) => {
          const rec = emptyRecord(nextId++, label);
          rec.mask = encodeRle(bits, item.width, item.height);
          rec.result = bitsResult(bits, item.width, item.height);
          return rec;
        });
        if (!objects.length) objects.push(emptyRecord(nextId++, state.activeLabel));
        st.history = st.history.slice(0, st.historyIndex + 1);
        st.history.push({ objects, label: "restore session" });
        st.historyIndex = st.history.length - 1;
        st.nextObjectId = nextId;
        st.activeId = objects[0].id;
      });
      restored += masks.length;
    }
    renderLabels();
    renderAll();
    renderQueue();
    const skipped = missing.length ? `; not in the queue: ${missing.join(", ")}` : "";
    setStatus(
      `Restored ${restored} object(s) on ${plans.length} image(s) and ${labels.length} label(s) ` +
        `from ${file.name} (Ctrl+Z on an image undoes it there)${skipped}`
    );
  } catch (err) {
    showError(`restore: ${file.name} is not a session this page can restore: ${err.message}. Nothing was changed.`);
  }
}

export function wireSession() {
  el.saveSession.addEventListener("click", saveSession);
  el.restoreInput.addEventListener("change", () => {
    const file = el.restoreInput.files && el.restoreInput.files[0];
    restoreSession(file).finally(() => {
      el.restoreInput.value = "";
    });
  });
}
