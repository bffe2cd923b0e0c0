/* exporters.js: downloads of the masks: a PNG (label image of all objects, or the active
 * object as 0/255) and COCO JSON with RLE masks (categories: the label list, labels.js) of the
 * open image; YOLO-seg and Pascal VOC of every queued image (one file for one image, a ZIP
 * with one file per image for several). All wait until no request is in flight.
 */
import { whenIdle } from "./busy.js";
import { clearError, el, setStatus, showError } from "./dom.js";
import { encodeGrayPng } from "./png.js";
import { encodeRle } from "./rle.js";
import { maskPolygon } from "./polygon.js";
import { activeRecord, current, displayed, image, state } from "./state.js";
import { itemObjects, queue } from "./upload.js";
import { zipBlob } from "./zip.js";

export function download(blob, filename) {
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

const stemOf = (name) => (name || "image").replace(/\.[^.]+$/, "") || "image";
const stem = () => stemOf(image.name);

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

// ------------------------------------------------------------- YOLO-seg and Pascal VOC

/** One line per object with a mask: `class x1 y1 x2 y2 …`, the class being the label's
 * position in the label list (0-based) and the polygon (polygon.js: the outline of the
 * mask's largest component, on pixel corners) divided by the image's width and height. */
function yoloText(item) {
  const lines = [];
  for (const rec of itemObjects(item)) {
    const res = displayed(rec);
    if (!res || !res.area) continue;
    const cls = state.labels.findIndex((l) => l.id === rec.label);
    if (cls < 0) continue; // a label that is no longer in the list
    const poly = maskPolygon(res.bits, item.width, item.height);
    if (!poly) continue;
    const coords = poly.map(([x, y]) => `${+(x / item.width).toFixed(6)} ${+(y / item.height).toFixed(6)}`);
    lines.push(`${cls} ${coords.join(" ")}`);
  }
  return lines.length ? `${lines.join("\n")}\n` : "";
}

const xmlEscape = (text) =>
  String(text).replace(/[<>&'"]/g, (c) => ({ "<": "&lt;", ">": "&gt;", "&": "&amp;", "'": "&apos;", '"': "&quot;" })[c]);

/** Pascal VOC XML. Boxes use VOC's 1-based pixel convention, both ends inclusive: a mask
 * whose pixels span columns x0..x1 (0-based) has xmin = x0 + 1 and xmax = x1 + 1, so
 * xmax - xmin + 1 is its width in pixels (likewise for y). */
function vocXml(item) {
  const objects = [];
  for (const rec of itemObjects(item)) {
    const res = displayed(rec);
    if (!res || !res.area) continue;
    const [x, y, w, h] = res.bbox;
    const name = state.labels.find((l) => l.id === rec.label);
    objects.push(
      "  <object>\n" +
        `    <name>${xmlEscape(name ? name.name : `label ${rec.label}`)}</name>\n` +
        "    <pose>Unspecified</pose>\n    <truncated>0</truncated>\n    <difficult>0</difficult>\n" +
        `    <bndbox><xmin>${x + 1}</xmin><ymin>${y + 1}</ymin>` +
        `<xmax>${x + w}</xmax><ymax>${y + h}</ymax></bndbox>\n` +
        "  </object>\n"
    );
  }
  return (
    '<?xml version="1.0" encoding="UTF-8"?>\n<annotation>\n' +
    "  <folder>images</folder>\n" +
    `  <filename>${xmlEscape(item.name)}</filename>\n` +
    "  <source><database>vprompt serve</database></source>\n" +
    `  <size><width>${item.width}</width><height>${item.height}</height><depth>3</depth></size>\n` +
    "  <segmented>0</segmented>\n" +
    objects.join("") +
    "</annotation>\n"
  );
}

/** One file per queued image (`stem.ext`, names made unique); a ZIP when there are several. */
async function exportPerImage(kind, ext, render, extra) {
  if (!queue.items.length) return;
  clearError();
  await whenIdle();
  if (!queue.items.some((item) => itemObjects(item).some((r) => displayed(r)))) {
    showError(`export: no masks to export yet`);
    return;
  }
  const more = extra ? extra() : null;
  const taken = new Set(more ? [more.name] : []);
  const files = queue.items.map((item) => {
    let name = `${stemOf(item.name)}.${ext}`;
    for (let k = 2; taken.has(name); k++) name = `${stemOf(item.name)}_${k}.${ext}`;
    taken.add(name);
    return { name, data: render(item) };
  });
  if (files.length === 1) {
    download(new Blob([files[0].data], { type: ext === "xml" ? "application/xml" : "text/plain" }), files[0].name);
    setStatus(`Exported ${files[0].name} (${kind})`);
    return;
  }
  download(zipBlob(more ? files.concat([more]) : files), `vprompt_${ext === "xml" ? "voc" : "yolo"}.zip`);
  setStatus(`Exported ${files.length} images as ${kind}, one file per image in a ZIP`);
}

export const exportYolo = () =>
  exportPerImage("YOLO-seg", "txt", yoloText, () => ({
    name: "classes.txt",
    data: state.labels.map((l) => l.name).join("\n") + "\n",
  }));

export const exportVoc = () => exportPerImage("Pascal VOC", "xml", vocXml, null);
