"""Alerting configuration, in code or from `OTEL_BGTASKS_ALERT_*` environment variables.

Channels and delivery options come from the variables listed in `AlertingConfig.from_env`;
rules from `OTEL_BGTASKS_ALERT_RULES`, a comma-separated list of rule specs::

    consecutive_failures[:N]                      ConsecutiveFailures(N), default 3
    failure_ratio[:RATIO[/WINDOW_S[/MIN_RUNS]]]   FailureRatio, default 0.1/300/10
    circuit_opened                                CircuitOpened()
    dead_letter_moves[:MORE_THAN[/WINDOW_S]]      each move; or more than N moves in WINDOW_S
    slow_task:SECONDS                             SlowTask(SECONDS)

each optionally followed by `@info`, `@warning`, `@error` or `@critical` (the severity), e.g.
`consecutive_failures:3, failure_ratio:0.5/300/10, circuit_opened, slow_task:30@warning`.
Omitted values take the constructor's defaults; rule names and severities are
case-insensitive, spaces around items and values are ignored. A rule is named after its kind;
a kind listed more than once is named after each spec (`dead_letter_moves:5`), so alerts and
metrics tell the rules apart. `tasks=`, `cooldown=` and custom rules need code.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import get_args

from otel_bgtasks.alerting.alerts import Severity
from otel_bgtasks.alerting.notifiers import (
    EmailNotifier,
    LogNotifier,
    Notifier,
    SlackNotifier,
    SmtpTls,
    WebhookNotifier,
)
from otel_bgtasks.alerting.rules import (
    CircuitOpened,
    ConsecutiveFailures,
    DeadLetterMoves,
    FailureRatio,
    Rule,
    SlowTask,
    default_rules,
)
from otel_bgtasks.alerting.secret import Secret
from otel_bgtasks.errors import ConfigurationError

__all__ = [
    "ENV_PREFIX",
    "RULES_VARIABLE",
    "AlertingConfig",
    "AlertingConfigError",
    "DeliveryOptions",
    "RuleSpec",
    "SmtpConfig",
    "parse_rules",
    "rules_from_env",
]

ENV_PREFIX = "OTEL_BGTASKS_ALERT_"

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


_TLS_MODES: dict[str, SmtpTls] = {"starttls": "starttls", "tls": "tls", "none": "none"}


def _smtp_tls(value: str) -> SmtpTls:
    mode = _TLS_MODES.get(value.strip().lower())
    if mode is not None:
        return mode
    raise AlertingConfigError(
        f"{ENV_PREFIX}SMTP_TLS={value!r} is not valid: use starttls, tls or none"
    )


class AlertingConfigError(ConfigurationError):
    """The alerting configuration is invalid; the message names the setting to fix."""


# -- rules from text -----------------------------------------------------------------------------

RULES_VARIABLE = ENV_PREFIX + "RULES"

_Number = int | float


@dataclass(frozen=True, slots=True)
class _Form:
    """One rule kind of the spec grammar: its constructor and positional parameters."""

    factory: Callable[..., Rule]
    params: tuple[tuple[str, type[int] | type[float]], ...]
    required: int
    usage: str


_FORMS: dict[str, _Form] = {
    "consecutive_failures": _Form(
        ConsecutiveFailures, (("n", int),), 0, "consecutive_failures[:N]"
    ),
    "failure_ratio": _Form(
        FailureRatio,
        (("threshold", float), ("window_seconds", float), ("min_runs", int)),
        0,
        "failure_ratio[:RATIO[/WINDOW_S[/MIN_RUNS]]]",
    ),
    "circuit_opened": _Form(CircuitOpened, (), 0, "circuit_opened"),
    "dead_letter_moves": _Form(
        DeadLetterMoves,
        (("more_than", int), ("window_seconds", float)),
        0,
        "dead_letter_moves[:MORE_THAN[/WINDOW_S]]",
    ),
    "slow_task": _Form(SlowTask, (("threshold_seconds", float),), 1, "slow_task:SECONDS"),
}

_VALID_FORMS = (
    ", ".join(form.usage for form in _FORMS.values())
    + "; each optionally followed by @info, @warning, @error or @critical"
)

_TYPE_NAMES: dict[type[int] | type[float], str] = {int: "an integer", float: "a number"}


def _spec_error(spec: str, reason: str) -> AlertingConfigError:
    return AlertingConfigError(
        f"alert rule {spec!r} is not valid: {reason}. Valid forms: {_VALID_FORMS}"
    )


def _arity(kind: str, form: _Form, given: int) -> str | None:
    if form.required <= given <= len(form.params):
        return None
    if not form.params:
        return f"{kind} takes no value, got {given}"
    if form.required == len(form.params):
        expected = str(form.required)
    else:
        expected = f"{form.required} to {len(form.params)}"
    names = "/".join(param for param, _ in form.params)
    return f"{kind} takes {expected} value(s) ({names}), got {given}"


def _build(
    kind: str, args: tuple[_Number, ...], severity: Severity | None, name: str | None
) -> Rule:
    form = _FORMS[kind]
    values = {param: value for (param, _), value in zip(form.params, args, strict=False)}
    return form.factory(**values, severity=severity, name=name)


def _problem(kind: str, args: tuple[_Number, ...], severity: Severity | None) -> str | None:
    """Why a rule spec is not valid, or None."""
    form = _FORMS.get(kind)
    if form is None:
        return f"unknown rule {kind!r}" if kind else "no rule name"
    arity = _arity(kind, form, len(args))
    if arity is not None:
        return arity
    for (param, number), value in zip(form.params, args, strict=False):
        allowed = (int,) if number is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, allowed):
            return f"{param} must be {_TYPE_NAMES[number]}, got {value!r}"
        if not math.isfinite(value):
            return f"{param} must be a finite number, got {value!r}"
    try:
        _build(kind, args, severity, None)
    except ValueError as exc:  # the rule's own check, e.g. "ConsecutiveFailures(n=0): ..."
        return str(exc)
    return None


def _format_number(value: _Number) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value)


@dataclass(frozen=True, slots=True)
class RuleSpec:
    """A rule described as data: one item of `OTEL_BGTASKS_ALERT_RULES`.

    `build()` makes a new rule each time (rules keep state, so two processors never share
    one). Checked when created: a spec that exists can be built. `str(spec)` is its text
    (`failure_ratio:0.5/300/10@critical`).

    Attributes:
        kind: `consecutive_failures`, `failure_ratio`, `circuit_opened`, `dead_letter_moves`
            or `slow_task`.
        args: the leading positional arguments of the rule's constructor, in order
            (`failure_ratio`: threshold, window_seconds, min_runs); the rest take defaults.
        severity: the rule's severity (default: the rule's own).
        name: the rule's name (default: `kind`).

    Raises:
        AlertingConfigError: unknown kind or severity, wrong number or type of values, or a
            value the rule refuses (the message says which, and lists the valid forms).
    """

    kind: str
    args: tuple[_Number, ...] = ()
    severity: Severity | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "args", tuple(self.args))
        severity: Severity | str | None = self.severity
        if isinstance(severity, str) and not isinstance(severity, Severity):
            try:
                object.__setattr__(self, "severity", Severity(severity.strip().lower()))
            except ValueError:
                raise _spec_error(self.kind, f"unknown severity {severity!r}") from None
        reason = _problem(self.kind, self.args, self.severity)
        if reason is not None:
            raise _spec_error(str(self), reason)

    def __str__(self) -> str:
        text = self.kind
        if self.args:
            text += ":" + "/".join(_format_number(a) for a in self.args)
        if self.severity is not None:
            text += f"@{self.severity.value}"
        return text

    @property
    def rule_name(self) -> str:
        """The name the built rule gets (`name`, or the kind)."""
        return self.name if self.name is not None else self.kind

    def build(self) -> Rule:
        """A new rule with this spec's values."""
        return _build(self.kind, self.args, self.severity, self.name)

    @classmethod
    def parse(cls, text: str) -> RuleSpec:
        """Read one spec, like `failure_ratio:0.5/300/10` or `slow_task:30@warning`.

        Raises:
            AlertingConfigError: the spec is not valid; the message names it as written.
        """
        spec = text.strip()
        body, at, severity_text = spec.partition("@")
        severity: Severity | None = None
        if at:
            try:
                severity = Severity(severity_text.strip().lower())
            except ValueError:
                raise _spec_error(spec, f"unknown severity {severity_text.strip()!r}") from None
        kind_text, colon, values_text = body.partition(":")
        kind = kind_text.strip().lower()
        form = _FORMS.get(kind)
        if form is None:
            raise _spec_error(spec, f"unknown rule {kind!r}" if kind else "no rule name")
        tokens = [token.strip() for token in values_text.split("/")] if colon else []
        if any(not token for token in tokens):
            raise _spec_error(spec, "a value is empty (nothing after ':' or around '/')")
        arity = _arity(kind, form, len(tokens))
        if arity is not None:
            raise _spec_error(spec, arity)
        args: list[_Number] = []
        for (param, number), token in zip(form.params, tokens, strict=False):
            try:
                args.append(number(token))
            except ValueError:
                wrong = f"{param} must be {_TYPE_NAMES[number]}, got {token!r}"
                raise _spec_error(spec, wrong) from None
        reason = _problem(kind, tuple(args), severity)
        if reason is not None:
            raise _spec_error(spec, reason)
        return cls(kind, tuple(args), severity)


