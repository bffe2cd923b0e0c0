/* automatic.js: "Everything": automatic mask generation on a point grid (options from the
 * side panel); the masks become one undoable snapshot of objects, largest first.
 */
import { postJson, uploadFile } from "./api.js";
import { changePending } from "./busy.js";
import { clearError, el, setStatus, showError } from "./dom.js";
import { pushSnapshot } from "./history.js";
import { decodeResult } from "./masks.js";
import { renderAll } from "./render.js";
import { encodeRle } from "./rle.js";
import { emptyRecord, image, state } from "./state.js";

export async function runAutomatic() {
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
    const firstId = state.nextObjectId;
    const objects = order.map((i) => {
      const rec = emptyRecord(state.nextObjectId++);
      const mask = found[i].mask;
      rec.mask = typeof mask === "string" ? encodeRle(results[i].bits, image.width, image.height) : mask;
      rec.result = results[i];
      return rec;
    });
    pushSnapshot(objects, "everything");
    state.activeId = firstId;
    setStatus(`Everything: ${objects.length} masks (Ctrl+Z to undo)`);
  } catch (err) {
    showError(err.message);
    setStatus("Everything failed");
  } finally {
    changePending(-1);
    renderAll();
  }
}
