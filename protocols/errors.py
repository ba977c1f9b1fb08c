"""Errors raised by the wire protocol and transports."""


class ProtocolError(ValueError):
    """A message or peer broke the protocol (bad header, wrong lengths, limits exceeded)."""
