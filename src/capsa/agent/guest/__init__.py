"""The in-guest side of the agent (runs in the sandbox guest, not on the host)."""
