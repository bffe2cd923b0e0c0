/* busy.js: the count of requests in flight, mirrored on #app (data-pending, aria-busy), and
 * whenIdle() for work (exports, tests) that must wait until every answer is in.
 */
import { el } from "./dom.js";

let pending = 0;
let idleWaiters = [];

export function changePending(delta) {
  pending += delta;
  el.app.dataset.pending = String(pending);
  el.app.setAttribute("aria-busy", String(pending > 0));
  if (pending === 0) {
    const waiters = idleWaiters;
    idleWaiters = [];
    for (const resolve of waiters) resolve();
  }
}

export function whenIdle() {
  return pending === 0 ? Promise.resolve() : new Promise((resolve) => idleWaiters.push(resolve));
}
