// voicefsm interview page: microphone → 16 kHz PCM → websocket → interviewer, and back at 24 kHz.
//
// Wire protocol (see voicefsm/protocol.py): binary frames are raw 16-bit little-endian mono PCM
// (16 kHz up, 24 kHz down); text frames are JSON. The server's first message on a new session is
// session_created; the page keeps that id (and the token) in sessionStorage so a refresh or a
// dropped socket can re-attach with ?session=<id> within the server's grace window. After a
// refresh the page re-attaches at once, without audio ("paused"), so it shows the session's real
// state and time left; Rejoin turns the microphone and the sound back on, and "Start a new
// interview instead" ends the old session before starting another.
//
// window.voicefsm is a read-only view of what the page knows (for tests and curious people).

const SUBPROTOCOL = "voicefsm.v1";
const TOKEN_PREFIX = "bearer.";
const STORAGE_KEY = "voicefsm.session";
const CAPTURE_RATE = 16000;
const CHUNK_SAMPLES = 320; // 20 ms at 16 kHz
const PLAYBACK_RATE = 24000;
const JITTER_LEAD_S = 0.12; // head start given to the first chunk of a burst
const MAX_SOCKET_BACKLOG = 64 * 1024; // bytes not yet sent (2 s of audio): drop mic audio beyond
const RECONNECT_WINDOW_MS = 60_000;
const RECONNECT_BASE_MS = 500;
const RECONNECT_CAP_MS = 8000;
const LAST_MESSAGES = 30;
const DISCARD_WAIT_MS = 5000; // how long "Start a new interview instead" waits for the old end

// Close codes (voicefsm/service.py, docs/protocol.md). Codes not listed here are unexpected
// drops (1006, 1011, 1012, 1013 "busy: retry", 4408, 4410 "reconnect", ...): the page reconnects.
// Each final close says, for a person, why the interview cannot go on: [state, sentence].
const FINAL_CLOSES = {
  4401: ["unresumable", "The server did not accept the access token."],
  4403: ["unresumable", "The server refused this connection (origin not allowed, or the interview belongs to another user)."],
  4404: ["unresumable", "This interview cannot be resumed: the server no longer has it (it ended, or the server restarted without keeping its interviews)."],
  4409: ["elsewhere", "This interview was opened in another tab or window, and goes on there."],
  4429: ["unresumable", "You already have as many interviews running as allowed; end one first."],
};
const REFUSED_TOKEN_ON_REJOIN = {
  demo: "This interview cannot be resumed: the server no longer accepts the token it was started with. Demo tokens are signed with a key that changes whenever the server restarts, so a restart ends every demo interview for its page.",
  own: "This interview cannot be resumed with this token: the server did not accept it (it may have expired, or the server's secret changed). Paste a fresh token for the same user to rejoin.",
};

const RECONNECT_REASONS = {
  1001: "The server is going away",
  1012: "The server is restarting",
  1013: "The interview is still held by another server",
  4408: "The connection went quiet",
  4410: "The server handed the interview on",
};

const STATE_LABELS = {
  idle: "not started",
  checking: "checking…",
  connecting: "connecting to the interviewer",
  live: "live",
  warning: "live — wrapping up",
  resuming: "interviewer reconnecting",
  ended: "ended",
  lost: "connection lost",
  unresumable: "cannot be resumed",
  elsewhere: "open in another tab",
};

const PHASE_LABELS = {
  idle: "idle",
  starting: "starting",
  connecting: "connecting",
  connected: "connected",
  reconnecting: "reconnecting",
  closed: "closed",
  failed: "failed",
};

const END_SUMMARIES = {
  user_ended: "You ended the interview.",
  time_limit: "The time is up.",
  disconnected: "The connection was gone for too long.",
  upstream_lost: "The interviewer could not be reached again.",
  error: "The interview stopped because of an error.",
};

// ----------------------------------------------------------------------------- debug state

