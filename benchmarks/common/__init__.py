"""Infrastructure shared by the benchmark drivers: run metadata and result files, the
random-weight A14B builder, meters, and small comparison and input helpers."""
