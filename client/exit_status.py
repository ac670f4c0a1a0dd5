"""The CLI's exit statuses, and how it reports a failure on stderr: what went wrong, why it may have, and
which flag to look at."""

from __future__ import annotations

import sys

import grpc

from stylize_service.client.api import StylizeError
from stylize_service.client.security import ClientSecurityError

EXIT_OK = 0
EXIT_FAILED = 1  # any other error (INTERNAL, a file that cannot be written, ...)
EXIT_USAGE = 2  # bad flags, missing input files, or the server said INVALID_ARGUMENT or NOT_FOUND (a job id)
EXIT_UNAVAILABLE = 3  # the server cannot be reached (or is shutting down)
EXIT_BUSY = 4  # the server's queue is full (RESOURCE_EXHAUSTED), or a message was too large
EXIT_DEADLINE = 5  # --timeout passed
EXIT_AUTH = 6  # the server refused the credentials: UNAUTHENTICATED or PERMISSION_DENIED
EXIT_INTERRUPTED = 130  # Ctrl-C: the call was cancelled

_EXIT_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: EXIT_USAGE,
    # A job id the server does not know (or that is another client's) is a bad argument, like a missing
    # input file.
    grpc.StatusCode.NOT_FOUND: EXIT_USAGE,
    grpc.StatusCode.UNAVAILABLE: EXIT_UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED: EXIT_BUSY,
    grpc.StatusCode.DEADLINE_EXCEEDED: EXIT_DEADLINE,
    grpc.StatusCode.UNAUTHENTICATED: EXIT_AUTH,
    grpc.StatusCode.PERMISSION_DENIED: EXIT_AUTH,
    grpc.StatusCode.CANCELLED: EXIT_INTERRUPTED,
}


def report_error(err: StylizeError, server: str, label: str = "", *, mid_job: bool = False) -> int:
    """Print what went wrong and why it may have, and return the exit status for it; label: the job's
    (its content file's name); mid_job: the server had answered the call already."""
    prefix = f"{label}: " if label else ""
    if err.code is grpc.StatusCode.UNAVAILABLE and mid_job:
        # Reached once, so neither the address nor TLS is the problem.
        message = (
            f"lost the connection to the stylize server at {server} during the job ({err.details}): "
            "the server stopped or restarted, or the network failed; the job did not finish"
        )
    elif err.code is grpc.StatusCode.UNAVAILABLE:
        message = (
            f"cannot reach the stylize server at {server}, or it is shutting down ({err.details}); "
            "is it running? (--server, $STYLIZE_SERVER)"
        )
        if "unhealthy" in err.details:  # the channel's health checking found no SERVING replica
            message += "; it is up but not SERVING: still loading its model, or draining"
        else:
            # A TLS mismatch looks like a failure to connect. The details name only the last address's
            # failure (round robin tries every address of the name), so a handshake error may not show.
            message += (
                "; or do TLS settings differ? A TLS server needs --tls-ca CA (or --tls), one that "
                "requires client certificates also --tls-cert and --tls-key"
            )
    elif err.code is grpc.StatusCode.INVALID_ARGUMENT:
        message = f"the server refused the request: {err.details}"
    elif err.code is grpc.StatusCode.NOT_FOUND:
        message = (
            f"the server has no such job ({err.details}): a wrong id, another client's job (jobs belong to "
            "the token, client certificate or address that submitted them), or one deleted after its "
            "time to live"
        )
    elif err.code is grpc.StatusCode.UNIMPLEMENTED:
        message = (
            f"the server does not support this call, an older stylize-server without jobs? ({err.details})"
        )
    elif err.code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        message = f"the server is out of capacity or the message is too large: {err.details}"
    elif err.code is grpc.StatusCode.DEADLINE_EXCEEDED:
        message = f"the deadline (--timeout) passed: {err.details}"
    elif err.code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        message = f"the server refused the credentials: {err.details}"
        if "--token" not in err.details:
            message += " (--token, $STYLIZE_TOKEN)"
    else:
        message = f"{err.code.name}: {err.details}"
    print(f"stylize: error: {prefix}{message}", file=sys.stderr)
    return _EXIT_BY_CODE.get(err.code, EXIT_FAILED)


def report_security_error(err: ClientSecurityError) -> int:
    """Print which TLS or token flag cannot be used, and why; EXIT_USAGE."""
    flag = "--" + err.argument.replace("_", "-")
    print(f"stylize: error: {flag}: {err.problem}", file=sys.stderr)
    return EXIT_USAGE
