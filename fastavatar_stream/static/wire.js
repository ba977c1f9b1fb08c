// Avatar wire protocol in the browser: chunk reassembly (protocols/chunking.py), message decoding
// (protocols/wire.py: msgpack header + raw little-endian buffers) and the slot buffer that applies
// snapshots and deltas (protocols/avatar_buffer.py). Every length is checked before it is trusted.

const CHUNK_HEADER = 16;
const MAX_PENDING = 4;
const MAX_MESSAGE_BYTES = 512 * 1024 * 1024;
const MAX_ARRAYS = 32;

export class WireError extends Error {}

// ----- msgpack (the subset a header uses: maps, arrays, strings, ints, floats, bool, nil, bin) -----
export function unpackMsgpack(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const text = new TextDecoder("utf-8", { fatal: true });
  let pos = 0;
  const need = (n) => {
    if (pos + n > bytes.length) throw new WireError("header msgpack is truncated");
  };
  const str = (n) => { need(n); const s = text.decode(bytes.subarray(pos, pos + n)); pos += n; return s; };
  const bin = (n) => { need(n); const b = bytes.slice(pos, pos + n); pos += n; return b; };
  const arr = (n, depth) => { const out = []; for (let i = 0; i < n; i++) out.push(read(depth)); return out; };
  const map = (n, depth) => {
    const out = {};
    for (let i = 0; i < n; i++) {
      const key = read(depth);
      if (typeof key !== "string") throw new WireError("header map keys must be strings");
      out[key] = read(depth);
    }
    return out;
  };
  const u = (n) => { need(n); const v = n === 1 ? view.getUint8(pos) : n === 2 ? view.getUint16(pos) : view.getUint32(pos); pos += n; return v; };
  const big = (signed) => {
    need(8);
    const v = signed ? view.getBigInt64(pos) : view.getBigUint64(pos);
    pos += 8;
    if (v > BigInt(Number.MAX_SAFE_INTEGER) || v < -BigInt(Number.MAX_SAFE_INTEGER)) throw new WireError("integer too large");
    return Number(v);
  };
  function read(depth) {
    if (depth > 16) throw new WireError("header nesting too deep");
    need(1);
    const t = bytes[pos++];
    if (t <= 0x7f) return t;
    if (t >= 0xe0) return t - 0x100;
    if ((t & 0xf0) === 0x80) return map(t & 0x0f, depth + 1);
    if ((t & 0xf0) === 0x90) return arr(t & 0x0f, depth + 1);
    if ((t & 0xe0) === 0xa0) return str(t & 0x1f);
    switch (t) {
      case 0xc0: return null;
      case 0xc2: return false;
      case 0xc3: return true;
      case 0xc4: return bin(u(1));
      case 0xc5: return bin(u(2));
      case 0xc6: return bin(u(4));
      case 0xca: { need(4); const v = view.getFloat32(pos); pos += 4; return v; }
      case 0xcb: { need(8); const v = view.getFloat64(pos); pos += 8; return v; }
      case 0xcc: return u(1);
      case 0xcd: return u(2);
      case 0xce: return u(4);
      case 0xcf: return big(false);
      case 0xd0: { need(1); const v = view.getInt8(pos); pos += 1; return v; }
      case 0xd1: { need(2); const v = view.getInt16(pos); pos += 2; return v; }
      case 0xd2: { need(4); const v = view.getInt32(pos); pos += 4; return v; }
      case 0xd3: return big(true);
      case 0xd9: return str(u(1));
      case 0xda: return str(u(2));
      case 0xdb: return str(u(4));
      case 0xdc: return arr(u(2), depth + 1);
      case 0xdd: return arr(u(4), depth + 1);
      case 0xde: return map(u(2), depth + 1);
      case 0xdf: return map(u(4), depth + 1);
      default: throw new WireError(`unsupported msgpack type 0x${t.toString(16)}`);
    }
  }
  const value = read(0);
  if (pos !== bytes.length) throw new WireError("trailing bytes after the header");
  return value;
}

// ----- chunks -> frames --------------------------------------------------------------------------
export class Reassembler {
  constructor(maxPending = MAX_PENDING) {
    this.maxPending = maxPending;
    this.pending = new Map();
    this.evicted = 0;
  }

