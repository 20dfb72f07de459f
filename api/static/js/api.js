// The REST client of the dashboard: every call goes to the service's public /v1 API, with the API key the
// user typed (kept in this tab's sessionStorage) as "Authorization: Bearer".

const KEY = "ldd.apiKey";

export function getKey() {
  return sessionStorage.getItem(KEY) || "";
}

export function setKey(key) {
  if (key) sessionStorage.setItem(KEY, key);
  else sessionStorage.removeItem(KEY);
}

export class ApiError extends Error {
  constructor(status, code, message, details) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details;
  }
}

function withKey(headers) {
  const key = getKey();
  return key ? { ...headers, Authorization: `Bearer ${key}` } : { ...headers };
}

// fetch + the key; a JSON body is returned parsed, anything else as the Response. Errors are the service's
// {"error": {"code", "message", "details"}} as an ApiError.
export async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: withKey(options.headers || {}) });
  if (!response.ok) {
    let body = null;
    try {
      body = await response.json();
    } catch {
      body = null;
    }
    const e = (body && body.error) || {};
    throw new ApiError(response.status, e.code || `http_${response.status}`, e.message || response.statusText,
      e.details);
  }
  const type = response.headers.get("content-type") || "";
  return type.includes("application/json") ? response.json() : response;
}

// An object URL for a resource that needs the key (an <img> cannot send headers).
export async function objectUrl(path, signal) {
  const response = await api(path, { signal });
  return URL.createObjectURL(await response.blob());
}

// Does this service want a key? Its OpenAPI document declares bearer auth only when keys are configured,
// so the page can ask before its first call instead of collecting a 401.
let keysNeeded = null;
export async function needsKey() {
  if (keysNeeded === null) {
    const doc = await (await fetch("/openapi.json")).json();
    keysNeeded = Boolean(doc.components && doc.components.securitySchemes);
  }
  return keysNeeded;
}

// Server-sent events over fetch (EventSource cannot send an Authorization header): calls
// onEvent(name, data) for each event until the stream ends or `signal` aborts it.
export async function follow(path, onEvent, signal) {
  const response = await api(path, { signal, headers: { Accept: "text/event-stream" } });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      if (data.length) onEvent(name, JSON.parse(data.join("\n")));
    }
  }
}
