/* rle.js: COCO run-length encoding on the client, compatible with pycocotools: compressed
 * counts strings, column-major runs starting with background, to and from row-major 0/1 bits.
 */

/** COCO compressed RLE string -> run lengths (pycocotools' rleFrString). */
function rleDecompress(text) {
  const counts = [];
  let pos = 0;
  while (pos < text.length) {
    let x = 0;
    let shift = 0;
    let more = true;
    while (more) {
      if (pos >= text.length) throw new Error("RLE counts string ends in the middle of a number");
      const c = text.charCodeAt(pos) - 48;
      x |= (c & 0x1f) << shift;
      more = (c & 0x20) !== 0;
      pos += 1;
      shift += 5;
      if (!more && c & 0x10) x |= -1 << shift;
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  return counts;
}

/** Run lengths -> compressed COCO RLE string (pycocotools' rleToString). */
function rleCompress(counts) {
  let out = "";
  for (let i = 0; i < counts.length; i++) {
    let x = i > 2 ? counts[i] - counts[i - 2] : counts[i];
    let more = true;
    while (more) {
      let chunk = x & 0x1f;
      x >>= 5;
      more = !((x === 0 && !(chunk & 0x10)) || (x === -1 && chunk & 0x10));
      if (more) chunk |= 0x20;
      out += String.fromCharCode(chunk + 48);
    }
  }
  return out;
}

/** COCO RLE (column-major, starting with background) -> row-major 0/1 bits. */
export function decodeRle(rle, width, height) {
  const [h, w] = rle.size;
  if (h !== height || w !== width) {
    throw new Error(`the server sent a ${w}×${h} RLE mask for a ${width}×${height} image`);
  }
  const counts = typeof rle.counts === "string" ? rleDecompress(rle.counts) : rle.counts;
  const bits = new Uint8Array(width * height);
  let k = 0; // column-major position
  let value = 0;
  for (const run of counts) {
    if (value) {
      for (let t = k; t < k + run; t++) {
        const x = Math.floor(t / height);
        const y = t - x * height;
        bits[y * width + x] = 1;
      }
    }
    k += run;
    value ^= 1;
  }
  if (k !== width * height) throw new Error("the server sent an RLE mask of the wrong length");
  return bits;
}

/** Row-major 0/1 bits -> COCO RLE {size: [h, w], counts: compressed string}. */
export function encodeRle(bits, width, height) {
  const counts = [];
  let value = 0;
  let run = 0;
  for (let x = 0; x < width; x++) {
    for (let y = 0; y < height; y++) {
      const b = bits[y * width + x];
      if (b !== value) {
        counts.push(run);
        run = 0;
        value = b;
      }
      run += 1;
    }
  }
  counts.push(run);
  return { size: [height, width], counts: rleCompress(counts) };
}
