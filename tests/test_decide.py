"""Laws of enforcement: the idle policy and decide() (DESIGN sections 4, 5 and 6).

Each test is one law, stated in its docstring. Times are epoch seconds in 0..2e9; generated
observations put most times near `now`, so idle, lock and lifetime boundaries are reached.
"""
import json
from dataclasses import replace

from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant,
                                 precondition, rule)

import mngr

TMAX = 2 * 10**9
TIMES = st.integers(0, TMAX) | st.floats(0, TMAX, allow_nan=False, allow_infinity=False)
SOURCES = st.sampled_from(mngr.ACTIVITY_SOURCES)
SOURCE_SETS = st.sampled_from(list(mngr.IDLE_MODES.values())) | st.frozensets(SOURCES)
ERRORS = st.sampled_from(["bad signature", "unknown key", "older version than seen", "missing"])
TARGET = {"stop": "stopped", "mark_failed": "failed", "force_stop": "stopped"}
TIMEOUT_OF = {s: f"{s}_timeout" for s in ("building", "starting", "stopping")}


def _fix(fields, fixed):
    """Pin fields: a strategy replaces the default one, a plain value is used as is."""
    fields.update({name: value if isinstance(value, st.SearchStrategy) else st.just(value)
                   for name, value in fixed.items()})
    return fields


def policies(**fixed):
    """IdlePolicy; any keyword pins that field."""
    short = st.integers(1, 10**5)
    return st.builds(mngr.IdlePolicy, **_fix(dict(
        activity_sources=SOURCE_SETS, idle_timeout=st.integers(1, 10**6),
        max_lifetime=st.none() | st.integers(1, 10**7), trust=st.sampled_from(mngr.TRUST_LEVELS),
        trust_reported=st.booleans(), building_timeout=short, starting_timeout=short,
        stopping_timeout=short, deploy_timeout=short), fixed))


def moments(now=None):
    """Any time, or (given now) often a time shortly before or after it."""
    if now is None:
        return TIMES
    return TIMES | st.integers(-10**5, 2 * 10**6).map(lambda back: min(max(now - back, 0), TMAX))


def observations(now=None, **fixed):
    """Observation; any keyword pins that field."""
    at = moments(now)
    return st.builds(mngr.Observation, **_fix(dict(
        exists=st.booleans(), running=st.booleans(), state=st.sampled_from(mngr.HOST_STATES),
        state_since=at, verify_error=st.just("") | ERRORS,
        certified_created_at=st.none() | at, certified_boot_time=st.none() | at,
        signed_created_at=st.none() | at, process_alive=st.booleans(),
        reported=st.lists(st.tuples(SOURCES, at), max_size=4).map(tuple),
        deploy_lock_since=st.none() | at), fixed))


@st.composite
def cases(draw, policy=None, **fixed):
    """(observation, policy, now) with the observation's times clustered around now."""
    now = draw(TIMES)
    return draw(observations(now, **fixed)), draw(policies() if policy is None else policy), now


def healthy(**fields):
    """A running host whose signed record verified."""
    return dict(exists=True, running=True, state="running", verify_error="", **fields)


IDLE_HOST = mngr.Observation(**healthy(state_since=0))
AGENT = frozenset({"agent"})


# Totality, determinism, time ###############################################

@given(cases())
@example((IDLE_HOST, mngr.IdlePolicy(), 0))
@example((mngr.Observation(False, True, "building", TMAX, "x"), mngr.IdlePolicy(), TMAX))
def test_total(case):
    """decide never raises; the action is one of ACTIONS; the reason is a non-empty str."""
    decision = mngr.decide(*case)
    assert decision.action in mngr.ACTIONS
    assert isinstance(decision.reason, str) and decision.reason


@given(cases())
def test_deterministic(case):
    """The same input gives an equal Decision (no clock, no hidden state)."""
    assert mngr.decide(*case) == mngr.decide(*case)


@given(cases(), st.integers(0, 10**7) | st.floats(0, TMAX, allow_nan=False))
@example((IDLE_HOST, mngr.IdlePolicy(AGENT, idle_timeout=10), 10), 0)
@example((replace(IDLE_HOST, deploy_lock_since=5), mngr.IdlePolicy(AGENT, idle_timeout=10), 10), 1)
def test_monotone_in_time(case, dt):
    """Once an action is due it stays due: a stop at t is a stop at every t + dt."""
    obs, policy, now = case
    first = mngr.decide(obs, policy, now)
    if first.action != "none":
        assert mngr.decide(obs, policy, now + dt).action == first.action


