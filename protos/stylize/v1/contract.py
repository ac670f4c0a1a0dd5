"""What both sides of stylize.v1 assume beyond the generated code: written once, here beside the proto,
since the client may import nothing of the server's."""

from __future__ import annotations

from stylize_service.protos.stylize.v1 import stylize_pb2 as pb

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["StyleTransfer"].full_name  # "stylize.v1.StyleTransfer"
# The largest message, MiB: the server's default limit (--max-message-mb), and the client's unless told.
# Images travel inside messages, so this bounds an upload and a result.
DEFAULT_MAX_MESSAGE_MB = 64
