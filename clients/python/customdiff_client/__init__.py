"""The light client of customdiff's gRPC API (clients/python/README.md)."""

from customdiff_client.client import Client, Retry, TLS, concept_ref
from customdiff_client.errors import CallError, FieldViolation, JobFailed, QuotaViolation

__all__ = ["CallError", "Client", "FieldViolation", "JobFailed", "QuotaViolation", "Retry", "TLS", "concept_ref"]
