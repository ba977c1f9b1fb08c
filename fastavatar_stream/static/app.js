// The page: camera -> WebRTC (POST /offer) -> daemon session; avatar versions back on a data channel,
// applied to an AvatarState and drawn by the splat viewer (loaded only when its modules are installed).
// Live animation: the avatar's rig arrives on the same channel, motions on an unordered, no-retransmit "motion"
// channel; they pass a small jitter buffer and pose the avatar on the GPU every frame (animation.js, viewer.js).

import { AvatarState, Reassembler, WireError, decodeMessage } from "/static/wire.js";
import { avatarToPly } from "/static/ply.js";
import { JitterBuffer, Rig, decodeMotion, poseOf, poseTextures } from "/static/animation.js";

const $ = (id) => document.getElementById(id);
const ui = {
  status: $("status"), start: $("start"), download: $("download"), preview: $("preview"), message: $("message"),
  frames: $("frames"), windows: $("windows"), gaussians: $("gaussians"), version: $("version"), latency: $("latency"),
  view: $("view"), poseLatency: $("pose-latency"),
};

// Read by tests and benchmarks (headless browser): what the page has seen so far.
const live = (window.fastavatar = {
  state: "starting", session: null, versions: 0, snapshots: 0, deltas: 0, gaps: 0, errors: [],
  latencies: [], lastVersion: -1, gaussians: 0, viewer: "loading", stats: {},
  rigs: 0, rigsShown: 0, rigVersion: -1, motions: 0, motionErrors: 0, posesShown: 0, poseLatencies: [], motionLatencies: [],
  shownFrames: [], jitter: {},
});

const avatar = new AvatarState();
const reassembler = new Reassembler();
let viewer = null;
let pc = null;
let channel = null;
let rig = null;
const jitter = new JitterBuffer();
let origin = null; // the first motion's translation: the head stays in view while it moves relative to it
let heldPose = null; // set by tests: show this pose instead of the live one
let shown = null;

function animate() {
  const pose = heldPose || jitter.sample(Date.now());
  if (!pose || !viewer || !rig || pose === shown) return;
  shown = pose;
  viewer.showPose({ ...pose, translation: pose.translation.map((v, i) => v - (origin ? origin[i] : 0)) });
  live.posesShown++;
  live.jitter = { ...jitter.stats, delay: jitter.delay };
  if (heldPose) return;
  const ms = Date.now() - pose.t_capture * 1000;
  live.poseLatencies.push(ms);
  if (live.poseLatencies.length > 1000) live.poseLatencies.shift();
  live.shownFrames.push(pose.frame);
  if (live.shownFrames.length > 1000) live.shownFrames.shift();
  if (live.posesShown % 10 === 1) ui.poseLatency.textContent = `${ms.toFixed(0)} ms`;
}

// A rig rebuilds the animated mesh (every splat packed, new textures and modifier). On a slow machine that holds
// the page's main thread long enough to delay motions and drawing, so the page takes a rig at most once per
// RIG_GAP_FACTOR times what the last one cost (and RIG_MIN_GAP_MS apart): the newest waits, older ones are dropped.
const RIG_MIN_GAP_MS = 1000, RIG_GAP_FACTOR = 10;
let pendingRig = null, rigTimer = null, nextRigAt = 0;

function onRig(msg) {
  live.rigs++;
  pendingRig = msg;
  if (rigTimer === null) rigTimer = setTimeout(applyRig, Math.max(0, nextRigAt - performance.now()));
}

function applyRig() {
  rigTimer = null;
  const t0 = performance.now();
  rig = new Rig(pendingRig);
  pendingRig = null;
  live.rigVersion = rig.version;
  live.rigsShown++;
  if (viewer) viewer.setRig(rig);
  nextRigAt = performance.now() + Math.max(RIG_MIN_GAP_MS, RIG_GAP_FACTOR * (performance.now() - t0));
}

function onMotion(data) {
  let motion;
  try {
    motion = decodeMotion(data);
  } catch (err) {
    if (!(err instanceof WireError)) throw err;
    live.motionErrors++;
    return;
  }
  live.motions++;
  live.motionLatencies.push(Date.now() - motion.t_capture * 1000);
  if (live.motionLatencies.length > 1000) live.motionLatencies.shift();
  if (!origin) origin = Array.from(motion.pose.slice(15, 18));
  jitter.push(motion, Date.now());
}

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
    viewer.beforeRender = animate;
    live.viewer = "ready";
    if (rig) viewer.setRig(rig);
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
    if (msg.type === "rig") { onRig(msg); return; }
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
    // capture -> tracked until the avatar animates; then the page shows capture -> pose on screen (showPose)
    if (body.pose_latency_ms != null && live.posesShown === 0) {
      ui.poseLatency.textContent = `${body.pose_latency_ms.toFixed(0)} ms`;
    }
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
  const motionChannel = pc.createDataChannel("motion", { ordered: false, maxRetransmits: 0 });
  motionChannel.binaryType = "arraybuffer";
  motionChannel.onmessage = (ev) => { if (typeof ev.data !== "string") onMotion(ev.data); };
  pc.onconnectionstatechange = () => {
    if (pc.connectionState === "failed" || pc.connectionState === "disconnected") {
      setStatus(pc.connectionState, "error");
      ui.start.hidden = false;
    }
  };
  try {
    await pc.setLocalDescription(await pc.createOffer());
    await waitForIce(pc, 3000);
    // a daemon started with --token needs it on every offer; the page was opened as /?token=...
    const token = new URLSearchParams(location.search).get("token");
    const headers = { "Content-Type": "application/json" };
    if (token) headers["X-Fastavatar-Token"] = token;
    const resp = await fetch("/offer", {
      method: "POST", headers,
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
// Tests: show the newest pose with some joints replaced ({jaw: [x, y, z], ...} axis-angle), or the live one again.
window.fastavatar.holdPose = (joints = {}) => {
  const names = ["rotation", "neck", "jaw", "leftEye", "rightEye"];
  const base = shown || poseOf({ frame: 0, t_capture: 0, expression: new Float32Array(0), pose: new Float32Array(18) });
  const axisAngle = (v) => poseOf({ frame: 0, t_capture: 0, expression: [], pose: Float32Array.from([...v, ...new Array(15).fill(0)]) }).joints[0];
  heldPose = { ...base, joints: base.joints.map((q, j) => (names[j] in joints ? axisAngle(joints[names[j]]) : q)) };
  shown = null;
};
// Tests: the CPU half of posing for a motion ({pose: 18 numbers, expression}) with the rig held now.
window.fastavatar.poseInputs = ({ pose, expression }) => {
  const anchorOffset = new Float32Array(4 * rig.A), joints = new Float32Array(16 * 5);
  poseTextures(rig, poseOf({ frame: 0, t_capture: 0, expression: Float32Array.from(expression), pose: Float32Array.from(pose) }),
    anchorOffset, joints);
  return { rigVersion: rig.version, anchorOffset: Array.from(anchorOffset), joints: Array.from(joints) };
};
window.fastavatar.releasePose = () => { heldPose = null; shown = null; };
// Tests and benchmarks: the viewer's frame counter and splat counts (null until the viewer is up).
window.fastavatar.renderStats = () => viewer?.renderStats() ?? null;

loadViewer();
start();
