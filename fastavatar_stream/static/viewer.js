// Live Gaussian splat view of the avatar: three.js + Spark (served from node_modules at /vendor/).
// The avatar's slots map 1:1 to Spark's packed splats, so a delta rewrites only its ranges in place.
// Once a rig arrives the avatar is drawn animated instead: its canonical splats are uploaded once per rig and a
// Spark dyno object modifier poses them on the GPU every frame (per-splat linear blend skinning over the 5 FLAME
// joints, after the anchor's expression offset), reading four float textures: each splat's anchor, each anchor's
// LBS weights, each anchor's expression offset and the joints (the last two change per pose, see animation.js).

import * as THREE from "three";
import { OrbitControls } from "three/addons/controls/OrbitControls.js";
import { PackedSplats, SparkRenderer, SplatMesh, dyno, setPackedSplat } from "@sparkjsdev/spark";
import { JOINTS, poseOf, poseTextures } from "/static/animation.js";

const TEXTURE_WIDTH = 1024;

// A float RGBA texture of `texels` texels laid out TEXTURE_WIDTH wide (the shader's faFetch reads it).
function floatTexture(texels) {
  const height = Math.max(1, Math.ceil(texels / TEXTURE_WIDTH));
  const data = new Float32Array(TEXTURE_WIDTH * height * 4);
  const texture = new THREE.DataTexture(data, TEXTURE_WIDTH, height, THREE.RGBAFormat, THREE.FloatType);
  texture.internalFormat = "RGBA32F";
  texture.needsUpdate = true;
  return texture;
}

const LBS_GLSL = `
vec4 faFetch(sampler2D t, int i) { return texelFetch(t, ivec2(i % ${TEXTURE_WIDTH}, i / ${TEXTURE_WIDTH}), 0); }
vec4 faQuatMul(vec4 a, vec4 b) { return vec4(a.w * b.xyz + b.w * a.xyz + cross(a.xyz, b.xyz), a.w * b.w - dot(a.xyz, b.xyz)); }
void faSkin(sampler2D splatAnchor, sampler2D anchorWeights, sampler2D anchorOffset, sampler2D joints,
            int index, inout vec3 center, inout vec4 quaternion) {
  int a = int(faFetch(splatAnchor, index).x + 0.5);
  vec4 w03 = faFetch(anchorWeights, 2 * a);
  float w[${JOINTS}] = float[${JOINTS}](w03.x, w03.y, w03.z, w03.w, faFetch(anchorWeights, 2 * a + 1).x);
  vec3 local = center + faFetch(anchorOffset, a).xyz;
  vec4 r0 = vec4(0.0), r1 = vec4(0.0), r2 = vec4(0.0), q = vec4(0.0);
  for (int j = 0; j < ${JOINTS}; j++) {
    r0 += w[j] * texelFetch(joints, ivec2(4 * j, 0), 0);
    r1 += w[j] * texelFetch(joints, ivec2(4 * j + 1, 0), 0);
    r2 += w[j] * texelFetch(joints, ivec2(4 * j + 2, 0), 0);
    q += w[j] * texelFetch(joints, ivec2(4 * j + 3, 0), 0);
  }
  center = vec3(dot(r0.xyz, local) + r0.w, dot(r1.xyz, local) + r1.w, dot(r2.xyz, local) + r2.w);
  quaternion = faQuatMul(normalize(q), quaternion);
}`;

// The LBS object modifier over the given texture uniforms.
function lbsModifier(uniforms) {
  return dyno.dynoBlock({ gsplat: dyno.Gsplat }, { gsplat: dyno.Gsplat }, ({ gsplat }) => {
    const skin = new dyno.Dyno({
      inTypes: { gsplat: dyno.Gsplat, splatAnchor: "sampler2D", anchorWeights: "sampler2D", anchorOffset: "sampler2D",
        joints: "sampler2D" },
      outTypes: { gsplat: dyno.Gsplat },
      inputs: { gsplat, ...uniforms },
      globals: () => [LBS_GLSL],
      statements: ({ inputs, outputs }) => [
        `${outputs.gsplat} = ${inputs.gsplat};`,
        `if (isGsplatActive(${outputs.gsplat}.flags)) {`,
        `  faSkin(${inputs.splatAnchor}, ${inputs.anchorWeights}, ${inputs.anchorOffset}, ${inputs.joints},`,
        `         ${outputs.gsplat}.index, ${outputs.gsplat}.center, ${outputs.gsplat}.quaternion);`,
        `}`,
      ],
    });
    return { gsplat: skin.outputs.gsplat };
  });
}

