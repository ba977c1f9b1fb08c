// Live animation in the page: the avatar's rig (a "rig" wire message, protocols/wire.py), the per-frame motion
// messages (protocols/animation.py), a small jitter buffer, and the CPU half of posing: per-anchor expression
// offsets and the 5 FLAME joint transforms. The GPU half (per-splat linear blend skinning) is viewer.js's
// Spark dyno modifier. Same maths as protocols.animation.pose.

import { WireError, unpackMsgpack } from "/static/wire.js";

export const JOINTS = 5;
const MAX_MOTION_BYTES = 512;
const MAX_EXPRESSION = 100;
const POSE_FLOATS = 18;
const MOTION_KEYS = ["v", "type", "session", "frame", "t_capture", "t_publish", "shape_version", "expression_dtype",
  "expression", "pose"];

export function halfToFloat(h) {
  const sign = h & 0x8000 ? -1 : 1, exp = (h >> 10) & 0x1f, frac = h & 0x3ff;
  if (exp === 0) return sign * 2 ** -14 * (frac / 1024);
  if (exp === 31) return frac ? NaN : sign * Infinity;
  return sign * 2 ** (exp - 15) * (1 + frac / 1024);
}

function floats(a) {
  if (a.dtype === "float32") return a.data;
  if (a.dtype === "float16") return Float32Array.from(a.data, halfToFloat);
  throw new WireError(`expected float32/float16, got ${a.dtype}`);
}

function littleEndianFloats(bytes, dtype) {
  const n = bytes.length / (dtype === "float16" ? 2 : 4);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = dtype === "float16" ? halfToFloat(view.getUint16(2 * i, true)) : view.getFloat32(4 * i, true);
  return out;
}

// One motion channel message (ArrayBuffer) -> {session, frame, t_capture, t_publish, shape_version, expression,
// pose (18: rotation, neck, jaw, left eye, right eye, translation)}; WireError when it is malformed.
export function decodeMotion(buffer) {
  const bytes = new Uint8Array(buffer);
  if (bytes.length > MAX_MOTION_BYTES) throw new WireError(`motion of ${bytes.length} bytes`);
  const m = unpackMsgpack(bytes);
  if (!m || typeof m !== "object" || Array.isArray(m)) throw new WireError("motion must be a map");
  const keys = Object.keys(m);
  if (keys.length !== MOTION_KEYS.length || MOTION_KEYS.some((k) => !(k in m))) throw new WireError("motion keys");
  if (m.v !== 1 || m.type !== "motion") throw new WireError("not a v1 motion");
  for (const k of ["frame", "shape_version"]) if (!Number.isInteger(m[k]) || m[k] < 0) throw new WireError(`motion ${k}`);
  for (const k of ["t_capture", "t_publish"]) if (!Number.isFinite(m[k])) throw new WireError(`motion ${k}`);
  if (m.expression_dtype !== "float32" && m.expression_dtype !== "float16") throw new WireError("motion dtype");
  const size = m.expression_dtype === "float16" ? 2 : 4;
  if (!(m.expression instanceof Uint8Array) || m.expression.length % size || m.expression.length / size > MAX_EXPRESSION) {
    throw new WireError("motion expression");
  }
  if (!(m.pose instanceof Uint8Array) || m.pose.length !== 4 * POSE_FLOATS) throw new WireError("motion pose");
  const motion = {
    session: m.session, frame: m.frame, t_capture: m.t_capture, t_publish: m.t_publish, shape_version: m.shape_version,
    expression: littleEndianFloats(m.expression, m.expression_dtype), pose: littleEndianFloats(m.pose, "float32"),
  };
  if (![...motion.expression, ...motion.pose].every(Number.isFinite)) throw new WireError("motion non-finite");
  return motion;
}

