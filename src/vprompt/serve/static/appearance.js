/* appearance.js: how each object is drawn: its mask opacity (slider) and hide / show. View
 * settings only: not undo steps, and exports always hold every object.
 */
import { renderOverlay, renderPrompts } from "./overlay.js";
import { lookOf, state } from "./state.js";

export function setOpacity(id, opacity) {
  const value = Math.min(1, Math.max(0, Number(opacity)));
  if (!Number.isFinite(value)) return;
  state.look.set(id, { ...lookOf(id), opacity: value });
  renderOverlay();
}

export function setHidden(id, hidden) {
  state.look.set(id, { ...lookOf(id), hidden: Boolean(hidden) });
  renderOverlay();
  renderPrompts();
}
