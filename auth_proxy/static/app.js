// The toolbar page: record (or pick a file) and upload through the openai SDK, or dictate live over
// the realtime WebSocket. Every call uses the key typed in; nothing is sent anywhere but this server.
import { OpenAI } from "./vendor/openai-7.57.0.min.mjs";

const $ = (id) => document.getElementById(id);
const DIARIZE = "gpt-4o-transcribe-diarize";
const keyInput = $("key"), modeSelect = $("mode"), modelSelect = $("model"), formatSelect = $("format");
const recordButton = $("record"), fileInput = $("file"), statusLine = $("status"), errorLine = $("error");
const transcript = $("transcript");

let recorder = null; // upload mode: the MediaRecorder while recording
let live = null; // live mode: {ws, ctx, stream, node, lines}

function status(text) { statusLine.textContent = text; }
function showError(text) { errorLine.textContent = text || ""; }

function client() {
  return new OpenAI({ apiKey: keyInput.value.trim(), baseURL: `${location.origin}/v1`,
                      dangerouslyAllowBrowser: true, maxRetries: 0 });
}

function explain(err) {
  if (err && err.status) {
    const message = (err.error && err.error.message) || err.message || "";
    const what = { 401: "The API key was refused", 413: "The file is too large", 429: "Over a limit",
                   503: "The server is busy or not ready" }[err.status] || `Error ${err.status}`;
    return `${what}: ${message}`;
  }
  return `Could not reach the server: ${err && err.message ? err.message : err}`;
}

function clock(seconds) {
  const m = Math.floor(seconds / 60), s = seconds - m * 60;
  return `${String(m).padStart(2, "0")}:${s.toFixed(1).padStart(4, "0")}`;
}

function line(start, end, text, partial = false) {
  const div = document.createElement("div");
  div.className = partial ? "seg partial" : "seg";
  const time = document.createElement("time");
  time.textContent = end == null ? clock(start) : `${clock(start)} – ${clock(end)}`;
  const span = document.createElement("span");
  span.textContent = text;
  div.append(time, span);
  transcript.append(div);
  return div;
}

function showResult(result) {
  transcript.textContent = "";
  if (typeof result === "string") { // srt, vtt, text
    const pre = document.createElement("pre");
    pre.textContent = result;
    transcript.append(pre);
  } else if (result.segments) {
    for (const seg of result.segments) {
      line(seg.start, seg.end, seg.speaker ? `${seg.speaker}: ${seg.text.trim()}` : seg.text.trim());
    }
  } else {
    transcript.textContent = result.text;
  }
}

async function loadModels() {
  if (!keyInput.value.trim()) return;
  try {
    const models = await client().models.list();
    const loaded = models.data.find((m) => m.loaded);
    if (loaded) {
      modelSelect.textContent = "";
      for (const id of [loaded.id, "gpt-transcribe", DIARIZE]) {
        const option = document.createElement("option");
        option.value = id;
        option.textContent = id === loaded.id ? `${id} (loaded)` : id === DIARIZE ? "who spoke when (speakers)"
          : `${id} (alias)`;
        modelSelect.append(option);
      }
    }
    showError("");
  } catch (err) {
    showError(explain(err));
  }
}

async function upload(file) {
  showError("");
  if (!keyInput.value.trim()) { showError("Type an API key first."); return; }
  status(`Transcribing ${file.name} (${Math.round(file.size / 1024)} KiB)…`);
  const started = performance.now();
  try {
    // Speakers come with diarized_json ("with times", "text only") or as [A] in subtitle cues.
    const diarize = modelSelect.value === DIARIZE;
    const format = diarize && formatSelect.value.endsWith("json") ? "diarized_json" : formatSelect.value;
    const result = await client().audio.transcriptions.create({ file, model: modelSelect.value, response_format: format });
    showResult(result);
    status(`Done in ${((performance.now() - started) / 1000).toFixed(1)} s.`);
  } catch (err) {
    status("");
    showError(explain(err));
  }
}

async function startUpload() {
  const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  const chunks = [];
  recorder = new MediaRecorder(stream);
  recorder.ondataavailable = (e) => { if (e.data.size) chunks.push(e.data); };
  recorder.onstop = () => {
    stream.getTracks().forEach((t) => t.stop());
    const type = recorder.mimeType || "audio/webm";
    recorder = null;
    upload(new File(chunks, `recording.${type.includes("ogg") ? "ogg" : "webm"}`, { type }));
  };
  recorder.start(250);
  status("Recording… press Stop to transcribe.");
}

function base64(buffer) {
  const bytes = new Uint8Array(buffer);
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(text);
}