const debug = {
  phase: "idle",
  phaseHistory: ["idle"],
  state: null,
  sessionId: null,
  mode: null,
  label: null,
  timeLimitS: null,
  remainingS: null,
  warning: null,
  ended: null,
  errors: [],
  closes: [],
  lastMessages: [],
  transcripts: 0,
  queuedPlayback: 0, // interviewer chunks scheduled but not played yet
  audio: { contextRate: null, captureRate: CAPTURE_RATE, playbackRate: PLAYBACK_RATE },
  counters: {
    connects: 0,
    reconnects: 0,
    messagesReceived: 0,
    audioChunksSent: 0,
    audioBytesSent: 0,
    audioChunksDropped: 0,
    audioChunksReceived: 0,
    audioBytesReceived: 0,
    audioChunksScheduled: 0,
    audioChunksPlayed: 0,
    audioChunksFlushed: 0,
    interruptions: 0,
    pings: 0,
    pongsSent: 0,
  },
};

const view = {};
for (const key of Object.keys(debug)) {
  Object.defineProperty(view, key, { enumerable: true, get: () => structuredClone(debug[key]) });
}
view.snapshot = () => structuredClone(debug);
Object.defineProperty(window, "voicefsm", { value: Object.freeze(view), enumerable: true });

function remember(direction, message) {
  debug.lastMessages.push({ direction, at: Date.now(), ...message });
  if (debug.lastMessages.length > LAST_MESSAGES) debug.lastMessages.shift();
}

// ----------------------------------------------------------------------------- elements

const $ = (id) => document.getElementById(id);
const ui = {
  mode: $("mode"),
  demoNote: $("demo-note"),
  countdown: $("countdown"),
  state: $("state"),
  phase: $("phase"),
  activity: $("activity"),
  warning: $("warning"),
  warningText: $("warning-text"),
  reconnecting: $("reconnecting"),
  reconnectingText: $("reconnecting-text"),
  ended: $("ended"),
  endSummary: $("end-summary"),
  endReason: $("end-reason"),
  endDetail: $("end-detail"),
  tokenRow: $("token-row"),
  token: $("token"),
  start: $("start"),
  end: $("end"),
  discard: $("discard"),
  paused: $("paused"),
  micLevel: $("mic-level"),
  micStatus: $("mic-status"),
  errors: $("errors"),
  errorList: $("error-list"),
  transcript: $("transcript"),
  transcriptList: $("transcript-list"),
  sessionId: $("session-id"),
  sent: $("sent"),
  received: $("received"),
  reconnects: $("reconnects"),
};

// ----------------------------------------------------------------------------- page state

const page = {
  config: null,
  token: null,
  socket: null,
  audio: null, // {context, player, capture}
  ended: false, // session_ended received
  leaving: false, // the page is unloading: a close is not a drop
  endRequested: false, // End clicked (if the socket was down, it is sent once attached again)
  joining: false, // Rejoin clicked on a paused session: the audio is starting
  discarding: null, // "Start a new interview instead": resolves once the old session is over
  reconnectSince: null,
  reconnectAttempt: 0,
  reconnectTimer: null,
  attachedOnce: false, // this socket delivered a message (so it really is attached)
  deadlineMs: null, // performance.now() at which the interview time runs out
  turnComplete: false,
};

function setPhase(phase) {
  if (debug.phase === phase) return;
  debug.phase = phase;
  debug.phaseHistory.push(phase);
  if (debug.phaseHistory.length > 50) debug.phaseHistory.shift();
  ui.phase.dataset.phase = phase;
  ui.phase.textContent = PHASE_LABELS[phase] || phase;
  ui.reconnecting.hidden = phase !== "reconnecting";
  refreshButtons();
  tick();
}

function setState(state, label) {
  debug.state = state;
  ui.state.dataset.state = state;
  ui.state.textContent = label || STATE_LABELS[state] || state;
}

// Attached to a session (or trying to) with no audio: after a refresh, until Rejoin.
function isPaused() {
  return Boolean(debug.sessionId) && !page.ended && !page.audio && debug.phase !== "starting" && debug.phase !== "failed" && debug.phase !== "idle";
}

function showError(code, message) {
  debug.errors.push({ code, message, at: Date.now() });
  if (debug.errors.length > 20) debug.errors.shift();
  const item = document.createElement("li");
  const tag = document.createElement("code");
  tag.textContent = code;
  item.append(tag, " ", message);
  ui.errorList.append(item);
  while (ui.errorList.children.length > 5) ui.errorList.firstElementChild.remove();
  ui.errors.hidden = false;
}

