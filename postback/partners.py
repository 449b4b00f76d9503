"""Partner configuration: advertisers and offers, loaded from ONE TOML file.

What every caller imports. The parts live in their own modules:

- ``postback.partner_model``: the frozen model (``Advertiser``, ``Offer``,
  ``PartnerConfig``, and for commissions ``Account``, ``Affiliate``, ``PayoutRule``,
  ``Tier``, ``Caps``, ``Quality``, and for outbound postbacks ``OutboundEndpoint``), its
  lookups, constants and ``PartnerConfigError``;
- ``postback.partner_loader``: the TOML file format (documented there) and its strict
  validation (``load_partner_config``, ``parse_partner_config``);
- ``postback.landing_url``: offer landing URL templates.

A commented, loadable example lives in ``deploy/partners.example.toml``.
"""

from __future__ import annotations

from postback.landing_url import LANDING_PLACEHOLDERS
from postback.partner_loader import load_partner_config, parse_partner_config
from postback.partner_model import (
    AFFILIATE_STATUSES,
    AUTH_MODES,
    CANONICAL_EVENTS,
    DEFAULT_ATTRIBUTION_WINDOW_DAYS,
    DEFAULT_CLAWBACK_DAYS,
    DEFAULT_DEDUPE_HORIZON_DAYS,
    DEFAULT_GIVE_UP_AFTER_S,
    DEFAULT_ONE_TIME_EVENTS,
    DEFAULT_OUTBOUND_MAX_CONCURRENCY,
    DEFAULT_OUTBOUND_RATE_PER_S,
    DEFAULT_OUTBOUND_TIMEOUT_S,
    DEFAULT_RETRY_SCHEDULE_S,
    DEFAULT_TIMESTAMP_TOLERANCE_S,
    MIN_SECRET_LEN,
    ON_CAP_ACTIONS,
    OUTBOUND_MACROS,
    OUTBOUND_METHODS,
    PAYOUT_KINDS,
    RETRY_TAIL_S,
    STATUSES,
    Account,
    Advertiser,
    Affiliate,
    Caps,
    IPNetwork,
    Offer,
    OutboundEndpoint,
    PartnerConfig,
    PartnerConfigError,
    PayoutRule,
    Quality,
    Tier,
    check_outbound_url,
    is_canonical_event,
)

__all__ = [
    "AFFILIATE_STATUSES",
    "AUTH_MODES",
    "CANONICAL_EVENTS",
    "DEFAULT_ATTRIBUTION_WINDOW_DAYS",
    "DEFAULT_CLAWBACK_DAYS",
    "DEFAULT_DEDUPE_HORIZON_DAYS",
    "DEFAULT_GIVE_UP_AFTER_S",
    "DEFAULT_ONE_TIME_EVENTS",
    "DEFAULT_OUTBOUND_MAX_CONCURRENCY",
    "DEFAULT_OUTBOUND_RATE_PER_S",
    "DEFAULT_OUTBOUND_TIMEOUT_S",
    "DEFAULT_RETRY_SCHEDULE_S",
    "DEFAULT_TIMESTAMP_TOLERANCE_S",
    "LANDING_PLACEHOLDERS",
    "MIN_SECRET_LEN",
    "ON_CAP_ACTIONS",
    "OUTBOUND_MACROS",
    "OUTBOUND_METHODS",
    "PAYOUT_KINDS",
    "RETRY_TAIL_S",
    "STATUSES",
    "Account",
    "Advertiser",
    "Affiliate",
    "Caps",
    "IPNetwork",
    "Offer",
    "OutboundEndpoint",
    "PartnerConfig",
    "PartnerConfigError",
    "PayoutRule",
    "Quality",
    "Tier",
    "check_outbound_url",
    "is_canonical_event",
    "load_partner_config",
    "parse_partner_config",
]
