/* candidates.js: SAM's three candidate masks for a lone click (part / object / whole, as in
 * SAM's demo): the active object's candidates are listed with their scores; hovering or
 * focusing one previews it on the overlay, choosing one makes it the object's mask (one undo
 * step; later refinement starts from its logits).
 */
import { el, fmtScore } from "./dom.js";
import { pushSnapshot } from "./history.js";
import { renderOverlay } from "./overlay.js";
import { renderAll } from "./render.js";
import { activeRecord, changedRecord, current, state } from "./state.js";

function setPreview(rec, result) {
  const next = result ? { id: rec.id, result } : null;
  if ((state.preview && state.preview.result) === (next && next.result)) return;
  state.preview = next;
  renderOverlay();
}

export function chooseCandidate(k) {
  const rec = activeRecord();
  const cands = rec && rec.result && rec.result.candidates;
  if (!cands || !cands[k] || rec.result === cands[k]) return;
  const objects = current().objects.slice();
  const index = objects.indexOf(rec);
  objects[index] = changedRecord(rec, { result: cands[k], shown: null });
  state.preview = null;
  pushSnapshot(objects, "choose mask");
  renderAll();
}

export function renderCandidates() {
  const rec = state.history.length ? activeRecord() : null;
  const res = rec && rec.result;
  const cands = res && res.candidates;
  el.candidatesPanel.hidden = !cands;
  if (!cands) {
    el.candidateList.replaceChildren();
    if (state.preview) setPreview(null, null);
    return;
  }
  const best = cands.reduce((b, c, k) => ((c.score ?? -Infinity) > (cands[b].score ?? -Infinity) ? k : b), 0);
  const items = cands.map((cand, k) => {
    const li = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.testid = `candidate-${k}`;
    button.setAttribute("aria-pressed", String(cand === res));
    button.title = `Use mask ${k + 1} for object ${rec.id} (hover to preview)`;
    const score = typeof cand.score === "number" ? ` · score ${fmtScore(cand.score)}` : "";
    button.textContent = `Mask ${k + 1}${k === best ? " (best)" : ""}: ${cand.area.toLocaleString()} px${score}`;
    const show = () => setPreview(rec, cand);
    const hide = () => setPreview(null, null);
    button.addEventListener("mouseenter", show);
    button.addEventListener("focus", show);
    button.addEventListener("mouseleave", hide);
    button.addEventListener("blur", hide);
    button.addEventListener("click", () => chooseCandidate(k));
    li.append(button);
    return li;
  });
  el.candidateList.replaceChildren(...items);
}
