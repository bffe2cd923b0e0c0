/* vprompt serve page: interactive promptable segmentation against the JSON API in
 * docs/serve-api.md. Plain browser JavaScript, no build step, no external assets.
 *
 * Coordinates: the API speaks original-image pixels, where pixel (row i, col j) covers
 * [j, j+1] x [i, i+1]; a pointer position on the canvas maps to the continuous image point
 * (clientX - left) / displayWidth * imageWidth, so clicking the middle of a pixel gives j + 0.5.
 *
 * State: an undo history of immutable snapshots {objects: [record…]}. A record holds one
 * object's prompts; editing an object makes a new record, so records are shared between
 * snapshots and a segmentation result attached to a record is valid wherever it appears.
 * Undo/redo just move through the history (masks come back instantly); only records without
 * a result are sent to the server.
 */
(() => {
  "use strict";

  // The page's API lives next to the folder this script is served from (/static/app.js -> /).
  const SCRIPT_URL = (document.currentScript && document.currentScript.src) || location.href;
  const BASE_URL = new URL("../", SCRIPT_URL);
  const apiUrl = (path) => new URL(path, BASE_URL).toString();

  // Same palette as vprompt.segment.outputs.PALETTE, so page and CLI overlays agree.
  const PALETTE = [
    [230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180],
    [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 190], [0, 128, 128],
    [170, 110, 40], [128, 0, 0], [170, 255, 195], [128, 128, 0], [0, 0, 128], [255, 225, 25],
  ];
  const POS_COLOR = "#1a9e3a";
  const NEG_COLOR = "#d62828";
  const MASK_ALPHA = 128; // ~0.5
  const EDGE_ALPHA = 235;
  const HISTORY_LIMIT = 200;

  const $ = (id) => document.getElementById(id);
  const el = {
    app: $("app"),
    fileInput: $("file-input"),
    stage: $("stage"),
    dropHint: $("drop-hint"),
    wrap: $("canvas-wrap"),
    imageCanvas: $("image-canvas"),
    overlay: $("overlay-canvas"),
    prompt: $("prompt-canvas"),
    tools: Array.from(document.querySelectorAll("[data-tool]")),
    scribbleNegative: $("scribble-negative"),
    brushWidth: $("brush-width"),
    undo: $("undo"),
    redo: $("redo"),
    clear: $("clear"),
    automatic: $("automatic"),
    pointsPerSide: $("points-per-side"),
    predIouThresh: $("pred-iou-thresh"),
    stabilityThresh: $("stability-thresh"),
    exportKind: $("export-kind"),
    exportPng: $("export-png"),
    exportCoco: $("export-coco"),
    status: $("status"),
    alert: $("alert"),
    alertText: $("alert-text"),
    alertDismiss: $("alert-dismiss"),
    objectList: $("object-list"),
    newObject: $("new-object"),
    deleteObject: $("delete-object"),
    classifyForm: $("classify-form"),
    classifyClasses: $("classify-classes"),
    classifyPack: $("classify-pack"),
    classifyTopk: $("classify-topk"),
    classifyButton: $("classify"),
    classifySource: $("classify-source"),
    classifyResults: $("classify-results"),
    modelInfo: $("model-info"),
  };

  // ------------------------------------------------------------------------------ messages

  function setStatus(message) {
    el.status.textContent = message;
  }

  function showError(message) {
    el.alertText.textContent = message;
    el.alert.hidden = false;
  }

  function clearError() {
    el.alert.hidden = true;
    el.alertText.textContent = "";
  }

  // ----------------------------------------------------------------------------------- API

  class ApiError extends Error {
    constructor(message, status, code) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  async function apiFetch(path, options) {
    let response;
    try {
      response = await fetch(apiUrl(path), options);
    } catch (err) {
      throw new ApiError(`cannot reach the server (${err.message})`, 0, "network");
    }
    if (response.status === 204) return null;
    const text = await response.text();
    let body = null;
    try {
      body = text ? JSON.parse(text) : null;
    } catch (_) {
      body = null;
    }
    if (!response.ok) {
      const error = body && body.error;
      let message = error && error.message;
      if (!message && body && typeof body.detail === "string") message = body.detail;
      if (!message) message = `HTTP ${response.status} ${response.statusText}`.trim();
      throw new ApiError(message, response.status, (error && error.code) || `http_${response.status}`);
    }
    if (body === null) throw new ApiError(`the server sent no JSON for ${path}`, response.status, "bad_response");
    return body;
  }

  function postJson(path, data) {
    return apiFetch(path, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(data),
    });
  }

  const fmtScore = (s) => (Math.abs(s) < 0.005 ? 0 : s).toFixed(2);

  // -------------------------------------------------------------------------------- state

  const image = {
    id: null, // server image_id
    width: 0,
    height: 0,
    bitmap: null,
    file: null,
    name: "",
    generation: 0, // bumps on every new image so late responses for an old one are dropped
  };

  let tool = "positive";
  let nextObjectId = 1;
  let nextRev = 1;
  let nextResultUid = 1;
  let history = [];
  let historyIndex = -1;
  let activeId = null;
  let pending = 0;
  let idleWaiters = [];
  let drag = null; // in-progress box or scribble
  let models = null;

  function emptyRecord(id) {
    return {
      id,
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

  function editedRecord(old) {
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

  const hasPrompt = (rec) =>
    rec.points.length > 0 || rec.box !== null || rec.scribbles.length > 0 || rec.mask !== null;
  const displayed = (rec) => rec.result || (hasPrompt(rec) ? rec.shown : null);
  const current = () => history[historyIndex];
  const activeRecord = () => current().objects.find((r) => r.id === activeId) || null;

  function resetHistory() {
    nextObjectId = 1;
    const first = emptyRecord(nextObjectId++);
    history = [{ objects: [first] }];
    historyIndex = 0;
    activeId = first.id;
  }

  function pushSnapshot(objects, label) {
    history = history.slice(0, historyIndex + 1);
    history.push({ objects, label });
    if (history.length > HISTORY_LIMIT) history.shift();
    historyIndex = history.length - 1;
    fixActive();
  }

  function fixActive() {
    const objects = current().objects;
    if (!objects.some((r) => r.id === activeId)) activeId = objects[objects.length - 1].id;
  }

  /** Apply `mutate` to a copy of the active object's record, as one undoable step. */
  function editActive(mutate, label) {
    if (!image.id) return;
    const objects = current().objects.slice();
    const index = objects.findIndex((r) => r.id === activeId);
    if (index < 0) return;
    const rec = editedRecord(objects[index]);
    mutate(rec);
    objects[index] = rec;
    pushSnapshot(objects, label);
    clearError();
    renderAll();
    segmentPending();
  }

  function undo() {
    if (historyIndex <= 0 || drag) return;
    historyIndex -= 1;
    afterHistoryMove("Undo");
  }

  function redo() {
    if (historyIndex >= history.length - 1 || drag) return;
    historyIndex += 1;
    afterHistoryMove("Redo");
  }

  function afterHistoryMove(what) {
    fixActive();
    for (const rec of current().objects) rec.failed = null; // retry what failed before
    renderAll();
    setStatus(`${what}: step ${historyIndex} of ${history.length - 1}`);
    segmentPending();
  }

  function clearAll() {
    if (!image.id || isEmptyState()) return;
    nextObjectId = Math.max(nextObjectId, 2);
    const fresh = emptyRecord(1);
    pushSnapshot([fresh], "clear");
    activeId = fresh.id;
    clearError();
    renderAll();
    setStatus("Cleared all prompts and masks (Ctrl+Z brings them back)");
  }

  function isEmptyState() {
    const objects = current().objects;
    return objects.length === 1 && !hasPrompt(objects[0]) && !displayed(objects[0]);
  }

  function newObject() {
    if (!image.id) return;
    const rec = emptyRecord(nextObjectId++);
    pushSnapshot([...current().objects, rec], "new object");
    activeId = rec.id;
    renderAll();
    setStatus(`Object ${rec.id} is active: add prompts for it`);
  }

  function deleteObject() {
    if (!image.id) return;
    let objects = current().objects.filter((r) => r.id !== activeId);
    if (objects.length === current().objects.length) return;
    if (objects.length === 0) {
      if (isEmptyState()) return;
      objects = [emptyRecord(nextObjectId++)];
    }
    pushSnapshot(objects, "delete object");
    renderAll();
  }

  function selectObject(id) {
    activeId = id;
    renderAll();
  }

  function setTool(name) {
    tool = name;
    for (const button of el.tools) {
      button.setAttribute("aria-pressed", String(button.dataset.tool === name));
    }
    el.prompt.dataset.tool = name;
  }

  // ------------------------------------------------------------------------ busy / idle

  function changePending(delta) {
    pending += delta;
    el.app.dataset.pending = String(pending);
    el.app.setAttribute("aria-busy", String(pending > 0));
    if (pending === 0) {
      const waiters = idleWaiters;
      idleWaiters = [];
      for (const resolve of waiters) resolve();
    }
  }

  function whenIdle() {
    return pending === 0 ? Promise.resolve() : new Promise((resolve) => idleWaiters.push(resolve));
  }

  // ------------------------------------------------------------------------ image upload

  async function uploadFile(file) {
    const form = new FormData();
    form.append("file", file, file.name || "image");
    return apiFetch("api/images", { method: "POST", body: form });
  }

  async function openFile(file) {
    if (!file) return;
    clearError();
    setStatus(`Uploading ${file.name}…`);
    changePending(+1);
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
      const oldId = image.id;
      if (image.bitmap && image.bitmap.close) image.bitmap.close();
      Object.assign(image, {
        id: info.image_id,
        width: info.width,
        height: info.height,
        bitmap,
        file,
        name: file.name || "image",
        generation: image.generation + 1,
      });
      if (oldId && oldId !== image.id) {
        apiFetch(`api/images/${encodeURIComponent(oldId)}`, { method: "DELETE" }).catch(() => {});
      }
      resetHistory();
      drag = null;
      el.dropHint.hidden = true;
      el.wrap.hidden = false;
      el.classifyResults.replaceChildren();
      el.classifySource.textContent = "";
      layout();
      let note = "";
      if (bitmap.width !== info.width || bitmap.height !== info.height) {
        note = ` (the browser decoded it as ${bitmap.width}×${bitmap.height}; shown stretched)`;
      }
      setStatus(
        `${image.name}: ${info.width}×${info.height}${note}. Click with a tool to segment.`
      );
      el.prompt.focus({ preventScroll: true });
    } catch (err) {
      showError(err.message);
      setStatus(image.id ? `Still showing ${image.name}` : "No image open");
    } finally {
      changePending(-1);
      updateControls();
    }
  }

  // --------------------------------------------------------------------------- segmenting

  function objectRequest(rec, withPrevious) {
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

  /** Segment every object of the current state that has prompts but no result yet. */
  async function segmentPending() {
    const recs = current().objects.filter(
      (r) => hasPrompt(r) && !r.result && !r.pendingRequest && !r.failed
    );
    if (!recs.length || !image.id) {
      renderAll();
      return;
    }
    const generation = image.generation;
    for (const rec of recs) rec.pendingRequest = true;
    changePending(+1);
    setStatus(`Segmenting ${recs.length === 1 ? `object ${recs[0].id}` : `${recs.length} objects`}…`);
    renderObjectList();
    try {
      const response = await segmentRequest(recs, generation);
      if (generation !== image.generation) return;
      const objects = response.objects || [];
      if (objects.length !== recs.length) {
        throw new Error(`the server answered ${objects.length} masks for ${recs.length} objects`);
      }
      const results = await Promise.all(objects.map((o) => decodeResult(o)));
      if (generation !== image.generation) return;
      recs.forEach((rec, i) => {
        rec.result = results[i];
      });
      const last = recs[recs.length - 1];
      const r = last.result;
      setStatus(
        `Object ${last.id}: ${r.area.toLocaleString()} px` +
          (typeof r.score === "number" ? `, score ${fmtScore(r.score)}` : "")
      );
    } catch (err) {
      if (generation !== image.generation) return;
      for (const rec of recs) rec.failed = err.message;
      showError(err.message);
      setStatus("Segmentation failed");
    } finally {
      for (const rec of recs) rec.pendingRequest = false;
      changePending(-1);
      if (generation === image.generation) renderAll();
    }
  }

  async function segmentRequest(recs, generation) {
    const body = (withPrevious) => ({
      objects: recs.map((r) => objectRequest(r, withPrevious)),
      multimask: "auto",
      format: "png",
    });
    const sentPrevious = recs.some((r) => r.prev);
    try {
      return await postJson(`api/images/${encodeURIComponent(image.id)}/segment`, body(true));
    } catch (err) {
      if (err.code === "image_not_found" && image.file && generation === image.generation) {
        // The server dropped the image (expired from its cache): upload it again, once.
        const info = await uploadFile(image.file);
        if (generation !== image.generation) throw err;
        image.id = info.image_id;
        return postJson(`api/images/${encodeURIComponent(image.id)}/segment`, body(false));
      }
      if (err.status === 422 && sentPrevious) {
        // The refinement token may have expired on the server: try once without it.
        return postJson(`api/images/${encodeURIComponent(image.id)}/segment`, body(false));
      }
      throw err;
    }
  }

  // ------------------------------------------------------------------------------- masks

  let scratch = null;
  function scratchContext(width, height) {
    if (!scratch) scratch = document.createElement("canvas");
    if (scratch.width !== width || scratch.height !== height) {
      scratch.width = width;
      scratch.height = height;
    }
    return scratch.getContext("2d", { willReadFrequently: true });
  }

  async function decodePngMask(base64, width, height) {
    const raw = atob(base64);
    const bytes = new Uint8Array(raw.length);
    for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
    let bitmap;
    try {
      bitmap = await createImageBitmap(new Blob([bytes], { type: "image/png" }), {
        premultiplyAlpha: "none",
        colorSpaceConversion: "none",
      });
    } catch (_) {
      throw new Error("the server sent a mask that is not a valid PNG");
    }
    const ctx = scratchContext(width, height);
    ctx.clearRect(0, 0, width, height);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(bitmap, 0, 0, width, height);
    if (bitmap.close) bitmap.close();
    const data = ctx.getImageData(0, 0, width, height).data;
    const bits = new Uint8Array(width * height);
    for (let i = 0, o = 0; i < bits.length; i++, o += 4) {
      bits[i] = data[o] > 127 && data[o + 3] > 127 ? 1 : 0;
    }
    return bits;
  }

  /** COCO compressed RLE string -> run lengths (pycocotools' rleFrString). */
  function rleDecompress(text) {
    const counts = [];
    let pos = 0;
    while (pos < text.length) {
      let x = 0;
      let shift = 0;
      let more = true;
      while (more) {
        if (pos >= text.length) throw new Error("RLE counts string ends in the middle of a number");
        const c = text.charCodeAt(pos) - 48;
        x |= (c & 0x1f) << shift;
        more = (c & 0x20) !== 0;
        pos += 1;
        shift += 5;
        if (!more && c & 0x10) x |= -1 << shift;
      }
      if (counts.length > 2) x += counts[counts.length - 2];
      counts.push(x);
    }
    return counts;
  }

  /** Run lengths -> compressed COCO RLE string (pycocotools' rleToString). */
  function rleCompress(counts) {
    let out = "";
    for (let i = 0; i < counts.length; i++) {
      let x = i > 2 ? counts[i] - counts[i - 2] : counts[i];
      let more = true;
      while (more) {
        let chunk = x & 0x1f;
        x >>= 5;
        more = !((x === 0 && !(chunk & 0x10)) || (x === -1 && chunk & 0x10));
        if (more) chunk |= 0x20;
        out += String.fromCharCode(chunk + 48);
      }
    }
    return out;
  }

  /** COCO RLE (column-major, starting with background) -> row-major 0/1 bits. */
  function decodeRle(rle, width, height) {
    const [h, w] = rle.size;
    if (h !== height || w !== width) {
      throw new Error(`the server sent a ${w}×${h} RLE mask for a ${width}×${height} image`);
    }
    const counts = typeof rle.counts === "string" ? rleDecompress(rle.counts) : rle.counts;
    const bits = new Uint8Array(width * height);
    let k = 0; // column-major position
    let value = 0;
    for (const run of counts) {
      if (value) {
        for (let t = k; t < k + run; t++) {
          const x = Math.floor(t / height);
          const y = t - x * height;
          bits[y * width + x] = 1;
        }
      }
      k += run;
      value ^= 1;
    }
    if (k !== width * height) throw new Error("the server sent an RLE mask of the wrong length");
    return bits;
  }

  function encodeRle(bits, width, height) {
    const counts = [];
    let value = 0;
    let run = 0;
    for (let x = 0; x < width; x++) {
      for (let y = 0; y < height; y++) {
        const b = bits[y * width + x];
        if (b !== value) {
          counts.push(run);
          run = 0;
          value = b;
        }
        run += 1;
      }
    }
    counts.push(run);
    return { size: [height, width], counts: rleCompress(counts) };
  }

  function maskStats(bits, width, height) {
    let area = 0;
    let x0 = width;
    let y0 = height;
    let x1 = -1;
    let y1 = -1;
    for (let y = 0, i = 0; y < height; y++) {
      for (let x = 0; x < width; x++, i++) {
        if (!bits[i]) continue;
        area += 1;
        if (x < x0) x0 = x;
        if (x > x1) x1 = x;
        if (y < y0) y0 = y;
        if (y > y1) y1 = y;
      }
    }
    const bbox = area ? [x0, y0, x1 - x0 + 1, y1 - y0 + 1] : [0, 0, 0, 0];
    return { area, bbox };
  }

  async function decodeResult(object) {
    const { width, height } = image;
    const mask = object.mask;
    let bits;
    if (typeof mask === "string") bits = await decodePngMask(mask, width, height);
    else if (mask && mask.size && mask.counts !== undefined) bits = decodeRle(mask, width, height);
    else throw new Error("the server sent a mask in an unknown format");
    return {
      uid: nextResultUid++,
      bits,
      ...maskStats(bits, width, height),
      score: object.score,
      stability: object.stability,
      logits: object.logits || null,
    };
  }

  // ---------------------------------------------------------------------------- layout

  let view = { scale: 1, cssWidth: 0, cssHeight: 0, dpr: 1 };

  function layout() {
    if (!image.bitmap) return;
    const box = el.stage.getBoundingClientRect();
    const availW = Math.max(50, box.width - 16);
    const availH = Math.max(50, box.height - 16);
    let scale = Math.min(availW / image.width, availH / image.height);
    if (!Number.isFinite(scale) || scale <= 0) scale = 1;
    const cssWidth = Math.max(1, Math.round(image.width * scale));
    const cssHeight = Math.max(1, Math.round(image.height * scale));
    const dpr = window.devicePixelRatio || 1;
    view = { scale: cssWidth / image.width, cssWidth, cssHeight, dpr };
    for (const canvas of [el.imageCanvas, el.overlay, el.prompt]) {
      canvas.style.width = `${cssWidth}px`;
      canvas.style.height = `${cssHeight}px`;
      canvas.width = Math.max(1, Math.round(cssWidth * dpr));
      canvas.height = Math.max(1, Math.round(cssHeight * dpr));
    }
    overlayKey = null;
    renderAll();
  }

  /** Pointer event -> continuous original-image coordinates, clamped to the image. */
  function toImage(event) {
    const rect = el.prompt.getBoundingClientRect();
    const x = ((event.clientX - rect.left) / rect.width) * image.width;
    const y = ((event.clientY - rect.top) / rect.height) * image.height;
    const clamp = (v, hi) => Math.round(Math.min(Math.max(v, 0), hi) * 100) / 100;
    return [clamp(x, image.width), clamp(y, image.height)];
  }

  // --------------------------------------------------------------------------- drawing

  function renderAll() {
    if (!history.length) {
      updateControls();
      return;
    }
    renderImage();
    renderOverlay();
    renderPrompts();
    renderObjectList();
    updateControls();
  }

  function renderImage() {
    if (!image.bitmap) return;
    const ctx = el.imageCanvas.getContext("2d");
    ctx.imageSmoothingEnabled = true;
    ctx.imageSmoothingQuality = "high";
    ctx.clearRect(0, 0, el.imageCanvas.width, el.imageCanvas.height);
    ctx.drawImage(image.bitmap, 0, 0, el.imageCanvas.width, el.imageCanvas.height);
  }

  let overlayKey = null;
  let overlaySource = null;

  function renderOverlay() {
    const objects = current().objects;
    const key = objects.map((r) => (displayed(r) ? displayed(r).uid : 0)).join(",");
    const ctx = el.overlay.getContext("2d");
    if (key === overlayKey) return;
    overlayKey = key;
    ctx.clearRect(0, 0, el.overlay.width, el.overlay.height);
    const shown = objects.filter((r) => displayed(r));
    if (!shown.length || !image.bitmap) return;
    // Compose all masks at image resolution (later objects on top), then scale once.
    const { width, height } = image;
    if (!overlaySource) overlaySource = document.createElement("canvas");
    overlaySource.width = width;
    overlaySource.height = height;
    const sctx = overlaySource.getContext("2d");
    const data = sctx.createImageData(width, height);
    const px = data.data;
    for (const rec of shown) {
      const { bits, bbox } = displayed(rec);
      const [r, g, b] = rec.color;
      const [bx, by, bw, bh] = bbox;
      for (let y = by; y < by + bh; y++) {
        for (let x = bx; x < bx + bw; x++) {
          const i = y * width + x;
          if (!bits[i]) continue;
          const edge =
            (x > 0 && !bits[i - 1]) ||
            (x < width - 1 && !bits[i + 1]) ||
            (y > 0 && !bits[i - width]) ||
            (y < height - 1 && !bits[i + width]);
          const o = i * 4;
          px[o] = r;
          px[o + 1] = g;
          px[o + 2] = b;
          px[o + 3] = edge ? EDGE_ALPHA : MASK_ALPHA;
        }
      }
    }
    sctx.putImageData(data, 0, 0);
    ctx.imageSmoothingEnabled = view.scale < 1;
    ctx.drawImage(overlaySource, 0, 0, el.overlay.width, el.overlay.height);
  }

  function renderPrompts() {
    const canvas = el.prompt;
    const ctx = canvas.getContext("2d");
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    if (!image.bitmap) return;
    const k = canvas.width / image.width; // device px per image px
    const px = view.dpr; // one CSS pixel in device px
    ctx.setTransform(k, 0, 0, k, 0, 0);
    const u = 1 / k; // one device pixel in image units
    const rgb = (c, a = 1) => `rgba(${c[0]}, ${c[1]}, ${c[2]}, ${a})`;
    for (const rec of current().objects) {
      const active = rec.id === activeId;
      ctx.globalAlpha = active ? 1 : 0.5;
      for (const s of rec.scribbles) drawScribble(ctx, s, u, px);
      if (rec.box) {
        ctx.save();
        ctx.setLineDash([6 * px * u, 4 * px * u]);
        ctx.lineWidth = 2 * px * u;
        ctx.strokeStyle = "rgba(0, 0, 0, 0.7)";
        const [x0, y0, x1, y1] = rec.box;
        ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
        ctx.lineDashOffset = 6 * px * u;
        ctx.strokeStyle = rgb(rec.color);
        ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
        ctx.restore();
      }
      for (const [x, y, label] of rec.points) {
        ctx.beginPath();
        ctx.arc(x, y, 6 * px * u, 0, Math.PI * 2);
        ctx.fillStyle = label === 1 ? POS_COLOR : NEG_COLOR;
        ctx.fill();
        ctx.lineWidth = 2 * px * u;
        ctx.strokeStyle = "#ffffff";
        ctx.stroke();
        ctx.beginPath();
        ctx.arc(x, y, 8 * px * u, 0, Math.PI * 2);
        ctx.lineWidth = 2 * px * u;
        ctx.strokeStyle = rgb(rec.color);
        ctx.stroke();
      }
    }
    ctx.globalAlpha = 1;
    if (drag && drag.kind === "box" && drag.end) {
      const rec = activeRecord();
      const [x0, y0, x1, y1] = normBox(drag.start, drag.end);
      ctx.setLineDash([6 * px * u, 4 * px * u]);
      ctx.lineWidth = 2 * px * u;
      ctx.strokeStyle = rec ? rgb(rec.color) : "#ffffff";
      ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
      ctx.setLineDash([]);
    } else if (drag && drag.kind === "scribble") {
      drawScribble(ctx, drag.scribble, u, px);
    }
  }

  function drawScribble(ctx, s, u, px) {
    ctx.save();
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.lineWidth = Math.max(s.width, 2 * px * u);
    ctx.strokeStyle = s.positive ? POS_COLOR : NEG_COLOR;
    ctx.globalAlpha *= 0.85;
    ctx.beginPath();
    const [fx, fy] = s.points[0];
    ctx.moveTo(fx, fy);
    if (s.points.length === 1) ctx.lineTo(fx + 0.01, fy);
    for (const [x, y] of s.points.slice(1)) ctx.lineTo(x, y);
    ctx.stroke();
    ctx.restore();
  }

  function renderObjectList() {
    const focused = document.activeElement;
    const focusedId = focused && focused.dataset ? focused.dataset.objectId : undefined;
    const items = current().objects.map((rec, index) => {
      const li = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.dataset.objectId = String(rec.id);
      button.dataset.testid = `object-${rec.id}`;
      button.setAttribute("aria-pressed", String(rec.id === activeId));
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

  function updateControls() {
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

  // --------------------------------------------------------------------- pointer input

  function normBox(a, b) {
    return [Math.min(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[0], b[0]), Math.max(a[1], b[1])];
  }

  function brushWidth() {
    const chosen = Number(el.brushWidth.value);
    if (Number.isFinite(chosen) && chosen > 0) return chosen;
    return Math.max(3, Math.round(Math.max(image.width, image.height) / 120));
  }

  function onPointerDown(event) {
    if (!image.id || drag) return;
    if (event.button !== 0 && event.button !== 2) return;
    event.preventDefault();
    el.prompt.focus({ preventScroll: true });
    const p = toImage(event);
    if (tool === "positive" || tool === "negative") {
      // Right click always adds a negative point.
      const label = event.button === 2 || tool === "negative" ? 0 : 1;
      editActive((rec) => rec.points.push([p[0], p[1], label]), "point");
      return;
    }
    if (event.button !== 0) return;
    el.prompt.setPointerCapture(event.pointerId);
    if (tool === "box") {
      drag = { kind: "box", pointerId: event.pointerId, start: p, end: null, client: [event.clientX, event.clientY] };
    } else if (tool === "scribble") {
      drag = {
        kind: "scribble",
        pointerId: event.pointerId,
        scribble: { points: [p], positive: !el.scribbleNegative.checked, width: brushWidth() },
      };
      renderPrompts();
    }
  }

  function onPointerMove(event) {
    if (!drag || event.pointerId !== drag.pointerId) return;
    const p = toImage(event);
    if (drag.kind === "box") {
      drag.end = p;
    } else {
      const pts = drag.scribble.points;
      const [lx, ly] = pts[pts.length - 1];
      const minStep = 2 / view.scale; // two screen pixels
      if (Math.hypot(p[0] - lx, p[1] - ly) < minStep) return;
      pts.push(p);
    }
    renderPrompts();
  }

  function onPointerUp(event) {
    if (!drag || event.pointerId !== drag.pointerId) return;
    const finished = drag;
    drag = null;
    if (el.prompt.hasPointerCapture(event.pointerId)) el.prompt.releasePointerCapture(event.pointerId);
    if (finished.kind === "box") {
      const end = toImage(event);
      const moved = Math.hypot(event.clientX - finished.client[0], event.clientY - finished.client[1]);
      const box = normBox(finished.start, end);
      if (moved < 4 || box[2] - box[0] <= 0 || box[3] - box[1] <= 0) {
        renderPrompts();
        setStatus("Drag on the image to draw a box");
        return;
      }
      editActive((rec) => {
        rec.box = box;
      }, "box");
    } else {
      const s = finished.scribble;
      editActive((rec) => rec.scribbles.push(s), "scribble");
    }
  }

  function onPointerCancel(event) {
    if (!drag || event.pointerId !== drag.pointerId) return;
    drag = null;
    renderPrompts();
  }

  // ------------------------------------------------------------------------- automatic

  async function runAutomatic() {
    if (!image.id) return;
    clearError();
    const generation = image.generation;
    const request = { format: "rle" };
    const side = Number(el.pointsPerSide.value);
    if (el.pointsPerSide.value !== "" && Number.isInteger(side)) request.points_per_side = side;
    for (const [input, field] of [
      [el.predIouThresh, "pred_iou_thresh"],
      [el.stabilityThresh, "stability_score_thresh"],
    ]) {
      const value = Number(input.value);
      if (input.value !== "" && Number.isFinite(value)) request[field] = value;
    }
    el.automatic.disabled = true;
    changePending(+1);
    setStatus("Segmenting everything… (this can take a while on a CPU)");
    try {
      let response;
      try {
        response = await postJson(`api/images/${encodeURIComponent(image.id)}/automatic`, request);
      } catch (err) {
        if (err.code !== "image_not_found" || !image.file) throw err;
        const info = await uploadFile(image.file);
        if (generation !== image.generation) return;
        image.id = info.image_id;
        response = await postJson(`api/images/${encodeURIComponent(image.id)}/automatic`, request);
      }
      if (generation !== image.generation) return;
      const found = response.objects || [];
      if (!found.length) {
        setStatus("Everything: the model found no masks");
        return;
      }
      const results = await Promise.all(found.map((o) => decodeResult(o)));
      if (generation !== image.generation) return;
      // Largest first, so smaller objects are drawn (and exported) on top of larger ones.
      const order = results.map((r, i) => i).sort((a, b) => results[b].area - results[a].area);
      const firstId = nextObjectId;
      const objects = order.map((i) => {
        const rec = emptyRecord(nextObjectId++);
        const mask = found[i].mask;
        rec.mask = typeof mask === "string" ? encodeRle(results[i].bits, image.width, image.height) : mask;
        rec.result = results[i];
        return rec;
      });
      pushSnapshot(objects, "everything");
      activeId = firstId;
      setStatus(`Everything: ${objects.length} masks (Ctrl+Z to undo)`);
    } catch (err) {
      showError(err.message);
      setStatus("Everything failed");
    } finally {
      changePending(-1);
      renderAll();
    }
  }

  // ---------------------------------------------------------------------------- export

  const CRC_TABLE = (() => {
    const table = new Uint32Array(256);
    for (let n = 0; n < 256; n++) {
      let c = n;
      for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
      table[n] = c >>> 0;
    }
    return table;
  })();

  function crc32(bytes) {
    let c = 0xffffffff;
    for (let i = 0; i < bytes.length; i++) c = CRC_TABLE[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
    return (c ^ 0xffffffff) >>> 0;
  }

  function adler32(bytes) {
    let a = 1;
    let b = 0;
    for (let i = 0; i < bytes.length; i++) {
      a = (a + bytes[i]) % 65521;
      b = (b + a) % 65521;
    }
    return ((b << 16) | a) >>> 0;
  }

  async function zlib(bytes) {
    if (typeof CompressionStream === "function") {
      const stream = new Blob([bytes]).stream().pipeThrough(new CompressionStream("deflate"));
      return new Uint8Array(await new Response(stream).arrayBuffer());
    }
    // Fallback: zlib stream of stored (uncompressed) deflate blocks.
    const blocks = Math.max(1, Math.ceil(bytes.length / 65535));
    const out = new Uint8Array(2 + bytes.length + blocks * 5 + 4);
    out[0] = 0x78;
    out[1] = 0x01;
    let o = 2;
    for (let k = 0; k < blocks; k++) {
      const chunk = bytes.subarray(k * 65535, Math.min(bytes.length, (k + 1) * 65535));
      out[o++] = k === blocks - 1 ? 1 : 0;
      out[o++] = chunk.length & 0xff;
      out[o++] = chunk.length >>> 8;
      out[o++] = ~chunk.length & 0xff;
      out[o++] = (~chunk.length >>> 8) & 0xff;
      out.set(chunk, o);
      o += chunk.length;
    }
    const adler = adler32(bytes);
    out[o++] = adler >>> 24;
    out[o++] = (adler >>> 16) & 0xff;
    out[o++] = (adler >>> 8) & 0xff;
    out[o++] = adler & 0xff;
    return out;
  }

  /** A grayscale PNG (8- or 16-bit) of `values` (row-major, one value per pixel). */
  async function encodeGrayPng(width, height, values, bitDepth) {
    const bytesPerPixel = bitDepth / 8;
    const rowLength = 1 + width * bytesPerPixel;
    const raw = new Uint8Array(rowLength * height);
    for (let y = 0; y < height; y++) {
      let o = y * rowLength + 1; // filter byte 0 (None)
      for (let x = 0; x < width; x++) {
        const v = values[y * width + x];
        if (bitDepth === 16) raw[o++] = v >>> 8;
        raw[o++] = v & 0xff;
      }
    }
    const chunk = (type, data) => {
      const out = new Uint8Array(12 + data.length);
      const view = new DataView(out.buffer);
      view.setUint32(0, data.length);
      for (let i = 0; i < 4; i++) out[4 + i] = type.charCodeAt(i);
      out.set(data, 8);
      view.setUint32(8 + data.length, crc32(out.subarray(4, 8 + data.length)));
      return out;
    };
    const header = new Uint8Array(13);
    const hv = new DataView(header.buffer);
    hv.setUint32(0, width);
    hv.setUint32(4, height);
    header[8] = bitDepth;
    header[9] = 0; // grayscale
    const signature = new Uint8Array([137, 80, 78, 71, 13, 10, 26, 10]);
    const parts = [signature, chunk("IHDR", header), chunk("IDAT", await zlib(raw)), chunk("IEND", new Uint8Array(0))];
    return new Blob(parts, { type: "image/png" });
  }

  function download(blob, filename) {
    const url = URL.createObjectURL(blob);
    const a = document.createElement("a");
    a.href = url;
    a.download = filename;
    a.hidden = true;
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }

  const stem = () => (image.name || "image").replace(/\.[^.]+$/, "") || "image";

  async function exportPng() {
    if (!image.id) return;
    clearError();
    await whenIdle();
    const { width, height } = image;
    const objects = current().objects;
    try {
      if (el.exportKind.value === "active") {
        const rec = activeRecord();
        const res = rec && displayed(rec);
        if (!res) throw new Error(`object ${activeId} has no mask to export yet`);
        const values = new Uint8Array(width * height);
        for (let i = 0; i < values.length; i++) values[i] = res.bits[i] ? 255 : 0;
        download(await encodeGrayPng(width, height, values, 8), `${stem()}_object${rec.id}.png`);
        setStatus(`Exported object ${rec.id} as a 0/255 PNG mask`);
      } else {
        if (!objects.some((r) => displayed(r))) throw new Error("no masks to export yet");
        const bitDepth = objects.length > 255 ? 16 : 8;
        const values = bitDepth === 16 ? new Uint16Array(width * height) : new Uint8Array(width * height);
        objects.forEach((rec, index) => {
          const res = displayed(rec);
          if (!res) return;
          for (let i = 0; i < values.length; i++) if (res.bits[i]) values[i] = index + 1;
        });
        download(await encodeGrayPng(width, height, values, bitDepth), `${stem()}_labels.png`);
        setStatus(
          `Exported a ${bitDepth}-bit label image: 0 is background, k is the k-th object in the list`
        );
      }
    } catch (err) {
      showError(`export: ${err.message}`);
    }
  }

  async function exportCoco() {
    if (!image.id) return;
    clearError();
    await whenIdle();
    const { width, height } = image;
    const annotations = [];
    current().objects.forEach((rec, index) => {
      const res = displayed(rec);
      if (!res) return;
      const ann = {
        id: annotations.length + 1,
        image_id: 1,
        category_id: 1,
        segmentation: encodeRle(res.bits, width, height),
        area: res.area,
        bbox: res.bbox,
        iscrowd: 0,
        vprompt_object: rec.id,
        vprompt_label: index + 1,
      };
      if (typeof res.score === "number") ann.score = res.score;
      annotations.push(ann);
    });
    if (!annotations.length) {
      showError("export: no masks to export yet");
      return;
    }
    const coco = {
      info: { description: "vprompt serve annotations", date_created: new Date().toISOString() },
      images: [{ id: 1, file_name: image.name, width, height }],
      categories: [{ id: 1, name: "object", supercategory: "object" }],
      annotations,
    };
    const blob = new Blob([JSON.stringify(coco)], { type: "application/json" });
    download(blob, `${stem()}_coco.json`);
    setStatus(`Exported ${annotations.length} annotation(s) as COCO JSON with RLE masks`);
  }

  // -------------------------------------------------------------------------- classify

  const packs = () => (models && Array.isArray(models.packs) ? models.packs : []);

  async function loadModels() {
    try {
      models = await apiFetch("api/models");
    } catch (err) {
      el.modelInfo.textContent = `Could not read the server's models: ${err.message}`;
      showError(err.message);
      return;
    }
    const seg = models.segmenter || {};
    const cls = models.classifier;
    el.modelInfo.textContent =
      `Segmenter: ${seg.name || "?"}${seg.weights ? ` (${seg.weights})` : ""}. ` +
      `Classifier: ${cls ? `${cls.name}${cls.weights ? ` (${cls.weights})` : ""}` : "none"}. ` +
      `Packs: ${packs().length ? packs().join(", ") : "none"}.`;
    for (const name of packs()) {
      const option = document.createElement("option");
      option.value = name;
      option.textContent = `pack: ${name}`;
      el.classifyPack.append(option);
    }
    if (!cls) {
      el.classifyClasses.disabled = true;
      el.classifyClasses.placeholder = "no zero-shot classifier on this server";
    }
    updateControls();
  }

  async function classify(event) {
    event.preventDefault();
    if (!image.file) return;
    clearError();
    const form = new FormData();
    form.append("file", image.file, image.name);
    const pack = el.classifyPack.value;
    const classes = el.classifyClasses.value
      .split(",")
      .map((c) => c.trim())
      .filter(Boolean);
    if (pack) form.append("pack", pack);
    else if (classes.length) form.append("classes", classes.join(","));
    else {
      showError("classify: enter class names (comma-separated) or choose a pack");
      el.classifyClasses.focus();
      return;
    }
    const topk = Number(el.classifyTopk.value);
    if (Number.isInteger(topk) && topk > 0) form.append("top_k", String(topk));
    el.classifyButton.disabled = true;
    changePending(+1);
    setStatus("Classifying…");
    try {
      const result = await apiFetch("api/classify", { method: "POST", body: form });
      const items = (result.predictions || []).map((p) => {
        const li = document.createElement("li");
        li.textContent = `${p.label} — ${(100 * p.score).toFixed(1)}%`;
        const bar = document.createElement("span");
        bar.className = "bar";
        bar.style.width = `${Math.max(1, Math.min(100, 100 * p.score))}%`;
        bar.setAttribute("aria-hidden", "true");
        li.append(bar);
        return li;
      });
      el.classifyResults.replaceChildren(...items);
      el.classifySource.textContent = result.source ? `source: ${result.source}` : "";
      const top = result.predictions && result.predictions[0];
      setStatus(top ? `Classified: ${top.label} (${(100 * top.score).toFixed(1)}%)` : "Classified");
    } catch (err) {
      showError(`classify: ${err.message}`);
      setStatus("Classification failed");
    } finally {
      changePending(-1);
      updateControls();
    }
  }

  // -------------------------------------------------------------------------- keyboard

  function isTyping(target) {
    if (!target || !target.matches) return false;
    if (target.isContentEditable) return true;
    if (target.matches("textarea, select")) return true;
    if (target.matches("input")) {
      return !["checkbox", "radio", "button", "submit", "file", "range", "color"].includes(target.type);
    }
    return false;
  }

  function onKeyDown(event) {
    if (event.defaultPrevented) return;
    const typing = isTyping(event.target);
    const ctrl = event.ctrlKey || event.metaKey;
    const key = event.key.length === 1 ? event.key.toLowerCase() : event.key;
    if (ctrl && !event.altKey) {
      if (typing) return; // leave text fields their own undo
      if (key === "z" && !event.shiftKey) {
        event.preventDefault();
        undo();
      } else if ((key === "z" && event.shiftKey) || key === "y") {
        event.preventDefault();
        redo();
      }
      return;
    }
    if (typing || event.altKey || ctrl) return;
    const tools = { p: "positive", n: "negative", b: "box", s: "scribble" };
    if (tools[key] && !event.shiftKey) {
      event.preventDefault();
      setTool(tools[key]);
    } else if (key === "o" && !event.shiftKey) {
      event.preventDefault();
      newObject();
    } else if (key === "e") {
      event.preventDefault();
      if (event.shiftKey) exportCoco();
      else exportPng();
    } else if (key === "Delete") {
      event.preventDefault();
      clearAll();
    } else if (key === "Escape" && drag) {
      drag = null;
      renderPrompts();
    }
  }

  // ------------------------------------------------------------------------------ wiring

  el.fileInput.addEventListener("change", () => {
    const file = el.fileInput.files && el.fileInput.files[0];
    openFile(file).finally(() => {
      el.fileInput.value = "";
    });
  });

  for (const button of el.tools) button.addEventListener("click", () => setTool(button.dataset.tool));
  el.undo.addEventListener("click", undo);
  el.redo.addEventListener("click", redo);
  el.clear.addEventListener("click", clearAll);
  el.automatic.addEventListener("click", runAutomatic);
  el.exportPng.addEventListener("click", exportPng);
  el.exportCoco.addEventListener("click", exportCoco);
  el.newObject.addEventListener("click", newObject);
  el.deleteObject.addEventListener("click", deleteObject);
  el.alertDismiss.addEventListener("click", clearError);
  el.classifyForm.addEventListener("submit", classify);
  el.classifyPack.addEventListener("change", () => {
    el.classifyClasses.disabled = Boolean(el.classifyPack.value) || !(models && models.classifier);
  });

  el.prompt.addEventListener("pointerdown", onPointerDown);
  el.prompt.addEventListener("pointermove", onPointerMove);
  el.prompt.addEventListener("pointerup", onPointerUp);
  el.prompt.addEventListener("pointercancel", onPointerCancel);
  el.prompt.addEventListener("contextmenu", (event) => event.preventDefault());
  document.addEventListener("keydown", onKeyDown);

  // Drag and drop anywhere on the page; never let the browser navigate to the file.
  let dragDepth = 0;
  window.addEventListener("dragenter", (event) => {
    if (!event.dataTransfer || !Array.from(event.dataTransfer.types).includes("Files")) return;
    dragDepth += 1;
    el.stage.classList.add("dragover");
  });
  window.addEventListener("dragleave", () => {
    dragDepth = Math.max(0, dragDepth - 1);
    if (!dragDepth) el.stage.classList.remove("dragover");
  });
  window.addEventListener("dragover", (event) => {
    event.preventDefault();
    if (event.dataTransfer) event.dataTransfer.dropEffect = "copy";
  });
  window.addEventListener("drop", (event) => {
    event.preventDefault();
    dragDepth = 0;
    el.stage.classList.remove("dragover");
    const file = event.dataTransfer && event.dataTransfer.files && event.dataTransfer.files[0];
    if (file) openFile(file);
  });

  if (typeof ResizeObserver === "function") {
    new ResizeObserver(() => layout()).observe(el.stage);
  } else {
    window.addEventListener("resize", layout);
  }

  setTool("positive");
  updateControls();
  loadModels();

  // A small read-only handle for tests and debugging.
  window.vprompt = {
    whenIdle,
    get imageId() {
      return image.id;
    },
    get imageSize() {
      return [image.width, image.height];
    },
    get historyLength() {
      return history.length;
    },
    get historyIndex() {
      return historyIndex;
    },
    prompts() {
      return history.length ? current().objects.map((r) => objectRequest(r, false)) : [];
    },
  };
})();
