"""The ``modelver`` command line: parse, call :mod:`modelver.api`, print."""
