"""Measuring models: evaluation, statistics, fidelity, the gate, latency, CPU detection, runtimes."""
