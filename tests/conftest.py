"""Shared fixtures live in tests/support/; each real part has its own module."""

pytest_plugins = [
    "tests.support.pg",
    "tests.support.moto",
    "tests.support.eslserver",
    "tests.support.daemon",
    "tests.support.jwks",
]
