// The editor page: template gallery and upload, mask painting, job submission, progress and result.

import { ApiError, clearErrors, format, isSessionError, request, setError, setSessionError, showErrors } from "./api.js";
import { watchJob } from "./job_monitor.js";
import { MaskCanvas, TOOLS } from "./mask_canvas.js";
import { ResultView } from "./result_view.js";

const config = JSON.parse(document.getElementById("editor-config").textContent);
const messages = JSON.parse(document.getElementById("editor-messages").textContent);
const $ = (id) => document.getElementById(id);

const state = {
  template: null, // {id, name, width, height, image_url}
  templates: new Map(), // id -> template
  nextTemplatesUrl: null,
  job: null,
  watcher: null,
  // Template id -> mask snapshot with its undo history, kept while the page is open.
  masks: new Map(),
  // Sequence number of the latest count of other active jobs, so that an older, slower count is not shown over it.
  otherJobsUpdate: 0,
};

const mask = new MaskCanvas(
  {
    stage: $("stage"),
    image: $("stage-image"),
    canvas: $("mask-canvas"),
    scroller: $("stage-scroller"),
    cursor: $("brush-cursor"),
    rectanglePreview: $("rectangle-preview"),
  },
  onMaskChange,
);
const result = new ResultView({
  panel: $("result-panel"),
  before: $("compare-before"),
  after: $("compare-after"),
  afterImage: $("compare-after-image"),
  divider: $("compare-divider"),
  slider: $("compare-slider"),
  toggle: $("compare-toggle"),
  download: $("result-download"),
  timings: $("result-timings"),
  phases: config.phases,
  messages,
});

// --- Template gallery and upload.

async function loadTemplates(url) {
  const gallery = $("gallery");
  gallery.setAttribute("aria-busy", "true");
  $("gallery-status").textContent = messages.loading_templates;
  try {
    const page = await request("GET", url);
    for (const template of page.results) addTemplate(template, false);
    state.nextTemplatesUrl = page.next;
    $("gallery-status").textContent = state.templates.size ? "" : messages.no_templates;
  } catch (error) {
    showErrors($("template-panel"), error, messages, "template");
    $("gallery-status").textContent = "";
  } finally {
    gallery.setAttribute("aria-busy", "false");
    $("gallery-more").hidden = !state.nextTemplatesUrl;
  }
}

function addTemplate(template, first) {
  if (state.templates.has(template.id)) return;
  state.templates.set(template.id, template);
  const item = document.createElement("div");
  item.setAttribute("role", "listitem");
  const button = document.createElement("button");
  button.type = "button";
  button.className = "gallery-item";
  button.dataset.templateId = template.id;
  button.setAttribute("aria-pressed", "false");
  const image = document.createElement("img");
  image.src = template.image_url;
  image.alt = "";
  image.loading = "lazy";
  const name = document.createElement("span");
  name.className = "gallery-name";
  name.textContent = template.name;
  const size = document.createElement("span");
  size.className = "gallery-size";
  size.textContent = format(messages.template_size, { width: template.width, height: template.height });
  button.append(image, name, size);
  button.addEventListener("click", () => selectTemplate(template));
  item.append(button);
  const gallery = $("gallery");
  if (first) gallery.prepend(item);
  else gallery.append(item);
}

/**
 * Select a template and show its mask.
 *
 * The mask of the template selected before is kept, with its undo history, and comes back when that
 * template is selected again. Selecting the template that is already selected changes nothing.
 */
async function selectTemplate(template) {
  if (state.template && state.template.id === template.id && mask.loaded) {
    revealMaskPanel();
    return;
  }
  if (state.template && mask.loaded) state.masks.set(state.template.id, mask.snapshot());
  state.template = template;
  for (const button of document.querySelectorAll(".gallery-item")) {
    button.setAttribute("aria-pressed", String(Number(button.dataset.templateId) === template.id));
  }
  clearErrors($("template-panel"));
  clearErrors($("mask-panel"));
  $("mask-status").textContent = "";
  $("gallery-status").textContent = format(messages.template_selected, { name: template.name });
  $("stage-empty").hidden = true;
  try {
    await mask.load(template.image_url, template.width, template.height);
    // A later click may have selected another template while this image was loading.
    if (state.template !== template) return;
    const saved = state.masks.get(template.id);
    if (saved) mask.restore(saved);
  } catch {
    if (state.template !== template) return;
    setError($("mask-panel"), $("mask-error"), messages.image_load_failed);
  }
  onMaskChange();
  revealMaskPanel();
}

