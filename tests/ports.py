"""Ports for servers that tests start in child processes (no torch here: the browser harness
imports it too)."""

from __future__ import annotations

import socket


def reserved_port() -> int:
    """A free port of 127.0.0.1 that no other process is handed for the next minute.

    A port merely found free (bound to port 0, then closed) may be taken by another process of
    a shared machine before the child binds it. This one is left in TIME_WAIT by a connection
    we close from the server's side: the OS hands it to no one asking for a free port (a bind
    to port 0, an outgoing connection), yet a server that sets SO_REUSEADDR (Tornado, hence
    Jupyter and Voilà; torch's TCPStore; the classroom app's own check) binds it at once.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        address = listener.getsockname()
        with socket.create_connection(address):
            accepted, _ = listener.accept()
            accepted.close()  # the server's side closes first: its port waits in TIME_WAIT
        return address[1]
