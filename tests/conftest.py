"""Root of the test suite: registers the fixture plugins, one per area."""

pytest_plugins = [
    "tests.fixtures.model",
    "tests.fixtures.services",
    "tests.fixtures.worker",
    "tests.fixtures.throwaway",  # after the modules it builds on
]
