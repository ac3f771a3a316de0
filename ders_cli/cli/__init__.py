"""The ``ders`` command: a thin Typer layer over the library (see ``app``)."""
