/* segment.js: prompted segmentation: sends every object of the current snapshot that has
 * prompts but no result, attaches the decoded masks (with SAM's candidates for lone clicks), and retries once when the server lost
 * the image (re-upload) or the refinement token (resend without `previous`).
 */
import { postJson, uploadFile } from "./api.js";
import { changePending } from "./busy.js";
import { fmtScore, setStatus, showError } from "./dom.js";
import { decodeResult } from "./masks.js";
import { renderAll, renderObjectList } from "./render.js";
import { current, hasPrompt, image, objectRequest } from "./state.js";

/** Segment every object of the current state that has prompts but no result yet. */
export async function segmentPending() {
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
    const results = await Promise.all(objects.map((o) => decodeWithCandidates(o)));
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
    else segmentPending(); // the shown image changed: its own objects may still need answers
  }
}

/** The object's best mask; with candidates, every candidate knows the others and its index
 * (candidates.js lets the user pick another one). */
async function decodeWithCandidates(object) {
  if (!Array.isArray(object.candidates) || object.candidates.length < 2) return decodeResult(object);
  const all = await Promise.all(object.candidates.map((c) => decodeResult(c)));
  all.forEach((res, k) => {
    res.candidates = all;
    res.choice = k;
  });
  const best = Number.isInteger(object.best) && all[object.best] ? object.best : 0;
  return all[best];
}

async function segmentRequest(recs, generation) {
  const body = (withPrevious) => ({
    objects: recs.map((r) => objectRequest(r, withPrevious)),
    multimask: "auto",
    format: "png",
    candidates: true, // three candidates for lone clicks, to choose from (candidates.js)
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
