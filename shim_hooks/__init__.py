"""Host-side integration: the shim v2 proxy, the runc-compatible wrapper and OCI hooks."""