# Trust #####################################################################

@given(cases(policies(trust="untrusted", trust_reported=False)),
       st.lists(st.tuples(SOURCES, TIMES), max_size=4).map(tuple))
@example((IDLE_HOST, mngr.IdlePolicy(AGENT, 10, trust="untrusted"), 10), (("agent", 10),))
def test_untrusted_host_cannot_report_its_way_out(case, other):
    """Untrusted, no opt-in: reported activity never delays a stop; the decision is unchanged."""
    obs, policy, now = case
    before = mngr.decide(obs, policy, now)
    after = mngr.decide(replace(obs, reported=other), policy, now)
    assert after.action == "stop" or before.action != "stop"      # no delay of a stop...
    assert after == before                                         # ...nor any other change


@given(cases(policies(trust="trusted"), **healthy()) | cases(policies(trust="trusted")),
       SOURCES, st.data())
@example((IDLE_HOST, mngr.IdlePolicy(AGENT, 10), 10), "agent", None)
@example((replace(IDLE_HOST, deploy_lock_since=95), mngr.IdlePolicy(AGENT, 10), 100), "agent", None)
def test_trusted_activity_only_keeps_or_delays(case, source, data):
    """Trusted: an extra reported activity never causes a stop and never brings the deadline closer."""
    obs, policy, now = case
    extra = (source, data.draw(moments(now)) if data else now)
    without = mngr.decide(obs, policy, now)
    with_it = mngr.decide(replace(obs, reported=obs.reported + (extra,)), policy, now)
    if with_it.action == "stop":
        assert without.action == "stop"
    if with_it.action == without.action == "none" and None not in (with_it.deadline, without.deadline):
        assert with_it.deadline >= without.deadline


@given(cases(policies(trust="trusted"), **healthy()), st.sampled_from(mngr.REPORTED_SOURCES),
       st.integers(1, TMAX))
@example((IDLE_HOST, mngr.IdlePolicy(AGENT, 10), 10), "agent", 1)
def test_reported_future_counts_as_now(case, source, ahead):
    """A reported time after now counts as exactly now: same decision, idle_seconds 0.
    (Only the sources a host can report: create, boot and process never come from it.)"""
    obs, policy, now = case
    policy = replace(policy, activity_sources=policy.activity_sources | {source})
    future = mngr.decide(replace(obs, reported=obs.reported + ((source, now + ahead),)), policy, now)
    present = mngr.decide(replace(obs, reported=obs.reported + ((source, now),)), policy, now)
    assert future == present
    assert future.idle_seconds in (None, 0)
    if policy.max_lifetime is None:
        assert (future.action, future.idle_seconds) == ("none", 0)


@given(cases(policies(trust_reported=True)), st.sampled_from(("create", "boot", "process")),
       st.integers(0, TMAX))
@example((IDLE_HOST, mngr.IdlePolicy(frozenset({"boot"}), 10, trust="untrusted",
                                     trust_reported=True), 10), "boot", 0)
def test_a_host_cannot_report_certified_sources(case, source, back):
    """create, boot and process come from mngr and the provider: a reported pair for them is ignored."""
    obs, policy, now = case
    forged = replace(obs, reported=obs.reported + ((source, now - back),))
    assert mngr.decide(forged, policy, now) == mngr.decide(obs, policy, now)


@given(cases(policies(trust="untrusted", trust_reported=False)), st.integers(0, 10**9))
@example((IDLE_HOST, mngr.IdlePolicy(AGENT, 10, trust="untrusted"), 10), 10**9)
def test_an_untrusted_host_cannot_hold_off_a_stop_with_a_deploy_lock(case, ahead):
    """The deploy lock is in the host dir: on an untrusted host it defers nothing."""
    obs, policy, now = case
    locked = replace(obs, deploy_lock_since=now + ahead)
    assert mngr.decide(locked, policy, now) == mngr.decide(replace(obs, deploy_lock_since=None),
                                                           policy, now)


# The policy's rules #########################################################

@given(cases(policies(activity_sources=frozenset(), max_lifetime=None), **healthy()))
@example((IDLE_HOST, mngr.IdlePolicy(), TMAX))
def test_disabled_never_idles(case):
    """No activity sources and no max_lifetime: a healthy running host is never stopped."""
    assert mngr.decide(*case).action != "stop"


