"""The benchmarks behind `launch/bench.py`, one module per subcommand, and their shared timing."""
