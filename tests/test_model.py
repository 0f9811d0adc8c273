"""Laws of the model: names, durations and the host lifecycle (DESIGN section 4).

Each test is one law, stated in its docstring. The references here are built
independently of mngr's regexes, so a wrong regex cannot agree with itself.
"""
import string

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import mngr

# Names #####################################################################

LABEL_CHARS = frozenset(string.ascii_letters + string.digits + "-")


def is_dns_label(text: str) -> bool:
    """The reference: 1-63 ASCII letters, digits and hyphens, no hyphen at either end."""
    return (1 <= len(text) <= 63 and set(text) <= LABEL_CHARS
            and not text.startswith("-") and not text.endswith("-"))


# Mostly near-misses: label characters plus a few that must never get through.
name_texts = st.one_of(
    st.text(),
    st.text(alphabet=string.ascii_letters + string.digits + "-", max_size=70),
    st.text(alphabet="aZ09-._ \n\té", max_size=66),
)


@given(name_texts)
@example("a")
@example("-a")
@example("a-")
@example("a-b")
@example("a" * 63)
@example("a" * 64)
@example("a.b")
@example("")
@example("é")
@example("ab\n")      # a regex anchored with '$' lets a trailing newline through
def test_validate_name_accepts_exactly_dns_labels(text):
    """validate_name returns the name iff it is a DNS label; otherwise a usage error (exit 2)."""
    if is_dns_label(text):
        assert mngr.validate_name(text) == text
    else:
        with pytest.raises(mngr.UsageError) as caught:
            mngr.validate_name(text)
        assert caught.value.exit_code == 2
        assert repr(text) in caught.value.message


@given(st.one_of(st.none(), st.integers(), st.binary(), st.lists(st.text())))
def test_validate_name_rejects_non_strings(value):
    """Anything that is not a str is a usage error, never a TypeError."""
    with pytest.raises(mngr.UsageError) as caught:
        mngr.validate_name(value)
    assert caught.value.exit_code == 2


# Durations #################################################################

FACTORS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def reference_duration(text: str):
    """Seconds for "<1-12 ASCII digits>[smhd]", perhaps padded with whitespace; else None."""
    body = text.strip()
    unit = body[-1:] if body[-1:] in ("s", "m", "h", "d") else ""
    digits = body[:len(body) - len(unit)]
    if digits and len(digits) <= 12 and all(c in "0123456789" for c in digits):
        return int(digits) * FACTORS[unit]
    return None


def assert_bad_duration(value):
    with pytest.raises(mngr.UsageError) as caught:
        mngr.parse_duration(value)
    assert caught.value.exit_code == 2
    assert repr(value) in caught.value.message


MAX_DIGITS = 10**12 - 1   # durations have at most 12 digits: longer is a usage error, not a crash


@given(st.integers(min_value=0, max_value=MAX_DIGITS), st.sampled_from(sorted(FACTORS)))
@example(MAX_DIGITS, "d")
@example(0, "")
@example(0, "d")
@example(1, "s")
def test_duration_is_number_times_unit(n, unit):
    """'<n><unit>' parses to n * the unit's size in seconds."""
    assert mngr.parse_duration(f"{n}{unit}") == n * FACTORS[unit]


@given(st.integers(min_value=0))
@example(0)
def test_duration_ints_pass_through(n):
    """A non-negative int is already a number of seconds."""
    assert mngr.parse_duration(n) == n


@given(st.one_of(
    st.text(),
    st.text(alphabet="0123456789smhdw.-+ \t", max_size=10),
))
@example("-5")
@example("-5m")
@example("1.5m")
@example("5w")
@example("")
@example("m")
@example("5mm")
@example(" 5m\n")
@example("5 m")
@example("\u0663")        # ARABIC-INDIC DIGIT THREE: a digit, but not an ASCII one
@example("\u0663m")
@example("1" * 13)
@example("1" * 5000)
def test_duration_text_agrees_with_reference(text):
    """A string parses iff it is ASCII digits and an optional unit (padding aside); else usage error."""
    expected = reference_duration(text)
    if expected is None:
        assert_bad_duration(text)
    else:
        assert mngr.parse_duration(text) == expected


@given(st.one_of(
    st.none(), st.booleans(), st.integers(max_value=-1),
    st.floats(), st.lists(st.integers()), st.binary(),
))
@example(None)
@example(True)
@example(False)
@example(-1)
@example(1.5)
@example(5.0)
def test_duration_rejects_other_values(value):
    """None, bools, negative ints, floats and other types are usage errors naming the value."""
    assert_bad_duration(value)


@given(st.integers(min_value=0, max_value=MAX_DIGITS))
@example(0)
@example(59)
@example(60)
@example(3600)
@example(86400)
@example(86401)
def test_format_then_parse_round_trips(n):
    """parse_duration(format_duration(n)) == n for every n >= 0."""
    assert mngr.parse_duration(mngr.format_duration(n)) == n


# Transitions ###############################################################

# DESIGN section 4, written out by hand.
EXPECTED_TRANSITIONS = {
    "building": {"starting", "failed"},
    "starting": {"running", "failed", "stopped"},
    "running": {"stopping", "stopped", "destroyed"},
    "stopping": {"stopped"},
    "stopped": {"starting", "destroyed"},
    "failed": {"destroyed"},
    "destroyed": set(),
}

states = st.sampled_from(mngr.HOST_STATES)
moments = st.floats(allow_nan=False)


def test_transition_table_is_design_section_4():
    """HOST_TRANSITIONS lists exactly the moves of DESIGN section 4, over exactly HOST_STATES."""
    assert set(mngr.HOST_STATES) == set(EXPECTED_TRANSITIONS)
    assert {s: set(t) for s, t in mngr.HOST_TRANSITIONS.items()} == EXPECTED_TRANSITIONS


@given(states, states, moments, moments)
def test_transition_allows_exactly_the_table(current, new, since, now):
    """A listed move yields Lifecycle(new, now); any other raises InvalidTransitionError."""
    before = mngr.Lifecycle(current, since)
    if new in EXPECTED_TRANSITIONS[current]:
        assert mngr.transition(before, new, now) == mngr.Lifecycle(new, now)
    else:
        with pytest.raises(mngr.InvalidTransitionError) as caught:
            mngr.transition(before, new, now)
        allowed = ", ".join(sorted(EXPECTED_TRANSITIONS[current])) or "nothing"
        assert caught.value.hint == f"from {current} it can go to: {allowed}"
    assert before == mngr.Lifecycle(current, since)


@given(states, st.text().filter(lambda s: s not in mngr.HOST_STATES), moments)
@example("running", "", 0.0)
@example("running", "Running", 0.0)
def test_transition_to_unknown_state_is_refused(current, new, now):
    """No state outside HOST_STATES can be entered, from anywhere."""
    with pytest.raises(mngr.InvalidTransitionError):
        mngr.transition(mngr.Lifecycle(current, 0.0), new, now)


@given(st.text().filter(lambda s: s not in mngr.HOST_STATES), states, moments)
def test_transition_from_unknown_state_is_refused(current, new, now):
    """A lifecycle in a state the table does not know can go nowhere."""
    with pytest.raises(mngr.InvalidTransitionError):
        mngr.transition(mngr.Lifecycle(current, 0.0), new, now)