@given(cases(policies(max_lifetime=None), **healthy()), SOURCES, st.data())
@example((IDLE_HOST, mngr.IdlePolicy(frozenset({"boot"}), 10), 10), "agent", None)
@example((IDLE_HOST, mngr.IdlePolicy(frozenset({"boot"}), 10), 10), "process", None)
def test_disabled_sources_are_ignored(case, source, data):
    """Without max_lifetime, what feeds only a source outside activity_sources never matters."""
    obs, policy, now = case
    policy = replace(policy, activity_sources=policy.activity_sources - {source})
    at = data.draw(moments(now)) if data else now
    feeds = {"boot": dict(certified_boot_time=at), "process": dict(process_alive=True),
             "create": dict(certified_created_at=at, signed_created_at=at)}
    fed = replace(obs, reported=obs.reported + ((source, at),), **feeds.get(source, {}))
    assert mngr.decide(fed, policy, now) == mngr.decide(obs, policy, now)


@given(cases(exists=True, running=True, verify_error=ERRORS))
@example((replace(IDLE_HOST, verify_error="bad signature", process_alive=True),
          mngr.IdlePolicy(frozenset({"process"})), 0))
def test_tampered_means_stop(case):
    """A running host whose signed record fails to verify is stopped, and the reason says tampered."""
    decision = mngr.decide(*case)
    assert decision.action == "stop" and "tampered" in decision.reason


@given(policies(trust="trusted", max_lifetime=None), st.integers(0, TMAX - 10**6))
@example(mngr.IdlePolicy(AGENT, idle_timeout=1), 0)
@example(mngr.IdlePolicy(mngr.IDLE_MODES["io"], idle_timeout=10**6), TMAX - 10**6)
def test_idle_boundary(policy, since):
    """Only activity is entering running at T: none at T+N-1, stop at T+N with deadline T+N, idle N."""
    policy = replace(policy, activity_sources=policy.activity_sources | AGENT)
    obs, n = mngr.Observation(**healthy(state_since=since)), policy.idle_timeout
    at = mngr.decide(obs, policy, since + n)
    assert (at.action, at.deadline, at.idle_seconds) == ("stop", since + n, n)
    before = mngr.decide(obs, policy, since + n - 1)
    assert (before.action, before.deadline, before.idle_seconds) == ("none", since + n, n - 1)


@given(policies(), st.integers(1, 10**7), st.integers(0, 10**9), st.integers(0, 10**6))
@example(mngr.IdlePolicy(frozenset({"process"})), 5, 0, 0)
def test_max_lifetime_wins(policy, lifetime, born, late):
    """At born + max_lifetime the host stops: a live process, fresh activity and a deploy lock don't help."""
    policy, now = replace(policy, max_lifetime=lifetime), born + lifetime + late
    fresh = tuple((source, now) for source in mngr.ACTIVITY_SOURCES)
    obs = mngr.Observation(**healthy(state_since=now, certified_created_at=born,
                                     process_alive=True, reported=fresh, deploy_lock_since=now))
    decision = mngr.decide(obs, policy, now)
    assert (decision.action, decision.deadline) == ("stop", born + lifetime)


@given(policies(trust="trusted", max_lifetime=None, activity_sources=AGENT),
       st.integers(0, 10**9), st.integers(0, 10**6), st.data())
@example(mngr.IdlePolicy(AGENT, idle_timeout=1, deploy_timeout=1), 0, 0, None)
def test_deploy_lock_defers_until_its_timeout(policy, since, over, data):
    """An idle host with a lock of age a: none while a < deploy_timeout, stop once a >= it."""
    now = since + policy.idle_timeout + over
    age = data.draw(st.integers(0, 2 * policy.deploy_timeout)) if data else policy.deploy_timeout
    obs = mngr.Observation(**healthy(state_since=since, deploy_lock_since=now - age))
    expected = "none" if age < policy.deploy_timeout else "stop"
    assert mngr.decide(obs, policy, now).action == expected


@given(policies(), st.sampled_from(sorted(TIMEOUT_OF)), st.booleans(), st.integers(0, 10**9),
       st.integers(0, 10**5))
