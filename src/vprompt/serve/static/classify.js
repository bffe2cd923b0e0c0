/* classify.js: the server panel and image classification: reads the server's models and
 * prompt packs at start-up, and classifies the open image zero-shot (class names) or with a
 * pack.
 */
import { apiFetch } from "./api.js";
import { changePending } from "./busy.js";
import { clearError, el, setStatus, showError } from "./dom.js";
import { updateControls } from "./render.js";
import { image, packs, state } from "./state.js";

export async function loadModels() {
  try {
    state.models = await apiFetch("api/models");
  } catch (err) {
    el.modelInfo.textContent = `Could not read the server's models: ${err.message}`;
    showError(err.message);
    return;
  }
  const seg = state.models.segmenter || {};
  const cls = state.models.classifier;
  el.modelInfo.textContent =
    `Segmenter: ${seg.name || "?"}${seg.weights ? ` (${seg.weights})` : ""}. ` +
    `Classifier: ${cls ? `${cls.name}${cls.weights ? ` (${cls.weights})` : ""}` : "none"}. ` +
    `Packs: ${packs().length ? packs().join(", ") : "none"}.`;
  // Nothing to classify with: the panel stays hidden (it starts hidden in index.html).
  el.classifyPanel.hidden = !cls && packs().length === 0;
  for (const name of packs()) {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = `pack: ${name}`;
    el.classifyPack.append(option);
  }
  if (!cls) {
    el.classifyClasses.disabled = true;
    el.classifyClasses.placeholder = "no zero-shot classifier on this server";
  }
  updateControls();
}

/** A pack replaces the class names; without a zero-shot classifier they stay disabled. */
export function onPackChange() {
  el.classifyClasses.disabled = Boolean(el.classifyPack.value) || !(state.models && state.models.classifier);
}

export async function classify(event) {
  event.preventDefault();
  if (!image.file) return;
  clearError();
  const form = new FormData();
  form.append("file", image.file, image.name);
  const pack = el.classifyPack.value;
  const classes = el.classifyClasses.value
    .split(",")
    .map((c) => c.trim())
    .filter(Boolean);
  if (pack) form.append("pack", pack);
  else if (classes.length) form.append("classes", classes.join(","));
  else {
    showError("classify: enter class names (comma-separated) or choose a pack");
    el.classifyClasses.focus();
    return;
  }
  const topk = Number(el.classifyTopk.value);
  if (Number.isInteger(topk) && topk > 0) form.append("top_k", String(topk));
  el.classifyButton.disabled = true;
  changePending(+1);
  setStatus("Classifying…");
  try {
    const result = await apiFetch("api/classify", { method: "POST", body: form });
    const items = (result.predictions || []).map((p) => {
      const li = document.createElement("li");
      li.textContent = `${p.label} — ${(100 * p.score).toFixed(1)}%`;
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.style.width = `${Math.max(1, Math.min(100, 100 * p.score))}%`;
      bar.setAttribute("aria-hidden", "true");
      li.append(bar);
      return li;
    });
    el.classifyResults.replaceChildren(...items);
    el.classifySource.textContent = result.source ? `source: ${result.source}` : "";
    const top = result.predictions && result.predictions[0];
    setStatus(top ? `Classified: ${top.label} (${(100 * top.score).toFixed(1)}%)` : "Classified");
  } catch (err) {
    showError(`classify: ${err.message}`);
    setStatus("Classification failed");
  } finally {
    changePending(-1);
    updateControls();
  }
}
