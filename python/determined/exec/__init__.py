"""Entry points the node runs for trials (`python3 -m determined.exec.harness`)."""