function refreshButtons() {
  const phase = debug.phase;
  const running = ["starting", "connecting", "connected", "reconnecting"].includes(phase);
  const paused = isPaused();
  const busy = page.joining || page.discarding !== null;
  const stored = loadStored();
  ui.start.hidden = running && !paused;
  ui.start.disabled = (running && !paused) || busy || !page.config;
  ui.start.textContent = paused || stored ? "Rejoin interview" : page.ended ? "Start a new interview" : "Start interview";
  ui.end.hidden = !running;
  ui.end.disabled = page.ended || page.endRequested || phase === "starting";
  ui.end.textContent = page.endRequested ? "Ending…" : "End interview";
  ui.token.disabled = running;
  ui.discard.hidden = !(paused || (!running && stored));
  ui.discard.disabled = busy;
  ui.discard.textContent = page.discarding !== null ? "Ending the old interview…" : "Start a new interview instead";
  ui.paused.hidden = !(paused && phase === "connected") || busy;
}

// ----------------------------------------------------------------------------- storage

function loadStored() {
  try {
    const raw = sessionStorage.getItem(STORAGE_KEY);
    const parsed = raw ? JSON.parse(raw) : null;
    return parsed && parsed.sessionId && parsed.token ? parsed : null;
  } catch {
    return null;
  }
}

function store(sessionId, token) {
  try {
    sessionStorage.setItem(STORAGE_KEY, JSON.stringify({ sessionId, token }));
  } catch {
    /* storage disabled: a refresh cannot rejoin, nothing else changes */
  }
}

function forget() {
  try {
    sessionStorage.removeItem(STORAGE_KEY);
  } catch {
    /* ignore */
  }
}

// ----------------------------------------------------------------------------- countdown

function setRemaining(seconds) {
  page.deadlineMs = performance.now() + Math.max(0, seconds) * 1000;
  ui.countdown.classList.remove("stopped");
  tick();
}

function stopCountdown() {
  page.deadlineMs = null;
  ui.countdown.classList.remove("low");
  ui.countdown.classList.add("stopped");
}

function formatClock(seconds) {
  const whole = Math.max(0, Math.ceil(seconds));
  const h = Math.floor(whole / 3600);
  const m = Math.floor((whole % 3600) / 60);
  const s = String(whole % 60).padStart(2, "0");
  return h ? `${h}:${String(m).padStart(2, "0")}:${s}` : `${m}:${s}`;
}

function describeRemaining(seconds) {
  const whole = Math.max(0, Math.round(seconds));
  if (whole >= 120) return `${Math.round(whole / 60)} minutes`;
  if (whole >= 60) return "a minute";
  return `${whole} seconds`;
}

function tick() {
  if (page.deadlineMs !== null && !page.ended) {
    const remaining = Math.max(0, (page.deadlineMs - performance.now()) / 1000);
    debug.remainingS = Math.round(remaining * 10) / 10;
    const text = formatClock(remaining);
    if (ui.countdown.textContent !== text) {
      ui.countdown.textContent = text;
      ui.countdown.dateTime = `PT${Math.ceil(remaining)}S`;
      ui.countdown.dataset.remaining = String(Math.ceil(remaining));
    }
    ui.countdown.classList.toggle("low", debug.warning !== null);
  }
  const player = page.audio && page.audio.player;
  let activity = "—";
  if (page.ended) activity = "—";
  else if (isPaused()) activity = "paused — rejoin to talk";
  else if (player && player.busy) activity = "speaking…";
  else if (debug.phase === "reconnecting") activity = "waiting for the connection";
  else if (debug.state === "resuming") activity = "reconnecting to the model…";
  else if (debug.state === "connecting") activity = "joining…";
  else if (debug.state === "live" || debug.state === "warning") activity = page.turnComplete ? "listening — your turn" : "listening";
  if (ui.activity.textContent !== activity) ui.activity.textContent = activity;
  debug.queuedPlayback = player ? player.queued : 0;
  ui.sent.textContent = String(debug.counters.audioChunksSent);
  ui.received.textContent = String(debug.counters.audioChunksReceived);
  ui.reconnects.textContent = String(debug.counters.reconnects);
}

