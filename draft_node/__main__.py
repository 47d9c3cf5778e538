"""`python -m draft_node [flags]`: run a draft node (the same as `specwire draft`)."""

import sys

from draft_node.config import DraftConfig
from draft_node.server import start_draft
from services.node_process import run_node

if __name__ == "__main__":
    sys.exit(run_node("specwire draft", DraftConfig, start_draft, sys.argv[1:]))
