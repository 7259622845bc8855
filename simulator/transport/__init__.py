"""Sockets, framing and transport-level faults; personalities never touch a socket."""
