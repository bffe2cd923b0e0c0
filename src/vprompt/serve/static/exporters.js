/* exporters.js: downloads of the current masks: a PNG (label image of all objects, or the
 * active object as 0/255) and COCO JSON with RLE masks (categories: the label list, labels.js). Both wait until no request is in flight.
 */
import { whenIdle } from "./busy.js";
import { clearError, el, setStatus, showError } from "./dom.js";
import { encodeGrayPng } from "./png.js";
import { encodeRle } from "./rle.js";
import { activeRecord, current, displayed, image, state } from "./state.js";

function download(blob, filename) {
  const url = URL.createObjectURL(blob);
  const a = document.createElement("a");
  a.href = url;
  a.download = filename;
  a.hidden = true;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

const stem = () => (image.name || "image").replace(/\.[^.]+$/, "") || "image";

export async function exportPng() {
  if (!image.id) return;
  clearError();
  await whenIdle();
  const { width, height } = image;
  const objects = current().objects;
  try {
    if (el.exportKind.value === "active") {
      const rec = activeRecord();
      const res = rec && displayed(rec);
      if (!res) throw new Error(`object ${state.activeId} has no mask to export yet`);
      const values = new Uint8Array(width * height);
      for (let i = 0; i < values.length; i++) values[i] = res.bits[i] ? 255 : 0;
      download(await encodeGrayPng(width, height, values, 8), `${stem()}_object${rec.id}.png`);
      setStatus(`Exported object ${rec.id} as a 0/255 PNG mask`);
    } else {
      if (!objects.some((r) => displayed(r))) throw new Error("no masks to export yet");
      const bitDepth = objects.length > 255 ? 16 : 8;
      const values = bitDepth === 16 ? new Uint16Array(width * height) : new Uint8Array(width * height);
      objects.forEach((rec, index) => {
        const res = displayed(rec);
        if (!res) return;
        for (let i = 0; i < values.length; i++) if (res.bits[i]) values[i] = index + 1;
      });
      download(await encodeGrayPng(width, height, values, bitDepth), `${stem()}_labels.png`);
      setStatus(
        `Exported a ${bitDepth}-bit label image: 0 is background, k is the k-th object in the list`
      );
    }
  } catch (err) {
    showError(`export: ${err.message}`);
  }
}

export async function exportCoco() {
  if (!image.id) return;
  clearError();
  await whenIdle();
  const { width, height } = image;
  const annotations = [];
  current().objects.forEach((rec, index) => {
    const res = displayed(rec);
    if (!res) return;
    const ann = {
      id: annotations.length + 1,
      image_id: 1,
      category_id: rec.label,
      segmentation: encodeRle(res.bits, width, height),
      area: res.area,
      bbox: res.bbox,
      iscrowd: 0,
      vprompt_object: rec.id,
      vprompt_label: index + 1,
    };
    if (typeof res.score === "number") ann.score = res.score;
    annotations.push(ann);
  });
  if (!annotations.length) {
    showError("export: no masks to export yet");
    return;
  }
  const coco = {
    info: { description: "vprompt serve annotations", date_created: new Date().toISOString() },
    images: [{ id: 1, file_name: image.name, width, height }],
    categories: state.labels.map((l) => ({ id: l.id, name: l.name, supercategory: "object" })),
    annotations,
  };
  const blob = new Blob([JSON.stringify(coco)], { type: "application/json" });
  download(blob, `${stem()}_coco.json`);
  setStatus(`Exported ${annotations.length} annotation(s) as COCO JSON with RLE masks`);
}
