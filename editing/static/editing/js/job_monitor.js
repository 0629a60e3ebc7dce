// Polling of one job's status, with a time-left estimate from the observed progress rate.

import { ApiError, request } from "./api.js";

const POLL_INTERVAL_MS = 500;
const MAX_BACKOFF_MS = 5000;
const FINAL_STATUSES = new Set(["succeeded", "failed", "cancelled"]);

/**
 * Estimate of the seconds left, from the progress rate since the job's first observed progress.
 *
 * The rate is measured from the first poll that saw the job running. Time spent loading the model
 * before the first step therefore counts toward the rate, and the estimate falls as steps go by.
 */
export class TimeLeftEstimator {
  constructor(now = () => performance.now()) {
    this.now = now;
    this.start = null; // {time: ms, progress: 0..1}
  }

  /** Record a progress sample; returns seconds left, or null while no rate is known yet. */
  update(progress) {
    const time = this.now();
    if (this.start === null) {
      this.start = { time, progress };
      return null;
    }
    const elapsedSeconds = (time - this.start.time) / 1000;
    const done = progress - this.start.progress;
    if (done <= 0 || elapsedSeconds <= 0) return null;
    return ((1 - progress) * elapsedSeconds) / done;
  }
}

/**
 * Poll GET {jobUrl} until the job reaches a final status.
 *
 * @param {string} jobUrl
 * @param {object} handlers onUpdate(job, secondsLeft|null), onFinal(job), onNetworkError(error)
 * @returns {{stop: function}} handle to stop polling early.
 */
export function watchJob(jobUrl, handlers) {
  const estimator = new TimeLeftEstimator();
  let stopped = false;
  let timer = null;
  let delay = POLL_INTERVAL_MS;

  async function poll() {
    if (stopped) return;
    let job;
    try {
      job = await request("GET", jobUrl);
      delay = POLL_INTERVAL_MS;
    } catch (error) {
      if (!(error instanceof ApiError) || error.status === 0 || error.status >= 500) {
        handlers.onNetworkError(error);
        delay = Math.min(MAX_BACKOFF_MS, delay * 2);
        timer = setTimeout(poll, delay);
        return;
      }
      stopped = true;
      handlers.onNetworkError(error);
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
