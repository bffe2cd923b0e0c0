/* api.js: the JSON API client (docs/serve-api.md): URLs relative to the page's base, the fetch
 * wrapper that turns every failure into an ApiError with the server's message, and uploads.
 */

// The API lives next to the folder this module is served from (/static/api.js -> /), so the
// page also works behind a path prefix.
const BASE_URL = new URL("../", import.meta.url);
const apiUrl = (path) => new URL(path, BASE_URL).toString();

export class ApiError extends Error {
  constructor(message, status, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export async function apiFetch(path, options) {
  let response;
  try {
    response = await fetch(apiUrl(path), options);
  } catch (err) {
    throw new ApiError(`cannot reach the server (${err.message})`, 0, "network");
  }
  if (response.status === 204) return null;
  const text = await response.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch (_) {
    body = null;
  }
  if (!response.ok) {
    const error = body && body.error;
    let message = error && error.message;
    if (!message && body && typeof body.detail === "string") message = body.detail;
    if (!message) message = `HTTP ${response.status} ${response.statusText}`.trim();
    throw new ApiError(message, response.status, (error && error.code) || `http_${response.status}`);
  }
  if (body === null) throw new ApiError(`the server sent no JSON for ${path}`, response.status, "bad_response");
  return body;
}

export function postJson(path, data) {
  return apiFetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(data),
  });
}

export async function uploadFile(file) {
  const form = new FormData();
  form.append("file", file, file.name || "image");
  return apiFetch("api/images", { method: "POST", body: form });
}
