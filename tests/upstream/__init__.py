"""Support for running Dynamiq's own checkpoint tests against our backend: see tests/test_upstream_suite.py."""
