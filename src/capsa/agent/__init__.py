"""The guest agent: wire format (shared by host and guest), host client and the in-guest agent."""
