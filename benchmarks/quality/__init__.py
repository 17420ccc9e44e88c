"""The testbed quality study: the paper's ablation ladder, offline VBench-style video
dimensions and per-layer error recording (driven by ``python -m benchmarks.testbed_quality``)."""