/** Scroll the mask canvas into view when less than half of it (or of the window) is visible. */
function revealMaskPanel() {
  const box = $("stage-scroller").getBoundingClientRect();
  const visibleHeight = Math.min(box.bottom, window.innerHeight) - Math.max(box.top, 0);
  if (visibleHeight >= Math.min(box.height, window.innerHeight) / 2) return;
  const reduceMotion = window.matchMedia("(prefers-reduced-motion: reduce)").matches;
  $("mask-panel").scrollIntoView({ behavior: reduceMotion ? "auto" : "smooth", block: "start" });
}

function templateImageUrl(templateId) {
  return `${config.templates_url}${templateId}/image/`;
}

async function uploadTemplate(event) {
  event.preventDefault();
  const form = $("upload-form");
  clearErrors(form);
  const file = $("upload-image").files[0];
  if (!file) {
    setError(form, $("image-error"), messages.no_file);
    $("upload-image").focus();
    return;
  }
  const body = new FormData();
  body.append("image", file);
  body.append("name", $("upload-name").value.trim());
  $("upload-submit").disabled = true;
  $("upload-status").textContent = messages.uploading;
  try {
    const template = await request("POST", config.templates_url, body);
    addTemplate(template, true);
    $("gallery-status").textContent = "";
    form.reset();
    showChosenFile();
    $("upload-status").textContent = format(messages.uploaded, { name: template.name });
    await selectTemplate(template);
  } catch (error) {
    $("upload-status").textContent = "";
    showErrors(form, error, messages, "upload-general");
  } finally {
    $("upload-submit").disabled = false;
  }
}

function showChosenFile() {
  const file = $("upload-image").files[0];
  $("upload-file-name").textContent = file ? file.name : messages.no_file_chosen;
}

// --- Mask tools.

function onMaskChange() {
  $("mask-undo").disabled = !mask.canUndo;
  $("mask-redo").disabled = !mask.canRedo;
  $("zoom-level").textContent = format(messages.zoom_level, { percent: Math.round(mask.zoom * 100) });
  if (mask.loaded) {
    const percent = (mask.coverage() * 100).toFixed(1);
    $("mask-coverage").textContent = format(messages.mask_coverage, { percent });
  } else {
    $("mask-coverage").textContent = "";
  }
}

function setTool(tool) {
  mask.setTool(tool);
  const radio = document.querySelector(`input[name="mask-tool"][value="${tool}"]`);
  if (radio) radio.checked = true;
  $("mask-canvas").dataset.tool = tool;
}

function setBrushSize(size) {
  const slider = $("brush-size");
  const clamped = Math.min(Number(slider.max), Math.max(Number(slider.min), Math.round(size)));
  slider.value = clamped;
  $("brush-size-number").value = clamped;
  mask.setBrushSize(clamped);
}

function bindMaskTools() {
  for (const radio of document.querySelectorAll('input[name="mask-tool"]')) {
    radio.addEventListener("change", () => setTool(radio.value));
  }
  $("brush-size").addEventListener("input", (event) => setBrushSize(Number(event.target.value)));
  $("brush-size-number").addEventListener("change", (event) => {
    // A cleared or unparseable box keeps the current size instead of shrinking the brush to the minimum.
    const text = event.target.value.trim();
    if (text === "" || !Number.isFinite(Number(text))) {
      event.target.value = mask.brushSize;
      return;
    }
    setBrushSize(Number(text));
  });
  $("mask-undo").addEventListener("click", () => mask.undo());
  $("mask-redo").addEventListener("click", () => mask.redo());
  $("mask-clear").addEventListener("click", () => mask.clear());
  $("mask-invert").addEventListener("click", () => mask.invert());
  $("zoom-in").addEventListener("click", () => mask.zoomIn());
  $("zoom-out").addEventListener("click", () => mask.zoomOut());
  $("zoom-fit").addEventListener("click", () => mask.zoomToFit());
  $("zoom-actual").addEventListener("click", () => mask.setZoom(1));
  document.addEventListener("keydown", onShortcut);
  setTool("brush");
  setBrushSize(Number($("brush-size").value));
}

