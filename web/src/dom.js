// Small DOM helpers shared by the explorer's panels: element lookup and creation, the message box,
// and running an action that may fail with its error shown for a while.

export const $ = (id) => document.getElementById(id);

/** An element with attributes ("on…" ones become listeners, "class" the class name) and children. */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "class") node.className = v;
    else node.setAttribute(k, v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) node.append(c);
  return node;
}

/** The message box over the canvas; an empty text hides it. */
export function showMessage(text) {
  const box = $("message");
  box.textContent = text;
  box.hidden = !text;
}

/** `fn()`, awaited; an error is shown for six seconds and gives undefined. */
export async function guarded(fn) {
  try {
    return await fn();
  } catch (err) {
    showMessage(err.message);
    setTimeout(() => showMessage(""), 6000);
    return undefined;
  }
}

/** Polls a background job until it ends, calling `onProgress(job)` on each state; returns the last. */
export async function followJob(job, poll, onProgress) {
  let current = job;
  while (["queued", "running", "cancelling"].includes(current.status)) {
    onProgress(current);
    await new Promise((r) => {
      setTimeout(r, 300);
    });
    current = await poll(current.id);
  }
  onProgress(current);
  return current;
}
