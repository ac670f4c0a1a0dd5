"""The client's one exception for failed calls, in a module of its own so that api.py and reattach.py can
both raise it (api.py re-exports it: import it from there)."""

from __future__ import annotations

import grpc

# grpc.StatusCode by its number (google.rpc.Code), e.g. for JobError.code.
_CODES = {code.value[0]: code for code in grpc.StatusCode}


class StylizeError(Exception):
    """A call failed; code is the grpc.StatusCode and details the server's (or grpc's) message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def from_rpc(cls, error: grpc.RpcError) -> StylizeError:
        code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
        details = error.details() if isinstance(error, grpc.Call) else str(error)
        return cls(code, details or code.name)

    @classmethod
    def from_number(cls, number: int, details: str) -> StylizeError:
        """From a status code's number (JobError.code); UNKNOWN for a number grpc does not know."""
        code = _CODES.get(number, grpc.StatusCode.UNKNOWN)
        return cls(code, details or code.name)