setInterval(tick, 200);

// ----------------------------------------------------------------------------- audio

class Player {
  // Plays 24 kHz PCM chunks back to back on an AudioContext, a little ahead of time.
  constructor(context) {
    this.context = context;
    this.output = context.createGain();
    this.output.connect(context.destination);
    this.nextStart = 0;
    this.sources = new Set();
  }

  get busy() {
    return this.sources.size > 0;
  }

  get queued() {
    return this.sources.size;
  }

  enqueue(data) {
    const samples = new Int16Array(data, 0, data.byteLength >> 1);
    if (samples.length === 0) return;
    const buffer = this.context.createBuffer(1, samples.length, PLAYBACK_RATE);
    const channel = buffer.getChannelData(0);
    for (let i = 0; i < samples.length; i++) channel[i] = samples[i] / 32768;
    const source = this.context.createBufferSource();
    source.buffer = buffer;
    source.connect(this.output);
    const now = this.context.currentTime;
    if (this.nextStart < now + 0.01) this.nextStart = now + JITTER_LEAD_S; // start or underrun
    source.start(this.nextStart);
    this.nextStart += buffer.duration;
    this.sources.add(source);
    debug.counters.audioChunksScheduled++;
    source.onended = () => {
      this.sources.delete(source);
      if (!source.flushed) debug.counters.audioChunksPlayed++;
    };
  }

  flush() {
    for (const source of this.sources) {
      source.flushed = true;
      try {
        source.stop();
      } catch {
        /* not started yet in some engines; it is disconnected below */
      }
      source.disconnect();
      debug.counters.audioChunksFlushed++;
    }
    this.sources.clear();
    this.nextStart = 0;
  }
}

async function startCapture(context, onChunk) {
  const stream = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
  });
  try {
    await context.audioWorklet.addModule(new URL("capture-worklet.js", import.meta.url));
    const source = context.createMediaStreamSource(stream);
    const node = new AudioWorkletNode(context, "voicefsm-capture", {
      numberOfInputs: 1,
      numberOfOutputs: 1,
      outputChannelCount: [1],
      processorOptions: { targetRate: CAPTURE_RATE, chunkSamples: CHUNK_SAMPLES },
    });
    const sink = context.createGain(); // keeps the node pulled by the graph, silently
    sink.gain.value = 0;
    source.connect(node);
    node.connect(sink).connect(context.destination);
    node.port.onmessage = (event) => {
      if (event.data && event.data.type === "chunk") onChunk(event.data.pcm, event.data.level);
    };
    return {
      stop() {
        node.port.onmessage = null;
        source.disconnect();
        node.disconnect();
        for (const track of stream.getTracks()) track.stop();
      },
    };
  } catch (error) {
    for (const track of stream.getTracks()) track.stop();
    throw error;
  }
}

async function startAudio() {
  const AudioContextClass = window.AudioContext || window.webkitAudioContext;
  if (!AudioContextClass || !window.AudioWorkletNode || !navigator.mediaDevices) {
    throw new Error("this browser cannot record audio here (it needs AudioWorklet and a secure context: https or localhost)");
  }
  // Created inside the click handler, so the browser lets it play sound.
  const context = new AudioContextClass({ latencyHint: "interactive" });
  await context.resume();
  debug.audio.contextRate = context.sampleRate;
  const player = new Player(context);
  let capture;
  try {
    capture = await startCapture(context, onMicChunk);
  } catch (error) {
    await context.close();
    throw error;
  }
  ui.micStatus.textContent = "on";
  return { context, player, capture };
}

function stopAudio({ drain }) {
  const audio = page.audio;
  if (!audio) return;
  page.audio = null;
  audio.capture.stop();
  ui.micLevel.value = 0;
  ui.micStatus.textContent = "off";
  // Let the interviewer finish the words already queued, then release the device.
  const wait = drain ? Math.max(0, audio.player.nextStart - audio.context.currentTime) : 0;
  if (!drain) audio.player.flush();
  setTimeout(() => audio.context.close().catch(() => {}), wait * 1000 + 100);
}

