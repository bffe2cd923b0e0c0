/* viewport.js: zoom (mouse wheel at the pointer, the +/−/Fit buttons and keys) and pan (drag
 * with Space held or with the middle button) of the image canvases. Points, boxes and
 * scribbles keep mapping to image pixels: canvas.js maps through the canvases' on-screen box.
 */
import { applyPan, layout, MAX_ZOOM, MIN_ZOOM, resetZoom, view } from "./canvas.js";
import { el } from "./dom.js";
import { image } from "./state.js";

const STEP = 1.25;
let spaceHeld = false;
let pan = null; // {pointerId, x, y, panX, panY}

/** Zoom by `factor`, keeping the image point under (clientX, clientY) where it is. */
export function zoomAt(factor, clientX, clientY) {
  if (!image.bitmap) return;
  const rect = el.prompt.getBoundingClientRect();
  const zoom = Math.min(MAX_ZOOM, Math.max(MIN_ZOOM, view.zoom * factor));
  if (zoom === view.zoom) return;
  const u = (clientX - rect.left) / rect.width;
  const v = (clientY - rect.top) / rect.height;
  // Where the canvases' centre would be with no pan (the stage centres them).
  const cx = rect.left + rect.width / 2 - view.panX;
  const cy = rect.top + rect.height / 2 - view.panY;
  const ratio = zoom / view.zoom;
  const w = rect.width * ratio;
  const h = rect.height * ratio;
  view.zoom = zoom;
  view.panX = clientX - u * w - cx + w / 2;
  view.panY = clientY - v * h - cy + h / 2;
  layout();
}

function zoomCentre(factor) {
  const box = el.stage.getBoundingClientRect();
  zoomAt(factor, box.left + box.width / 2, box.top + box.height / 2);
}

export const zoomIn = () => zoomCentre(STEP);
export const zoomOut = () => zoomCentre(1 / STEP);
export function zoomFit() {
  resetZoom();
  layout();
}

/** Start a pan drag (middle button, or any button with Space held); true when it did. */
export function panDown(event) {
  if (!image.bitmap || !(event.button === 1 || (spaceHeld && event.button === 0))) return false;
  event.preventDefault();
  pan = { pointerId: event.pointerId, x: event.clientX, y: event.clientY, panX: view.panX, panY: view.panY };
  el.prompt.setPointerCapture(event.pointerId);
  el.stage.classList.add("panning");
  return true;
}

export function panMove(event) {
  if (!pan || event.pointerId !== pan.pointerId) return false;
  view.panX = pan.panX + event.clientX - pan.x;
  view.panY = pan.panY + event.clientY - pan.y;
  applyPan();
  return true;
}

export function panUp(event) {
  if (!pan || event.pointerId !== pan.pointerId) return false;
  pan = null;
  if (el.prompt.hasPointerCapture(event.pointerId)) el.prompt.releasePointerCapture(event.pointerId);
  el.stage.classList.remove("panning");
  return true;
}

export function setSpaceHeld(held) {
  spaceHeld = held;
  el.stage.classList.toggle("pan-ready", held);
}

export function wireViewport() {
  el.stage.addEventListener(
    "wheel",
    (event) => {
      if (!image.bitmap) return;
      event.preventDefault();
      const delta = event.deltaMode === 1 ? event.deltaY * 16 : event.deltaY;
      zoomAt(Math.exp(-delta * 0.0015), event.clientX, event.clientY);
    },
    { passive: false }
  );
  // The middle button's auto-scroll would fight the pan.
  el.prompt.addEventListener("mousedown", (event) => {
    if (event.button === 1) event.preventDefault();
  });
  el.zoomIn.addEventListener("click", zoomIn);
  el.zoomOut.addEventListener("click", zoomOut);
  el.zoomFit.addEventListener("click", zoomFit);
}