/** Keyboard shortcuts, ignored while typing in a text field. */
function onShortcut(event) {
  const target = event.target;
  const typing = target.matches && target.matches("textarea, input:not([type=radio]):not([type=range]):not([type=checkbox]), select");
  if (typing || event.altKey) return;
  const key = event.key.toLowerCase();
  const control = event.ctrlKey || event.metaKey;
  if (control && key === "z" && !event.shiftKey) {
    mask.undo();
  } else if (control && (key === "y" || (key === "z" && event.shiftKey))) {
    mask.redo();
  } else if (control) {
    return;
  } else if (key === "b") {
    setTool(TOOLS[0]);
  } else if (key === "e") {
    setTool(TOOLS[1]);
  } else if (key === "r") {
    setTool(TOOLS[2]);
  } else if (key === "[") {
    setBrushSize(mask.brushSize * 0.8);
  } else if (key === "]") {
    setBrushSize(mask.brushSize * 1.25 + 1);
  } else if (key === "+" || key === "=") {
    mask.zoomIn();
  } else if (key === "-") {
    mask.zoomOut();
  } else {
    return;
  }
  event.preventDefault();
}

// --- Job submission, progress and result.

async function submitJob(event) {
  event.preventDefault();
  // A second click while the first one is still preparing its request must not send a second job.
  if ($("job-submit").disabled) return;
  clearErrors(document.body);

  if (!state.template) {
    setError($("template-panel"), $("template-error"), messages.no_template);
    $("template-heading").scrollIntoView();
    return;
  }
  if (mask.coverage() === 0) {
    setError($("mask-panel"), $("mask-error"), messages.empty_mask);
    $("stage-scroller").focus();
    return;
  }

  // A number input reads as "" for text the browser cannot parse (1e999, --3). Say so, because sending
  // nothing would quietly run with the default.
  for (const name of ["seed", "steps", "guidance"]) {
    const field = $(name);
    if (field && field.validity && field.validity.badInput) {
      const element = document.querySelector(`[data-error-for="${name}"]`);
      const label = document.querySelector(`label[for="${name}"]`)?.textContent.trim() || name;
      setError(field.closest(".field") || document.body, element,
        format(messages.bad_number, { field: label, min: field.min, max: field.max }));
      field.focus();
      return;
    }
  }

  // Read every field before the first await, so the job carries what the form showed at the click.
  const fields = { template: String(state.template.id), prompt: $("prompt").value };
  for (const name of ["seed", "steps", "guidance", "model"]) {
    const field = $(name);  // the model choice exists only when several models are served
    const value = field ? field.value.trim() : "";
    if (value !== "") fields[name] = value;
  }
  $("job-submit").disabled = true;
  showSubmitting();
  try {
    const body = new FormData();
    for (const [name, value] of Object.entries(fields)) body.append(name, value);
    body.append("mask", await mask.toPngBlob(), "mask.png");
    const job = await request("POST", config.jobs_url, body);
    startWatching(job);
    updateOtherActiveJobs();
  } catch (error) {
    $("job-panel").hidden = true;
    showErrorsOnPage(error);
    $("job-submit").disabled = false;
  }
}

/** Replace the previous job's progress and result with an empty panel while the new job is sent. */
function showSubmitting() {
  result.hide();
  const panel = $("job-panel");
  panel.dataset.status = "submitting";
  $("job-status").textContent = messages.submitting;
  for (const id of ["job-queue", "job-step", "job-eta"]) $(id).textContent = "—";
  $("job-progress").value = 0;
  $("job-progress-text").textContent = "0%";
  $("job-message").textContent = "";
  $("job-cancel").hidden = true;
  panel.hidden = false;
}

/** Show job-creation errors: each field's message goes to the panel holding that field. */
function showErrorsOnPage(error) {
  showErrors(document.body, error, messages, "general");
  const first = document.querySelector("[data-error-for]:not([hidden])");
  if (first) first.scrollIntoView({ block: "center" });
}

function startWatching(job) {
  if (state.watcher) state.watcher.stop();
  state.job = job;
  result.hide();
  $("job-panel").hidden = false;
  $("job-submit").disabled = true;
  $("job-cancel").hidden = false;
  $("job-cancel").disabled = false;
  $("job-message").textContent = "";
  renderJob(job, null);
  $("job-panel").scrollIntoView({ block: "nearest" });
  state.watcher = watchJob(`${config.jobs_url}${job.id}/`, {
    onUpdate: renderJob,
    onFinal: finishJob,
    onNetworkError: (error) => {
      const text = error.status ? format(messages.request_failed, { status: error.status }) : messages.network_error;
      $("job-message").textContent = text;
    },
    onSessionError: () => setSessionError($("job-panel"), $("job-message"), messages),
    onLost: loseJob,
  });
}

