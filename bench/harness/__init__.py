"""The benchmark's engine: sandboxes, agents, accounting, metering, verification, results."""
