"""Outbound postbacks: conversions -> HTTP requests to affiliate endpoints (see `sinks.outbound.delivery`).

The endpoints are partner configuration (`postback.partner_model.OutboundEndpoint`).
`template` renders URL macros, `request` builds the (signed) request and its redacted
URL, `guard` refuses loopback, private and metadata targets, before the request and at
connect time.
"""
