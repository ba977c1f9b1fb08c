"""`fastavatar-stream reenact AVATAR.npz VIDEO --out OUT.mp4`: drive a saved avatar with another video.

Every frame of VIDEO is tracked (FLAME expression, jaw, head pose and camera); the avatar (a drivable
`avatar.npz` written by `replay` or `serve --snapshot-dir`) is posed with that frame's parameters
(`protocols.animation.pose`) and rendered from its tracked camera. OUT.mp4 shows the driving frame on the left and
the avatar on the right, one output frame per driving frame; frames without a usable face hold the last pose.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from engine.errors import InputError
from fastavatar_stream.commands._common import add_landmarks_option

log = logging.getLogger(__name__)


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "reenact", help="drive a saved avatar.npz with another video's tracking",
        description="Track every frame of VIDEO, pose the avatar of AVATAR.npz (written by replay or serve "
                    "--snapshot-dir) with it, render it from the tracked camera and write the driving frames beside "
                    "the avatar to OUT.mp4 (one output frame per driving frame).")
    p.add_argument("avatar", help="drivable avatar file (avatar.npz)")
    p.add_argument("video", help="driving video file (anything PyAV/FFmpeg reads)")
    p.add_argument("--out", required=True, type=Path, help="output video (.mp4)")
    add_landmarks_option(p)
    p.add_argument("--fov", type=float, default=40.0, help="camera field of view across the larger side (degrees)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    import numpy as np
    from tqdm import tqdm

    import engine
    from fastavatar_stream.animation import motion_of
    from fastavatar_stream.avatar_video import render_arrays
    from fastavatar_stream.commands.track import _open_video
    from fastavatar_stream.tracking.landmark_model import LandmarkModel
    from fastavatar_stream.tracking.preview import PreviewWriter
    from fastavatar_stream.tracking.tracker import FaceTracker, TrackerConfig
    from protocols.animation import Motion, load_avatar, pose

    if not 1.0 <= args.fov <= 170.0:
        raise InputError(f"--fov {args.fov} is outside 1..170 degrees")
    if not Path(args.avatar).is_file():
        raise InputError(f"avatar file not found: {args.avatar}")
    rig = load_avatar(args.avatar)
    container = _open_video(args.video)
    stream = container.streams.video[0]
    fps = float(stream.average_rate or stream.guessed_rate or 25.0)
    head = engine.load_head()
    tracker = FaceTracker(LandmarkModel.from_head(head), TrackerConfig(detector=args.landmarks, fov_degrees=args.fov),
                          mesh_model=LandmarkModel.mesh_from_head(head))
    motion = Motion.neutral(rig.session, rig.n_expression)
    writer = None
    written = posed_frames = 0
    try:
        frames = container.decode(stream)
        bar = tqdm(frames, total=stream.frames or None, desc="reenact", unit="frame", file=sys.stderr,
                   disable=args.no_progress or not sys.stderr.isatty())
        for index, av_frame in enumerate(bar):
            image = av_frame.to_ndarray(format="rgb24")
            tracked = tracker.track(image, float(av_frame.time or index / fps), index)
            if tracked.usable:
                motion = motion_of(rig.session, tracked)
                posed_frames += 1
            h, w = image.shape[:2]
            avatar = render_arrays(pose(rig, motion), tracked.viewmat, tracked.K, w, h)
            if writer is None:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                writer = PreviewWriter(args.out, fps, 2 * w, h)
            writer.write(np.concatenate([image, avatar], axis=1))
            written += 1
    except Exception as exc:  # noqa: BLE001 - a broken container mid-file is bad input, not a bug
        import av

        if isinstance(exc, av.error.FFmpegError):
            raise InputError(f"cannot decode {args.video}: {exc}") from None
        raise
    finally:
        container.close()
        tracker.close()
        if writer is not None:
            writer.close()
    if written == 0:
        raise InputError(f"no frames could be decoded from {args.video}")
    log.info("wrote %s: %d frames, %d posed by a tracked face (the others hold the last pose)", args.out, written,
             posed_frames)
    print(f"frames={written} posed={posed_frames} -> {args.out}")
    return 0
