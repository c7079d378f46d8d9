// The supervisor's page: sign in with an API key (kept in sessionStorage, so it
// dies with the tab), list the tenant's recordings, play one through a
// short-lived signed URL. The <audio> element fetches the stream itself and
// sends Range requests when the user seeks; the API key never appears in a URL.
"use strict";

const KEY_STORAGE = "fsrecrypt.apiKey";
const $ = (id) => document.getElementById(id);

function setStatus(text, isError) {
  const el = $("status");
  el.textContent = text || "";
  el.className = isError ? "error" : "";
}

async function api(path) {
  const key = sessionStorage.getItem(KEY_STORAGE);
  const response = await fetch(path, { headers: { "X-API-Key": key || "" }, cache: "no-store" });
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    const err = (body && body.error) || { code: "http_" + response.status, message: response.statusText };
    const error = new Error(err.message + (err.hint ? " " + err.hint : ""));
    error.code = err.code;
    error.status = response.status;
    throw error;
  }
  return body;
}

function formatDuration(seconds) {
  if (seconds === null || seconds === undefined) return "";
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  const mm = String(m).padStart(2, "0"), ss = String(r).padStart(2, "0");
  return h ? `${h}:${mm}:${ss}` : `${m}:${ss}`;
}

function toIsoUtc(localValue) {
  if (!localValue) return "";
  return localValue.length === 16 ? localValue + ":00Z" : localValue + "Z";
}

function maskLabel(rec) {
  if (rec.mask_verified === null || rec.mask_verified === undefined) return "";
  const n = (rec.masked_spans || []).length;
  return rec.mask_verified ? `${n} span(s), silent` : `${n} span(s), NOT verified`;
}

function clock(ms) {
  return formatDuration(ms / 1000);
}

// The masked spans on the player's timeline: where the audio is silent (found
// before encryption), or where the events announced a mask the audio does not
// show (striped red).
function drawTimeline(recording) {
  const timeline = $("timeline");
  timeline.querySelectorAll(".mask-span").forEach((el) => el.remove());
  const total = (recording.duration_s || 0) * 1000;
  const spans = recording.masked_spans || [];
  const notes = [];
  for (const span of spans) {
    const start = span.silent ? span.start_ms : span.announced_start_ms;
    const endRaw = span.silent ? span.end_ms : span.announced_end_ms;
    const end = endRaw === null || endRaw === undefined ? total : endRaw;
    const el = document.createElement("div");
    el.className = "mask-span " + (span.silent ? "verified" : "unverified");
    el.dataset.startMs = String(start);
    el.dataset.endMs = String(end);
    el.title = `Masked ${clock(start)}–${clock(end)} (${span.via}): ` +
      (span.silent ? "digital silence in the audio" : "NOT silent in the audio");
    if (total > 0) {
      el.style.left = `${Math.max(0, Math.min(100, (100 * start) / total))}%`;
      el.style.width = `${Math.max(0.3, Math.min(100, (100 * (end - start)) / total))}%`;
    }
    timeline.appendChild(el);
    notes.push(el.title);
  }
  $("mask-legend").textContent = notes.length ? notes.join("; ") : "";
}

async function play(recording) {
  drawTimeline(recording);
  setStatus("Preparing playback…");
  try {
    const signed = await api(`/v1/recordings/${encodeURIComponent(recording.id)}/playback`);
    const audio = $("player");
    audio.src = signed.url;
    audio.dataset.recordingId = recording.id;
    $("now-playing").textContent =
      `Playing ${recording.call_uuid || recording.id} (${formatDuration(recording.duration_s)}); link valid until ${signed.expires_at}`;
    await audio.play();
    setStatus("");
  } catch (e) {
    setStatus(`Cannot play: ${e.message}`, true);
  }
}

function render(recordings) {
  const body = document.querySelector("#recordings tbody");
  body.replaceChildren();
  for (const rec of recordings) {
    const row = document.createElement("tr");
    row.dataset.recordingId = rec.id;
    const cells = [
      (rec.created_at || "").replace("T", " ").slice(0, 19),
      rec.call_uuid || "",
      formatDuration(rec.duration_s),
      rec.status,
      maskLabel(rec),
    ];
    cells.forEach((text, i) => {
      const td = document.createElement("td");
      td.textContent = text;
      if (i === 1) td.className = "mono";
      if (i === 4) td.className = rec.mask_verified === false ? "mask-unverified" : "mask";
      row.appendChild(td);
    });
    const action = document.createElement("td");
    if (rec.status === "stored") {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "play";
      button.textContent = "Play";
      button.addEventListener("click", () => play(rec));
      action.appendChild(button);
    }
    row.appendChild(action);
    body.appendChild(row);
  }
  setStatus(`${recordings.length} recording(s).`);
}

async function search(event) {
  if (event) event.preventDefault();
  const params = new URLSearchParams();
  const call = $("call_uuid").value.trim();
  if (call) params.set("call_uuid", call);
  const from = toIsoUtc($("from").value), to = toIsoUtc($("to").value);
  if (from) params.set("from", from);
  if (to) params.set("to", to);
  setStatus("Searching…");
  try {
    const result = await api(`/v1/recordings?${params}`);
    render(result.recordings);
  } catch (e) {
    if (e.status === 401) return signOut(e.message);
    setStatus(`Search failed: ${e.message}`, true);
  }
}

async function showSignedIn() {
  const me = await api("/v1/me");
  $("who").textContent = `${me.user} @ ${me.tenant}`;
  $("whoami").hidden = false;
  $("signin-panel").hidden = true;
  $("browse").hidden = false;
  await search();
}

function signOut(message) {
  sessionStorage.removeItem(KEY_STORAGE);
  const audio = $("player");
  audio.pause();
  audio.removeAttribute("src");
  $("whoami").hidden = true;
  $("browse").hidden = true;
  $("signin-panel").hidden = false;
  setStatus(message || "Signed out.", Boolean(message));
}

async function signIn(event) {
  event.preventDefault();
  sessionStorage.setItem(KEY_STORAGE, $("apikey").value.trim());
  $("apikey").value = "";
  try {
    await showSignedIn();
  } catch (e) {
    signOut(`Sign-in failed: ${e.message}`);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("signin").addEventListener("submit", signIn);
  $("filters").addEventListener("submit", search);
  $("signout").addEventListener("click", () => signOut());
  $("player").addEventListener("timeupdate", () => {
    const audio = $("player");
    if (audio.duration > 0) $("playhead").style.left = `${(100 * audio.currentTime) / audio.duration}%`;
  });
  $("player").addEventListener("error", () => {
    const err = $("player").error;
    if (err) setStatus(`Playback error (code ${err.code}); the link may have expired — press Play again.`, true);
  });
  if (sessionStorage.getItem(KEY_STORAGE)) {
    showSignedIn().catch((e) => signOut(`Session ended: ${e.message}`));
  }
});
