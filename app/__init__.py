"""The application layer: the `postback` command line and everything that wires stages together.

Stage packages (`ingest/`, `processors/`, `sinks/`) import only themselves, `schemas/`
and the `postback/` core, and take their endpoints as parameters; `deploy/` imports only
`postback.config`. Only this package may import all of them: the CLI (`app.cli`, a
module per subcommand in `app.commands`), `postback run`, `postback demo` (`app.demo`),
endpoint discovery (`app.endpoints`: settings first, then the local stack's
`stack.json`) and `postback partners explain` (`app.explain`).
"""
