/* inspect.js: inspect mode (docs/serve-api.md, POST api/find-similar): the user marks a defect
 * on the open image (the Mark tool draws boxes; without boxes the active object's mask is used,
 * so the mask brush works too), "Find similar" searches the other queued images, and the found
 * regions are listed by rank and drawn (mask, box, rank and score) on a thumbnail of each
 * target, with the search's heat map on request. Clicking a result opens that image.
 */
import { postJson } from "./api.js";
import { changePending } from "./busy.js";
import { el, fmtScore, setStatus, showError } from "./dom.js";
import { renderPrompts } from "./overlay.js";
import { updateControls } from "./render.js";
import { decodeRle, encodeRle } from "./rle.js";
import { activeRecord, displayed, image, state } from "./state.js";
import { queue, showImage } from "./upload.js";

const REGION_COLOR = [255, 140, 0];
const THUMB_WIDTH = 232;

/** The last search: {exampleName, targets: [{item, regions, heatmap}], regions: [...]}. */
let last = null;

/** The boxes marked on the open image (they belong to the image's File, kept per image). */
export function inspectBoxes() {
  const marks = state.inspect;
  return marks.owner === image.file ? marks.boxes : [];
}

export function addInspectBox(box) {
  if (state.inspect.owner !== image.file) state.inspect = { owner: image.file, boxes: [] };
  state.inspect.boxes.push(box);
  renderPrompts();
  updateControls();
  setStatus(`Defect marked (${state.inspect.boxes.length} box(es)): press "Find similar"`);
}

export function clearInspectBoxes() {
  state.inspect = { owner: null, boxes: [] };
  renderPrompts();
  updateControls();
}

/** The request's region: the marked boxes, else the active object's mask. */
function markedRegion() {
  const boxes = inspectBoxes();
  if (boxes.length) return { boxes: boxes.map((b) => b.slice()) };
  const rec = activeRecord();
  const res = rec && displayed(rec);
  if (res && res.area) return { mask: encodeRle(res.bits, image.width, image.height) };
  return null;
}

function numberField(input, fallback) {
  const v = Number(input.value);
  return Number.isFinite(v) && input.value !== "" ? v : fallback;
}

export async function findSimilar() {
  if (!image.id) return;
  const region = markedRegion();
  if (!region) {
    showError("Mark the defect first: draw a box with the Mark tool, or paint it with the brush");
    return;
  }
  const targets = queue.items.filter((_, i) => i !== queue.index);
  if (!targets.length) {
    showError("Open at least one more image to search");
    return;
  }
  const body = {
    image_id: image.id,
    ...region,
    targets: targets.map((t) => t.id),
    top_k: numberField(el.inspectTopk, 10),
    threshold: numberField(el.inspectThreshold, 0),
    format: "rle",
    heatmaps: true,
  };
  const exampleName = image.name;
  changePending(+1);
  setStatus(`Searching ${targets.length} image(s) for regions like the marked one…`);
  try {
    const response = await postJson("api/find-similar", body);
    const byId = new Map(targets.map((t) => [t.id, t]));
    const heat = new Map((response.heatmaps || []).map((h) => [h.image_id, h]));
    const regions = (response.regions || [])
      .filter((r) => byId.has(r.image_id))
      .map((r, rank) => ({ ...r, rank: rank + 1, item: byId.get(r.image_id) }));
    last = {
      exampleName,
      regions,
      targets: targets.map((item) => ({
        item,
        regions: regions.filter((r) => r.item === item),
        heatmap: heat.get(item.id) || null,
      })),
    };
    await renderInspect();
    setStatus(
      regions.length
        ? `${regions.length} similar region(s); best ${fmtScore(regions[0].score)} in ${regions[0].item.name}`
        : "No similar region above the threshold (lower it to see weaker matches)"
    );
  } catch (err) {
    showError(err.message);
    setStatus("Find similar failed");
  } finally {
    changePending(-1);
  }
}

