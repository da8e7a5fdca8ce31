"""The fleet: approvals and settings, the agent registry."""
