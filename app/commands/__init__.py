"""One module per `postback` subcommand: each has `register(sub)` adding its parser and handler.

Commands resolve where Kafka and ClickHouse are (`app.endpoints`) and pass the addresses
to the stage they run; the stages never look them up themselves.
"""
