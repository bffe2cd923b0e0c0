/* canvas.js: the three stacked canvases' size (the fit to the stage times the zoom, shifted
 * by the pan: viewport.js) and the mapping between pointer positions and image coordinates.
 *
 * Coordinates: the API speaks original-image pixels, where pixel (row i, col j) covers
 * [j, j+1] x [i, i+1]; a pointer position on the canvas maps to the continuous image point
 * (clientX - left) / displayWidth * imageWidth, so clicking the middle of a pixel gives j + 0.5.
 * Zoom and pan only change the canvases' displayed size and place, so the mapping holds.
 */
import { el } from "./dom.js";
import { invalidateOverlay } from "./overlay.js";
import { renderAll } from "./render.js";
import { image } from "./state.js";

/** The current fit of the image in the stage (CSS px per image px, device pixel ratio). */
export const view = { scale: 1, cssWidth: 0, cssHeight: 0, dpr: 1, zoom: 1, panX: 0, panY: 0 };

export const MIN_ZOOM = 0.5;
export const MAX_ZOOM = 32;
// Canvas backing stores stay under this many device pixels a side; a deeper zoom stretches.
const MAX_BACKING = 4096;

/** Back to the whole image, fitted (a new image, the Fit button). */
export function resetZoom() {
  Object.assign(view, { zoom: 1, panX: 0, panY: 0 });
}

export function applyPan() {
  el.wrap.style.transform = `translate(${view.panX}px, ${view.panY}px)`;
}

export function layout() {
  if (!image.bitmap) return;
  const box = el.stage.getBoundingClientRect();
  const availW = Math.max(50, box.width - 16);
  const availH = Math.max(50, box.height - 16);
  let scale = Math.min(availW / image.width, availH / image.height);
  if (!Number.isFinite(scale) || scale <= 0) scale = 1;
  scale *= view.zoom;
  const cssWidth = Math.max(1, Math.round(image.width * scale));
  const cssHeight = Math.max(1, Math.round(image.height * scale));
  const dpr = Math.min(window.devicePixelRatio || 1, MAX_BACKING / cssWidth, MAX_BACKING / cssHeight);
  Object.assign(view, { scale: cssWidth / image.width, cssWidth, cssHeight, dpr });
  for (const canvas of [el.imageCanvas, el.overlay, el.prompt]) {
    canvas.style.width = `${cssWidth}px`;
    canvas.style.height = `${cssHeight}px`;
    canvas.width = Math.max(1, Math.round(cssWidth * dpr));
    canvas.height = Math.max(1, Math.round(cssHeight * dpr));
  }
  applyPan();
  invalidateOverlay();
  renderAll();
}

/** Pointer event -> continuous original-image coordinates, clamped to the image. */
export function toImage(event) {
  const rect = el.prompt.getBoundingClientRect();
  const x = ((event.clientX - rect.left) / rect.width) * image.width;
  const y = ((event.clientY - rect.top) / rect.height) * image.height;
  const clamp = (v, hi) => Math.round(Math.min(Math.max(v, 0), hi) * 100) / 100;
  return [clamp(x, image.width), clamp(y, image.height)];
}

/** Two corner points -> [x0, y0, x1, y1] with x0 <= x1 and y0 <= y1. */
export function normBox(a, b) {
  return [Math.min(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[0], b[0]), Math.max(a[1], b[1])];
}
