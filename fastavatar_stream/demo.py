"""The demo clip: a short video made on the fly from a real public-domain portrait (scikit-image's
`astronaut`, NASA), gently zoomed and turned in the image plane, so `replay --demo` needs no download."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image


def make_demo_clip(path: str | Path, n_frames: int = 64, fps: int = 25, size: int = 384) -> Path:
    """Encode the demo clip (H.264 when available, else MPEG-4) to `path`; returns it."""
    import av
    from skimage import data

    portrait = Image.fromarray(data.astronaut())  # 512x512 RGB, the face near (260, 110)
    cx, cy, side = 255.0, 125.0, 250.0
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = container.add_stream(codec, rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(n_frames):
            t = i / max(n_frames - 1, 1)
            angle = 6.0 * math.sin(2 * math.pi * t)
            zoom = 1.0 + 0.08 * math.sin(math.pi * t)
            half = side / zoom / 2
            dx = 12.0 * math.sin(2 * math.pi * t + 1.0)
            crop = portrait.rotate(angle, resample=Image.Resampling.BICUBIC, center=(cx, cy), fillcolor=(0, 0, 0))
            crop = crop.crop((cx + dx - half, cy - half * 0.8, cx + dx + half, cy + half * 1.2))
            frame = np.asarray(crop.resize((size, size), Image.Resampling.BICUBIC))
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
