"""The fault suite (`python -m tests.faults`, tests/test_faults.py): harness.py runs and judges the
cases, catalogue.py holds them, __main__.py is the command line."""