function onMicChunk(pcm, level) {
  ui.micLevel.value = Math.min(1, level * 4);
  const socket = page.socket;
  if (!socket || socket.readyState !== WebSocket.OPEN || !page.attachedOnce || page.ended) {
    debug.counters.audioChunksDropped++;
    return;
  }
  if (socket.bufferedAmount > MAX_SOCKET_BACKLOG) {
    debug.counters.audioChunksDropped++; // a stalled network: keep latency bounded
    return;
  }
  socket.send(pcm);
  debug.counters.audioChunksSent++;
  debug.counters.audioBytesSent += pcm.byteLength;
}

// ----------------------------------------------------------------------------- websocket

function socketUrl(sessionId) {
  const url = new URL("interview", document.baseURI);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  url.search = "";
  if (sessionId) url.searchParams.set("session", sessionId);
  return url.toString();
}

function connect(sessionId) {
  const socket = new WebSocket(socketUrl(sessionId), [SUBPROTOCOL, TOKEN_PREFIX + page.token]);
  socket.binaryType = "arraybuffer";
  page.socket = socket;
  page.attachedOnce = false;
  debug.counters.connects++;
  if (!page.reconnectSince) setPhase("connecting");
  socket.onopen = () => {
    if (socket.protocol && socket.protocol !== SUBPROTOCOL) {
      showError("protocol", `the server chose the unknown subprotocol ${socket.protocol}`);
    }
  };
  socket.onmessage = (event) => {
    if (page.socket !== socket) return;
    if (typeof event.data !== "string") {
      if (!page.attachedOnce) attached(socket);
      onAudio(event.data);
      return;
    }
    const message = parse(event.data);
    if (!message) return;
    // An error before anything else (unknown_session, session_busy) is not an attached session.
    if (!page.attachedOnce && message.type !== "error") attached(socket);
    onMessage(message);
  };
  socket.onclose = (event) => onClose(socket, event);
  socket.onerror = () => {
    /* a close event follows with the details */
  };
}

function attached(socket) {
  page.attachedOnce = true;
  setPhase("connected");
  if (page.reconnectSince !== null) {
    if (debug.sessionId) {
      store(debug.sessionId, page.token); // the token that works now (it may be a fresh one)
      debug.counters.reconnects++;
    }
    page.reconnectSince = null;
    page.reconnectAttempt = 0;
  }
  if (page.endRequested) send(socket, { end_session: true });
}

function send(socket, message) {
  if (socket && socket.readyState === WebSocket.OPEN) {
    socket.send(JSON.stringify(message));
    remember("out", message);
    return true;
  }
  return false;
}

function onAudio(data) {
  debug.counters.audioChunksReceived++;
  debug.counters.audioBytesReceived += data.byteLength;
  page.turnComplete = false;
  if (page.audio) page.audio.player.enqueue(data);
}

function parse(text) {
  try {
    const message = JSON.parse(text);
    if (message && typeof message === "object") return message;
  } catch {
    /* reported below */
  }
  showError("bad_server_message", "the server sent something that is not a JSON object");
  return null;
}

function onMessage(message) {
  debug.counters.messagesReceived++;
  remember("in", message);
  switch (message.type) {
    case "session_created":
      debug.sessionId = message.session_id;
      debug.timeLimitS = message.time_limit_s;
      ui.sessionId.textContent = message.session_id;
      store(message.session_id, page.token);
      setRemaining(message.time_limit_s);
      break;
    case "session_state":
      setState(message.state);
      setRemaining(message.remaining_s);
      break;
    case "session_warning":
      debug.warning = { remaining_s: message.remaining_s, at: Date.now() };
      setRemaining(message.remaining_s);
      // Set once: the box is an alert, and the big clock already counts down.
      ui.warningText.textContent = `About ${describeRemaining(message.remaining_s)} left — the interviewer will wrap up.`;
      ui.warning.hidden = false;
      break;
    case "session_ended":
      onEnded(message.reason, message.detail, message.timestamp);
      break;
    case "turn_status":
      if (message.status === "interrupted") {
        debug.counters.interruptions++;
        if (page.audio) page.audio.player.flush();
        page.turnComplete = false;
      } else if (message.status === "turn_complete") {
        page.turnComplete = true;
      }
      break;
    case "error":
      showError(message.code, message.message);
      break;
    case "ping":
      debug.counters.pings++;
      if (send(page.socket, { type: "pong", seq: message.seq })) debug.counters.pongsSent++;
      break;
    case "transcript":
      addTranscript(message.role, message.text);
      break;
    default:
      break; // newer servers may say more; ignore what this page does not know
  }
}