def parse_rules(text: str) -> tuple[RuleSpec, ...] | None:
    """Read a comma-separated list of rule specs (the `OTEL_BGTASKS_ALERT_RULES` grammar).

    A blank text means "not set" (None); empty items are skipped. A kind listed more than
    once is named after each spec (`dead_letter_moves`, `dead_letter_moves:5`).

    Raises:
        AlertingConfigError: a spec is not valid, the same rule is listed twice, or the text
            holds only commas. Nothing is returned in part.
    """
    if not text.strip():
        return None
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise AlertingConfigError(f"{text!r} lists no alert rule. Valid forms: {_VALID_FORMS}")
    specs = [RuleSpec.parse(item) for item in items]
    repeated = {kind for kind, count in Counter(s.kind for s in specs).items() if count > 1}
    named = tuple(
        dataclasses.replace(s, name=str(dataclasses.replace(s, severity=None)))
        if s.kind in repeated
        else s
        for s in specs
    )
    _check_unique(named, items)
    return named


def _check_unique(specs: Sequence[RuleSpec], shown: Sequence[str] | None = None) -> None:
    """Two rules with one name could not be told apart in alerts and metrics."""
    first: dict[str, int] = {}
    for index, spec in enumerate(specs):
        earlier = first.setdefault(spec.rule_name, index)
        if earlier != index:
            texts = shown if shown is not None else [str(s) for s in specs]
            raise AlertingConfigError(
                f"alert rules {texts[earlier]!r} and {texts[index]!r} are the same rule "
                f"(both named {spec.rule_name!r}): list each rule once"
            )


