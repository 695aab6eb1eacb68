// imagetasks console: endless scrolling, live updates and copy, on server-rendered pages.
"use strict";
(function () {
  const base = document.body.dataset.console;
  const EVENTS = ["task.created", "task.processing", "task.completed", "task.failed",
    "task.cancelled", "image.stored", "image.failed", "image.queued"];

  function listen(after, onTask, status, task) {
    if (!window.EventSource) return;
    const query = new URLSearchParams();
    if (after) query.set("after", after);
    if (task) query.set("task", task);
    const url = base + "/stream?" + query.toString();
    const source = new EventSource(url);
    if (status) status.textContent = "Live updates: connecting…";
    source.onopen = () => { if (status) status.textContent = "Live updates: on"; };
    source.onerror = () => { if (status) status.textContent = "Live updates: reconnecting…"; };
    for (const type of EVENTS) {
      source.addEventListener(type, (message) => {
        try { onTask(JSON.parse(message.data).data.id); } catch (e) { /* not ours */ }
      });
    }
  }

  function fragment(html) {
    const template = document.createElement("template");
    template.innerHTML = html;
    return template.content;
  }

  // The gallery: live cards and endless scrolling on the API's cursor.
  const grid = document.getElementById("grid");
  const status = document.getElementById("live-status");
  if (grid && status) {
    const filters = status.dataset.filters;
    const pending = new Map();
    const refresh = async (taskId) => {
      const query = filters ? "?" + filters : "";
      const response = await fetch(base + "/cards/" + encodeURIComponent(taskId) + query,
        { headers: { Accept: "text/html" }, credentials: "same-origin" });
      const existing = grid.querySelector('[data-task-id="' + CSS.escape(taskId) + '"]');
      if (response.status === 204) { if (existing) existing.remove(); return; }
      if (!response.ok) return;
      const card = fragment(await response.text()).firstElementChild;
      if (!card) return;
      if (existing) { existing.replaceWith(card); return; }
      if (status.dataset.paused) return;
      // Newest first, whatever order the fetches finish in.
      const older = Array.from(grid.children).find((c) => c.dataset.order < card.dataset.order);
      if (!older && document.getElementById("more")) return; // belongs to an unloaded page
      grid.insertBefore(card, older || null);
      const empty = document.querySelector(".empty");
      if (empty) empty.remove();
    };
    // Several events of one task in a burst: one fetch.
    const schedule = (taskId) => {
      clearTimeout(pending.get(taskId));
      pending.set(taskId, setTimeout(() => { pending.delete(taskId); refresh(taskId); }, 150));
    };
    listen(status.dataset.after, schedule, status);

    const more = document.getElementById("more");
    if (more && "IntersectionObserver" in window) {
      let cursor = more.dataset.cursor, loading = false;
      const observer = new IntersectionObserver(async (entries) => {
        if (!entries.some((e) => e.isIntersecting) || loading || !cursor) return;
        loading = true;
        const query = (filters ? filters + "&" : "") + "cursor=" + encodeURIComponent(cursor);
        const response = await fetch(base + "/cards?" + query, { credentials: "same-origin" });
        if (response.ok) {
          for (const card of Array.from(fragment(await response.text()).children)) {
            if (!grid.querySelector('[data-task-id="' + CSS.escape(card.dataset.taskId) + '"]')) {
              grid.append(card);
            }
          }
          cursor = response.headers.get("X-Next-Cursor") || "";
          more.href = base + "?" + (filters ? filters + "&" : "") + "cursor=" + encodeURIComponent(cursor);
          if (!cursor) { observer.disconnect(); more.parentElement.remove(); }
        }
        loading = false;
      }, { rootMargin: "400px" });
      observer.observe(more);
    }
  }

  // One task's page: redraw its live parts when the task changes.
  const live = document.getElementById("task-live");
  if (live) {
    const taskId = live.dataset.taskId;
    let busy = false, again = false;
    const redraw = async () => {
      if (busy) { again = true; return; }
      busy = true;
      const response = await fetch(location.pathname, { credentials: "same-origin" });
      if (response.ok) {
        const doc = new DOMParser().parseFromString(await response.text(), "text/html");
        const fresh = doc.querySelectorAll("[data-live]");
        // Keep the keyboard where it was: refocus the same control in the new markup.
        const focused = document.activeElement && document.activeElement.id;
        document.querySelectorAll("[data-live]").forEach((part, i) => {
          if (fresh[i]) part.replaceWith(document.importNode(fresh[i], true));
        });
        const refocus = focused && document.getElementById(focused);
        if (refocus) refocus.focus();
      }
      busy = false;
      if (again) { again = false; redraw(); }
    };
    listen(live.dataset.after, (id) => { if (id === taskId) redraw(); }, null, taskId);
  }

  // Copy buttons (delegated: live redraws replace them).
  document.addEventListener("click", async (event) => {
    const button = event.target.closest("[data-copy]");
    if (!button) return;
    const field = document.getElementById(button.dataset.copy);
    const note = button.parentElement.querySelector(".copied");
    try {
      await navigator.clipboard.writeText(field.value);
      if (note) note.textContent = "Copied.";
    } catch (e) {
      field.select();
      if (note) note.textContent = "Selected: press Ctrl+C to copy.";
    }
  });
})();
