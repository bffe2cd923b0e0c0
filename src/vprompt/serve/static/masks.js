/* masks.js: a server mask (base64 PNG or COCO RLE) -> a result record for the open image:
 * row-major 0/1 bits, area, bbox, scores and the refinement token.
 */
import { decodeRle } from "./rle.js";
import { image } from "./state.js";

let nextResultUid = 1;
let scratch = null;

function scratchContext(width, height) {
  if (!scratch) scratch = document.createElement("canvas");
  if (scratch.width !== width || scratch.height !== height) {
    scratch.width = width;
    scratch.height = height;
  }
  return scratch.getContext("2d", { willReadFrequently: true });
}

async function decodePngMask(base64, width, height) {
  const raw = atob(base64);
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  let bitmap;
  try {
    bitmap = await createImageBitmap(new Blob([bytes], { type: "image/png" }), {
      premultiplyAlpha: "none",
      colorSpaceConversion: "none",
    });
  } catch (_) {
    throw new Error("the server sent a mask that is not a valid PNG");
  }
  const ctx = scratchContext(width, height);
  ctx.clearRect(0, 0, width, height);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(bitmap, 0, 0, width, height);
  if (bitmap.close) bitmap.close();
  const data = ctx.getImageData(0, 0, width, height).data;
  const bits = new Uint8Array(width * height);
  for (let i = 0, o = 0; i < bits.length; i++, o += 4) {
    bits[i] = data[o] > 127 && data[o + 3] > 127 ? 1 : 0;
  }
  return bits;
}

function maskStats(bits, width, height) {
  let area = 0;
  let x0 = width;
  let y0 = height;
  let x1 = -1;
  let y1 = -1;
  for (let y = 0, i = 0; y < height; y++) {
    for (let x = 0; x < width; x++, i++) {
      if (!bits[i]) continue;
      area += 1;
      if (x < x0) x0 = x;
      if (x > x1) x1 = x;
      if (y < y0) y0 = y;
      if (y > y1) y1 = y;
    }
  }
  const bbox = area ? [x0, y0, x1 - x0 + 1, y1 - y0 + 1] : [0, 0, 0, 0];
  return { area, bbox };
}

/** A result made on the page (brush.js, restored sessions): 0/1 bits of the open image (or
 * of a queued image of the given size), no scores, no logits. */
export function bitsResult(bits, width = image.width, height = image.height) {
  return { uid: nextResultUid++, bits, ...maskStats(bits, width, height), logits: null };
}

export async function decodeResult(object) {
  const { width, height } = image;
  const mask = object.mask;
  let bits;
  if (typeof mask === "string") bits = await decodePngMask(mask, width, height);
  else if (mask && mask.size && mask.counts !== undefined) bits = decodeRle(mask, width, height);
  else throw new Error("the server sent a mask in an unknown format");
  return {
    uid: nextResultUid++,
    bits,
    ...maskStats(bits, width, height),
    score: object.score,
    stability: object.stability,
    logits: object.logits || null,
  };
}