  // One data-channel message (ArrayBuffer) -> the frames (Uint8Array[]) of a completed message, or null.
  feed(buffer) {
    const chunk = new Uint8Array(buffer);
    if (chunk.length <= CHUNK_HEADER) throw new WireError(`chunk of ${chunk.length} bytes is too short`);
    const view = new DataView(buffer);
    if (chunk[0] !== 0x46 || chunk[1] !== 0x41 || chunk[2] !== 1) throw new WireError("not a v1 avatar chunk");
    const id = view.getUint32(4, true), index = view.getUint32(8, true), count = view.getUint32(12, true);
    if (count < 1 || index >= count) throw new WireError(`chunk index ${index} of ${count}`);
    let entry = this.pending.get(id);
    if (!entry) {
      entry = { count, parts: new Array(count), got: 0, size: 0 };
      this.pending.set(id, entry);
      while (this.pending.size > this.maxPending) {
        this.pending.delete(this.pending.keys().next().value);
        this.evicted++;
      }
    }
    if (entry.count !== count || entry.parts[index]) {
      this.pending.delete(id);
      throw new WireError(`message ${id}: inconsistent count or duplicate chunk ${index}`);
    }
    entry.parts[index] = chunk.subarray(CHUNK_HEADER);
    entry.got++;
    entry.size += chunk.length - CHUNK_HEADER;
    if (entry.size > MAX_MESSAGE_BYTES) { this.pending.delete(id); throw new WireError("message too large"); }
    if (entry.got < count) return null;
    this.pending.delete(id);
    const data = new Uint8Array(entry.size);
    let pos = 0;
    for (const part of entry.parts) { data.set(part, pos); pos += part.length; }
    return unpackFrames(data);
  }
}

export function unpackFrames(data) {
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  if (data.length < 4) throw new WireError("packed message shorter than its frame count");
  const n = view.getUint32(0, true);
  if (n < 1 || n > MAX_ARRAYS + 1) throw new WireError(`packed message declares ${n} frames`);
  const table = 4 + 4 * n;
  if (data.length < table) throw new WireError("packed message shorter than its frame table");
  const sizes = [];
  let total = 0;
  for (let i = 0; i < n; i++) { sizes.push(view.getUint32(4 + 4 * i, true)); total += sizes[i]; }
  if (table + total !== data.length) throw new WireError("frame table does not match the data");
  const frames = [];
  let pos = table;
  for (const size of sizes) { frames.push(data.slice(pos, pos + size)); pos += size; } // slice: aligned copies
  return frames;
}

// ----- frames -> message -------------------------------------------------------------------------
const DTYPES = {
  float16: Uint16Array, // raw half floats: rig arrays decode them with halfToFloat32
  uint8: Uint8Array, int8: Int8Array, uint16: Uint16Array, int16: Int16Array, uint32: Uint32Array,
  int32: Int32Array, int64: BigInt64Array, uint64: BigUint64Array, float32: Float32Array, float64: Float64Array,
};
const HEADER_KEYS = ["v", "type", "session", "version", "base_version", "seq", "t_capture", "t_publish", "arrays", "stats"];
const CORE = { means: 3, quats: 4, scales: 3, opacities: 1, colors: 3 };

export function decodeMessage(frames) {
  const h = unpackMsgpack(frames[0]);
  if (!h || typeof h !== "object" || Array.isArray(h)) throw new WireError("header must be a map");
  if (h.v !== 1) throw new WireError(`unsupported wire version ${h.v}`);
  for (const key of HEADER_KEYS) if (!(key in h)) throw new WireError(`header misses ${key}`);
  if (h.type !== "snapshot" && h.type !== "delta" && h.type !== "rig") throw new WireError(`unknown message type ${h.type}`);
  if (!Array.isArray(h.arrays) || h.arrays.length !== frames.length - 1) throw new WireError("array count mismatch");
  const arrays = {};
  h.arrays.forEach((spec, i) => {
    const Ctor = DTYPES[spec.dtype];
    if (!Ctor) throw new WireError(`dtype ${spec.dtype} is not supported`);
    if (!Array.isArray(spec.shape) || spec.shape.some((s) => !Number.isInteger(s) || s < 0)) throw new WireError("bad shape");
    const elements = spec.shape.reduce((a, b) => a * b, 1);
    const frame = frames[i + 1];
    if (frame.byteLength !== elements * Ctor.BYTES_PER_ELEMENT) {
      throw new WireError(`array ${spec.name} needs ${elements * Ctor.BYTES_PER_ELEMENT} bytes, frame has ${frame.byteLength}`);
    }
    arrays[spec.name] = { data: new Ctor(frame.buffer, frame.byteOffset, elements), shape: spec.shape, dtype: spec.dtype };
  });
  if (h.type === "rig") return { ...h, arrays }; // animation.js checks the rig's own schema
  const ids = arrays.ids;
  if (!ids || ids.shape.length !== 1 || (ids.dtype !== "uint32" && ids.dtype !== "int64")) throw new WireError("bad ids");
  const n = ids.shape[0];
  for (const [name, width] of Object.entries(CORE)) {
    const a = arrays[name];
    if (!a || a.dtype !== "float32" || a.shape[0] !== n || a.data.length !== n * width) throw new WireError(`bad ${name}`);
  }
  if (h.type === "delta") {
    const r = arrays.ranges, q = arrays.retired;
    if (!r || r.dtype !== "uint32" || r.shape.length !== 2 || r.shape[1] !== 2) throw new WireError("bad ranges");
    if (!q || q.dtype !== "uint32" || q.shape.length !== 1) throw new WireError("bad retired");
    let k = 0, prev = 0;
    for (let i = 0; i < r.shape[0]; i++) {
      const a = r.data[2 * i], b = r.data[2 * i + 1];
      if (a >= b || a < prev) throw new WireError("ranges must be sorted, disjoint, non-empty");
      k += b - a; prev = b;
    }
    if (k !== n) throw new WireError(`ranges cover ${k} slots, delta carries ${n}`);
  }
  return { ...h, arrays };
}

