"""Shipped cost-model scenarios (TOML files read by ``flsplit.scenario.load_scenario``)."""