// A decoded "rig" message, checked: M Gaussians over A anchors, 5 joints, E expression coefficients.
export class Rig {
  constructor(msg) {
    const a = msg.arrays;
    const need = (name, dims) => {
      const x = a[name];
      if (!x || x.shape.length !== dims.length || x.shape.some((s, i) => dims[i] !== undefined && s !== dims[i])) {
        throw new WireError(`rig ${name} has shape ${x ? x.shape : "none"}`);
      }
      return x;
    };
    this.session = msg.session;
    this.version = msg.version;
    this.shapeVersion = msg.stats.shape_version;
    this.M = need("ids", [undefined]).shape[0];
    this.A = need("anchor_rest", [undefined, 3]).shape[0];
    this.E = need("anchor_expression", [this.A, 3, undefined]).shape[2];
    this.anchor = need("anchor", [this.M]).data;
    this.offset = floats(need("offset", [this.M, 3]));
    this.rotation = floats(need("rotation", [this.M, 4])); // wxyz
    this.scales = floats(need("scales", [this.M, 3]));
    this.opacities = floats(need("opacities", [this.M]));
    this.colors = floats(need("colors", [this.M, 3]));
    this.anchorRest = floats(a.anchor_rest);
    this.anchorExpression = floats(a.anchor_expression);
    this.anchorWeights = floats(need("anchor_weights", [this.A, JOINTS]));
    this.jointRest = floats(need("joint_rest", [JOINTS, 3]));
    this.jointExpression = floats(need("joint_expression", [JOINTS, 3, this.E]));
    this.parents = need("parents", [JOINTS]).data;
    if (a.anchor.dtype !== "uint32" || this.anchor.some((i) => i >= this.A)) throw new WireError("rig anchor index");
    if (this.parents[0] !== -1 || [...this.parents].slice(1).some((p, j) => p < 0 || p > j)) throw new WireError("rig parents");
  }
}

// ----- quaternions (xyzw) ------------------------------------------------------------------------------
function quatFromAxisAngle(x, y, z) {
  const angle = Math.hypot(x, y, z);
  if (angle < 1e-12) return [0, 0, 0, 1];
  const s = Math.sin(angle / 2) / angle;
  return [x * s, y * s, z * s, Math.cos(angle / 2)];
}

function quatMul(a, b) {
  return [a[3] * b[0] + b[3] * a[0] + a[1] * b[2] - a[2] * b[1], a[3] * b[1] + b[3] * a[1] + a[2] * b[0] - a[0] * b[2],
    a[3] * b[2] + b[3] * a[2] + a[0] * b[1] - a[1] * b[0], a[3] * b[3] - a[0] * b[0] - a[1] * b[1] - a[2] * b[2]];
}

function nlerp(a, b, t) {
  const s = a[0] * b[0] + a[1] * b[1] + a[2] * b[2] + a[3] * b[3] < 0 ? -1 : 1;
  const q = a.map((v, i) => (1 - t) * v + t * s * b[i]);
  const n = Math.hypot(...q) || 1;
  return q.map((v) => v / n);
}

function quatToMatrix([x, y, z, w]) { // row-major 3x3
  return [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
    2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
    2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)];
}

// A motion as what the pose needs: expression, joint quaternions, translation (so poses can be interpolated).
export function poseOf(motion) {
  const p = motion.pose;
  const joints = [];
  for (let j = 0; j < JOINTS; j++) joints.push(quatFromAxisAngle(p[3 * j], p[3 * j + 1], p[3 * j + 2]));
  return { frame: motion.frame, t_capture: motion.t_capture, expression: motion.expression, joints,
    translation: [p[15], p[16], p[17]] };
}

export function interpolatePose(a, b, t) {
  const n = Math.max(a.expression.length, b.expression.length);
  const expression = new Float32Array(n);
  for (let i = 0; i < n; i++) expression[i] = (1 - t) * (a.expression[i] || 0) + t * (b.expression[i] || 0);
  return { frame: t < 0.5 ? a.frame : b.frame, t_capture: (1 - t) * a.t_capture + t * b.t_capture, expression,
    joints: a.joints.map((q, j) => nlerp(q, b.joints[j], t)),
    translation: a.translation.map((v, i) => (1 - t) * v + t * b.translation[i]) };
}