// ----- slot buffer -------------------------------------------------------------------------------
// Per-Gaussian fields live in dense slot arrays (n_slots); free slots hold FREE id and zeros.
export class AvatarState {
  constructor() {
    this.session = null;
    this.version = -1;
    this.nSlots = 0;
    this.capacity = 0;
    this.ids = null; // Uint32Array or BigInt64Array
    this.fields = {}; // name -> {data, width, Ctor}
    this.live = 0;
  }

  free() { return this.ids instanceof BigInt64Array ? -1n : 0xffffffff; }

  reserve(n) {
    if (n <= this.capacity) return;
    const cap = Math.max(n, 2 * this.capacity, 1024);
    const ids = new this.ids.constructor(cap).fill(this.free());
    ids.set(this.ids.subarray(0, this.nSlots));
    this.ids = ids;
    for (const f of Object.values(this.fields)) {
      const data = new f.Ctor(cap * f.width);
      data.set(f.data.subarray(0, this.nSlots * f.width));
      f.data = data;
    }
    this.capacity = cap;
  }

  // Apply a decoded message; returns {snapshot, ranges: [[start, stop], ...], retired: [slot, ...]} or
  // throws WireError when a delta does not fit the held version (ask for a snapshot then).
  apply(msg) {
    const A = msg.arrays;
    if (msg.type === "snapshot") {
      const n = A.ids.shape[0];
      this.session = msg.session;
      this.ids = new A.ids.data.constructor(0);
      this.fields = {};
      for (const [name, a] of Object.entries(A)) {
        if (name === "ids") continue;
        const width = a.data.length / Math.max(1, a.shape[0]) || a.shape.slice(1).reduce((x, y) => x * y, 1);
        this.fields[name] = { data: new a.data.constructor(0), width, Ctor: a.data.constructor };
      }
      this.capacity = 0;
      this.nSlots = 0;
      this.reserve(n);
      this.nSlots = n;
      this.ids.set(A.ids.data);
      for (const [name, f] of Object.entries(this.fields)) f.data.set(A[name].data);
      this.version = msg.version;
      this.countLive();
      return { snapshot: true, ranges: n ? [[0, n]] : [], retired: [] };
    }
    if (msg.session !== this.session || msg.base_version !== this.version) {
      throw new WireError(`delta ${msg.base_version}->${msg.version} does not fit held version ${this.version}`);
    }
    const ranges = [];
    for (let i = 0; i < A.ranges.shape[0]; i++) ranges.push([A.ranges.data[2 * i], A.ranges.data[2 * i + 1]]);
    const newN = Math.max(this.nSlots, ranges.length ? ranges[ranges.length - 1][1] : 0);
    let grown = 0;
    for (const [a, b] of ranges) grown += Math.max(0, b - Math.max(a, this.nSlots));
    if (grown !== newN - this.nSlots) throw new WireError("delta grows the avatar without writing every new slot");
    const retired = Array.from(A.retired.data);
    for (const s of retired) if (s >= this.nSlots || this.ids[s] === this.free()) throw new WireError("retiring a free slot");
    this.reserve(newN);
    this.nSlots = newN;
    for (const s of retired) {
      this.ids[s] = this.free();
      for (const f of Object.values(this.fields)) f.data.fill(0, s * f.width, (s + 1) * f.width);
    }
    let k = 0;
    for (const [a, b] of ranges) {
      this.ids.set(A.ids.data.subarray(k, k + b - a), a);
      for (const [name, f] of Object.entries(this.fields)) {
        const src = A[name];
        if (!src) throw new WireError(`delta misses field ${name}`);
        f.data.set(src.data.subarray(k * f.width, (k + b - a) * f.width), a * f.width);
      }
      k += b - a;
    }
    this.version = msg.version;
    this.countLive();
    return { snapshot: false, ranges, retired };
  }

  countLive() {
    const free = this.free();
    let live = 0;
    for (let i = 0; i < this.nSlots; i++) if (this.ids[i] !== free) live++;
    this.live = live;
  }
}
