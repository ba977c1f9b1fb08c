// Live Gaussian splat view of the avatar: three.js + Spark (served from node_modules at /vendor/).
// The avatar's slots map 1:1 to Spark's packed splats, so a delta rewrites only its ranges in place.

import * as THREE from "three";
import { OrbitControls } from "three/addons/controls/OrbitControls.js";
import { PackedSplats, SparkRenderer, SplatMesh, setPackedSplat } from "@sparkjsdev/spark";

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
    this.scene.add(new SparkRenderer({ renderer: this.renderer }));
    this.packed = new PackedSplats({ maxSplats: 1024 });
    this.mesh = null;
    this.framed = false;
    this.frames = 0;
    this.resize();
    new ResizeObserver(() => this.resize()).observe(container);
    this.renderer.setAnimationLoop(() => this.render());
  }

  resize() {
    const w = Math.max(1, this.container.clientWidth), h = Math.max(1, this.container.clientHeight);
    this.renderer.setSize(w, h, false);
    this.camera.aspect = w / h;
    this.camera.updateProjectionMatrix();
  }

  render() {
    this.controls.update();
    this.renderer.render(this.scene, this.camera);
    this.frames++;
  }

  // state: AvatarState (wire.js); change: what AvatarState.apply returned.
  update(state, change) {
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
      this.scene.add(this.mesh);
    } else {
      this.mesh.updateVersion();
    }
    if (!this.framed && state.live > 0) this.frame(state);
  }

  // Point the orbit camera at the avatar's live Gaussians (the view the avatar faces: +z, y up).
  frame(state) {
    const free = state.free(), m = state.fields.means.data;
    const lo = [Infinity, Infinity, Infinity], hi = [-Infinity, -Infinity, -Infinity];
    for (let s = 0; s < state.nSlots; s++) {
      if (state.ids[s] === free) continue;
      for (let c = 0; c < 3; c++) { lo[c] = Math.min(lo[c], m[3 * s + c]); hi[c] = Math.max(hi[c], m[3 * s + c]); }
    }
    const center = new THREE.Vector3((lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, (lo[2] + hi[2]) / 2);
    const radius = Math.max(0.05, Math.hypot(hi[0] - lo[0], hi[1] - lo[1], hi[2] - lo[2]) / 2);
    this.controls.target.copy(center);
    this.camera.position.set(center.x, center.y, center.z + radius * 3.2);
    this.camera.near = radius / 50;
    this.camera.far = radius * 50;
    this.camera.updateProjectionMatrix();
    this.framed = true;
  }
}
