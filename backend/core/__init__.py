"""Torch-free state and rules shared by the web process and the workers: store, ledger, registry, queues, catalog."""
