// Calls to the REST API with the session cookie and CSRF token, and display of its errors.

/** Fill %(name)s placeholders of a translated message; "%%" becomes "%". */
export function format(message, values = {}) {
  return message.replace(/%\((\w+)\)[sd]|%%/g, (match, name) => {
    if (match === "%%") return "%";
    return name in values ? String(values[name]) : match;
  });
}

export class ApiError extends Error {
  /**
   * @param {number} status HTTP status, or 0 when the server could not be reached.
   * @param {object|null} body Parsed JSON body: {field: [messages]} or {detail: message}.
   */
  constructor(status, body, message) {
    super(message || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

/**
 * Read the CSRF token when a request is sent.
 *
 * Django rotates the token when the user logs in, possibly in another tab, so the csrftoken cookie is read
 * first. The token embedded in the page is the fallback for a page whose cookie is missing.
 */
function csrfToken() {
  for (const part of document.cookie.split(";")) {
    const [name, ...value] = part.trim().split("=");
    if (name === "csrftoken") return decodeURIComponent(value.join("="));
  }
  const meta = document.querySelector('meta[name="csrf-token"]');
  return meta ? meta.content : "";
}

/** Tell whether an error means that the session ended or no longer matches the page (401 or 403). */
export function isSessionError(error) {
  return error instanceof ApiError && (error.status === 401 || error.status === 403);
}

/**
 * Show the "session ended" message in an error element, with a link to the login page.
 *
 * The link opens a new tab, so the painted mask and the form in this tab survive the new login.
 */
export function setSessionError(scope, element, messages) {
  const link = document.createElement("a");
  // The home page redirects a logged-out user to the login page too.
  link.href = document.querySelector("[data-login-url]")?.dataset.loginUrl || "/";
  link.target = "_blank";
  link.rel = "noopener";
  link.textContent = messages.log_in_again;
  element.replaceChildren(messages.session_ended, " ", link);
  element.hidden = false;
  const control = scope.querySelector(`[aria-describedby~="${CSS.escape(element.id)}"]`);
  if (control) control.setAttribute("aria-invalid", "true");
}

/**
 * Send one API request and return its parsed JSON body.
 * @param {string} method
 * @param {string} url
 * @param {FormData|null} body Multipart form, as the API's upload endpoints expect.
 * @throws {ApiError} on a network failure (status 0) or a non-2xx response.
 */
export async function request(method, url, body = null) {
  const headers = { Accept: "application/json" };
  if (method !== "GET") headers["X-CSRFToken"] = csrfToken();
  let response;
  try {
    response = await fetch(url, { method, headers, body, credentials: "same-origin" });
  } catch (error) {
    throw new ApiError(0, null, error.message);
  }
  let data = null;
  if (response.status !== 204) {
    const type = response.headers.get("Content-Type") || "";
    if (type.includes("json")) data = await response.json();
  }
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

/**
 * Show API errors next to the fields they concern.
 *
 * Each error element carries data-error-for="<field>" inside `scope`. Errors for fields without
 * such an element, "detail" and "non_field_errors" go to the element for `generalKey`.
 */
export function showErrors(scope, error, messages, generalKey = "general") {
  clearErrors(scope);
  if (isSessionError(error)) {
    const target = findErrorElement(scope, generalKey);
    if (target) setSessionError(scope, target, messages);
    return;
  }
  const general = [];
  const body = error instanceof ApiError ? error.body : null;
  if (error instanceof ApiError && error.status === 0) {
    general.push(messages.network_error);
  } else if (!body || typeof body !== "object") {
    general.push(format(messages.request_failed, { status: error.status ?? "?" }));
  } else {
    for (const [field, value] of Object.entries(body)) {
      const texts = (Array.isArray(value) ? value : [value]).map(flattenMessage);
      const target = field === "detail" || field === "non_field_errors" ? null : findErrorElement(scope, field);
      if (target) {
        setError(scope, target, texts.join(" "));
      } else if (field === "detail" || field === "non_field_errors") {
        general.push(...texts);
      } else {
        general.push(...texts.map((text) => format(messages.field_error, { field, message: text })));
      }
    }
  }
  if (general.length) {
    const target = findErrorElement(scope, generalKey);
    if (target) setError(scope, target, general.join(" "));
  }
}

function flattenMessage(value) {
  if (typeof value === "string") return value;
  if (value && typeof value === "object") return Object.values(value).flat().map(flattenMessage).join(" ");
  return String(value);
}

function findErrorElement(scope, field) {
  return scope.querySelector(`[data-error-for="${CSS.escape(field)}"]`);
}

/** Show one message in an error element and mark the control it belongs to as invalid. */
export function setError(scope, element, text) {
  element.textContent = text;
  element.hidden = false;
  const control = scope.querySelector(`[aria-describedby~="${CSS.escape(element.id)}"]`);
  if (control) control.setAttribute("aria-invalid", "true");
}

export function clearErrors(scope) {
  for (const element of scope.querySelectorAll("[data-error-for]")) {
    element.textContent = "";
    element.hidden = true;
  }
  for (const control of scope.querySelectorAll('[aria-invalid="true"]')) {
    control.removeAttribute("aria-invalid");
  }
}
