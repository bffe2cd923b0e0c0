/* upload.js: opening an image (file picker or drop): upload to the server, decode it for
 * display, forget the previous image (server side too) and start a fresh history.
 */
import { apiFetch, uploadFile } from "./api.js";
import { changePending } from "./busy.js";
import { layout, resetZoom } from "./canvas.js";
import { clearError, el, setStatus, showError } from "./dom.js";
import { resetHistory } from "./history.js";
import { updateControls } from "./render.js";
import { image, state } from "./state.js";

export async function openFile(file) {
  if (!file) return;
  clearError();
  setStatus(`Uploading ${file.name}…`);
  changePending(+1);
  try {
    const info = await uploadFile(file);
    let bitmap;
    try {
      bitmap = await createImageBitmap(file);
    } catch (_) {
      throw new Error(
        `the server accepted ${file.name}, but this browser cannot display its format; ` +
          "convert it to PNG or JPEG"
      );
    }
    const oldId = image.id;
    if (image.bitmap && image.bitmap.close) image.bitmap.close();
    Object.assign(image, {
      id: info.image_id,
      width: info.width,
      height: info.height,
      bitmap,
      file,
      name: file.name || "image",
      generation: image.generation + 1,
    });
    if (oldId && oldId !== image.id) {
      apiFetch(`api/images/${encodeURIComponent(oldId)}`, { method: "DELETE" }).catch(() => {});
    }
    resetHistory();
    state.drag = null;
    el.dropHint.hidden = true;
    el.wrap.hidden = false;
    el.classifyResults.replaceChildren();
    el.classifySource.textContent = "";
    resetZoom();
    layout();
    let note = "";
    if (bitmap.width !== info.width || bitmap.height !== info.height) {
      note = ` (the browser decoded it as ${bitmap.width}×${bitmap.height}; shown stretched)`;
    }
    setStatus(
      `${image.name}: ${info.width}×${info.height}${note}. Click with a tool to segment.`
    );
    el.prompt.focus({ preventScroll: true });
  } catch (err) {
    showError(err.message);
    setStatus(image.id ? `Still showing ${image.name}` : "No image open");
  } finally {
    changePending(-1);
    updateControls();
  }
}
