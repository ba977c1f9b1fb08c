// The page: camera -> WebRTC (POST /offer) -> daemon session; avatar versions back on a data channel,
// applied to an AvatarState and drawn by the splat viewer (loaded only when its modules are installed).

import { AvatarState, Reassembler, WireError, decodeMessage } from "/static/wire.js";
import { avatarToPly } from "/static/ply.js";

const $ = (id) => document.getElementById(id);
const ui = {
  status: $("status"), start: $("start"), download: $("download"), preview: $("preview"), message: $("message"),
  frames: $("frames"), windows: $("windows"), gaussians: $("gaussians"), version: $("version"), latency: $("latency"),
  poseLatency: $("pose-latency"), view: $("view"),
};

// Read by tests and benchmarks (headless browser): what the page has seen so far.
const live = (window.fastavatar = {
  state: "starting", session: null, versions: 0, snapshots: 0, deltas: 0, gaps: 0, errors: [],
  latencies: [], lastVersion: -1, gaussians: 0, viewer: "loading", stats: {},
});

const avatar = new AvatarState();
const reassembler = new Reassembler();
let viewer = null;
let pc = null;
let channel = null;

function setStatus(text, kind) {
  live.state = text;
  ui.status.textContent = text;
  ui.status.className = `status ${kind}`;
}

function say(text) { ui.message.textContent = text; }

async function loadViewer() {
  try {
    const status = await (await fetch("/vendor/status")).json();
    if (!status.ok) throw new Error(`missing ${status.missing.join(", ")}. ${status.hint}`);
    const { AvatarViewer } = await import("/static/viewer.js");
    ui.view.querySelector(".hint")?.remove();
    viewer = new AvatarViewer(ui.view);
    live.viewer = "ready";
    if (avatar.version >= 0) viewer.update(avatar, { snapshot: true, ranges: [], retired: [] });
  } catch (err) {
    live.viewer = `unavailable: ${err.message}`;
    ui.view.innerHTML = `<p class="hint">3D view unavailable: ${err.message}</p>`;
  }
}

function waitForIce(peer, ms) {
  if (peer.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { if (peer.iceGatheringState === "complete") { peer.removeEventListener("icegatheringstatechange", done); resolve(); } };
    peer.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, ms); // the server does not trickle: send what was gathered by then
  });
}

function onBinary(data) {
  let frames;
  try {
    frames = reassembler.feed(data);
    if (!frames) return;
    const msg = decodeMessage(frames);
    const change = avatar.apply(msg);
    live.versions++;
    msg.type === "snapshot" ? live.snapshots++ : live.deltas++;
    live.lastVersion = avatar.version;
    live.session = msg.session;
    live.gaussians = avatar.live;
    if (viewer) viewer.update(avatar, change);
    if (msg.t_capture > 0) {
      const ms = Date.now() - msg.t_capture * 1000;
      live.latencies.push(ms);
      ui.latency.textContent = `${ms.toFixed(0)} ms`;
    }
    ui.version.textContent = String(avatar.version);
    ui.gaussians.textContent = String(avatar.live);
    ui.download.disabled = avatar.live === 0;
  } catch (err) {
    if (!(err instanceof WireError)) throw err;
    live.gaps++;
    live.errors.push(err.message);
    if (channel?.readyState === "open") channel.send(JSON.stringify({ type: "snapshot" }));
  }
}

function onText(text) {
  let body;
  try { body = JSON.parse(text); } catch { return; }
  if (body.type === "stats") {
    live.stats = body;
    // frames the daemon tracked (what the avatar is built from), not frames the relay merely received
    const frames = body.frames_tracked ?? body.frames;
    if (frames !== undefined) ui.frames.textContent = String(frames);
    if (body.pose_latency_ms != null) ui.poseLatency.textContent = `${body.pose_latency_ms.toFixed(0)} ms`;
    if (body.windows !== undefined) ui.windows.textContent = String(body.windows);
    if (body.gaussians !== undefined && avatar.version < 0) ui.gaussians.textContent = String(body.gaussians);
  } else if (body.type === "error") {
    live.errors.push(body.error);
    say(`server: ${body.error}`);
  }
}

async function start() {
  ui.start.hidden = true;
  setStatus("camera", "busy");
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ video: { width: { ideal: 640 }, height: { ideal: 480 } }, audio: false });
  } catch (err) {
    setStatus("no camera", "error");
    say(`The camera is not available (${err.name}: ${err.message}). Allow camera access and press Start.`);
    ui.start.hidden = false;
    return;
  }
  ui.preview.srcObject = stream;
  setStatus("connecting", "busy");
  pc = new RTCPeerConnection({ iceServers: [] });
  pc.addTransceiver(stream.getVideoTracks()[0], { direction: "sendonly", streams: [stream] });
  channel = pc.createDataChannel("avatar", { ordered: true });
  channel.binaryType = "arraybuffer";
  channel.onmessage = (ev) => (typeof ev.data === "string" ? onText(ev.data) : onBinary(ev.data));
  channel.onopen = () => setStatus("connected", "ok");
  channel.onclose = () => setStatus("closed", "error");
  pc.onconnectionstatechange = () => {
    if (pc.connectionState === "failed" || pc.connectionState === "disconnected") {
      setStatus(pc.connectionState, "error");
      ui.start.hidden = false;
    }
  };
  try {
    await pc.setLocalDescription(await pc.createOffer());
    await waitForIce(pc, 3000);
    const resp = await fetch("/offer", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ type: pc.localDescription.type, sdp: pc.localDescription.sdp }),
    });
    const answer = await resp.json();
    if (!resp.ok) throw new Error(answer.error || `HTTP ${resp.status}`);
    live.session = answer.session;
    await pc.setRemoteDescription({ type: answer.type, sdp: answer.sdp });
  } catch (err) {
    setStatus("refused", "error");
    say(`Signaling failed: ${err.message}`);
    stream.getTracks().forEach((t) => t.stop());
    pc.close();
    ui.start.hidden = false;
  }
}

ui.start.addEventListener("click", start);
ui.download.addEventListener("click", () => {
  const url = URL.createObjectURL(avatarToPly(avatar));
  const a = Object.assign(document.createElement("a"), { href: url, download: `avatar-v${avatar.version}.ply` });
  a.click();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
});
window.fastavatar.plyBytes = async () => new Uint8Array(await avatarToPly(avatar).arrayBuffer());

loadViewer();
start();
