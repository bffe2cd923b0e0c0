/* upload.js: the image queue. Opening images (file picker with several files, or dropping
 * several) uploads them one at a time through the API's upload; each image that the server
 * accepts and the browser can decode joins the queue, one that fails shows its error and the
 * rest go on. Next / previous (buttons, `.` / `,`) switch the open image; every image keeps
 * its own objects, undo history, active object and object looks while another one is shown
 * (labels are the session's, shared by all images). Images stay on the server while queued;
 * if the server dropped one, segment.js uploads it again.
 */
import { uploadFile } from "./api.js";
import { changePending } from "./busy.js";
import { layout, resetZoom } from "./canvas.js";
import { el, setStatus, showError } from "./dom.js";
import { resetHistory } from "./history.js";
import { updateControls } from "./render.js";
import { segmentPending } from "./segment.js";
import { image, state } from "./state.js";

/** The queued images, each {file, name, id, width, height, bitmap, note, saved}; `saved` is
 * its per-image state while another image is shown (null until it was shown once). */
export const queue = { items: [], index: -1 };

let waiting = 0; // files chosen but not uploaded yet
let chain = Promise.resolve();

/** The per-image part of `state` (what switching images saves and brings back). */
function liveState() {
  return {
    history: state.history,
    historyIndex: state.historyIndex,
    nextObjectId: state.nextObjectId,
    activeId: state.activeId,
    look: state.look,
  };
}

/** The current snapshot's objects of a queued image (the live state for the shown one). */
export function itemObjects(item) {
  if (queue.items[queue.index] === item) {
    return state.history.length ? state.history[state.historyIndex].objects : [];
  }
  const saved = item.saved;
  return saved && saved.history.length ? saved.history[saved.historyIndex].objects : [];
}

/** Run `fn(st)` on a queued image's per-image state: the live `state` for the shown image,
 * else its saved copy (created empty if it was never shown). */
export function withItemState(item, fn) {
  if (queue.items[queue.index] === item) return fn(state);
  if (!item.saved) {
    item.saved = { history: [], historyIndex: -1, nextObjectId: 1, activeId: null, look: new Map() };
  }
  return fn(item.saved);
}

export function renderQueue() {
  const n = queue.items.length;
  el.queuePosition.textContent = n ? `${queue.index + 1} / ${n}` : "0 / 0";
  el.queueName.textContent = n ? queue.items[queue.index].name : "";
  el.queueName.title = el.queueName.textContent;
  el.queueWaiting.textContent = waiting ? `(${waiting} uploading)` : "";
  el.prevImage.disabled = queue.index <= 0;
  el.nextImage.disabled = queue.index >= n - 1;
}

/** Upload and decode one file; a queue item, or null after showing why not. */
async function uploadOne(file, failures) {
  changePending(+1);
  setStatus(`Uploading ${file.name}…`);
  try {
    const info = await uploadFile(file);
    let bitmap;
    try {
      bitmap = await createImageBitmap(file);
    } catch (_) {
      throw new Error(
        `the server accepted ${file.name}, but this browser cannot display its format; ` +
          "convert it to PNG or JPEG"
      );
    }
    let note = "";
    if (bitmap.width !== info.width || bitmap.height !== info.height) {
      note = ` (the browser decoded it as ${bitmap.width}×${bitmap.height}; shown stretched)`;
    }
    const name = file.name || "image";
    return { file, name, id: info.image_id, width: info.width, height: info.height, bitmap, note, saved: null };
  } catch (err) {
    failures.push(`${file.name || "image"}: ${err.message}`);
    showError(failures.join("; "));
    return null;
  } finally {
    changePending(-1);
  }
}

/** Queue `files` (a FileList or array): uploaded in order; the first one accepted is shown. */
export function openFiles(files) {
  const list = Array.from(files || []).filter(Boolean);
  if (!list.length) return chain;
  waiting += list.length;
  renderQueue();
  chain = chain.then(async () => {
    const failures = [];
    let shown = false;
    for (const file of list) {
      const item = await uploadOne(file, failures);
      waiting -= 1;
      if (item) {
        queue.items.push(item);
        if (!shown) {
          shown = true;
          showImage(queue.items.length - 1);
        }
      }
      renderQueue();
    }
    if (!queue.items.length) setStatus("No image open");
    else if (failures.length) setStatus(`${failures.length} of ${list.length} image(s) could not be opened`);
    else if (list.length > 1) setStatus(`${queue.items.length} images queued: , and . (or the arrows) switch`);
    updateControls();
  });
  return chain;
}

/** Show the queued image at `index`, keeping the one shown before as it is. */
export function showImage(index) {
  if (index < 0 || index >= queue.items.length || index === queue.index || state.drag) return;
  const old = queue.items[queue.index];
  if (old) {
    old.id = image.id; // segment.js may have uploaded it again
    old.saved = liveState();
  }
  queue.index = index;
  const item = queue.items[index];
  Object.assign(image, {
    id: item.id,
    width: item.width,
    height: item.height,
    bitmap: item.bitmap,
    file: item.file,
    name: item.name,
    generation: image.generation + 1, // late answers for the other image are dropped
  });
  if (item.saved && item.saved.history.length) {
    Object.assign(state, item.saved);
  } else {
    state.look = item.saved ? item.saved.look : new Map();
    resetHistory();
  }
  item.saved = null;
  state.drag = null;
  state.preview = null;
  el.dropHint.hidden = true;
  el.wrap.hidden = false;
  el.classifyResults.replaceChildren();
  el.classifySource.textContent = "";
  resetZoom();
  layout();
  renderQueue();
  setStatus(`${image.name}: ${item.width}×${item.height}${item.note}. Click with a tool to segment.`);
  el.prompt.focus({ preventScroll: true });
  segmentPending(); // objects whose answers came while another image was shown
}

export const nextImage = () => showImage(queue.index + 1);
export const previousImage = () => showImage(queue.index - 1);
