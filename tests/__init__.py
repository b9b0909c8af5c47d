"""openalign's tests. A package, so that the shared helpers are imported by their full names (tests.parity,
tests.cli_fixtures, tests.train_data, tests.dist_worker) rather than as top-level modules that only resolve
because pytest puts this folder on sys.path; shared fixtures live in conftest.py."""
