/* overlay.js: drawing on the canvases: the image, the composed mask overlay (fill plus a
 * stronger edge, in each object's colour) and the prompts (points, boxes, scribbles, the drag
 * in progress). The mask overlay is recomposed only when the shown results change.
 */
import { normBox, view } from "./canvas.js";
import { el } from "./dom.js";
import { activeRecord, current, displayed, image, labelName, lookOf, shownResult, state } from "./state.js";

const POS_COLOR = "#1a9e3a";
const NEG_COLOR = "#d62828";
const INSPECT_COLOR = "#ff8c00";
const EXAMPLE_COLOR = "#00b4d8";
const MASK_ALPHA = 128; // ~0.5
const EDGE_ALPHA = 235;

/** More things drawn on the prompt canvas, in image pixels, after the objects' prompts:
 * functions (ctx, u = one device pixel in image units, px = one CSS pixel in device pixels),
 * added by the modules that own them (find.js). */
export const promptLayers = [];

let overlayKey = null;
let overlaySource = null;

/** Force the next renderOverlay to redraw (the canvas was resized). */
export function invalidateOverlay() {
  overlayKey = null;
}

export function renderImage() {
  if (!image.bitmap) return;
  const ctx = el.imageCanvas.getContext("2d");
  ctx.imageSmoothingEnabled = true;
  ctx.imageSmoothingQuality = "high";
  ctx.clearRect(0, 0, el.imageCanvas.width, el.imageCanvas.height);
  ctx.drawImage(image.bitmap, 0, 0, el.imageCanvas.width, el.imageCanvas.height);
}

export function renderOverlay() {
  const objects = current().objects;
  const key = objects
    .map((r) => {
      const look = lookOf(r.id);
      return `${shownResult(r) ? shownResult(r).uid : 0}:${look.hidden ? "h" : look.opacity}`;
    })
    .join(",");
  const ctx = el.overlay.getContext("2d");
  if (key === overlayKey) return;
  overlayKey = key;
  ctx.clearRect(0, 0, el.overlay.width, el.overlay.height);
  const shown = objects.filter((r) => shownResult(r) && !lookOf(r.id).hidden);
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
    const { bits, bbox } = shownResult(rec);
    const [r, g, b] = rec.color;
    const opacity = lookOf(rec.id).opacity;
    const fill = Math.round(MASK_ALPHA * opacity);
    const line = Math.round(EDGE_ALPHA * opacity);
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
        px[o + 3] = edge ? line : fill;
      }
    }
  }
  sctx.putImageData(data, 0, 0);
  ctx.imageSmoothingEnabled = view.scale < 1;
  ctx.drawImage(overlaySource, 0, 0, el.overlay.width, el.overlay.height);
}

export function renderPrompts() {
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
    const active = rec.id === state.activeId;
    if (lookOf(rec.id).hidden && !active) continue;
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
  for (const rec of current().objects) {
    const res = displayed(rec);
    if (res && res.area && !lookOf(rec.id).hidden) drawTag(ctx, rec, res.bbox, u, px);
  }
  // Inspect mode's defect marks (inspect.js), in their own colour.
  const marks = state.inspect.owner === image.file ? state.inspect.boxes : [];
  for (const [x0, y0, x1, y1] of marks) {
    ctx.setLineDash([]);
    ctx.lineWidth = 3 * px * u;
    ctx.strokeStyle = INSPECT_COLOR;
    ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
  }
  for (const draw of promptLayers) {
    ctx.save();
    draw(ctx, u, px);
    ctx.restore();
  }
  const drag = state.drag;
  if (drag && (drag.kind === "box" || drag.kind === "inspect" || drag.kind === "example") && drag.end) {
    const rec = activeRecord();
    const [x0, y0, x1, y1] = normBox(drag.start, drag.end);
    ctx.setLineDash([6 * px * u, 4 * px * u]);
    ctx.lineWidth = 2 * px * u;
    const marks = { inspect: INSPECT_COLOR, example: EXAMPLE_COLOR };
    ctx.strokeStyle = marks[drag.kind] || (rec ? rgb(rec.color) : "#ffffff");
    ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
    ctx.setLineDash([]);
  } else if (drag && (drag.kind === "scribble" || drag.kind === "brush")) {
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

/** The object's label name in a small tag at its mask's top-left corner. */
function drawTag(ctx, rec, bbox, u, px) {
  const text = `${rec.id} · ${labelName(rec.label)}`;
  const size = 11 * px * u;
  ctx.save();
  ctx.font = `${size}px system-ui, sans-serif`;
  ctx.textBaseline = "top";
  const pad = 3 * px * u;
  const w = ctx.measureText(text).width + 2 * pad;
  const h = size + 2 * pad;
  const x = Math.min(Math.max(0, bbox[0]), Math.max(0, image.width - w));
  const y = bbox[1] >= h ? bbox[1] - h : bbox[1];
  ctx.fillStyle = `rgba(${rec.color[0]}, ${rec.color[1]}, ${rec.color[2]}, 0.9)`;
  ctx.fillRect(x, y, w, h);
  ctx.fillStyle = "#ffffff";
  ctx.fillText(text, x + pad, y + pad);
  ctx.restore();
}
