// credgate's console: one page over the JSON API. Every action is an API call with the
// signed-in pair's two headers, so the API's scope checks are the console's checks. The pair
// lives in this tab's sessionStorage only; it is never put in a URL, the page or a log.
// Text from the API is always set with textContent, never parsed as HTML.

const PAIR = "credgate.pair";
const $ = (id) => document.getElementById(id);

let me = null; // { api_key, scopes } of the signed-in credential
let after = null; // cursor of the next page of the list
let current = null; // the credential shown in the detail view

function pair() {
  const raw = sessionStorage.getItem(PAIR);
  return raw ? JSON.parse(raw) : null;
}

function holds(scope) {
  return !!me && (me.scopes.includes("*") || me.scopes.includes(scope));
}

/** Calls the API as the signed-in credential; returns the parsed body or throws an Error
 *  whose message is the API's own (a 403 names the scope it lacks). */
async function api(method, path, body) {
  const p = pair();
  const headers = { "X-Api-Key": p.key, "X-Api-Secret": p.secret };
  const init = { method, headers, cache: "no-store", credentials: "omit" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const text = await response.text();
  const json = text ? JSON.parse(text) : null;
  if (!response.ok) {
    const error = new Error(json && json.error ? `${json.error.message} (${json.error.code})` : `HTTP ${response.status}`);
    error.status = response.status;
    throw error;
  }
  return json;
}

function show(message, kind = "error") {
  const box = $("message");
  box.textContent = message;
  box.className = kind;
  box.hidden = !message;
}

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text ?? "";
  row.appendChild(td);
  return td;
}