function renderJob(job, secondsLeft) {
  state.job = job;
  $("job-panel").dataset.status = job.status;
  $("job-status").textContent = messages[`status_${job.status}`] || job.status;
  if (job.status === "queued" && job.queue_position !== null && job.queue_position !== undefined) {
    if (job.queue_position === 0) {
      $("job-queue").textContent = messages.queue_next;
    } else if (job.queue_position === 1) {
      $("job-queue").textContent = messages.queue_one_ahead;
    } else {
      $("job-queue").textContent = format(messages.queue_position, { position: job.queue_position });
    }
  } else {
    $("job-queue").textContent = "—";
  }
  const percent = Math.round(job.progress * 100);
  $("job-progress").value = percent;
  $("job-progress-text").textContent = `${percent}%`;
  const step = Math.round(job.progress * job.steps);
  $("job-step").textContent = format(messages.step_of, { step, steps: job.steps });
  $("job-eta").textContent = timeLeftText(job, secondsLeft);
  if (job.cancel_requested && job.status === "running") $("job-message").textContent = messages.cancel_requested;
  else if (job.status === "running" || job.status === "queued") $("job-message").textContent = "";
}

function timeLeftText(job, secondsLeft) {
  if (job.status !== "running") return "—";
  if (secondsLeft === null) return messages.estimating;
  if (secondsLeft < 90) return format(messages.time_left_seconds, { seconds: Math.max(1, Math.ceil(secondsLeft)) });
  return format(messages.time_left_minutes, { minutes: Math.ceil(secondsLeft / 60) });
}

function finishJob(job) {
  state.watcher = null;
  $("job-submit").disabled = false;
  $("job-cancel").hidden = true;
  $("job-eta").textContent = "—";
  if (job.status === "succeeded") {
    $("job-message").textContent = messages.job_succeeded;
    result.show(job, templateImageUrl(job.template));
  } else if (job.status === "failed") {
    $("job-message").textContent = format(messages.job_failed, { error: job.error });
  } else {
    $("job-message").textContent = messages.job_cancelled;
  }
  updateOtherActiveJobs();
}

/** End the progress panel of a job that the API no longer returns, such as one deleted with its template. */
function loseJob(error) {
  state.watcher = null;
  $("job-submit").disabled = false;
  $("job-cancel").hidden = true;
  $("job-panel").dataset.status = "lost";
  $("job-status").textContent = messages.job_lost_status;
  for (const id of ["job-queue", "job-step", "job-eta"]) $(id).textContent = "—";
  $("job-message").textContent = error.status === 404
    ? messages.job_lost
    : format(messages.request_failed, { status: error.status });
  updateOtherActiveJobs();
}

async function cancelJob() {
  if (!state.job) return;
  $("job-cancel").disabled = true;
  try {
    const job = await request("POST", `${config.jobs_url}${state.job.id}/cancel/`);
    renderJob(job, null);
    // A queued job (or one whose worker is gone) is cancelled at once; a running one stops after its step.
    $("job-message").textContent = job.status === "cancelled" ? messages.job_cancelled : messages.cancel_requested;
  } catch (error) {
    // 409 means the job finished meanwhile; the poller reports its final status.
    if (isSessionError(error)) {
      setSessionError($("job-panel"), $("job-message"), messages);
      $("job-cancel").disabled = false;
    } else if (!(error instanceof ApiError && error.status === 409)) {
      $("job-message").textContent = error.body?.detail || format(messages.request_failed, { status: error.status });
      $("job-cancel").disabled = false;
    }
  }
}

// --- Re-run of an earlier job from the history page.

async function applyPrefill(prefill) {
  const template = await templateById(prefill.template_id);
  if (!template) {
    setError($("template-panel"), $("template-error"), format(messages.template_missing, { id: prefill.template_id }));
    return;
  }
  await selectTemplate(template);
  await loadJobMask(prefill.mask_url, messages.mask_loaded);
}

/** Return a template of the user from the gallery, or fetch it into the gallery; null when it is gone. */
async function templateById(id) {
  let template = state.templates.get(id);
  if (!template) {
    try {
      template = await request("GET", `${config.templates_url}${id}/`);
      addTemplate(template, true);
    } catch {
      return null;
    }
  }
  return template;
}

/** Load an earlier job's mask into the canvas and say so under it. */
async function loadJobMask(url, statusText) {
  try {
    await mask.loadMask(url);
    $("mask-status").textContent = statusText;
  } catch {
    setError($("mask-panel"), $("mask-error"), messages.mask_load_failed);
  }
}

