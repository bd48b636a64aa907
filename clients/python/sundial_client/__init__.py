"""A typed client for Sundial's HTTP API (sync and asyncio), and what receivers use for
Sundial's webhooks: the signature verifiers and the fencing token. Standard library only."""

from .client import (
    AsyncClient,
    Client,
    DeadLetter,
    Execution,
    Job,
    SundialError,
    fencing_term,
    fencing_token,
    verify_signature,
    verify_signature_v2,
)

__all__ = [
    "AsyncClient",
    "Client",
    "DeadLetter",
    "Execution",
    "Job",
    "SundialError",
    "fencing_term",
    "fencing_token",
    "verify_signature",
    "verify_signature_v2",
]
