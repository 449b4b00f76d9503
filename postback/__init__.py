"""postback-pipeline: a Kafka-based streaming pipeline for S2S conversion postbacks.

The `postback` package is the shared core every stage may import: typed configuration,
topic definitions (and consumer group names), Kafka producer and admin helpers, the
partner configuration (model, loader, landing URL templates, presets, the aliased view
of a postback), partner-side signing and the ClickHouse client factory. It imports no
stage. The stages live in the sibling packages `ingest`, `processors` and `sinks`; the
local stack in `deploy`; the `postback` command line, which wires them together, in `app`.
"""

__version__ = "0.1.0"
