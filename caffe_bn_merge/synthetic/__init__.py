"""Generated nets with realistic statistics, for tests, benchmarks and the bundled samples."""