@example(mngr.IdlePolicy(building_timeout=1), "building", False, 0, 0)
@example(mngr.IdlePolicy(stopping_timeout=1), "stopping", True, 0, 0)
def test_transitional_timeouts(policy, state, running, since, extra):
    """building/starting past their timeout -> mark_failed; stopping -> force_stop; before -> none."""
    limit = getattr(policy, TIMEOUT_OF[state])
    obs = mngr.Observation(exists=state != "building", running=running, state=state, state_since=since)
    late = mngr.decide(obs, policy, since + limit + extra)
    assert late.action == ("force_stop" if state == "stopping" else "mark_failed")
    assert mngr.decide(obs, policy, since + min(extra, limit - 1)).action == "none"


@given(cases())
@example((mngr.Observation(True, True, "starting", 0, "bad signature"), mngr.IdlePolicy(), 0))
@example((mngr.Observation(True, True, "failed", 0, "bad signature"), mngr.IdlePolicy(), 0))
def test_applied_decision_then_reobserved_is_none(case):
    """A due action is a legal move from the observed state; applied and re-observed, nothing is due."""
    obs, policy, now = case
    running = obs.running and obs.exists                 # providers never run a missing host
    obs = replace(obs, running=running, state=mngr.derive_state(obs.exists, running, obs.state))
    decision = mngr.decide(obs, policy, now)
    if decision.action == "none":
        return
    if obs.state == "failed":  # a failed host still running is only killed: it stays failed
        assert decision.action == "stop", decision
        stopped = replace(obs, running=False)
        assert mngr.decide(stopped, policy, now).action == "none"
        return
    target = TARGET[decision.action]
    assert target in mngr.HOST_TRANSITIONS[obs.state], (obs.state, decision)
    after = mngr.transition(mngr.Lifecycle(obs.state, obs.state_since), target, now)
    again = replace(obs, exists=True, running=False, state=after.state, state_since=now)
    assert mngr.decide(again, policy, now).action == "none"


# Modes #####################################################################

DESIGN_MODES = {  # DESIGN section 5, copied by hand
    "io": "user agent ssh create start boot", "user": "user ssh create start boot",
    "agent": "agent ssh create start boot", "ssh": "ssh create start boot", "create": "create",
    "boot": "boot", "start": "start boot", "run": "create start boot process", "disabled": "",
}


@given(st.frozensets(SOURCES))
@example(frozenset({"user", "agent"}))
def test_mode_table_is_design_section_5(sources):
    """IDLE_MODES is DESIGN section 5's table; mode_for names each mode's set, any other is custom."""
    assert mngr.IDLE_MODES == {m: frozenset(s.split()) for m, s in DESIGN_MODES.items()}
    for mode, mode_sources in mngr.IDLE_MODES.items():
        assert mngr.mode_for(mode_sources) == mode == mngr.IdlePolicy.for_mode(mode).idle_mode
    named = [m for m, s in mngr.IDLE_MODES.items() if s == sources]
    assert mngr.mode_for(sources) == (named[0] if named else "custom")


@given(policies())
def test_policy_round_trips(policy):
    """IdlePolicy.from_dict(to_dict()) is the same policy, also through JSON (data.json)."""
    assert mngr.IdlePolicy.from_dict(policy.to_dict()) == policy
    assert mngr.IdlePolicy.from_dict(json.loads(json.dumps(policy.to_dict()))) == policy


# The lifecycle, driven ######################################################

UP = ("starting", "running", "stopping")     # the provider reports these hosts as running
STALLS = st.none() | st.sampled_from(["building", "starting"])   # where creating the host hangs


