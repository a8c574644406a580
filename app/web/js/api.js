// Talking to the REST API with the session cookie; errors a person can read.

/** The server could not be reached (or a proxy in front of it answered for it). */
export class NetworkError extends Error {}

/** The server answered with an error in the project's shape: {error, code, details}. */
export class ApiError extends Error {
  constructor(status, body, retryAfter) {
    const message = body && typeof body.error === "string" ? body.error : `The server answered ${status}.`;
    super(message);
    this.status = status;
    this.code = body && body.code;
    this.details = body && body.details;
    this.retryAfter = retryAfter;
  }
}

export const enc = encodeURIComponent;

/** One JSON request; resolves to the body (null for 204), throws NetworkError or ApiError. */
export async function api(method, path, body) {
  const init = { method, credentials: "same-origin", headers: { Accept: "application/json" } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    throw new NetworkError("Cannot reach the server");
  }
  if (response.status === 204) return null;
  let data = null;
  try {
    data = await response.json();
  } catch (err) {
    data = null;
  }
  if (!response.ok) {
    if (response.status >= 502 && response.status <= 504 && !(data && data.error)) {
      throw new NetworkError("Cannot reach the server");
    }
    throw new ApiError(response.status, data, response.headers.get("Retry-After"));
  }
  return data;
}

/** What to tell the person about an error, in words (never the raw body). */
export function describe(err) {
  if (err instanceof NetworkError) return "Cannot reach the server. Check your connection and try again.";
  if (err instanceof ApiError) {
    let text = err.message;
    if (err.status === 429) {
      const wait = (err.details && err.details.retryAfter) || err.retryAfter;
      const seconds = Math.max(1, Math.ceil(Number(wait) || 0));
      text = "You are sending messages too fast." + (wait ? ` Try again in ${seconds} s.` : " Wait a moment and try again.");
    } else if (err.status === 404 && err.conversationGone) {
      text = "This conversation is gone: it was deleted, maybe in another tab or by someone else.";
    }
    return text;
  }
  return "Something went wrong in this page. Reload it and try again.";
}

/** A v4 UUID for clientMessageId (crypto.randomUUID needs a secure context). */
export function newId() {
  if (window.crypto && typeof crypto.randomUUID === "function") return crypto.randomUUID();
  return "xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx".replace(/[xy]/g, (ch) => {
    const r = (Math.random() * 16) | 0;
    return (ch === "x" ? r : (r & 0x3) | 0x8).toString(16);
  });
}
