// The avatar as a standard binary 3DGS PLY, the same layout protocols/ply.py writes:
// x y z nx ny nz f_dc_0..2 opacity(logit) scale_0..2(log) rot_0..3(wxyz), all float32 little-endian.

const SH_C0 = 0.28209479177387814;
const PROPERTIES = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
  "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"];
const EPS = 1e-7;

// state: an AvatarState (wire.js); only live slots are written, in slot order. Returns a Blob.
export function avatarToPly(state) {
  const free = state.free();
  const live = [];
  for (let i = 0; i < state.nSlots; i++) if (state.ids[i] !== free) live.push(i);
  const header = "ply\nformat binary_little_endian 1.0\n" +
    "comment fastavatar-stream 3DGS avatar (activated: see protocols.ply)\n" +
    `element vertex ${live.length}\n` + PROPERTIES.map((p) => `property float ${p}\n`).join("") + "end_header\n";
  const body = new Float32Array(live.length * PROPERTIES.length);
  const f = state.fields;
  live.forEach((s, row) => {
    const o = row * PROPERTIES.length;
    body.set(f.means.data.subarray(3 * s, 3 * s + 3), o); // normals stay 0
    for (let c = 0; c < 3; c++) body[o + 6 + c] = (f.colors.data[3 * s + c] - 0.5) / SH_C0;
    const p = Math.min(Math.max(f.opacities.data[s], EPS), 1 - EPS);
    body[o + 9] = Math.log(p) - Math.log1p(-p);
    for (let c = 0; c < 3; c++) body[o + 10 + c] = Math.log(Math.max(f.scales.data[3 * s + c], 1e-30));
    body.set(f.quats.data.subarray(4 * s, 4 * s + 4), o + 13);
  });
  return new Blob([new TextEncoder().encode(header), body.buffer], { type: "application/octet-stream" });
}
