import dataclasses

import pytest

from cache.keys import CacheKey
from cache.testing import make_key

CHANGED_VALUES: dict[str, object] = {
    "template_hash": "f" * 64,
    "model_id": "black-forest-labs/FLUX.1-dev",
    "model_revision": "0123abc",
    "width": 768,
    "height": 768,
    "steps": 20,
    "scheduler_hash": "e" * 64,
    "seed": 1,
    "guidance": 30.000001,
    "dtype": "float16",
    "variant": "hidden",
    "prompt_hash": "d" * 64,
}


def test_every_field_is_covered_by_the_table() -> None:
    assert set(CHANGED_VALUES) == {field.name for field in dataclasses.fields(CacheKey)}


@pytest.mark.parametrize("field_name", sorted(CHANGED_VALUES))
def test_key_changes_digest_per_field(field_name: str) -> None:
    base = make_key()
    changed = dataclasses.replace(base, **{field_name: CHANGED_VALUES[field_name]})

    assert changed != base
    assert changed.digest() != base.digest()


def test_key_digest_stable_for_equal_fields() -> None:
    assert make_key(3).digest() == make_key(3).digest()
    assert len(make_key(3).digest()) == 64


def test_key_width_height_swap_differs() -> None:
    wide = make_key(width=1024, height=768)
    tall = make_key(width=768, height=1024)

    assert wide.digest() != tall.digest()


def test_key_canonical_round_trip() -> None:
    key = make_key(7, guidance=3.5)

    assert CacheKey.from_canonical(key.canonical()) == key


@pytest.mark.parametrize(
    ("field_name", "value"),
    [("steps", 0), ("width", -8), ("variant", "logits"), ("model_id", "")],
)
def test_key_rejects_invalid_field(field_name: str, value: object) -> None:
    with pytest.raises(ValueError, match=field_name):
        make_key(**{field_name: value})
