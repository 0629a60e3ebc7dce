// Polling of one job's status, with a time-left estimate from the observed progress rate.

import { ApiError, isSessionError, request } from "./api.js";

const POLL_INTERVAL_MS = 500;
const MAX_BACKOFF_MS = 5000;
const FINAL_STATUSES = new Set(["succeeded", "failed", "cancelled"]);

/**
 * Estimate of the seconds left, from the progress rate between observed step reports.
 *
 * The rate is measured from the first poll that saw the progress change. Time spent loading the model
 * before the first step therefore does not skew it, nor does a job already part done when the page
 * opened. An estimate needs a second change after that one, which gives a rate over at least one step.
 */
export class TimeLeftEstimator {
  constructor(now = () => performance.now()) {
    this.now = now;
    this.last = null; // progress of the previous sample, 0..1
    this.anchor = null; // {time: ms, progress: 0..1} of the first observed step report
    this.reports = 0; // progress changes observed since the anchor
  }

  /** Record a progress sample; returns seconds left, or null while no rate is known yet. */
  update(progress) {
    const time = this.now();
    const previous = this.last;
    this.last = progress;
    if (previous === null) return null;
    if (progress < previous) {
      // A restarted attempt begins again at step 0, at its own rate.
      this.anchor = null;
      this.reports = 0;
      return null;
    }
    if (progress > previous) {
      if (this.anchor === null) {
        this.anchor = { time, progress };
        return null;
      }
      this.reports += 1;
    }
    if (this.anchor === null || this.reports < 1) return null;
    const elapsedSeconds = (time - this.anchor.time) / 1000;
    const done = progress - this.anchor.progress;
    if (done <= 0 || elapsedSeconds <= 0) return null;
    return ((1 - progress) * elapsedSeconds) / done;
  }
}

/**
 * Poll GET {jobUrl} until the job reaches a final status or disappears.
 *
 * Network errors and 5xx responses are retried with backoff, and so are 401 and 403, because the
 * user can log in again in another tab. Any other 4xx response (404 when the job was deleted) ends
 * the polling.
 *
 * @param {string} jobUrl
 * @param {object} handlers onUpdate(job, secondsLeft|null), onFinal(job), onNetworkError(error),
 *   onSessionError(error) and onLost(error).
 * @returns {{stop: function}} handle to stop polling early.
 */
export function watchJob(jobUrl, handlers) {
  const estimator = new TimeLeftEstimator();
  let stopped = false;
  let timer = null;
  let delay = POLL_INTERVAL_MS;

  function retry() {
    delay = Math.min(MAX_BACKOFF_MS, delay * 2);
    timer = setTimeout(poll, delay);
  }

  async function poll() {
    if (stopped) return;
    let job;
    try {
      job = await request("GET", jobUrl);
      delay = POLL_INTERVAL_MS;
    } catch (error) {
      if (stopped) return;
      if (!(error instanceof ApiError) || error.status === 0 || error.status >= 500) {
        handlers.onNetworkError(error);
        retry();
      } else if (isSessionError(error)) {
        handlers.onSessionError(error);
        retry();
      } else {
        stopped = true;
        handlers.onLost(error);
      }
      return;
    }
    if (stopped) return;
    const secondsLeft = job.status === "running" ? estimator.update(job.progress) : null;
    handlers.onUpdate(job, secondsLeft);
    if (FINAL_STATUSES.has(job.status)) {
      stopped = true;
      handlers.onFinal(job);
      return;
    }
    timer = setTimeout(poll, delay);
  }

  poll();
  return {
    stop() {
      stopped = true;
      clearTimeout(timer);
    },
  };
}
