"""The reference agent, and a library vendors can embed."""

from relay.agent.updater import Agent, AgentConfig, RunSummary, default_agent_id, run_once_async

__all__ = ["Agent", "AgentConfig", "RunSummary", "default_agent_id", "run_once_async"]
