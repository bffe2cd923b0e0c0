/* polygon.js: a mask's outline as a polygon, for the YOLO-seg export: the outer border of
 * its largest 8-connected component, traced along pixel edges (vertices on pixel corners, so
 * x in [0, width] and y in [0, height]; holes are not kept), then simplified
 * (Douglas-Peucker, 0.7 px) so diagonal staircases become straight edges.
 */

/** The pixels of the largest 8-connected component of row-major 0/1 `bits` (0/1 again). */
function largestComponent(bits, width, height) {
  const labels = new Int32Array(width * height);
  const stack = new Int32Array(width * height);
  let best = 0;
  let bestSize = 0;
  let next = 0;
  for (let start = 0; start < bits.length; start++) {
    if (!bits[start] || labels[start]) continue;
    next += 1;
    let size = 0;
    let top = 0;
    stack[top++] = start;
    labels[start] = next;
    while (top) {
      const i = stack[--top];
      size += 1;
      const x = i % width;
      const y = (i - x) / width;
      for (let dy = -1; dy <= 1; dy++) {
        const yy = y + dy;
        if (yy < 0 || yy >= height) continue;
        for (let dx = -1; dx <= 1; dx++) {
          const xx = x + dx;
          if (xx < 0 || xx >= width) continue;
          const j = yy * width + xx;
          if (bits[j] && !labels[j]) {
            labels[j] = next;
            stack[top++] = j;
          }
        }
      }
    }
    if (size > bestSize) {
      bestSize = size;
      best = next;
    }
  }
  if (!best) return null;
  const out = new Uint8Array(width * height);
  for (let i = 0; i < out.length; i++) out[i] = labels[i] === best ? 1 : 0;
  return out;
}

// Headings east, south, west, north (clockwise on screen, y down); for each, the offsets of
// the pixels ahead-right and ahead-left of the current corner (pixel (cx+dx, cy+dy)).
const STEP = [[1, 0], [0, 1], [-1, 0], [0, -1]];
const AHEAD_RIGHT = [[0, 0], [-1, 0], [-1, -1], [0, -1]];
const AHEAD_LEFT = [[0, -1], [0, 0], [-1, 0], [-1, -1]];

/** The outer border of a one-component mask as corner points [[x, y]…], clockwise. */
function traceBorder(comp, width, height) {
  const first = comp.indexOf(1);
  if (first < 0) return [];
  const inside = (x, y) => x >= 0 && y >= 0 && x < width && y < height && comp[y * width + x] === 1;
  const sx = first % width;
  const sy = (first - sx) / width;
  const points = [];
  let cx = sx;
  let cy = sy;
  let dir = 0; // east along the top edge of the first pixel, the mask on the right
  let guard = 4 * (width + 1) * (height + 1);
  do {
    const [lx, ly] = AHEAD_LEFT[dir];
    const [rx, ry] = AHEAD_RIGHT[dir];
    let turn = dir;
    if (inside(cx + lx, cy + ly)) turn = (dir + 3) % 4; // left: diagonal pixels stay joined
    else if (!inside(cx + rx, cy + ry)) turn = (dir + 1) % 4; // right
    if (turn !== dir || !points.length) points.push([cx, cy]);
    dir = turn;
    cx += STEP[dir][0];
    cy += STEP[dir][1];
  } while ((cx !== sx || cy !== sy) && --guard > 0);
  return points;
}

function simplify(points, epsilon) {
  if (points.length <= 4) return points;
  // Split the closed ring at the vertex farthest from the first one; simplify both halves.
  let far = 0;
  let farD = -1;
  for (let i = 1; i < points.length; i++) {
    const d = (points[i][0] - points[0][0]) ** 2 + (points[i][1] - points[0][1]) ** 2;
    if (d > farD) {
      farD = d;
      far = i;
    }
  }
  const keep = new Uint8Array(points.length + 1);
  keep[0] = keep[far] = keep[points.length] = 1;
  const ring = points.concat([points[0]]);
  const stack = [[0, far], [far, points.length]];
  while (stack.length) {
    const [a, b] = stack.pop();
    const [ax, ay] = ring[a];
    const [bx, by] = ring[b];
    const len = Math.hypot(bx - ax, by - ay) || 1;
    let worst = -1;
    let worstD = epsilon;
    for (let i = a + 1; i < b; i++) {
      const d = Math.abs((bx - ax) * (ay - ring[i][1]) - (ax - ring[i][0]) * (by - ay)) / len;
      if (d > worstD) {
        worstD = d;
        worst = i;
      }
    }
    if (worst >= 0) {
      keep[worst] = 1;
      stack.push([a, worst], [worst, b]);
    }
  }
  const out = points.filter((_, i) => keep[i]);
  return out.length >= 3 ? out : points;
}

/** The polygon [[x, y]…] (image pixel corners) of a mask's largest component, or null. */
export function maskPolygon(bits, width, height) {
  const comp = largestComponent(bits, width, height);
  if (!comp) return null;
  return simplify(traceBorder(comp, width, height), 0.7);
}
