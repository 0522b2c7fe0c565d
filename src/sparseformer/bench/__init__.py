"""Measurement: parameter and FLOP counts, throughput, latency and memory, their reports, and
the published accuracies they are drawn against."""