/** "3 min ago" for an RFC 3339 time. */
function ago(time) {
  if (!time) return "never";
  const seconds = Math.max(0, Math.round((Date.now() - Date.parse(time)) / 1000));
  if (seconds < 60) return `${seconds} s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
  return `${Math.floor(seconds / 86400)} days ago`;
}

function view(name) {
  for (const id of ["list-view", "detail-view", "issue-view", "secret-view"]) {
    $(id).hidden = id !== name;
  }
}

// ---- Sign in and out ---------------------------------------------------------------------

async function signIn(key, secret) {
  sessionStorage.setItem(PAIR, JSON.stringify({ key, secret }));
  try {
    // Any credential may read itself: its scopes say what the console offers.
    const self = await api("GET", `/credentials/${encodeURIComponent(key)}`);
    me = { api_key: self.api_key, scopes: self.scopes };
  } catch (error) {
    sessionStorage.removeItem(PAIR);
    throw error;
  }
  enter();
}

function enter() {
  $("sign-in-view").hidden = true;
  $("app-view").hidden = false;
  $("sign-out").hidden = false;
  $("whoami").textContent = `${me.api_key} · ${me.scopes.join(" ") || "no scopes"}`;
  // What this credential cannot do is not offered.
  $("show-issue").hidden = !holds("credentials:write");
  $("show-list").hidden = !holds("credentials:read");
  $("list-view").hidden = !holds("credentials:read");
  show("");
  if (holds("credentials:read")) {
    view("list-view");
    search();
  } else {
    openDetail(me.api_key);
  }
  startChart();
}

function signOut() {
  sessionStorage.removeItem(PAIR);
  me = null;
  location.reload();
}

// ---- The list ------------------------------------------------------------------------------

function matches(c, text) {
  if (!text) return true;
  const t = text.toLowerCase();
  return c.api_key.toLowerCase().startsWith(t) || (c.owner || "").toLowerCase().includes(t) || (c.name || "").toLowerCase().includes(t);
}

async function search(more = false) {
  const tbody = $("credentials").querySelector("tbody");
  if (!more) {
    tbody.replaceChildren();
    after = null;
  }
  const text = $("search-text").value.trim();
  const params = new URLSearchParams({ limit: "50" });
  if ($("search-state").value) params.set("state", $("search-state").value);
  if (after) params.set("after", after);
  try {
    // The API filters by state and pages; the text matches key prefix, owner or name here,
    // over each page read.
    const page = await api("GET", `/credentials?${params}`);
    for (const c of page.credentials.filter((c) => matches(c, text))) {
      const row = document.createElement("tr");
      const key = cell(row, "");
      const link = document.createElement("a");
      link.href = "#";
      link.textContent = c.api_key;
      link.className = "key";
      link.addEventListener("click", (event) => {
        event.preventDefault();
        openDetail(c.api_key);
      });
      key.appendChild(link);
      cell(row, c.name);
      cell(row, c.owner);
      cell(row, c.scopes.join(" "));
      cell(row, c.state).className = `state ${c.state}`;
      cell(row, ago(c.last_used_at));
      cell(row, c.master_key_id);
      tbody.appendChild(row);
    }
    after = page.next;
    $("more").hidden = !after;
  } catch (error) {
    show(error.message);
  }
}

// ---- One credential ------------------------------------------------------------------------

async function openDetail(key) {
  show("");
  view("detail-view");
  $("edit-form").hidden = true;
  $("roll-form").hidden = true;
  try {
    current = await api("GET", `/credentials/${encodeURIComponent(key)}`);
  } catch (error) {
    show(error.message);
    return;
  }
  $("detail-key").textContent = current.api_key;
  const fields = $("detail-fields");
  fields.replaceChildren();
  const field = (name, value) => {
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    dd.textContent = value ?? "—";
    fields.append(dt, dd);
  };
  field("State", current.state);
  field("Name", current.name);
  field("Owner", current.owner);
  field("Scopes", current.scopes.join(" "));
  field("Expires", current.expires_at || "never");
  field("Last used", ago(current.last_used_at));
  field("Created", current.created_at);
  field("Master key", current.master_key_id);
  field("Revoked", current.revoked_at ? `${current.revoked_at} by ${current.revoked_by || "SQL"}` : null);
  field("Meta", JSON.stringify(current.meta));
  const own = current.api_key === me.api_key;
  const active = current.state !== "revoked";
  $("edit").hidden = !(active && holds("credentials:write"));
  $("roll").hidden = !(active && current.state === "active" && (own || holds("credentials:write")));
  $("revoke").hidden = !(active && (own || holds("credentials:revoke")));
  await trail(current.api_key);
}

async function trail(key) {
  const tbody = $("events").querySelector("tbody");
  tbody.replaceChildren();
  if (!holds("audit:read")) {
    const row = document.createElement("tr");
    cell(row, "The audit trail needs the scope audit:read.").colSpan = 5;
    tbody.appendChild(row);
    return;
  }
  try {
    const page = await api("GET", `/audit?api_key=${encodeURIComponent(key)}&limit=100`);
    for (const e of page.events) {
      const row = document.createElement("tr");
      cell(row, e.at);
      cell(row, e.event);
      cell(row, e.actor);
      cell(row, e.source);
      cell(row, JSON.stringify(e.detail));
      tbody.appendChild(row);
    }
  } catch (error) {
    show(error.message);
  }
}

function attributes(prefix) {
  const body = {};
  const name = $(`${prefix}-name`).value.trim();
  const owner = $(`${prefix}-owner`).value.trim();
  const scopes = $(`${prefix}-scopes`).value.trim();
  const expires = $(`${prefix}-expires`).value.trim();
  if (prefix === "edit") {
    body.name = name || null;
    body.owner = owner || null;
    body.scopes = scopes ? scopes.split(/\s+/) : [];
    body.expires_at = expires || null;
  } else {
    if (name) body.name = name;
    if (owner) body.owner = owner;
    if (scopes) body.scopes = scopes.split(/\s+/);
    if (expires) body.expires_at = expires;
  }
  return body;
}

function showSecret(created) {
  $("new-key").textContent = created.api_key;
  $("new-secret").textContent = created.api_secret;
  view("secret-view");
}

// ---- Live chart of authentication results, from /metrics ------------------------------------

const series = { ok: [], rejected: [], error: [] };
let last = null;
let chartTimer = null;

function totals(text) {
  const t = { ok: 0, rejected: 0, error: 0 };
  for (const line of text.split("\n")) {
    const m = line.match(/^credgate_auth_results_total\{result="([a-z_]+)"\} ([0-9.e+]+)$/);
    if (!m) continue;
    const n = Number(m[2]);
    if (m[1] === "ok") t.ok += n;
    else if (m[1] === "error") t.error += n;
    else t.rejected += n;
  }
  return t;
}

async function sample() {
  try {
    const response = await fetch("/metrics", { cache: "no-store", credentials: "omit" });
    const now = totals(await response.text());
    if (last) {
      for (const k of Object.keys(series)) {
        series[k].push(Math.max(0, now[k] - last[k]));
        if (series[k].length > 60) series[k].shift();
      }
      draw();
    }
    last = now;
  } catch {
    // A missed sample leaves a gap; the next one continues.
  }
}

function draw() {
  const canvas = $("chart");
  const g = canvas.getContext("2d");
  g.clearRect(0, 0, canvas.width, canvas.height);
  const max = Math.max(1, ...series.ok, ...series.rejected, ...series.error);
  const colors = { ok: "#2e7d32", rejected: "#c62828", error: "#6a1b9a" };
  for (const [k, values] of Object.entries(series)) {
    g.strokeStyle = colors[k];
    g.beginPath();
    values.forEach((v, i) => {
      const x = (i / 59) * (canvas.width - 1);
      const y = canvas.height - 1 - (v / max) * (canvas.height - 10);
      if (i === 0) g.moveTo(x, y);
      else g.lineTo(x, y);
    });
    g.stroke();
  }
  canvas.dataset.latest = JSON.stringify(Object.fromEntries(Object.entries(series).map(([k, v]) => [k, v[v.length - 1] ?? 0])));
}

function startChart() {
  if (chartTimer) return;
  sample();
  chartTimer = setInterval(sample, 1000);
}

// ---- Wiring --------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("sign-in-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = $("sign-in-key").value.trim();
    const secret = $("sign-in-secret").value.trim();
    // The inputs are emptied at once: the secret does not stay in the page.
    $("sign-in-key").value = "";
    $("sign-in-secret").value = "";
    try {
      await signIn(key, secret);
    } catch (error) {
      const failed = $("sign-in-view").querySelector(".error") || document.createElement("p");
      failed.className = "error";
      failed.id = "sign-in-error";
      failed.textContent = error.status === 401 ? "That key and secret were not accepted." : error.message;
      $("sign-in-view").appendChild(failed);
    }
  });
  $("sign-out").addEventListener("click", signOut);
  $("show-list").addEventListener("click", () => {
    view("list-view");
    search();
  });
  $("show-issue").addEventListener("click", () => {
    show("");
    view("issue-view");
  });
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    search();
  });
  $("more").addEventListener("click", () => search(true));
  $("edit").addEventListener("click", () => {
    $("edit-name").value = current.name || "";
    $("edit-owner").value = current.owner || "";
    $("edit-scopes").value = current.scopes.join(" ");
    $("edit-expires").value = current.expires_at || "";
    $("edit-form").hidden = false;
  });
  $("edit-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      await api("PATCH", `/credentials/${encodeURIComponent(current.api_key)}`, attributes("edit"));
      await openDetail(current.api_key);
      show("Saved.", "info");
    } catch (error) {
      show(error.message);
    }
  });
  $("roll").addEventListener("click", () => {
    $("roll-form").hidden = false;
  });
  $("roll-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      const grace = Number($("roll-grace").value);
      const rolled = await api("POST", `/credentials/${encodeURIComponent(current.api_key)}/roll`, { grace_seconds: grace });
      showSecret(rolled);
    } catch (error) {
      show(error.message);
    }
  });
  $("revoke").addEventListener("click", async () => {
    const key = current.api_key;
    if (!confirm(`Revoke ${key}? It stops working at once, and for good.`)) return;
    try {
      await api("DELETE", `/credentials/${encodeURIComponent(key)}`);
      if (key === me.api_key) {
        signOut();
        return;
      }
      await openDetail(key);
      show(`Revoked ${key}.`, "info");
    } catch (error) {
      show(error.message);
    }
  });
  $("issue-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      showSecret(await api("POST", "/credentials/issue", attributes("issue")));
      $("issue-form").reset();
    } catch (error) {
      show(error.message);
    }
  });
  $("copy-secret").addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText($("new-secret").textContent);
      show("The secret is on the clipboard.", "info");
    } catch {
      show("Copying failed: select the secret and copy it by hand.");
    }
  });
  $("secret-done").addEventListener("click", () => {
    // The new secret leaves the page.
    $("new-secret").textContent = "";
    $("new-key").textContent = "";
    if (holds("credentials:read")) {
      view("list-view");
      search();
    } else {
      openDetail(me.api_key);
    }
  });
  const p = pair();
  if (p) {
    signIn(p.key, p.secret).catch(() => sessionStorage.removeItem(PAIR));
  }
});
