"""fastavatar-stream: streaming, incremental 3D Gaussian head avatars from video (FastAvatar)."""

__version__ = "0.1.0"