// The per-frame textures of a pose: anchor offsets (A x vec4: expression displacement) and joints
// (JOINTS x 4 texels: the three rows [R | t] of the relative transform, then its rotation quaternion xyzw).
export function poseTextures(rig, pose, anchorOffset, joints) {
  const E = rig.E, psi = pose.expression, n = Math.min(E, psi.length);
  for (let a = 0; a < rig.A; a++) {
    for (let d = 0; d < 3; d++) {
      let sum = 0;
      const base = (3 * a + d) * E;
      for (let k = 0; k < n; k++) sum += rig.anchorExpression[base + k] * psi[k];
      anchorOffset[4 * a + d] = sum;
    }
  }
  const rest = [];
  for (let j = 0; j < JOINTS; j++) {
    const r = [0, 1, 2].map((d) => {
      let v = rig.jointRest[3 * j + d];
      for (let k = 0; k < n; k++) v += rig.jointExpression[(3 * j + d) * E + k] * psi[k];
      return v;
    });
    rest.push(r);
  }
  const worldQ = [], worldT = [];
  for (let j = 0; j < JOINTS; j++) {
    const parent = rig.parents[j];
    const rel = parent < 0 ? rest[j] : rest[j].map((v, d) => v - rest[parent][d]);
    if (parent < 0) {
      worldQ.push(pose.joints[j]);
      worldT.push(rel);
    } else {
      const R = quatToMatrix(worldQ[parent]), t = worldT[parent];
      worldQ.push(quatMul(worldQ[parent], pose.joints[j]));
      worldT.push([0, 1, 2].map((r) => R[3 * r] * rel[0] + R[3 * r + 1] * rel[1] + R[3 * r + 2] * rel[2] + t[r]));
    }
  }
  const q0 = worldQ[0];
  for (let j = 0; j < JOINTS; j++) {
    const R = quatToMatrix(worldQ[j]);
    for (let r = 0; r < 3; r++) {
      const moved = R[3 * r] * rest[j][0] + R[3 * r + 1] * rest[j][1] + R[3 * r + 2] * rest[j][2];
      joints.set([R[3 * r], R[3 * r + 1], R[3 * r + 2], worldT[j][r] - moved + pose.translation[r]], 16 * j + 4 * r);
    }
    const q = worldQ[j], s = q[0] * q0[0] + q[1] * q0[1] + q[2] * q0[2] + q[3] * q0[3] < 0 ? -1 : 1;
    joints.set(q.map((v) => s * v), 16 * j + 12);
  }
}

// ----- jitter buffer -----------------------------------------------------------------------------------
// Motions wait `delay` ms (adapted to the arrival jitter, 50..500 ms) and are shown interpolated on the capture
// clock; a late or reordered motion older than what is shown is dropped, a missing one is interpolated over,
// and when nothing newer has arrived the last pose is held. Never steps back.
export class JitterBuffer {
  constructor({ minDelay = 50, maxDelay = 500, window = 64 } = {}) {
    this.minDelay = minDelay;
    this.maxDelay = maxDelay;
    this.window = window;
    this.entries = []; // sorted by frame
    this.transit = []; // recent (received - captured) ms
    this.delay = 100;
    this.shown = null;
    this.stats = { received: 0, late: 0, duplicates: 0, underruns: 0, reordered: 0 };
    this.lastReceivedFrame = -1;
  }

  push(motion, receivedMs) {
    this.stats.received++;
    const pose = poseOf(motion);
    if (motion.frame < this.lastReceivedFrame) this.stats.reordered++;
    this.lastReceivedFrame = Math.max(this.lastReceivedFrame, motion.frame);
    if (this.shown && motion.frame <= this.shown.frame) { this.stats.late++; return; }
    if (this.entries.some((e) => e.frame === motion.frame)) { this.stats.duplicates++; return; }
    this.entries.push(pose);
    this.entries.sort((a, b) => a.frame - b.frame);
    this.transit.push(receivedMs - motion.t_capture * 1000);
    if (this.transit.length > this.window) this.transit.shift();
    const sorted = [...this.transit].sort((a, b) => a - b);
    const jitter = sorted[Math.floor(0.95 * (sorted.length - 1))] - sorted[0];
    this.delay = Math.min(this.maxDelay, Math.max(this.minDelay, 1.5 * jitter + 20));
  }

  // The pose to show at local time nowMs (null before the first motion).
  sample(nowMs) {
    if (!this.entries.length) return this.shown;
    const offset = Math.min(...this.transit);
    const target = (nowMs - offset - this.delay) / 1000; // on the capture clock, seconds
    let i = 0;
    while (i + 1 < this.entries.length && this.entries[i + 1].t_capture <= target) i++;
    const a = this.entries[i], b = this.entries[i + 1];
    let pose;
    if (a.t_capture > target) pose = this.shown || a; // not due yet: hold (or start with the first)
    else if (b) pose = interpolatePose(a, b, (target - a.t_capture) / Math.max(b.t_capture - a.t_capture, 1e-6));
    else { pose = a; this.stats.underruns++; }
    this.entries.splice(0, i); // keep `a`: the next interpolation may still start there
    if (!this.shown || pose.t_capture >= this.shown.t_capture) this.shown = pose;
    return this.shown;
  }
}
