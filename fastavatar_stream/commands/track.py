"""`fastavatar-stream track VIDEO --out tracks.npz [--landmarks ...] [--preview preview.mp4] [--matte-out DIR]`:
track a face video offline.

Writes per-frame landmarks, the MediaPipe face mesh and FLAME parameters (see `write_tracks` for the arrays),
optionally a preview video (the matte dims the background; the face mesh, the observed and fitted landmarks
and the fitted FLAME mesh are drawn over the frames) and optionally one PNG matte per frame.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from engine.errors import InputError
from fastavatar_stream.commands._common import add_landmarks_option, output_dir

log = logging.getLogger(__name__)


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("track", help="track a face video: landmarks and FLAME parameters per frame",
                              description="Track the face in a video file and write per-frame 68 landmarks, the "
                                          "478-point face mesh (mediapipe backend) and FLAME parameters (camera "
                                          "axes: OpenCV) to an .npz file.")
    p.add_argument("video", help="input video file (anything PyAV/FFmpeg reads)")
    p.add_argument("--out", required=True, help="output .npz path")
    p.add_argument("--preview", help="optional preview video: matte, face mesh, landmarks and the fitted FLAME mesh "
                                     "drawn over the frames")
    p.add_argument("--matte-out", metavar="DIR",
                   help="write each frame's matte as DIR/NNNNNN.png (8-bit grey; black where no matte)")
    add_landmarks_option(p)
    p.add_argument("--fov", type=float, default=40.0, help="camera field of view across the larger side (degrees)")
    p.add_argument("--max-frames", type=int, default=0, help="stop after N frames (0: all)")
    p.add_argument("--redetect-every", type=int, default=10, help="run the face detector every K frames")
    p.add_argument("--head", default=None, help="FLAME head model (default: the embedded head)")
    p.set_defaults(func=run)
    return p


def _open_video(path: str):
    import av

    if not Path(path).is_file():
        raise InputError(f"video not found: {path}")
    try:
        container = av.open(path)
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise InputError(f"cannot read video {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    if not container.streams.video:
        container.close()
        raise InputError(f"no video stream in {path}")
    return container


def run(args) -> int:
    from tqdm import tqdm

    import engine
    from fastavatar_stream.tracking.landmark_model import LandmarkModel
    from fastavatar_stream.tracking.tracker import FaceTracker, TrackerConfig

    if not 1.0 <= args.fov <= 170.0:
        raise InputError(f"--fov {args.fov} is outside 1..170 degrees")
    container = _open_video(args.video)
    stream = container.streams.video[0]
    fps = float(stream.average_rate or stream.guessed_rate or 25.0)
    total = stream.frames or None
    if args.max_frames:
        total = min(total, args.max_frames) if total else args.max_frames
    head = engine.load_head(args.head)
    tracker = FaceTracker(LandmarkModel.from_head(head), TrackerConfig(detector=args.landmarks, fov_degrees=args.fov,
                                                                      redetect_every=args.redetect_every),
                          mesh_model=LandmarkModel.mesh_from_head(head))
    matte_dir = output_dir(args.matte_out, "--matte-out") if args.matte_out else None
    frames = []
    preview_images = [] if args.preview else None
    try:
        decoded = container.decode(stream)
        for i, av_frame in enumerate(tqdm(decoded, total=total, desc="track", unit="frame", file=sys.stderr)):
            if args.max_frames and i >= args.max_frames:
                break
            image = av_frame.to_ndarray(format="rgb24")
            pts = float(av_frame.time) if av_frame.time is not None else i / fps
            tracked = tracker.track(image, pts, i)
            frames.append(_summary(tracked, tracker))
            if matte_dir is not None:
                write_matte(matte_dir / f"{i:06d}.png", tracked.matte, image.shape[:2])
            if preview_images is not None:
                preview_images.append(_with_matte(image, tracked.matte))
    except Exception as exc:  # noqa: BLE001 - a broken container mid-file is bad input, not a bug
        import av

        if isinstance(exc, av.error.FFmpegError):
            raise InputError(f"cannot decode {args.video}: {exc}")
        raise
    finally:
        container.close()
    if not frames:
        raise InputError(f"no frames could be decoded from {args.video}")
    for index, pose in tracker.identity_refits().items():     # early frames, re-solved under the held identity
        if frames[index]["valid"]:
            frames[index]["pose"] = pose
    camera = tracker._camera
    arrays = write_tracks(Path(args.out), frames, tracker, camera, fps)
    n_valid = int(arrays["valid"].sum())
    log.info("tracked %d/%d frames (%s); wrote %s", n_valid, len(frames), dict(tracker.counts), args.out)
    if args.preview:
        write_preview(Path(args.preview), preview_images, arrays, head, tracker, camera, fps)
    return 0


def _summary(tracked, tracker) -> dict:
    """What the npz needs of a TrackedFrame (the images are not kept)."""
    from fastavatar_stream.frames import UNUSABLE
    from fastavatar_stream.tracking.flame_fit import HeadPose

    pose = None
    if tracked.flame is not None:
        f = tracked.flame
        pose = HeadPose(f.rotation.astype(float), f.translation.astype(float), f.jaw.astype(float),
                        f.expression.astype(float))
    return {"valid": tracked.flame is not None and not (tracked.flags & UNUSABLE), "pose": pose,
            "eyes": tracked.flame.eyes if tracked.flame is not None else np.zeros(6, np.float32),
            "landmarks": tracked.landmarks, "box": tracked.box, "pts": tracked.pts, "flags": tracked.flags,
            "size": tracked.image.shape[:2], "mesh": tracked.mesh, "fit_points": tracker.fit_points(tracked)}


def write_matte(path: Path, matte: np.ndarray | None, size: tuple[int, int]) -> None:
    """One 8-bit grey PNG; all black for frames without a matte."""
    from PIL import Image

    values = np.zeros(size, np.uint8) if matte is None else np.round(np.clip(matte, 0, 1) * 255).astype(np.uint8)
    Image.fromarray(values, mode="L").save(path)


def _with_matte(image: np.ndarray, matte: np.ndarray | None) -> np.ndarray:
    """The frame with what the matte leaves out dimmed to a third."""
    if matte is None:
        return image
    return (image * (1.0 / 3.0 + (2.0 / 3.0) * matte[:, :, None])).astype(np.uint8)


def write_tracks(path: Path, frames: list[dict], tracker, camera, fps: float) -> dict:
    """Arrays written (T frames; invalid frames hold zeros in the parameter arrays):

    valid (T,) bool; landmarks (T, 68, 2) pixels; landmark_confidence (T, 68); box (T, 4);
    mesh (T, 478, 3) MediaPipe face mesh, x, y pixels, z as MediaPipe gives it (zeros without one);
    backend () str, the landmark backend's name; eye_pose (T, 6) FLAME eye poses, left then right eye (from
    the irises; zeros for backends without a mesh);
    rotation (T, 3) head rotation axis-angle in camera axes (OpenCV; 0 = facing the camera);
    translation (T, 3) metres, camera-space position of the FLAME origin; expression (T, E); jaw_pose (T, 3);
    shape (S,); K (3, 3); viewmat (4, 4) world-to-camera; rotation_world, translation_world (T, 3) FLAME's
    global_orient and transl in world axes; fps (); pts (T,) seconds; image_size (2,) height, width;
    flag_<name> (T,) bool per quality flag; fit_error_px, fit_error_rel (T,) rms distance of the fitted model's
    points to the observed ones it was fitted to (the embedded mesh vertices for the mediapipe backend, else
    the 68 landmarks), in pixels and as a fraction of their box diagonal (NaN when invalid).
    """
    from fastavatar_stream.frames import EXTREME_POSE, FIT_FAILED, LOW_CONFIDENCE, NO_FACE, SEVERAL_FACES

    T, E, model = len(frames), tracker.model.n_expression, tracker.model
    out = {k: np.zeros((T, 3)) for k in ("rotation", "translation", "jaw_pose", "rotation_world", "translation_world")}
    out["expression"] = np.zeros((T, E))
    for t, fr in enumerate(frames):
        pose = fr["pose"]
        if pose is None or not fr["valid"]:
            continue
        rot_c, trans_c = pose.in_camera(model, tracker.shape, camera)
        out["rotation"][t], out["translation"][t] = rot_c, trans_c
        out["rotation_world"][t], out["translation_world"][t] = pose.rotation, pose.translation
        out["jaw_pose"][t] = pose.jaw
        out["expression"][t, :len(pose.expression)] = pose.expression
    lms = np.stack([fr["landmarks"] for fr in frames]).astype(np.float32)
    out["fit_error_px"], out["fit_error_rel"] = np.full(T, np.nan), np.full(T, np.nan)
    for t, fr in enumerate(frames):
        if fr["valid"] and fr["pose"] is not None and fr["fit_points"] is not None:
            obs = fr["fit_points"]
            err = camera.project(tracker.fitter.landmarks_world(fr["pose"], tracker.shape)) - obs
            rms = float(np.sqrt((err ** 2).sum(1).mean()))
            out["fit_error_px"][t] = rms
            out["fit_error_rel"][t] = rms / max(float(np.hypot(*np.ptp(obs, axis=0))), 1e-6)
    out.update(
        valid=np.array([fr["valid"] for fr in frames], dtype=bool), landmarks=lms[:, :, :2],
        landmark_confidence=lms[:, :, 2], box=np.stack([fr["box"] for fr in frames]).astype(np.float32),
        shape=tracker.shape.astype(np.float32),
        K=(camera.K if camera is not None else np.eye(3)).astype(np.float32),
        viewmat=(camera.viewmat if camera is not None else np.eye(4)).astype(np.float32),
        mesh=np.stack([np.zeros((478, 3), np.float32) if fr["mesh"] is None else fr["mesh"] for fr in frames]),
        backend=np.array(tracker.detector.name),
        eye_pose=np.stack([fr["eyes"] for fr in frames]).astype(np.float32),
        fps=np.array(fps, dtype=np.float64), pts=np.array([fr["pts"] for fr in frames], dtype=np.float64),
        image_size=np.array(frames[0]["size"], dtype=np.int64))
    for flag in (NO_FACE, SEVERAL_FACES, LOW_CONFIDENCE, EXTREME_POSE, FIT_FAILED):
        out[f"flag_{flag}"] = np.array([flag in fr["flags"] for fr in frames], dtype=bool)
    for k in ("rotation", "translation", "jaw_pose", "rotation_world", "translation_world", "expression"):
        out[k] = out[k].astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return out


def write_preview(path: Path, images: list[np.ndarray], arrays: dict, head, tracker, camera, fps: float) -> None:
    """Overlay video: fitted FLAME mesh wireframe (blue), MediaPipe face mesh (yellow), observed 68 landmarks
    (green), the fitted model's points (red); `images` already carry the matte."""
    from tqdm import tqdm

    from fastavatar_stream.tracking.flame_fit import HeadPose
    from fastavatar_stream.tracking.preview import PreviewWriter, draw_overlay, mesh_edges, project

    faces = np.asarray(head.faces.detach().cpu().numpy() if hasattr(head.faces, "detach") else head.faces)
    edges = mesh_edges(faces.astype(np.int64))
    h, w = images[0].shape[:2]
    writer = PreviewWriter(path, fps, w, h)
    try:
        for t, image in enumerate(tqdm(images, desc="preview", unit="frame", file=sys.stderr)):
            mesh_2d = model_2d = None
            if arrays["valid"][t]:
                pose = HeadPose(arrays["rotation_world"][t].astype(float), arrays["translation_world"][t].astype(float),
                                arrays["jaw_pose"][t].astype(float), arrays["expression"][t].astype(float))
                mesh_2d = project(head_vertices(head, pose, tracker.shape), camera)
                model_2d = project(tracker.fitter.landmarks_world(pose, tracker.shape), camera)
            face_mesh = arrays["mesh"][t, :, :2] if arrays["mesh"][t].any() else None
            overlay = draw_overlay(image, arrays["landmarks"][t] if arrays["box"][t].any() else None, model_2d,
                                   mesh_2d, edges, face_mesh)
            writer.write(overlay)
    finally:
        writer.close()


def head_vertices(head, pose, shape: np.ndarray) -> np.ndarray:
    """(V, 3) world vertices of the full head mesh for one pose (the engine's FLAME forward)."""
    import torch

    from engine.types import FlameParams

    def row(x, n):
        v = torch.zeros(1, n)
        v[0, :min(n, len(x))] = torch.as_tensor(np.asarray(x[:n], dtype=np.float32))
        return v

    params = FlameParams(shape=row(shape, head.n_shape), expression=row(pose.expression, head.n_expression),
                         rotation=row(pose.rotation, 3), neck=torch.zeros(1, 3), jaw=row(pose.jaw, 3),
                         eyes=torch.zeros(1, 6), translation=row(pose.translation, 3))
    with torch.no_grad():
        out = head.forward(params)
    verts = getattr(out, "vertices", out)
    return verts[0].detach().cpu().numpy().astype(np.float64)
