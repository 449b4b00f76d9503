"""The application layer: commands that wire several stages together.

Stage packages (`ingest/`, `processors/`, `sinks/`) import only themselves, `schemas/`
and the `postback/` core; what needs more than one stage at once lives here.
"""
