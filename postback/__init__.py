"""postback-pipeline: a Kafka-based streaming pipeline for S2S conversion postbacks.

The `postback` package holds what every stage shares: typed configuration, topic
definitions, Kafka client wrappers and the `postback` command line. The stages live
in the sibling packages `ingest`, `processors` and `sinks`; the local stack in `deploy`.
"""

__version__ = "0.1.0"