export class AvatarViewer {
  constructor(container) {
    this.container = container;
    this.renderer = new THREE.WebGLRenderer({ antialias: false });
    this.renderer.setPixelRatio(Math.min(window.devicePixelRatio, 2));
    this.renderer.setClearColor(0x202428);
    container.appendChild(this.renderer.domElement);
    this.scene = new THREE.Scene();
    this.camera = new THREE.PerspectiveCamera(40, 1, 0.01, 100);
    this.camera.position.set(0, 0, 0.8);
    this.controls = new OrbitControls(this.camera, this.renderer.domElement);
    this.controls.enableDamping = true;
    this.spark = new SparkRenderer({ renderer: this.renderer });
    this.scene.add(this.spark);
    this.packed = new PackedSplats({ maxSplats: 1024 });
    this.mesh = null;
    this.animated = null; // {rig, mesh, textures, uniforms} once a rig arrived
    this.poses = 0;
    this.beforeRender = null; // called before every frame (app.js poses the avatar there)
    this.lastPose = null;
    this.framed = false;
    this.frames = 0;
    this.frameTimes = []; // requestAnimationFrame timestamps (ms) of the newest frames, oldest first
    this.resize();
    new ResizeObserver(() => this.resize()).observe(container);
    this.renderer.setAnimationLoop((time) => this.render(time));
  }

  resize() {
    const w = Math.max(1, this.container.clientWidth), h = Math.max(1, this.container.clientHeight);
    this.renderer.setSize(w, h, false);
    this.camera.aspect = w / h;
    this.camera.updateProjectionMatrix();
  }

  render(time) {
    this.beforeRender?.();
    this.controls.update();
    this.renderer.render(this.scene, this.camera);
    this.frames++;
    this.frameTimes.push(time);
    if (this.frameTimes.length > 1000) this.frameTimes.shift();
  }

  // The frame loop so far: frames rendered, the timestamps of the newest (frame rate = their spacing), the splats
  // the newest depth sort left to draw (Spark's activeSplats) and the splats of the animated mesh.
  renderStats() {
    return { frames: this.frames, frameTimes: [...this.frameTimes], splatsDrawn: this.spark.activeSplats,
      splatsAnimated: this.animated ? this.animated.rig.M : 0 };
  }

  // state: AvatarState (wire.js); change: what AvatarState.apply returned.
  update(state, change) {
    if (this.animated) return; // once a rig arrived the static mesh is hidden for good: repacking it is wasted work
    const arr = this.packed.ensureSplats(state.nSlots);
    const f = state.fields;
    const write = (s) => {
      const m = f.means.data, q = f.quats.data, sc = f.scales.data, c = f.colors.data;
      setPackedSplat(arr, s, m[3 * s], m[3 * s + 1], m[3 * s + 2], sc[3 * s], sc[3 * s + 1], sc[3 * s + 2],
        q[4 * s + 1], q[4 * s + 2], q[4 * s + 3], q[4 * s], f.opacities.data[s], c[3 * s], c[3 * s + 1], c[3 * s + 2]);
    };
    if (change.snapshot) {
      for (let s = 0; s < state.nSlots; s++) write(s);
    } else {
      for (const [a, b] of change.ranges) for (let s = a; s < b; s++) write(s);
      for (const s of change.retired) write(s); // zeros: opacity 0
    }
    for (let s = state.nSlots; s < this.packed.numSplats; s++) setPackedSplat(arr, s, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0);
    this.packed.numSplats = state.nSlots;
    this.packed.needsUpdate = true;
    if (!this.mesh) {
      this.mesh = new SplatMesh({ packedSplats: this.packed });
      this.mesh.visible = !this.animated;
      this.scene.add(this.mesh);
    } else {
      this.mesh.updateVersion();
    }
    if (!this.framed && state.live > 0) this.frame(state);
  }