// --- A job that was still active when the page was opened or reloaded.

/** Count the user's queued and running jobs and find the newest of them (null when there is none). */
async function findActiveJobs() {
  let newest = null;
  let count = 0;
  for (const status of ["running", "queued"]) {
    const page = await request("GET", `${config.jobs_url}?status=${status}&limit=1`);
    count += page.count;
    const job = page.results[0];
    if (job && (!newest || Date.parse(job.created_at) > Date.parse(newest.created_at))) newest = job;
  }
  return { newest, count };
}

/** Show how many queued or running jobs the user has besides the one in the progress panel. */
function showOtherActiveJobs(count) {
  $("job-others").hidden = count < 1;
  const message = count === 1 ? messages.other_active_jobs_one : messages.other_active_jobs_other;
  $("job-others-text").textContent = format(message, { count });
}

// While the notice of other active jobs shows, its count is refreshed this often (two job-list requests).
const OTHER_JOBS_REFRESH_MS = 5000;

/**
 * Count the other active jobs again: after the panel's job was submitted or has ended, and every
 * OTHER_JOBS_REFRESH_MS while the notice shows, so jobs that end elsewhere leave the count.
 */
async function updateOtherActiveJobs() {
  const update = ++state.otherJobsUpdate;
  let active;
  try {
    active = await findActiveJobs();
  } catch {
    // The notice keeps its last count, and the progress panel reports a lost connection or session.
    return;
  }
  if (update !== state.otherJobsUpdate) return;
  const watchedActive = state.watcher !== null && state.job && ["queued", "running"].includes(state.job.status);
  showOtherActiveJobs(active.count - (watchedActive ? 1 : 0));
}

/**
 * Show the progress of the newest active job again, and its result when it finishes.
 *
 * Its template is selected too, unless the page opened an earlier job's settings ("Edit again"). A notice
 * under the progress shows how many more jobs are queued or running, with a link to the history.
 */
async function resumeActiveJob() {
  let active;
  try {
    active = await findActiveJobs();
  } catch (error) {
    showErrors($("job-form"), error, messages, "general");
    return;
  }
  const job = active.newest;
  if (!job) return;
  if (!config.prefill && !state.template) {
    // Without its template the progress panel still shows, with nothing selected.
    const template = await templateById(job.template);
    if (template) {
      await selectTemplate(template);
      await showJobSettings(job);
    }
  }
  startWatching(job);
  showOtherActiveJobs(active.count - 1);
}

/** Fill the form with a job's prompt, settings and mask, so the page shows what the queued or running job edits. */
async function showJobSettings(job) {
  $("prompt").value = job.prompt;
  $("seed").value = job.seed;
  $("steps").value = job.steps;
  $("guidance").value = job.guidance;
  updatePromptCounter();
  const loaded = job.status === "queued" ? messages.queued_job_loaded : messages.active_job_loaded;
  await loadJobMask(config.job_mask_url.replace("{id}", job.id), format(loaded, { id: job.id }));
}

// --- Prompt length.

/** Show "n / max" under the prompt, as a warning near the limit and with a message at it. */
function updatePromptCounter() {
  const max = config.max_prompt_chars;
  // The textarea's maxlength counts UTF-16 code units, as String.length does.
  const count = $("prompt").value.length;
  const counter = $("prompt-counter");
  counter.textContent = format(messages.prompt_count, { count, max });
  counter.classList.toggle("near-limit", max - count <= Math.max(20, Math.ceil(max * 0.1)));
  $("prompt-limit").textContent = count >= max ? format(messages.prompt_at_limit, { max }) : "";
}

// --- Start.

async function start() {
  bindMaskTools();
  $("upload-form").addEventListener("submit", uploadTemplate);
  $("upload-image").addEventListener("change", showChosenFile);
  $("gallery-more").addEventListener("click", () => loadTemplates(state.nextTemplatesUrl));
  $("job-form").addEventListener("submit", submitJob);
  $("job-cancel").addEventListener("click", cancelJob);
  $("prompt").addEventListener("input", updatePromptCounter);
  updatePromptCounter();
  onMaskChange();
  setInterval(() => {
    if (!$("job-others").hidden && document.visibilityState === "visible") updateOtherActiveJobs();
  }, OTHER_JOBS_REFRESH_MS);
  await loadTemplates(config.templates_url);
  if (config.prefill) await applyPrefill(config.prefill);
  await resumeActiveJob();
  document.body.dataset.editorReady = "true";
}

start();
