// Behaviour shared by every page. The pages work without it; it only saves clicks.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  // Switch language as soon as one is picked; the form's button remains for keyboard users.
  for (const select of document.querySelectorAll("select[data-autosubmit]")) {
    select.addEventListener("change", () => select.form.requestSubmit());
  }
});
