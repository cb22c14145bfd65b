"""Shipped cost-model scenarios (TOML files read by ``flsplit.sim.scenario_files.load_scenario``)."""
