"""Stage benchmarks: each reports its throughput as a ratio against the bare library in the same run."""
