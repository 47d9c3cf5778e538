"""`python -m target_node [flags]`: run a target node (the same as `specwire target`)."""

import sys

from services.node_process import run_node
from target_node.config import TargetConfig
from target_node.server import start_target

if __name__ == "__main__":
    sys.exit(run_node("specwire target", TargetConfig, start_target, sys.argv[1:]))
