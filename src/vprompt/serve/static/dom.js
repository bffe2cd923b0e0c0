/* dom.js: the page's element handles, the status line, the error alert and the score format.
 * Every other module reaches the page through `el`; ids and data-testids live in index.html.
 */

const $ = (id) => document.getElementById(id);

export const el = {
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
  classifyPanel: $("classify-panel"),
  labelList: $("label-list"),
  labelForm: $("label-form"),
  newLabel: $("new-label"),
  candidatesPanel: $("candidates-panel"),
  candidateList: $("candidate-list"),
  zoomIn: $("zoom-in"),
  zoomOut: $("zoom-out"),
  zoomFit: $("zoom-fit"),
  prevImage: $("prev-image"),
  nextImage: $("next-image"),
  queuePosition: $("queue-position"),
  queueName: $("queue-name"),
  queueWaiting: $("queue-waiting"),
  saveSession: $("save-session"),
  restoreInput: $("restore-input"),
  exportYolo: $("export-yolo"),
  exportVoc: $("export-voc"),
  findSimilar: $("find-similar"),
  clearMarks: $("clear-marks"),
  inspectTopk: $("inspect-topk"),
  inspectThreshold: $("inspect-threshold"),
  inspectHeatmap: $("inspect-heatmap"),
  inspectResults: $("inspect-results"),
  inspectStrip: $("inspect-strip"),
  findPanel: $("find-panel"),
  findForm: $("find-form"),
  findQueries: $("find-queries"),
  findExamples: $("find-examples"),
  clearExamples: $("clear-examples"),
  exampleNegative: $("example-negative"),
  exampleNegativeLabel: $("example-negative-label"),
  findThreshold: $("find-threshold"),
  findTopk: $("find-topk"),
  findMasks: $("find-masks"),
  findMasksLabel: $("find-masks-label"),
  findResults: $("find-results"),
  findToObjects: $("find-to-objects"),
  findClear: $("find-clear"),
};

export function setStatus(message) {
  el.status.textContent = message;
}

export function showError(message) {
  el.alertText.textContent = message;
  el.alert.hidden = false;
}

export function clearError() {
  el.alert.hidden = true;
  el.alertText.textContent = "";
}

export const fmtScore = (s) => (Math.abs(s) < 0.005 ? 0 : s).toFixed(2);
