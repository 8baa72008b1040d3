"""task-orchestrator-mcp: a durable, exactly-once task queue for AI agents over MCP."""

__version__ = "0.1.0"
