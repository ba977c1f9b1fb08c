"""Wire format, ZeroMQ and WebRTC transports, PLY files. Depends on numpy/msgpack/pyzmq only (no torch)."""