function addTranscript(role, text) {
  debug.transcripts++;
  const item = document.createElement("li");
  item.dataset.role = role;
  const who = document.createElement("strong");
  who.textContent = role === "interviewer" ? "Interviewer" : "You";
  item.append(who, " ", text);
  ui.transcriptList.append(item);
  ui.transcript.hidden = false;
}

function onEnded(reason, detail, timestamp) {
  if (page.ended) return;
  page.ended = true;
  if (page.discarding) page.discarding.settle();
  debug.ended = { reason, detail, timestamp };
  forget();
  setState("ended");
  stopCountdown();
  ui.warning.hidden = true;
  ui.ended.hidden = false;
  ui.ended.dataset.reason = reason;
  ui.endSummary.textContent = END_SUMMARIES[reason] || "The interview ended.";
  ui.endReason.textContent = reason;
  ui.endDetail.textContent = detail || "";
  stopAudio({ drain: reason !== "user_ended" });
  refreshButtons();
  tick();
}

function onClose(socket, event) {
  debug.closes.push({ code: event.code, reason: event.reason, wasClean: event.wasClean, at: Date.now() });
  if (debug.closes.length > 20) debug.closes.shift();
  if (page.socket !== socket) return; // an old socket we replaced
  page.socket = null;
  if (page.leaving) return;
  if (page.ended) {
    setPhase("closed");
    return;
  }
  const final = FINAL_CLOSES[event.code];
  if (final) {
    let [state, sentence] = final;
    if (event.code === 4404 || event.code === 4409) forget();
    if (event.code === 4401) {
      // A demo token cannot be renewed for the same user: the stored session is lost to us.
      // With real tokens, a fresh token for the same user can still rejoin it.
      if (page.config.demo_tokens) forget();
      else ui.tokenRow.hidden = false;
      if (debug.sessionId) sentence = REFUSED_TOKEN_ON_REJOIN[page.config.demo_tokens ? "demo" : "own"];
    }
    const said = event.reason ? ` (the server said: ${event.reason})` : "";
    giveUp(String(event.code), sentence + said, debug.sessionId ? state : null);
    return;
  }
  if (!debug.sessionId) {
    // 1013 before session_created: the server is busy and started nothing; try again shortly.
    if (event.code === 1013) {
      scheduleReconnect(event);
      return;
    }
    giveUp(String(event.code), `Could not start an interview: the connection closed (${event.code}${event.reason ? ", " + event.reason : ""}).`);
    return;
  }
  scheduleReconnect(event);
}

function scheduleReconnect(event) {
  const now = Date.now();
  if (page.reconnectSince === null) page.reconnectSince = now;
  const elapsed = now - page.reconnectSince;
  if (elapsed >= RECONNECT_WINDOW_MS && !debug.sessionId) {
    giveUp("server_busy", "The server stayed too busy to start an interview for a minute. Try again later.");
    return;
  }
  if (elapsed >= RECONNECT_WINDOW_MS) {
    giveUp("reconnect_failed", "Lost the connection and could not reconnect within a minute. The server may still hold the interview for a while: try Rejoin.", "lost");
    return;
  }
  const base = Math.min(RECONNECT_CAP_MS, RECONNECT_BASE_MS * 2 ** page.reconnectAttempt);
  const delay = Math.min(base * (0.75 + Math.random() * 0.5), RECONNECT_WINDOW_MS - elapsed);
  page.reconnectAttempt++;
  setPhase("reconnecting");
  const code = event ? event.code : 0;
  const busy = code === 1013 && !debug.sessionId;
  const why = busy ? "The server is busy" : RECONNECT_REASONS[code] || `Connection lost${code ? ` (${code})` : ""}`;
  const retrying = busy ? "trying again" : "reconnecting";
  ui.reconnectingText.textContent = `${why} — ${retrying}, attempt ${page.reconnectAttempt}…`;
  if (debug.state === "checking") ui.reconnectingText.textContent = `${why} — checking on your interview, attempt ${page.reconnectAttempt}…`;
  clearTimeout(page.reconnectTimer);
  page.reconnectTimer = setTimeout(() => {
    page.reconnectTimer = null;
    if (!page.ended && !page.leaving) connect(debug.sessionId);
  }, delay);
}