def rules_from_env(environ: Mapping[str, str] | None = None) -> tuple[RuleSpec, ...] | None:
    """The rules in `OTEL_BGTASKS_ALERT_RULES` (default: `os.environ`); None if unset or blank.

    Raises:
        AlertingConfigError: the value is not valid; the message names the variable and the
            bad spec, and lists the valid forms.
    """
    env = os.environ if environ is None else environ
    try:
        return parse_rules(env.get(RULES_VARIABLE, ""))
    except AlertingConfigError as exc:
        raise AlertingConfigError(f"{RULES_VARIABLE}: {exc}") from None


@dataclass(frozen=True, slots=True)
class DeliveryOptions:
    """How notifications leave the process, off the task path.

    Attributes:
        queue_size: notifications waiting for delivery at most; more are dropped and counted
            (`bgtasks.alerts.sent{bgtasks.alert.outcome="dropped"}`).
        max_concurrency: deliveries in flight at once (delivery threads).
        max_attempts: tries per notification, the first included.
        backoff_initial, backoff_max: exponential backoff between tries, with jitter (s).
    """

    queue_size: int = 256
    max_concurrency: int = 4
    max_attempts: int = 3
    backoff_initial: float = 0.5
    backoff_max: float = 10.0

    def __post_init__(self) -> None:
        for name in ("queue_size", "max_concurrency", "max_attempts"):
            if getattr(self, name) < 1:
                raise AlertingConfigError(f"DeliveryOptions({name}=...) must be >= 1")
        if self.backoff_initial < 0 or self.backoff_max < self.backoff_initial:
            raise AlertingConfigError(
                "DeliveryOptions: need 0 <= backoff_initial <= backoff_max "
                f"(got {self.backoff_initial!r}, {self.backoff_max!r})"
            )


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    """Where and how alert e-mails are sent; see `EmailNotifier` for the fields."""

    host: str
    sender: str
    recipients: tuple[str, ...]
    port: int | None = None
    tls: SmtpTls = "starttls"
    username: str | None = None
    password: Secret | None = None

    def __post_init__(self) -> None:
        if self.tls not in get_args(SmtpTls):
            raise AlertingConfigError(
                f"SMTP TLS mode {self.tls!r} is not valid: use starttls, tls or none "
                f"({ENV_PREFIX}SMTP_TLS)"
            )
        if not self.sender or not self.recipients:
            raise AlertingConfigError(
                f"SMTP alerting on {self.host!r} needs a sender and at least one recipient: "
                f"set {ENV_PREFIX}SMTP_FROM and {ENV_PREFIX}SMTP_TO (comma-separated)"
            )
        if self.password is not None and not self.username:
            raise AlertingConfigError(
                f"an SMTP password is set but no user: set {ENV_PREFIX}SMTP_USER"
            )


