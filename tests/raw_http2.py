"""One gRPC call as raw HTTP/2 (with the h2 library), for what grpc's own client refuses to send: a
:path with a newline in it, or a metadata value that is not printable ASCII. Hostile clients are not
bound by grpc's client, so the tests and scripts/hostile.py must not be either. Loopback only.
"""

from __future__ import annotations

import socket
import struct

import h2.config
import h2.connection
import h2.events


def raw_call(
    host: str,
    port: int,
    path: bytes,
    message: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
    timeout: float = 5.0,
) -> dict[bytes, bytes]:
    """Send one unary gRPC request (plaintext) and return the response's headers and trailers merged
    (b"grpc-status", b"grpc-message", ...); raises TimeoutError when nothing ends the stream in time."""
    config = h2.config.H2Configuration(
        client_side=True, header_encoding=None, validate_outbound_headers=False
    )
    connection = h2.connection.H2Connection(config=config)
    with socket.create_connection((host, port), timeout=timeout) as sock:
        connection.initiate_connection()
        stream = connection.get_next_available_stream_id()
        connection.send_headers(
            stream,
            [
                (b":method", b"POST"),
                (b":scheme", b"http"),
                (b":path", path),
                (b":authority", f"{host}:{port}".encode()),
                (b"content-type", b"application/grpc"),
                (b"te", b"trailers"),
                *(headers or []),
            ],
        )
        # A gRPC message: no compression, its length, the protobuf bytes.
        connection.send_data(stream, b"\x00" + struct.pack(">I", len(message)) + message, end_stream=True)
        sock.sendall(connection.data_to_send())
        received: dict[bytes, bytes] = {}
        while True:
            data = sock.recv(65536)
            if not data:
                return received
            for event in connection.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    received.update((bytes(k), bytes(v)) for k, v in event.headers)
                if isinstance(event, h2.events.DataReceived):
                    connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    return received
            sock.sendall(connection.data_to_send())