// Stop trying. With a session, `state` replaces its state on the page: after a final close the
// page must not go on showing "live" beside the reason it is not.
function giveUp(code, message, state) {
  clearTimeout(page.reconnectTimer);
  page.reconnectTimer = null;
  page.reconnectSince = null;
  page.reconnectAttempt = 0;
  stopCountdown();
  if (state) {
    setState(state);
    ui.countdown.textContent = "--:--";
    ui.countdown.dataset.remaining = "";
    debug.remainingS = null;
  }
  showError(code, message);
  stopAudio({ drain: false });
  setPhase("failed");
  if (page.discarding) page.discarding.settle();
}

// ----------------------------------------------------------------------------- start / end

async function fetchToken() {
  const typed = ui.token.value.trim();
  if (typed) return typed;
  if (page.config.demo_tokens) {
    const response = await fetch(new URL("demo/token", document.baseURI), { cache: "no-store" });
    if (!response.ok) throw new Error(`the server gave no demo token (HTTP ${response.status})`);
    const body = await response.json();
    return body.token;
  }
  throw new Error("enter an access token first");
}

async function start() {
  if (isPaused()) {
    await rejoinPaused();
    return;
  }
  const stored = loadStored();
  resetForStart();
  setPhase("starting");
  try {
    page.audio = await startAudio();
    page.token = stored ? ui.token.value.trim() || stored.token : await fetchToken();
  } catch (error) {
    stopAudio({ drain: false });
    const denied = error && (error.name === "NotAllowedError" || error.name === "SecurityError");
    giveUp(denied ? "microphone" : "start", denied ? "Microphone access was refused. Allow it for this page and try again." : `Could not start: ${error.message || error}`);
    return;
  }
  if (stored) {
    debug.sessionId = stored.sessionId;
    ui.sessionId.textContent = stored.sessionId;
    page.reconnectSince = Date.now(); // a rejoin counts as a reconnect
    setPhase("reconnecting");
    ui.reconnectingText.textContent = "Rejoining your interview…";
    connect(stored.sessionId);
  } else {
    connect(null);
  }
}

function resetForStart() {
  page.ended = false;
  page.endRequested = false;
  page.turnComplete = false;
  page.deadlineMs = null;
  debug.sessionId = null;
  debug.warning = null;
  debug.ended = null;
  debug.remainingS = null;
  setState("connecting");
  ui.warning.hidden = true;
  ui.ended.hidden = true;
  ui.errors.hidden = true;
  ui.errorList.replaceChildren();
  ui.countdown.textContent = "--:--";
  ui.sessionId.textContent = "—";
}

// Rejoin a session the page is already attached to (or re-attaching to) without audio.
async function rejoinPaused() {
  page.joining = true;
  refreshButtons();
  try {
    page.audio = await startAudio();
  } catch (error) {
    const denied = error && (error.name === "NotAllowedError" || error.name === "SecurityError");
    showError(denied ? "microphone" : "start", denied ? "Microphone access was refused. Allow it for this page and try again." : `Could not start the audio: ${error.message || error}`);
  } finally {
    page.joining = false;
    refreshButtons();
    tick();
  }
}

// After a refresh: attach to the stored session at once, without audio, to learn its state.
function checkStored(stored) {
  page.token = ui.token.value.trim() || stored.token;
  debug.sessionId = stored.sessionId;
  ui.sessionId.textContent = stored.sessionId;
  setState("checking");
  ui.countdown.textContent = "--:--";
  page.reconnectSince = Date.now(); // a rejoin counts as a reconnect
  setPhase("reconnecting");
  ui.reconnectingText.textContent = "Checking on your interview…";
  connect(stored.sessionId);
}

