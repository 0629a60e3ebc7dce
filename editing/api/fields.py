"""Serializer fields whose error messages name the field, the rejected value and the accepted range."""

from __future__ import annotations

import math

from django.utils.translation import gettext as _
from django.utils.translation import pgettext_lazy
from rest_framework import serializers

MAX_ECHO_CHARS = 40

# Request fields as error messages name them: the field itself in English, and in Japanese the on-screen
# label with the field in parentheses, so both web page users and API clients recognize it.
FIELD_LABELS = {
    "seed": pgettext_lazy("request field in messages", "seed"),
    "steps": pgettext_lazy("request field in messages", "steps"),
    "guidance": pgettext_lazy("request field in messages", "guidance"),
    "image": pgettext_lazy("request field in messages", "image"),
    "mask": pgettext_lazy("request field in messages", "mask"),
    "prompt": pgettext_lazy("request field in messages", "prompt"),
    "template": pgettext_lazy("request field in messages", "template"),
    "name": pgettext_lazy("request field in messages", "name"),
    "model": pgettext_lazy("request field in messages", "model"),
}


def field_label(field: str) -> str:
    """Return how error messages name the request field `field` in the active language."""
    return str(FIELD_LABELS.get(field, field))


def echo(value: object) -> str:
    """Render a rejected value for an error message, shortened so huge inputs stay readable."""
    text = str(value)
    return text if len(text) <= MAX_ECHO_CHARS else text[:MAX_ECHO_CHARS] + "…"


class BoundedIntegerField(serializers.IntegerField):
    def __init__(self, *, minimum: int, maximum: int, example: int, **kwargs) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self.example = example
        super().__init__(min_value=minimum, max_value=maximum, **kwargs)

    def to_internal_value(self, data: object) -> int:
        text = str(data).strip()
        try:
            value = int(text)
        except ValueError:
            raise serializers.ValidationError(
                _("%(field)s must be a whole number such as %(example)d; got '%(value)s'.")
                % {"field": field_label(self.field_name), "example": self.example, "value": echo(data)}
            ) from None
        if not self.minimum <= value <= self.maximum:
            raise serializers.ValidationError(
                _("%(field)s must be between %(min)d and %(max)d; got %(value)s.")
                % {
                    "field": field_label(self.field_name), "min": self.minimum, "max": self.maximum,
                    "value": echo(value),
                }
            )
        return value


class BoundedFloatField(serializers.FloatField):
    def __init__(self, *, minimum: float, maximum: float, example: float, **kwargs) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self.example = example
        super().__init__(min_value=minimum, max_value=maximum, **kwargs)

    def to_internal_value(self, data: object) -> float:
        try:
            value = float(str(data).strip())
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise serializers.ValidationError(
                _("%(field)s must be a number such as %(example)s; got '%(value)s'.")
                % {"field": field_label(self.field_name), "example": self.example, "value": echo(data)}
            )
        if not self.minimum <= value <= self.maximum:
            raise serializers.ValidationError(
                _("%(field)s must be between %(min)s and %(max)s; got %(value)s.")
                % {
                    # The value as sent: "-1", not the parsed -1.0.
                    "field": field_label(self.field_name), "min": self.minimum, "max": self.maximum,
                    "value": echo(str(data).strip()),
                }
            )
        return value
