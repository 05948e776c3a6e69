"""Property tests: parsers of caller input accept what they should and reject the rest cleanly."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone

from google.protobuf import timestamp_pb2
from hypothesis import given
from hypothesis import strategies as st

from runtime_service.convert import timestamp
from runtime_service.pagination import decode_page_token
from stopline.errors import InvalidArgument
from stopline.ids import parse_operation_id


@given(st.text(max_size=200))
def test_any_text_is_an_id_or_a_clean_invalid_argument(value: str) -> None:
    try:
        parsed = parse_operation_id(value)
    except InvalidArgument as exc:
        assert exc.field == "operation_id"
        assert len(str(exc)) < 300  # huge input is not echoed back whole
    else:
        assert str(uuid.UUID(parsed)) == parsed


@given(st.uuids())
def test_every_uuid_is_accepted_in_canonical_form(value: uuid.UUID) -> None:
    assert parse_operation_id(str(value)) == str(value)


@given(st.text(max_size=300), st.sampled_from([None, "RUNNING", "STOPPING"]))
def test_any_page_token_decodes_or_is_a_clean_invalid_argument(
    token: str, status: str | None
) -> None:
    try:
        decode_page_token(token, status)
    except InvalidArgument as exc:
        assert exc.field == "page_token"


@given(
    st.datetimes(
        timezones=st.one_of(
            st.none(),
            st.just(UTC),
            # Offsets of whole minutes (FromDatetime drops an offset's seconds), inside a day.
            st.integers(-1439, 1439).map(lambda m: timezone(timedelta(minutes=m))),
        ),
        # Far enough from the ends of datetime's range that an offset keeps UTC inside it.
        min_value=datetime(1, 1, 2),
        max_value=datetime(9999, 12, 30),
    )
)
def test_a_time_converts_to_the_timestamp_protobuf_itself_would_make(value: datetime) -> None:
    expected = timestamp_pb2.Timestamp()
    expected.FromDatetime(value)
    assert timestamp(value) == expected
