"""Launchers for the processes of a multi-slot trial, as Determined's
(`python3 -m determined.launch.torch_distributed ...`)."""
