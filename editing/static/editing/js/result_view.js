// The finished edit: before/after comparison, download link and per-phase timings.

import { format } from "./api.js";

const CACHE_FIELDS = ["cache_used", "cache_outcome", "cache_variant", "flop_fraction"];

export class ResultView {
  constructor(elements) {
    Object.assign(this, elements);
    this.slider.addEventListener("input", () => this.setSplit(Number(this.slider.value)));
    this.toggle.addEventListener("click", () => this.setShowOriginal(this.toggle.getAttribute("aria-pressed") !== "true"));
  }

  hide() {
    this.panel.hidden = true;
  }

  /**
   * Show a succeeded job's result next to the template it was made from.
   * @param {object} job The job as the API returns it.
   * @param {string} templateImageUrl Image of the job's own template, which may differ from the selected one.
   */
  show(job, templateImageUrl) {
    // The query string keeps the browser from showing a cached result of an earlier job.
    const resultUrl = `${job.result_url}?v=${encodeURIComponent(job.finished_at || job.id)}`;
    this.before.src = templateImageUrl;
    this.afterImage.src = resultUrl;
    this.download.href = job.result_url;
    this.download.setAttribute("download", `edit-${job.id}.png`);
    this.setShowOriginal(false);
    this.setSplit(50);
    this.renderTimings(job);
    this.panel.hidden = false;
    this.panel.dataset.jobId = job.id;
    this.panel.scrollIntoView({ block: "nearest" });
  }

  /** Reveal the edit right of `percent` (0..100) of the width and the original left of it. */
  setSplit(percent) {
    this.slider.value = String(percent);
    this.slider.setAttribute("aria-valuetext", `${percent}%`);
    this.after.style.clipPath = `inset(0 0 0 ${percent}%)`;
    this.divider.style.left = `${percent}%`;
  }

  setShowOriginal(showOriginal) {
    this.toggle.setAttribute("aria-pressed", String(showOriginal));
    this.after.hidden = showOriginal;
    this.divider.hidden = showOriginal;
    this.slider.disabled = showOriginal;
  }

  renderTimings(job) {
    const messages = this.messages;
    this.timings.replaceChildren();
    const timings = job.timings || {};
    const known = this.phases.filter((phase) => phase in timings);
    const phases = [...known, ...Object.keys(timings).filter((phase) => !this.phases.includes(phase)).sort()];
    let total = 0;
    for (const phase of phases) {
      total += Number(timings[phase]) || 0;
      this.addFact(messages[`phase_${phase}`] || phase, formatDuration(Number(timings[phase]), messages));
    }
    if (phases.length) this.addFact(messages.total, formatDuration(total, messages));
    for (const field of CACHE_FIELDS) {
      const value = job[field];
      if (value === undefined || value === null || value === "") continue;
      this.addFact(messages[field] || field, cacheText(field, value, messages));
    }
  }

  addFact(label, value) {
    const term = document.createElement("dt");
    term.textContent = label;
    const description = document.createElement("dd");
    description.textContent = value;
    this.timings.append(term, description);
  }
}

function cacheText(field, value, messages) {
  if (typeof value === "boolean") return value ? messages.yes : messages.no;
  if (field === "cache_outcome") return messages[`cache_outcome_${value}`] || String(value);
  if (field === "cache_variant") return messages[`cache_variant_${value}`] || String(value);
  if (field === "flop_fraction") return format(messages.flop_fraction_value, { percent: (Number(value) * 100).toFixed(1) });
  return String(value);
}

/** "850 ms" below one second, "3.4 s" from one second up, in the page's language. */
export function formatDuration(milliseconds, messages) {
  if (!Number.isFinite(milliseconds)) return "—";
  if (Math.round(milliseconds) < 1000) return format(messages.duration_ms, { value: Math.round(milliseconds) });
  return format(messages.duration_s, { value: (milliseconds / 1000).toFixed(1) });
}
