// toolswarm dashboard: a one-page app over the HTTP API (no framework, no build).
//
// Routes (in the hash): #/jobs[?state=S], #/jobs/<id>, #/servers. Everything shown is read back
// from the API (which reads Redis), so a reload or a restart of the API and workers loses nothing.
// Every piece of data goes into the page as text (textContent, attributes), never as HTML.
"use strict";

(() => {
  const TOKEN_KEY = "toolswarm.api_token";
  const API_ROOT = new URL("../", location.href); // the page is served at <root>/ui/
  const STATES = ["pending", "running", "finished", "cancelled"];
  const REFRESH_MS = 2000;
  const EVENT_REFRESH_MS = 250; // re-read a job's counts at most 4 times a second
  const RESULTS_PAGE = 50;
  const SAMPLES = 3;

  class AuthError extends Error {}

  class HttpError extends Error {
    constructor(status, detail) {
      super(`${status}: ${detail}`);
      this.status = status;
      this.detail = detail;
    }
  }

  // ---------------------------------------------------------------- DOM, formatting

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") el.className = value;
      else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
      else el.setAttribute(name, value === true ? "" : String(value));
    }
    append(el, children);
    return el;
  }

  function append(el, ...children) {
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : String(child)); // strings become text nodes
    }
    return el;
  }

  function fill(el, ...children) {
    el.replaceChildren();
    return append(el, children);
  }

  const $ = (selector) => document.querySelector(selector);
  const enc = encodeURIComponent;
  const jobHref = (id) => `#/jobs/${enc(id)}`;

  function age(ms) {
    const s = Math.max(0, Math.round(ms / 1000));
    if (s < 60) return `${s}s`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m}m ${s % 60}s`;
    const hours = Math.floor(m / 60);
    if (hours < 48) return `${hours}h ${m % 60}m`;
    return `${Math.floor(hours / 24)}d`;
  }

  const clock = (ms) => new Date(ms).toLocaleString();
  const settledOf = (job) => job.succeeded + job.failed + job.cancelled;
  const isDone = (job) => job.state === "finished" || job.state === "cancelled";

  function rate(job) {
    const seconds = ((job.finished_at_ms ?? Date.now()) - job.created_at_ms) / 1000;
    if (seconds <= 0) return "–";
    const r = settledOf(job) / seconds;
    return r >= 100 ? r.toFixed(0) : r >= 10 ? r.toFixed(1) : r.toFixed(2);
  }

  function clip(text, n = 160) {
    return text.length > n ? `${text.slice(0, n - 1)}…` : text;
  }

  function badge(state, testid) {
    return h("span", { class: `state state-${state}`, "data-testid": testid }, state);
  }

  function percent(job) {
    return job.total ? Math.floor((settledOf(job) * 100) / job.total) : 0;
  }

  function progressBar(job, big = false) {
    const pct = percent(job);
    const width = (n) => (job.total ? `width: ${((n * 100) / job.total).toFixed(2)}%` : "width: 0");
    return h(
      "div",
      {
        class: big ? "progress big" : "progress",
        role: "progressbar",
        "aria-valuemin": 0,
        "aria-valuemax": 100,
        "aria-valuenow": pct,
        "aria-label": "settled items",
        title: `${settledOf(job)} of ${job.total} settled`,
        "data-testid": "progress",
      },
      h("span", { class: "seg succeeded", style: width(job.succeeded) }),
      h("span", { class: "seg failed", style: width(job.failed) }),
      h("span", { class: "seg cancelled", style: width(job.cancelled) }),
      h("span", { class: "pct" }, `${pct}%`),
    );
  }

  function meter(used, max) {
    const share = max > 0 ? Math.min(1, used / max) : 0;
    return h(
      "span",
      { class: "meter", title: `${used} of ${max} slots` },
      h(
        "span",
        { class: "bar" },
        h("span", { class: share >= 1 ? "full" : "", style: `width: ${share * 100}%` }),
      ),
      `${used} / ${max}`,
    );
  }

  function preview(record) {
    if (record.error) return `${record.error.type}: ${record.error.message}`;
    const result = record.result;
    if (!result) return record.status === "cancelled" ? "cancelled" : "";
    const text = (result.content || [])
      .filter((block) => block.type === "text")
      .map((block) => block.text)
      .join(" ");
    if (text) return text;
    return JSON.stringify(result.structured_content ?? result.content ?? []);
  }

  function setConn(text, down = false) {
    const conn = $("#conn");
    conn.textContent = text;
    conn.classList.toggle("down", down);
  }

  // ---------------------------------------------------------------- the API

  const token = () => sessionStorage.getItem(TOKEN_KEY);

  async function request(path, { method = "GET", params, headers = {}, signal } = {}) {
    const url = new URL(path, API_ROOT);
    for (const [name, value] of Object.entries(params || {})) {
      if (value !== null && value !== undefined && value !== "") url.searchParams.set(name, value);
    }
    const sent = { Accept: "application/json", ...headers };
    const presented = token();
    if (presented) sent.Authorization = `Bearer ${presented}`;
    const response = await fetch(url, { method, headers: sent, signal, cache: "no-store" });
    if (response.status === 401) {
      askToken(presented !== null);
      throw new AuthError("unauthorized");
    }
    return response;
  }

  async function httpError(response) {
    let detail = response.statusText;
    try {
      const body = await response.json();
      detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail ?? body);
    } catch {
      // not JSON: keep the status text
    }
    return new HttpError(response.status, detail);
  }

  async function getJSON(path, options) {
    const response = await request(path, options);
    if (!response.ok) throw await httpError(response);
    return response.json();
  }

  // Server-sent events from a fetch() body (EventSource cannot send an Authorization header).
  async function* sseEvents(body) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let data = [];
    let type = "";
    let id = null;
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        buffer += decoder.decode(value, { stream: true });
        for (;;) {
          const end = buffer.search(/[\r\n]/);
          if (end < 0 || (buffer[end] === "\r" && end === buffer.length - 1)) break; // wait for more
          const line = buffer.slice(0, end);
          buffer = buffer.slice(buffer.startsWith("\r\n", end) ? end + 2 : end + 1);
          if (line === "") {
            if (data.length) yield { id, event: type || "message", data: data.join("\n") };
            data = [];
            type = "";
            continue;
          }
          if (line.startsWith(":")) continue; // a comment (keep-alive)
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let value = colon < 0 ? "" : line.slice(colon + 1);
          if (value.startsWith(" ")) value = value.slice(1);
          if (field === "data") data.push(value);
          else if (field === "event") type = value;
          else if (field === "id" && !value.includes("\0")) id = value;
        }
      }
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  // ---------------------------------------------------------------- views and their lifetimes

  // A view's timers and requests, all stopped when the route changes.
  function makeContext(main) {
    const controller = new AbortController();
    const timers = new Set();
    const banner = h("p", { class: "banner", role: "alert", "data-testid": "error", hidden: true });
    main.append(banner);
    const ctx = {
      alive: true,
      signal: controller.signal,
      later(ms, fn) {
        const timer = setTimeout(() => {
          timers.delete(timer);
          if (ctx.alive) fn();
        }, ms);
        timers.add(timer);
        return timer;
      },
      sleep(ms) {
        return new Promise((resolve) => ctx.later(ms, resolve));
      },
      // fn now, then again ms after each run ends (runs never overlap)
      every(ms, fn) {
        const tick = async () => {
          await ctx.guard(fn);
          if (ctx.alive) ctx.later(ms, tick);
        };
        tick();
      },
      // Run fn; show what went wrong, except a refused token (the token form is up) or a view left.
      async guard(fn) {
        try {
          const value = await fn();
          if (ctx.alive) {
            banner.hidden = true;
            setConn(`updated ${new Date().toLocaleTimeString()}`);
          }
          return value;
        } catch (error) {
          ctx.report(error);
          return undefined;
        }
      },
      report(error) {
        if (!ctx.alive || error instanceof AuthError || error.name === "AbortError") return;
        if (error instanceof HttpError) {
          banner.textContent = error.detail;
        } else {
          banner.textContent = "The API does not answer; retrying.";
          setConn("API unreachable", true);
        }
        banner.hidden = false;
      },
      dispose() {
        ctx.alive = false;
        controller.abort();
        for (const timer of timers) clearTimeout(timer);
        timers.clear();
      },
    };
    return ctx;
  }

  let current = null;
  let asking = false;

  function parseHash() {
    const raw = location.hash.replace(/^#\/?/, "");
    const [path, query = ""] = raw.split("?", 2);
    let parts;
    try {
      parts = path.split("/").filter(Boolean).map(decodeURIComponent);
    } catch {
      parts = ["?"];
    }
    return { parts, query: new URLSearchParams(query) };
  }

  function route() {
    if (current) current.dispose();
    current = null;
    asking = false;
    const { parts, query } = parseHash();
    if (parts.length === 0) history.replaceState(null, "", "#/jobs");
    const page = parts[0] || "jobs";
    for (const link of document.querySelectorAll("[data-nav]")) {
      link.classList.toggle("active", link.dataset.nav === page);
    }
    $("#forget-token").hidden = token() === null;
    const main = fill($("#main"));
    const ctx = makeContext(main);
    current = ctx;
    if (page === "jobs" && parts[1]) jobView(main, ctx, parts[1]);
    else if (page === "jobs") jobsView(main, ctx, query);
    else if (page === "servers") serversView(main, ctx);
    else append(main, h("h1", {}, "Not found"), h("p", {}, h("a", { href: "#/jobs" }, "Jobs")));
  }

  // ---------------------------------------------------------------- the token form

  function askToken(refused) {
    if (asking) return;
    asking = true;
    if (current) current.dispose();
    current = null;
    if (refused) sessionStorage.removeItem(TOKEN_KEY);
    $("#forget-token").hidden = true;
    setConn("");
    const input = h("input", {
      type: "password",
      id: "token-input",
      name: "token",
      placeholder: "TOOLSWARM_API_TOKEN",
      autocomplete: "off",
      required: true,
      "aria-label": "API token",
      "data-testid": "token-input",
    });
    const form = h(
      "form",
      {
        "data-testid": "token-form",
        onsubmit: (event) => {
          event.preventDefault();
          const value = input.value.trim();
          if (!value) return;
          sessionStorage.setItem(TOKEN_KEY, value);
          route();
        },
      },
      input,
      h("button", { type: "submit", class: "primary", "data-testid": "token-submit" }, "Use token"),
    );
    fill(
      $("#main"),
      h(
        "section",
        { class: "auth panel", "data-testid": "auth" },
        h("h1", {}, "API token"),
        h(
          "p",
          { class: "muted" },
          "This API requires a bearer token (TOOLSWARM_API_TOKEN). It is kept in this tab only.",
        ),
        form,
        refused ? h("p", { class: "error", "data-testid": "token-error" }, "That token was refused.") : null,
      ),
    );
    input.focus();
  }

  // ---------------------------------------------------------------- #/jobs

  function jobsView(main, ctx, query) {
    const state = STATES.includes(query.get("state")) ? query.get("state") : "";
    let pages = 1;
    let seq = 0;
    const select = h(
      "select",
      {
        id: "state-filter",
        "data-testid": "state-filter",
        onchange: () => {
          location.hash = select.value ? `#/jobs?state=${enc(select.value)}` : "#/jobs";
        },
      },
      h("option", { value: "" }, "all"),
      STATES.map((s) => h("option", { value: s, selected: s === state }, s)),
    );
    const body = h("tbody");
    const empty = h("p", { class: "empty", hidden: true }, state ? `No ${state} jobs.` : "No jobs yet.");
    const more = h(
      "button",
      {
        type: "button",
        "data-testid": "more-jobs",
        hidden: true,
        onclick: () => {
          pages += 1;
          ctx.guard(refresh);
        },
      },
      "more",
    );
    append(
      main,
      h(
        "div",
        { class: "toolbar" },
        h("h1", {}, "Jobs"),
        h("span", { class: "spacer" }),
        h("label", {}, "State ", select),
      ),
      h(
        "table",
        { class: "grid", "data-testid": "jobs-table" },
        h(
          "thead",
          {},
          h(
            "tr",
            {},
            h("th", {}, "Job"),
            h("th", {}, "State"),
            h("th", {}, "Progress"),
            h("th", { class: "num" }, "Succeeded / failed / total"),
            h("th", { class: "num" }, "Items/s"),
            h("th", { class: "num" }, "Age"),
          ),
        ),
        body,
      ),
      empty,
      h("div", { class: "pager" }, more),
    );

    async function refresh() {
      const mine = ++seq;
      const jobs = [];
      let cursor = null;
      for (let page = 0; page < pages; page++) {
        const got = await getJSON("v1/jobs", { params: { state, cursor, limit: 50 }, signal: ctx.signal });
        jobs.push(...got.jobs);
        cursor = got.next_cursor;
        if (!cursor) break;
      }
      if (mine !== seq || !ctx.alive) return; // a later refresh has started
      const now = Date.now();
      fill(
        body,
        jobs.map((job) =>
          h(
            "tr",
            { "data-testid": "job-row", "data-job-id": job.job_id, "data-state": job.state },
            h(
              "td",
              { class: "id" },
              h("a", { href: jobHref(job.job_id), "data-testid": "job-link" }, job.job_id),
            ),
            h("td", {}, badge(job.state, "job-state")),
            h("td", {}, progressBar(job)),
            h(
              "td",
              { class: "num" },
              h("span", { class: "ok" }, job.succeeded),
              " / ",
              h("span", { class: job.failed ? "bad" : "" }, job.failed),
              " / ",
              job.total,
            ),
            h("td", { class: "num" }, rate(job)),
            h("td", { class: "num", title: clock(job.created_at_ms) }, age(now - job.created_at_ms)),
          ),
        ),
      );
      empty.hidden = jobs.length > 0;
      more.hidden = !cursor;
    }

    ctx.every(REFRESH_MS, refresh);
  }

  // ---------------------------------------------------------------- #/jobs/<id>

  function jobView(main, ctx, jobId) {
    const base = `v1/jobs/${enc(jobId)}`;
    let job = null;
    const head = h("div", { class: "job-head" });
    const bar = h("div");
    const counts = h("div", { class: "counts" });
    const links = h("div", { class: "links" });
    const reduce = h("section", { hidden: true });
    const failures = h("section", { hidden: true });
    const streamState = h("span", { class: "muted small", "data-testid": "stream-state" }, "connecting…");
    const actions = h("span", { class: "actions" });
    const samples = new Map(); // "step\0type" -> {count, messages}
    let retrying = false;

    const results = {
      status: "",
      cursors: [null],
      page: 0,
      next: null,
      loadedAt: 0,
      settled: -1,
      timer: null,
    };
    const resultsBody = h("tbody");
    const resultsEmpty = h("p", { class: "empty", hidden: true }, "No settled results yet.");
    const prev = h(
      "button",
      { type: "button", "data-testid": "results-prev", onclick: () => turn(-1) },
      "‹ prev",
    );
    const next = h(
      "button",
      { type: "button", "data-testid": "results-next", onclick: () => turn(1) },
      "next ›",
    );
    const pageNo = h("span", { class: "muted small" });
    const statusFilter = h(
      "select",
      {
        "data-testid": "results-status",
        onchange: () => {
          results.status = statusFilter.value;
          results.cursors = [null];
          results.page = 0;
          ctx.guard(loadResults);
        },
      },
      ["", "succeeded", "failed", "cancelled"].map((s) => h("option", { value: s }, s || "all")),
    );

    append(
      main,
      h("div", { class: "toolbar" }, h("a", { href: "#/jobs" }, "← Jobs")),
      head,
      bar,
      counts,
      links,
      reduce,
      failures,
      h(
        "section",
        {},
        h(
          "div",
          { class: "toolbar" },
          h("h2", {}, "Results"),
          h("span", { class: "spacer" }),
          h("label", {}, "Status ", statusFilter),
        ),
        h(
          "table",
          { class: "grid", "data-testid": "results-table" },
          h(
            "thead",
            {},
            h(
              "tr",
              {},
              h("th", { class: "num" }, "#"),
              h("th", {}, "Key"),
              h("th", {}, "Status"),
              h("th", { class: "num" }, "Attempts"),
              h("th", { class: "num" }, "ms"),
              h("th", {}, "Error or output"),
            ),
          ),
          resultsBody,
        ),
        resultsEmpty,
        h("div", { class: "pager" }, prev, pageNo, next),
      ),
    );

    function render() {
      const done = isDone(job);
      const took = (job.finished_at_ms ?? Date.now()) - job.created_at_ms;
      fill(
        head,
        h("span", { class: "job-id", "data-testid": "job-id" }, job.job_id),
        badge(job.state, "job-state"),
        h(
          "span",
          { class: "muted" },
          `created ${clock(job.created_at_ms)} · ${done ? "took" : "running for"} ${age(took)} · ${rate(job)} items/s`,
        ),
        h("span", { class: "spacer" }),
        streamState,
        actions,
      );
      fill(actions, retryButton("failed", job.failed, done), retryButton("cancelled", job.cancelled, done));
      fill(bar, progressBar(job, true));
      const count = (name, n, cls) =>
        h(
          "div",
          { class: "count", "data-testid": `count-${name}` },
          h("span", { class: `n ${n && cls ? cls : ""}` }, n),
          h("span", { class: "label" }, name),
        );
      fill(
        counts,
        count("settled", settledOf(job)),
        count("total", job.total),
        count("succeeded", job.succeeded, "ok"),
        count("failed", job.failed, "bad"),
        count("cancelled", job.cancelled),
        count("running", job.running),
        count("pending", job.pending),
        count("degraded", job.degraded),
        job.restored_items ? count("restored", job.restored_items) : null,
      );
      fill(
        links,
        job.retry_of
          ? h(
              "span",
              {},
              "retry of ",
              h("a", { href: jobHref(job.retry_of), "data-testid": "retry-of" }, job.retry_of),
            )
          : null,
        job.retried_by
          ? h(
              "span",
              {},
              "retried by ",
              h("a", { href: jobHref(job.retried_by), "data-testid": "retried-by" }, job.retried_by),
            )
          : null,
        h(
          "span",
          { class: "muted small" },
          `servers: ${job.servers.join(", ") || "–"} · state mode ${job.state_mode}`,
        ),
      );
      renderReduce();
      renderFailures();
    }

    function retryButton(status, n, done) {
      if (!(n > 0 && done)) return null;
      const button = h(
        "button",
        {
          type: "button",
          disabled: retrying,
          class: status === "failed" ? "primary" : "",
          "data-testid": `retry-${status}`,
          title: `A new job of this job's ${n} ${status} items`,
          onclick: async () => {
            if (retrying) return;
            retrying = true;
            button.disabled = true;
            const submitted = await ctx.guard(async () => {
              const response = await request(`${base}/retry`, {
                method: "POST",
                params: { status },
                signal: ctx.signal,
              });
              if (!response.ok) throw await httpError(response);
              return response.json();
            });
            retrying = false;
            if (submitted) location.hash = jobHref(submitted.job_id);
            else button.disabled = false;
          },
        },
        `retry ${status} (${n})`,
      );
      return button;
    }

    function renderReduce() {
      reduce.hidden = !job.reduce;
      if (!job.reduce) return;
      const r = job.reduce;
      const outcome = r.error
        ? h("span", { class: "bad" }, `${r.error.type}: ${r.error.message}`)
        : r.result
          ? h("span", { class: "mono" }, clip(preview({ result: r.result, status: r.status })))
          : null;
      fill(
        reduce,
        h("h2", {}, "Reduce"),
        h(
          "div",
          { class: "panel", "data-testid": "reduce" },
          badge(r.status, "reduce-state"),
          ` attempts ${r.attempts} `,
          outcome,
        ),
      );
    }

    function renderFailures() {
      failures.hidden = job.failures.length === 0;
      if (!job.failures.length) return;
      const rows = job.failures.map((group) => {
        const key = `${group.step}\0${group.error_type}`;
        const known = samples.get(key);
        if (!known || (known.messages.length < SAMPLES && known.count !== group.count)) {
          samples.set(key, { count: group.count, messages: known ? known.messages : [] });
          ctx.guard(() => loadSamples(group, key));
        }
        const messages = (samples.get(key) || { messages: [] }).messages;
        return h(
          "tr",
          {
            "data-testid": "failure-group",
            "data-step": group.step,
            "data-error-type": group.error_type,
            "data-count": group.count,
          },
          h("td", { class: "mono" }, group.step),
          h("td", {}, h("span", { class: "bad" }, group.error_type)),
          h("td", { class: "num" }, group.count),
          h(
            "td",
            {},
            messages.length
              ? h(
                  "ul",
                  { class: "samples", "data-testid": "failure-samples" },
                  messages.map((m) => h("li", {}, clip(m, 300))),
                )
              : h("span", { class: "muted small" }, "…"),
          ),
        );
      });
      fill(
        failures,
        h("h2", {}, "Failures"),
        h(
          "table",
          { class: "grid", "data-testid": "failures" },
          h(
            "thead",
            {},
            h(
              "tr",
              {},
              h("th", {}, "Step"),
              h("th", {}, "Error type"),
              h("th", { class: "num" }, "Items"),
              h("th", {}, "Sample messages"),
            ),
          ),
          h("tbody", {}, rows),
        ),
      );
    }

    async function loadSamples(group, key) {
      const page = await getJSON(`${base}/results`, {
        params: { status: "failed", step: group.step, limit: 20 },
        signal: ctx.signal,
      });
      const messages = [];
      for (const record of page.results) {
        if (
          record.error &&
          record.error.type === group.error_type &&
          !messages.includes(record.error.message)
        ) {
          messages.push(record.error.message);
        }
        if (messages.length === SAMPLES) break;
      }
      samples.set(key, { count: group.count, messages });
      if (ctx.alive && job) renderFailures();
    }

    function turn(by) {
      results.page = Math.max(0, results.page + by);
      if (by > 0) results.cursors[results.page] = results.next;
      ctx.guard(loadResults);
    }

    async function loadResults() {
      if (results.timer !== null) clearTimeout(results.timer);
      results.timer = null;
      results.loadedAt = Date.now();
      const wanted = { ...results, cursors: [...results.cursors] };
      const page = await getJSON(`${base}/results`, {
        params: { status: wanted.status, cursor: wanted.cursors[wanted.page], limit: RESULTS_PAGE },
        signal: ctx.signal,
      });
      if (!ctx.alive || wanted.status !== results.status || wanted.page !== results.page) return;
      results.next = page.next_cursor;
      fill(
        resultsBody,
        page.results.map((r) => {
          const detail = preview(r);
          return h(
            "tr",
            { "data-testid": "result-row", "data-index": r.index, "data-status": r.status },
            h("td", { class: "num" }, r.index),
            h("td", { class: "mono" }, r.key ?? ""),
            h("td", {}, badge(r.status, "result-status")),
            h("td", { class: "num" }, r.attempts),
            h("td", { class: "num" }, r.duration_ms.toFixed(1)),
            h(
              "td",
              { class: r.error ? "detail bad" : "detail mono", title: clip(detail, 2000) },
              clip(detail),
            ),
          );
        }),
      );
      resultsEmpty.hidden = page.results.length > 0;
      prev.disabled = results.page === 0;
      next.disabled = !results.next;
      pageNo.textContent = `page ${results.page + 1}`;
    }

    // The results page follows progress, but is read again at most every REFRESH_MS.
    function maybeReloadResults() {
      const settled = settledOf(job);
      if (settled === results.settled && results.loadedAt) return;
      results.settled = settled;
      const wait = REFRESH_MS - (Date.now() - results.loadedAt);
      if (isDone(job) || wait <= 0) ctx.guard(loadResults);
      else if (results.timer === null) results.timer = ctx.later(wait, () => ctx.guard(loadResults));
    }

    let refreshing = null;
    let again = false;
    let lastRead = 0;
    let pending = null;

    async function readStatus() {
      if (refreshing) {
        again = true;
        return refreshing;
      }
      refreshing = (async () => {
        try {
          do {
            again = false;
            lastRead = Date.now();
            job = await getJSON(base, { signal: ctx.signal });
            if (!ctx.alive) return job;
            render();
            maybeReloadResults();
          } while (again && ctx.alive);
          return job;
        } finally {
          refreshing = null;
        }
      })();
      return refreshing;
    }

    // On each event, a status read: at once if none was made lately, else one trailing read.
    function onEvent() {
      if (pending !== null) return;
      const wait = Math.max(0, EVENT_REFRESH_MS - (Date.now() - lastRead));
      pending = ctx.later(wait, () => {
        pending = null;
        ctx.guard(readStatus);
      });
    }

    async function follow() {
      let lastId = null;
      let backoff = 500;
      while (ctx.alive) {
        let completed = false;
        try {
          const headers = { Accept: "text/event-stream" };
          if (lastId) headers["Last-Event-ID"] = lastId;
          const response = await request(`${base}/events`, { headers, signal: ctx.signal });
          if (!response.ok) throw await httpError(response);
          streamState.textContent = "live";
          backoff = 500;
          for await (const event of sseEvents(response.body)) {
            if (event.id) lastId = event.id;
            onEvent(event);
            if (event.event === "job.completed") {
              completed = true;
              break;
            }
          }
        } catch (error) {
          if (!ctx.alive || error instanceof AuthError) return;
          if (error instanceof HttpError && error.status === 404) {
            ctx.report(error);
            streamState.textContent = "";
            return;
          }
          streamState.textContent = "reconnecting…";
        }
        // The stream ended: done (it stops at job.completed), or dropped: go on after lastId.
        const latest = await ctx.guard(readStatus);
        if (completed || (latest && isDone(latest))) {
          streamState.textContent = "complete";
          return;
        }
        if (!ctx.alive) return;
        streamState.textContent = "reconnecting…";
        await ctx.sleep(backoff);
        backoff = Math.min(backoff * 2, 4000);
      }
    }

    ctx.guard(readStatus).then((first) => {
      if (!ctx.alive || !first) return;
      if (isDone(first)) streamState.textContent = "complete";
      else follow();
    });
    // A running job's "running for" and items/s go on changing between events.
    ctx.every(REFRESH_MS, () => {
      if (job && !isDone(job) && !refreshing) render();
    });
  }

  // ---------------------------------------------------------------- #/servers

  function serversView(main, ctx) {
    const serverBody = h("tbody");
    const workerBody = h("tbody");
    const workerCount = h("span", { "data-testid": "worker-count" }, "–");
    const noWorkers = h("p", { class: "empty", hidden: true }, "No live workers.");
    append(
      main,
      h("div", { class: "toolbar" }, h("h1", {}, "Servers")),
      h(
        "table",
        { class: "grid", "data-testid": "servers-table" },
        h(
          "thead",
          {},
          h(
            "tr",
            {},
            h("th", {}, "Server"),
            h("th", {}, "Transport"),
            h("th", {}, "Health"),
            h("th", {}, "Last probe"),
            h("th", { class: "num" }, "Latency ms"),
            h("th", { class: "num" }, "Tools"),
            h("th", {}, "In flight"),
            h("th", { class: "num" }, "Queued chunks"),
            h("th", { class: "num" }, "Timeout s"),
          ),
        ),
        serverBody,
      ),
      h("h2", {}, "Workers (", workerCount, ")"),
      h(
        "table",
        { class: "grid", "data-testid": "workers-table" },
        h(
          "thead",
          {},
          h(
            "tr",
            {},
            h("th", {}, "Worker"),
            h("th", { class: "num" }, "PID"),
            h("th", { class: "num" }, "Last heartbeat"),
            h("th", { class: "num" }, "Up"),
          ),
        ),
        workerBody,
      ),
      noWorkers,
    );

    async function refresh() {
      const [servers, workers] = await Promise.all([
        getJSON("v1/servers", { signal: ctx.signal }),
        getJSON("v1/workers", { signal: ctx.signal }),
      ]);
      if (!ctx.alive) return;
      const now = Date.now();
      fill(
        serverBody,
        servers.map((s) => {
          const health = s.healthy === null ? "unknown" : s.healthy ? "healthy" : "unhealthy";
          const probe = s.probe;
          return h(
            "tr",
            { "data-testid": "server-row", "data-server": s.name, "data-health": health },
            h("td", { class: "mono" }, s.name),
            h("td", {}, s.transport),
            h("td", { title: probe && probe.error ? probe.error : null }, badge(health, "server-health")),
            h(
              "td",
              { title: probe ? clock(probe.at_ms) : null },
              probe ? `${age(now - probe.at_ms)} ago` : "never",
            ),
            h("td", { class: "num" }, probe ? probe.latency_ms.toFixed(1) : "–"),
            h("td", { class: "num" }, probe ? probe.tool_count : "–"),
            h("td", { "data-testid": "in-flight" }, meter(s.in_flight, s.max_concurrency)),
            h("td", { class: "num", "data-testid": "queued-chunks" }, s.queued_chunks ?? "unknown"),
            h("td", { class: "num" }, s.timeout_s),
          );
        }),
      );
      workerCount.textContent = String(workers.length);
      fill(
        workerBody,
        workers.map((w) =>
          h(
            "tr",
            { "data-testid": "worker-row", "data-worker": w.worker },
            h("td", { class: "mono" }, w.worker),
            h("td", { class: "num" }, w.pid ?? "–"),
            h("td", { class: "num" }, w.last_heartbeat_s === null ? "–" : `${w.last_heartbeat_s}s ago`),
            h("td", { class: "num" }, w.started_at ? age(now - w.started_at * 1000) : "–"),
          ),
        ),
      );
      noWorkers.hidden = workers.length > 0;
    }

    ctx.every(REFRESH_MS, refresh);
  }

  // ---------------------------------------------------------------- start

  $("#forget-token").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    route();
  });
  window.addEventListener("hashchange", route);
  route();
})();