class HostLifecycleMachine(RuleBasedStateMachine):
    """One host under one policy: users create, stop, start and destroy it; it reports
    activity or is tampered with; its provider may not answer; enforce decides and acts.
    Model: the lifecycle, when the host was created and last booted, what it reported,
    whether it is tampered, whether the provider answers, and a log of every move."""

    @initialize(policy=policies(idle_timeout=st.integers(1, 10**5),   # the scale of the other
                                max_lifetime=st.none() | st.integers(1, 10**5)),  # timeouts
                clock=st.integers(0, 10**9), stall=STALLS)
    def setup(self, policy, clock, stall):
        self.policy, self.clock, self.life, self.log = policy, clock, None, []
        self.reachable, self.after_enforce = True, None
        self.create(stall)               # swarm testing may switch the create rule off

    def move(self, *states):
        for state in states:
            self.log.append((self.life.state, state))
            self.life = mngr.transition(self.life, state, self.clock)

    def state(self):
        return self.life and self.life.state

    def snapshot(self):
        return self.life, self.clock, self.tampered, len(self.activity), self.booted

    def observe(self):
        state = self.state()
        exists, running = state not in ("building", "destroyed"), state in UP
        return mngr.Observation(
            exists=exists, running=running, state=mngr.derive_state(exists, running, state),
            state_since=self.life.since, verify_error="bad signature" if self.tampered else "",
            certified_created_at=self.created, certified_boot_time=self.booted,
            signed_created_at=self.created, reported=tuple(self.activity))

    def expected_action(self):
        """The model's answer, written without decide's code paths."""
        p, state, now, since = self.policy, self.state(), self.clock, self.life.since
        if self.tampered and state in UP:
            return "stop"
        if state in TIMEOUT_OF:
            due = now - since >= getattr(p, TIMEOUT_OF[state])
            return ("force_stop" if state == "stopping" else "mark_failed") if due else "none"
        if state != "running":
            return "none"
        if p.max_lifetime is not None and now >= self.booted + p.max_lifetime:
            return "stop"
        if not p.activity_sources:
            return "none"
        believed = p.trust == "trusted" or p.trust_reported
        last = max([since] + [t for s, t in self.activity if believed and s in p.activity_sources])
        return "stop" if now - last >= p.idle_timeout else "none"

    @precondition(lambda self: self.state() in (None, "destroyed"))
    @rule(stall=STALLS)
    def create(self, stall):
        self.activity, self.tampered, self.created, self.booted = [], False, None, None
        self.life = mngr.Lifecycle("building", self.clock)
        if stall != "building":
            self.move("starting")
            self.created = self.booted = self.clock
            self.move(*(() if stall == "starting" else ("running",)))

    @precondition(lambda self: self.life is not None)
    @rule(data=st.data())
    def tick(self, data):
        steps = st.integers(0, 2 * self.policy.idle_timeout)
        deadline = mngr.decide(self.observe(), self.policy, self.clock).deadline
        if deadline is not None and deadline > self.clock:      # often land on the boundary
            steps |= st.sampled_from([int(deadline - self.clock) - 1, int(deadline - self.clock)])
        self.clock += data.draw(steps, "dt")

    @precondition(lambda self: self.state() in UP)
    @rule(source=st.sampled_from(mngr.REPORTED_SOURCES))
    def report_activity(self, source):
        self.activity.append((source, self.clock))

    @precondition(lambda self: self.state() not in (None, "destroyed"))
    @rule()
    def tamper(self):
        self.tampered = True

    @precondition(lambda self: self.state() not in (None, "destroyed"))
    @rule()
    def provider_outage(self):
        self.reachable = False

    @precondition(lambda self: self.state() == "running")
    @rule(stall=st.booleans())
    def user_stop(self, stall):
        self.move("stopping", *(() if stall else ("stopped",)))

    @precondition(lambda self: self.state() == "stopped")
    @rule(stall=st.booleans())
    def user_start(self, stall):
        self.booted = self.clock
        self.move("starting", *(() if stall else ("running",)))

    @precondition(lambda self: self.state() in ("running", "stopped", "failed"))
    @rule()
    def destroy(self):
        self.move("destroyed")

    @precondition(lambda self: self.life is not None)
    @rule()
    def enforce(self):
        if not self.reachable:
            # No answer: this host is skipped (nothing moves). Had the enforcer taken the
            # silence for "gone", decide must still do nothing: never act on missing facts.
            self.reachable, self.after_enforce = True, None
            if self.state() != "building":
                blind = replace(self.observe(), exists=False, running=False, state="destroyed")
                assert mngr.decide(blind, self.policy, self.clock).action == "none"
            return
        decision = mngr.decide(self.observe(), self.policy, self.clock)
        assert decision.action == self.expected_action(), decision
        if decision.action != "none":
            self.move(TARGET[decision.action])
        self.after_enforce = self.snapshot()

    @invariant()
    def lifecycle_is_legal(self):
        assert self.life is None or self.life.state in mngr.HOST_STATES
        assert all(new in mngr.HOST_TRANSITIONS[old] for old, new in self.log)

    @invariant()
    def enforce_leaves_nothing_due(self):
        """Right after an enforce: no tampered host still up, and a second enforce does nothing."""
        if self.after_enforce is not None and self.after_enforce == self.snapshot():
            assert not (self.tampered and self.state() in UP)
            assert mngr.decide(self.observe(), self.policy, self.clock).action == "none"


TestHostLifecycle = HostLifecycleMachine.TestCase
TestHostLifecycle.settings = settings(max_examples=2 * settings().max_examples, stateful_step_count=30)
