// The "New graph…" dialog: a prompt computed into a graph on the server, with its progress.

import { api } from "./api.js";
import { $, followJob } from "./dom.js";
import { jobProgress } from "./model.js";

/** Wires the dialog; `like()` is the open graph's path (its model and transcoder are used) and
 * `opened(path)` is called with the new graph once it is saved. */
export function newGraphDialog(like, opened) {
  const dialog = $("new-graph-dialog");
  $("new-graph-btn").addEventListener("click", () => {
    $("job-status").textContent = "";
    $("job-progress").hidden = true;
    dialog.showModal();
  });
  $("new-close").addEventListener("click", () => dialog.close());
  $("new-graph-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const status = $("job-status");
    const bar = $("job-progress");
    let job;
    try {
      job = await api.newGraph({
        prompt: $("new-prompt").value,
        name: $("new-name").value.trim() || null,
        like: like(),
        max_feature_nodes: Number($("new-max").value),
        target: $("new-target").value || null, // exact text: a leading space is part of a token
        versus: $("new-versus").value || null,
      });
    } catch (err) {
      status.textContent = err.message;
      status.className = "error";
      return;
    }
    status.className = "muted";
    bar.hidden = false;
    job = await followJob(job, api.job, (j) => {
      bar.max = Math.max(1, j.total);
      bar.value = j.done;
      status.textContent = jobProgress(j);
    });
    if (job.status === "error" || job.status === "cancelled") {
      status.textContent = job.error || "cancelled";
      status.className = "error";
      return;
    }
    bar.max = 1;
    bar.value = 1;
    status.textContent = `done: ${job.graph}`;
    dialog.close();
    await opened(job.graph);
  });
}