async function startLive() {
  if (modelSelect.value === DIARIZE) {
    showError("Who spoke when works on uploads (record, then upload, or a file), not live.");
    return;
  }
  const key = keyInput.value.trim();
  const url = `${location.origin.replace(/^http/, "ws")}/v1/realtime?intent=transcription`;
  const ws = new WebSocket(url, ["realtime", `openai-insecure-api-key.${key}`]);
  const session = { ws, lines: new Map(), refused: null, open: 0 };
  live = session;
  transcript.textContent = "";
  ws.onmessage = (message) => {
    const event = JSON.parse(message.data);
    const item = event.item_id;
    switch (event.type) {
      case "input_audio_buffer.speech_started":
        session.open += 1;
        session.lines.set(item, { div: line(event.audio_start_ms / 1000, null, "…", true),
                                  start: event.audio_start_ms / 1000, text: "" });
        break;
      case "input_audio_buffer.speech_stopped": {
        const turn = session.lines.get(item);
        if (turn) turn.end = event.audio_end_ms / 1000;
        break;
      }
      case "conversation.item.input_audio_transcription.delta": {
        const turn = session.lines.get(item);
        if (turn) { turn.text += event.delta; turn.div.lastChild.textContent = turn.text; }
        break;
      }
      case "conversation.item.input_audio_transcription.completed": {
        const turn = session.lines.get(item);
        const div = line(turn ? turn.start : 0, turn ? turn.end : null, event.transcript);
        if (turn) turn.div.replaceWith(div);
        session.open -= 1;
        if (session.stopping && session.open <= 0) ws.close();
        break;
      }
      case "error":
        if (event.error.code === "live_text_unavailable") { // the bridge is full: text at each pause only
          status(event.error.message);
          break;
        }
        session.refused = event.error.message;
        showError(event.error.code === "invalid_api_key" ? `The API key was refused: ${event.error.message}`
                  : event.error.message);
        break;
      default:
        break;
    }
  };
  ws.onclose = (e) => {
    stopAudio(session);
    if (live === session) live = null;
    recordButton.textContent = "Record";
    recordButton.classList.remove("on");
    if (!session.refused && e.code !== 1000 && e.code !== 1005) showError(`The live session ended (code ${e.code}).`);
    status(session.refused ? "The live session was refused." : "Live session ended.");
  };
  await new Promise((resolve, reject) => {
    ws.onopen = resolve;
    ws.onerror = () => reject(new Error("the live connection failed"));
  });
  ws.send(JSON.stringify({ type: "session.update", session: { type: "transcription", audio: { input: {
    // gpt-live-transcribe (an alias of the loaded model, which is all a live session can use):
    // words show while the person talks, at the pace the bridge chooses for its engine
    format: { type: "audio/pcm", rate: 24000 }, transcription: { model: "gpt-live-transcribe" },
    turn_detection: { type: "server_vad", threshold: 0.5, prefix_padding_ms: 300, silence_duration_ms: 500 },
  } } } }));
  session.stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1 } });
  session.ctx = new AudioContext({ sampleRate: 24000 });
  await session.ctx.resume(); // created after awaits: it may start suspended
  await session.ctx.audioWorklet.addModule("/static/pcm-worklet.js");
  const source = session.ctx.createMediaStreamSource(session.stream);
  session.node = new AudioWorkletNode(session.ctx, "pcm16");
  session.node.port.onmessage = (e) => {
    if (ws.readyState === WebSocket.OPEN) {
      ws.send(JSON.stringify({ type: "input_audio_buffer.append", audio: base64(e.data) }));
    }
  };
  source.connect(session.node);
  session.node.connect(session.ctx.destination); // pulls the graph; the node itself outputs silence
  if (ws.readyState !== WebSocket.OPEN) { // refused (wrong key, a limit) while the microphone started
    stopAudio(session);
    return false;
  }
  status("Listening… words appear as you speak (grey until the pause that ends the line). Press Stop to end.");
  return true;
}

function stopAudio(session) {
  if (session.stream) session.stream.getTracks().forEach((t) => t.stop());
  if (session.ctx && session.ctx.state !== "closed") session.ctx.close();
  session.stream = null;
}

function stopLive() {
  const session = live;
  stopAudio(session);
  session.stopping = true;
  if (session.open > 0 && session.ws.readyState === WebSocket.OPEN) {
    session.ws.send(JSON.stringify({ type: "input_audio_buffer.commit" })); // the turn in progress
    setTimeout(() => session.ws.close(), 15000);
  } else {
    session.ws.close();
  }
  status("Finishing…");
}

recordButton.addEventListener("click", async () => {
  showError("");
  if (recorder) { recorder.stop(); recordButton.textContent = "Record"; recordButton.classList.remove("on"); return; }
  if (live) { stopLive(); return; }
  if (!keyInput.value.trim()) { showError("Type an API key first."); return; }
  try {
    const running = modeSelect.value === "live" ? await startLive() : (await startUpload(), true);
    if (running) {
      recordButton.textContent = "Stop";
      recordButton.classList.add("on");
    }
  } catch (err) {
    if (live) { try { live.ws.close(); } catch (_) { /* already closed */ } live = null; }
    if (!errorLine.textContent) showError(`Could not start: ${err.message || err}`);
  }
});

fileInput.addEventListener("change", () => { if (fileInput.files[0]) upload(fileInput.files[0]); });
keyInput.addEventListener("change", loadModels);
