"""``python -m task_orchestrator_mcp``: the same as the ``task-orchestrator-mcp`` command."""

import sys

from task_orchestrator_mcp.cli import main

sys.exit(main())
