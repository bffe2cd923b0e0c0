/* brush.js: hand correction of the active object's mask (CVAT's brush / eraser): a stroke of
 * the brush width paints pixels into the mask or erases them, as one undoable step. The
 * corrected mask becomes the object's result and its mask prompt, so later prompts refine
 * it instead of starting over.
 */
import { pushSnapshot } from "./history.js";
import { bitsResult } from "./masks.js";
import { renderAll } from "./render.js";
import { encodeRle } from "./rle.js";
import { changedRecord, current, displayed, image, state } from "./state.js";

let scratch = null;

/** The pixels a stroke covers (row-major 0/1, the image's size). */
function strokeBits(stroke) {
  const { width, height } = image;
  if (!scratch) scratch = document.createElement("canvas");
  scratch.width = width;
  scratch.height = height;
  const ctx = scratch.getContext("2d", { willReadFrequently: true });
  ctx.clearRect(0, 0, width, height);
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  ctx.lineWidth = stroke.width;
  ctx.strokeStyle = "#ffffff";
  ctx.beginPath();
  const [fx, fy] = stroke.points[0];
  ctx.moveTo(fx, fy);
  ctx.lineTo(fx + 0.01, fy); // a single click still paints a dot
  for (const [x, y] of stroke.points.slice(1)) ctx.lineTo(x, y);
  ctx.stroke();
  const data = ctx.getImageData(0, 0, width, height).data;
  const bits = new Uint8Array(width * height);
  for (let i = 0, o = 3; i < bits.length; i++, o += 4) bits[i] = data[o] > 127 ? 1 : 0;
  return bits;
}

/** Paint (`stroke.positive`) or erase the stroke on the active object's mask. */
export function applyBrush(stroke) {
  const objects = current().objects.slice();
  const index = objects.findIndex((r) => r.id === state.activeId);
  if (index < 0 || !stroke.points.length) return;
  const rec = objects[index];
  const res = displayed(rec);
  if (!res && !stroke.positive) return; // nothing to erase
  const bits = res ? res.bits.slice() : new Uint8Array(image.width * image.height);
  const mark = strokeBits(stroke);
  const value = stroke.positive ? 1 : 0;
  for (let i = 0; i < bits.length; i++) if (mark[i]) bits[i] = value;
  objects[index] = changedRecord(rec, {
    result: bitsResult(bits),
    shown: null,
    mask: encodeRle(bits, image.width, image.height),
    prev: null,
    failed: null,
    pendingRequest: false,
  });
  pushSnapshot(objects, stroke.positive ? "paint" : "erase");
  renderAll();
}
