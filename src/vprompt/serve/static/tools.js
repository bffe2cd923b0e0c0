/* tools.js: the prompt tools (positive/negative point, box, scribble), the mask brush and
 * eraser (brush.js), the inspect and find example boxes, and the pointer input
 * on the prompt canvas: clicks add points, drags draw a box or a scribble (state.drag while in
 * progress), each finished prompt is one undoable edit of the active object.
 */
import { applyBrush } from "./brush.js";
import { normBox, toImage, view } from "./canvas.js";
import { el, setStatus } from "./dom.js";
import { addExample } from "./find.js";
import { editActive } from "./history.js";
import { addInspectBox } from "./inspect.js";
import { renderPrompts } from "./overlay.js";
import { image, state } from "./state.js";

let tool = "positive";

export function setTool(name) {
  tool = name;
  for (const button of el.tools) {
    button.setAttribute("aria-pressed", String(button.dataset.tool === name));
  }
  el.prompt.dataset.tool = name;
}

/** Drop the box or scribble being drawn (Escape). */
export function cancelDrag() {
  if (!state.drag) return;
  state.drag = null;
  renderPrompts();
}

function brushWidth() {
  const chosen = Number(el.brushWidth.value);
  if (Number.isFinite(chosen) && chosen > 0) return chosen;
  return Math.max(3, Math.round(Math.max(image.width, image.height) / 120));
}

export function onPointerDown(event) {
  if (!image.id || state.drag) return;
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
  if (tool === "box" || tool === "inspect" || tool === "example") {
    state.drag = { kind: tool, pointerId: event.pointerId, start: p, end: null, client: [event.clientX, event.clientY] };
  } else if (tool === "scribble") {
    state.drag = {
      kind: "scribble",
      pointerId: event.pointerId,
      scribble: { points: [p], positive: !el.scribbleNegative.checked, width: brushWidth() },
    };
    renderPrompts();
  } else if (tool === "paint" || tool === "erase") {
    // Mask correction (brush.js): the stroke is drawn like a scribble while in progress.
    state.drag = {
      kind: "brush",
      pointerId: event.pointerId,
      scribble: { points: [p], positive: tool === "paint", width: brushWidth() },
    };
    renderPrompts();
  }
}

export function onPointerMove(event) {
  const drag = state.drag;
  if (!drag || event.pointerId !== drag.pointerId) return;
  const p = toImage(event);
  if (drag.kind === "box" || drag.kind === "inspect" || drag.kind === "example") {
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

export function onPointerUp(event) {
  if (!state.drag || event.pointerId !== state.drag.pointerId) return;
  const finished = state.drag;
  state.drag = null;
  if (el.prompt.hasPointerCapture(event.pointerId)) el.prompt.releasePointerCapture(event.pointerId);
  if (finished.kind === "box" || finished.kind === "inspect" || finished.kind === "example") {
    const end = toImage(event);
    const moved = Math.hypot(event.clientX - finished.client[0], event.clientY - finished.client[1]);
    const box = normBox(finished.start, end);
    if (moved < 4 || box[2] - box[0] <= 0 || box[3] - box[1] <= 0) {
      renderPrompts();
      setStatus("Drag on the image to draw a box");
      return;
    }
    if (finished.kind === "inspect") {
      addInspectBox(box); // a defect mark for inspect mode, not a prompt
      return;
    }
    if (finished.kind === "example") {
      addExample(box); // an example object for find.js, not a prompt
      return;
    }
    editActive((rec) => {
      rec.box = box;
    }, "box");
  } else if (finished.kind === "brush") {
    applyBrush(finished.scribble);
  } else {
    const s = finished.scribble;
    editActive((rec) => rec.scribbles.push(s), "scribble");
  }
}

export function onPointerCancel(event) {
  if (!state.drag || event.pointerId !== state.drag.pointerId) return;
  state.drag = null;
  renderPrompts();
}