  // Draw the rig's avatar animated from now on (replacing the previous rig's mesh and hiding the static one).
  setRig(rig) {
    const packed = new PackedSplats({ maxSplats: Math.max(rig.M, 1) });
    const arr = packed.ensureSplats(rig.M);
    const splatAnchor = floatTexture(rig.M), anchorWeights = floatTexture(2 * rig.A);
    const anchorOffset = floatTexture(rig.A), joints = floatTexture(4 * JOINTS);
    const lo = [Infinity, Infinity, Infinity], hi = [-Infinity, -Infinity, -Infinity];
    for (let i = 0; i < rig.M; i++) {
      const a = rig.anchor[i], o = rig.offset, r = rig.rotation, sc = rig.scales, c = rig.colors;
      const p = [0, 1, 2].map((d) => rig.anchorRest[3 * a + d] + o[3 * i + d]);
      p.forEach((v, d) => { lo[d] = Math.min(lo[d], v); hi[d] = Math.max(hi[d], v); });
      setPackedSplat(arr, i, p[0], p[1], p[2], sc[3 * i], sc[3 * i + 1], sc[3 * i + 2],
        r[4 * i + 1], r[4 * i + 2], r[4 * i + 3], r[4 * i], rig.opacities[i], c[3 * i], c[3 * i + 1], c[3 * i + 2]);
      splatAnchor.image.data[4 * i] = a;
    }
    for (let a = 0; a < rig.A; a++) {
      for (let j = 0; j < JOINTS; j++) anchorWeights.image.data[(j < 4 ? 8 * a + j : 8 * a + 4)] = rig.anchorWeights[JOINTS * a + j];
    }
    packed.numSplats = rig.M;
    packed.needsUpdate = true;
    const uniforms = { splatAnchor: dyno.dynoSampler2D(splatAnchor), anchorWeights: dyno.dynoSampler2D(anchorWeights),
      anchorOffset: dyno.dynoSampler2D(anchorOffset), joints: dyno.dynoSampler2D(joints) };
    const mesh = new SplatMesh({ packedSplats: packed, objectModifier: lbsModifier(uniforms) });
    if (this.animated) { this.scene.remove(this.animated.mesh); this.animated.mesh.dispose?.(); }
    if (this.mesh) this.mesh.visible = false;
    this.scene.add(mesh);
    this.animated = { rig, mesh, anchorOffset, joints };
    // the new avatar takes the pose the old one showed at once (the neutral pose before the first motion)
    this.showPose(this.lastPose || poseOf({ frame: 0, t_capture: 0, expression: [], pose: new Float32Array(18) }));
    if (!this.framed) this.frameBox(lo, hi);
  }

  // Pose the animated avatar (a pose from animation.js: expression, joint quaternions, translation).
  showPose(pose) {
    this.lastPose = pose;
    const anim = this.animated;
    if (!anim) return;
    poseTextures(anim.rig, pose, anim.anchorOffset.image.data, anim.joints.image.data);
    anim.anchorOffset.needsUpdate = true;
    anim.joints.needsUpdate = true;
    anim.mesh.updateVersion();
    this.poses++;
  }

  frameBox(lo, hi) {
    const center = new THREE.Vector3((lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, (lo[2] + hi[2]) / 2);
    const radius = Math.max(0.05, Math.hypot(hi[0] - lo[0], hi[1] - lo[1], hi[2] - lo[2]) / 2);
    this.controls.target.copy(center);
    this.camera.position.set(center.x, center.y, center.z + radius * 3.2);
    this.camera.near = radius / 50;
    this.camera.far = radius * 50;
    this.camera.updateProjectionMatrix();
    this.framed = true;
  }

  // Point the orbit camera at the avatar's live Gaussians (the view the avatar faces: +z, y up).
  frame(state) {
    const free = state.free(), m = state.fields.means.data;
    const lo = [Infinity, Infinity, Infinity], hi = [-Infinity, -Infinity, -Infinity];
    for (let s = 0; s < state.nSlots; s++) {
      if (state.ids[s] === free) continue;
      for (let c = 0; c < 3; c++) { lo[c] = Math.min(lo[c], m[3 * s + c]); hi[c] = Math.max(hi[c], m[3 * s + c]); }
    }
    this.frameBox(lo, hi);
  }
}