@dataclass(frozen=True, slots=True)
class AlertingConfig:
    """Which channels get alerts, how they are delivered, and (optionally) which rules run.

    Build it in code, or with `AlertingConfig.from_env()`; `notifiers()` builds the notifiers
    and `build_rules()` the rules. Secrets are `Secret`s, so printing a config shows
    `**********` in their place. `rules` is None unless rules are configured (from
    `OTEL_BGTASKS_ALERT_RULES`, or e.g. `rules=parse_rules("slow_task:30")` in code); then
    `install_alerting` uses `default_rules()`.
    """

    webhook_url: Secret | None = None
    slack_webhook_url: Secret | None = None
    smtp: SmtpConfig | None = None
    log: bool = False
    timeout: float = 5.0
    delivery: DeliveryOptions = field(default_factory=DeliveryOptions)
    rules: tuple[RuleSpec, ...] | None = None

    def __post_init__(self) -> None:
        if not self.timeout > 0:
            raise AlertingConfigError(f"alert timeout must be > 0 seconds, got {self.timeout!r}")
        if self.rules is not None:
            rules = tuple(self.rules)
            if not all(isinstance(spec, RuleSpec) for spec in rules):
                raise AlertingConfigError(
                    "AlertingConfig(rules=...) takes RuleSpecs (see parse_rules); pass Rule "
                    "objects to install_alerting(rules=...) instead"
                )
            _check_unique(rules)
            object.__setattr__(self, "rules", rules)

    def build_rules(self) -> list[Rule]:
        """New rules from `rules`, or `default_rules()` when no rule is configured."""
        if self.rules is None:
            return default_rules()
        return [spec.build() for spec in self.rules]

    def notifiers(self) -> list[Notifier]:
        """One notifier per configured channel (maybe none)."""
        notifiers: list[Notifier] = []
        if self.webhook_url is not None:
            notifiers.append(WebhookNotifier(self.webhook_url, timeout=self.timeout))
        if self.slack_webhook_url is not None:
            notifiers.append(SlackNotifier(self.slack_webhook_url, timeout=self.timeout))
        smtp = self.smtp
        if smtp is not None:
            notifiers.append(
                EmailNotifier(
                    smtp.host,
                    smtp.port,
                    sender=smtp.sender,
                    recipients=smtp.recipients,
                    tls=smtp.tls,
                    username=smtp.username,
                    password=smtp.password,
                    timeout=self.timeout,
                )
            )
        if self.log:
            notifiers.append(LogNotifier())
        return notifiers

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> AlertingConfig:
        """Read the `OTEL_BGTASKS_ALERT_*` variables (default: `os.environ`).

        Variables: `WEBHOOK_URL`, `SLACK_WEBHOOK_URL`; `SMTP_HOST`, `SMTP_PORT`, `SMTP_USER`,
        `SMTP_PASSWORD`, `SMTP_FROM`, `SMTP_TO` (comma-separated), `SMTP_TLS` (`starttls` |
        `tls` | `none`); `LOG` (true: also log alerts); `TIMEOUT` (s per request);
        `QUEUE_SIZE`, `MAX_CONCURRENCY`, `MAX_ATTEMPTS`; `RULES` (comma-separated rule specs,
        see `parse_rules` and this module's docstring). Unset or empty means the default
        (for `RULES`: `rules=None`).

        Raises:
            AlertingConfigError: a value is malformed or a setting is incomplete.
        """
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = env.get(ENV_PREFIX + name, "").strip()
            return value or None

        def flag(name: str, default: bool) -> bool:
            value = get(name)  # empty or blank is unset, as for the OTEL_BGTASKS_* variables
            if value is None:
                return default
            if value.lower() in _TRUE | _FALSE:
                return value.lower() in _TRUE
            raise AlertingConfigError(f"{ENV_PREFIX}{name}={value!r}: use true or false")

        def secret(name: str) -> Secret | None:
            value = get(name)
            return Secret(value) if value is not None else None

        def number(name: str, kind: type[int] | type[float], default: float) -> float:
            value = get(name)
            if value is None:
                return default
            try:
                return kind(value)
            except ValueError:
                raise AlertingConfigError(
                    f"{ENV_PREFIX}{name}={value!r} is not a valid {kind.__name__}"
                ) from None

        for name in ("WEBHOOK_URL", "SLACK_WEBHOOK_URL"):
            value = get(name)
            if value is not None and not value.startswith(("http://", "https://")):
                # The value is not echoed: it carries the webhook's credentials.
                raise AlertingConfigError(f"{ENV_PREFIX}{name} must be an http:// or https:// URL")

        smtp: SmtpConfig | None = None
        host = get("SMTP_HOST")
        if host is not None:
            tls = _smtp_tls(get("SMTP_TLS") or "starttls")
            port = get("SMTP_PORT")
            smtp = SmtpConfig(
                host=host,
                port=int(number("SMTP_PORT", int, 0)) if port is not None else None,
                sender=get("SMTP_FROM") or "",
                recipients=tuple(r.strip() for r in (get("SMTP_TO") or "").split(",") if r.strip()),
                tls=tls,
                username=get("SMTP_USER"),
                password=secret("SMTP_PASSWORD"),
            )
        else:
            orphans = [
                n
                for n in ("SMTP_PORT", "SMTP_USER", "SMTP_PASSWORD", "SMTP_FROM", "SMTP_TO")
                if get(n) is not None
            ]
            if orphans:
                raise AlertingConfigError(
                    f"{', '.join(ENV_PREFIX + n for n in orphans)} set without "
                    f"{ENV_PREFIX}SMTP_HOST: set the host too, or unset them"
                )

        log = flag("LOG", False)
        rules = rules_from_env(env)
        defaults = DeliveryOptions()
        return cls(
            webhook_url=secret("WEBHOOK_URL"),
            slack_webhook_url=secret("SLACK_WEBHOOK_URL"),
            smtp=smtp,
            log=log,
            timeout=number("TIMEOUT", float, 5.0),
            delivery=DeliveryOptions(
                queue_size=int(number("QUEUE_SIZE", int, defaults.queue_size)),
                max_concurrency=int(number("MAX_CONCURRENCY", int, defaults.max_concurrency)),
                max_attempts=int(number("MAX_ATTEMPTS", int, defaults.max_attempts)),
            ),
            rules=rules,
        )
