"""memsafe's benchmarks: ``python -m bench {perf,ops} ...`` (see each module's docstring)."""