// "Start a new interview instead": end the old session (its upstream with it), then start anew.
async function discardAndStart() {
  const stored = loadStored();
  const oldId = isPaused() ? debug.sessionId : stored ? stored.sessionId : null;
  if (oldId) {
    let settle;
    const settled = new Promise((resolve) => (settle = resolve));
    page.discarding = { settle };
    page.endRequested = true;
    refreshButtons();
    if (!send(page.socket, { end_session: true }) && !page.socket) {
      // Not attached: attach just to end it (attached() sends end_session).
      if (!page.token) page.token = ui.token.value.trim() || stored.token;
      clearTimeout(page.reconnectTimer);
      page.reconnectTimer = null;
      debug.sessionId = oldId;
      page.reconnectSince = Date.now();
      connect(oldId);
    }
    const timer = setTimeout(settle, DISCARD_WAIT_MS);
    await settled;
    clearTimeout(timer);
    page.discarding = null;
    const old = page.socket;
    page.socket = null;
    if (old) old.close(1000, "discarded"); // if it did not end in time, the grace window ends it
  }
  forget();
  clearTimeout(page.reconnectTimer);
  page.reconnectTimer = null;
  page.reconnectSince = null;
  page.reconnectAttempt = 0;
  page.ended = false;
  debug.sessionId = null;
  ui.reconnecting.hidden = true;
  await start();
}

function endInterview() {
  page.endRequested = true;
  refreshButtons();
  if (!send(page.socket, { end_session: true })) {
    ui.reconnectingText.textContent = "Will end the interview as soon as the connection is back…";
  }
}

async function loadConfig() {
  try {
    const response = await fetch(new URL("config.json", document.baseURI), { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    page.config = await response.json();
  } catch (error) {
    ui.mode.textContent = "Cannot reach the server.";
    ui.mode.dataset.mode = "error";
    showError("config", `Could not load /config.json: ${error.message || error}`);
    return;
  }
  const config = page.config;
  debug.mode = config.mode;
  debug.label = config.label;
  debug.timeLimitS = config.time_limit_s;
  ui.mode.dataset.mode = config.mode;
  if (config.mode === "fake") {
    ui.mode.textContent = "";
    const badge = document.createElement("strong");
    badge.textContent = "Demo — scripted fake interviewer, not Gemini";
    const detail = document.createElement("span");
    detail.textContent = config.label;
    ui.mode.append(badge, detail);
    ui.demoNote.hidden = false;
  } else {
    ui.mode.textContent = config.label;
  }
  ui.countdown.textContent = formatClock(config.time_limit_s);
  const params = new URLSearchParams(location.search);
  const fromUrl = params.get("token");
  if (fromUrl) {
    ui.token.value = fromUrl;
    params.delete("token"); // keep the token out of the history and of screenshots
    const query = params.toString();
    history.replaceState(null, "", location.pathname + (query ? `?${query}` : "") + location.hash);
  }
  ui.tokenRow.hidden = Boolean(config.demo_tokens) || Boolean(fromUrl);
  const stored = loadStored();
  if (stored) checkStored(stored);
  refreshButtons();
}

ui.start.addEventListener("click", () => {
  ui.reconnecting.hidden = true;
  start();
});
ui.end.addEventListener("click", endInterview);
ui.discard.addEventListener("click", discardAndStart);
window.addEventListener("online", () => {
  if (debug.phase === "reconnecting" && page.reconnectTimer !== null && !page.socket) {
    clearTimeout(page.reconnectTimer);
    page.reconnectTimer = null;
    connect(debug.sessionId);
  }
});
window.addEventListener("pagehide", () => {
  page.leaving = true; // a refresh is not the end: the server keeps the session for its grace window
  if (page.socket) page.socket.close(1000, "page closed");
});
window.addEventListener("pageshow", (event) => {
  if (!event.persisted) return; // back from the back/forward cache: pick the session up again
  page.leaving = false;
  if (debug.sessionId && !page.ended && !page.socket && debug.phase !== "failed") scheduleReconnect(null);
});

loadConfig();
