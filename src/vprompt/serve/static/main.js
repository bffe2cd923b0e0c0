/* main.js: entry point of the vprompt serve page (docs/serve-api.md): wires the controls (image
 * queue, session, exports included),
 * pointer, keyboard shortcuts and drag and drop to the modules beside it, and exposes the
 * read-only `window.vprompt` handle for tests. Plain ES modules, no build step, no external
 * assets.
 */
import { runAutomatic } from "./automatic.js";
import { whenIdle } from "./busy.js";
import { layout, view } from "./canvas.js";
import { classify, loadModels, onPackChange } from "./classify.js";
import { clearError, el } from "./dom.js";
import { exportCoco, exportPng, exportVoc, exportYolo } from "./exporters.js";
import { findSummary, hasDetector, setupFind, wireFind } from "./find.js";
import { clearAll, deleteObject, newObject, redo, undo } from "./history.js";
import { clearInspectBoxes, findSimilar, inspectSummary, renderInspect } from "./inspect.js";
import { chooseLabelByIndex, wireLabels } from "./labels.js";
import { updateControls } from "./render.js";
import { current, displayed, image, labelName, lookOf, objectRequest, state } from "./state.js";
import { cancelDrag, onPointerCancel, onPointerDown, onPointerMove, onPointerUp, setTool } from "./tools.js";
import { wireSession } from "./session.js";
import { nextImage, openFiles, previousImage, queue, renderQueue } from "./upload.js";
import { panDown, panMove, panUp, setSpaceHeld, wireViewport, zoomFit, zoomIn, zoomOut } from "./viewport.js";

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
  if (key === " " && !event.target.matches("button, summary, a, select")) {
    event.preventDefault(); // no page scroll: Space + drag pans
    setSpaceHeld(true);
    return;
  }
  if (key === "+" || key === "=") {
    event.preventDefault();
    zoomIn();
    return;
  }
  if (key === "-") {
    event.preventDefault();
    zoomOut();
    return;
  }
  if (key === "0") {
    event.preventDefault();
    zoomFit();
    return;
  }
  if (key === "," || key === ".") {
    event.preventDefault();
    if (key === ",") previousImage();
    else nextImage();
    return;
  }
  if (/^[1-9]$/.test(key)) {
    event.preventDefault();
    chooseLabelByIndex(Number(key));
    return;
  }
  const tools = { p: "positive", n: "negative", b: "box", s: "scribble", a: "paint", x: "erase", i: "inspect" };
  if (hasDetector()) tools.g = "example";
  if (key === "f" && hasDetector() && !event.shiftKey && !el.findQueries.closest("[hidden]")) {
    event.preventDefault();
    el.findQueries.focus();
  } else if (tools[key] && !event.shiftKey) {
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
  } else if (key === "Escape" && state.drag) {
    cancelDrag();
  }
}

// ------------------------------------------------------------------------------ wiring

el.fileInput.addEventListener("change", () => {
  const files = Array.from(el.fileInput.files || []);
  el.fileInput.value = "";
  openFiles(files);
});

for (const button of el.tools) button.addEventListener("click", () => setTool(button.dataset.tool));
el.undo.addEventListener("click", undo);
el.redo.addEventListener("click", redo);
el.clear.addEventListener("click", clearAll);
el.automatic.addEventListener("click", runAutomatic);
el.exportPng.addEventListener("click", exportPng);
el.exportCoco.addEventListener("click", exportCoco);
el.exportYolo.addEventListener("click", exportYolo);
el.exportVoc.addEventListener("click", exportVoc);
el.prevImage.addEventListener("click", previousImage);
el.nextImage.addEventListener("click", nextImage);
el.newObject.addEventListener("click", newObject);
el.deleteObject.addEventListener("click", deleteObject);
el.alertDismiss.addEventListener("click", clearError);
el.classifyForm.addEventListener("submit", classify);
el.classifyPack.addEventListener("change", onPackChange);
el.findSimilar.addEventListener("click", findSimilar);
el.clearMarks.addEventListener("click", clearInspectBoxes);
el.inspectHeatmap.addEventListener("change", renderInspect);
wireFind();

// Pan drags (viewport.js) come first; everything else goes to the prompt tools.
el.prompt.addEventListener("pointerdown", (e) => panDown(e) || onPointerDown(e));
el.prompt.addEventListener("pointermove", (e) => panMove(e) || onPointerMove(e));
el.prompt.addEventListener("pointerup", (e) => panUp(e) || onPointerUp(e));
el.prompt.addEventListener("pointercancel", (e) => panUp(e) || onPointerCancel(e));
document.addEventListener("keyup", (event) => {
  if (event.key === " ") setSpaceHeld(false);
});
window.addEventListener("blur", () => setSpaceHeld(false));
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
  const files = event.dataTransfer && event.dataTransfer.files;
  if (files && files.length) openFiles(files);
});

if (typeof ResizeObserver === "function") {
  new ResizeObserver(() => layout()).observe(el.stage);
} else {
  window.addEventListener("resize", layout);
}

setTool("positive");
wireLabels();
wireViewport();
wireSession();
renderQueue();
updateControls();
loadModels().then(setupFind);

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
    return state.history.length;
  },
  get historyIndex() {
    return state.historyIndex;
  },
  prompts() {
    return state.history.length ? current().objects.map((r) => objectRequest(r, false)) : [];
  },
  /** The image queue: the shown image's position (0-based), the count and the file names. */
  get queue() {
    return { index: queue.index, length: queue.items.length, names: queue.items.map((i) => i.name) };
  },
  get zoom() {
    return view.zoom;
  },
  /** Inspect mode: the last find-similar search ({example, regions: [{name, score, box, area,
   * rank}]}) or null. */
  inspect() {
    return inspectSummary();
  },
  /** Find mode: the open image's example boxes and last result (find.js), or null. */
  find() {
    return findSummary();
  },
  labels() {
    return state.labels.map((l) => ({ ...l, active: l.id === state.activeLabel }));
  },
  /** Each object: id, label id and name, mask area, look, and its candidates' areas. */
  objects() {
    if (!state.history.length) return [];
    return current().objects.map((r) => {
      const res = displayed(r);
      const cands = res && res.candidates;
      return {
        id: r.id,
        label: r.label,
        labelName: labelName(r.label),
        area: res ? res.area : 0,
        ...lookOf(r.id),
        candidates: cands ? cands.map((c) => c.area) : [],
        choice: cands ? res.choice : null,
      };
    });
  },
};
