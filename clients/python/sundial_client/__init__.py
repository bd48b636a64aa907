"""A typed client for Sundial's HTTP API (sync and asyncio), and the verifier receivers use
for Sundial's webhook signatures. Standard library only."""

from .client import (
    AsyncClient,
    Client,
    DeadLetter,
    Execution,
    Job,
    SundialError,
    verify_signature,
    verify_signature_v2,
)

__all__ = ["AsyncClient", "Client", "DeadLetter", "Execution", "Job", "SundialError", "verify_signature", "verify_signature_v2"]
