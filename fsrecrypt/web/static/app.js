// The supervisor's page: sign in with an API key or a bearer token from the
// platform's sign-in (kept in sessionStorage, so it dies with the tab), list the
// tenant's recordings, play one through a short-lived signed URL. The <audio>
// element fetches the stream itself and sends Range requests when the user
// seeks; neither the key nor the token ever appears in a URL the page requests.
// A platform may hand over its token as /#access_token=<JWT>: the fragment is
// read once, removed from the address bar, and never sent to a server.
"use strict";

const KEY_STORAGE = "fsrecrypt.apiKey";
const TOKEN_STORAGE = "fsrecrypt.token";
const JWT_SHAPE = /^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$/;
const $ = (id) => document.getElementById(id);
let canListen = true; // from /v1/me: the Play buttons need the role "listen"
let canDownload = false; // and the Download buttons the role "download"

function credentialHeaders() {
  const token = sessionStorage.getItem(TOKEN_STORAGE);
  if (token) return { Authorization: `Bearer ${token}` };
  return { "X-API-Key": sessionStorage.getItem(KEY_STORAGE) || "" };
}

function remember(credential) {
  sessionStorage.removeItem(KEY_STORAGE);
  sessionStorage.removeItem(TOKEN_STORAGE);
  // An API key looks like fsr_<id>_<secret>; a JWT is three base64url parts.
  const isToken = !credential.startsWith("fsr_") && JWT_SHAPE.test(credential);
  sessionStorage.setItem(isToken ? TOKEN_STORAGE : KEY_STORAGE, credential);
}

function tokenFromFragment() {
  const fragment = new URLSearchParams(window.location.hash.slice(1));
  const token = fragment.get("access_token") || fragment.get("token");
  if (!token) return false;
  history.replaceState(null, "", window.location.pathname + window.location.search);
  remember(token.trim());
  return true;
}

function setStatus(text, isError) {
  const el = $("status");
  el.textContent = text || "";
  el.className = isError ? "error" : "";
}

async function api(path) {
  const response = await fetch(path, { headers: credentialHeaders(), cache: "no-store" });
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

// The download route needs the credential header, so the page fetches the file
// itself and hands the browser a blob: URL to save (the credential stays out of URLs).
async function download(recording) {
  setStatus("Downloading…");
  try {
    const path = `/v1/recordings/${encodeURIComponent(recording.id)}/download`;
    const response = await fetch(path, { headers: credentialHeaders(), cache: "no-store" });
    if (!response.ok) {
      const body = await response.json().catch(() => null);
      throw new Error((body && body.error && body.error.message) || response.statusText);
    }
    const url = URL.createObjectURL(await response.blob());
    const link = document.createElement("a");
    link.href = url;
    link.download = `${recording.id}.wav`;
    link.click();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
    setStatus(`Downloaded ${recording.call_uuid || recording.id}.`);
  } catch (e) {
    setStatus(`Cannot download: ${e.message}`, true);
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
    if (rec.status === "stored" && canListen) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "play";
      button.textContent = "Play";
      button.addEventListener("click", () => play(rec));
      action.appendChild(button);
    }
    if (rec.status === "stored" && canDownload) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "download";
      button.textContent = "Download";
      button.addEventListener("click", () => download(rec));
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
  const how = me.via === "jwt" ? `token from ${me.issuer}` : "API key";
  $("who").textContent = `${me.user} @ ${me.tenant} (${how}; roles: ${me.roles.join(", ") || "none"})`;
  $("who").dataset.via = me.via;
  canListen = me.roles.includes("listen");
  canDownload = me.roles.includes("download");
  $("whoami").hidden = false;
  $("signin-panel").hidden = true;
  $("browse").hidden = false;
  await search();
}

function signOut(message) {
  sessionStorage.removeItem(KEY_STORAGE);
  sessionStorage.removeItem(TOKEN_STORAGE);
  const audio = $("player");
  audio.pause();
  audio.removeAttribute("src");
  $("whoami").hidden = true;
  $("browse").hidden = true;
  document.querySelector("#recordings tbody").replaceChildren();
  $("signin-panel").hidden = false;
  setStatus(message || "Signed out.", Boolean(message));
}

async function signIn(event) {
  event.preventDefault();
  remember($("apikey").value.trim());
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
  window.addEventListener("hashchange", () => {
    if (tokenFromFragment()) showSignedIn().catch((e) => signOut(`Sign-in failed: ${e.message}`));
  });
  const handedOver = tokenFromFragment();
  if (handedOver || sessionStorage.getItem(KEY_STORAGE) || sessionStorage.getItem(TOKEN_STORAGE)) {
    showSignedIn().catch((e) => signOut(`Session ended: ${e.message}`));
  }
});
