"""The chaos run (``just chaos``): a Hydra workload under random faults, checked against the database."""
