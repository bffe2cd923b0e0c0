/* main.js: entry point of the vprompt serve page (docs/serve-api.md): wires the controls,
 * pointer, keyboard shortcuts and drag and drop to the modules beside it, and exposes the
 * read-only `window.vprompt` handle for tests. Plain ES modules, no build step, no external
 * assets.
 */
import { runAutomatic } from "./automatic.js";
import { whenIdle } from "./busy.js";
import { layout } from "./canvas.js";
import { classify, loadModels, onPackChange } from "./classify.js";
import { clearError, el } from "./dom.js";
import { exportCoco, exportPng } from "./exporters.js";
import { clearAll, deleteObject, newObject, redo, undo } from "./history.js";
import { updateControls } from "./render.js";
import { current, image, objectRequest, state } from "./state.js";
import { cancelDrag, onPointerCancel, onPointerDown, onPointerMove, onPointerUp, setTool } from "./tools.js";
import { openFile } from "./upload.js";

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
  } else if (key === "Escape" && state.drag) {
    cancelDrag();
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
el.classifyPack.addEventListener("change", onPackChange);

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
    return state.history.length;
  },
  get historyIndex() {
    return state.historyIndex;
  },
  prompts() {
    return state.history.length ? current().objects.map((r) => objectRequest(r, false)) : [];
  },
};
