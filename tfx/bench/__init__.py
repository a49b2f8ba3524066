"""Benchmarks run by `tfx bench`: they print a table, write CSV and PNG, and compare against a
baseline measured in the same run. Speed is measured here, never asserted in tests."""