/** The ranked list and the thumbnails of the last search. */
export async function renderInspect() {
  el.inspectResults.replaceChildren();
  el.inspectStrip.replaceChildren();
  if (!last) return;
  for (const r of last.regions) {
    const li = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "link-row";
    button.textContent = `${r.item.name} — ${fmtScore(r.score)}`;
    button.title = `Open ${r.item.name} (region at ${r.box.map((v) => Math.round(v)).join(", ")}, ${r.area} px)`;
    button.addEventListener("click", () => showImage(queue.items.indexOf(r.item)));
    li.append(button);
    el.inspectResults.append(li);
  }
  for (const target of last.targets) {
    const figure = document.createElement("figure");
    figure.className = "inspect-thumb";
    const canvas = document.createElement("canvas");
    canvas.dataset.testid = "inspect-thumb";
    canvas.setAttribute("role", "img");
    canvas.setAttribute(
      "aria-label",
      `${target.item.name}: ${target.regions.length} similar region(s)`
    );
    canvas.addEventListener("click", () => showImage(queue.items.indexOf(target.item)));
    const caption = document.createElement("figcaption");
    caption.textContent = `${target.item.name}: ${target.regions.length} region(s)`;
    figure.append(canvas, caption);
    el.inspectStrip.append(figure);
    await drawThumb(canvas, target);
  }
}

async function drawThumb(canvas, target) {
  const { item, regions, heatmap } = target;
  const scale = THUMB_WIDTH / item.width;
  canvas.width = THUMB_WIDTH;
  canvas.height = Math.max(1, Math.round(item.height * scale));
  const ctx = canvas.getContext("2d");
  ctx.drawImage(item.bitmap, 0, 0, canvas.width, canvas.height);
  if (el.inspectHeatmap.checked && heatmap) await drawHeat(ctx, heatmap, canvas);
  // Masks at image resolution, composed once, then scaled onto the thumbnail.
  if (regions.length) {
    const source = document.createElement("canvas");
    source.width = item.width;
    source.height = item.height;
    const sctx = source.getContext("2d");
    const data = sctx.createImageData(item.width, item.height);
    const [r, g, b] = REGION_COLOR;
    for (const region of regions) {
      const bits = decodeRle(region.mask, item.width, item.height);
      for (let i = 0; i < bits.length; i++) {
        if (!bits[i]) continue;
        data.data[i * 4] = r;
        data.data[i * 4 + 1] = g;
        data.data[i * 4 + 2] = b;
        data.data[i * 4 + 3] = 130;
      }
    }
    sctx.putImageData(data, 0, 0);
    ctx.drawImage(source, 0, 0, canvas.width, canvas.height);
  }
  ctx.font = "11px system-ui, sans-serif";
  ctx.textBaseline = "top";
  for (const region of regions) {
    const [x0, y0, x1, y1] = region.box.map((v) => v * scale);
    ctx.lineWidth = 2;
    ctx.strokeStyle = `rgb(${REGION_COLOR.join(", ")})`;
    ctx.strokeRect(x0, y0, Math.max(1, x1 - x0), Math.max(1, y1 - y0));
    const tag = `#${region.rank} ${fmtScore(region.score)}`;
    const w = ctx.measureText(tag).width + 6;
    const ty = y0 >= 15 ? y0 - 15 : y0;
    ctx.fillStyle = "rgba(0, 0, 0, 0.7)";
    ctx.fillRect(x0, ty, w, 15);
    ctx.fillStyle = "#ffffff";
    ctx.fillText(tag, x0 + 3, ty + 2);
  }
  canvas.dataset.regions = String(regions.length);
}

/** The grayscale heat map as red, more opaque where hotter. */
async function drawHeat(ctx, heatmap, canvas) {
  const img = new Image();
  img.src = heatmap.png;
  await img.decode();
  const grid = document.createElement("canvas");
  grid.width = heatmap.width;
  grid.height = heatmap.height;
  const gctx = grid.getContext("2d");
  gctx.drawImage(img, 0, 0);
  const data = gctx.getImageData(0, 0, grid.width, grid.height);
  const px = data.data;
  for (let i = 0; i < px.length; i += 4) {
    const v = px[i] / 255;
    px[i] = 255;
    px[i + 1] = Math.round(200 * (1 - v));
    px[i + 2] = 0;
    px[i + 3] = Math.round(190 * v * v);
  }
  gctx.putImageData(data, 0, 0);
  ctx.imageSmoothingEnabled = true;
  ctx.drawImage(grid, 0, 0, canvas.width, canvas.height);
}

/** What the last search found, for tests: [{name, score, box, area, rank}]. */
export function inspectSummary() {
  if (!last) return null;
  return {
    example: last.exampleName,
    regions: last.regions.map((r) => ({ name: r.item.name, score: r.score, box: r.box, area: r.area, rank: r.rank })),
  };
}
